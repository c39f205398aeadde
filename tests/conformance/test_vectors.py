"""The conformance implementation against tests/vectors/handshake.json (read, never copied)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from tests.conformance.protocol import (
    Direction,
    ErrorCode,
    FrameDecoder,
    FrameType,
    Keys,
    OpenError,
    check_welcome,
    decode_error_payload,
    decode_inner,
    encode_all,
    encode_error_frame,
    hello_tag_ok,
    make_hello,
    make_welcome,
    parse_hello,
    session_keys,
    x25519,
    x25519_public,
)

VECTORS = Path(__file__).resolve().parent.parent / "vectors" / "handshake.json"


@pytest.fixture(scope="module")
def vec() -> dict[str, Any]:
    return json.loads(VECTORS.read_text())


def raw(vec: dict[str, Any], name: str) -> bytes:
    return bytes.fromhex(vec[name])


def private(vec: dict[str, Any], name: str) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(raw(vec, name))


def user_keys(vec: dict[str, Any]) -> Keys:
    return Keys(raw(vec, "k_u_enc"), raw(vec, "k_u_auth"))


def direction_keys(vec: dict[str, Any], direction: str) -> Keys:
    return Keys(raw(vec, f"{direction}_enc"), raw(vec, f"{direction}_auth"))


def test_hello_and_welcome_frames(vec: dict[str, Any]) -> None:
    keys = user_keys(vec)
    hello, _ = make_hello(vec["user_id"], keys, raw(vec, "nc"), private(vec, "ec_private"))
    assert hello == raw(vec, "hello_frame")
    (frame,) = FrameDecoder().feed(hello)
    assert frame.type is FrameType.HELLO
    parsed = parse_hello(frame.payload)
    assert parsed.user_id == vec["user_id"] and hello_tag_ok(keys, parsed)
    welcome, h, _ = make_welcome(frame.body, keys, raw(vec, "ns"), private(vec, "es_private"))
    assert welcome == raw(vec, "welcome_frame")
    assert h == raw(vec, "transcript_hash")
    (answer,) = FrameDecoder().feed(welcome)
    assert check_welcome(hello[4:], keys, answer.payload) == (
        h,
        x25519_public(private(vec, "es_private")),
    )


def test_shared_secret_and_session_keys(vec: dict[str, Any]) -> None:
    ec, es = private(vec, "ec_private"), private(vec, "es_private")
    shared = x25519(ec, x25519_public(es))
    assert shared == x25519(es, x25519_public(ec)) == raw(vec, "shared_secret")
    keys = session_keys(shared, user_keys(vec), raw(vec, "transcript_hash"))
    assert keys.c2s == direction_keys(vec, "c2s") and keys.s2c == direction_keys(vec, "s2c")


@pytest.mark.parametrize("direction", ["c2s", "s2c"])
def test_sealed_frames(vec: dict[str, Any], direction: str) -> None:
    """Sealing each plaintext with the vector's IV gives the frame; opening gives it back."""
    keys = direction_keys(vec, direction)
    sealer, opener = Direction(keys), Direction(keys)
    frames = [bytes.fromhex(f) for f in vec[f"{direction}_frames"]]
    ivs = [bytes.fromhex(iv) for iv in vec[f"{direction}_ivs"]]
    plaintexts = [bytes.fromhex(p) for p in vec[f"{direction}_plaintexts"]]
    assert len(frames) == len(ivs) == len(plaintexts) >= 1
    for frame, iv, plaintext in zip(frames, ivs, plaintexts, strict=True):
        assert frame[14:30] == iv  # after length, version, type and seq
        assert sealer.seal_frame(plaintext, iv) == frame
        (decoded,) = FrameDecoder().feed(frame)
        assert decoded.type is FrameType.SEALED
        assert opener.open_payload(decoded.payload) == plaintext
        assert encode_all(decode_inner(plaintext)) == plaintext


def test_frames_open_only_in_order_and_direction(vec: dict[str, Any]) -> None:
    second = bytes.fromhex(vec["c2s_frames"][1])
    with pytest.raises(OpenError):
        Direction(direction_keys(vec, "c2s")).open_payload(second[6:])
    first = bytes.fromhex(vec["c2s_frames"][0])
    with pytest.raises(OpenError):
        Direction(direction_keys(vec, "s2c")).open_payload(first[6:])


def test_a_bad_hello_tag_gets_auth_failed(vec: dict[str, Any]) -> None:
    bad, good = raw(vec, "bad_tag_hello_frame"), raw(vec, "hello_frame")
    assert bad[:-1] == good[:-1] and bad[-1] == good[-1] ^ 1
    (frame,) = FrameDecoder().feed(bad)
    assert not hello_tag_ok(user_keys(vec), parse_hello(frame.payload))
    (error,) = FrameDecoder().feed(raw(vec, "auth_failed_frame"))
    assert error.type is FrameType.ERROR
    code, text = decode_error_payload(error.payload)
    assert code == ErrorCode.AUTH_FAILED
    assert encode_error_frame(code, text) == raw(vec, "auth_failed_frame")


def test_a_tampered_frame_does_not_open(vec: dict[str, Any]) -> None:
    tampered, frame = raw(vec, "tampered_c2s_frame"), bytes.fromhex(vec["c2s_frames"][0])
    flipped = [i for i in range(len(frame)) if frame[i] != tampered[i]]
    assert len(tampered) == len(frame) and len(flipped) == 1
    assert 30 <= flipped[0] < len(frame) - 16  # in the ciphertext
    with pytest.raises(OpenError):
        Direction(direction_keys(vec, "c2s")).open_payload(tampered[6:])
