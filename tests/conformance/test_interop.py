"""The conformance implementation talks to the real handshake and session machines,
in process: each side of a handshake, then sealed frames both ways."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from enclaves import inner
from enclaves.crypto import KeyPair
from enclaves.frames import ErrorCode as RealErrorCode
from enclaves.frames import FrameDecoder as RealFrameDecoder
from enclaves.handshake import ClientHandshake, HandshakeError, ServerHandshake
from enclaves.handshake import SessionKeys as RealSessionKeys
from enclaves.session import Session, SessionError
from enclaves.storage.interface import UserRecord
from enclaves.token import EnrollmentToken
from tests.conformance import protocol as cr
from tests.conformance.bridge import to_conformance, to_real

USER = 0x1234_5678_9ABC_DEF1
MSG_ID = os.urandom(16)
# What a client and a server say in a session's first frames, in the real codec.
CLIENT_SAYS: list[list[inner.InnerMessage]] = [
    [inner.Ping(1)],
    [inner.Send(MSG_ID, 7, b"e2e blob"), inner.Received(bytes(16)), inner.Ping(2)],
    [inner.Rotate(os.urandom(32), os.urandom(32)), inner.Invite()],
]
SERVER_SAYS: list[list[inner.InnerMessage]] = [
    [inner.Directory((7, USER)), inner.Pong(1)],
    [inner.Accepted(MSG_ID), inner.Deliver(os.urandom(16), 7, b"reply"), inner.Pong(2)],
    [inner.Rotated(), inner.InviteToken(8, 1_700_000_000_000, "enclaves1:x")],
]


def real_keys(keys: cr.Keys) -> KeyPair:
    return KeyPair(keys.enc, keys.auth)


def same_keys(ours: cr.SessionKeys, theirs: RealSessionKeys) -> bool:
    return ours.c2s == (theirs.c2s.enc, theirs.c2s.auth) and ours.s2c == (
        theirs.s2c.enc,
        theirs.s2c.auth,
    )


def new_user_keys() -> cr.Keys:
    return cr.Keys(os.urandom(32), os.urandom(32))


def one_frame(wire: bytes) -> cr.Frame:
    (frame,) = cr.FrameDecoder().feed(wire)
    return frame


def conformance_client_handshake(keys: cr.Keys) -> tuple[cr.SessionKeys, RealSessionKeys]:
    """A conformance client logs in to a real ServerHandshake."""
    hello, ec = cr.make_hello(USER, keys)
    server = ServerHandshake()
    (frame,) = RealFrameDecoder().feed(hello)
    assert server.receive_hello(frame.payload) == USER
    welcome, server_keys = server.authenticate(UserRecord(USER, real_keys(keys)))
    h, es_public = cr.check_welcome(hello[4:], keys, one_frame(welcome).payload)
    return cr.session_keys(cr.x25519(ec, es_public), keys, h), server_keys


def conformance_server_handshake(keys: cr.Keys) -> tuple[cr.SessionKeys, RealSessionKeys]:
    """A real ClientHandshake logs in to a conformance server."""
    client = ClientHandshake(USER, real_keys(keys))
    frame = one_frame(client.hello_frame())
    hello = cr.parse_hello(frame.payload)
    assert hello.user_id == USER and cr.hello_tag_ok(keys, hello)
    welcome, h, es = cr.make_welcome(frame.body, keys)
    (answer,) = RealFrameDecoder().feed(welcome)
    client_keys = client.receive_welcome(answer.payload)
    return cr.session_keys(cr.x25519(es, hello.ec_public), keys, h), client_keys


def test_conformance_client_and_real_server_agree_on_keys() -> None:
    ours, theirs = conformance_client_handshake(new_user_keys())
    assert same_keys(ours, theirs)


def test_real_client_and_conformance_server_agree_on_keys() -> None:
    ours, theirs = conformance_server_handshake(new_user_keys())
    assert same_keys(ours, theirs)


def exchange(
    ours: cr.Direction,
    theirs: cr.Direction,
    real: Session,
    we_say: list[list[inner.InnerMessage]],
    real_says: list[list[inner.InnerMessage]],
) -> None:
    """Frames both ways, in turn: ``ours`` seals what we say and ``real`` opens it;
    ``real`` seals what it says and ``theirs`` opens it."""
    for sent, answered in zip(we_say, real_says, strict=True):
        plaintext = cr.encode_all([to_conformance(m) for m in sent])
        (to_real_side,) = RealFrameDecoder().feed(ours.seal_frame(plaintext))
        assert real.open(to_real_side.payload) == sent
        to_us = one_frame(real.seal(answered))
        assert to_us.type is cr.FrameType.SEALED
        assert [to_real(m) for m in cr.decode_inner(theirs.open_payload(to_us.payload))] == answered


def test_conformance_client_session_with_real_server() -> None:
    ours, theirs = conformance_client_handshake(new_user_keys())
    real = Session(theirs, "server", 65536)
    exchange(cr.Direction(ours.c2s), cr.Direction(ours.s2c), real, CLIENT_SAYS, SERVER_SAYS)


def test_real_client_session_with_conformance_server() -> None:
    ours, theirs = conformance_server_handshake(new_user_keys())
    real = Session(theirs, "client", 65536)
    exchange(cr.Direction(ours.s2c), cr.Direction(ours.c2s), real, SERVER_SAYS, CLIENT_SAYS)


def test_real_server_refuses_a_hello_under_other_keys() -> None:
    hello, _ = cr.make_hello(USER, new_user_keys())
    server = ServerHandshake()
    server.receive_hello(one_frame(hello).payload)
    with pytest.raises(HandshakeError) as refused:
        server.authenticate(UserRecord(USER, real_keys(new_user_keys())))
    assert refused.value.code is RealErrorCode.AUTH_FAILED


def test_a_low_order_ec_pub_is_auth_failed_and_refused() -> None:
    """A HELLO with a good tag and the all-zero point: X25519 gives all zeros."""
    keys, nonce, zero_point = new_user_keys(), os.urandom(32), bytes(32)
    tag = cr.hello_tag(keys, USER, nonce, zero_point)
    server = ServerHandshake()
    server.receive_hello(cr.u64(USER) + nonce + zero_point + tag)
    with pytest.raises(HandshakeError) as refused:
        server.authenticate(UserRecord(USER, real_keys(keys)))
    assert refused.value.code is RealErrorCode.AUTH_FAILED
    with pytest.raises(ValueError):
        cr.x25519(X25519PrivateKey.generate(), zero_point)


def test_real_client_refuses_a_welcome_under_other_keys() -> None:
    client = ClientHandshake(USER, real_keys(new_user_keys()))
    welcome, _, _ = cr.make_welcome(one_frame(client.hello_frame()).body, new_user_keys())
    with pytest.raises(HandshakeError) as refused:
        client.receive_welcome(one_frame(welcome).payload)
    assert refused.value.code is RealErrorCode.AUTH_FAILED


def test_conformance_client_refuses_a_welcome_for_another_hello() -> None:
    keys = new_user_keys()
    server = ServerHandshake()
    server.receive_hello(one_frame(cr.make_hello(USER, keys)[0]).payload)
    welcome, _ = server.authenticate(UserRecord(USER, real_keys(keys)))
    other_hello, _ = cr.make_hello(USER, keys)
    with pytest.raises(cr.HandshakeFailed):
        cr.check_welcome(other_hello[4:], keys, one_frame(welcome).payload)


def test_sealed_frames_out_of_order_are_refused_both_ways() -> None:
    ours, theirs = conformance_client_handshake(new_user_keys())
    client = cr.Direction(ours.c2s)
    client.seal_frame(cr.encode_all([cr.Inner(cr.Kind.PING, {"nonce": 1})]))  # seq 0, lost
    (frame,) = RealFrameDecoder().feed(client.seal_frame(cr.encode_all([cr.Inner(cr.Kind.INVITE)])))
    with pytest.raises(SessionError) as refused:
        Session(theirs, "server", 65536).open(frame.payload)
    assert refused.value.code is RealErrorCode.BAD_SESSION_FRAME
    server = Session(theirs, "server", 65536)
    server.seal([inner.Pong(1)])  # seq 0, lost
    with pytest.raises(cr.OpenError):
        cr.Direction(ours.s2c).open_payload(one_frame(server.seal([inner.Pong(2)])).payload)


@pytest.mark.parametrize("address", [None, "chat.example:7000", "tls:chat.example:7000"])
def test_real_tokens_parse(address: str | None) -> None:
    keys = new_user_keys()
    text = str(EnrollmentToken(USER, real_keys(keys), address))
    assert cr.parse_token(text) == cr.Token(USER, keys, address)
