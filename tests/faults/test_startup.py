"""Start-up with the server key missing or exposed: a one-line refusal that touches nothing.

tests/system/test_daemon.py checks the refusals' wording; here the point is
the fault: whatever is wrong with the key, the daemon exits 1 with exactly
one line on stderr and no traceback, and every file of the data directory
(and of the key's own directory) is byte for byte, mode and time as before —
in particular no new key is made that could never read the data.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import pytest_twisted

from tests.adversarial.live import Live
from tests.daemon import twistd_command

pytestmark = pytest.mark.system

Snapshot = dict[str, tuple[bytes, int, int]]


def snapshot(*roots: Path) -> Snapshot:
    out: Snapshot = {}
    for root in roots:
        for path in [root, *root.rglob("*")]:
            info = path.lstat()
            data = path.read_bytes() if path.is_file() else b""
            out[str(path)] = (data, info.st_mode, info.st_mtime_ns)
    return out


def start(live: Live, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            *twistd_command(),
            "-n",
            "--pidfile=",
            "enclaves",
            "--listen=tcp:0:interface=127.0.0.1",
            f"--data-dir={live.daemon.data_dir}",
            *args,
        ],
        cwd=live.daemon.workdir,
        env=live.daemon.env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def assert_refused(done: subprocess.CompletedProcess[str], words: str) -> None:
    assert done.returncode == 1, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], done.stderr
    assert "Traceback" not in done.stderr + done.stdout


@pytest_twisted.ensureDeferred
async def test_missing_or_exposed_key_refuses_and_touches_nothing(tmp_path: Path) -> None:
    """The key file is deleted, kept elsewhere but not there (the USB stick not
    mounted), or readable by others.  Each start refuses in one line and
    leaves every file as it was; with the key back, the daemon serves."""
    live = await Live(tmp_path).start()
    await live.check()
    live.stop()
    data = live.daemon.data_dir
    key = data / "server.key"
    elsewhere = tmp_path / "keydisk"
    elsewhere.mkdir(mode=0o700)
    saved = key.read_bytes()
    key.unlink()
    before = snapshot(data, elsewhere)
    assert_refused(start(live), "is missing")
    assert_refused(start(live, f"--key-file={elsewhere / 'server.key'}"), "is missing")
    assert snapshot(data, elsewhere) == before
    key.write_bytes(saved)
    key.chmod(0o644)
    before = snapshot(data, elsewhere)
    assert_refused(start(live), str(key))
    assert snapshot(data, elsewhere) == before
    key.chmod(0o600)
    os.utime(key)
    live.daemon.start()
    await live.check()
    live.stop()
