"""Run a real ``twistd -n enclaves`` subprocess on a free loopback port.

Every child process a test starts (daemons, client processes, ssh, helpers)
is registered with :func:`track`; a fixture in tests/conftest.py calls
:func:`reap` after each test module, so a test that fails half way never
leaves a ``twistd`` or a client running.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_STARTED: list[subprocess.Popen[bytes]] = []


def track(process: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
    """Register a child process to be killed by :func:`reap` if a test leaves it."""
    _STARTED.append(process)
    return process


def reap() -> list[str]:
    """SIGKILL every registered child still running; their command lines."""
    leaked = []
    while _STARTED:
        process = _STARTED.pop()
        if process.poll() is not None:
            continue
        leaked.append(" ".join(map(str, process.args))[:200])  # type: ignore[union-attr]
        try:
            if os.getpgid(process.pid) == process.pid:  # a session of its own: all of it
                os.killpg(process.pid, signal.SIGKILL)
            else:
                process.kill()
            process.wait(10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    return leaked


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def twistd_command() -> list[str]:
    twistd = Path(sys.executable).with_name("twistd")
    if twistd.exists():
        return [str(twistd)]
    return [sys.executable, "-m", "twisted"]


class DaemonHung(AssertionError):
    """A daemon did not exit in time after a signal; carries its threads'
    stacks (faulthandler) and the end of its log."""

    def __init__(self, stacks: str, log: str) -> None:
        super().__init__(
            f"twistd did not exit in time; its threads were at:\n{stacks}\nend of its log:\n{log}"
        )


class Daemon:
    """A ``twistd -n enclaves`` child with its own data directory and log file."""

    def __init__(self, workdir: Path, *extra: str, port: int | None = None) -> None:
        self.workdir = Path(workdir)
        self.data_dir = self.workdir / "data"
        self.port = port or free_port()
        self.log_path = self.workdir / "twistd.log"
        self.extra = list(extra)
        self.process: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        return [
            *twistd_command(),
            "-n",
            "--pidfile=",
            f"--logfile={self.log_path}",
            "enclaves",
            f"--listen=tcp:{self.port}:interface=127.0.0.1",
            f"--data-dir={self.data_dir}",
            *self.extra,
        ]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        # Test the source tree, dropin included.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        # A daemon that does not stop in time is sent SIGABRT (see stop):
        # faulthandler then writes every thread's stack to its stderr.
        env["PYTHONFAULTHANDLER"] = "1"
        return env

    def start(self, timeout: float = 20.0) -> None:
        self.process = track(
            subprocess.Popen(
                self.argv(),
                cwd=self.workdir,
                env=self.env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        )
        self.wait_listening(timeout)

    def wait_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                out, err = self.process.communicate()
                raise RuntimeError(
                    f"twistd exited with {self.process.returncode}: {err.decode()} "
                    f"{out.decode()} {self.log_text()}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"twistd did not listen within {timeout}s: {self.log_text()}")

    def log_text(self) -> str:
        try:
            return self.log_path.read_text()
        except FileNotFoundError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise DaemonHung(self._stacks_and_kill(), self.log_text()[-4000:]) from None
        self.process.communicate()
        return self.process.returncode

    def _stacks_and_kill(self) -> str:
        """SIGABRT (faulthandler's stack dump, see env), then SIGKILL; the dump."""
        assert self.process is not None
        self.process.send_signal(signal.SIGABRT)
        try:
            _out, err = self.process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _out, err = self.process.communicate()
        return err.decode(errors="replace")[-8000:]

    def kill(self) -> None:
        self.stop(signal.SIGKILL)
