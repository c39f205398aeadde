"""Process-level services: clean exit on signals, disconnect on stop, GC freeze."""

from __future__ import annotations

import gc
import signal
from types import FrameType
from typing import Any

from twisted.application.service import Service
from twisted.internet.error import ReactorNotRunning
from twisted.logger import Logger

__all__ = ["CleanExitOnSignals", "DisconnectOnStop", "FreezeStartupObjects"]


class CleanExitOnSignals(Service):
    """Own SIGTERM/SIGINT from before the reactor runs, and again after it installs its own.

    Twisted's own handlers make twistd re-raise the signal after shutdown, so
    a normal ``systemctl stop`` would end with a signal status.  A requested
    stop is a clean stop: these handlers stop the reactor and twistd exits 0.
    """

    log = Logger()

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def privilegedStartService(self) -> None:
        # Before the reactor runs (the listening port already accepts), so a
        # signal in that gap stops cleanly too; the reactor then installs its
        # own handlers during start-up, and ours go back on right after them.
        super().privilegedStartService()
        self._install()
        self._reactor.addSystemEventTrigger("during", "startup", self._install)

    def _install(self) -> None:
        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, self._stop)

    def _stop(self, number: int, frame: FrameType | None) -> None:
        # A signal handler runs between any two bytecodes of the main thread,
        # perhaps inside the log observer while it holds its lock: logging
        # here could deadlock (it did, in CI). It only hands the stop to the
        # reactor, which logs and stops on its own turn.
        self._reactor.callFromThread(self._stopping, number)

    def _stopping(self, number: int) -> None:
        self.log.info("received {signal}, shutting down", signal=signal.Signals(number).name)
        try:
            self._reactor.stop()
        except ReactorNotRunning:  # a second signal while stopping
            pass


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


class FreezeStartupObjects(Service):
    """Once the reactor runs, move every object made so far out of the collector's sight.

    Modules, the user index and the server's own objects live as long as the
    process.  Left in the collector's oldest generation, each full collection
    walks all of them: 15-25 ms with the reactor stopped, every few seconds
    under load.  Frozen (``gc.freeze``), they are never walked again; objects
    made later are collected as usual.
    """

    log = Logger()

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def startService(self) -> None:
        super().startService()
        self._reactor.callWhenRunning(self._freeze)

    def _freeze(self) -> None:
        gc.collect()
        gc.freeze()
        self.log.debug("froze {count} start-up objects", count=gc.get_freeze_count())
