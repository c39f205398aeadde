"""``twistd enclaves``: command-line options and service wiring, nothing more."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from twisted.application.internet import TimerService
from twisted.application.service import IService, MultiService
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python import usage

from enclaves.admin import Admin, make_namespace
from enclaves.enrollment import DEFAULT_TOKEN_LIFETIME
from enclaves.frames import DEFAULT_MAX_FRAME, MAX_FRAME
from enclaves.server.lifecycle import (
    CleanExitOnSignals,
    DisconnectOnStop,
    FreezeStartupObjects,
)
from enclaves.server.listening import ListeningService, listening_service
from enclaves.server.protocol import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_HANDSHAKES_PER_ADDRESS,
    ServerFactory,
)
from enclaves.server.router import DEFAULT_MAX_ENROLLMENTS, DEFAULT_MESSAGE_RATE, Router
from enclaves.serverkey import StartupError, open_server_key
from enclaves.storage.filestore import FileStorage
from enclaves.storage.interface import StorageError

__all__ = ["Options", "makeService"]

log = Logger()

#: Admin keys file used when --admin-keys is not given and it exists.
ADMIN_KEYS_FILE = "admin_keys"
# The smallest --max-frame: an OFFER (1,253 bytes) or ACCEPT (1,173) in a SEND,
# sealed, fits with room to spare, and DIRECTORY parts carry ~500 ids each.
MIN_MAX_FRAME = 4096


def _positive_int(name: str, minimum: int = 1, maximum: int = 1 << 31) -> Any:
    def coerce(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise ValueError(f"{name} must be a whole number, not {value!r}") from None
        if not minimum <= number <= maximum:
            raise ValueError(f"{name} must be between {minimum} and {maximum}")
        return number

    coerce.coerceDoc = f"An integer from {minimum} to {maximum}."  # type: ignore[attr-defined]
    return coerce


class Options(usage.Options):
    """Options of ``twistd enclaves``; see docs/admin.rst."""

    synopsis = "[options]"
    longdesc = (
        "Run an Enclaves routing server. The server stores and routes only "
        "end-to-end encrypted messages; its own files are encrypted at rest "
        "with the server key."
    )
    optParameters = [
        ["listen", "l", "tcp:7500", "Client endpoint (strports), e.g. tcp:7500 or ssl:7500:..."],
        ["data-dir", "d", "enclaves-data", "Directory for users, pending messages and keys."],
        ["key-file", "k", None, "Server key file (default: DATA-DIR/server.key)."],
        [
            "max-frame",
            None,
            DEFAULT_MAX_FRAME,
            "Largest frame sent, in bytes; bounds the largest message taken "
            "(frames up to 65536, the protocol's limit, are always accepted).",
            _positive_int("max-frame", MIN_MAX_FRAME, MAX_FRAME),
        ],
        [
            "manhole",
            None,
            "tcp:7522:interface=127.0.0.1",
            "SSH admin shell endpoint (on only when there are admin keys: "
            "--admin-keys FILE, or DATA-DIR/admin_keys).",
        ],
        [
            "admin-keys",
            None,
            None,
            "OpenSSH authorized_keys file of admin public keys "
            "(default: DATA-DIR/admin_keys if it exists).",
        ],
        [
            "max-connections",
            None,
            DEFAULT_MAX_CONNECTIONS,
            "Most client connections at once; more get SERVER_BUSY.",
            _positive_int("max-connections", 1, 1_000_000),
        ],
        [
            "max-handshakes-per-address",
            None,
            None,
            "Most connections from one address (IPv6: one /64) not logged in yet; "
            f"more get RATE_LIMITED (default: {DEFAULT_MAX_HANDSHAKES_PER_ADDRESS}, "
            "or a quarter of --max-connections if less; 0: no such limit)",
            _positive_int("max-handshakes-per-address", 0, 1_000_000),
        ],
        [
            "handshake-timeout",
            None,
            DEFAULT_HANDSHAKE_TIMEOUT,
            "Seconds a new connection has to complete its handshake.",
            _positive_int("handshake-timeout", 1, 3600),
        ],
        [
            "idle-timeout",
            None,
            DEFAULT_IDLE_TIMEOUT,
            "Seconds without traffic before a session is closed "
            "(the server PINGs after half of it).",
            _positive_int("idle-timeout", 2, 86400),
        ],
        [
            "message-rate",
            None,
            DEFAULT_MESSAGE_RATE,
            "Most requests per second per session (bursts up to as many).",
            _positive_int("message-rate", 1, 10_000_000),
        ],
        [
            "token-lifetime",
            None,
            DEFAULT_TOKEN_LIFETIME,
            "Seconds an enrollment token (issue() or INVITE) stays valid.",
            _positive_int("token-lifetime", 60, 365 * 86400),
        ],
        [
            "max-enrollments",
            None,
            DEFAULT_MAX_ENROLLMENTS,
            "Most outstanding enrollments (unused, unexpired tokens) INVITE may create.",
            _positive_int("max-enrollments", 1, 10_000_000),
        ],
        [
            "max-pending",
            None,
            1000,
            "Most pending (stored) messages per recipient.",
            _positive_int("max-pending", 1, 10_000_000),
        ],
        [
            "max-pending-bytes",
            None,
            64 * 1024 * 1024,
            "Most bytes of pending messages per recipient.",
            _positive_int("max-pending-bytes", 1024, 1 << 40),
        ],
    ]
    optFlags = [
        ["allow-invites", None, "Let enrolled users ask for tokens for newcomers (INVITE)."],
    ]

    def postOptions(self) -> None:
        self["data-dir"] = Path(self["data-dir"]).absolute()
        if self["key-file"] is not None:
            self["key-file"] = Path(self["key-file"]).absolute()
        if self["admin-keys"] is None:
            default = self["data-dir"] / ADMIN_KEYS_FILE
            if default.is_file():
                self["admin-keys"] = default
        else:
            path = Path(self["admin-keys"]).absolute()
            if not path.is_file():
                raise usage.UsageError(f"--admin-keys: no such file: {path}")
            self["admin-keys"] = path


def makeService(options: Options, reactor: Any = None) -> IService:
    """Wire the server's services; refuse to start with a one-line error."""
    try:
        keys, created = open_server_key(options["data-dir"], options["key-file"])
    except StartupError as error:
        sys.stderr.write(f"enclaves: error: {error}\n")
        raise SystemExit(1) from None
    key_path = options["key-file"] or options["data-dir"] / "server.key"
    if created:
        log.info(
            "created server key {key_file} (data directory {data_dir})",
            data_dir=str(options["data-dir"]),
            key_file=str(key_path),
        )
    else:
        log.info(
            "data directory {data_dir}, server key {key_file}",
            data_dir=str(options["data-dir"]),
            key_file=str(key_path),
        )
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    storage = FileStorage(
        options["data-dir"],
        keys,
        max_pending_count=options["max-pending"],
        max_pending_bytes=options["max-pending-bytes"],
        reactor=reactor,
    )
    try:
        # Read the data directory now: a refusal is a one-line error, and the
        # listener below can never accept a client before storage is ready.
        storage.load()
    except StorageError as error:
        sys.stderr.write(f"enclaves: error: {error}\n")
        raise SystemExit(1) from None
    top = MultiService()
    CleanExitOnSignals(reactor).setServiceParent(top)
    # Before the listener: MultiService starts children in order and stops
    # them in reverse, so storage outlives every connection.
    storage.setServiceParent(top)
    router = Router(
        storage,
        reactor,
        max_frame=options["max-frame"],
        message_rate=options["message-rate"],
        allow_invites=bool(options["allow-invites"]),
        token_lifetime=options["token-lifetime"],
        max_enrollments=options["max-enrollments"],
    )
    # At start-up and hourly: users whose token expired a week ago unused go.
    purge = TimerService(3600, _purge_enrollments, router)
    purge.clock = reactor
    purge.setServiceParent(top)
    factory = ServerFactory(
        router,
        storage,
        reactor,
        max_frame=options["max-frame"],
        max_connections=options["max-connections"],
        handshake_timeout=options["handshake-timeout"],
        idle_timeout=options["idle-timeout"],
        max_handshakes_per_address=options["max-handshakes-per-address"],
    )
    # Stopped before storage (services stop in reverse order): clients hear
    # SHUTTING_DOWN and in-flight messages reach storage first.
    DisconnectOnStop(factory).setServiceParent(top)
    try:
        listener = listening_service("--listen", options["listen"], factory, reactor)
    except StartupError as error:
        sys.stderr.write(f"enclaves: error: {error}\n")
        raise SystemExit(1) from None
    listener.setServiceParent(top)
    shell = _admin_shell(options, storage, router, key_path, reactor, listener)
    if shell is not None:
        shell.setServiceParent(top)
    FreezeStartupObjects(reactor).setServiceParent(top)
    return top


def _purge_enrollments(router: Router) -> Any:
    return router.purge_expired_enrollments().addErrback(
        lambda f: log.failure("purging expired enrollments failed", f)
    )


def _admin_shell(
    options: Options,
    storage: Any,
    router: Any,
    key_path: Path,
    reactor: Any,
    listener: ListeningService,
) -> IService | None:
    """The SSH admin shell's service, or None (with a log line saying why it is off)."""
    if options["admin-keys"] is None:
        # Off, but a --manhole that does not parse is still a mistake to say now.
        try:
            listening_service("--manhole", options["manhole"], Factory(), reactor)
        except StartupError as error:
            sys.stderr.write(f"enclaves: error: {error}\n")
            raise SystemExit(1) from None
        log.info(
            "admin shell is off: put admin SSH public keys in {path} "
            "(authorized_keys format) or start with --admin-keys FILE",
            path=str(options["data-dir"] / ADMIN_KEYS_FILE),
        )
        return None
    # Imported here: conch is loaded only when the shell is on.
    from enclaves.manhole import HOST_KEY_FILE, manhole_service

    data_dir = options["data-dir"]
    admin_keys = Path(options["admin-keys"])
    files = [
        (Path(key_path), "server key"),
        (admin_keys, "admin keys of the admin shell (SSH public keys)"),
        (data_dir / HOST_KEY_FILE, "SSH host key of the admin shell (private)"),
        (data_dir / f"{HOST_KEY_FILE}.pub", "SSH host key of the admin shell (public)"),
    ]
    if admin_keys != data_dir / ADMIN_KEYS_FILE:
        # Listed if it is there: an admin keys file this server does not read.
        files.append((data_dir / ADMIN_KEYS_FILE, "admin keys, not read (--admin-keys is another)"))
    admin = Admin(
        storage,
        router,
        reactor,
        data_dir=data_dir,
        token_lifetime=options["token-lifetime"],
        files=files,
        listener=listener,
    )
    try:
        return manhole_service(
            options["manhole"],
            options["admin-keys"],
            data_dir,
            lambda who: make_namespace(admin, who),
            reactor,
        )
    except StartupError as error:
        sys.stderr.write(f"enclaves: error: {error}\n")
        raise SystemExit(1) from None
