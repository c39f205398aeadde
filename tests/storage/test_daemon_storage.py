"""The storage service inside a real ``twistd -n enclaves``."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.daemon import Daemon

pytestmark = pytest.mark.system


def test_daemon_loads_storage_and_refuses_a_second_server(tmp_path: Path) -> None:
    first = Daemon(tmp_path / "one", "--max-pending", "10", "--max-pending-bytes", "4096")
    first.workdir.mkdir()
    first.start()
    try:
        assert "storage loaded 0 users and 0 pending messages" in first.log_text()
        for sub in ("users", "pending", "quarantine"):
            assert (first.data_dir / sub).is_dir()
        second = Daemon(tmp_path / "two")
        second.workdir.mkdir()
        second.data_dir = first.data_dir
        done = subprocess.run(
            second.argv(), cwd=second.workdir, env=second.env(), capture_output=True, timeout=30
        )
        assert done.returncode == 1
        assert b"another Enclaves server is using data directory" in done.stderr
    finally:
        assert first.stop() == 0
