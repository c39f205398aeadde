"""MESSAGE sealing, sender/recipient binding, the replay window and the blob parser."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enclaves.client.blob import (
    ACCEPT_SIZE,
    OFFER_SIZE,
    Accept,
    BlobError,
    MessageBlob,
    Offer,
    parse_blob,
)
from enclaves.client.e2e import (
    WINDOW,
    ContentType,
    Plaintext,
    ReplayError,
    ReplayWindow,
    message_aad,
    open_message,
    seal_message,
)
from enclaves.crypto import CryptoError, KeyPair, Sealer

A, B = 1001, 2002
SEALER = Sealer(KeyPair(bytes(range(32)), bytes(range(32, 64))))


def _seal(text: bytes = b"hello", epoch: int = 1, counter: int = 1) -> bytes:
    return seal_message(SEALER, epoch, A, B, Plaintext(ContentType.TEXT, counter, 1234, text))


def _open(blob: bytes, sender: int = A, recipient: int = B) -> Plaintext:
    parsed = parse_blob(blob)
    assert isinstance(parsed, MessageBlob)
    return open_message(SEALER, parsed, sender, recipient)


def test_layout_and_round_trip() -> None:
    blob = _seal(b"hi there", epoch=7, counter=42)
    assert blob[0] == 0x01 and blob[1:5] == (7).to_bytes(4, "big")
    plain = _open(blob)
    assert plain == Plaintext(ContentType.TEXT, 42, 1234, b"hi there")


def test_aad_layout() -> None:
    assert message_aad(7, A, B) == (
        b"enclaves/v1/e2e\x01"
        + (7).to_bytes(4, "big")
        + A.to_bytes(8, "big")
        + B.to_bytes(8, "big")
    )


def test_reflection_fails() -> None:
    """A's message to B, sent back to A as if from B, does not open."""
    blob = _seal()
    with pytest.raises(CryptoError):
        _open(blob, sender=B, recipient=A)
    with pytest.raises(CryptoError):
        _open(blob, sender=A, recipient=3003)


def test_epoch_is_bound() -> None:
    blob = bytearray(_seal(epoch=1))
    blob[4] = 2
    with pytest.raises(CryptoError):
        _open(bytes(blob))


def test_every_single_bit_flip_is_rejected() -> None:
    blob = _seal(b"a short message")
    for bit in range(len(blob) * 8):
        flipped = bytearray(blob)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises((BlobError, CryptoError)):
            _open(bytes(flipped))


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 2**32 - 1), st.data())
def test_bit_flips_rejected_hypothesis(body: bytes, epoch: int, data: st.DataObject) -> None:
    blob = seal_message(SEALER, epoch, A, B, Plaintext(1, 5, 6, body))
    assert _open(blob).body == body
    bit = data.draw(st.integers(0, len(blob) * 8 - 1))
    flipped = bytearray(blob)
    flipped[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises((BlobError, CryptoError)):
        _open(bytes(flipped))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=1400))
def test_parser_never_crashes(data: bytes) -> None:
    try:
        parse_blob(data)
    except BlobError:
        pass


@settings(max_examples=100, deadline=None)
@given(st.sampled_from([1, 2, 3]), st.binary(min_size=0, max_size=1300))
def test_parser_with_valid_kind_bytes(kind: int, rest: bytes) -> None:
    try:
        blob = parse_blob(bytes([kind]) + rest)
    except BlobError:
        return
    assert blob.to_bytes() == bytes([kind]) + rest


def test_parser_sizes() -> None:
    offer = Offer(1, bytes(32), bytes(32), bytes(1184))
    accept = Accept(1, bytes(32), bytes(32), bytes(1088), bytes(16))
    assert parse_blob(offer.to_bytes()) == offer
    assert parse_blob(accept.to_bytes()) == accept
    assert len(offer.to_bytes()) == OFFER_SIZE and len(accept.to_bytes()) == ACCEPT_SIZE
    for bad in (offer.to_bytes()[:-1], accept.to_bytes() + b"x", b"\x04" + bytes(60), b"", b"\x01"):
        with pytest.raises(BlobError):
            parse_blob(bad)


# -- replay window ----------------------------------------------------------------


def test_window_in_order_and_repeats() -> None:
    w = ReplayWindow()
    for n in range(1, 200):
        w = w.accept(n)
        with pytest.raises(ReplayError):
            w.accept(n)
    assert w.highest == 199


def test_window_out_of_order_within_64() -> None:
    w = ReplayWindow().accept(100)
    for n in (99, 37, 50, 98):
        w = w.accept(n)
    for n in (99, 37, 100):
        with pytest.raises(ReplayError):
            w.accept(n)
    with pytest.raises(ReplayError):
        w.accept(100 - WINDOW)  # just outside
    w.accept(100 - WINDOW + 2)  # inside, unseen


def test_window_big_jump_forgets_old_bits() -> None:
    w = ReplayWindow().accept(1).accept(2).accept(1000)
    assert w.bitmap == 1
    with pytest.raises(ReplayError):
        w.accept(2)
    w.accept(999)


def test_window_zero_refused() -> None:
    with pytest.raises(ReplayError):
        ReplayWindow().accept(0)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 300), max_size=80))
def test_window_matches_a_model(counters: list[int]) -> None:
    """Accept exactly the first copy of each counter not older than the window."""
    w, seen, highest = ReplayWindow(), set(), 0
    for n in counters:
        expect = n not in seen and n > highest - WINDOW
        try:
            w = w.accept(n)
            accepted = True
        except ReplayError:
            accepted = False
        assert accepted == expect
        if accepted:
            seen.add(n)
            highest = max(highest, n)
