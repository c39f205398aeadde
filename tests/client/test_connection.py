"""The client connection library against the real server protocol over iosim."""

from __future__ import annotations

import struct
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.test import iosim

from enclaves.client.connection import ClientConnection, Disconnected, LoginFailed
from enclaves.crypto import KeyPair
from enclaves.frames import ErrorCode
from enclaves.inner import Accepted, Deliver, Delivered, Directory, Error, Received, Send
from tests.server.harness import Harness


def mid(n: int) -> bytes:
    return struct.pack(">QQ", 0, n)


def _connect(h: Harness, user_id: int, keys: KeyPair) -> tuple[ClientConnection, iosim.IOPump]:
    addr = IPv4Address("TCP", "192.0.2.50", 5000 + user_id)
    server = h.factory.buildProtocol(addr)
    client = ClientConnection(user_id, keys, clock=h.clock)
    pump = iosim.connect(
        server,
        iosim.FakeTransport(server, True, peerAddress=addr),
        client,
        iosim.FakeTransport(client, False),
        greet=True,
        clock=h.clock,
    )
    return client, pump


def _drain(conn: ClientConnection) -> list[object]:
    out: list[object] = []
    while conn.inbox.pending:
        conn.inbox.get().addCallback(out.append)
    return out


def test_login_send_receive_and_disconnect_reason() -> None:
    h = Harness()
    ka, kb = h.add_user(1), h.add_user(2)
    a, pa = _connect(h, 1, ka)
    b, pb = _connect(h, 2, kb)
    pa.flush(), pb.flush()
    assert a.ready.called and b.ready.called and a.established
    assert _drain(a) == [Directory((1, 2))]
    seen: list[object] = []
    b.on_message = seen.append
    _drain(b)
    a.send(Send(mid(1), 2, b"hello"))
    a.send(Send(mid(2), 99, b"nobody"))
    for _ in range(3):
        pa.flush(), pb.flush()
    assert seen == [Deliver(mid(1), 1, b"hello")]
    b.send(Received(mid(1)))
    for _ in range(3):
        pb.flush(), pa.flush()
    assert _drain(a) == [
        Error(ErrorCode.UNKNOWN_RECIPIENT, mid(2), "no such user"),
        Accepted(mid(1)),
        Delivered(mid(1)),
    ]
    # A second login of user 2 replaces the first: its reason is REPLACED.
    _b2, pb2 = _connect(h, 2, kb)
    for _ in range(3):
        pb2.flush(), pb.flush()
    reasons: list[Disconnected] = []
    b.closed.addCallback(reasons.append)
    assert reasons == [Disconnected(ErrorCode.REPLACED, "a newer session of this user took over")]
    assert reasons[0].name == "REPLACED"
    done: list[Disconnected] = []
    a.disconnect().addCallback(done.append)
    pa.flush()
    assert done == [Disconnected(None, "connection closed")]
    assert not h.router.is_online(1)


def test_login_failed_carries_the_servers_error() -> None:
    h = Harness()
    h.add_user(1)
    client, pump = _connect(h, 1, KeyPair.generate())
    failures: list[object] = []
    client.ready.addErrback(failures.append)
    pump.flush()
    (failure,) = failures
    error = failure.value  # type: ignore[attr-defined]
    assert isinstance(error, LoginFailed)
    assert error.code == ErrorCode.AUTH_FAILED and "AUTH_FAILED" in str(error)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=120), max_size=6))
def test_random_server_bytes_never_crash_the_client(chunks: list[bytes]) -> None:
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    client = ClientConnection(1, KeyPair.generate(), clock=Clock())
    transport = StringTransport()
    client.makeConnection(transport)
    client.ready.addErrback(lambda failure: None)
    for chunk in chunks:
        client.dataReceived(chunk)
    client.connectionLost()
    reasons: list[Disconnected] = []
    client.closed.addCallback(reasons.append)
    assert len(reasons) == 1


def test_directory_parts_reach_the_application_as_one() -> None:
    h = Harness(router={"max_frame": 4096}, max_frame=4096)
    keys = {uid: h.add_user(uid) for uid in range(1, 1201)}
    a, pump = _connect(h, 1, keys[1])
    for _ in range(3):
        pump.flush()
    assert _drain(a) == [Directory(tuple(range(1, 1201)))]


def test_outer_error_inside_a_session_is_a_plain_close() -> None:
    from enclaves.frames import FrameType, encode_error, encode_frame

    h = Harness()
    ka = h.add_user(1)
    a, pump = _connect(h, 1, ka)
    pump.flush()
    assert a.established
    reasons: list[Disconnected] = []
    a.closed.addCallback(reasons.append)
    forged = encode_frame(FrameType.ERROR, encode_error(ErrorCode.REVOKED, "call 555-0100 now"))
    a.dataReceived(forged)
    pump.flush()
    assert reasons == [Disconnected(None, "connection closed")]


def test_answers_made_while_receiving_leave_with_that_read() -> None:
    """A RECEIVED sent from on_message goes out when the read ends, no timer needed;
    a send to another connection from the same callback still gets its timer."""
    h = Harness()
    ka, kb, kc = h.add_user(1), h.add_user(2), h.add_user(3)
    a, pa = _connect(h, 1, ka)
    b, pb = _connect(h, 2, kb)
    c, pc = _connect(h, 3, kc)
    for pump in (pa, pb, pc):
        pump.flush()
    for conn in (a, b, c):
        _drain(conn)
    a.send(Send(mid(1), 2, b"hello"))
    pa.flush()
    timers: list[str] = []

    class CountingClock:
        def __init__(self, name: str) -> None:
            self.name = name

        def callLater(self, delay: float, f: Any, *args: Any) -> Any:
            timers.append(self.name)
            return h.clock.callLater(delay, f, *args)

    b._clock, c._clock = CountingClock("b"), CountingClock("c")

    def on_message(message: object) -> None:
        assert isinstance(message, Deliver)
        b.send(Received(message.msg_id))
        c.send(Send(mid(2), 1, b"relayed"))

    b.on_message = on_message
    pb.flush(advanceClock=False)  # b reads the DELIVER and answers within that read
    assert not b._queue  # written at the end of the read...
    assert timers == ["c"]  # ...with no timer; another connection's send has one
    assert c._queue
    pb.flush(), pa.flush()
    assert _drain(a) == [Accepted(mid(1)), Delivered(mid(1))]
    h.clock.advance(0)
    pc.flush(), pa.flush()
    assert [m for m in _drain(a) if isinstance(m, Deliver)] == [Deliver(mid(2), 3, b"relayed")]


def _logged_in_by_hand() -> tuple[ClientConnection, Any]:
    """A client connection logged in by a hand-driven server handshake: the
    test is the server and seals what it likes with the returned Session."""
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from enclaves.frames import DEFAULT_MAX_FRAME, FrameDecoder, FrameType
    from enclaves.handshake import ServerHandshake
    from enclaves.session import Session
    from enclaves.storage.interface import UserRecord

    keys = KeyPair.generate()
    client = ClientConnection(7, keys, clock=Clock())
    transport = StringTransport()
    client.makeConnection(transport)
    (hello,) = FrameDecoder(DEFAULT_MAX_FRAME).feed(transport.value())
    assert hello.type is FrameType.HELLO
    server = ServerHandshake()
    server.receive_hello(hello.payload)
    welcome, session_keys = server.authenticate(UserRecord(7, keys))
    client.dataReceived(welcome)
    assert client.established
    return client, Session(session_keys, "server", DEFAULT_MAX_FRAME)


def test_an_endless_directory_is_refused_not_kept() -> None:
    """DIRECTORY parts flagged "more follows" are joined in memory: a server
    that never sends the last part must not make the client keep ids without
    bound.  Past MAX_DIRECTORY ids the session ends as a malformed message."""
    from enclaves.client.connection import MAX_DIRECTORY
    from enclaves.inner import split_directory
    from enclaves.session import max_inner_size

    client, server = _logged_in_by_hand()
    reasons: list[Disconnected] = []
    client.closed.addCallback(reasons.append)
    part = split_directory(range(1, 100_000), max_inner_size(65536))[0]
    assert part.more
    sent = 0
    while not reasons and sent <= MAX_DIRECTORY + len(part.user_ids):
        client.dataReceived(server.seal([part]))
        sent += len(part.user_ids)
        if client._done:
            client.connectionLost()
    assert reasons and reasons[0].code == ErrorCode.BAD_MESSAGE
    assert sent <= MAX_DIRECTORY + len(part.user_ids)
    assert client._directory_parts == []
    assert client.inbox.pending == []


def test_a_damaged_first_frame_is_not_taken_for_another_kind_of_server() -> None:
    """A WELCOME whose length prefix had a bit flipped (a network attacker) ends
    the connection as FRAME_TOO_LARGE, as docs/security.rst says; only text
    (another server's greeting) is "not an Enclaves server", which the app
    takes as final."""
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from enclaves.client.connection import NotAnEnclavesServer

    for first, kind, code in [
        (b"\x80\x00\x00\x60" + b"\x01\x02" + b"\x00" * 20, LoginFailed, ErrorCode.FRAME_TOO_LARGE),
        (b"SSH-2.0-OpenSSH_9.6\r\n", NotAnEnclavesServer, 0),
    ]:
        conn = ClientConnection(1, KeyPair.generate(), clock=Clock())
        conn.makeConnection(StringTransport())
        failures: list[object] = []
        conn.ready.addErrback(lambda f, into=failures: into.append(f.value))
        conn.dataReceived(first)
        conn.connectionLost()
        (error,) = failures
        assert type(error) is kind and error.code == code, error  # type: ignore[attr-defined]
