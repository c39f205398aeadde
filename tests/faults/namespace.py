"""A private mount namespace with a small tmpfs, for a daemon whose disk fills or turns read-only.

A sleeping ``unshare -m`` process keeps the namespace (and its tmpfs) alive
across daemon restarts; daemons and ``mount`` commands enter it with
``nsenter``; this process reaches the files through ``/proc/PID/root``.
Nothing is mounted in the test's own namespace.  :meth:`MountNamespace.start`
skips the test, with the reason, where the machine does not allow it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.daemon import Daemon, track


class MountNamespace:
    def __init__(self, mnt: Path, size: str) -> None:
        self.mnt = mnt
        self.size = size
        self.holder: subprocess.Popen[bytes] | None = None

    def start(self) -> MountNamespace:
        if os.geteuid() != 0 or not (shutil.which("unshare") and shutil.which("nsenter")):
            pytest.skip("needs root with unshare and nsenter to mount a private tmpfs")
        self.mnt.mkdir(parents=True, exist_ok=True)
        script = (
            f"mount -t tmpfs -o size={self.size},mode=0700 tmpfs '{self.mnt}' "
            "&& echo ready && exec sleep 600"
        )
        self.holder = track(
            subprocess.Popen(
                ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        )
        assert self.holder.stdout is not None
        if self.holder.stdout.readline() != b"ready\n":
            self.holder.wait(10)
            reason = self.holder.stderr.read().decode().strip() if self.holder.stderr else ""
            pytest.skip(f"cannot mount a private tmpfs here: {reason}")
        return self

    @property
    def pid(self) -> int:
        assert self.holder is not None
        return self.holder.pid

    def enter(self, argv: list[str]) -> list[str]:
        return ["nsenter", "-t", str(self.pid), "-m", "--", *argv]

    def outside(self, path: Path) -> Path:
        """``path`` (as the namespace sees it) as this process can reach it."""
        return Path(f"/proc/{self.pid}/root") / path.relative_to("/")

    def remount(self, mode: str) -> None:
        subprocess.run(self.enter(["mount", "-o", f"remount,{mode}", str(self.mnt)]), check=True)

    def stop(self) -> None:
        if self.holder is not None and self.holder.poll() is None:
            self.holder.send_signal(signal.SIGKILL)
            self.holder.wait(10)


class NamespacedDaemon(Daemon):
    """A Daemon whose data directory is on the namespace's tmpfs (its log is not)."""

    def __init__(self, workdir: Path, ns: MountNamespace, *extra: str) -> None:
        super().__init__(workdir, *extra)
        self.ns = ns
        self.data_dir = ns.mnt / "data"

    def argv(self) -> list[str]:
        return self.ns.enter(super().argv())
