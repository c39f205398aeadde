"""Drive the admin shell with the real OpenSSH client, through a local pty."""

from __future__ import annotations

import os
import pty
import re
import select
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.daemon import track

SSH = shutil.which("ssh") or "/usr/bin/ssh"
SSH_KEYGEN = shutil.which("ssh-keygen") or "/usr/bin/ssh-keygen"

# CSI sequences, other two-byte escapes and carriage returns: what a terminal eats.
_ESCAPES = re.compile(rb"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-Z\\-_=>78c]|\r")


def plain(data: bytes) -> str:
    return _ESCAPES.sub(b"", data).decode("utf-8", "replace")


def make_key(path: Path, comment: str) -> Path:
    subprocess.run(
        [SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        timeout=30,
    )
    return path


def ssh_argv(
    port: int, key: Path | None, known_hosts: Path, *options: str, host: str = "127.0.0.1"
) -> list[str]:
    argv = [
        SSH,
        "-F",
        "/dev/null",
        "-p",
        str(port),
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=yes",
        f"-oUserKnownHostsFile={known_hosts}",
        "-o",
        "GlobalKnownHostsFile=/dev/null",
        "-o",
        "IdentityAgent=none",
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "ConnectTimeout=10",
        "-o",
        "ServerAliveInterval=0",
    ]
    if key is not None:
        argv += ["-i", str(key)]
    return [*argv, *options, f"admin@{host}"]


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout}s")


class PtyShell:
    """``ssh -tt`` on a local pty; ``expect`` reads until a pattern shows (bounded)."""

    def __init__(self, argv: list[str]) -> None:
        self.master, slave = pty.openpty()
        self.process = track(
            subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
        )
        os.close(slave)
        self.seen = b""
        self.position = 0  # in plain(self.seen)
        self.consumed = ""

    def send(self, text: str) -> None:
        os.write(self.master, text.encode())

    def line(self, text: str) -> None:
        self.send(text + "\r")

    def _read(self, until: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], max(0.0, until - time.monotonic()))
        if not ready:
            return False
        try:
            chunk = os.read(self.master, 65536)
        except OSError:  # EIO: the child closed the pty
            chunk = b""
        if not chunk:
            raise EOFError(f"ssh closed the terminal; output so far:\n{plain(self.seen)}")
        self.seen += chunk
        return True

    def expect(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        """Wait for ``pattern`` in output not yet consumed; consume up to its end."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            text = plain(self.seen)[self.position :]
            match = regex.search(text)
            if match:
                self.consumed = text[: match.end()]
                self.position += match.end()
                return match
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no {pattern!r} within {timeout}s; got:\n{text}")
            self._read(deadline)

    def upto(self, pattern: str, timeout: float = 20.0) -> str:
        """Wait for ``pattern``; return everything consumed, the match included."""
        self.expect(pattern, timeout)
        return self.consumed

    def wait(self, timeout: float = 20.0) -> int:
        deadline = time.monotonic() + timeout
        while self.process.poll() is None and time.monotonic() < deadline:
            try:
                self._read(min(deadline, time.monotonic() + 0.2))
            except EOFError:
                break
        try:
            return self.process.wait(max(0.1, deadline - time.monotonic()))
        finally:
            self.close()

    def close(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        try:
            os.close(self.master)
        except OSError:
            pass
