"""tests/daemon.py itself: a daemon that does not stop in time is diagnosed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.daemon import Daemon, DaemonHung

# Ignores SIGTERM and waits where its stack will show it.
_STUCK = """
import signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
def stuck_in_shutdown():
    while True:
        time.sleep(0.05)
print("ready", flush=True)
stuck_in_shutdown()
"""


class _Stuck(Daemon):
    def argv(self) -> list[str]:
        return [sys.executable, "-c", _STUCK]

    def wait_listening(self, timeout: float) -> None:
        assert self.process is not None and self.process.stdout is not None
        assert self.process.stdout.readline() == b"ready\n"


def test_a_daemon_that_does_not_stop_is_reported_with_its_stacks(tmp_path: Path) -> None:
    daemon = _Stuck(tmp_path)
    daemon.start()
    with pytest.raises(DaemonHung) as hung:
        daemon.stop(timeout=1)
    assert "stuck_in_shutdown" in str(hung.value)  # faulthandler's dump of the hang
    assert daemon.process is not None and daemon.process.poll() is not None
