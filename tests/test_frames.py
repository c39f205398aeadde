"""The outer frame codec and the inner message codec."""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable
from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from enclaves import inner
from enclaves.frames import (
    ErrorCode,
    Frame,
    FrameDecoder,
    FrameError,
    FrameTooLarge,
    FrameType,
    decode_error,
    encode_error,
    encode_frame,
)


def test_round_trip_byte_by_byte() -> None:
    wire = encode_frame(FrameType.HELLO, b"abc") + encode_frame(FrameType.SEALED, b"")
    assert wire[:4] == struct.pack(">I", 5) and wire[4:6] == b"\x01\x01"
    decoder = FrameDecoder(100)
    frames = []
    for i in range(len(wire)):
        frames += decoder.feed(wire[i : i + 1])
    assert frames == [Frame(FrameType.HELLO, b"abc"), Frame(FrameType.SEALED, b"")]
    assert frames[0].body == b"\x01\x01abc"
    assert decoder.buffered == 0


def test_oversize_refused_from_the_prefix_alone() -> None:
    decoder = FrameDecoder(1024)
    with pytest.raises(FrameTooLarge) as error:
        decoder.feed(struct.pack(">I", 1025))
    assert error.value.code is ErrorCode.FRAME_TOO_LARGE
    assert decoder.buffered == 0
    with pytest.raises(FrameTooLarge):
        decoder.feed(b"more")


def test_exact_limit_accepted() -> None:
    decoder = FrameDecoder(1024)
    frames = decoder.feed(encode_frame(FrameType.SEALED, bytes(1022)))
    assert len(frames) == 1 and len(frames[0].payload) == 1022


@pytest.mark.parametrize(
    "body",
    [b"", b"\x01", b"\x02\x01", b"\x01\x99", b"\x00\x10"],
    ids=["empty", "short", "version", "type", "version0"],
)
def test_malformed_bodies(body: bytes) -> None:
    with pytest.raises(FrameError) as error:
        FrameDecoder().feed(struct.pack(">I", len(body)) + body)
    assert error.value.code is ErrorCode.BAD_FRAME


def test_max_length_prefix() -> None:
    with pytest.raises(FrameTooLarge):
        FrameDecoder().feed(b"\xff\xff\xff\xff")


def test_error_payload() -> None:
    payload = encode_error(ErrorCode.AUTH_FAILED, "no")
    assert decode_error(payload) == (3, "no")
    assert len(encode_error(1, "é" * 2000)) <= 1026
    with pytest.raises(FrameError):
        decode_error(b"\x00")
    with pytest.raises(FrameError):
        decode_error(b"\x00\x01\xff")


@given(st.binary(max_size=600), st.integers(2, 300))
def test_decoder_never_raises_anything_else(data: bytes, limit: int) -> None:
    decoder = FrameDecoder(limit)
    try:
        decoder.feed(data[: len(data) // 2])
        decoder.feed(data[len(data) // 2 :])
    except FrameError:
        pass


_FRAME_LISTS = st.lists(
    st.tuples(st.sampled_from(list(FrameType)), st.binary(max_size=300)), max_size=6
)


@given(_FRAME_LISTS, st.lists(st.integers(0, 2000), max_size=12))
def test_any_split_gives_the_same_frames(
    frames: list[tuple[FrameType, bytes]], cuts: list[int]
) -> None:
    """However the stream is cut into reads, the same frames come out, in order,
    and ``buffered`` is what is left of an unfinished frame."""
    wire = b"".join(encode_frame(kind, payload) for kind, payload in frames)
    points = sorted({min(cut, len(wire)) for cut in cuts} | {0, len(wire)})
    decoder = FrameDecoder(400)
    out: list[Frame] = []
    for start, stop in itertools.pairwise(points):
        out += decoder.feed(bytearray(wire[start:stop]))
        done = sum(4 + 2 + len(frame.payload) for frame in out)
        assert decoder.buffered == stop - done
    assert out == [Frame(kind, payload) for kind, payload in frames]
    assert all(type(frame.payload) is bytes for frame in out)


def _outcome(decoder: FrameDecoder, reads: list[bytes]) -> tuple[Any, ...]:
    """What ``reads`` give: the frames, or the error's class and text; then
    whether the decoder still works (takes a good frame) afterwards."""
    try:
        result: Any = [frame for data in reads for frame in decoder.feed(data)]
    except FrameError as error:
        result = (type(error), str(error))
    try:
        after: Any = decoder.feed(encode_frame(FrameType.SEALED, b""))
    except FrameError as error:
        after = (type(error), str(error))
    return result, after


@given(
    st.integers(0, 3),
    st.integers(0, 255),
    st.binary(max_size=300),
    st.integers(0, 310),
    st.integers(2, 300),
    st.sampled_from([bytes, bytearray, memoryview]),
)
def test_one_whole_frame_in_one_read_is_decoded_as_byte_by_byte(
    version: int, type_byte: int, payload: bytes, size: int, limit: int, kind: Any
) -> None:
    """A read holding exactly one whole frame (the decoder's short path) gives
    what the same bytes give a byte at a time: the same frame, or the same
    error (a body shorter than its header, a bad version, an unknown type, a
    frame over the limit) with the decoder dead afterwards."""
    body = (bytes((version, type_byte)) + payload)[:size]
    wire = struct.pack(">I", len(body)) + body
    whole = _outcome(FrameDecoder(limit), [kind(wire)])
    trickled = _outcome(FrameDecoder(limit), [wire[i : i + 1] for i in range(len(wire))])
    assert whole == trickled


def test_one_whole_frame_over_the_limit_is_refused() -> None:
    decoder = FrameDecoder(100)
    with pytest.raises(FrameTooLarge):
        decoder.feed(encode_frame(FrameType.SEALED, bytes(99)))
    with pytest.raises(FrameTooLarge):
        decoder.feed(encode_frame(FrameType.SEALED, b""))


# -- inner messages -----------------------------------------------------------------

MSG_ID = bytes(range(16))
SAMPLES: list[inner.InnerMessage] = [
    inner.Send(MSG_ID, 7, b"blob"),
    inner.Deliver(MSG_ID, 2**64 - 1, b""),
    inner.Accepted(MSG_ID),
    inner.Received(MSG_ID),
    inner.Delivered(MSG_ID),
    inner.Rotate(bytes(32), bytes([1]) * 32),
    inner.Rotated(),
    inner.Directory((1, 2, 3)),
    inner.Directory(()),
    inner.Directory((4, 5), more=True),
    inner.Joined(5),
    inner.Removed(6),
    inner.Invite(),
    inner.InviteToken(9, 1234, "enclaves1:abc"),
    inner.Error(ErrorCode.QUOTA_EXCEEDED, MSG_ID, "full"),
    inner.Ping(1),
    inner.Pong(2),
]


def test_inner_round_trip() -> None:
    assert inner.decode_all(inner.encode_all(SAMPLES)) == SAMPLES
    assert {type(m) for m in SAMPLES} == set(inner.InnerMessage.__args__)  # type: ignore[attr-defined]


def test_inner_layout() -> None:
    assert inner.encode(inner.Accepted(MSG_ID)) == b"\x00\x00\x00\x11\x03" + MSG_ID
    assert inner.encode(inner.Send(MSG_ID, 7, b"x")) == (
        struct.pack(">I", 26) + b"\x01" + MSG_ID + struct.pack(">Q", 7) + b"x"
    )


def test_inner_unknown_kind() -> None:
    with pytest.raises(inner.InnerError) as error:
        inner.decode_all(b"\x00\x00\x00\x01\x77")
    assert error.value.code is ErrorCode.UNKNOWN_KIND


@pytest.mark.parametrize(
    "data",
    [b"", b"\x00\x00\x00\x00\x01", b"\x00\x00\x00\x05\x03", b"\x00\x00\x00\x02\x03\x00"],
)
def test_inner_malformed(data: bytes) -> None:
    with pytest.raises(inner.InnerError):
        inner.decode_all(data)


@given(
    st.sampled_from([inner.Send, inner.Deliver, inner.Accepted, inner.Received, inner.Delivered]),
    st.binary(min_size=16, max_size=16),
    st.integers(0, 2**64 - 1),
    st.binary(max_size=300),
)
def test_routed_kinds_take_a_short_path_to_the_same_bytes(
    cls: type, msg_id: bytes, peer: int, blob: bytes
) -> None:
    """encode/decode_all have inline paths for the routed kinds: same bytes both ways."""
    message = cls(msg_id, peer, blob) if cls in (inner.Send, inner.Deliver) else cls(msg_id)
    kind, fields = inner._fields(message)
    generic = struct.pack(">I", len(fields) + 1) + bytes((kind,)) + fields
    assert inner.encode(message) == generic
    decoded = inner.decode_all(generic + generic)
    assert decoded == [message, message]
    assert decoded[0] == inner._decode_one(kind, fields) and type(decoded[0]) is cls
    attrs.validate(decoded[0])  # built without running them, yet valid


def test_short_path_classes_need_nothing_but_their_slots() -> None:
    """decode_all builds the routed kinds by setting slots: that is only sound
    while attrs' __init__ does nothing else (no converter, no post-init)."""
    for cls in (inner.Send, inner.Deliver, inner.Accepted, inner.Received, inner.Delivered):
        assert not hasattr(cls, "__attrs_post_init__") and not hasattr(cls, "__attrs_pre_init__")
        assert all(a.converter is None and a.on_setattr is None for a in attrs.fields(cls))
        assert "__dict__" not in dir(cls) and cls.__slots__
    built = inner.checked_accepted(MSG_ID)
    assert built == inner.Accepted(MSG_ID) and type(built) is inner.Accepted
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        built.msg_id = MSG_ID  # type: ignore[misc]
    with pytest.raises(ValueError):
        inner.checked_accepted(b"short")  # struct would pad it on the wire
    # What skipping the validators skips: exactly these checks, which the
    # wire format (and the checked_accepted length test) already make.
    expected = {
        inner.Send: {"msg_id": inner._msg_id, "recipient": inner._user_id, "blob": None},
        inner.Deliver: {"msg_id": inner._msg_id, "sender": inner._user_id, "blob": None},
        inner.Accepted: {"msg_id": inner._msg_id},
        inner.Received: {"msg_id": inner._msg_id},
        inner.Delivered: {"msg_id": inner._msg_id},
    }
    for cls, validators in expected.items():
        assert {a.name: a.validator for a in attrs.fields(cls)} == validators
        assert not getattr(cls, "__attrs_cached_hash__", None) and cls.__hash__ is not None


@pytest.mark.parametrize(
    "data",
    [
        struct.pack(">IB", 24, 0x01) + bytes(23),  # SEND one byte short of msg_id + recipient
        struct.pack(">IB", 24, 0x02) + bytes(23),  # DELIVER likewise
        struct.pack(">IB", 18, 0x03) + bytes(17),  # ACCEPTED with a byte too many
        struct.pack(">IB", 16, 0x05) + bytes(15),  # DELIVERED with a byte too few
        struct.pack(">IB", 17, 0x04) + bytes(15),  # RECEIVED cut short by the end of data
    ],
)
def test_routed_kinds_of_the_wrong_size_are_refused(data: bytes) -> None:
    with pytest.raises(inner.InnerError):
        inner.decode_all(data)


@given(st.binary(max_size=400))
def test_inner_decoder_never_raises_anything_else(data: bytes) -> None:
    try:
        inner.decode_all(data)
    except inner.InnerError:
        pass


def _decoded_or_error(decode: Callable[[bytes], list[Any]], data: bytes) -> object:
    try:
        return decode(data)
    except inner.InnerError as error:
        return (error.code, str(error))


_FRAMES = st.one_of(
    st.lists(st.sampled_from(SAMPLES), min_size=1, max_size=10),
    # A recipient's acknowledgements: a frame of RECEIVEDs only.
    st.lists(st.binary(min_size=16, max_size=16).map(inner.Received), min_size=1, max_size=12),
).map(inner.encode_all)


def _damaged(frame: bytes, where: int, xor: int, cut: bool) -> bytes:
    """``frame`` cut short at, or with one byte changed at, ``where``."""
    where %= len(frame)
    if cut:
        return frame[:where]
    return frame[:where] + bytes((frame[where] ^ xor,)) + frame[where + 1 :]


@given(
    st.one_of(
        st.binary(max_size=400),
        _FRAMES,
        st.builds(_damaged, _FRAMES, st.integers(0, 10_000), st.integers(1, 255), st.booleans()),
    )
)
def test_the_servers_decoder_is_decode_all_with_plain_sends_and_receiveds(data: bytes) -> None:
    """decode_routed: the same messages, or the same error, as decode_all;
    SEND comes as (msg_id, recipient, blob), RECEIVED as its msg_id."""
    routed = _decoded_or_error(inner.decode_routed, data)
    full = _decoded_or_error(inner.decode_all, data)
    if isinstance(full, tuple):
        assert routed == full
        return
    assert isinstance(routed, list) and isinstance(full, list)
    assert [inner.routed_message(item) for item in routed] == full
    for item, message in zip(routed, full, strict=True):
        if isinstance(message, inner.Send):
            assert item == (message.msg_id, message.recipient, message.blob)
            assert type(item) is tuple
        elif isinstance(message, inner.Received):
            assert item == message.msg_id and type(item) is bytes
        else:
            assert type(item) is type(message)  # its own class


def test_the_servers_decoder_checks_every_head_byte_of_a_frame_of_receiveds() -> None:
    """Its frame-of-RECEIVEDs path: every single-bit change anywhere in such
    a frame gives what decode_all gives (the same error, or other messages)."""
    frame = inner.encode_all([inner.Received(bytes([i]) * 16) for i in range(3)])
    for where in range(len(frame)):
        for bit in range(8):
            data = _damaged(frame, where, 1 << bit, cut=False)
            routed = _decoded_or_error(inner.decode_routed, data)
            full = _decoded_or_error(inner.decode_all, data)
            if isinstance(full, tuple):
                assert routed == full, (where, bit)
            else:
                assert isinstance(routed, list)
                assert [inner.routed_message(item) for item in routed] == full


def test_routed_send_and_message_build_valid_messages() -> None:
    send = inner.routed_send((MSG_ID, 7, b"blob"))
    assert send == inner.Send(MSG_ID, 7, b"blob") and type(send) is inner.Send
    attrs.validate(send)
    received = inner.routed_message(MSG_ID)
    assert received == inner.Received(MSG_ID) and type(received) is inner.Received
    ping = inner.Ping(3)
    assert inner.routed_message(ping) is ping


@given(st.lists(st.sampled_from(SAMPLES), min_size=1, max_size=10))
def test_inner_coalesced(messages: list[inner.InnerMessage]) -> None:
    assert inner.decode_all(inner.encode_all(messages)) == messages


def test_directory_layout_and_flags() -> None:
    assert inner.encode(inner.Directory((1,), more=True)) == (
        struct.pack(">IB", 14, 0x08) + b"\x01" + struct.pack(">IQ", 1, 1)
    )
    assert inner.encode(inner.Directory(())) == struct.pack(">IBBI", 6, 0x08, 0, 0)
    with pytest.raises(inner.InnerError):
        inner.decode_all(struct.pack(">IBBI", 6, 0x08, 2, 0))  # unknown flag bit


@pytest.mark.parametrize("count", [0, 1, 119, 120, 5000])
def test_split_directory_parts_fit_and_join(count: int) -> None:
    from enclaves.session import max_inner_size

    ids = tuple(range(1, count + 1))
    limit = max_inner_size(1024)
    parts = inner.split_directory(ids, limit)
    assert all(len(inner.encode(p)) <= limit for p in parts)
    assert [p.more for p in parts] == [True] * (len(parts) - 1) + [False]
    assert tuple(i for p in parts for i in p.user_ids) == ids


def test_inner_error_text_is_cut_on_a_character_boundary() -> None:
    text = "a" + "é" * 600  # 1201 bytes; byte 1024 falls inside an "é"
    (decoded,) = inner.decode_all(inner.encode(inner.Error(5, bytes(16), text)))
    assert isinstance(decoded, inner.Error)
    assert decoded.text == text[:512] and len(decoded.text.encode()) == 1023


@given(
    msg_id=st.binary(min_size=16, max_size=16),
    sender=st.integers(0, 2**64 - 1),
    blob=st.binary(max_size=300),
)
def test_the_routers_encoded_messages_are_the_encoders_bytes(
    msg_id: bytes, sender: int, blob: bytes
) -> None:
    """The router queues DELIVER and a live delivery's receipts as bytes,
    built without the message objects: the same bytes ``encode`` makes."""
    assert inner.encoded_deliver(msg_id, sender, blob) == inner.encode(
        inner.Deliver(msg_id, sender, blob)
    )
    assert inner.encoded_accepted_delivered(msg_id) == inner.encode(
        inner.Accepted(msg_id)
    ) + inner.encode(inner.Delivered(msg_id))
    assert inner.decode_all(inner.encoded_accepted_delivered(msg_id)) == [
        inner.Accepted(msg_id),
        inner.Delivered(msg_id),
    ]


@pytest.mark.parametrize("msg_id", [b"", b"short", MSG_ID + b"x"])
def test_the_routers_encoders_refuse_a_msg_id_that_is_not_16_bytes(msg_id: bytes) -> None:
    # struct would pad or cut it on the wire without a word.
    with pytest.raises(ValueError):
        inner.encoded_deliver(msg_id, 7, b"blob")
    with pytest.raises(ValueError):
        inner.encoded_accepted_delivered(msg_id)
