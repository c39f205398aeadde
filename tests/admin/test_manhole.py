"""Host key, admin keys file and fingerprints of the admin shell (real files, real ssh-keygen)."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
from twisted.conch.ssh import keys

from enclaves.manhole import (
    HOST_KEY_FILE,
    AdminIdentity,
    load_or_create_host_key,
    openssh_fingerprint,
    read_admin_keys,
)
from enclaves.serverkey import StartupError
from tests.admin.sshshell import SSH_KEYGEN, make_key

needs_keygen = pytest.mark.skipif(not os.path.exists(SSH_KEYGEN), reason="no ssh-keygen")


def test_host_key_created_once_0600_then_loaded(tmp_path: Path) -> None:
    key, created = load_or_create_host_key(tmp_path)
    assert created and key.type() == "Ed25519" and not key.isPublic()
    path = tmp_path / HOST_KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again, created_again = load_or_create_host_key(tmp_path)
    assert not created_again and again == key
    public = (tmp_path / f"{HOST_KEY_FILE}.pub").read_text()
    assert public.startswith("ssh-ed25519 ") and keys.Key.fromString(public) == key.public()


@needs_keygen
def test_fingerprint_matches_ssh_keygen(tmp_path: Path) -> None:
    key, _ = load_or_create_host_key(tmp_path)
    out = subprocess.run(
        [SSH_KEYGEN, "-l", "-E", "sha256", "-f", str(tmp_path / HOST_KEY_FILE)],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    assert out.split()[1] == openssh_fingerprint(key)


def test_host_key_readable_by_others_refused(tmp_path: Path) -> None:
    load_or_create_host_key(tmp_path)
    (tmp_path / HOST_KEY_FILE).chmod(0o644)
    with pytest.raises(StartupError, match=r"readable by others \(mode 0644\); run: chmod 600"):
        load_or_create_host_key(tmp_path)


def test_damaged_host_key_refused_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / HOST_KEY_FILE
    path.write_bytes(b"-----BEGIN OPENSSH PRIVATE KEY-----\ngarbage\n")
    path.chmod(0o600)
    with pytest.raises(StartupError, match="is not a valid private key") as info:
        load_or_create_host_key(tmp_path)
    assert "\n" not in str(info.value)


@needs_keygen
def test_non_ed25519_host_key_refused(tmp_path: Path) -> None:
    subprocess.run(
        [SSH_KEYGEN, "-q", "-t", "ecdsa", "-N", "", "-f", str(tmp_path / HOST_KEY_FILE)],
        check=True,
        timeout=30,
    )
    with pytest.raises(StartupError, match="not an Ed25519 private key"):
        load_or_create_host_key(tmp_path)


@needs_keygen
def test_admin_keys_file_comments_and_bad_lines(tmp_path: Path) -> None:
    from twisted.logger import LogEvent, formatEvent, globalLogPublisher

    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    try:
        _check_admin_keys_file(tmp_path)
    finally:
        globalLogPublisher.removeObserver(events.append)
    log = "\n".join(formatEvent(event) for event in events)
    private_body = (tmp_path / "alice").read_text().splitlines()[1]
    assert "line 4: not an OpenSSH public key, skipped" in log
    assert "line 6: a PRIVATE key was pasted here" in log
    assert log.count("not an OpenSSH public key") == 1  # not once per line of it
    assert private_body not in log


def _check_admin_keys_file(tmp_path: Path) -> None:
    alice = make_key(tmp_path / "alice", "alice@laptop")
    bob = make_key(tmp_path / "bob", "")
    path = tmp_path / "admin_keys"
    path.write_text(
        "# admins\n\n"
        + alice.with_suffix(".pub").read_text()
        + "ssh-ed25519 not-base64 broken\n"
        + bob.with_suffix(".pub").read_text()
        + alice.read_text()  # a private key pasted by mistake: skipped, one warning
    )
    admin_keys = read_admin_keys(path)
    assert len(admin_keys.public_keys) == 2
    first, second = admin_keys.public_keys
    assert admin_keys.comment_for(first) == "alice@laptop"
    assert admin_keys.comment_for(second) == ""
    who = AdminIdentity("root", openssh_fingerprint(first), "alice@laptop")
    assert str(who) == f"root key {openssh_fingerprint(first)} (alice@laptop)"


def test_unreadable_admin_keys_file(tmp_path: Path) -> None:
    with pytest.raises(StartupError, match="cannot read admin keys"):
        read_admin_keys(tmp_path / "missing")


@pytest.mark.parametrize("mode", [0o664, 0o646, 0o666])
def test_admin_keys_file_writable_by_others_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "admin_keys"
    path.write_text("# nobody yet\n")
    os.chmod(path, mode)
    with pytest.raises(StartupError, match="writable by group or others") as error:
        read_admin_keys(path)
    assert "\n" not in str(error.value)
    os.chmod(path, 0o644)
    assert read_admin_keys(path).public_keys == ()


def test_admin_keys_directory_writable_by_others_refused(tmp_path: Path) -> None:
    folder = tmp_path / "etc"
    folder.mkdir()
    path = folder / "admin_keys"
    path.write_text("")
    os.chmod(folder, 0o777)  # noqa: S103 - the case under test
    try:
        with pytest.raises(StartupError, match="directory of the admin keys"):
            read_admin_keys(path)
    finally:
        os.chmod(folder, 0o755)  # noqa: S103


def test_admin_shell_offers_no_weak_ssh_algorithms(tmp_path: Path) -> None:
    from twisted.cred.portal import Portal

    from enclaves.manhole import AdminShellFactory

    host_key, _ = load_or_create_host_key(tmp_path)
    factory = AdminShellFactory(Portal(None), host_key)  # type: ignore[arg-type]
    factory.startFactory()
    transport = factory.buildProtocol(None)
    assert transport.supportedCiphers == [b"aes256-ctr", b"aes192-ctr", b"aes128-ctr"]
    assert transport.supportedMACs == [b"hmac-sha2-512", b"hmac-sha2-384", b"hmac-sha2-256"]
    assert transport.supportedKeyExchanges == [
        b"mlkem768x25519-sha256",
        b"curve25519-sha256",
        b"curve25519-sha256@libssh.org",
        b"ecdh-sha2-nistp256",
        b"ecdh-sha2-nistp384",
        b"ecdh-sha2-nistp521",
    ]
    docs = " ".join((Path(__file__).parents[2] / "docs" / "admin.rst").read_text().split())
    for name in transport.supportedKeyExchanges + transport.supportedCiphers:
        assert f"``{name.decode()}``" in docs, name  # docs/admin.rst names what is offered
    assert "group exchange" not in docs.replace("no group exchange", "")


def _disconnect_logged(tmp_path: Path, code: int, reason: bytes) -> list[Any]:
    import struct

    from twisted.conch.ssh.common import NS
    from twisted.cred.portal import Portal
    from twisted.internet.testing import StringTransport
    from twisted.logger import LogEvent, globalLogPublisher

    from enclaves.manhole import AdminShellFactory

    host_key, _ = load_or_create_host_key(tmp_path)
    factory = AdminShellFactory(Portal(None), host_key)  # type: ignore[arg-type]
    factory.startFactory()
    transport = factory.buildProtocol(None)
    transport.makeConnection(StringTransport())
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    try:
        transport.ssh_DISCONNECT(struct.pack(">L", code) + NS(reason))
    finally:
        globalLogPublisher.removeObserver(events.append)
    return events


def test_normal_ssh_disconnect_is_info_other_reasons_stay_errors(tmp_path: Path) -> None:
    from twisted.logger import LogLevel, formatEvent

    normal = _disconnect_logged(tmp_path, 11, b"disconnected by user")  # BY_APPLICATION
    assert not [e for e in normal if e["log_level"] >= LogLevel.warn], normal
    text = [formatEvent(e) for e in normal if e["log_level"] == LogLevel.info]
    assert any("disconnected (disconnected by user)" in line for line in text), text
    broken = _disconnect_logged(tmp_path, 2, b"packet corrupt")  # PROTOCOL_ERROR
    errors = [formatEvent(e) for e in broken if e["log_level"] == LogLevel.error]
    assert any("Got remote error, code 2" in line for line in errors), broken


def test_a_private_key_without_its_end_line_does_not_hide_the_keys_after_it(
    tmp_path: Path,
) -> None:
    bob = make_key(tmp_path / "bob", "bob@desk")
    path = tmp_path / "admin_keys"
    path.write_text(
        "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n"
        + bob.with_suffix(".pub").read_text()
    )
    assert len(read_admin_keys(path).public_keys) == 1


def test_one_admin_connection_opens_at_most_max_channels_sessions() -> None:
    """Each session channel runs a shell: a connection asking for more than
    MAX_CHANNELS at once is refused (one admin must not eat the server)."""
    from twisted.conch.error import ConchError
    from twisted.conch.ssh import connection

    from enclaves.manhole import MAX_CHANNELS, AdminSessionChannel, AdminUser

    user = AdminUser(None, AdminIdentity("root", "SHA256:x", ""), lambda: None)
    conn = connection.SSHConnection()
    user.conn = conn
    opened = [user.lookupChannel(b"session", 1 << 16, 1 << 15, b"") for _ in range(MAX_CHANNELS)]
    assert all(isinstance(c, AdminSessionChannel) for c in opened)
    conn.channels = dict(enumerate(opened))
    with pytest.raises(ConchError, match=f"at most {MAX_CHANNELS} sessions"):
        user.lookupChannel(b"session", 1 << 16, 1 << 15, b"")
    del conn.channels[0]
    assert isinstance(user.lookupChannel(b"session", 1 << 16, 1 << 15, b""), AdminSessionChannel)


def test_peer_controlled_text_is_logged_escaped(tmp_path: Path) -> None:
    """An SSH client chooses its user name and its goodbye text: neither may
    carry an escape sequence or a newline (a forged line) into the log."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from twisted.conch.ssh.keys import Key
    from twisted.cred.credentials import SSHPrivateKey
    from twisted.logger import LogEvent, formatEvent, globalLogPublisher

    from enclaves.manhole import AdminKeyChecker, AdminKeys

    normal = _disconnect_logged(tmp_path, 11, b"bye\x1b[2J\n2030-01-01 [enclaves#info] fake")
    text = "\n".join(formatEvent(e) for e in normal)
    assert "disconnected (bye\\x1b[2J\\n2030-01-01 [enclaves#info] fake)" in text, text

    stranger = Key(Ed25519PrivateKey.generate()).public()
    checker = AdminKeyChecker(AdminKeys((), {}))
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    try:
        credentials = SSHPrivateKey(
            b"ro\x1b]0;x\x07ot", b"ssh-ed25519", stranger.blob(), b"x", b"sig"
        )
        checker.requestAvatarId(credentials).addErrback(lambda _: None)
    finally:
        globalLogPublisher.removeObserver(events.append)
    text = "\n".join(formatEvent(e) for e in events)
    assert "for user ro\\x1b]0;x\\x07ot" in text, text
    assert "\x1b" not in text and "\x07" not in text
    who = AdminIdentity("admin", "SHA256:x", "comment")
    assert str(who) == "admin key SHA256:x (comment)"


def test_conch_chatter_is_dropped_its_warnings_kept_escaped() -> None:
    from twisted.logger import LogEvent, Logger, LogLevel, formatEvent

    from enclaves.manhole import ConchLogFilter

    events: list[LogEvent] = []
    logger = Logger(
        namespace="twisted.conch.ssh.connection", observer=ConchLogFilter(events.append)
    )
    logger.debug("adding {n} to {w} in channel 0", n=98304, w=32768)
    logger.info("channel open")
    logger.warn("other side unimplemented packet #{seqnum}", seqnum=3)
    # Conch passes text a client chose, even as the format string itself.
    logger.error("Unsupported key type ssh-\x1b]0;x\x07 or bad key")
    logger.error("Unsupported key type ssh-{ or bad key")
    assert [e["log_level"] for e in events] == [LogLevel.warn, LogLevel.error, LogLevel.error]
    text = [formatEvent(e) for e in events]
    assert text[:2] == [
        "other side unimplemented packet #3",
        "Unsupported key type ssh-\\x1b]0;x\\x07 or bad key",
    ]
    assert "\x1b" not in text[2] and "\n" not in text[2]


@needs_keygen
def test_a_key_with_authorized_keys_options_is_skipped_saying_why(tmp_path: Path) -> None:
    """from= or command= cannot be honoured: the key is not admitted without
    them, and the log says options are the reason (not "not a key")."""
    from twisted.logger import LogEvent, formatEvent, globalLogPublisher

    alice = make_key(tmp_path / "alice", "alice@laptop").with_suffix(".pub").read_text()
    bob = make_key(tmp_path / "bob", "bob@desk").with_suffix(".pub").read_text()
    path = tmp_path / "admin_keys"
    path.write_text(
        f'from="10.0.0.1",command="ssh-agent AAAAx y" {alice}'
        f"restrict {bob}"
        "ssh-ed25519 not-base64 broken\n"
    )
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    try:
        admin_keys = read_admin_keys(path)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert admin_keys.public_keys == ()
    log = "\n".join(formatEvent(event) for event in events)
    for number in (1, 2):
        assert (
            f"line {number}: authorized_keys options (from=, command=, restrict, ...) are not "
            "supported; the key is skipped (remove the options to admit it)"
        ) in log, log
    assert "line 3: not an OpenSSH public key, skipped" in log
    assert "line 1: not an OpenSSH" not in log and "10.0.0.1" not in log
