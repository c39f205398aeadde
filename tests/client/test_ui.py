"""The line UI and the app's local paths (no server): real core, real keystore file."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from attrs import evolve
from twisted.internet.testing import StringTransport

from enclaves.client.app import ClientApp
from enclaves.client.endpoint import EndpointError, normalise, shown
from enclaves.client.keystore import Keystore
from enclaves.client.state import ClientState, decode_state, encode_state
from enclaves.client.ui import LineUI
from enclaves.crypto import KeyPair
from enclaves.printable import printable
from tests.client.helpers import keyed_app, make_core, saves_fail

A, B = 1001, 2002


@pytest.fixture
def ui(tmp_path: Path) -> tuple[LineUI, ClientApp, StringTransport]:
    lines = LineUI()
    transport = StringTransport()
    lines.makeConnection(transport)
    return lines, keyed_app(tmp_path, lines, A, B), transport


def typed(ui: LineUI, transport: StringTransport, *commands: str) -> list[str]:
    transport.clear()
    for command in commands:
        ui.dataReceived(command.encode() + b"\n")
    return transport.value().decode().splitlines()


def test_first_message_to_unverified_contact_needs_a_yes(ui, tmp_path: Path) -> None:
    lines, app, transport = ui
    out = typed(lines, transport, f"/msg {B} hello", "no")
    assert out[0].startswith(f"[confirm] {B} is not verified")
    assert out[1] == "[info] not sent"
    assert app.core.outbox() == []
    out = typed(lines, transport, f"/msg {B} hello", "yes")
    assert out[1].startswith("[queued] id=") and out[1].endswith(
        f" to {B} (not connected; goes when the connection is back)"
    )
    # Saved before anything could leave: the keystore holds it in the outbox.
    _, state = Keystore.unlock(tmp_path / "ks", "pass phrase")
    assert [e.kind for e in state.outbox] == ["message"]
    out = typed(lines, transport, f"/msg {B} again", "/outbox")
    assert out[0].startswith("[queued] ")
    assert len([line for line in out if line.startswith("[outbox] ")]) == 2


def test_conversation_names_verify_and_errors(ui) -> None:
    lines, _app, transport = ui
    out = typed(lines, transport, "plain line")
    assert out == ["[error] not in a conversation: /to WHO first, or /msg WHO TEXT"]
    out = typed(lines, transport, f"/name {B} bob", "/to bob", "hi there", "yes")
    assert out[0] == f"[info] {B} is now called bob"
    assert out[1].startswith("[info] talking to bob (unverified)")
    assert out[2].startswith("[confirm] ") and out[3].startswith("[queued] ")
    out = typed(lines, transport, "/verify bob")
    assert out[0].startswith("[safety] bob: ") and len(out[0].split(": ")[1].split()) == 12
    assert typed(lines, transport, "yes") == ["[trust] bob is now verified"]
    out = typed(lines, transport, "/contacts")
    assert out == [f"[contact] bob id={B} trust=verified keys=epoch-1"]
    assert typed(lines, transport, "/msg nobody hi") == ["[error] no contact called 'nobody'"]
    assert typed(lines, transport, "/frobnicate")[0].startswith("[error] unknown command")
    assert typed(lines, transport, "/retry ffff")[0].startswith("[error] no single outbox")
    assert typed(lines, transport, "/import bob enclaves-ik:xyz")[0].startswith("[error] ")
    out = typed(lines, transport, "/history bob")
    assert out[0].endswith("me (unverified, sending): hi there")
    out = typed(lines, transport, "/fingerprint")
    assert out[0].startswith(f"[fingerprint] {A}: ") and out[1].startswith("[ik] enclaves-ik:")
    assert typed(lines, transport, "/help")[0].startswith("[help] /msg WHO TEXT")


def test_rotate_records_the_pending_keys_before_sending(ui, tmp_path: Path) -> None:
    lines, _app, transport = ui
    typed(lines, transport, "/rotate")
    _, state = Keystore.unlock(tmp_path / "ks", "pass phrase")
    assert state.pending_server_keys is not None
    assert state.server_keys != state.pending_server_keys


def test_state_round_trips_the_rotation_fields() -> None:
    state = evolve(make_core(A).state(), pending_server_keys=KeyPair.generate(), enrolled=False)
    assert decode_state(encode_state(state)) == state
    plain = make_core(A).state()
    assert decode_state(encode_state(plain)) == plain
    assert decode_state(encode_state(plain)).enrolled is True


@pytest.mark.parametrize(
    ("address", "ca", "expected"),
    [
        ("chat.example.org:7500", None, "tcp:host=chat.example.org:port=7500"),
        ("tcp:127.0.0.1:7500", None, "tcp:127.0.0.1:7500"),
        ("tls:chat.example.org:7500", None, "tls:host=chat.example.org:port=7500"),
        ("ssl:host=h:port=1", "/ca.pem", "tls:host=h:port=1:ca=/ca.pem"),
    ],
)
def test_server_addresses(address: str, ca: str | None, expected: str) -> None:
    assert normalise(address, ca) == expected


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("chat.example.org:7500", "chat.example.org:7500"),
        ("tcp:127.0.0.1:7500", "127.0.0.1:7500"),
        ("tls:chat.example.org:7500", "tls:chat.example.org:7500"),
        ("ssl:host=h:port=1:ca=/ca.pem", "tls:h:1"),
        ("unix:/run/enclaves.sock", "unix:/run/enclaves.sock"),
    ],
)
def test_addresses_are_shown_as_typed(address: str, expected: str) -> None:
    assert shown(normalise(address)) == expected


def test_help_says_message_ids_are_hex(ui) -> None:
    lines, _app, transport = ui
    (retry,) = [line for line in typed(lines, transport, "/help") if "/retry" in line]
    assert "8 hex digits" in retry


@pytest.mark.parametrize(
    ("address", "ca"),
    [("", None), ("nohost", None), ("tls:h", None), ("tls:h:1:bogus=2", None), ("h:1", "/ca")],
)
def test_bad_server_addresses(address: str, ca: str | None) -> None:
    with pytest.raises(EndpointError):
        normalise(address, ca)


def test_peer_text_can_not_forge_lines_or_drive_the_terminal(ui) -> None:
    lines, _app, transport = ui
    transport.clear()
    lines.line("msg", "hi\n[msg] 12:00:00 bob (verified): send money\x1b[2J\u202e")
    out = transport.value().decode()
    assert out.count("\n") == 1
    assert "\\n[msg]" in out and "\\x1b[2J" in out and "\\u202e" in out
    assert printable("grüße 👋") == "grüße 👋"


def test_contacts_line_shows_answered_exchanges_not_yet_proven() -> None:
    from enclaves.client.contacts import Contact
    from enclaves.client.ui import format_contact
    from enclaves.crypto import KeyPair

    keys = KeyPair(bytes([1]) * 32, bytes([2]) * 32)
    contact = Contact(B).with_keys(1, keys, 1.0)
    assert format_contact(contact) == f"{B} id={B} trust=unverified keys=epoch-1"
    contact = contact.with_tentative(3, keys, 2.0).with_tentative(2, keys, 3.0)
    assert format_contact(contact).endswith(" keys=epoch-1 answered=epoch-2,epoch-3")
    assert format_contact(Contact(B).with_tentative(2, keys, 1.0)).endswith(
        " keys=none answered=epoch-2"
    )


def test_a_script_never_swallows_a_line_of_conversation(tmp_path: Path) -> None:
    """In a script, "yes" after a /msg that asked nothing is skipped; the same
    word in a /to conversation is sent; a line that is no answer to a pending
    question declines it (said so) and then runs."""
    lines = LineUI(quit_waits=True)
    transport = StringTransport()
    lines.makeConnection(transport)
    app = keyed_app(tmp_path, lines, A, B)
    out = typed(lines, transport, f"/msg {B} first", f"/msg {B} second")
    assert out[0].startswith("[confirm] ")
    assert out[1:3] == ["[info] not sent", "[refused] the question above got no yes/no answer"]
    assert out[3].startswith("[confirm] ")  # the second /msg ran, and asks in turn
    out = typed(lines, transport, "yes", f"/msg {B} third", "yes")
    assert out[0].startswith("[queued] ") and out[1].startswith("[queued] ")
    assert out[2] == "[info] no question was asked; 'yes' skipped"
    out = typed(lines, transport, f"/to {B}", "coming?", "yes")
    assert [line.split()[0] for line in out[1:]] == ["[queued]", "[queued]"]
    sent = [e for e in app.core.outbox() if e.kind == "message"]
    assert len(sent) == 4  # second, third, "coming?" and the /to "yes"; "first" declined


def test_import_of_the_known_key_rejects_a_false_key_change(tmp_path: Path) -> None:
    """After a forged identity key change, /import of the key the contact had
    all along says the change was false and sending works again."""
    from enclaves.client import kex
    from enclaves.client.contacts import encode_ik
    from enclaves.crypto import x25519_public

    lines = LineUI()
    transport = StringTransport()
    lines.makeConnection(transport)
    app = keyed_app(tmp_path, lines)
    known = encode_ik(app.core.contact(2002).ik)
    fake = kex.Entropy().x25519()
    identity = kex.Identity(2002, fake, x25519_public(fake))
    forged = kex.make_offer(identity, 2, kex.Entropy(), 0.0).blob
    app._apply(app.core.handle_blob(2002, b"F" * 16, forged, 1.0))
    assert "identity key CHANGED" in transport.value().decode()
    assert typed(lines, transport, "/msg 2002 hi")[0].startswith("[refused] ")
    out = typed(lines, transport, f"/import 2002 {known}")
    assert out[0].startswith("[warn] 2002 still has the key you knew")
    assert out[1:] == ["[trust] 2002 is now in person"]
    assert typed(lines, transport, "/msg 2002 hi")[0].startswith("[queued] ")
    app.stop()


def script_ui(tmp_path: Path) -> tuple[LineUI, ClientApp, StringTransport]:
    lines = LineUI(quit_waits=True)
    transport = StringTransport()
    lines.makeConnection(transport)
    return lines, keyed_app(tmp_path, lines, A, B), transport


def test_a_message_whose_save_fails_is_not_called_sent_and_goes_once_saved(ui, tmp_path) -> None:
    """Save, then send: a /msg whose save fails says so (not [sent]); it is held
    in memory and leaves once a later save succeeds (space freed meanwhile)."""
    lines, app, transport = ui
    with saves_fail():
        out = typed(lines, transport, f"/msg {B} reply", "yes")
        assert out[0].startswith("[confirm] ")
        assert len(out) == 2 and out[1].startswith("[error] id=")
        assert out[1].endswith(
            f" to {B} not sent: could not save the keystore (File too large); it is kept in "
            "memory only and sent once a save succeeds (free some space); quitting before "
            "then loses it"
        )
        assert app.unsaved_count() == 1 and app.pending_count() == 0
        outbox = typed(lines, transport, "/outbox")
        assert "(in memory only: the keystore could not be saved)" in outbox[0]
    transport.clear()
    app._tick()  # the periodic retry of a failed save
    out = transport.value().decode().splitlines()
    assert out[0] == "[info] the keystore could be saved again"
    assert out[1].startswith("[queued] id=") and "(saved now; not connected" in out[1]
    _, state = Keystore.unlock(tmp_path / "ks", "pass phrase")
    assert [e.kind for e in state.outbox] == ["message"]
    assert app.unsaved_count() == 0 and app.pending_count() == 1
    app.stop()


def test_a_held_message_is_reported_lost_at_the_end_and_counted_once(tmp_path) -> None:
    """A script whose /msg could not be saved: the end says the message is lost
    (not "kept in the outbox"), the one command counts once (a background save
    failure is no command), and the exit status is 1."""
    from twisted.internet.defer import ensureDeferred

    from enclaves.client.cli import _finish

    lines, app, transport = script_ui(tmp_path)
    app.connected_once = app.directory_handled = True
    with saves_fail():
        app._save()  # a background save fails too: said, but no command
        typed(lines, transport, f"/msg {B} reply", "yes")
        transport.clear()
        ensureDeferred(_finish(app, lines, 15.0, []))
    out = transport.value().decode().splitlines()[1:]  # after "[info] end of input: ..."
    assert out[0] == "[error] 1 command(s) not done (see the [error] and [refused] lines)"
    assert out[1] == "[error] could not save the keystore: File too large"
    assert out[2].startswith("[error] 1 message(s) lost (")
    assert "never sent" in out[2] and not any("kept in the outbox" in line for line in out)
    assert app.outcome is not None and app.outcome[0] == 1


def test_a_second_rotate_after_a_failed_save_sends_the_keys_once(ui, tmp_path: Path) -> None:
    """/rotate whose save fails, then /rotate again once space is back: one
    ROTATE, with the keys saved."""
    from enclaves.inner import Rotate

    lines, app, transport = ui
    sent: list[object] = []

    class Conn:
        established = True
        max_blob = 1 << 20

        def send(self, message: object) -> None:
            sent.append(message)

    with saves_fail():
        typed(lines, transport, "/rotate")
    app.conn = Conn()  # type: ignore[assignment]
    app._enrolled = True
    typed(lines, transport, "/rotate")
    rotates = [m for m in [*sent, *app._queue] if isinstance(m, Rotate)]
    saved = _on_disk(tmp_path).pending_server_keys
    assert len(rotates) == 1 and saved is not None and rotates[0].enc == saved.enc
    app.conn = None
    app.stop()


NOT_SAVED = (
    "could not save the keystore (File too large); nothing changed: try again once it can be saved"
)


def _on_disk(tmp_path: Path) -> ClientState:
    return Keystore.unlock(tmp_path / "ks", "pass phrase")[1]


def _forge_key_change(app: ClientApp) -> None:
    """B's identity key "changes": an OFFER under another key (as a server can
    write), saved with B's decision pending."""
    from enclaves.client import kex
    from enclaves.crypto import x25519_public

    fake = kex.Entropy().x25519()
    offer = kex.make_offer(kex.Identity(B, fake, x25519_public(fake)), 2, kex.Entropy(), 0.0)
    app._apply(app.core.handle_blob(B, b"F" * 16, offer.blob, 1.0))
    app._save()
    assert app.core.contact(B).pending_ik is not None


@pytest.mark.parametrize(
    ("commands", "not_done", "key_changed"),
    [
        ([f"/name {B} bob"], f"{B} not named bob", False),
        ([f"/verify {B}", "yes"], f"{B} not verified", False),
        ([f"/import {B} KNOWN"], f"identity key of {B} not imported", False),
        ([f"/import {B} KNOWN"], f"identity key of {B} not imported", True),
        ([f"/accept {B} yes"], f"new identity key of {B} not accepted", True),
        ([f"/rekey {B}"], f"key exchange with {B} not started", False),
        (["/rotate"], "keys not replaced", False),
    ],
    ids=[
        "name",
        "verify",
        "import",
        "import-rejecting-a-false-change",
        "accept",
        "rekey",
        "rotate",
    ],
)
def test_a_change_whose_save_fails_is_not_made(
    ui, tmp_path: Path, commands: list[str], not_done: str, key_changed: bool
) -> None:
    """A name, a trust change, an accepted or imported key, a rekey, new server
    keys: done only if saved.  A failed save (for real: a file size limit)
    leaves memory and disk as they were, with one [error] line instead of the
    success line, so that no restart takes back a change the user was told
    of.  The periodic save retry says when saving works again; then the
    command works."""
    from enclaves.client.contacts import encode_ik

    lines, app, transport = ui
    known = encode_ik(app.core.contact(B).ik)
    commands = [c.replace("KNOWN", known) for c in commands]
    if key_changed:
        _forge_key_change(app)
    before, on_disk = app.state(), _on_disk(tmp_path)
    with saves_fail():
        out = typed(lines, transport, *commands)
    assert [line for line in out if not line.startswith(("[safety] ", "[confirm] "))] == [
        f"[error] {not_done}: {NOT_SAVED}"
    ]
    assert app.state() == before and _on_disk(tmp_path) == on_disk
    transport.clear()
    app._tick()  # the periodic retry of a failed save
    assert transport.value().decode().splitlines() == ["[info] the keystore could be saved again"]
    out = typed(lines, transport, *commands)
    assert not any(line.startswith("[error] ") for line in out)
    assert _on_disk(tmp_path) != on_disk
    app.stop()


@contextmanager
def dir_syncs_fail() -> Iterator[None]:
    """Every directory fsync in this block fails with EIO, after the rename:
    the file is replaced, only the sync is missing (no way to make a real
    directory's fsync fail here without root and a faulty device)."""
    import errno

    import enclaves.atomic

    def dir_fsync_fails(directory: object) -> None:
        raise OSError(errno.EIO, "Input/output error")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(enclaves.atomic, "fsync_dir", dir_fsync_fails)
        yield


NOT_SYNCED = (
    "[warn] the keystore was written, but its directory could not be synced (Input/output "
    "error): the change is kept, and a crash of this machine before the next save could undo it"
)


@pytest.mark.parametrize(
    "commands",
    [[f"/name {B} bob"], [f"/verify {B}", "yes"], [f"/rekey {B}"], ["/rotate"]],
    ids=["name", "verify", "rekey", "rotate"],
)
def test_a_change_whose_save_only_missed_the_directory_sync_is_kept_and_said(
    ui, tmp_path: Path, commands: list[str]
) -> None:
    """The rename happened, the directory's fsync failed: the file already
    holds the change, so it is kept in memory too (undoing it would tell the
    user "nothing changed" while a restart shows it made), with a warning;
    the periodic retry syncs it."""
    lines, app, transport = ui
    before = _on_disk(tmp_path)
    with dir_syncs_fail():
        out = typed(lines, transport, *commands)
    assert NOT_SYNCED in out and not any(line.startswith("[error] ") for line in out), out
    assert _on_disk(tmp_path) == app.state() != before  # what a restart loads: what was said
    transport.clear()
    app._tick()  # the periodic retry of a failed save
    assert transport.value().decode().splitlines() == ["[info] the keystore could be saved again"]
    app.stop()


def test_a_verify_that_missed_the_directory_sync_is_verified_in_memory_and_on_disk(
    ui, tmp_path: Path
) -> None:
    from enclaves.client.contacts import Trust

    lines, app, transport = ui
    with dir_syncs_fail():
        typed(lines, transport, f"/verify {B} yes")
    assert app.core.contact(B).trust is Trust.VERIFIED
    assert _on_disk(tmp_path).contacts[B].trust is Trust.VERIFIED
    app.stop()


def test_a_message_held_for_an_io_error_is_not_told_to_free_space(ui) -> None:
    """ "(free some space)" is advice for a full disk or a size limit only."""
    lines, app, transport = ui
    with dir_syncs_fail():
        out = typed(lines, transport, f"/msg {B} reply", "yes")
    assert out[1].startswith("[error] id=") and out[1].endswith(
        f" to {B} not sent: could not save the keystore (Input/output error); it is kept "
        "in memory only and sent once a save succeeds; quitting before then loses it"
    ), out
    app.stop()


def test_a_held_message_whose_last_save_missed_the_directory_sync_is_not_called_lost(
    tmp_path: Path,
) -> None:
    """At the end, a message held for a failed save that is in the file's
    outbox after all (only the directory's sync failed) is not reported lost:
    the next run sends it.  The exit status stays 0."""
    from twisted.internet.defer import ensureDeferred

    from enclaves.client.cli import _finish

    lines, app, transport = script_ui(tmp_path)
    app.connected_once = app.directory_handled = True
    with saves_fail():
        typed(lines, transport, f"/msg {B} reply", "yes")  # held: not saved
    with dir_syncs_fail():
        transport.clear()
        ensureDeferred(_finish(app, lines, 15.0, []))
    out = transport.value().decode().splitlines()
    assert not any("lost" in line for line in out), out
    assert any(
        line.startswith("[warn] 1 message(s) not sent (") and "sent next time" in line
        for line in out
    ), out
    assert [e.kind for e in _on_disk(tmp_path).outbox] == ["message"]


def test_a_script_whose_import_could_not_be_saved_exits_1(tmp_path: Path) -> None:
    """An /import whose save fails counts as a command not done: the script
    exits with status 1 (the import was not made)."""
    from twisted.internet.defer import ensureDeferred

    from enclaves.client.cli import _finish
    from enclaves.client.contacts import Trust, encode_ik

    lines, app, transport = script_ui(tmp_path)
    app.connected_once = app.directory_handled = True
    with saves_fail():
        typed(lines, transport, f"/import {B} {encode_ik(app.core.contact(B).ik)}")
        ensureDeferred(_finish(app, lines, 15.0, []))
    out = transport.value().decode().splitlines()
    assert "[error] 1 command(s) not done (see the [error] and [refused] lines)" in out
    assert app.outcome is not None and app.outcome[0] == 1
    assert _on_disk(tmp_path).contacts[B].trust is Trust.UNVERIFIED


def test_sent_only_when_connected_else_queued(ui) -> None:
    """[sent] while connected; [queued] (saying why) while not."""
    lines, app, transport = ui
    typed(lines, transport, f"/verify {B} yes")

    class Conn:
        established = True
        max_blob = 1 << 20

        def send(self, message: object) -> None:
            pass

    out = typed(lines, transport, f"/msg {B} offline")
    assert out[0].endswith(" (not connected; goes when the connection is back)")
    assert out[0].startswith("[queued] id=")
    app.conn = Conn()  # type: ignore[assignment]
    out = typed(lines, transport, f"/msg {B} online")
    assert out[0].startswith("[sent] id=") and out[0].endswith(f" to {B}")
    app.conn = None
    app.stop()


@pytest.mark.parametrize(("script", "status"), [(False, 0), (True, 1)])
def test_only_a_script_counts_its_old_command_errors_at_the_end(tmp_path, script, status) -> None:
    """Two failed /invite, then the end of input: a script reports and counts
    them (exit status 1); an interactive session saw them when they happened,
    so its end neither reports nor counts them."""
    from twisted.internet.defer import ensureDeferred

    from enclaves.client.cli import _finish

    lines = LineUI(quit_waits=script)
    transport = StringTransport()
    lines.makeConnection(transport)
    app = keyed_app(tmp_path, lines, A, B)
    app.connected_once = app.directory_handled = True
    out = typed(lines, transport, "/invite", "/invite")
    assert out == ["[error] not connected to the server; try /invite again later"] * 2
    transport.clear()
    ensureDeferred(_finish(app, lines, 15.0, []))
    out = transport.value().decode().splitlines()
    assert any("command(s) not done" in line for line in out) is script
    if script:
        assert "[error] 2 command(s) not done (see the [error] and [refused] lines)" in out
    assert app.outcome is not None and app.outcome[0] == status


def test_to_alone_leaves_the_conversation_and_a_double_slash_sends_a_slash(ui) -> None:
    lines, app, transport = ui
    typed(lines, transport, f"/verify {B} yes")
    assert typed(lines, transport, "/to") == ["[info] not in a conversation"]
    out = typed(lines, transport, f"/to {B}", "//etc/passwd is a path", "/to", "plain")
    assert out[0].startswith(f"[info] talking to {B} (verified)")
    assert out[1].startswith("[queued] id=")
    assert out[2:] == [
        f"[info] left the conversation with {B}",
        "[error] not in a conversation: /to WHO first, or /msg WHO TEXT",
    ]
    assert [line.text for line in app.core.history(B)] == ["/etc/passwd is a path"]
    assert lines.prompt() == "> "
    # Outside a conversation "//" is no escape: an unknown command, nothing sent.
    assert typed(lines, transport, "//x")[0].startswith("[error] unknown command //x")
    app.stop()


def test_contacts_lines_are_key_value_words() -> None:
    """``trust=in person`` would split into two fields: it is ``in-person``."""
    from enclaves.client.contacts import Contact, Trust
    from enclaves.client.ui import format_contact

    line = format_contact(Contact(B, trust=Trust.IN_PERSON))
    assert line == f"{B} id={B} trust=in-person keys=none"
    assert all("=" in field for field in line.split()[1:])


def test_end_of_input_is_said_after_a_scripts_commands_ran(tmp_path) -> None:
    """Piped commands run once logged in: "end of input: ..." comes after them."""
    from twisted.internet.defer import Deferred, ensureDeferred

    from enclaves.client.cli import _finish

    lines, app, transport = script_ui(tmp_path)
    app.connected_once = app.directory_handled = True
    commands: Deferred[None] = Deferred()
    transport.clear()
    ensureDeferred(_finish(app, lines, 15.0, [commands]))
    assert transport.value() == b""  # the commands have not run yet
    lines.line("queued", "id=00000000 to 2002 (the script's command)")
    commands.callback(None)
    out = transport.value().decode().splitlines()
    assert out[:2] == [
        "[queued] id=00000000 to 2002 (the script's command)",
        "[info] end of input: sending what is queued, then quitting",
    ]


def test_log_warnings_become_tagged_lines_and_those_the_ui_reports_are_dropped() -> None:
    """The client's log observer: every line it writes starts with a tag; a
    warning the UI reports itself ([warn] ... lists N again) is not printed a
    second time; one it does not report is kept, as [warn]."""
    from twisted.logger import Logger, globalLogPublisher

    from enclaves.client.ui import TaggedLogObserver

    written: list[str] = []
    observer = TaggedLogObserver(written.append)
    globalLogPublisher.addObserver(observer)
    try:
        core = make_core(A)
        core.add_contact(B)
        core.remove_contact(B)
        core.on_directory([A, B], 1.0, start_kex=False)  # logs "lists removed user": dropped
        assert written == []
        log = Logger(namespace="enclaves.client.core")
        log.warn("dropped a blob: {error}", error="too many contacts")
        log.info("not shown: {x}", x=1)
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.failure("tick failed")
    finally:
        globalLogPublisher.removeObserver(observer)
    text = "".join(written)
    assert text.startswith("[warn] dropped a blob: too many contacts\n[error] tick failed: boom\n")
    assert all(line.startswith(("[warn] ", "[error] ")) for line in text.splitlines())
    assert "RuntimeError: boom" in text  # the traceback is kept, tagged


def test_the_warnings_the_ui_reports_itself_are_the_cores() -> None:
    """Each dropped format is one the core logs (a reworded one would be shown twice)."""
    from enclaves.client import core
    from enclaves.client.ui import REPORTED_BY_UI

    source = Path(core.__file__).read_text()
    for text in REPORTED_BY_UI:
        assert f'"{text}"' in source, text


def test_a_retry_of_a_held_message_sends_it_once(ui) -> None:
    """A message held for a failed save, then /retry once space is freed: the
    retry's save releases what was held, and the message leaves once, not
    twice (once as "saved now", once as the retry)."""
    from enclaves.inner import Send

    lines, app, transport = ui
    typed(lines, transport, f"/verify {B} yes")
    sent: list[object] = []

    class Conn:
        established = True
        max_blob = 1 << 20

        def send(self, message: object) -> None:
            sent.append(message)

    app.conn = Conn()  # type: ignore[assignment]
    with saves_fail():
        out = typed(lines, transport, f"/msg {B} reply")
    assert out[0].startswith("[error] id=") and app.unsaved_count() == 1
    msg_id = out[0].split()[1].removeprefix("id=")
    out = typed(lines, transport, f"/retry {msg_id}")
    sends = [m for m in sent if isinstance(m, Send)]
    assert len(sends) == 1, out
    assert [line.split()[0] for line in out].count("[sent]") == 1, out
    assert app.unsaved_count() == 0 and app.pending_count() == 1
    app.conn = None
    app.stop()


def test_a_quit_that_loses_held_messages_exits_with_status_1(ui) -> None:
    """/quit on a terminal while a message is held for a failed save that still
    fails: the message is reported lost, and the exit status says so (1), as
    at the end of input."""
    lines, app, transport = ui
    typed(lines, transport, f"/verify {B} yes")
    with saves_fail():
        typed(lines, transport, f"/msg {B} reply")
        out = typed(lines, transport, "/quit")
    assert any(line.startswith("[error] 1 message(s) lost (") for line in out), out
    assert app.outcome is not None and app.outcome[0] == 1


def test_an_unlisted_contact_is_marked_and_refused_by_to_and_rekey(ui) -> None:
    """/contacts marks an unlisted contact; /to and /rekey refuse it (and a
    script counts them); /rekey while one runs says so without 'started'."""
    lines, app, transport = ui
    app.core.mark_unlisted(B)
    out = typed(lines, transport, "/contacts", f"/to {B}", f"/rekey {B}")
    assert out[0].endswith(" listed=no"), out
    assert out[1] == (
        f"[error] {B} is not on the server's user list; sending is refused until it lists "
        "them again"
    )
    assert out[2] == (
        f"[error] {B} is not on the server's user list; key exchanges with them pause until "
        "it lists them again"
    )
    app.core.relist(B)
    out = typed(lines, transport, "/contacts", f"/rekey {B}", f"/rekey {B}")
    assert "listed=no" not in out[0]
    assert out[1:] == [
        f"[kex] key exchange with {B} started",
        f"[info] a key exchange with {B} is already running",
    ]
    app.stop()
