"""The real client (``python -m enclaves``) where no server is needed: its
usage text, refusals before connecting, and a piped session that can not
reach its server (docs/client.rst, "Scripts")."""

from __future__ import annotations

import fcntl
import os
import select
import socket
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pytest

from enclaves.client.keystore import Keystore, lock_keystore
from enclaves.crypto import KeyPair
from enclaves.token import EnrollmentToken
from tests.client.helpers import Relay, make_core
from tests.daemon import ROOT, free_port, track
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


# -- ^C and ^D at the prompts (a real terminal: a pty) -------------------------


class Pty:
    """``python -m enclaves`` with a pty as its controlling terminal and
    standard input, output and error: getpass reads /dev/tty as for a person."""

    def __init__(self, argv: list[str]) -> None:
        self.master, slave = os.openpty()
        env = client_env()
        env["TERM"] = "dumb"  # plain lines after the prompts
        self.process = track(
            subprocess.Popen(
                [sys.executable, "-m", "enclaves", *argv],
                stdin=slave,
                stdout=slave,
                stderr=slave,
                env=env,
                cwd=ROOT,
                start_new_session=True,
                preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
            )
        )
        os.close(slave)
        self.text = ""

    def read(self, timeout: float) -> None:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if ready:
            try:
                self.text += os.read(self.master, 4096).decode("utf-8", errors="replace")
            except OSError:  # EIO: the child is gone
                pass

    def wait_for(self, text: str, count: int = 1, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while self.text.count(text) < count:
            assert time.monotonic() < deadline, f"{text!r} not seen:\n{self.text}"
            assert self.process.poll() is None, f"exited before {text!r}:\n{self.text}"
            self.read(0.1)

    def type(self, data: str) -> None:
        os.write(self.master, data.encode())

    def press_at_prompt(self, key: str) -> None:
        """Type ``key`` once the client sleeps in its read of the terminal.

        A ^C that lands after the prompt is written but before the read
        starts sets Python's signal flag while no bytecode runs, and the
        read that follows then waits for ever (the line discipline has
        dropped the input): a window of microseconds for a person, hit
        by a test on a loaded machine.  So wait until the process sleeps."""
        deadline = time.monotonic() + 20.0
        asleep = 0
        while asleep < 3:
            assert time.monotonic() < deadline, f"never waited at the prompt:\n{self.text}"
            with open(f"/proc/{self.process.pid}/stat") as stat:
                state = stat.read().rpartition(")")[2].split()[0]
            asleep = asleep + 1 if state == "S" else 0
            time.sleep(0.02)
        self.type(key)

    def wait(self, timeout: float = 20.0) -> int:
        deadline = time.monotonic() + timeout
        while self.process.poll() is None:
            assert time.monotonic() < deadline, f"still running:\n{self.text}"
            self.read(0.1)
        for _ in range(5):
            self.read(0.05)
        os.close(self.master)
        return self.process.returncode


CTRL_C, CTRL_D = "\x03", "\x04"


@pytest.mark.parametrize(
    ("key", "status", "message"),
    [(CTRL_C, 130, None), (CTRL_D, 1, "end of input at the prompt; nothing was done")],
)
def test_ctrl_c_and_ctrl_d_at_the_passphrase_prompt(
    tmp_path: Path, key: str, status: int, message: str | None
) -> None:
    path = keystore_keyed_with_2002(tmp_path / "ks")
    before = path.read_bytes()
    term = Pty(["--keystore", str(path), "--server", nowhere()])
    term.wait_for("Keystore passphrase:")
    term.press_at_prompt(key)
    assert term.wait() == status, term.text
    assert "Traceback" not in term.text and "internal error" not in term.text, term.text
    assert "ReactorNotRunning" not in term.text
    if message:
        assert f"enclaves: error: {message}" in term.text
    assert path.read_bytes() == before


@pytest.mark.parametrize("key", [CTRL_C, CTRL_D])
@pytest.mark.parametrize("prompt", ["Enrollment token:", "New keystore passphrase:"])
def test_an_enroll_aborted_at_a_prompt_leaves_nothing(
    tmp_path: Path, prompt: str, key: str
) -> None:
    token = str(EnrollmentToken(4242, KeyPair.generate(), nowhere()))
    path = tmp_path / "ks"
    term = Pty(["enroll", "--keystore", str(path)])
    term.wait_for("Enrollment token:")
    if prompt != "Enrollment token:":
        term.type(token + "\n")
        term.wait_for(prompt)
    term.press_at_prompt(key)
    assert term.wait() == (130 if key == CTRL_C else 1), term.text
    assert "Traceback" not in term.text and "internal error" not in term.text, term.text
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no keystore, no lock file


def test_a_wrong_passphrase_on_a_terminal_is_asked_again(tmp_path: Path) -> None:
    path = keystore_keyed_with_2002(tmp_path / "ks")
    term = Pty(["--keystore", str(path), "--server", nowhere(), "--retry-max", "1"])
    term.wait_for("Keystore passphrase:")
    term.type("not the passphrase\n")
    term.wait_for("wrong passphrase, or the keystore file is damaged; try again")
    term.wait_for("Keystore passphrase:", count=2)
    term.type(PASSPHRASE + "\n")
    term.wait_for("[info] user 1001")
    term.type(CTRL_C)  # ^C once running: saved, status 130
    assert term.wait() == 130, term.text
    assert "Traceback" not in term.text


def test_three_wrong_passphrases_on_a_terminal_end_it(tmp_path: Path) -> None:
    path = keystore_keyed_with_2002(tmp_path / "ks")
    term = Pty(["--keystore", str(path), "--server", nowhere()])
    for n in (1, 2, 3):
        term.wait_for("Keystore passphrase:", count=n)
        term.type(f"wrong {n}\n")
    assert term.wait() == 1, term.text
    assert term.text.count("try again") == 2
    assert "enclaves: error: wrong passphrase, or the keystore file is damaged" in term.text


# -- standard output closed ------------------------------------------------------


def test_a_chat_whose_output_is_closed_stops_at_once(tmp_path: Path) -> None:
    """``enclaves | head -2``: once head is gone the client saves and exits
    141 (as if killed by SIGPIPE), without a traceback, its input still open."""
    path = keystore_keyed_with_2002(tmp_path / "ks")
    process = track(
        subprocess.Popen(
            [sys.executable, "-m", "enclaves", "--keystore", str(path), "--server", nowhere(),
             "--retry-max", "0.3"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=client_env(), cwd=ROOT,
        )
    )  # fmt: skip
    assert process.stdin is not None and process.stdout is not None
    process.stdin.write(f"{PASSPHRASE}\n/contacts\n".encode())
    process.stdin.flush()
    for _ in range(2):
        assert process.stdout.readline().startswith(b"[")
    process.stdout.close()  # what head does after its lines
    try:
        assert process.wait(30) == 141
    finally:
        process.kill()
        _, err = process.communicate()
    assert b"Traceback" not in err and b"rror" not in err, err
    lock_keystore(path)  # free again


# -- lock files --------------------------------------------------------------------


def test_a_failed_enroll_leaves_no_lock_file(tmp_path: Path) -> None:
    token = str(EnrollmentToken(4242, KeyPair.generate(), nowhere()))
    failed = enroll(token, tmp_path / "ks")
    assert failed.process.returncode == 1, failed.output()
    assert "(the new keystore was removed)" in "\n".join(failed.err)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_keystore_path_that_is_no_keystore_is_refused_before_locking(tmp_path: Path) -> None:
    token = str(EnrollmentToken(4242, KeyPair.generate(), nowhere()))
    somedir = tmp_path / "somedir"
    somedir.mkdir()
    notes = tmp_path / "notes.txt"
    notes.write_text("not a keystore\n")
    for argv, error in [
        (["enroll", token, "--keystore", str(somedir)], f"{somedir} is a directory"),
        (["--keystore", str(somedir)], f"{somedir} is a directory"),
        (["--keystore", str(notes)], f"{notes} is not an Enclaves keystore"),
        (["enroll", token, "--keystore", str(notes)], f"{notes} is not an Enclaves keystore"),
        (["--keystore", str(tmp_path / "absent")], "no keystore at"),
    ]:
        client = Client(argv, PASSPHRASE)
        assert client.wait(30) == 1, client.output()
        assert f"enclaves: error: {error}" in "\n".join(client.err), client.output()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "somedir"]
    assert notes.read_text() == "not a keystore\n"


# -- a port where no Enclaves server listens -------------------------------------


class FakeServer:
    """Answers every connection with ``greeting`` and then holds it open."""

    def __init__(self, greeting: bytes) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.greeting = greeting
        self.accepted: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)
            conn.sendall(self.greeting)

    def close(self) -> None:
        self.sock.close()
        for conn in self.accepted:
            conn.close()


@pytest.mark.parametrize(
    ("greeting", "looks"),
    [
        (b"SSH-2.0-OpenSSH_9.6\r\n", "it looks like an SSH server"),
        (b"HTTP/1.1 400 Bad Request\r\n\r\n", "it looks like a web server"),
    ],
)
def test_a_port_of_another_kind_of_server_is_named_and_not_retried(
    tmp_path: Path, greeting: bytes, looks: str
) -> None:
    server = FakeServer(greeting)
    try:
        path = keystore_keyed_with_2002(tmp_path / "ks")
        chat = Client(["--keystore", str(path), "--server", server.address], PASSPHRASE)
        assert chat.wait(30) == 1, chat.output()
        chat.expect(rf"^\[fatal\] {server.address} is not an Enclaves server \({looks}\)")
        assert not chat.seen(r"cannot reach"), chat.output()
        assert len(server.accepted) == 1
        token = str(EnrollmentToken(4242, KeyPair.generate(), server.address))
        joining = enroll(token, tmp_path / "new")
        assert joining.process.returncode == 1, joining.output()
        error = "\n".join(joining.err)
        assert f"{server.address} is not an Enclaves server ({looks})" in error
        assert "(the new keystore was removed)" in error
        assert not (tmp_path / "new").exists() and not (tmp_path / "new.lock").exists()
    finally:
        server.close()


def test_an_enroll_whose_output_is_closed_before_it_connects_leaves_nothing(
    tmp_path: Path,
) -> None:
    """Standard output closed from the start: the first line ("created
    keystore") cannot be written, so enroll stops with 141 before connecting.
    Nothing was sent with the new keystore: it is removed and standard error
    says so, as when the output goes away later (docs/client.rst, exit 141)."""
    token = str(EnrollmentToken(4242, KeyPair.generate(), nowhere()))
    read, write = os.pipe()
    os.close(read)
    try:
        process = track(
            subprocess.Popen(
                [sys.executable, "-m", "enclaves", "enroll", token,
                 "--keystore", str(tmp_path / "ks")],
                stdin=subprocess.PIPE, stdout=write, stderr=subprocess.PIPE,
                env=client_env(), cwd=ROOT,
            )
        )  # fmt: skip
    finally:
        os.close(write)
    _, err = process.communicate(f"{PASSPHRASE}\n".encode(), timeout=60)
    assert process.returncode == 141, err
    assert b"Traceback" not in err
    assert b"the new keystore was removed" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []
