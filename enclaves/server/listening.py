"""Listening services that stop start-up with one line: ``--listen`` and ``--manhole``."""

from __future__ import annotations

import sys
from typing import Any, NoReturn

from twisted.application import strports
from twisted.application.service import IService, MultiService
from twisted.internet.error import CannotListenError
from twisted.logger import Logger

from enclaves.printable import printable
from enclaves.serverkey import StartupError

__all__ = ["ListeningService", "StartupRefused", "listening_service", "refuse_start"]

log = Logger()


class StartupRefused(Exception):
    """Start-up stopped while twistd was starting the services; the reason is on stderr."""


def listening_service(option: str, description: str, factory: Any, reactor: Any) -> IService:
    """``strports.service`` for ``option``, failing in one line that names option and endpoint.

    A description that does not parse (or names a certificate that cannot
    be read) raises :class:`StartupError` now; an endpoint that cannot
    listen when twistd starts the services (port in use, no permission)
    ends start-up through :func:`refuse_start`.
    """
    what = f"{option} {printable(description)}"  # one line, whatever was given
    try:
        listener = strports.service(description, factory, reactor=reactor)
    except Exception as error:  # the endpoint parsers raise many kinds
        raise StartupError(f"{what}: {_reason(error)}") from None
    return ListeningService(what, listener)


class ListeningService(MultiService):
    """Holds one listening service; a failure to listen ends start-up in one line."""

    def __init__(self, what: str, listener: IService) -> None:
        super().__init__()
        self._what = what
        listener.setServiceParent(self)

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except Exception as error:
            refuse_start(f"{self._what}: cannot listen: {_reason(error)}")


def _reason(error: BaseException) -> str:
    if isinstance(error, CannotListenError):
        cause = error.socketError
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
    text = printable(" ".join(str(error).split()))
    return text or type(error).__name__


def refuse_start(message: str) -> NoReturn:
    """Write ``enclaves: error: MESSAGE`` to the process's stderr, then stop start-up.

    By now twistd has pointed ``sys.stderr`` at its log; the line goes to the
    real one, as the refusals made before the services start do, and to the
    log (a daemon's only record).  The exception raised lets twistd remove
    its pid file and exit with status 1 (a daemonizing twistd's parent
    prints it); its traceback is not printed.
    """
    log.critical("start-up refused: {message}", message=message)
    stream = sys.__stderr__ or sys.stderr
    stream.write(f"enclaves: error: {message}\n")
    stream.flush()
    sys.excepthook = _quiet_about_refusals(sys.excepthook)
    raise StartupRefused(message)


def _quiet_about_refusals(previous: Any) -> Any:
    def excepthook(kind: type[BaseException], value: BaseException, traceback: Any) -> None:
        if not isinstance(value, StartupRefused):
            previous(kind, value, traceback)

    return excepthook
