"""Inner messages and frames: the conformance codec and the real one give and take
the same bytes (hypothesis)."""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enclaves import frames, inner
from tests.conformance import protocol as cr
from tests.conformance.bridge import to_real

MSG_IDS = st.binary(min_size=16, max_size=16)
U64 = st.integers(0, 2**64 - 1)
BLOBS = st.binary(max_size=300)
KEYS = st.binary(min_size=32, max_size=32)
SHORT_TEXT = st.text(max_size=200)  # at most 800 bytes of UTF-8: never cut
# The first text drawn in a fresh checkout builds hypothesis's Unicode cache (seconds).
TEXT_DRAWN = settings(suppress_health_check=[HealthCheck.too_slow])


def _message(kind: cr.Kind, **fields: st.SearchStrategy[object]) -> st.SearchStrategy[cr.Inner]:
    return st.fixed_dictionaries(fields).map(lambda values: cr.Inner(kind, values))


MESSAGES: dict[cr.Kind, st.SearchStrategy[cr.Inner]] = {
    cr.Kind.SEND: _message(cr.Kind.SEND, msg_id=MSG_IDS, recipient=U64, blob=BLOBS),
    cr.Kind.DELIVER: _message(cr.Kind.DELIVER, msg_id=MSG_IDS, sender=U64, blob=BLOBS),
    cr.Kind.ACCEPTED: _message(cr.Kind.ACCEPTED, msg_id=MSG_IDS),
    cr.Kind.RECEIVED: _message(cr.Kind.RECEIVED, msg_id=MSG_IDS),
    cr.Kind.DELIVERED: _message(cr.Kind.DELIVERED, msg_id=MSG_IDS),
    cr.Kind.ROTATE: _message(cr.Kind.ROTATE, enc=KEYS, auth=KEYS).filter(
        lambda m: m.fields["enc"] != m.fields["auth"]  # "its two keys must differ"
    ),
    cr.Kind.ROTATED: _message(cr.Kind.ROTATED),
    cr.Kind.DIRECTORY: _message(
        cr.Kind.DIRECTORY,
        user_ids=st.lists(U64, unique=True, max_size=40).map(lambda ids: tuple(sorted(ids))),
        more=st.booleans(),
    ),
    cr.Kind.JOINED: _message(cr.Kind.JOINED, user_id=U64),
    cr.Kind.REMOVED: _message(cr.Kind.REMOVED, user_id=U64),
    cr.Kind.INVITE: _message(cr.Kind.INVITE),
    cr.Kind.INVITE_TOKEN: _message(
        cr.Kind.INVITE_TOKEN, user_id=U64, expires_ms=U64, token=SHORT_TEXT
    ),
    cr.Kind.ERROR: _message(
        cr.Kind.ERROR, code=st.integers(0, 0xFFFF), msg_id=MSG_IDS, text=SHORT_TEXT
    ),
    cr.Kind.PING: _message(cr.Kind.PING, nonce=U64),
    cr.Kind.PONG: _message(cr.Kind.PONG, nonce=U64),
}


def test_both_implementations_know_the_same_kinds_and_codes() -> None:
    assert set(MESSAGES) == set(cr.Kind)
    assert {k.name: k.value for k in cr.Kind} == {k.name: k.value for k in inner.Kind}
    assert {c.name: c.value for c in cr.ErrorCode} == {c.name: c.value for c in frames.ErrorCode}
    assert {t.name: t.value for t in cr.FrameType} == {t.name: t.value for t in frames.FrameType}


@TEXT_DRAWN
@given(st.sampled_from(list(cr.Kind)).flatmap(MESSAGES.__getitem__))
def test_every_kind_encodes_to_the_same_bytes(message: cr.Inner) -> None:
    real = to_real(message)
    assert cr.encode_inner(message) == inner.encode(real)
    assert inner.decode_all(cr.encode_inner(message)) == [real]
    assert cr.decode_inner(inner.encode(real)) == [message]


@TEXT_DRAWN
@given(st.lists(st.one_of(*MESSAGES.values()), min_size=1, max_size=8))
def test_coalesced_messages_decode_both_ways(messages: list[cr.Inner]) -> None:
    real = [to_real(m) for m in messages]
    assert inner.decode_all(cr.encode_all(messages)) == real
    assert cr.decode_inner(inner.encode_all(real)) == messages


@TEXT_DRAWN
@given(st.text(min_size=200, max_size=700), st.integers(0, 0xFFFF))
def test_long_error_texts_are_cut_alike(text: str, code: int) -> None:
    """Inner and frame ERROR texts: at most 1024 bytes, cut on a character boundary."""
    message = cr.Inner(cr.Kind.ERROR, {"code": code, "msg_id": bytes(16), "text": text})
    wire = cr.encode_inner(message)
    assert wire == inner.encode(to_real(message))
    (decoded,) = cr.decode_inner(wire)
    assert text.startswith(decoded.fields["text"]) and len(wire) <= 4 + 1 + 18 + 1024
    real_frame = frames.encode_frame(frames.FrameType.ERROR, frames.encode_error(code, text))
    assert cr.encode_error_frame(code, text) == real_frame


def _outcome_conformance(plaintext: bytes) -> object:
    try:
        return [to_real(m) for m in cr.decode_inner(plaintext)]
    except cr.InnerError as error:
        return int(error.code)


def _outcome_real(plaintext: bytes) -> object:
    try:
        return inner.decode_all(plaintext)
    except inner.InnerError as error:
        return int(error.code)


@st.composite
def near_misses(draw: st.DrawFn) -> bytes:
    """A valid message with perhaps another kind byte, a byte or two cut from or
    added to its fields, and its length field off by one."""
    wire = cr.encode_inner(draw(st.one_of(*MESSAGES.values())))
    kind = draw(st.one_of(st.just(wire[4]), st.integers(0, 20)))
    fields = wire[5 : len(wire) - draw(st.integers(0, 2))] + draw(st.binary(max_size=2))
    size = 1 + len(fields) + draw(st.sampled_from([0, 0, 0, -1, 1]))
    return struct.pack(">IB", max(size, 0), kind) + fields


@TEXT_DRAWN
@given(st.lists(near_misses(), max_size=4), st.binary(max_size=6))
def test_both_decoders_accept_and_refuse_alike(messages: list[bytes], tail: bytes) -> None:
    """The same messages, or the same error code (BAD_MESSAGE, UNKNOWN_KIND)."""
    plaintext = b"".join(messages) + tail
    assert _outcome_conformance(plaintext) == _outcome_real(plaintext)


def _frames_conformance(data: bytes, limit: int) -> object:
    try:
        return [(f.type, f.payload) for f in cr.FrameDecoder(limit).feed(data)]
    except cr.FrameError as error:
        return int(error.code)


def _frames_real(data: bytes, limit: int) -> object:
    try:
        return [(f.type, f.payload) for f in frames.FrameDecoder(limit).feed(data)]
    except frames.FrameError as error:
        return int(error.code)


FRAME_PIECES = st.tuples(st.integers(0, 3), st.sampled_from([0, 1, 2, 3, 0x10, 0x11]), BLOBS)


@given(st.lists(FRAME_PIECES, max_size=4), st.binary(max_size=8), st.integers(2, 400))
def test_both_frame_decoders_accept_and_refuse_alike(
    pieces: list[tuple[int, int, bytes]], tail: bytes, limit: int
) -> None:
    """Frames of any version (0 to 3) and type, some over the limit: the same frames
    or the same error code (BAD_FRAME, FRAME_TOO_LARGE)."""
    data = b"".join(
        struct.pack(">IBB", 2 + len(payload), version, kind) + payload
        for version, kind, payload in pieces
    )
    data += tail
    assert _frames_conformance(data, limit) == _frames_real(data, limit)
