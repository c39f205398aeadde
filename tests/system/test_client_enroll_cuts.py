"""``enclaves enroll`` when the path to the server goes silent or breaks at
the worst moments, and when its standard output is closed (docs/client.rst,
"Enrolling")."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytest_twisted

from enclaves.client.keystore import Keystore
from tests.daemon import ROOT, Daemon, track
from tests.system.clients import PASSPHRASE, client_env, enroll, new_tokens
from tests.system.relay import Relay

pytestmark = pytest.mark.system

HALF_DONE = "The enrollment may be half done: run the same 'enclaves enroll' command again"


@pytest_twisted.ensureDeferred
async def test_an_enroll_whose_server_goes_silent_gives_up_and_resumes(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path)
    (token,) = await new_tokens(daemon, 1)
    daemon.start()
    relay = Relay(daemon.port, after=2, action="silent")  # HELLO, then PING + ROTATE
    try:
        path = tmp_path / "ks"
        started = time.monotonic()
        silent = enroll(token, path, "--server", relay.address, "--silence", "2")
        assert silent.process.returncode == 1, silent.output()
        assert time.monotonic() - started < 30
        assert relay.done.is_set()
        error = "\n".join(silent.err)
        assert f"the server at {relay.address} stopped answering for 2 s. {HALF_DONE}" in error
        assert "Traceback" not in error
        assert path.exists() and (tmp_path / "ks.lock").exists()  # kept, to resume
        resumed = enroll(token, path, "--server", f"127.0.0.1:{daemon.port}")
        assert resumed.process.returncode == 0, resumed.output()
        resumed.expect(r"^\[info\] resuming the interrupted enrollment")
        resumed.expect(r"^\[enrolled\] you are user ")
    finally:
        relay.close()
        assert daemon.stop() == 0, daemon.log_text()


@pytest_twisted.ensureDeferred
async def test_a_cut_after_the_enrollment_completed_still_succeeds(tmp_path: Path) -> None:
    """Cut when the key exchange with the one other user is about to go out:
    the enrollment is complete, so status 0, and a warning says the key
    exchange waits in the outbox."""
    daemon = Daemon(tmp_path)
    first, second = await new_tokens(daemon, 2)
    daemon.start()
    relay = Relay(daemon.port, after=2, action="cut")  # the third frame: the OFFER
    try:
        assert enroll(first, tmp_path / "a").process.returncode == 0
        path = tmp_path / "b"
        cut = enroll(second, path, "--server", relay.address)
        assert cut.process.returncode == 0, cut.output()
        assert relay.done.is_set()
        cut.expect(r"^\[enrolled\] you are user ")
        cut.expect(
            r"^\[warn\] 1 key exchange\(s\) not accepted by the server yet \(the connection "
            r"ended\); they are kept and sent the next time you run 'enclaves'$"
        )
        _, state = Keystore.unlock(path, PASSPHRASE)
        assert state.enrolled and state.pending_server_keys is None
        assert [e.status for e in state.outbox] == ["pending"]
    finally:
        relay.close()
        assert daemon.stop() == 0, daemon.log_text()


@pytest_twisted.ensureDeferred
async def test_an_enroll_whose_output_is_closed_stops_and_can_be_resumed(tmp_path: Path) -> None:
    """``enclaves enroll ... | head -1``: exit 141 at the next line, no
    traceback; what was made is removed or resumable."""
    daemon = Daemon(tmp_path)
    (token,) = await new_tokens(daemon, 1)
    daemon.start()
    try:
        path = tmp_path / "ks"
        process = track(
            subprocess.Popen(
                [sys.executable, "-m", "enclaves", "enroll", token, "--keystore", str(path)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env=client_env(), cwd=ROOT,
            )
        )  # fmt: skip
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(f"{PASSPHRASE}\n".encode())
        process.stdin.close()
        assert process.stdout.readline().startswith(b"[info] created keystore")
        process.stdout.close()
        try:
            assert process.wait(30) == 141
        finally:
            process.kill()
            assert process.stderr is not None
            err = process.stderr.read()
        assert b"Traceback" not in err and b"internal error" not in err, err
        if path.exists():
            assert HALF_DONE.encode() in err, err
        else:
            assert not (tmp_path / "ks.lock").exists()
        again = enroll(token, path)
        assert again.process.returncode == 0, again.output()
        again.expect(r"^\[enrolled\] you are user ")
    finally:
        assert daemon.stop() == 0, daemon.log_text()
