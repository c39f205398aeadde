"""Plain-TCP shortcuts around Twisted's buffered writes and abrupt closes.

Twisted's ``transport.write`` only buffers: the bytes go out on a later
reactor turn, after an ``epoll_ctl`` to watch for writability, a wake-up and
another ``epoll_ctl`` to stop watching.  For one small frame on an idle socket
that costs more than the send itself.  :func:`write_now` sends at once when
nothing is queued ahead and hands any rest (or an error) to
``transport.write``, so ordering, backpressure and error handling stay
Twisted's.

Closing a socket whose input was not all read makes the kernel answer with
RST, and the peer can then lose the last bytes we wrote — the ERROR saying
why.  :func:`close_after_output` half-closes instead and reads (and drops)
until the peer closes, for at most :data:`LINGER_SECONDS`.

Any other transport (TLS, test transports) gets the plain Twisted calls.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp

__all__ = ["LINGER_SECONDS", "close_after_output", "no_nagle", "write_now"]

LINGER_SECONDS = 2.0

_PLAIN_TCP = (tcp.Server, tcp.Client)
# The FileDescriptor internals write_now reads; a Twisted without them (a
# future release) gets plain writes, never an AttributeError mid-session.
_INTERNALS = ("_aborting", "_writeDisconnecting", "_writeDisconnected", "offset", "dataBuffer")
_FAST = all(hasattr(cls, name) for cls in _PLAIN_TCP for name in (*_INTERNALS, "TLS"))


def _plain_tcp(transport: Any) -> bool:
    return _FAST and type(transport) in _PLAIN_TCP and not transport.TLS


def no_nagle(transport: Any) -> None:
    """TCP_NODELAY where the transport has it: we coalesce whole frames ourselves,
    and Nagle could hold a frame back until the previous one is acknowledged."""
    if hasattr(transport, "setTcpNoDelay"):  # TCP, and TLS over it; not test transports
        transport.setTcpNoDelay(True)


def write_now(transport: Any, data: bytes) -> None:
    """Send ``data`` now if a plain-TCP transport has nothing queued, else queue it."""
    if (
        _plain_tcp(transport)
        and transport.connected
        and not transport.disconnecting
        and not transport._aborting
        and not transport._writeDisconnecting
        and not transport._writeDisconnected
        and not getattr(transport, "_tempDataBuffer", True)
        and transport.offset == len(transport.dataBuffer)
    ):
        try:
            sent = transport.socket.send(data)  # tcp.Connection's own socket
        except OSError:  # full (EAGAIN, ENOBUFS) or broken: Twisted retries, or finds it lost
            sent = 0
        if sent <= 0:
            transport.write(data)
        elif sent < len(data):
            transport.write(data[sent:])
        return
    transport.write(data)


def close_after_output(transport: Any, clock: Any) -> Any:
    """Close once our output is out, without RST; the linger call to cancel, or None."""
    if _plain_tcp(transport) and transport.connected and not transport.disconnecting:
        transport.loseWriteConnection()
        return clock.callLater(LINGER_SECONDS, transport.abortConnection)
    transport.loseConnection()
    return None
