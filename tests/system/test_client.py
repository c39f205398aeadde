"""The real client (``python -m enclaves``) against a real ``twistd -n enclaves``.

Every client is a separate process driven through its stdin/stdout pipes.
"""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import pytest
import pytest_twisted
from attrs import evolve
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from enclaves.client.core import ClientCore
from enclaves.client.kex import KexState
from enclaves.client.keystore import Keystore
from enclaves.crypto import KeyPair
from enclaves.inner import Rotate, Rotated
from enclaves.token import parse_token
from tests.daemon import Daemon
from tests.system.clients import PASSPHRASE, Client, chat, enroll, new_tokens
from tests.system.helpers import expect, login

pytestmark = pytest.mark.system


def enrolled_id(client: Client) -> int:
    assert client.process.returncode == 0, client.output()
    return int(client.expect(r"^\[enrolled\] you are user (\d+)").group(1))


def contacts(client: Client) -> dict[int, str]:
    """``/contacts`` as {id: line}."""
    start = len(client.lines)
    client.send("/contacts")
    client.send("/help")  # its first line marks the end of the list
    found: dict[int, str] = {}
    end = client.expect(r"^\[help\] /msg ").string
    lines = client.lines[start:]
    for line in lines[: lines.index(end) if end in lines else len(lines)]:
        m = re.match(r"^\[contact\] \S+ id=(\d+) ", line)
        if m:
            found[int(m.group(1))] = line
    return found


def wait_keys(client: Client, peers: list[int], timeout: float = 20.0) -> dict[int, str]:
    """Poll ``/contacts`` until ``client`` has pair keys with every peer."""
    deadline = time.monotonic() + timeout
    while True:
        found = contacts(client)
        if all("keys=epoch-" in found.get(p, "") for p in peers):
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"no keys with all of {peers}: {found}\n{client.output()}")
        time.sleep(0.2)


def send_confirmed(client: Client, who: str, text: str) -> str:
    """``/msg`` to an unverified contact: the client asks, we answer yes."""
    client.send(f"/msg {who} {text}")
    client.expect(r"^\[confirm\] .*not verified.*Send anyway\? \(yes/no\)")
    client.send("yes")
    return client.expect(rf"^\[sent\] id=([0-9a-f]{{8}}) to {who}$").group(1)


@pytest_twisted.ensureDeferred
async def test_three_users_enroll_chat_verify_import(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path)
    tokens = await new_tokens(daemon, 3)
    daemon.start()
    running: list[Client] = []
    try:
        ks = {n: tmp_path / f"{n}.keystore" for n in "abc"}
        ids = {}
        for n, token in zip("abc", tokens, strict=True):
            result = enroll(token, ks[n])
            ids[n] = enrolled_id(result)
            result.expect(r"^\[fingerprint\] \d+: (\d{5} ){5}\d{5}$")
            result.expect(r"^\[ik\] enclaves-ik:")
            assert ks[n].stat().st_mode & 0o777 == 0o600
        # No enrollment cost a failed handshake (the server limits those per address).
        assert "AUTH_FAILED" not in daemon.log_text()
        a, b = chat(ks["a"]), chat(ks["b"])
        running += [a, b]
        # Everyone online so far ends up with pair keys with everyone (c is offline:
        # the exchanges with c ran through the server's store).
        wait_keys(a, [ids["b"], ids["c"]])
        wait_keys(b, [ids["a"], ids["c"]])
        # Messages flow both ways; the first to an unverified contact needs a yes.
        a.send(f"/name {ids['b']} bob")
        a.expect(r"^\[info\] \d+ is now called bob")
        send_confirmed(a, "bob", "hello bob")
        b.expect(rf"^\[msg\] \d\d:\d\d:\d\d {ids['a']} \(unverified\): hello bob$")
        a.expect(r"^\[delivered\] id=[0-9a-f]{8} to bob$")
        send_confirmed(b, str(ids["a"]), "hi alice")
        a.expect(r"^\[msg\] \d\d:\d\d:\d\d bob \(unverified\): hi alice$")
        # Only the first message asks.
        a.send("/msg bob second")
        a.expect(r"^\[sent\] id=[0-9a-f]{8} to bob$")
        b.expect(r"\(unverified\): second$")
        # An offline user receives on return.
        send_confirmed(a, str(ids["c"]), "while you were away")
        a.expect(rf"^\[accepted\] id=[0-9a-f]{{8}} to {ids['c']}$")
        c = chat(ks["c"])
        running.append(c)
        c.expect(rf"^\[msg\] .* {ids['a']} \(unverified\): while you were away$")
        wait_keys(c, [ids["a"], ids["b"]])
        # The same safety number on both sides.
        a.send("/verify bob")
        number_a = a.expect(r"^\[safety\] bob: ((?:\d{5} ){11}\d{5})$").group(1)
        a.expect(r"^\[confirm\] does bob read out exactly these 60 digits\? \(yes/no\)")
        a.send("yes")
        a.expect(r"^\[trust\] bob is now verified$")
        b.send(f"/verify {ids['a']}")
        number_b = b.expect(r"^\[safety\] \d+: ((?:\d{5} ){11}\d{5})$").group(1)
        assert number_a == number_b
        b.expect(r"^\[confirm\] ")
        b.send("no")
        b.expect(r"^\[warn\] not verified")
        assert f"id={ids['b']} trust=verified" in contacts(a)[ids["b"]]
        assert "trust=unverified" in contacts(b)[ids["a"]]
        # Messages now show the sender's trust level as the recipient sees it.
        b.send(f"/msg {ids['a']} now verified")
        a.expect(r"^\[msg\] .* bob \(verified\): now verified$")
        # Import in person upgrades trust; no confirmation needed afterwards.
        c.send("/fingerprint")
        ik_c = c.expect(r"^\[ik\] (enclaves-ik:\S+)$").group(1)
        a.send(f"/import {ids['c']} {ik_c}")
        a.expect(rf"^\[trust\] {ids['c']} is now in person$")
        assert "trust=in-person" in contacts(a)[ids["c"]]
        # A wrong key is refused and changes nothing.
        b.send("/fingerprint")
        ik_b = b.expect(r"^\[ik\] (enclaves-ik:\S+)$").group(1)
        a.send(f"/import {ids['c']} {ik_b}")
        a.expect(r"^\[error\] the key you imported is NOT the key the server gave")
        a.send(f"/msg {ids['c']} in person now")
        a.expect(rf"^\[sent\] id=[0-9a-f]{{8}} to {ids['c']}$")
        c.expect(rf"^\[msg\] .* {ids['a']} \(unverified\): in person now$")
        # History is kept in the keystore.
        b.send(f"/history {ids['a']}")
        b.expect(r"^\[history\] \S+ \S+ \(unverified, received\): hello bob$")
        b.expect(r"^\[history\] \S+ me \(unverified, (accepted|delivered)\): hi alice$")
        for client in running:
            # A pipe's /quit ends like a script: a's refused /import makes it 1.
            assert client.quit() == (1 if client is a else 0), client.output()
            assert not client.seen(r"^\[fatal\]"), client.output()
        a.expect(r"^\[error\] 1 command\(s\) not done ")
    finally:
        for client in running:
            client.kill()
        assert daemon.stop() == 0, daemon.log_text()


async def two_users(
    tmp_path: Path, daemon: Daemon
) -> tuple[dict[str, Path], dict[str, int], list[str]]:
    """Start ``daemon`` and enroll a and b; their keystores, ids and (used) tokens."""
    tokens = await new_tokens(daemon, 2)
    daemon.start()
    ks = {n: tmp_path / f"{n}.keystore" for n in "ab"}
    ids = {n: enrolled_id(enroll(t, ks[n])) for n, t in zip("ab", tokens, strict=True)}
    return ks, ids, tokens


async def chatting_pair(
    tmp_path: Path, daemon: Daemon, running: list[Client]
) -> tuple[dict[str, Path], dict[str, int], Client, Client]:
    """:func:`two_users`, both chatting (added to ``running``) with pair keys."""
    ks, ids, _tokens = await two_users(tmp_path, daemon)
    a, b = chat(ks["a"]), chat(ks["b"])
    running += [a, b]
    wait_keys(a, [ids["b"]])
    wait_keys(b, [ids["a"]])
    return ks, ids, a, b


@pytest_twisted.ensureDeferred
async def test_changed_identity_key_blocks_sending_until_accepted(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path)
    running: list[Client] = []
    try:
        ks, ids, a, b = await chatting_pair(tmp_path, daemon, running)
        assert b.quit() == 0
        # b loses its identity key (a reinstall — or an attacker): a new one, and
        # no pair keys with a any more.
        keystore, state = Keystore.unlock(ks["b"], PASSPHRASE)
        contact = evolve(state.contacts[ids["a"]], current=None, previous=None, kex=KexState())
        keystore.save(
            evolve(
                state,
                identity_private=X25519PrivateKey.generate().private_bytes_raw(),
                contacts={ids["a"]: contact},
            )
        )
        b = chat(ks["b"])
        running.append(b)
        b.send(f"/rekey {ids['a']}")
        b.expect(r"^\[kex\] key exchange with \d+ started$")
        warn = a.expect(rf"^\[warn\] {ids['b']}'s identity key CHANGED\. Sending to \d+ is "
                        r"blocked\. New safety number: ((?:\d{5} ){11}\d{5})\.")  # fmt: skip
        a.send(f"/msg {ids['b']} are you still you?")
        a.expect(rf"^\[refused\] not sent to {ids['b']}: .*identity key changed")
        assert "keys=IDENTITY-KEY-CHANGED" in contacts(a)[ids["b"]]
        # Inspect the new safety number, then accept it.
        a.send(f"/accept {ids['b']}")
        shown = a.expect(r"^\[safety\] \d+ \(new key\): ((?:\d{5} ){11}\d{5})$").group(1)
        assert shown == warn.group(1)
        a.expect(r"^\[confirm\] accept ")
        a.send("yes")
        a.expect(r"^\[trust\] accepted the new identity key")
        wait_keys(a, [ids["b"]])
        b.send(f"/verify {ids['a']}")
        assert b.expect(r"^\[safety\] \d+: ((?:\d{5} ){11}\d{5})$").group(1) == shown
        b.send("no")
        a.send(f"/msg {ids['b']} welcome back")
        a.expect(r"^\[sent\] ")
        b.expect(r"^\[msg\] .*: welcome back$")
        for client in running:
            # A pipe's /quit ends like a script: a's refused send makes it 1.
            assert client.quit() == (1 if client is a else 0), client.output()
    finally:
        for client in running:
            client.kill()
        assert daemon.stop() == 0, daemon.log_text()


@pytest_twisted.ensureDeferred
async def test_outbox_resent_after_server_restart_exactly_once(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path)
    running: list[Client] = []
    try:
        ks, ids, _tokens = await two_users(tmp_path, daemon)
        a, b = chat(ks["a"]), chat(ks["b"])
        running += [a, b]
        wait_keys(a, [ids["b"]])
        a.send(f"/verify {ids['b']} yes")
        a.expect(r"^\[trust\] \d+ is now verified$")
        assert b.quit() == 0
        daemon.kill()
        a.expect(r"^\[conn\] disconnected ")
        for n in range(5):
            a.send(f"/msg {ids['b']} queued {n}")
            a.expect(r"^\[queued\] .* \(not connected; goes when the connection is back\)$")
        a.send("/outbox")
        assert len([a.expect(r"^\[outbox\] id=\S+ message to \d+ pending$") for _ in range(5)]) == 5
        daemon.start()
        a.expect(r"^\[conn\] connected ", timeout=20)
        a.expect(r"^\[info\] sending 5 queued item")
        for _ in range(5):
            a.expect(r"^\[accepted\] ")
        b = chat(ks["b"])
        running.append(b)
        for n in range(5):
            b.expect(rf"\(unverified\): queued {n}$")
        # Nothing more arrives, also after reconnecting again.
        assert b.quit() == 0
        b = chat(ks["b"])
        running.append(b)
        b.send(f"/history {ids['a']}")
        b.send("/help")
        b.expect(r"^\[help\] /msg ")
        assert len(b.seen(r"^\[history\] .*: queued \d$")) == 5
        assert not b.seen(r"^\[msg\]")
        a.send("/outbox")
        a.expect(r"^\[outbox\] empty$")
        for client in running:
            assert client.quit() == 0, client.output()
    finally:
        for client in running:
            client.kill()
        assert daemon.stop() == 0, daemon.log_text()


@pytest_twisted.ensureDeferred
async def test_wrong_passphrase_reused_and_expired_tokens(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path)
    (expired,) = await new_tokens(daemon, 1, lifetime=-60)
    try:
        ks, _ids, tokens = await two_users(tmp_path, daemon)
        before = ks["a"].read_bytes()
        wrong = Client(["--keystore", str(ks["a"])], "not the passphrase")
        assert wrong.wait() == 1
        assert "wrong passphrase" in "\n".join(wrong.err)
        assert ks["a"].read_bytes() == before
        # Reusing a token: a plain error and no keystore left behind.
        token = tokens[0]
        failures = daemon.log_text().count("AUTH_FAILED")
        again = enroll(token, tmp_path / "again.keystore")
        assert again.process.returncode == 1
        assert "already used" in "\n".join(again.err), again.output()
        # One failed login (the token), not a second with keys never sent: the
        # server limits failures per address, for everyone behind it.
        assert daemon.log_text().count("AUTH_FAILED") == failures + 1
        assert not (tmp_path / "again.keystore").exists()
        late = enroll(expired, tmp_path / "late.keystore")
        assert late.process.returncode == 1
        assert "expired" in "\n".join(late.err), late.output()
        assert not (tmp_path / "late.keystore").exists()
        # Enrolling over an existing keystore is refused and leaves it alone.
        over = enroll(token, ks["b"])
        assert over.process.returncode == 1
        assert ks["a"].read_bytes() == before
    finally:
        assert daemon.stop() == 0, daemon.log_text()


@pytest_twisted.ensureDeferred
async def test_rotation_survives_a_crash_at_either_side_and_invites(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path, "--allow-invites")
    running: list[Client] = []
    try:
        ks, ids, _tokens = await two_users(tmp_path, daemon)
        a = chat(ks["a"])
        running.append(a)
        a.send("/rotate")
        a.expect(r"^\[info\] the server now knows only your new keys")
        assert a.quit() == 0
        # Crash before the server saw ROTATE: the keystore holds pending keys the
        # server never stored. Login falls back to the old keys and rotates again.
        keystore, state = Keystore.unlock(ks["a"], PASSPHRASE)
        fresh = KeyPair.generate()
        keystore.save(evolve(state, pending_server_keys=fresh))
        a = chat(ks["a"])
        running.append(a)
        a.expect(r"^\[info\] the server now knows only your new keys")
        assert a.quit() == 0
        _, state = Keystore.unlock(ks["a"], PASSPHRASE)
        assert state.server_keys == fresh and state.pending_server_keys is None
        # Crash after the server stored ROTATE but before the client saved ROTATED.
        newer = KeyPair.generate()
        conn = await login(daemon, ids["a"], state.server_keys)
        conn.send(Rotate(newer.enc, newer.auth))
        await expect(conn, Rotated)
        await conn.disconnect()
        keystore.save(evolve(state, pending_server_keys=newer))
        a = chat(ks["a"])
        running.append(a)
        # The new keys log in (tried first): the rotation is complete at once.
        assert a.seen(r"^\[info\] the server now knows only your new keys")
        _, state = Keystore.unlock(ks["a"], PASSPHRASE)
        assert state.server_keys == newer and state.pending_server_keys is None
        # An invitation, and the newcomer announced to a.
        a.send("/invite")
        token = a.expect(r"^\[invite\] token for a new user (\d+), valid until .*: (\S+)$")
        # The token names the server as a's client reaches it: no --server needed.
        assert token.group(2).endswith(f"@127.0.0.1:{daemon.port}")
        joined = enroll(token.group(2), tmp_path / "c.keystore")
        assert enrolled_id(joined) == int(token.group(1))
        a.expect(rf"^\[joined\] user {token.group(1)} joined")
        wait_keys(a, [ids["b"], int(token.group(1))])
        assert a.quit() == 0
    finally:
        for client in running:
            client.kill()
        assert daemon.stop() == 0, daemon.log_text()


def piped(keystore: Path, commands: str = "", keep_open: bool = False) -> Client:
    """``enclaves`` reading a script from a pipe (closed at once unless ``keep_open``)."""
    script = Client(
        ["--keystore", str(keystore), "--eof-grace", "3"], f"{PASSPHRASE}\n{commands}".strip()
    )
    if not keep_open:
        assert script.process.stdin is not None
        script.process.stdin.close()
    return script


@pytest_twisted.ensureDeferred
async def test_sending_is_paced_below_the_server_message_rate(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path, "--message-rate", "5")
    running: list[Client] = []
    try:
        ks, ids, _tokens = await two_users(tmp_path, daemon)
        a, b = chat(ks["a"], "--send-rate", "4"), chat(ks["b"])
        running += [a, b]
        wait_keys(a, [ids["b"]])
        a.send(f"/verify {ids['b']} yes")
        a.send("\n".join(f"/msg {ids['b']} burst {n}" for n in range(16)))
        for n in range(16):
            b.expect(rf": burst {n}$")
        assert not a.seen(r"^\[conn\] disconnected"), a.output()
        assert a.quit() == 0
        assert b.quit() == 0
        # A one-shot script: commands piped in, end of input; what was queued is
        # sent (here: stored for b, who is offline) before the client exits.
        script = piped(ks["a"], f"/msg {ids['b']} one-shot")
        assert script.wait() == 0, script.output()
        script.expect(r"^\[accepted\] ")
        # The server stops answering: what was not accepted in the grace is
        # reported, kept, and the exit status says so.
        stalled = piped(ks["a"], keep_open=True)
        stalled.expect(r"^\[conn\] connected as ")
        assert daemon.process is not None
        daemon.process.send_signal(signal.SIGSTOP)
        try:
            stalled.send(f"/msg {ids['b']} late")
            assert stalled.process.stdin is not None
            stalled.process.stdin.close()
            assert stalled.wait() == 1, stalled.output()
        finally:
            daemon.process.send_signal(signal.SIGCONT)
        stalled.expect(
            r"^\[error\] 1 message\(s\) not accepted by the server yet; kept in the outbox"
        )
        # Nothing queued: a piped session still logs in and picks up what waits.
        reader = piped(ks["b"])
        assert reader.wait() == 0, reader.output()
        reader.expect(r": one-shot$")
        # The kept message goes out with the next run.
        again = piped(ks["a"])
        assert again.wait() == 0, again.output()
        again.expect(r"^\[info\] sending 1 queued item\(s\) from the outbox")
        assert Keystore.unlock(ks["a"], PASSPHRASE)[1].outbox == ()
        for client in running:
            assert client.quit() == 0, client.output()
    finally:
        for client in running:
            client.kill()
        assert daemon.stop() == 0, daemon.log_text()


@pytest_twisted.ensureDeferred
async def test_a_script_exits_1_when_a_command_was_not_done(tmp_path: Path) -> None:
    """Not only what the server refused: a command the client could not do, or
    a question left without its answer, also makes a script's status 1; a
    script's /quit waits for the outbox like the end of input."""
    daemon = Daemon(tmp_path)
    running: list[Client] = []
    try:
        ks, ids, a, b = await chatting_pair(tmp_path, daemon, running)
        assert a.quit() == 0 and b.quit() == 0
        unknown = piped(ks["a"], "/msg nobody hello")
        assert unknown.wait() == 1, unknown.output()
        unknown.expect(r"^\[error\] 1 command\(s\) not done \(see the \[error\] and ")
        unanswered = piped(ks["a"], f"/msg {ids['b']} hello")  # unverified: asks
        assert unanswered.wait() == 1, unanswered.output()
        unanswered.expect(r"^\[error\] the input ended before the answer to a question")
        quits = piped(ks["a"], f"/msg {ids['b']} sent\nyes\n/quit\n/msg {ids['b']} after")
        assert quits.wait() == 0, quits.output()
        quits.expect(r"^\[accepted\] ")
        assert not quits.seen(r"after"), quits.output()
        assert Keystore.unlock(ks["a"], PASSPHRASE)[1].outbox == ()
    finally:
        for client in running:
            client.kill()
        assert daemon.stop() == 0, daemon.log_text()


@pytest_twisted.ensureDeferred
async def test_a_script_waits_for_the_login_and_its_last_invite(tmp_path: Path) -> None:
    """A script's commands run once the user list is in (so /name of a user
    it lists works on the first run); a "yes" for a question asked only the
    first time is skipped, never sent; /invite as the last line waits for
    its token."""
    daemon = Daemon(tmp_path, "--allow-invites")
    (token_c,) = await new_tokens(daemon, 1)
    running: list[Client] = []
    try:
        ks, ids, a, b = await chatting_pair(tmp_path, daemon, running)
        assert a.quit() == 0
        # c joins while a is away: a's keystore does not know c yet.
        c_id = enrolled_id(enroll(token_c, tmp_path / "c.keystore"))
        first = piped(ks["a"], f"/name {c_id} carol\n/name {ids['b']} bob\n/msg bob one\nyes")
        assert first.wait() == 0, first.output()
        first.expect(rf"^\[info\] {c_id} is now called carol$")
        second = piped(ks["a"], "/msg bob two\nyes\n/invite")
        assert second.wait() == 0, second.output()
        second.expect(r"^\[info\] no question was asked; 'yes' skipped$")
        second.expect(r"^\[invite\] token for a new user \d+, valid until .*: enclaves1:")
        got = [b.expect(r"\): (\S+)$").group(1) for _ in range(2)]
        assert got == ["one", "two"]  # and no message "yes"
        assert not b.seen(r"\): yes$")
    finally:
        for client in running:
            client.kill()
        assert daemon.stop() == 0, daemon.log_text()


@pytest_twisted.ensureDeferred
async def test_refused_message_is_kept_as_failed_and_can_be_retried(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path, "--max-pending", "2")
    running: list[Client] = []
    try:
        ks, ids, a, b = await chatting_pair(tmp_path, daemon, running)
        a.send(f"/verify {ids['b']} yes")
        # B reads everything A sent so far (a KEY_CONFIRM may still be on its
        # way) before leaving, so that its queue on the server starts empty.
        a.send(f"/msg {ids['b']} ready")
        b.expect(r": ready$")
        assert b.quit() == 0
        assert a.quit() == 0
        # A script sends three: one is refused, and its exit status says so.
        script = piped(ks["a"], "\n".join(f"/msg {ids['b']} note {n}" for n in range(3)))
        assert script.wait() == 1, script.output()
        failed = script.expect(
            rf"^\[failed\] id=([0-9a-f]{{8}}) message to {ids['b']} refused: the recipient's "
            r"mailbox on the server is full; /retry ([0-9a-f]{8}) sends it again$"
        )
        script.expect(r"^\[error\] 1 message\(s\) refused by the server ")
        a = chat(ks["a"])
        running.append(a)
        a.send("/outbox")
        a.expect(rf"^\[outbox\] id={failed.group(1)} message to \d+ failed: .*mailbox.*full$")
        b = chat(ks["b"])
        running.append(b)
        # Stores run concurrently: which of the three was refused is not fixed.
        got = {b.expect(r": note (\d)$").group(1) for _ in range(2)}
        a.expect(r"^\[delivered\] ")
        a.expect(r"^\[delivered\] ")
        a.send(f"/retry {failed.group(1)}")
        a.expect(rf"^\[sent\] id={failed.group(1)} to \d+ \(again\)$")
        got.add(b.expect(r": note (\d)$").group(1))
        assert got == {"0", "1", "2"}
        a.expect(rf"^\[delivered\] id={failed.group(1)} ")
        for client in running:
            assert client.quit() == 0, client.output()
    finally:
        for client in running:
            client.kill()
        assert daemon.stop() == 0, daemon.log_text()


@pytest_twisted.ensureDeferred
async def test_a_message_too_large_for_a_small_max_frame_fails_alone(tmp_path: Path) -> None:
    """A server at --max-frame=16384 against the client, which coalesces up to
    65,536 bytes and sends messages of up to 32 KiB of text: a message whose
    DELIVER would not fit the server's frames fails with a line naming the
    server's limit; the session stays, the messages around it arrive (even
    coalesced into one frame above 16,384), and nothing is sent again after a
    restart.  Before, the oversize frame ended the session (FRAME_TOO_LARGE)
    and the client, resending its outbox, was ended again at every login."""
    daemon = Daemon(tmp_path, "--max-frame", "16384")
    running: list[Client] = []
    try:
        ks, ids, a, b = await chatting_pair(tmp_path, daemon, running)
        bob = ids["b"]
        a.send(f"/verify {bob} yes")
        a.send(f"/msg {bob} before")
        a.expect(rf"^\[sent\] id=[0-9a-f]{{8}} to {bob}$")
        b.expect(r": before$")
        a.send(f"/msg {bob} {'x' * 20_000}")
        too_large = a.expect(rf"^\[sent\] id=([0-9a-f]{{8}}) to {bob}$").group(1)
        a.expect(
            rf"^\[failed\] id={too_large} message to {bob} refused: too large for this server: "
            r"this server takes messages of at most 16306 bytes, encrypted "
            r"\(this one is \d+ bytes\); send it in shorter parts$"
        )
        # Eight 4,000-byte messages in one write: the client coalesces what it
        # has queued up to 65,536 bytes a frame, above the server's 16,384.
        a.send("\n".join(f"/msg {bob} {n}{'y' * 4000}" for n in range(8)))
        a.send(f"/msg {bob} {'z' * 16_000}")  # fits the server's frames: delivered
        a.send(f"/msg {bob} after")
        for n in range(8):
            b.expect(rf": {n}y{{4000}}$")
        b.expect(r": z{16000}$")
        b.expect(r": after$")
        assert not b.seen(r": x{20000}$")
        assert not a.seen(r"^\[conn\] disconnected"), a.output()
        # A restart sends nothing again: the refused message stays failed.
        assert a.quit() == 1  # a message was refused this run
        running.remove(a)
        a = chat(ks["a"])
        running.append(a)
        a.send("/outbox")
        a.expect(rf"^\[outbox\] id={too_large} message to \d+ failed: too large for this server")
        # A DELIVERED is live traffic, which comes after the login's DIRECTORY
        # (docs/protocol.rst), and the outbox is resent when that is read: by
        # this receipt, a resend of the refused message would have been said.
        a.send(f"/msg {bob} after the restart")
        again = a.expect(rf"^\[(?:sent|queued)\] id=([0-9a-f]{{8}}) to {bob}").group(1)
        a.expect(rf"^\[delivered\] id={again} to {bob}$")
        b.expect(r": after the restart$")
        assert not a.seen(r"queued item\(s\) from the outbox"), a.output()
        assert "FRAME_TOO_LARGE" not in daemon.log_text()
        for client in running:
            assert client.quit() == 0, client.output()
    finally:
        for client in running:
            client.kill()
        assert daemon.stop() == 0, daemon.log_text()


@pytest_twisted.ensureDeferred
async def test_recipient_killed_mid_stream_loses_and_repeats_nothing(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path)
    running: list[Client] = []
    try:
        ks, ids, a, b = await chatting_pair(tmp_path, daemon, running)
        a.send(f"/verify {ids['b']} yes")
        count = 40
        a.send("\n".join(f"/msg {ids['b']} stream {n}" for n in range(count)))
        b.expect(r": stream 5$")
        b.kill()  # SIGKILL while DELIVERs are arriving
        for _ in range(count):
            a.expect(r"^\[accepted\] ")
        b = chat(ks["b"])
        running.append(b)
        # The rest arrives from the server's store after b logs in: ask for the
        # history until it is complete (bounded), then check nothing repeats.
        shown = 0
        for _ in range(60):
            b.send(f"/history {ids['a']}")
            b.send("/help")
            b.expect(r"^\[help\] /msg ")
            lines = b.seen(r"^\[history\]")
            got = [int(m) for m in re.findall(r": stream (\d+)$", "\n".join(lines[shown:]), re.M)]
            shown = len(lines)
            if len(got) >= count:
                break
            time.sleep(0.25)
        assert sorted(got) == list(range(count)), got
        for client in (a, b):
            assert client.quit() == 0, client.output()
    finally:
        for client in running:
            client.kill()
        assert daemon.stop() == 0, daemon.log_text()


@pytest_twisted.ensureDeferred
async def test_enroll_reads_the_token_from_standard_input(tmp_path: Path) -> None:
    """Without TOKEN on the command line (where ps shows it to every local
    user until it is used), the first line of a pipe is the token."""
    daemon = Daemon(tmp_path)
    (token,) = await new_tokens(daemon, 1)
    daemon.start()
    try:
        keystore = tmp_path / "a.keystore"
        client = Client(["enroll", "--keystore", str(keystore)], f"{token}\n{PASSPHRASE}")
        assert client.wait(60) == 0, client.output()
        assert enrolled_id(client) == parse_token(token).user_id
        bad = Client(["enroll", "--keystore", str(tmp_path / "b.keystore")], "not a token\nx")
        assert bad.wait(60) == 1
        assert "an enrollment token starts with" in "\n".join(bad.err)
    finally:
        assert daemon.stop() == 0, daemon.log_text()


@pytest_twisted.ensureDeferred
async def test_enrollment_interrupted_after_rotate_resumes(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path)
    (token_text,) = await new_tokens(daemon, 1)
    daemon.start()
    try:
        # What 'enclaves enroll' writes before its first ROTATE...
        token = parse_token(token_text)
        pending = KeyPair.generate()
        core = ClientCore.new(token.user_id, token.keys, f"tcp:host=127.0.0.1:port={daemon.port}")
        path = tmp_path / "a.keystore"
        Keystore.create(
            path, PASSPHRASE, evolve(core.state(), pending_server_keys=pending, enrolled=False)
        )
        # ...then the ROTATE reaches the server, and the client dies before ROTATED.
        conn = await login(daemon, token.user_id, token.keys)
        conn.send(Rotate(pending.enc, pending.auth))
        await expect(conn, Rotated)
        await conn.disconnect()
        # Running the same command again finishes the enrollment (the token's keys
        # are dead by now; the pending keys log in).
        again = enroll(token_text, path)
        assert again.process.returncode == 0, again.output()
        again.expect(r"^\[info\] resuming the interrupted enrollment$")
        assert enrolled_id(again) == token.user_id
        _, state = Keystore.unlock(path, PASSPHRASE)
        assert state.enrolled and state.server_keys == pending
        assert state.pending_server_keys is None
    finally:
        assert daemon.stop() == 0, daemon.log_text()


@pytest_twisted.ensureDeferred
async def test_an_unreadable_account_unlists_a_contact_until_it_is_restored(
    tmp_path: Path,
) -> None:
    """A damaged ``.user`` file is quarantined at start-up, so the user list
    leaves that user out: clients mark the contact unlisted (sending refused,
    nothing deleted).  The admin restores the file and restarts: the contact
    is listed again and a message goes through under the same keys."""
    daemon = Daemon(tmp_path)
    running: list[Client] = []
    try:
        ks, ids, a, b = await chatting_pair(tmp_path, daemon, running)
        a.send(f"/verify {ids['b']} yes")
        a.expect(r"^\[trust\] \d+ is now verified$")
        assert b.quit() == 0
        user_file = daemon.data_dir / "users" / f"{ids['b']}.user"
        backup = user_file.read_bytes()
        daemon.stop()
        a.expect(r"^\[conn\] disconnected ")
        a.send(f"/msg {ids['b']} queued while down")
        queued = a.expect(rf"^\[queued\] id=(\S+) to {ids['b']} ").group(1)
        damaged = bytearray(backup)
        damaged[len(damaged) // 2] ^= 0x01
        user_file.write_bytes(bytes(damaged))
        daemon.start()
        a.expect(
            rf"^\[removed\] {ids['b']} is no longer on the server's user list \(removed, or "
            r"the server cannot read their account\)",
            timeout=20,
        )
        # The queued message waited for the user list and was not sent to a
        # server that does not list its recipient.
        a.expect(
            rf"^\[failed\] id={queued} message to {ids['b']} not sent: the server no longer "
            rf"lists them; /retry {queued} once they are listed again$"
        )
        assert not a.seen(r"refused: the server has no such user"), a.output()
        a.send(f"/msg {ids['b']} while unlisted")
        a.expect(rf"^\[refused\] .*{ids['b']} is not on the server's user list")
        daemon.stop()
        a.expect(r"^\[conn\] disconnected ")
        for quarantined in (daemon.data_dir / "quarantine").iterdir():
            quarantined.unlink()
        user_file.write_bytes(backup)
        user_file.chmod(0o600)
        daemon.start()
        a.expect(rf"^\[joined\] {ids['b']} is on the server's user list again$", timeout=20)
        a.send(f"/retry {queued}")
        a.expect(rf"^\[accepted\] id={queued} ")
        a.send(f"/msg {ids['b']} restored")  # verified: no question
        a.expect(rf"^\[sent\] id=\S+ to {ids['b']}$")
        b = chat(ks["b"])
        running.append(b)
        b.expect(r": queued while down$")
        b.expect(r"\(verified\): restored$|\(unverified\): restored$")
        assert not b.seen(r"^\[warn\]") and not a.seen(r"^\[warn\]"), a.output() + b.output()
        assert b.quit() == 0, b.output()
        assert a.quit() == 1, a.output()  # a script: the refused /msg counts
    finally:
        for client in running:
            client.kill()
        assert daemon.stop() == 0, daemon.log_text()
