"""The client's persistent state and its serialisation (docs/client.rst, keystore).

:class:`ClientState` is what the keystore seals: compact UTF-8 JSON, byte
strings as standard base64, user ids as decimal strings (they exceed the
53-bit integers many JSON readers keep exactly).  :func:`encode_state` and
:func:`decode_state` are exact inverses; decoding anything else is
:class:`StateError`.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from attrs import field, frozen

from enclaves.client.contacts import MAX_TENTATIVE, Contact, EpochKeys, HeldBlob, Trust
from enclaves.client.e2e import ReplayWindow
from enclaves.client.kex import KexState, PendingOffer
from enclaves.crypto import KeyPair

__all__ = [
    "STATE_FORMAT",
    "StateError",
    "OutboxEntry",
    "HistoryEntry",
    "ClientState",
    "encode_state",
    "decode_state",
]

STATE_FORMAT = 1
T = TypeVar("T")


class StateError(Exception):
    """The sealed state is not a state this client can read."""


@frozen
class OutboxEntry:
    """An e2e blob the server has not ACCEPTED yet (or refused: ``failed``).

    ``kind`` is ``message`` or ``kex``; ``status`` is ``pending`` (sent again
    after every reconnect) or ``failed`` (kept, with ``reason``, until retried).
    """

    msg_id: bytes
    recipient: int
    blob: bytes = field(repr=lambda b: f"<{len(b)} bytes>")
    kind: str = "message"
    status: str = "pending"
    reason: str | None = None
    created: float = 0.0


@frozen
class HistoryEntry:
    """One line of local history with a contact.

    ``direction`` is ``in`` or ``out``; ``status`` for ``out`` is ``sending``,
    ``accepted``, ``delivered`` or ``failed``, for ``in`` it is ``received``.
    ``trust`` is the contact's trust level when the message was sent/received.
    """

    direction: str
    msg_id: bytes
    unix_ms: int
    text: str = field(repr=False)
    trust: Trust
    status: str
    epoch: int = 0


@frozen
class ClientState:
    """Everything the keystore holds."""

    user_id: int
    server_keys: KeyPair = field(repr=False)
    identity_private: bytes = field(repr=False)
    endpoint: str | None = None
    contacts: Mapping[int, Contact] = field(factory=dict, repr=lambda c: f"<{len(c)} contacts>")
    outbox: tuple[OutboxEntry, ...] = ()
    seen: tuple[bytes, ...] = field(default=(), repr=False)
    history: Mapping[int, tuple[HistoryEntry, ...]] = field(factory=dict, repr=False)
    # Keys sent (or about to be sent) in a ROTATE that the server has not yet
    # confirmed with ROTATED: the next login tries them first.
    pending_server_keys: KeyPair | None = field(default=None, repr=False)
    # False from enrollment until the first DIRECTORY after ROTATED was handled.
    enrolled: bool = True


# -- encoding ---------------------------------------------------------------------


def _b(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


def _ob(value: bytes | None) -> str | None:
    return None if value is None else _b(value)


def _epoch_keys(value: EpochKeys | None) -> Any:
    if value is None:
        return None
    return {
        "epoch": value.epoch,
        "keys": _b(value.keys.to_bytes()),
        "adopted": value.adopted,
        "window": [value.window.highest, str(value.window.bitmap)],
    }


def _pending(value: PendingOffer | None) -> Any:
    if value is None:
        return None
    return {
        "epoch": value.epoch,
        "ek": _b(value.ek_private),
        "pq_seed": _b(value.pq_seed),
        "blob": _b(value.blob),
        "first_sent": value.first_sent,
        "last_sent": value.last_sent,
        "offers_sent": value.offers_sent,
        "reported": value.reported,
    }


def _contact(c: Contact) -> Any:
    return {
        "id": str(c.user_id),
        "petname": c.petname,
        "ik": _ob(c.ik),
        "trust": c.trust.value,
        "pending_ik": _ob(c.pending_ik),
        "current": _epoch_keys(c.current),
        "previous": _epoch_keys(c.previous),
        "send_counter": c.send_counter,
        "kex": {
            "pending": _pending(c.kex.pending),
            "answered_digest": _ob(c.kex.answered_digest),
            "answered_blob": _ob(c.kex.answered_blob),
        },
        "send_confirmed": c.send_confirmed,
        "held": [[_b(h.msg_id), _b(h.blob)] for h in c.held],
        "removed": c.removed,
        "tentative": [_epoch_keys(t) for t in c.tentative],
        "unlisted": c.unlisted,
    }


def _outbox(e: OutboxEntry) -> Any:
    return {
        "msg_id": _b(e.msg_id),
        "recipient": str(e.recipient),
        "blob": _b(e.blob),
        "kind": e.kind,
        "status": e.status,
        "reason": e.reason,
        "created": e.created,
    }


def _history(h: HistoryEntry) -> Any:
    return [h.direction, _b(h.msg_id), h.unix_ms, h.text, h.trust.value, h.status, h.epoch]


def encode_state(state: ClientState) -> bytes:
    """Compact UTF-8 JSON of ``state`` (see docs/client.rst for the fields)."""
    doc = {
        "format": STATE_FORMAT,
        "user_id": str(state.user_id),
        "server_keys": _b(state.server_keys.to_bytes()),
        "identity": _b(state.identity_private),
        "endpoint": state.endpoint,
        "contacts": [_contact(state.contacts[k]) for k in sorted(state.contacts)],
        "outbox": [_outbox(e) for e in state.outbox],
        "seen": [_b(m) for m in state.seen],
        "history": {str(k): [_history(h) for h in v] for k, v in sorted(state.history.items())},
        "pending_server_keys": None
        if state.pending_server_keys is None
        else _b(state.pending_server_keys.to_bytes()),
        "enrolled": state.enrolled,
    }
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


# -- decoding ---------------------------------------------------------------------


def _get(doc: Any, key: str, kind: type[T]) -> T:
    if not isinstance(doc, dict) or key not in doc:
        raise StateError(f"state lacks {key!r}")
    value = doc[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise StateError(f"state field {key!r} has the wrong type")
    return value


def _opt(doc: Any, key: str, conv: Callable[[Any], T]) -> T | None:
    if not isinstance(doc, dict):
        raise StateError("state object expected")
    value = doc.get(key)
    return None if value is None else conv(value)


def _unb(value: Any) -> bytes:
    if not isinstance(value, str):
        raise StateError("base64 string expected")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise StateError("bad base64 in state") from None


def _uid(value: Any) -> int:
    if not isinstance(value, str) or not value.isdigit() or len(value) > 20:
        raise StateError("bad user id in state")
    number = int(value)
    if not 0 < number < 1 << 64:
        raise StateError("bad user id in state")
    return number


def _keys(value: Any) -> KeyPair:
    try:
        return KeyPair.from_bytes(_unb(value))
    except ValueError:
        raise StateError("bad key pair in state") from None


def _d_window(value: Any) -> ReplayWindow:
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not isinstance(value[0], int)
        or not isinstance(value[1], str)
        or not value[1].isdigit()
    ):
        raise StateError("bad replay window in state")
    return ReplayWindow(value[0], int(value[1]))


def _d_epoch_keys(value: Any) -> EpochKeys:
    return EpochKeys(
        _get(value, "epoch", int),
        _keys(value.get("keys")),
        _get(value, "adopted", float),
        _d_window(_get(value, "window", list)),
    )


def _d_pending(value: Any) -> PendingOffer:
    return PendingOffer(
        epoch=_get(value, "epoch", int),
        ek_private=_unb(value.get("ek")),
        pq_seed=_unb(value.get("pq_seed")),
        blob=_unb(value.get("blob")),
        first_sent=_get(value, "first_sent", float),
        last_sent=_get(value, "last_sent", float),
        offers_sent=_get(value, "offers_sent", int),
        reported=_get(value, "reported", bool),
    )


def _d_contact(doc: Any) -> Contact:
    kex = _get(doc, "kex", dict)
    held = []
    for item in _get(doc, "held", list):
        if not isinstance(item, list) or len(item) != 2:
            raise StateError("bad held blob in state")
        held.append(HeldBlob(_unb(item[0]), _unb(item[1])))
    petname = doc.get("petname")
    if petname is not None and not isinstance(petname, str):
        raise StateError("bad petname in state")
    return Contact(
        user_id=_uid(doc.get("id")),
        petname=petname,
        ik=_opt(doc, "ik", _unb),
        trust=Trust(_get(doc, "trust", str)),
        pending_ik=_opt(doc, "pending_ik", _unb),
        current=_opt(doc, "current", _d_epoch_keys),
        previous=_opt(doc, "previous", _d_epoch_keys),
        send_counter=_get(doc, "send_counter", int),
        kex=KexState(
            pending=_opt(kex, "pending", _d_pending),
            answered_digest=_opt(kex, "answered_digest", _unb),
            answered_blob=_opt(kex, "answered_blob", _unb),
        ),
        send_confirmed=_get(doc, "send_confirmed", bool),
        held=tuple(held),
        removed=_flag(doc, "removed"),
        tentative=_tentative(doc),
        unlisted=_flag(doc, "unlisted"),
    )


def _tentative(doc: Any) -> tuple[EpochKeys, ...]:
    # Optional: keystores written before tentative keys existed have none.
    value = doc.get("tentative", [])
    if not isinstance(value, list) or len(value) > MAX_TENTATIVE:
        raise StateError("state field 'tentative' has the wrong type")
    return tuple(_d_epoch_keys(t) for t in value)


def _flag(doc: Any, name: str) -> bool:
    # Optional: keystores written before tombstones ("removed") or unlisted
    # contacts existed have neither.
    value = doc.get(name, False)
    if not isinstance(value, bool):
        raise StateError(f"state field {name!r} has the wrong type")
    return value


def _d_outbox(doc: Any) -> OutboxEntry:
    reason = doc.get("reason") if isinstance(doc, dict) else None
    if reason is not None and not isinstance(reason, str):
        raise StateError("bad outbox reason in state")
    return OutboxEntry(
        msg_id=_unb(doc.get("msg_id")),
        recipient=_uid(doc.get("recipient")),
        blob=_unb(doc.get("blob")),
        kind=_get(doc, "kind", str),
        status=_get(doc, "status", str),
        reason=reason,
        created=_get(doc, "created", float),
    )


def _d_history(item: Any) -> HistoryEntry:
    if not isinstance(item, list) or len(item) != 7:
        raise StateError("bad history entry in state")
    direction, msg_id, unix_ms, text, trust, status, epoch = item
    if not (
        isinstance(direction, str)
        and isinstance(unix_ms, int)
        and isinstance(text, str)
        and isinstance(trust, str)
        and isinstance(status, str)
        and isinstance(epoch, int)
    ):
        raise StateError("bad history entry in state")
    return HistoryEntry(direction, _unb(msg_id), unix_ms, text, Trust(trust), status, epoch)


def decode_state(data: bytes) -> ClientState:
    """Inverse of :func:`encode_state`; anything else is :class:`StateError`."""
    try:
        doc = json.loads(data.decode("utf-8"))
        if _get(doc, "format", int) != STATE_FORMAT:
            raise StateError("unsupported state format")
        endpoint = doc.get("endpoint")
        if endpoint is not None and not isinstance(endpoint, str):
            raise StateError("bad endpoint in state")
        contacts = [_d_contact(c) for c in _get(doc, "contacts", list)]
        history = {
            _uid(k): tuple(_d_history(h) for h in _list(v))
            for k, v in _get(doc, "history", dict).items()
        }
        return ClientState(
            user_id=_uid(doc.get("user_id")),
            server_keys=_keys(doc.get("server_keys")),
            identity_private=_unb(doc.get("identity")),
            endpoint=endpoint,
            contacts={c.user_id: c for c in contacts},
            outbox=tuple(_d_outbox(e) for e in _get(doc, "outbox", list)),
            seen=tuple(_unb(m) for m in _get(doc, "seen", list)),
            history=history,
            pending_server_keys=_opt(doc, "pending_server_keys", _keys),
            enrolled=_enrolled(doc.get("enrolled", True)),
        )
    except StateError:
        raise
    except (ValueError, TypeError, AttributeError, KeyError):
        raise StateError("malformed client state") from None


def _enrolled(value: Any) -> bool:
    if not isinstance(value, bool):
        raise StateError("bad enrolled flag in state")
    return value


def _list(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise StateError("list expected in state")
    return value
