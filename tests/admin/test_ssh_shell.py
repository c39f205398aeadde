"""The admin shell in a real ``twistd -n enclaves``, driven by the real OpenSSH client."""

from __future__ import annotations

import os
import re
import select
import socket
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import attrs
import pytest
import pytest_twisted

from enclaves.client.connection import ClientConnection, LoginFailed, connect
from enclaves.crypto import KeyPair
from enclaves.frames import ErrorCode
from enclaves.inner import Directory, Rotate, Rotated
from enclaves.token import parse_token
from tests.admin.sshshell import (
    SSH,
    SSH_KEYGEN,
    PtyShell,
    make_key,
    plain,
    ssh_argv,
    wait_port,
)
from tests.daemon import Daemon, free_port

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(
        not (os.path.exists(SSH) and os.path.exists(SSH_KEYGEN)), reason="no OpenSSH client"
    ),
]


@attrs.define
class Setup:
    daemon: Daemon
    port: int
    key: Path
    stranger: Path
    known_hosts: Path
    host_fingerprint: str

    def argv(self, *options: str, key: Path | None = None, host: str = "127.0.0.1") -> list[str]:
        return ssh_argv(self.port, key or self.key, self.known_hosts, *options, host=host)


def _fingerprint(public_key: Path) -> str:
    out = subprocess.run(
        [SSH_KEYGEN, "-l", "-E", "sha256", "-f", str(public_key)],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    return out.split()[1]


@pytest.fixture(scope="module")
def shell_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("shell")
    key = make_key(tmp / "admin_key", "alice@laptop")
    stranger = make_key(tmp / "stranger_key", "mallory@elsewhere")
    admin_keys = tmp / "admin_keys"
    admin_keys.write_text(
        "# the admins\n\n" + (tmp / "admin_key.pub").read_text() + "not a key line\n"
    )
    port = free_port()
    daemon = Daemon(tmp, f"--manhole=tcp:{port}:interface=127.0.0.1", f"--admin-keys={admin_keys}")
    daemon.start()
    try:
        wait_port(port)
        host_pub = daemon.data_dir / "ssh_host_ed25519_key.pub"
        known_hosts = tmp / "known_hosts"
        known_hosts.write_text(f"[127.0.0.1]:{port} {host_pub.read_text()}")
        yield Setup(daemon, port, key, stranger, known_hosts, _fingerprint(host_pub))
    finally:
        status = daemon.stop()
    assert status == 0, daemon.log_text()


def test_host_key_made_0600_and_fingerprint_logged(shell_server: Setup) -> None:
    data_dir = shell_server.daemon.data_dir
    private = data_dir / "ssh_host_ed25519_key"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert private.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    log = shell_server.daemon.log_text()
    assert shell_server.host_fingerprint.startswith("SHA256:")
    assert f"fingerprint {shell_server.host_fingerprint}" in log
    assert "created now" in log


def test_on_a_terminal_leaving_right_after_issue_still_shows_the_token(
    shell_server: Setup,
) -> None:
    """Ctrl-D (or exit()) typed before a command's answer came: the session
    ends after the answer, so a user is never created with its token unseen."""
    for leave in ("\x04", "exit()\r"):
        shell = PtyShell(shell_server.argv("-tt"))
        try:
            shell.expect(r"enclaves> ")
            shell.send('issue("chat.example:7500")\r' + leave)
            token = shell.expect(r"(enclaves1:[A-Za-z0-9_-]{96}@chat\.example:7500)").group(1)
            assert shell.wait() == 0
        finally:
            shell.close()
        # The other tests share this server and count its users.
        assert _script(shell_server, b"", f"revoke({parse_token(token).user_id})").returncode == 0


def test_scripted_conversation(shell_server: Setup) -> None:
    shell = PtyShell(shell_server.argv("-tt"))
    try:
        shell.expect(r"Type help\(\) for the commands")
        shell.expect(r"enclaves> ")
        shell.line('issue("chat.example:7500")')
        first = shell.expect(r"new user (\d+)\s+single use, expires (.+?) \(in 1 d 00:00:00\):")
        token_text = shell.expect(r"(enclaves1:[A-Za-z0-9_-]{96}@chat\.example:7500)").group(1)
        token = parse_token(token_text)
        assert token.user_id == int(first.group(1))
        shell.expect(r"enclaves> ")

        shell.line("issue(hours=1)")
        doomed = int(shell.expect(r"new user (\d+)").group(1))
        shell.expect(r"enclaves> ")

        shell.line("users()")
        shell.expect(r"2 user\(s\), 0 online")
        listing = shell.upto(r"enclaves> ")
        assert re.search(rf"{token.user_id}\s+enrolling until \S+ \S+ UTC\s+offline", listing)
        assert re.search(rf"{doomed}\s+enrolling until", listing)

        shell.line("pending()")
        shell.expect(r"no pending messages")

        shell.line("stats()")
        shell.expect(r"connections\s+\d+")
        shell.expect(r"uptime\s+\d\d:\d\d:\d\d \(since ")

        shell.line("inventory()")
        shell.expect(r"Everything this server holds \(data dir ")
        inventory = shell.upto(r"enclaves> ")
        for name in ("server.key", "ssh_host_ed25519_key", f"{token.user_id}", f"{doomed}"):
            assert name in inventory
        assert "Not written by Enclaves" not in inventory

        shell.line("help()")
        shell.expect(r"Ctrl-D leaves the shell")
        shell.line("help(revoke)")
        shell.expect(r"Remove a user")

        shell.line("revoke()")
        error = shell.expect(r"error: [^\n]*usage: revoke\(user_id\)").group(0)
        assert "\n" not in error
        shell.line('revoke("nobody")')
        shell.expect(r"error: a user id is a whole number")
        shell.line("revoke(1)")
        shell.expect(r"error: no user 1 \(users\(\) lists them\)")
        shell.line("no_such_name")
        shell.expect(r"error: NameError: name 'no_such_name' is not defined")
        shell.line("revoke(")
        shell.line(")")
        shell.expect(r"error: ")
        after_errors = shell.upto(r"enclaves> ")
        assert "Traceback" not in after_errors
        assert "<Deferred" not in plain(shell.seen)

        shell.line(f"revoke({doomed})")
        shell.expect(rf"revoked user {doomed}: key deleted, 0 pending message\(s\) deleted")
        shell.line("users()")
        shell.expect(r"1 user\(s\), 0 online")

        shell.send("\x04")  # Ctrl-D leaves
        assert shell.wait() == 0
    finally:
        shell.close()
    log = shell_server.daemon.log_text()
    assert "alice@laptop" in log and "SHA256:" in log
    assert f"issued an enrollment token for user {token.user_id}" in log
    assert f"revoked user {doomed}" in log
    secret = token_text.split("@")[0][len("enclaves1:") :]
    assert secret[:24] not in log


def test_piped_input_without_pty_survives_eof(shell_server: Setup) -> None:
    """OpenSSH sends EOF when its input ends; the session must still answer."""
    proc = subprocess.Popen(
        shell_server.argv("-T"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b"issue()\r")
        proc.stdin.close()  # EOF reaches the server before the answer is written
        out = b""
        while b"whoever holds it" not in out:
            chunk = _read_some(proc.stdout, 20.0)
            if not chunk:
                break
            out += chunk
        assert b"enrollment token for new user" in out, out
    finally:
        proc.kill()
        proc.wait(10)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def _script(setup: Setup, stdin: bytes, *extra: str) -> subprocess.CompletedProcess[bytes]:
    """ssh with ``stdin`` as its input; bounded: a session that never ends fails the test."""
    return subprocess.run([*setup.argv("-T"), *extra], input=stdin, capture_output=True, timeout=30)


def test_piped_commands_without_pty_run_in_order_and_end_at_eof(shell_server: Setup) -> None:
    """``printf 'users()\\n...' | ssh -T``: every answer, in order, then the session ends."""
    result = _script(shell_server, b'users()\nissue("127.0.0.1:7500")\nstats()\n')
    out = result.stdout.decode()
    assert result.returncode == 0, (out, result.stderr)
    users = out.index(" online")
    token = re.search(r"enclaves1:[A-Za-z0-9_-]{96}@127\.0\.0\.1:7500", out)
    stats = out.index("uptime")
    assert token is not None and users < token.start() < stats, out
    assert b"\x1b" not in result.stdout and b"\r" not in result.stdout, result.stdout
    assert "enclaves> " not in out and "Type help()" not in out
    # OpenSSH's normal goodbye (DISCONNECT "disconnected by user") is no error.
    log = shell_server.daemon.log_text()
    assert "SSH client 127.0.0.1:" in log and "Got remote error" not in log


def test_escape_sequences_neither_reach_the_output_nor_the_log(shell_server: Setup) -> None:
    """docs/admin.rst: script output has no terminal escape sequences, and a
    typed line cannot retitle or recolour the terminal of whoever reads the log."""
    result = _script(shell_server, b'"\x1b[31mRED\x1b[0m"\n\x1b]0;pwned\x07\n')
    assert result.returncode == 1, result
    out = result.stdout.decode()
    assert b"\x1b" not in result.stdout and b"\x07" not in result.stdout, result.stdout
    assert out.startswith("\\x1b[31mRED\\x1b[0m\nerror: "), out
    log = shell_server.daemon.log_text()
    assert "typed: \\x1b]0;pwned\\x07" in log
    assert "\x1b" not in log and "\x07" not in log


def test_the_log_holds_no_ssh_chatter(shell_server: Setup) -> None:
    """Conch's debug and info lines (window sizes, key exchange steps, channel
    opens) stay out of the log; the shell's own lines are there."""
    shell = PtyShell(shell_server.argv("-tt"))
    try:
        shell.expect(r"enclaves> ")
        shell.line("pending()")
        shell.expect(r"pending message")
        shell.send("\x04")
        assert shell.wait() == 0
    finally:
        shell.close()
    assert _script(shell_server, b"users()\n").returncode == 0
    sftp = subprocess.run(
        [*shell_server.argv("-s", "-T"), "sftp"], input=b"", capture_output=True, timeout=30
    )
    assert sftp.returncode != 0, sftp
    log = shell_server.daemon.log_text()
    assert "admin shell: subsystem sftp refused" in log
    chatter = re.findall(
        r"^.*\[(?:twisted\.conch[\w.]*|enclaves\.manhole\.\w+)#(?:debug|info)\].*$", log, re.M
    )
    assert chatter == [], chatter
    assert "in channel" not in log and "moduli file" not in log and "Starting factory" not in log
    assert "opened the admin shell without a terminal" in log and "typed: users()" in log
    assert "opened the admin shell\n" in log.replace("\r", "")


def test_ctrl_d_after_issue_still_prints_the_token(shell_server: Setup) -> None:
    """End of input right behind ``issue()`` must not lose the token it made."""
    result = _script(shell_server, b'issue("127.0.0.1:7500")\n\x04')
    out = result.stdout.decode()
    assert result.returncode == 0, (out, result.stderr)
    match = re.search(r"new user (\d+)[\s\S]*(enclaves1:\S+)", out)
    assert match is not None, out
    assert parse_token(match.group(2)).user_id == int(match.group(1))
    assert b"\x1b" not in result.stdout


def test_command_given_to_ssh_runs_then_ends_with_its_status(shell_server: Setup) -> None:
    ok = _script(shell_server, b"", "help()\npending()")
    assert ok.returncode == 0, ok
    assert b"Commands (each prints plain text):" in ok.stdout
    assert b"no pending messages" in ok.stdout or b"pending message(s)" in ok.stdout
    failed = _script(shell_server, b"ignored()\n", "revoke(1)")
    assert failed.returncode == 1
    assert failed.stdout == b"error: no user 1 (users() lists them)\n"
    # exit() ends the session (it used to hang the command, or drop the connection).
    left = _script(shell_server, b"", "help(); exit()\nrevoke(1)")
    assert left.returncode == 0 and b"Commands" in left.stdout and b"no user" not in left.stdout
    masked = _script(shell_server, b"", 'x = "enclaves1:' + "B" * 96 + '"')
    assert masked.returncode == 0 and masked.stdout == b""
    log = shell_server.daemon.log_text()
    assert "typed: revoke(1)" in log and "ignored()" not in log
    assert "B" * 20 not in log


def test_inventory_knows_the_admin_keys_file_in_the_data_dir(
    shell_server: Setup, tmp_path: Path
) -> None:
    """DATA-DIR/admin_keys, as the docs say to put it, is not an "unexpected file"."""
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    (data_dir / "admin_keys").write_text(shell_server.key.with_suffix(".pub").read_text())
    (data_dir / "admin_keys").chmod(0o600)
    port = free_port()
    daemon = Daemon(tmp_path, f"--manhole=tcp:{port}:interface=127.0.0.1")
    daemon.start()
    try:
        wait_port(port)
        known_hosts = tmp_path / "known_hosts"
        host_pub = (data_dir / "ssh_host_ed25519_key.pub").read_text()
        known_hosts.write_text(f"[127.0.0.1]:{port} {host_pub}")
        (data_dir / ".enrollment.state.1.ab12.tmp").write_bytes(b"x")  # a write in progress
        (data_dir / "notes.txt").write_text("left by someone")
        result = subprocess.run(
            ssh_argv(port, shell_server.key, known_hosts, "-T"),
            input=b"inventory()\n",
            capture_output=True,
            timeout=30,
        )
    finally:
        assert daemon.stop() == 0, daemon.log_text()
    out = result.stdout.decode()
    assert result.returncode == 0, (out, result.stderr)
    assert re.search(r"\nadmin_keys +\d+ +admin keys of the admin shell", out), out
    assert re.search(r"\.enrollment\.state\.1\.ab12\.tmp +1 +temporary file of a write", out)
    unexpected = [line for line in out.splitlines() if "unexpected file" in line]
    assert [line.split()[0] for line in unexpected] == ["notes.txt"], out


def test_inventory_with_admin_keys_elsewhere(shell_server: Setup) -> None:
    """--admin-keys FILE is listed by its path; a DATA-DIR/admin_keys beside it is not read."""
    unused = shell_server.daemon.data_dir / "admin_keys"
    unused.write_text("# old\n")
    try:
        result = _script(shell_server, b"inventory()\n")
    finally:
        unused.unlink()
    out = result.stdout.decode()
    admin_keys = shell_server.daemon.workdir / "admin_keys"
    assert re.search(rf"\n{re.escape(str(admin_keys))} +\d+ +admin keys of the admin shell", out)
    assert re.search(r"\nadmin_keys +6 +admin keys, not read \(--admin-keys is another\)", out)
    assert "unexpected file" not in out


def _read_some(stream: IO[bytes], timeout: float) -> bytes:
    fd = stream.fileno()
    ready, _, _ = select.select([fd], [], [], timeout)
    return os.read(fd, 65536) if ready else b""


def test_unknown_key_refused(shell_server: Setup) -> None:
    result = subprocess.run(
        shell_server.argv("-T", key=shell_server.stranger),
        input=b"",
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 255
    assert b"Permission denied (publickey)" in result.stderr
    assert "refused SSH key" in shell_server.daemon.log_text()
    assert _fingerprint(shell_server.stranger.with_suffix(".pub")) in shell_server.daemon.log_text()


def test_password_and_keyboard_interactive_not_offered(shell_server: Setup) -> None:
    result = subprocess.run(
        shell_server.argv(
            "-T",
            "-o",
            "PreferredAuthentications=password,keyboard-interactive",
            "-o",
            "PubkeyAuthentication=no",
            "-o",
            "NumberOfPasswordPrompts=1",
        ),
        input=b"",
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 255
    # The server lists the methods it accepts: only publickey.
    assert b"Permission denied (publickey)." in result.stderr


def test_changed_host_key_is_caught(shell_server: Setup, tmp_path: Path) -> None:
    wrong = tmp_path / "known_hosts"
    wrong.write_text(
        f"[127.0.0.1]:{shell_server.port} {shell_server.stranger.with_suffix('.pub').read_text()}"
    )
    argv = ssh_argv(shell_server.port, shell_server.key, wrong, "-T")
    result = subprocess.run(argv, input=b"", capture_output=True, timeout=30)
    assert result.returncode == 255
    assert b"Host key verification failed" in result.stderr


def _non_loopback_address() -> str | None:
    """This machine's address on its primary interface (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.123", 9))
            address = str(probe.getsockname()[0])
        except OSError:
            return None
    unusable = address.startswith("127.") or address == "0.0.0.0"  # noqa: S104 - compared, not bound
    return None if unusable else address


def test_not_reachable_on_a_non_loopback_address(shell_server: Setup) -> None:
    address = _non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to try")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((address, shell_server.port), timeout=5).close()
    result = subprocess.run(
        shell_server.argv("-T", host=address), input=b"", capture_output=True, timeout=30
    )
    assert result.returncode == 255
    assert b"Connection refused" in result.stderr


def test_no_usable_admin_key_leaves_the_shell_off(tmp_path: Path) -> None:
    admin_keys = tmp_path / "admin_keys"
    admin_keys.write_text("# ssh-ed25519 AAAA... alice@laptop\n")
    port = free_port()
    daemon = Daemon(
        tmp_path, f"--manhole=tcp:{port}:interface=127.0.0.1", f"--admin-keys={admin_keys}"
    )
    daemon.start()
    try:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
    finally:
        assert daemon.stop() == 0
    log = daemon.log_text()
    assert f"admin shell is off: {admin_keys} holds no usable public key" in log
    assert not (daemon.data_dir / "ssh_host_ed25519_key").exists()


def test_host_key_kept_across_restarts(shell_server: Setup, tmp_path: Path) -> None:
    data_dir = shell_server.daemon.data_dir
    before = (data_dir / "ssh_host_ed25519_key").read_bytes()
    admin_keys = tmp_path / "admin_keys"
    admin_keys.write_text(shell_server.key.with_suffix(".pub").read_text())
    port = free_port()
    # A second server on a copy of the data directory reuses the same host key.
    copy = tmp_path / "copy"
    copy.mkdir()
    subprocess.run(["cp", "-a", str(data_dir), str(copy / "data")], check=True, timeout=30)
    (copy / "data" / "lock").unlink(missing_ok=True)
    daemon = Daemon(copy, f"--manhole=tcp:{port}:interface=127.0.0.1", f"--admin-keys={admin_keys}")
    daemon.start()
    try:
        wait_port(port)
    finally:
        assert daemon.stop() == 0, daemon.log_text()
    assert (copy / "data" / "ssh_host_ed25519_key").read_bytes() == before
    assert f"(existing), fingerprint {shell_server.host_fingerprint}" in daemon.log_text()


async def _next(conn: ClientConnection, timeout: float = 15.0) -> Any:
    from twisted.internet import reactor

    return await conn.inbox.get().addTimeout(timeout, reactor)


@pytest_twisted.ensureDeferred
async def test_issued_token_enrolls_a_client_over_tcp(shell_server: Setup) -> None:
    """issue() in the shell, then a client enrolls with the token; the admin sees it."""
    from twisted.internet import reactor

    port = shell_server.daemon.port
    shell = PtyShell(shell_server.argv("-tt"))
    try:
        shell.expect(r"enclaves> ")
        shell.line(f'issue("127.0.0.1:{port}")')
        token = parse_token(shell.expect(r"(enclaves1:\S+)").group(1))
        assert token.address == f"127.0.0.1:{port}"
        shell.expect(r"enclaves> ")

        host, _, port_text = token.address.rpartition(":")
        endpoint = f"tcp:host={host}:port={port_text}:timeout=10"
        conn = await connect(reactor, endpoint, token.user_id, token.keys)
        new = KeyPair.generate()
        conn.send(Rotate(new.enc, new.auth))
        assert await _next(conn) == Rotated()
        directory = await _next(conn)
        assert isinstance(directory, Directory) and token.user_id in directory.user_ids

        shell.line("users()")
        shell.expect(rf"{token.user_id}\s+enrolled\s+online")
        shell.line("stats()")
        shell.expect(r"sessions\s+1\b")

        # The token is dead once used: its keys are no longer the user's.
        with pytest.raises(LoginFailed):
            await connect(reactor, endpoint, token.user_id, token.keys)

        # Revoking closes the live session with REVOKED.
        shell.line(f"revoke({token.user_id})")
        shell.expect(rf"revoked user {token.user_id}: .* its session was closed")
        reason = await conn.closed.addTimeout(15, reactor)
        assert reason.code == ErrorCode.REVOKED
        with pytest.raises(LoginFailed):
            await connect(reactor, endpoint, token.user_id, new)
        shell.send("\x04")
        assert shell.wait() == 0
    finally:
        shell.close()


@pytest.mark.parametrize(
    "options",
    [
        ("-o", "Ciphers=aes128-cbc,3des-cbc"),
        ("-o", "MACs=hmac-sha1,hmac-md5"),
        ("-o", "KexAlgorithms=diffie-hellman-group14-sha1,diffie-hellman-group-exchange-sha1"),
        # Not weak, but not offered (no moduli file): docs/admin.rst says so.
        ("-o", "KexAlgorithms=diffie-hellman-group-exchange-sha256"),
    ],
)
def test_weak_ssh_algorithms_refused(shell_server: Setup, options: tuple[str, str]) -> None:
    result = subprocess.run(
        shell_server.argv("-T", *options), input=b"", capture_output=True, timeout=30
    )
    assert result.returncode == 255
    assert b"no matching" in result.stderr, result.stderr


def test_default_ssh_negotiates_strong_algorithms(shell_server: Setup) -> None:
    # A remote command: the line shell runs it (a NameError) and the session ends.
    argv = [*shell_server.argv("-T", "-vv"), "pending()"]
    result = subprocess.run(argv, input=b"", capture_output=True, timeout=30)
    log = result.stderr.decode("utf-8", "replace")
    assert "Authenticated to 127.0.0.1" in log, log
    kex = re.search(r"kex: algorithm: (\S+)", log)
    cipher = re.search(r"kex: server->client cipher: (\S+) MAC: (\S+)", log)
    assert kex and cipher, log
    assert "sha1" not in kex.group(1)
    assert cipher.group(1).endswith("-ctr") and cipher.group(2).startswith("hmac-sha2-")


def test_issue_warns_when_the_address_does_not_match_the_client_listener(
    shell_server: Setup,
) -> None:
    """The server listens for clients on plain TCP, daemon.port: a tls: address
    or another port still gets its token, with a warning line saying what is off."""
    port = shell_server.daemon.port
    other = port + 1 if port < 65535 else port - 1
    script = f'issue("tls:127.0.0.1:{port}", hours=1)\nissue("127.0.0.1:{other}")\n'
    script += f'issue("127.0.0.1:{port}")\n'
    result = _script(shell_server, script.encode())
    out = result.stdout.decode()
    assert result.returncode == 0, (out, result.stderr)
    answers = out.split("enrollment token for new user ")[1:]
    assert len(answers) == 3, out
    tls, wrong_port, fine = answers
    assert "plain TCP" in tls and "warning: the address says tls:" in tls
    assert f"warning: this server listens for clients on port {port}, not {other}" in wrong_port
    assert "warning" not in fine
    ids = [int(answer.split()[0]) for answer in answers]
    revokes = "".join(f"revoke({i})\n" for i in ids).encode()
    assert _script(shell_server, revokes).returncode == 0
