"""The admin shell's commands: a narrow admin object and the functions of its namespace.

Each command returns a Deferred firing with plain text (the shell prints it
when it fires); storage work never blocks the reactor.  See docs/admin.rst.
"""

from __future__ import annotations

import inspect
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, cast

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from enclaves.enrollment import DEFAULT_TOKEN_LIFETIME, create_enrollment
from enclaves.storage.interface import (
    InventoryEntry,
    IStorage,
    PendingSummary,
    StorageError,
    UnknownUser,
    UserRecord,
)

__all__ = [
    "Admin",
    "AdminError",
    "Command",
    "ListenerView",
    "RouterView",
    "Text",
    "address_warnings",
    "make_namespace",
]

log = Logger()

MAX_USER_ID = (1 << 64) - 1
MAX_TOKEN_HOURS = 24 * 30
_HOST_PORT = re.compile(
    r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?):(\d{1,5})$"
)


class AdminError(Exception):
    """A command refused; the message is one line for the admin."""

    admin_message = True


class Text(str):
    """A command's output: plain text, shown as is (its repr is the text)."""

    def __repr__(self) -> str:
        return str(self)


class ServerStatsView(Protocol):
    connections: int
    sessions: int
    messages_routed: int
    messages_stored: int
    messages_delivered: int
    started_at: float
    notices_kept: int
    refused_busy: int
    refused_backoff: int
    refused_share: int


class RouterView(Protocol):
    """What the admin shell needs of the server's router."""

    def is_online(self, user_id: int) -> bool: ...

    def revoke(self, user_id: int) -> defer.Deferred[int]: ...

    def stats(self) -> Any: ...


class ListenerView(Protocol):
    """What the admin shell knows of the client listener (``--listen``)."""

    @property
    def tls(self) -> bool | None: ...

    @property
    def port(self) -> int | None: ...


def address_warnings(address: str, listener: ListenerView | None) -> list[str]:
    """Lines warning that a token's ``host:port`` / ``tls:host:port`` does not
    match the client listener: TLS or not, and the port (None: unknown, as
    both are for a UNIX socket, which only a proxy can stand in front of)."""
    if listener is None:
        return []
    warnings = []
    wants_tls = address.startswith("tls:")
    if listener.tls is None:
        pass  # a UNIX socket: what the proxy in front speaks is not known here
    elif wants_tls and not listener.tls:
        warnings.append(
            "warning: the address says tls:, but this server's client listener (--listen) "
            "is plain TCP: the newcomer's client will fail unless a TLS proxy is in front"
        )
    elif listener.tls and not wants_tls:
        warnings.append(
            "warning: this server's client listener (--listen) speaks TLS, but the address "
            "has no tls: in front, so the newcomer's client will not use TLS"
        )
    port = int(address.rpartition(":")[2])
    if listener.port is not None and port != listener.port:
        warnings.append(
            f"warning: this server listens for clients on port {listener.port}, not {port}: "
            f"the newcomer's client will fail unless a proxy or NAT forwards port {port} to it"
        )
    return warnings


def format_time(unix_seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(unix_seconds))


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours:02d}:{minutes:02d}:{secs:02d}"
    return f"{days} d {clock}" if days else clock


def parse_user_id(value: object) -> int:
    """A user id as typed by the admin: an int, or a string of decimal digits."""
    if isinstance(value, bool):
        raise AdminError("a user id is a whole number, as users() prints it")
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if not isinstance(value, int):
        raise AdminError("a user id is a whole number, as users() prints it")
    if not 1 <= value <= MAX_USER_ID:
        raise AdminError(f"no user id is {value}: ids run from 1 to {MAX_USER_ID}")
    return value


def parse_host(value: object) -> str | None:
    """``host:port`` or ``tls:host:port`` for a token's ``@`` suffix, or None."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise AdminError('host must be a string "host:port", e.g. "chat.example:7500"')
    host = value.strip()
    match = _HOST_PORT.match(host.removeprefix("tls:"))
    if match is None or not 1 <= int(match.group(1)) <= 65535:
        raise AdminError(
            f'host must be "host:port" (or "tls:host:port" for a TLS listener) with a port '
            f'from 1 to 65535, e.g. "chat.example:7500"; not {host!r}'
        )
    return host


def parse_hours(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AdminError("hours must be a number, e.g. hours=2")
    if not 0 < value <= MAX_TOKEN_HOURS:
        raise AdminError(f"hours must be above 0 and at most {MAX_TOKEN_HOURS}")
    return float(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool]) -> str:
    widths = [max(len(header[i]), *(len(row[i]) for row in rows)) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        parts = [
            cell.rjust(widths[i]) if right[i] else cell.ljust(widths[i])
            for i, cell in enumerate(cells)
        ]
        return "  ".join(parts).rstrip()

    return "\n".join([line(header), *(line(row) for row in rows)])


def _as_admin_error(failure: Any) -> Any:
    failure.trap(StorageError)
    raise AdminError(str(failure.value) or type(failure.value).__name__)


class Admin:
    """What the admin may do to a running server, and nothing more.

    ``storage`` is the server's :class:`IStorage`, ``router`` its router
    (online state, revoke, counters), ``clock`` an ``IReactorTime``.
    ``files`` names the files the server holds outside the storage's own
    inventory (the SSH host key, for instance), with a description each.
    ``listener`` is the client listener: ``issue()`` warns when the address
    it is given does not match it.  Every method logs who did what (``who``
    is a printable admin identity).
    """

    def __init__(
        self,
        storage: IStorage,
        router: RouterView,
        clock: Any,
        *,
        data_dir: Path | None = None,
        files: Sequence[tuple[Path, str]] = (),
        token_lifetime: int = DEFAULT_TOKEN_LIFETIME,
        listener: ListenerView | None = None,
    ) -> None:
        self._storage = storage
        self._router = router
        self._clock = clock
        self._data_dir = Path(data_dir) if data_dir is not None else None
        self._files = tuple((Path(path), text) for path, text in files)
        self._token_lifetime = token_lifetime
        self._listener = listener

    # -- commands -------------------------------------------------------

    def issue(
        self, who: object, host: str | None = None, hours: float | None = None
    ) -> defer.Deferred[Text]:
        address = parse_host(host)
        lifetime = self._token_lifetime if hours is None else int(parse_hours(hours) * 3600)
        now_ms = int(self._clock.seconds() * 1000)

        def issued(result: tuple[Any, int]) -> Text:
            token, expires_ms = result
            if address:
                token = type(token)(token.user_id, token.keys, address)
            log.info(
                "admin {admin} issued an enrollment token for user {user_id}, expires {expires}",
                admin=str(who),
                user_id=token.user_id,
                expires=format_time(expires_ms / 1000),
            )
            warnings = address_warnings(address, self._listener) if address else []
            for warning in warnings:
                log.info("admin {admin}: {warning}", admin=str(who), warning=warning)
            return Text(
                f"enrollment token for new user {token.user_id}\n"
                f"single use, expires {format_time(expires_ms / 1000)} "
                f"(in {format_duration(lifetime)}):\n"
                f"\n  {token}\n\n"
                "Give it to the newcomer over a channel you trust; whoever holds it "
                "can enroll once." + "".join(f"\n{warning}" for warning in warnings)
            )

        d = create_enrollment(self._storage, now_ms, lifetime)
        return d.addCallbacks(issued, _as_admin_error)

    def users(self, who: object) -> defer.Deferred[Text]:
        log.info("admin {admin} listed users", admin=str(who))
        return self._records().addCallbacks(self._format_users, _as_admin_error)

    def revoke(self, who: object, user_id: object) -> defer.Deferred[Text]:
        user = parse_user_id(user_id)
        was_online = self._router.is_online(user)
        announced = True  # a user still enrolling was never listed to the others

        def revoke(enrolling: dict[int, int]) -> defer.Deferred[int]:
            nonlocal announced
            announced = user not in enrolling
            return defer.maybeDeferred(self._router.revoke, user)

        def revoked(deleted: int) -> Text:
            log.info(
                "admin {admin} revoked user {user_id}: {deleted} pending message(s) deleted"
                "{online}",
                admin=str(who),
                user_id=user,
                deleted=deleted,
                online=", session closed" if was_online else "",
            )
            session = "its session was closed" if was_online else "it was offline"
            others = (
                "the others are told it was removed"
                if announced
                else "its token was never used, so nobody else knew of it"
            )
            return Text(
                f"revoked user {user}: key deleted, {deleted} pending message(s) "
                f"deleted, {session}; {others}"
            )

        def failed(failure: Any) -> Any:
            if failure.check(UnknownUser):
                log.info(
                    "admin {admin} tried to revoke unknown user {user_id}",
                    admin=str(who),
                    user_id=user,
                )
                raise AdminError(f"no user {user} (users() lists them)")
            return _as_admin_error(failure)

        d: defer.Deferred[dict[int, int]] = defer.maybeDeferred(self._storage.enrollments)
        return d.addCallback(revoke).addCallbacks(revoked, failed)

    def pending(self, who: object) -> defer.Deferred[Text]:
        log.info("admin {admin} listed pending messages", admin=str(who))
        d: defer.Deferred[dict[int, PendingSummary]] = defer.maybeDeferred(
            self._storage.pending_summary
        )
        return d.addCallbacks(lambda s: Text(self._format_pending(s)), _as_admin_error)

    def stats(self, who: object) -> defer.Deferred[Text]:
        log.info("admin {admin} read the statistics", admin=str(who))
        return defer.maybeDeferred(self._router.stats).addCallback(self._format_stats)

    def inventory(self, who: object) -> defer.Deferred[Text]:
        log.info("admin {admin} read the inventory", admin=str(who))
        entries = defer.maybeDeferred(self._storage.inventory)
        records = self._records()
        summary = defer.maybeDeferred(self._storage.pending_summary)
        d: defer.Deferred[list[Any]] = defer.gatherResults(
            [entries, records, summary],
            consumeErrors=True,
        )

        def unwrap(failure: Any) -> Any:
            failure.trap(defer.FirstError)
            return failure.value.subFailure

        return (
            d.addErrback(unwrap)
            .addCallback(lambda results: self._format_inventory(*results))
            .addErrback(_as_admin_error)
        )

    # -- formatting -------------------------------------------------------

    def _records(self) -> defer.Deferred[list[UserRecord]]:
        def load_all(user_ids: list[int]) -> defer.Deferred[list[UserRecord]]:
            loads = [defer.maybeDeferred(self._storage.load_user, uid) for uid in user_ids]
            gathered = defer.gatherResults(loads, consumeErrors=True)
            gathered.addErrback(_first_error)
            return gathered.addCallback(lambda rs: [r for r in rs if r is not None])

        return defer.maybeDeferred(self._storage.list_users).addCallback(load_all)

    def _state(self, record: UserRecord) -> str:
        if record.enrollment_expires_ms is None:
            return "enrolled"
        expires = record.enrollment_expires_ms / 1000
        if expires <= self._clock.seconds():
            return f"token expired {format_time(expires)}"
        return f"enrolling until {format_time(expires)}"

    def _format_users(self, records: list[UserRecord]) -> Text:
        if not records:
            return Text("no users yet (issue() makes an enrollment token)")
        rows = []
        online = 0
        for record in records:
            is_online = self._router.is_online(record.user_id)
            online += is_online
            rows.append(
                [str(record.user_id), self._state(record), "online" if is_online else "offline"]
            )
        head = f"{len(records)} user(s), {online} online"
        table = _table(["user id", "state", "now"], rows, [True, False, False])
        return Text(f"{head}\n{table}")

    @staticmethod
    def _format_pending(summary: dict[int, PendingSummary]) -> str:
        if not summary:
            return "no pending messages"
        count = sum(s.count for s in summary.values())
        size = sum(s.size for s in summary.values())
        rows = [[str(uid), str(s.count), str(s.size)] for uid, s in sorted(summary.items())]
        head = f"{count} pending message(s), {size} bytes, for {len(summary)} recipient(s)"
        table = _table(["recipient", "messages", "bytes"], rows, [True, True, True])
        return f"{head}\n{table}"

    @staticmethod
    def _format_stats(stats: Any) -> Text:
        rows = [
            ["connections", str(stats.connections)],
            ["sessions", str(stats.sessions)],
            [
                "connections refused",
                f"{stats.refused_busy + stats.refused_backoff + stats.refused_share}: "
                f"{stats.refused_busy} server full, "
                f"{stats.refused_backoff} backing off, "
                f"{stats.refused_share} over the per-address share",
            ],
            ["messages routed", str(stats.messages_routed)],
            ["messages stored", str(stats.messages_stored)],
            ["messages delivered", str(stats.messages_delivered)],
            ["notices kept", str(stats.notices_kept)],
            [
                "uptime",
                f"{format_duration(stats.uptime)} (since {format_time(stats.started_at)})",
            ],
        ]
        width = max(len(name) for name, _ in rows)
        return Text("\n".join(f"{name.ljust(width)}  {value}" for name, value in rows))

    def _name_of(self, path: Path) -> str:
        if self._data_dir is not None and path.is_relative_to(self._data_dir):
            return str(path.relative_to(self._data_dir))
        return str(path)

    def _with_known_files(self, entries: list[InventoryEntry]) -> list[InventoryEntry]:
        """Name the files the storage does not know (host key), add those outside it."""
        known = {self._name_of(path): (path, text) for path, text in self._files}
        result = []
        for entry in entries:
            if entry.name in known:
                entry = InventoryEntry(entry.name, entry.size, known.pop(entry.name)[1])
            result.append(entry)
        for name, (path, text) in known.items():
            try:
                size = path.stat().st_size  # a stat or two, off no disk-heavy path
            except OSError:
                continue
            result.append(InventoryEntry(name, size, text))
        return result

    def _format_inventory(
        self,
        entries: list[InventoryEntry],
        records: list[UserRecord],
        summary: dict[int, PendingSummary],
    ) -> Text:
        every = self._with_known_files(entries)
        total = sum(entry.size for entry in every)
        where = f" (data dir {self._data_dir})" if self._data_dir is not None else ""
        lines = [f"Everything this server holds{where}: {len(every)} file(s), {total} bytes"]
        if every:
            lines.append(
                _table(
                    ["file", "bytes", "what"],
                    [[e.name, str(e.size), e.description] for e in every],
                    [False, True, False],
                )
            )
        lines.append("")
        lines.append(self._format_users(records))
        lines.append("")
        lines.append(self._format_pending(summary))
        return Text("\n".join(lines))


# The shell's namespace -------------------------------------------------------


class Command:
    """One shell command: checks its arguments, shows usage on a bad call."""

    def __init__(self, function: Callable[..., Any]) -> None:
        self._function = function
        self.__name__ = function.__name__
        self.__doc__ = inspect.cleandoc(function.__doc__ or "")
        self.signature = inspect.signature(function)
        plain = self.signature.replace(
            parameters=[
                p.replace(annotation=inspect.Parameter.empty)
                for p in self.signature.parameters.values()
            ],
            return_annotation=inspect.Signature.empty,
        )
        self.usage = f"{self.__name__}{plain}"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as error:
            raise AdminError(f"{error}; usage: {self.usage}") from None
        return self._function(*bound.args, **bound.kwargs)

    def summary(self) -> str:
        return self.__doc__.splitlines()[0] if self.__doc__ else ""

    def __repr__(self) -> str:
        return f"{self.usage}: {self.summary()} (help({self.__name__}) for more)"


def make_namespace(admin: Admin, who: object) -> dict[str, Any]:
    """The shell's namespace for one admin: the commands, bound to ``who`` for the log."""

    def issue(host: str | None = None, hours: float | None = None) -> Any:
        """Make an enrollment token for a new user and print it.

        The token is single use and expires after --token-lifetime (24
        hours unless the server was started with another), or ``hours`` (at
        most 720).  ``host`` ("chat.example:7500", or "tls:chat.example:7500"
        for a TLS listener) is appended to the token so the newcomer's
        client knows where and how to connect; a warning follows the token
        when it is not this server's client listener (TLS or not, port).
        Give the token to the newcomer over a channel you trust: whoever
        holds it can enroll once.
        Example: issue("chat.example:7500")
        """
        return admin.issue(who, host, hours)

    def users() -> Any:
        """List every user id, its enrollment state and whether it is online.

        States: "enrolled", "enrolling until <time>" (token not used yet) or
        "token expired <time>" (revoke it and issue a new one).
        """
        return admin.users(who)

    def revoke(user_id: int) -> Any:
        """Remove a user: delete its key and pending messages, close its session.

        The other users' clients are told it was removed (if it had
        enrolled), and senders of its deleted messages that they will never
        be delivered.  A revoked user can only come back with a new token
        from issue().
        Example: revoke(1234567890)
        """
        return admin.revoke(who, user_id)

    def pending() -> Any:
        """Count the stored (not yet delivered) messages and their bytes per recipient."""
        return admin.pending(who)

    def stats() -> Any:
        """Show connections, sessions, messages routed/stored/delivered and uptime."""
        return admin.stats(who)

    def inventory() -> Any:
        """List everything this server holds, file by file, with users and pending messages.

        For an admin or auditor to check that nothing else is kept: user key
        files, pending message files, the server key, the admin keys file
        and the SSH host key.
        A file in the data directory that Enclaves did not write shows up as
        "unexpected file".
        """
        return admin.inventory(who)

    commands: dict[str, Command] = {}

    def help(command: object = None) -> Text:
        """Show the commands, or one command's help: help(issue)."""
        if command is None:
            width = max(len(c.usage) for c in commands.values())
            lines = ["Commands (each prints plain text):"]
            lines += [f"  {c.usage.ljust(width)}  {c.summary()}" for c in commands.values()]
            lines.append("help(issue) shows one command in full; Ctrl-D leaves the shell.")
            return Text("\n".join(lines))
        name = command if isinstance(command, str) else getattr(command, "__name__", None)
        if name not in commands:
            raise AdminError(f"no command {command!r}; help() lists them")
        chosen = commands[str(name)]
        return Text(f"{chosen.usage}\n\n{chosen.__doc__}")

    for function in (issue, users, revoke, pending, stats, inventory, help):
        commands[function.__name__] = Command(function)
    return dict(commands)


def _first_error(failure: Failure) -> Failure:
    """Unwrap gatherResults' FirstError into the failure that caused it."""
    failure.trap(defer.FirstError)
    return cast(Failure, failure.value.subFailure)  # type: ignore[union-attr]
