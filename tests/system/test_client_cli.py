"""The real client (``python -m enclaves``) where no server is needed: its
usage text, refusals before connecting, and a piped session that can not
reach its server (docs/client.rst, "Scripts")."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from enclaves.client.keystore import Keystore
from enclaves.crypto import KeyPair
from enclaves.token import EnrollmentToken
from tests.client.helpers import Relay, make_core
from tests.daemon import ROOT, free_port
from tests.system.clients import PASSPHRASE, Client, client_env, enroll

pytestmark = pytest.mark.system


def nowhere() -> str:
    """A loopback address nothing listens on."""
    return f"127.0.0.1:{free_port()}"


def keystore_keyed_with_2002(path: Path) -> Path:
    """An enrolled keystore of user 1001 with pair keys for contact 2002."""
    a, b = make_core(1001), make_core(2002)
    relay = Relay(a, b)
    relay.post(1001, a.start_kex(2002, 0.0))
    relay.flush(1.0)
    Keystore.create(path, PASSPHRASE, a.state())
    return path


def test_usage_names_the_enroll_subcommand() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "enclaves", "--help"],
        capture_output=True,
        text=True,
        env=client_env(),
        cwd=ROOT,
        timeout=30,
    )
    assert result.returncode == 0
    assert "enclaves enroll [TOKEN]" in result.stdout.split("\n\n")[0]  # in the usage lines


def test_a_new_keystore_needs_a_passphrase_of_ten_characters(tmp_path: Path) -> None:
    token = str(EnrollmentToken(4242, KeyPair.generate(), nowhere()))
    short = enroll(token, tmp_path / "ks", passphrase="123456789")
    assert short.process.returncode == 1
    assert "at least 10 characters" in "\n".join(short.err), short.output()
    assert not (tmp_path / "ks").exists()
    # Ten characters pass that check (then the server is not there).
    ten = enroll(token, tmp_path / "ks", passphrase="1234567890")
    assert ten.process.returncode == 1
    assert "could not connect" in "\n".join(ten.err), ten.output()
    assert "at least" not in ten.output()


def test_enrolling_over_a_keystore_says_what_to_do(tmp_path: Path) -> None:
    path = keystore_keyed_with_2002(tmp_path / "ks")
    before = path.read_bytes()
    token = str(EnrollmentToken(4242, KeyPair.generate(), nowhere()))
    over = enroll(token, path)
    assert over.process.returncode == 1
    error = "\n".join(over.err)
    assert "already holds an account" in error
    assert "move that file aside or give --keystore NEW_PATH" in error
    assert path.read_bytes() == before


def test_a_piped_session_that_never_connects_says_so_and_fails(tmp_path: Path) -> None:
    path = keystore_keyed_with_2002(tmp_path / "ks")
    address = nowhere()
    script = Client(
        ["--keystore", str(path), "--server", address, "--eof-grace", "2", "--retry-max", "1"],
        f"{PASSPHRASE}\n/msg 2002 hi\nyes",
    )
    assert script.process.stdin is not None
    script.process.stdin.close()
    assert script.wait(30) == 1, script.output()
    script.expect(r"^\[queued\] id=")
    script.expect(r"^\[info\] end of input: ")  # said after the commands ran, not before
    line = script.expect(r"^\[error\] could not connect").string
    assert f"the server at {address} in 2 s" in line
    assert "1 message(s) kept in the outbox and sent next time" in line
    _, state = Keystore.unlock(path, PASSPHRASE)
    assert [e.status for e in state.outbox] == ["pending"]


def test_a_piped_session_with_nothing_queued_still_reports_a_bad_address(
    tmp_path: Path,
) -> None:
    path = keystore_keyed_with_2002(tmp_path / "ks")
    script = Client(
        ["--keystore", str(path), "--server", "nosuch.invalid:7500", "--eof-grace", "2"],
        PASSPHRASE,
    )
    assert script.process.stdin is not None
    script.process.stdin.close()
    assert script.wait(30) == 1, script.output()
    script.expect(r"^\[error\] could not connect to the server at nosuch\.invalid:7500 in 2 s")
