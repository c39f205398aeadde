"""Between the two implementations: the same inner message in each one's classes.

A comparison helper, not part of the conformance implementation: it imports
``enclaves``.
"""

from __future__ import annotations

import attrs

from enclaves import inner
from tests.conformance.protocol import Inner, Kind

REAL_CLASSES: dict[Kind, type] = {
    Kind.SEND: inner.Send,
    Kind.DELIVER: inner.Deliver,
    Kind.ACCEPTED: inner.Accepted,
    Kind.RECEIVED: inner.Received,
    Kind.DELIVERED: inner.Delivered,
    Kind.ROTATE: inner.Rotate,
    Kind.ROTATED: inner.Rotated,
    Kind.DIRECTORY: inner.Directory,
    Kind.JOINED: inner.Joined,
    Kind.REMOVED: inner.Removed,
    Kind.INVITE: inner.Invite,
    Kind.INVITE_TOKEN: inner.InviteToken,
    Kind.ERROR: inner.Error,
    Kind.PING: inner.Ping,
    Kind.PONG: inner.Pong,
}


def to_real(message: Inner) -> inner.InnerMessage:
    """The real message class takes the spec's field names as keywords."""
    real: inner.InnerMessage = REAL_CLASSES[message.kind](**message.fields)
    return real


def to_conformance(message: inner.InnerMessage) -> Inner:
    return Inner(Kind[inner.kind_name(message)], attrs.asdict(message, recurse=False))
