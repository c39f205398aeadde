"""Listening services that stop start-up with one line: ``--listen`` and ``--manhole``."""

from __future__ import annotations

import re
import sys
from typing import Any, NoReturn

from twisted.application import strports
from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import SSL4ServerEndpoint, UNIXServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.logger import Logger
from zope.interface import implementer

from enclaves.printable import printable
from enclaves.serverkey import StartupError

__all__ = ["ListeningService", "StartupRefused", "listening_service", "refuse_start"]

log = Logger()


class StartupRefused(Exception):
    """Start-up stopped while twistd was starting the services; the reason is on stderr."""


def listening_service(
    option: str, description: str, factory: Any, reactor: Any
) -> ListeningService:
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
        example = _MANHOLE_EXAMPLE if option == "--manhole" else _EXAMPLE
        raise StartupError(f"{what}: {_parse_reason(error, description, example)}") from None
    return ListeningService(what, listener)


class ListeningService(MultiService):
    """Holds one listening service; a failure to listen ends start-up in one line.

    Tells what it listens on, for the admin shell's ``issue()`` to check a
    token's address against: :attr:`tls` (an ``ssl:`` endpoint; None for a
    UNIX socket, behind a proxy that may speak TLS or not) and, once
    listening, :attr:`port` (None before, or for a UNIX socket).
    """

    def __init__(self, what: str, listener: IService) -> None:
        super().__init__()
        self._what = what
        self.port: int | None = None
        endpoint = getattr(listener, "endpoint", None)
        self.tls: bool | None = isinstance(endpoint, SSL4ServerEndpoint)
        if isinstance(endpoint, UNIXServerEndpoint):
            self.tls = None
        if endpoint is not None:
            listener.endpoint = _PortRecorder(endpoint, self)  # type: ignore[attr-defined]
        listener.setServiceParent(self)

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except Exception as error:
            reason = f"cannot listen: {_reason(error)}"
            refuse_start(f"{self._what}: {reason}", f"{reason} ({self._what})")


#: What the endpoint parsers say, and what the admin is told instead.
_NOT_A_NUMBER = re.compile(r"invalid literal for int\(\) with base \d+: (.*)")
_UNKNOWN_PARAMETER = re.compile(r"got an unexpected keyword argument (.*)")
_UNKNOWN_TYPE = re.compile(r"Unknown endpoint type: (.*)")
_TOO_MANY_FIELDS = re.compile(
    r"got multiple values for argument|takes from \d+ to \d+ positional arguments"
)
_EXAMPLE = "e.g. tcp:7500:interface=127.0.0.1 or ssl:7500:privateKey=key.pem:certKey=cert.pem"
_MANHOLE_EXAMPLE = "e.g. tcp:7522:interface=127.0.0.1"


def _parse_reason(error: BaseException, description: str = "", example: str = _EXAMPLE) -> str:
    """Why an endpoint description does not parse, in the admin's words."""
    if isinstance(error, OSError) and error.filename and error.strerror:
        return printable(f"cannot read {error.filename}: {error.strerror}")
    text = printable(" ".join(str(error).split()))
    if match := _NOT_A_NUMBER.search(text):
        fields = description.split(":")
        is_port = len(fields) > 1 and match.group(1) == repr(fields[1])
        what = "the port" if is_port else "that parameter"
        reason = f"{match.group(1)} is not a number, and {what} must be one"
    elif _TOO_MANY_FIELDS.search(text):
        reason = (
            "too many ':'-separated fields; a ':' inside a value, as in an IPv6 address, "
            "is written '\\:' (tcp6:7500:interface=\\:\\:1)"
        )
    elif match := _UNKNOWN_PARAMETER.search(text):
        reason = f"unknown parameter {match.group(1)}"
    elif match := _UNKNOWN_TYPE.search(text):
        reason = f"unknown endpoint type {match.group(1)}"
    else:
        reason = text or type(error).__name__
    return f"not a valid endpoint: {reason} ({example})"


@implementer(IStreamServerEndpoint)
class _PortRecorder:
    """An endpoint that listens as the one it wraps and notes the port it got."""

    def __init__(self, endpoint: Any, service: ListeningService) -> None:
        self._endpoint = endpoint
        self._service = service

    def listen(self, factory: Any) -> Deferred[IListeningPort]:
        def record(port: IListeningPort) -> IListeningPort:
            self._service.port = getattr(port.getHost(), "port", None)
            return port

        listening: Deferred[IListeningPort] = self._endpoint.listen(factory)
        return listening.addCallback(record)


def _reason(error: BaseException) -> str:
    if isinstance(error, CannotListenError):
        cause = error.socketError
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
    text = printable(" ".join(str(error).split()))
    return text or type(error).__name__


def refuse_start(message: str, reason_first: str | None = None) -> NoReturn:
    """Write ``enclaves: error: MESSAGE`` to the process's stderr, then stop start-up.

    By now twistd has pointed ``sys.stderr`` at its log; the line goes to the
    real one, as the refusals made before the services start do, and to the
    log (a daemon's only record).  The exception raised lets twistd remove
    its pid file and exit with status 1; its traceback is not printed.  A
    daemonizing twistd's parent prints only the first 100 bytes of the
    exception (the child's stderr is /dev/null by then), so it carries
    ``reason_first``: the same words with the reason before the option and
    endpoint, which can be long.
    """
    log.critical("start-up refused: {message}", message=message)
    stream = sys.__stderr__ or sys.stderr
    stream.write(f"enclaves: error: {message}\n")
    stream.flush()
    sys.excepthook = _quiet_about_refusals(sys.excepthook)
    raise StartupRefused(reason_first or message)


def _quiet_about_refusals(previous: Any) -> Any:
    def excepthook(kind: type[BaseException], value: BaseException, traceback: Any) -> None:
        if not isinstance(value, StartupRefused):
            previous(kind, value, traceback)

    return excepthook
