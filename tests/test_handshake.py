"""Handshake and sealed-session machines against the committed byte vectors."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from enclaves import inner
from enclaves.crypto import KeyPair, cmac_tag, hkdf_sha256, sha256
from enclaves.frames import (
    MAX_FRAME,
    ErrorCode,
    FrameDecoder,
    FrameType,
    encode_error,
    encode_frame,
)
from enclaves.handshake import (
    AUTH_FAILED_TEXT,
    ClientHandshake,
    HandshakeError,
    ServerHandshake,
    SessionKeys,
)
from enclaves.session import Session, SessionError, max_blob_size, max_inner_size
from enclaves.storage.interface import UserRecord

VECTORS = Path(__file__).resolve().parent / "vectors" / "handshake.json"


@pytest.fixture(scope="module")
def vec() -> dict[str, Any]:
    return json.loads(VECTORS.read_text())


def _h(vec: dict[str, Any], name: str) -> bytes:
    return bytes.fromhex(vec[name])


def _k_u(vec: dict[str, Any]) -> KeyPair:
    return KeyPair(_h(vec, "k_u_enc"), _h(vec, "k_u_auth"))


def _keys(vec: dict[str, Any]) -> SessionKeys:
    return SessionKeys(
        KeyPair(_h(vec, "c2s_enc"), _h(vec, "c2s_auth")),
        KeyPair(_h(vec, "s2c_enc"), _h(vec, "s2c_auth")),
    )


def test_vectors_follow_the_spec_formulas(vec: dict[str, Any]) -> None:
    """Recompute every vector from docs/protocol.rst with raw primitives."""
    k_u, uid = _k_u(vec), struct.pack(">Q", vec["user_id"])
    ec = X25519PrivateKey.from_private_bytes(_h(vec, "ec_private"))
    es = X25519PrivateKey.from_private_bytes(_h(vec, "es_private"))
    ec_pub, es_pub = ec.public_key().public_bytes_raw(), es.public_key().public_bytes_raw()
    head = uid + _h(vec, "nc") + ec_pub
    hello_body = b"\x01\x01" + head + cmac_tag(k_u.auth, b"enclaves/v1/hello" + head)
    assert _h(vec, "hello_frame") == struct.pack(">I", 90) + hello_body
    transcript = sha256(hello_body + _h(vec, "ns") + es_pub)
    welcome = _h(vec, "ns") + es_pub + cmac_tag(k_u.auth, b"enclaves/v1/welcome" + transcript)
    assert _h(vec, "welcome_frame") == struct.pack(">I", 82) + b"\x01\x02" + welcome
    okm = hkdf_sha256(
        ec.exchange(es.public_key()) + k_u.enc + k_u.auth, transcript, b"enclaves/v1/session", 128
    )
    assert okm == b"".join(_h(vec, n) for n in ("c2s_enc", "c2s_auth", "s2c_enc", "s2c_auth"))
    assert _h(vec, "shared_secret") == ec.exchange(es.public_key())
    assert _h(vec, "transcript_hash") == transcript
    # The IV of each sealed frame sits after length, version, type and seq.
    for frames, ivs in (("c2s_frames", "c2s_ivs"), ("s2c_frames", "s2c_ivs")):
        assert [bytes.fromhex(f)[14:30].hex() for f in vec[frames]] == vec[ivs]


def test_negative_vectors(vec: dict[str, Any]) -> None:
    """A flipped HELLO tag gets exactly the vector's ERROR frame; a flipped
    ciphertext bit does not open."""
    hello, bad = _h(vec, "hello_frame"), _h(vec, "bad_tag_hello_frame")
    assert len(bad) == len(hello) and bad[:-1] == hello[:-1] and bad[-1] == hello[-1] ^ 1
    server = ServerHandshake(nonce=_h(vec, "ns"), ephemeral=_h(vec, "es_private"))
    server.receive_hello(bad[6:])
    with pytest.raises(HandshakeError) as refused:
        server.authenticate(UserRecord(vec["user_id"], _k_u(vec)))
    error = refused.value
    assert encode_frame(FrameType.ERROR, encode_error(error.code, error.text)) == _h(
        vec, "auth_failed_frame"
    )
    (frame,) = FrameDecoder().feed(_h(vec, "tampered_c2s_frame"))
    with pytest.raises(SessionError):
        Session(_keys(vec), "server", 65536).open(frame.payload)


def test_machines_reproduce_the_vectors(vec: dict[str, Any]) -> None:
    k_u = _k_u(vec)
    client = ClientHandshake(
        vec["user_id"], k_u, nonce=_h(vec, "nc"), ephemeral=_h(vec, "ec_private")
    )
    assert client.hello_frame() == _h(vec, "hello_frame")
    server = ServerHandshake(nonce=_h(vec, "ns"), ephemeral=_h(vec, "es_private"))
    assert server.receive_hello(_h(vec, "hello_frame")[6:]) == vec["user_id"]
    welcome, server_keys = server.authenticate(UserRecord(vec["user_id"], k_u))
    assert welcome == _h(vec, "welcome_frame")
    assert server_keys == _keys(vec)
    assert client.receive_welcome(welcome[6:]) == _keys(vec)


def test_sessions_open_the_vector_frames(vec: dict[str, Any]) -> None:
    server = Session(_keys(vec), "server", 65536)
    client = Session(_keys(vec), "client", 65536)
    for frame_hex, plain_hex in zip(vec["c2s_frames"], vec["c2s_plaintexts"], strict=True):
        (frame,) = FrameDecoder().feed(bytes.fromhex(frame_hex))
        assert frame.type is FrameType.SEALED
        assert server.open(frame.payload) == inner.decode_all(bytes.fromhex(plain_hex))
    (frame,) = FrameDecoder().feed(bytes.fromhex(vec["s2c_frames"][0]))
    assert client.open(frame.payload) == inner.decode_all(bytes.fromhex(vec["s2c_plaintexts"][0]))
    # A server must not open its own direction's frames.
    with pytest.raises(SessionError):
        Session(_keys(vec), "server", 65536).open(frame.payload)


def _pair() -> tuple[ClientHandshake, ServerHandshake, UserRecord]:
    keys = KeyPair.generate()
    return ClientHandshake(42, keys), ServerHandshake(), UserRecord(42, keys)


def test_unknown_user_and_bad_tag_are_indistinguishable() -> None:
    client, server, _record = _pair()
    server.receive_hello(client.hello_payload())
    with pytest.raises(HandshakeError) as unknown:
        server.authenticate(None)
    other = ServerHandshake()
    other.receive_hello(client.hello_payload())
    with pytest.raises(HandshakeError) as bad_tag:
        other.authenticate(UserRecord(42, KeyPair.generate()))
    assert (unknown.value.code, str(unknown.value)) == (bad_tag.value.code, str(bad_tag.value))
    assert unknown.value.code is ErrorCode.AUTH_FAILED and str(unknown.value) == AUTH_FAILED_TEXT


def test_record_for_another_id_is_refused() -> None:
    client, server, record = _pair()
    server.receive_hello(client.hello_payload())
    with pytest.raises(HandshakeError):
        server.authenticate(UserRecord(43, record.keys))


def test_wrong_sizes_and_replays_of_the_steps() -> None:
    client, server, record = _pair()
    with pytest.raises(HandshakeError) as error:
        server.receive_hello(client.hello_payload()[:-1])
    assert error.value.code is ErrorCode.BAD_FRAME
    server.receive_hello(client.hello_payload())
    with pytest.raises(HandshakeError):
        server.receive_hello(client.hello_payload())
    welcome, keys = server.authenticate(record)
    with pytest.raises(HandshakeError):
        server.authenticate(record)
    with pytest.raises(HandshakeError):
        client.receive_welcome(welcome[6:-1])
    assert client.receive_welcome(welcome[6:]) == keys
    with pytest.raises(HandshakeError):
        client.receive_welcome(welcome[6:])


def test_low_order_ephemeral_is_refused_after_the_tag() -> None:
    keys = KeyPair.generate()
    head = struct.pack(">Q", 42) + bytes(32) + bytes(32)  # all-zero public key
    server = ServerHandshake()
    server.receive_hello(head + cmac_tag(keys.auth, b"enclaves/v1/hello" + head))
    with pytest.raises(HandshakeError) as error:
        server.authenticate(UserRecord(42, keys))
    assert error.value.code is ErrorCode.AUTH_FAILED


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 88 * 8 - 1))
def test_every_hello_bit_flip_is_refused(bit: int) -> None:
    client, server, record = _pair()
    hello = bytearray(client.hello_payload())
    hello[bit // 8] ^= 1 << (bit % 8)
    server.receive_hello(bytes(hello))
    with pytest.raises(HandshakeError):
        server.authenticate(record)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 80 * 8 - 1))
def test_every_welcome_bit_flip_is_refused(bit: int) -> None:
    client, server, record = _pair()
    server.receive_hello(client.hello_payload())
    welcome = bytearray(server.authenticate(record)[0][6:])
    welcome[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(HandshakeError):
        client.receive_welcome(bytes(welcome))


@given(st.binary(max_size=200))
def test_server_hello_never_crashes(data: bytes) -> None:
    server = ServerHandshake()
    try:
        server.receive_hello(data)
        server.authenticate(None)
    except HandshakeError:
        pass


@given(st.binary(max_size=200))
def test_client_welcome_never_crashes(data: bytes) -> None:
    client = ClientHandshake(1, KeyPair.generate())
    client.hello_payload()
    with pytest.raises(HandshakeError):
        client.receive_welcome(data)


# -- sessions ---------------------------------------------------------------------


def _sessions(max_frame: int = 65536) -> tuple[Session, Session]:
    keys = SessionKeys(KeyPair.generate(), KeyPair.generate())
    return Session(keys, "client", max_frame), Session(keys, "server", max_frame)


def _payloads(wire: bytes, max_frame: int = 65536) -> list[bytes]:
    return [frame.payload for frame in FrameDecoder(max_frame).feed(wire)]


def test_coalescing_within_the_frame_limit() -> None:
    client, server = _sessions(1024)
    messages = [inner.Send(bytes([i]) * 16, 7, bytes(100)) for i in range(30)]
    payloads = _payloads(client.seal(messages), 1024)
    assert 1 < len(payloads) < 30
    received = [m for p in payloads for m in server.open(p)]
    assert received == messages
    big = inner.Send(bytes(16), 7, bytes(max_blob_size(1024)))
    assert server.open(_payloads(client.seal([big]), 1024)[0]) == [big]
    assert max_inner_size(1024) % 16 == 15


def test_a_message_above_the_send_limit_goes_alone_within_the_protocol_limit() -> None:
    """``max_frame`` bounds coalescing; one message larger than it (a server's
    stored message accepted under a larger --max-frame) is sealed alone in a
    frame of at most MAX_FRAME, never with others; beyond MAX_FRAME nothing is
    sealed and no sequence number is spent."""
    client, server = _sessions(4096)
    small = [inner.Send(bytes([i]) * 16, 7, bytes(1000)) for i in range(3)]
    big = inner.Send(bytes(16), 7, bytes(max_blob_size(4096) + 1))
    wire = client.seal([*small, big, *small])
    sizes = [len(p) + 2 for p in _payloads(wire, MAX_FRAME)]  # + version and type
    assert len(sizes) == 3 and sizes[1] > 4096 >= max(sizes[0], sizes[2])
    assert [m for p in _payloads(wire, MAX_FRAME) for m in server.open(p)] == [*small, big, *small]
    largest = inner.Send(bytes(16), 7, bytes(max_blob_size(MAX_FRAME)))
    (payload,) = _payloads(client.seal([largest]), MAX_FRAME)
    assert server.open(payload) == [largest]
    with pytest.raises(ValueError):
        client.seal([*small, inner.Send(bytes(16), 7, bytes(max_blob_size(MAX_FRAME) + 1))])
    ping = client.seal([inner.Ping(1)])
    assert server.open(_payloads(ping)[0]) == [inner.Ping(1)]  # no seq spent above
    with pytest.raises(ValueError):
        _sessions(MAX_FRAME + 1)


def test_replay_reorder_and_forgery_end_the_session() -> None:
    client, server = _sessions()
    first, second = (_payloads(client.seal([inner.Ping(n)]))[0] for n in range(2))
    with pytest.raises(SessionError) as reorder:
        server.open(second)
    assert reorder.value.code is ErrorCode.BAD_SESSION_FRAME
    client, server = _sessions()
    first = _payloads(client.seal([inner.Ping(1)]))[0]
    assert server.open(first) == [inner.Ping(1)]
    with pytest.raises(SessionError):
        server.open(first)  # replay
    client, server = _sessions()
    frame = bytearray(_payloads(client.seal([inner.Ping(1)]))[0])
    frame[-1] ^= 1
    with pytest.raises(SessionError):
        server.open(bytes(frame))


def test_unknown_kind_and_malformed_inner() -> None:
    client, server = _sessions()
    wire = client.seal_frame(struct.pack(">IB", 1, 0x7F))
    with pytest.raises(SessionError) as error:
        server.open(_payloads(wire)[0])
    assert error.value.code is ErrorCode.UNKNOWN_KIND
    client, server = _sessions()
    with pytest.raises(SessionError) as error:
        server.open(_payloads(client.seal_frame(b"\x00\x00"))[0])
    assert error.value.code is ErrorCode.BAD_MESSAGE


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_every_sealed_bit_flip_is_refused(data: st.DataObject) -> None:
    client, server = _sessions()
    payload = bytearray(_payloads(client.seal([inner.Ping(5), inner.Received(bytes(16))]))[0])
    bit = data.draw(st.integers(0, len(payload) * 8 - 1))
    payload[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(SessionError):
        server.open(bytes(payload))


@given(st.binary(max_size=300))
def test_session_open_never_crashes(data: bytes) -> None:
    _client, server = _sessions()
    with pytest.raises(SessionError):
        server.open(data)
