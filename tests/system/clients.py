"""Real ``python -m enclaves`` client processes driven through pipes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from enclaves.crypto import KeyPair
from enclaves.token import EnrollmentToken
from tests.daemon import ROOT, Daemon, track
from tests.system.helpers import make_users

PASSPHRASE = "correct horse battery staple"
# Fast reconnects and short ticks keep the tests quick.
FAST = ["--retry-max", "1", "--tick", "1"]


def client_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.pop("ENCLAVES_PASSPHRASE_FILE", None)
    return env


async def new_tokens(daemon: Daemon, count: int, lifetime: float = 3600) -> list[str]:
    """Enrolling users stored before the daemon starts; their tokens name its port."""
    users = {1000 + 17 * n + int.from_bytes(os.urandom(3), "big"): KeyPair.generate()
             for n in range(count)}  # fmt: skip
    await make_users(daemon.data_dir, users, enrolling_s=lifetime)
    return [str(EnrollmentToken(u, k, f"127.0.0.1:{daemon.port}")) for u, k in users.items()]


class Client:
    """One client process; every stdout line is collected by a reader thread.
    ``wrapper`` runs it under another command (``nsenter ...``)."""

    def __init__(
        self,
        argv: list[str],
        stdin_text: str = "",
        cwd: Path | None = None,
        wrapper: Sequence[str] = (),
    ) -> None:
        self.argv = argv
        self.process = track(
            subprocess.Popen(
                [*wrapper, sys.executable, "-m", "enclaves", *argv],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=client_env(),
                cwd=cwd or ROOT,
            )
        )
        self.lines: list[str] = []
        self.err: list[str] = []
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(
                target=self._read, args=(self.process.stdout, self.lines), daemon=True
            ),
            threading.Thread(target=self._read, args=(self.process.stderr, self.err), daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        self._pos = 0
        if stdin_text:
            self.send(stdin_text)

    def _read(self, stream: object, into: list[str]) -> None:
        for raw in iter(stream.readline, b""):  # type: ignore[attr-defined]
            with self._lock:
                into.append(raw.decode("utf-8", errors="replace").rstrip("\n"))

    def send(self, text: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write((text.rstrip("\n") + "\n").encode())
        self.process.stdin.flush()

    def expect(self, pattern: str, timeout: float = 15.0) -> re.Match[str]:
        """The next output line (after the last match) matching ``pattern``."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                lines = self.lines[self._pos :]
            for i, line in enumerate(lines):
                match = regex.search(line)
                if match:
                    self._pos += i + 1
                    return match
            if time.monotonic() > deadline or self.process.poll() is not None:
                with self._lock:
                    tail = "\n".join(self.lines[-40:] + self.err[-20:])
                if self.process.poll() is not None:
                    time.sleep(0.2)  # let the reader threads finish
                    with self._lock:
                        lines = self.lines[self._pos :]
                    for i, line in enumerate(lines):
                        match = regex.search(line)
                        if match:
                            self._pos += i + 1
                            return match
                raise AssertionError(f"no line matching {pattern!r} within {timeout}s:\n{tail}")
            time.sleep(0.02)

    def seen(self, pattern: str) -> list[str]:
        """Every output line so far matching ``pattern``."""
        regex = re.compile(pattern)
        with self._lock:
            return [line for line in self.lines if regex.search(line)]

    def wait(self, timeout: float = 20.0) -> int:
        code = self.process.wait(timeout)
        for thread in self._threads:
            thread.join(5)
        return code

    def quit(self, timeout: float = 20.0) -> int:
        if self.process.poll() is None:
            try:
                self.send("/quit")
            except (BrokenPipeError, OSError):
                pass
        return self.wait(timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)

    def output(self) -> str:
        with self._lock:
            return "\n".join(self.lines) + "\n--- stderr ---\n" + "\n".join(self.err)


def enroll(token: str, keystore: Path, *extra: str, passphrase: str = PASSPHRASE) -> Client:
    """Run ``enclaves enroll`` to completion; the passphrase comes from stdin."""
    client = Client(["enroll", token, "--keystore", str(keystore), *extra], passphrase)
    client.wait(60)
    return client


def chat(keystore: Path, *extra: str, passphrase: str = PASSPHRASE) -> Client:
    """Start ``enclaves`` and wait until it is connected."""
    client = Client(["--keystore", str(keystore), *FAST, *extra], passphrase)
    client.expect(r"^\[conn\] connected as ")
    return client
