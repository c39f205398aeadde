"""Server-side connection: a thin Twisted adapter over the sans-IO frame codec."""

from __future__ import annotations

from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from enclaves.frames import (
    DEFAULT_MAX_FRAME,
    ErrorCode,
    Frame,
    FrameDecoder,
    FrameError,
    FrameType,
    encode_error,
    encode_frame,
)

__all__ = ["ServerProtocol", "ServerFactory"]


class ServerProtocol(Protocol):
    """Decodes frames; any framing error gets an ERROR frame and a dropped connection."""

    log = Logger()
    factory: ServerFactory

    def connectionMade(self) -> None:
        self._decoder = FrameDecoder(self.factory.max_frame)
        self._closing = False

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        try:
            frames = self._decoder.feed(data)
        except FrameError as error:
            self.fail(error.code, str(error))
            return
        for frame in frames:
            if self._closing:
                return
            self.frame_received(frame)

    def frame_received(self, frame: Frame) -> None:
        self.fail(ErrorCode.BAD_FRAME, f"{frame.type.name} is not supported yet")

    def fail(self, code: ErrorCode, text: str) -> None:
        """Send an ERROR frame, log, and drop the connection."""
        peer = self.transport.getPeer()
        self.log.info("dropping {peer}: {code} {text}", peer=str(peer), code=code.name, text=text)
        self._closing = True
        self.transport.write(encode_frame(FrameType.ERROR, encode_error(code, text)))
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        self._closing = True


class ServerFactory(Factory):
    """Builds :class:`ServerProtocol` instances sharing the server's settings."""

    protocol = ServerProtocol

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
