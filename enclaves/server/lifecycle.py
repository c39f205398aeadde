"""Clean exit on SIGTERM and SIGINT: the daemon stops and exits with status 0."""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any

from twisted.application.service import Service
from twisted.logger import Logger

__all__ = ["CleanExitOnSignals", "DisconnectOnStop"]


class CleanExitOnSignals(Service):
    """Replace the reactor's SIGTERM/SIGINT handlers once it runs.

    Twisted's own handlers make twistd re-raise the signal after shutdown, so
    a normal ``systemctl stop`` would end with a signal status.  A requested
    stop is a clean stop: these handlers stop the reactor and twistd exits 0.
    """

    log = Logger()

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def startService(self) -> None:
        super().startService()
        self._reactor.addSystemEventTrigger("after", "startup", self._install)

    def _install(self) -> None:
        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, self._stop)

    def _stop(self, number: int, frame: FrameType | None) -> None:
        self.log.info("received {signal}, shutting down", signal=signal.Signals(number).name)
        self._reactor.callFromThread(self._reactor.stop)


class DisconnectOnStop(Service):
    """On stop, close every client connection with SHUTTING_DOWN.

    Added after the storage service, so that (services stop in reverse order)
    clients are told and in-flight messages are handed to storage before the
    storage service stops.
    """

    def __init__(self, factory: Any) -> None:
        self._factory = factory

    def stopService(self) -> None:
        super().stopService()
        self._factory.disconnect_all()
