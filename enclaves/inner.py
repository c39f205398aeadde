"""Sans-IO codec for the inner messages carried inside SEALED frames (docs/protocol.rst).

Each inner message is ``u32 length || u8 kind || fields`` where ``length``
counts the kind byte and the fields.  A sealed frame carries one or more.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from typing import Any, Union

from attrs import field, frozen

from enclaves.frames import ErrorCode

__all__ = [
    "Kind",
    "InnerError",
    "NO_MSG_ID",
    "Send",
    "Deliver",
    "Accepted",
    "Received",
    "Delivered",
    "Rotate",
    "Rotated",
    "Directory",
    "DIRECTORY_MORE",
    "split_directory",
    "Joined",
    "Removed",
    "Invite",
    "InviteToken",
    "Error",
    "Ping",
    "Pong",
    "InnerMessage",
    "encode",
    "encode_all",
    "kind_name",
    "decode_all",
    "RoutedSend",
    "ServerInbound",
    "decode_routed",
    "routed_message",
    "routed_send",
]

MSG_ID_SIZE = 16
NO_MSG_ID = bytes(MSG_ID_SIZE)
_LEN = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_U16 = struct.Struct(">H")


class Kind(enum.IntEnum):
    SEND = 0x01
    DELIVER = 0x02
    ACCEPTED = 0x03
    RECEIVED = 0x04
    DELIVERED = 0x05
    ROTATE = 0x06
    ROTATED = 0x07
    DIRECTORY = 0x08
    JOINED = 0x09
    REMOVED = 0x0A
    INVITE = 0x0B
    INVITE_TOKEN = 0x0C
    ERROR = 0x0D
    PING = 0x0E
    PONG = 0x0F


class InnerError(Exception):
    """A malformed inner message; ``code`` is the ERROR to answer with."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.BAD_MESSAGE) -> None:
        super().__init__(message)
        self.code = code


def _msg_id(_inst: object, _attr: object, value: bytes) -> None:
    if not isinstance(value, bytes) or len(value) != MSG_ID_SIZE:
        raise ValueError("msg_id must be 16 bytes")


def _user_id(_inst: object, _attr: object, value: int) -> None:
    if not 0 <= value < 1 << 64:
        raise ValueError("user id out of range")


@frozen
class Send:
    """Client asks the server to route ``blob`` to ``recipient``."""

    msg_id: bytes = field(validator=_msg_id)
    recipient: int = field(validator=_user_id)
    blob: bytes = field(repr=lambda b: f"<{len(b)} bytes>")


@frozen
class Deliver:
    """Server hands the recipient a message from ``sender``."""

    msg_id: bytes = field(validator=_msg_id)
    sender: int = field(validator=_user_id)
    blob: bytes = field(repr=lambda b: f"<{len(b)} bytes>")


@frozen
class Accepted:
    """Server to sender: delivered to and acknowledged by, or fsynced for, the recipient."""

    msg_id: bytes = field(validator=_msg_id)


@frozen
class Received:
    """Recipient to server: this DELIVER is processed and saved."""

    msg_id: bytes = field(validator=_msg_id)


@frozen
class Delivered:
    """Server to sender: the recipient acknowledged this message."""

    msg_id: bytes = field(validator=_msg_id)


def _key32(_inst: object, _attr: object, value: bytes) -> None:
    if not isinstance(value, bytes) or len(value) != 32:
        raise ValueError("key must be 32 bytes")


@frozen
class Rotate:
    """Client replaces its user-server key pair with a fresh one it made."""

    enc: bytes = field(repr=False, validator=_key32)
    auth: bytes = field(repr=False, validator=_key32)


@frozen
class Rotated:
    """Server: the new key pair is stored durably; the old one is dead."""


@frozen
class Directory:
    """Server: every user id, in ascending order.

    A list too long for one frame is sent as several DIRECTORY parts, each
    but the last with ``more`` set; the client joins them into one.
    """

    user_ids: tuple[int, ...]
    more: bool = False


DIRECTORY_MORE = 0x01  # DIRECTORY flags bit 0: another part follows
_DIRECTORY_OVERHEAD = 4 + 1 + 1 + 4  # length, kind, flags, count


def split_directory(user_ids: Sequence[int], max_inner: int) -> list[Directory]:
    """``user_ids`` as DIRECTORY parts whose encodings are at most ``max_inner`` bytes."""
    per_part = (max_inner - _DIRECTORY_OVERHEAD) // 8
    if per_part < 1:
        raise ValueError("no DIRECTORY part fits this frame size")
    ids = tuple(user_ids)
    parts = [ids[i : i + per_part] for i in range(0, len(ids), per_part)] or [()]
    return [Directory(part, i < len(parts) - 1) for i, part in enumerate(parts)]


@frozen
class Joined:
    user_id: int = field(validator=_user_id)


@frozen
class Removed:
    user_id: int = field(validator=_user_id)


@frozen
class Invite:
    """Client asks for an enrollment token for a newcomer."""


@frozen
class InviteToken:
    """Server: a fresh enrollment token, the new user's id and its expiry (unix ms)."""

    user_id: int = field(validator=_user_id)
    expires_ms: int
    token: str = field(repr=False)


@frozen
class Error:
    """An error about one message (``msg_id``) or the session (``NO_MSG_ID``)."""

    code: int
    msg_id: bytes = field(validator=_msg_id)
    text: str


@frozen
class Ping:
    nonce: int


@frozen
class Pong:
    nonce: int


InnerMessage = Union[  # noqa: UP007 (a runtime Union keeps __args__)
    Send,
    Deliver,
    Accepted,
    Received,
    Delivered,
    Rotate,
    Rotated,
    Directory,
    Joined,
    Removed,
    Invite,
    InviteToken,
    Error,
    Ping,
    Pong,
]


def kind_name(message: InnerMessage) -> str:
    """The protocol's name of ``message``'s kind (SEND, DELIVER, ...), for texts."""
    return _fields(message)[0].name


def _fields(message: InnerMessage) -> tuple[Kind, bytes]:
    match message:
        case Send(msg_id, recipient, blob):
            return Kind.SEND, msg_id + _U64.pack(recipient) + blob
        case Deliver(msg_id, sender, blob):
            return Kind.DELIVER, msg_id + _U64.pack(sender) + blob
        case Accepted(msg_id):
            return Kind.ACCEPTED, msg_id
        case Received(msg_id):
            return Kind.RECEIVED, msg_id
        case Delivered(msg_id):
            return Kind.DELIVERED, msg_id
        case Rotate(enc, auth):
            return Kind.ROTATE, enc + auth
        case Rotated():
            return Kind.ROTATED, b""
        case Directory(user_ids, more):
            count = len(user_ids)
            return Kind.DIRECTORY, struct.pack(f">BI{count}Q", int(more), count, *user_ids)
        case Joined(user_id):
            return Kind.JOINED, _U64.pack(user_id)
        case Removed(user_id):
            return Kind.REMOVED, _U64.pack(user_id)
        case Invite():
            return Kind.INVITE, b""
        case InviteToken(user_id, expires_ms, token):
            return Kind.INVITE_TOKEN, _U64.pack(user_id) + _U64.pack(expires_ms) + token.encode()
        case Error(code, msg_id, text):
            # Cut to 1024 bytes on a character boundary (never half a character).
            raw = text.encode("utf-8")[:1024].decode("utf-8", "ignore").encode("utf-8")
            return Kind.ERROR, _U16.pack(code) + msg_id + raw
        case Ping(nonce):
            return Kind.PING, _U64.pack(nonce)
        case Pong(nonce):
            return Kind.PONG, _U64.pack(nonce)
    raise TypeError(f"not an inner message: {type(message).__name__}")


_ID_PEER_HEAD = struct.Struct(">IB16sQ")  # length, kind, msg_id, user id
_ID_ONLY = struct.Struct(">IB16s")  # length, kind, msg_id
_ID_PEER_CLASS: dict[int, type[Send] | type[Deliver]] = {Kind.SEND: Send, Kind.DELIVER: Deliver}
_ID_ONLY_CLASS: dict[int, type[Accepted] | type[Received] | type[Delivered]] = {
    Kind.ACCEPTED: Accepted,
    Kind.RECEIVED: Received,
    Kind.DELIVERED: Delivered,
}
_ID_PEER_KIND: dict[type, Kind] = {cls: Kind(kind) for kind, cls in _ID_PEER_CLASS.items()}
_ID_ONLY_KIND: dict[type, Kind] = {cls: Kind(kind) for kind, cls in _ID_ONLY_CLASS.items()}


def encode(message: InnerMessage) -> bytes:
    """One inner message with its length prefix."""
    # The kinds of every routed message take a short path (same bytes).
    cls = type(message)
    kind = _ID_PEER_KIND.get(cls)
    if kind is not None:
        blob = message.blob  # type: ignore[union-attr]
        peer = message.recipient if cls is Send else message.sender  # type: ignore[union-attr]
        return _ID_PEER_HEAD.pack(len(blob) + 25, kind, message.msg_id, peer) + blob  # type: ignore[union-attr]
    kind = _ID_ONLY_KIND.get(cls)
    if kind is not None:
        return _ID_ONLY.pack(17, kind, message.msg_id)  # type: ignore[union-attr]
    kind, fields = _fields(message)
    return _LEN.pack(len(fields) + 1) + bytes((kind,)) + fields


def encode_all(messages: list[InnerMessage]) -> bytes:
    return b"".join(encode(m) for m in messages)


def _need(fields: bytes, size: int, kind: Kind) -> None:
    if len(fields) != size:
        raise InnerError(f"{kind.name} must carry {size} bytes, not {len(fields)}")


_KINDS = {int(kind): kind for kind in Kind}


def _decode_one(kind_byte: int, fields: bytes) -> InnerMessage:
    kind = _KINDS.get(kind_byte)
    if kind is None:
        raise InnerError(f"unknown inner message kind 0x{kind_byte:02x}", ErrorCode.UNKNOWN_KIND)
    if kind in (Kind.SEND, Kind.DELIVER):
        if len(fields) < MSG_ID_SIZE + 8:
            raise InnerError(f"{kind.name} is too short")
        (peer,) = _U64.unpack_from(fields, MSG_ID_SIZE)
        cls = Send if kind is Kind.SEND else Deliver
        return cls(fields[:MSG_ID_SIZE], peer, fields[MSG_ID_SIZE + 8 :])
    if kind in (Kind.ACCEPTED, Kind.RECEIVED, Kind.DELIVERED):
        _need(fields, MSG_ID_SIZE, kind)
        if kind is Kind.ACCEPTED:
            return Accepted(fields)
        return Received(fields) if kind is Kind.RECEIVED else Delivered(fields)
    if kind is Kind.ROTATE:
        _need(fields, 64, kind)
        if fields[:32] == fields[32:]:
            raise InnerError("ROTATE keys must differ")
        return Rotate(fields[:32], fields[32:])
    if kind in (Kind.ROTATED, Kind.INVITE):
        _need(fields, 0, kind)
        return Rotated() if kind is Kind.ROTATED else Invite()
    if kind is Kind.DIRECTORY:
        if len(fields) < 5:
            raise InnerError("DIRECTORY is too short")
        flags, count = struct.unpack_from(">BI", fields)
        if flags & ~DIRECTORY_MORE:
            raise InnerError("DIRECTORY has unknown flags")
        _need(fields, 5 + 8 * count, kind)
        return Directory(struct.unpack_from(f">{count}Q", fields, 5), bool(flags))
    if kind in (Kind.JOINED, Kind.REMOVED, Kind.PING, Kind.PONG):
        _need(fields, 8, kind)
        (value,) = _U64.unpack(fields)
        if kind is Kind.JOINED:
            return Joined(value)
        if kind is Kind.REMOVED:
            return Removed(value)
        return Ping(value) if kind is Kind.PING else Pong(value)
    if kind is Kind.INVITE_TOKEN:
        if len(fields) < 16:
            raise InnerError("INVITE_TOKEN is too short")
        user_id, expires = struct.unpack_from(">QQ", fields)
        return InviteToken(user_id, expires, _text(fields[16:]))
    # Kind.ERROR
    if len(fields) < 2 + MSG_ID_SIZE:
        raise InnerError("ERROR is too short")
    (code,) = _U16.unpack_from(fields)
    return Error(code, fields[2 : 2 + MSG_ID_SIZE], _text(fields[2 + MSG_ID_SIZE :]))


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InnerError("text is not UTF-8") from None


def _slot_builder(cls: type, *names: str) -> Any:
    """Build ``cls`` from already checked values: set its slots, skip the validators.

    For the decoder (sizes fixed by the wire format) and the router's hot path
    (ids taken from messages so decoded); anything else uses the classes.
    """
    setters = [cls.__dict__[name].__set__ for name in names]  # the slot descriptors
    new = object.__new__

    if len(setters) == 1:
        (set_0,) = setters

        def build_1(value: Any) -> Any:
            obj: Any = new(cls)
            set_0(obj, value)
            return obj

        return build_1
    set_a, set_b, set_c = setters

    def build_3(a: Any, b: Any, c: Any) -> Any:
        obj: Any = new(cls)
        set_a(obj, a)
        set_b(obj, b)
        set_c(obj, c)
        return obj

    return build_3


_BUILD_ID_PEER: dict[int, Any] = {
    Kind.SEND: _slot_builder(Send, "msg_id", "recipient", "blob"),
    Kind.DELIVER: _slot_builder(Deliver, "msg_id", "sender", "blob"),
}
_BUILD_ID_ONLY: dict[int, Any] = {
    kind: _slot_builder(cls, "msg_id") for kind, cls in _ID_ONLY_CLASS.items()
}
_KIND_SEND, _KIND_DELIVER, _KIND_ACCEPTED, _KIND_RECEIVED, _KIND_DELIVERED = (
    int(Kind.SEND), int(Kind.DELIVER), int(Kind.ACCEPTED), int(Kind.RECEIVED), int(Kind.DELIVERED)
)  # fmt: skip


def _msg_id_size(msg_id: bytes) -> None:
    # struct would pad or cut a wrong-sized msg_id on the wire without a word.
    if len(msg_id) != MSG_ID_SIZE:
        raise ValueError("msg_id must be 16 bytes")


def checked_accepted(msg_id: bytes) -> Accepted:
    """ACCEPTED for a msg_id taken from a decoded message."""
    _msg_id_size(msg_id)
    return _BUILD_ID_ONLY[_KIND_ACCEPTED](msg_id)


def encoded_deliver(msg_id: bytes, sender: int, blob: bytes) -> bytes:
    """``encode(Deliver(msg_id, sender, blob))`` without building the message,
    for ids taken from decoded or stored messages (a u64 sender)."""
    if len(msg_id) != MSG_ID_SIZE:  # _msg_id_size, inline: the hot path
        raise ValueError("msg_id must be 16 bytes")
    return _ID_PEER_HEAD.pack(len(blob) + 25, _KIND_DELIVER, msg_id, sender) + blob


def encoded_accepted_delivered(msg_id: bytes) -> bytes:
    """``encode(Accepted(msg_id)) + encode(Delivered(msg_id))`` without building
    them: a live delivery's two receipts, for a msg_id taken from a decoded message."""
    if len(msg_id) != MSG_ID_SIZE:
        raise ValueError("msg_id must be 16 bytes")
    return _ID_ONLY.pack(17, _KIND_ACCEPTED, msg_id) + _ID_ONLY.pack(17, _KIND_DELIVERED, msg_id)


def decode_all(data: bytes) -> list[InnerMessage]:
    """Every inner message in ``data``; raises :class:`InnerError` on any defect."""
    return _decode(data, _BUILD_ID_PEER, _BUILD_ID_ONLY)


RoutedSend = tuple[bytes, int, bytes]
"""A SEND as :func:`decode_routed` gives it: ``(msg_id, recipient, blob)``."""

ServerInbound = InnerMessage | RoutedSend | bytes
"""One client-to-server message as :func:`decode_routed` gives it: a SEND as a
:data:`RoutedSend`, a RECEIVED as its msg_id (``bytes``), any other kind as
its class."""


def _routed_send(msg_id: bytes, recipient: int, blob: bytes) -> RoutedSend:
    return (msg_id, recipient, blob)


_ROUTED_ID_PEER: dict[int, Any] = {**_BUILD_ID_PEER, Kind.SEND: _routed_send}
_ROUTED_ID_ONLY: dict[int, Any] = {**_BUILD_ID_ONLY, Kind.RECEIVED: bytes}  # bytes(b) is b


_RECEIVED_SIZE = 4 + 17  # a RECEIVED's record: length 17, kind, msg_id
_RECEIVED_KIND = bytes((Kind.RECEIVED,))


def decode_routed(data: bytes) -> list[ServerInbound]:
    """:func:`decode_all` for the server's hot path: the same checks and errors,
    but SEND and RECEIVED, nearly all of its traffic, come as plain values
    (:data:`ServerInbound`); :func:`routed_message` makes a message of one."""
    data = bytes(data)
    end = len(data)
    count = end // _RECEIVED_SIZE
    if count > 2 and end == count * _RECEIVED_SIZE:
        # A frame of RECEIVEDs only (a recipient's acknowledgements): if each
        # 21-byte record's head, compared column by column, is a RECEIVED's
        # (length 00 00 00 11, kind 04), the records are cut into msg_ids at
        # once.  (For one or two, the loop below is as quick.)
        size = _RECEIVED_SIZE
        zeros = bytes(count)
        if (
            data[4::size] == _RECEIVED_KIND * count
            and data[3::size] == b"\x11" * count
            and data[0::size] == zeros
            and data[1::size] == zeros
            and data[2::size] == zeros
        ):
            return [data[i + 5 : i + size] for i in range(0, end, size)]
    return _decode(data, _ROUTED_ID_PEER, _ROUTED_ID_ONLY)


def routed_send(item: RoutedSend) -> Send:
    """The SEND that :func:`decode_routed` gave as ``item``."""
    send: Send = _BUILD_ID_PEER[_KIND_SEND](*item)
    return send


def routed_message(item: ServerInbound) -> InnerMessage:
    """The inner message that :func:`decode_routed` gave as ``item``."""
    if isinstance(item, tuple):
        return routed_send(item)
    if isinstance(item, bytes):
        received: Received = _BUILD_ID_ONLY[_KIND_RECEIVED](item)
        return received
    return item


def _decode(data: bytes, id_peer: dict[int, Any], id_only: dict[int, Any]) -> list[Any]:
    """The decoder loop; ``id_peer`` and ``id_only`` build the routed kinds
    from their checked fields (SEND, DELIVER; ACCEPTED, RECEIVED, DELIVERED)."""
    messages: list[Any] = []
    append = messages.append
    data = bytes(data)
    offset = 0
    end = len(data)
    if end == 0:
        raise InnerError("sealed frame carries no inner message")
    unpack_len = _LEN.unpack_from
    while offset < end:
        if end - offset < 5:
            raise InnerError("truncated inner message header")
        (size,) = unpack_len(data, offset)
        stop = offset + 4 + size
        if size < 1 or stop > end:
            raise InnerError("inner message length does not fit the frame")
        kind_byte = data[offset + 4]
        # The routed kinds and their receipts are decoded inline (same checks).
        build: Any = id_peer.get(kind_byte)
        if build is not None and size >= 25:  # SEND, DELIVER
            _size, _kind, msg_id, peer = _ID_PEER_HEAD.unpack_from(data, offset)
            append(build(msg_id, peer, data[offset + 29 : stop]))
        elif size == 17 and kind_byte in id_only:  # ACCEPTED, RECEIVED, DELIVERED
            append(id_only[kind_byte](data[offset + 5 : stop]))
        else:
            append(_decode_one(kind_byte, data[offset + 5 : stop]))
        offset = stop
    return messages
