"""atheris, coverage-guided, for a bounded time against the server protocol and the client core.

The target is tests/adversarial/fuzz_server.py.  It runs in a child process
(atheris owns the process it fuzzes in) for ``ENCLAVES_FUZZ_SECONDS`` seconds,
15 by default; longer runs are a matter of setting the variable.  atheris is
in the test extra on Linux x86_64 (it ships wheels there); elsewhere the test
skips and says so.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(
    importlib.util.find_spec("atheris") is None,
    reason="atheris is not installed (pip install atheris; wheels exist for Linux x86_64)",
)
def test_atheris_finds_no_crash(tmp_path: Path) -> None:
    """Any exception escaping the server protocol, router, codecs or client core,
    or any failure they log, for inputs atheris evolves for a bounded time, fails
    this test with the input atheris saved."""
    seconds = int(os.environ.get("ENCLAVES_FUZZ_SECONDS", "15"))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.adversarial.fuzz_server",
            f"-max_total_time={seconds}",
            "-rss_limit_mb=2048",
            f"-artifact_prefix={tmp_path}/",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=seconds + 120,
        check=False,
    )
    crashes = [p.name for p in tmp_path.iterdir() if p.name.startswith("crash-")]
    assert done.returncode == 0 and not crashes, done.stderr[-4000:]
    assert "Done" in done.stderr, done.stderr[-2000:]
