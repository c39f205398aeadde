"""Real disk failures: full, read-only, permission denied, file size limit.

Each scenario runs in a child process (tests/storage/fs_child.py) so that it
can mount a private tmpfs in its own mount namespace or lose privileges
without touching this process.  Where the machine cannot set a scenario up,
the test says why: a fallback runs (disk full -> RLIMIT_FSIZE) or it skips
with the reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from tests.storage.fs_child import CANNOT

ROOT = Path(__file__).resolve().parents[2]


def _run(wrapper: list[str], scenario: str, work: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [*wrapper, sys.executable, "-m", "tests.storage.fs_child", scenario, str(work)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
        check=False,
    )


def _namespace_wrapper() -> list[str] | None:
    """``unshare`` into a private mount namespace (as root, or mapped root)."""
    if shutil.which("unshare") is None:
        return None
    return ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-r", "-m"]


def _assert_passed(done: subprocess.CompletedProcess[str]) -> None:
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"


def test_disk_full(tmp_path: Path) -> None:
    wrapper = _namespace_wrapper()
    if wrapper is not None:
        done = _run(wrapper, "full", tmp_path)
        if done.returncode != CANNOT and "unshare:" not in done.stderr:
            _assert_passed(done)
            return
        reason = done.stderr.strip()
    else:
        reason = "no unshare command"
    warnings.warn(
        f"tiny tmpfs unavailable ({reason}); disk full simulated with RLIMIT_FSIZE",
        stacklevel=1,
    )
    _assert_passed(_run([], "fsize", tmp_path))


def test_file_size_limit(tmp_path: Path) -> None:
    _assert_passed(_run([], "fsize", tmp_path))


def test_read_only_filesystem(tmp_path: Path) -> None:
    wrapper = _namespace_wrapper()
    if wrapper is None:
        pytest.skip("no unshare command: cannot remount a private tmpfs read-only")
    done = _run(wrapper, "readonly", tmp_path)
    if done.returncode == CANNOT or "unshare:" in done.stderr:
        pytest.skip(f"cannot mount a private tmpfs here: {done.stderr.strip()}")
    _assert_passed(done)


def test_permission_denied(tmp_path: Path) -> None:
    wrapper: list[str] = []
    if os.geteuid() == 0:
        # Root ignores permission bits; drop the capabilities that let it.
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: cannot drop CAP_DAC_OVERRIDE")
        wrapper = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]
    done = _run(wrapper, "denied", tmp_path)
    if done.returncode == CANNOT:
        pytest.skip(done.stderr.strip())
    _assert_passed(done)
