"""Baseline relays for bench/routing.py: same framing and inner codec, no sessions.

``bare``: frames carry plain inner messages; no crypto at all (the ceiling).
``naive``: every frame is sealed and opened one by one (no coalescing), with
fixed per-user keys instead of a handshake.  Both start with a login frame
carrying the user id.  Run: ``python -m bench.relay MODE PORT``.
"""

from __future__ import annotations

import struct
import sys

from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol

from enclaves import inner
from enclaves.crypto import KeyPair, sha256
from enclaves.frames import MAX_FRAME, FrameDecoder, FrameType, encode_frame
from enclaves.handshake import SessionKeys
from enclaves.session import Session


def bench_keys(user_id: int) -> SessionKeys:
    """Fixed session keys for a baseline connection (no handshake)."""
    seed = struct.pack(">Q", user_id)
    return SessionKeys(
        KeyPair(sha256(b"c2s.enc", seed), sha256(b"c2s.auth", seed)),
        KeyPair(sha256(b"s2c.enc", seed), sha256(b"s2c.auth", seed)),
    )


class RelayProtocol(Protocol):
    factory: RelayFactory

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)  # as the Enclaves server does
        self.decoder = FrameDecoder(MAX_FRAME)
        self.user_id = 0
        self.session: Session | None = None

    def dataReceived(self, data: bytes) -> None:
        for frame in self.decoder.feed(data):
            if self.user_id == 0:
                (self.user_id,) = struct.unpack(">Q", frame.payload)
                self.factory.online[self.user_id] = self
                if self.factory.mode == "naive":
                    self.session = Session(bench_keys(self.user_id), "server", MAX_FRAME)
                continue
            if self.session is None:
                messages = inner.decode_all(frame.payload)
            else:
                messages = self.session.open(frame.payload)
            for message in messages:
                if isinstance(message, inner.Send):
                    target = self.factory.online.get(message.recipient)
                    if target is not None:
                        target.deliver(inner.Deliver(message.msg_id, self.user_id, message.blob))

    def deliver(self, message: inner.Deliver) -> None:
        if self.session is None:
            self.transport.write(encode_frame(FrameType.SEALED, inner.encode(message)))
        else:
            self.transport.write(self.session.seal([message]))

    def connectionLost(self, reason: object = None) -> None:
        if self.factory.online.get(self.user_id) is self:
            del self.factory.online[self.user_id]


class RelayFactory(Factory):
    protocol = RelayProtocol
    noisy = False

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.online: dict[int, RelayProtocol] = {}


def main() -> None:
    mode, port = sys.argv[1], int(sys.argv[2])
    reactor.listenTCP(port, RelayFactory(mode), interface="127.0.0.1")  # type: ignore[attr-defined]
    print("listening", flush=True)
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
