"""The FrameDecoder of 2026-12-07 against the one it replaced (f5ff187).

Written by that day's review.

1. Differential: on any byte stream cut anywhere, the same frames, the same
   errors (class and text) and the same ``buffered`` after every feed.
2. Memory: a frame that trickles in a byte per read.
"""

from __future__ import annotations

import itertools
import struct
import tracemalloc

from hypothesis import given, settings
from hypothesis import strategies as st

from enclaves.frames import (
    MAX_FRAME,
    FrameDecoder,
    FrameError,
    FrameTooLarge,
    FrameType,
    decode_body,
    encode_frame,
)

_HEADER = struct.Struct(">I")


class OldFrameDecoder:
    """enclaves/frames.py FrameDecoder as of f5ff187, verbatim."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        if max_frame < 2:
            raise ValueError("max_frame must allow at least a header")
        self.max_frame = max_frame
        self._buffer = bytearray()
        self._failed: FrameError | None = None

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> list:
        if self._failed is not None:
            raise self._failed
        buffer = self._buffer
        buffer += data
        frames: list = []
        offset = 0
        try:
            while len(buffer) - offset >= 4:
                (size,) = _HEADER.unpack_from(buffer, offset)
                if size > self.max_frame:
                    raise FrameTooLarge(
                        f"frame of {size} bytes exceeds the limit of {self.max_frame}"
                    )
                end = offset + 4 + size
                if len(buffer) < end:
                    break
                frames.append(decode_body(bytes(buffer[offset + 4 : end])))
                offset = end
        except FrameError as error:
            self._failed = error
            self._buffer = bytearray()
            raise
        if offset:
            del buffer[:offset]
        return frames


def _outcome(decoder: object, data: bytes) -> object:
    try:
        return ("frames", [(f.type, f.payload) for f in decoder.feed(data)])  # type: ignore[attr-defined]
    except FrameError as error:
        return ("error", type(error), str(error), error.code)


# A piece of wire: a valid frame, a frame with a bad version or type, one of
# size 0 or 1, an oversize length prefix, or raw bytes.
_PIECES = st.one_of(
    st.tuples(st.sampled_from(list(FrameType)), st.binary(max_size=120)).map(
        lambda t: encode_frame(*t)
    ),
    st.tuples(st.integers(0, 3), st.integers(0, 0x20), st.binary(max_size=40)).map(
        lambda t: struct.pack(">IBB", 2 + len(t[2]), t[0], t[1]) + t[2]
    ),
    st.sampled_from([struct.pack(">I", 0), struct.pack(">I", 1) + b"\x01"]),
    st.integers(0, 2**32 - 1).map(lambda n: struct.pack(">I", n)),
    st.binary(max_size=8),
)


@settings(max_examples=3000, deadline=None)
@given(
    st.lists(_PIECES, max_size=8),
    st.lists(st.integers(0, 1200), max_size=16),
    st.sampled_from([2, 3, 10, 60, 130, 400, MAX_FRAME]),
)
def test_new_decoder_matches_the_old_one_on_every_split(
    pieces: list[bytes], cuts: list[int], limit: int
) -> None:
    wire = b"".join(pieces)
    points = sorted({min(c, len(wire)) for c in cuts} | {0, len(wire)})
    old, new = OldFrameDecoder(limit), FrameDecoder(limit)
    for start, stop in itertools.pairwise(points):
        chunk = wire[start:stop]
        assert _outcome(new, chunk) == _outcome(old, chunk)
        assert new.buffered == old.buffered
    # A dead decoder stays dead, with the same error; a live one takes b"".
    assert _outcome(new, b"") == _outcome(old, b"")
    assert new.buffered == old.buffered


def _trickle_peak(decoder: object, frame: bytes) -> int:
    """Peak traced bytes while ``frame`` comes one byte per read (as recv
    returns them: a fresh bytes object each)."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for byte in frame[:-1]:
            # int.to_bytes makes a new object, as socket.recv does (bytes()
            # of one byte would be CPython's shared one-character object).
            decoder.feed(byte.to_bytes(1, "big"))  # type: ignore[attr-defined]
        held = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    return held


def test_a_trickled_frame_costs_about_its_size_in_memory() -> None:
    """One connection, one 64 KiB frame sent a byte per TCP segment (an
    unauthenticated peer can do this for --handshake-timeout seconds, an
    authenticated one for up to --idle-timeout).  The old decoder held about
    64 KiB, and so must the new one (a first version kept one bytes object
    per read: 42 times the frame)."""
    frame = encode_frame(FrameType.HELLO, bytes(MAX_FRAME - 2))
    old = _trickle_peak(OldFrameDecoder(), frame)
    new = _trickle_peak(FrameDecoder(), frame)
    print(f"held while trickling: old {old} bytes, new {new} bytes ({new / len(frame):.0f}x)")
    assert new <= 4 * len(frame), (old, new)
