"""The admin commands over MemoryStorage: output text, argument errors, logging."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import attrs
import pytest
from twisted.internet import defer, task
from twisted.logger import LogEvent, formatEvent, globalLogPublisher

from enclaves.admin import Admin, AdminError, Text, make_namespace
from enclaves.crypto import KeyPair
from enclaves.storage.interface import UnknownUser
from enclaves.storage.memory import MemoryStorage
from enclaves.token import parse_token

NOW = 1_800_000_000.0


@attrs.define
class Stats:
    connections: int = 3
    sessions: int = 2
    messages_routed: int = 10
    messages_stored: int = 4
    messages_delivered: int = 6
    notices_kept: int = 2
    refused_busy: int = 1
    refused_backoff: int = 20
    refused_share: int = 300
    started_at: float = NOW - 93784

    @property
    def uptime(self) -> float:
        return NOW - self.started_at


class SmallRouter:
    """The router's admin-facing surface over a storage (the real Router is tested
    with the server; the system test runs the shell against it)."""

    def __init__(self, storage: MemoryStorage) -> None:
        self.storage = storage
        self.online: set[int] = set()
        self.revoked: list[int] = []

    def is_online(self, user_id: int) -> bool:
        return user_id in self.online

    def revoke(self, user_id: int) -> defer.Deferred[int]:
        self.revoked.append(user_id)
        self.online.discard(user_id)
        return self.storage.remove_user(user_id).addCallback(len)

    def stats(self) -> Stats:
        return Stats()


@pytest.fixture
def logged() -> Any:
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def text_of(events: list[LogEvent]) -> str:
    return "\n".join(formatEvent(event) for event in events)


def setup(tmp_path: Path | None = None) -> tuple[dict[str, Any], MemoryStorage, SmallRouter]:
    storage = MemoryStorage()
    router = SmallRouter(storage)
    clock = task.Clock()
    clock.advance(NOW)
    files = []
    if tmp_path is not None:
        (tmp_path / "ssh_host_ed25519_key").write_bytes(b"x" * 411)
        (tmp_path.parent / "elsewhere.key").write_bytes(b"k" * 64)
        files = [
            (tmp_path / "ssh_host_ed25519_key", "SSH host key of the admin shell"),
            (tmp_path.parent / "elsewhere.key", "server key"),
            (tmp_path / "absent", "never listed: does not exist"),
        ]
    admin = Admin(storage, router, clock, data_dir=tmp_path, files=files)
    return make_namespace(admin, "alice key SHA256:abc"), storage, router


def result(d: defer.Deferred[Any]) -> Any:
    """The result of an already-fired Deferred (MemoryStorage fires at once)."""
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "MemoryStorage Deferreds fire at once"
    if isinstance(box[0], Exception) or hasattr(box[0], "raiseException"):
        box[0].raiseException()
    return box[0]


def test_issue_prints_token_id_and_expiry_never_logs_token(logged: list[LogEvent]) -> None:
    ns, storage, _ = setup()
    out = result(ns["issue"]("chat.example:7500"))
    assert isinstance(out, Text)
    token_text = re.search(r"enclaves1:\S+", out).group(0)
    token = parse_token(token_text)
    assert token.address == "chat.example:7500"
    assert f"new user {token.user_id}" in out
    assert "expires 2027-01-16 08:00 UTC (in 1 d 00:00:00)" in out
    record = result(storage.load_user(token.user_id))
    assert record.keys == token.keys and record.enrolling
    assert record.enrollment_expires_ms == int(NOW * 1000) + 24 * 3600 * 1000
    log = text_of(logged)
    assert f"issued an enrollment token for user {token.user_id}" in log
    assert "alice key SHA256:abc" in log
    assert token_text.split("@")[0] not in log and token_text[10:40] not in log


def test_issue_without_host_and_with_hours() -> None:
    ns, _, _ = setup()
    out = result(ns["issue"](hours=2))
    assert "@" not in re.search(r"enclaves1:\S+", out).group(0)
    assert "(in 02:00:00)" in out


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (("chat.example",), {}, "host must be"),
        (("chat.example:0",), {}, "port from 1 to 65535"),
        (("chat.example:99999",), {}, "port from 1 to 65535"),
        ((7500,), {}, "host must be a string"),
        (("a b:7500",), {}, "host must be"),
        (("tls:chat.example",), {}, "host must be"),
        (("ssl:chat.example:7500",), {}, "host must be"),
        ((), {"hours": 0}, "hours must be above 0"),
        ((), {"hours": "2"}, "hours must be a number"),
        (("x:1", 2, 3), {}, "usage: issue(host"),
        ((), {"lifetime": 3}, "usage: issue(host"),
    ],
)
def test_issue_argument_errors(args: tuple[Any, ...], kwargs: dict[str, Any], message: str) -> None:
    ns, storage, _ = setup()
    with pytest.raises(AdminError, match=re.escape(message)) as info:
        ns["issue"](*args, **kwargs)
    assert "\n" not in str(info.value)
    assert result(storage.list_users()) == []


@pytest.mark.parametrize("host", ["[::1]:7500", "tls:chat.example:7500", "tls:[::1]:7500"])
def test_issue_ipv6_and_tls_hosts_accepted(host: str) -> None:
    ns, _, _ = setup()
    out = result(ns["issue"](host))
    assert parse_token(re.search(r"enclaves1:\S+", out).group(0)).address == host


def test_users_states_and_online() -> None:
    ns, storage, router = setup()
    assert result(ns["users"]()) == "no users yet (issue() makes an enrollment token)"
    result(storage.add_user(11, KeyPair.generate(), None))
    result(storage.add_user(22, KeyPair.generate(), int((NOW + 3600) * 1000)))
    result(storage.add_user(33, KeyPair.generate(), int((NOW - 60) * 1000)))
    router.online.add(11)
    out = result(ns["users"]())
    lines = out.splitlines()
    assert lines[0] == "3 user(s), 1 online"
    assert lines[1].split() == ["user", "id", "state", "now"]
    assert lines[2].split() == ["11", "enrolled", "online"]
    assert " ".join(lines[3].split()) == "22 enrolling until 2027-01-15 09:00 UTC offline"
    assert " ".join(lines[4].split()) == "33 token expired 2027-01-15 07:59 UTC offline"


def test_revoke(logged: list[LogEvent]) -> None:
    ns, storage, router = setup()
    result(storage.add_user(11, KeyPair.generate(), None))
    result(storage.add_user(22, KeyPair.generate(), None))
    result(storage.store_message(11, 22, b"m" * 16, b"blob"))
    router.online.add(11)
    out = result(ns["revoke"]("11"))
    assert out.startswith("revoked user 11: key deleted, 1 pending message(s) deleted")
    assert out.endswith("its session was closed; the others are told it was removed")
    assert router.revoked == [11]
    assert result(storage.list_users()) == [22]
    assert "admin alice key SHA256:abc revoked user 11" in text_of(logged)
    with pytest.raises(AdminError, match=r"no user 11 \(users\(\) lists them\)"):
        result(ns["revoke"](11))


def test_revoking_an_unused_token_says_nobody_else_knew_of_it() -> None:
    ns, storage, _ = setup()
    result(storage.add_user(11, KeyPair.generate(), 10**13))  # enrolling
    out = result(ns["revoke"](11))
    assert out.endswith("it was offline; its token was never used, so nobody else knew of it")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "missing a required argument: 'user_id'; usage: revoke(user_id"),
        ((1, 2), "too many positional arguments; usage: revoke(user_id"),
        (("bob",), "a user id is a whole number"),
        ((True,), "a user id is a whole number"),
        ((0,), "no user id is 0"),
        ((1 << 64,), "ids run from 1 to"),
        ((1.5,), "a user id is a whole number"),
    ],
)
def test_revoke_argument_errors(args: tuple[Any, ...], message: str) -> None:
    ns, _, router = setup()
    with pytest.raises(AdminError, match=re.escape(message)):
        ns["revoke"](*args)
    assert router.revoked == []


def test_revoke_storage_failure_is_one_line() -> None:
    ns, storage, _ = setup()
    result(storage.add_user(11, KeyPair.generate(), None))
    storage.fail_writes = True
    with pytest.raises(AdminError, match=r"^the disk refused the write$"):
        result(ns["revoke"](11))


def test_revoke_unknown_user_from_router() -> None:
    ns, _, router = setup()
    router.revoke = lambda uid: defer.fail(UnknownUser(f"no user {uid}"))  # type: ignore[method-assign]
    with pytest.raises(AdminError, match="no user 5"):
        result(ns["revoke"](5))


def test_pending() -> None:
    ns, storage, _ = setup()
    assert result(ns["pending"]()) == "no pending messages"
    for uid in (11, 22):
        result(storage.add_user(uid, KeyPair.generate(), None))
    result(storage.store_message(11, 22, b"a" * 16, b"x" * 100))
    result(storage.store_message(11, 22, b"b" * 16, b"x" * 50))
    result(storage.store_message(22, 11, b"c" * 16, b"x" * 7))
    lines = result(ns["pending"]()).splitlines()
    assert lines[0] == "3 pending message(s), 157 bytes, for 2 recipient(s)"
    assert [line.split() for line in lines[2:]] == [["11", "2", "150"], ["22", "1", "7"]]


def test_stats() -> None:
    ns, _, _ = setup()
    lines = result(ns["stats"]()).splitlines()
    assert [" ".join(line.split()) for line in lines] == [
        "connections 3",
        "sessions 2",
        "connections refused 321: 1 server full, 20 backing off, 300 over the per-address share",
        "messages routed 10",
        "messages stored 4",
        "messages delivered 6",
        "notices kept 2",
        "uptime 1 d 02:03:04 (since 2027-01-14 05:56 UTC)",
    ]


def test_inventory_lists_files_users_pending_and_known_files(tmp_path: Path) -> None:
    ns, storage, _ = setup(tmp_path)
    for uid in (11, 22):
        result(storage.add_user(uid, KeyPair.generate(), None))
    result(storage.store_message(11, 22, b"a" * 16, b"x" * 100))
    out = result(ns["inventory"]())
    assert out.startswith(f"Everything this server holds (data dir {tmp_path}): 5 file(s)")
    assert re.search(r"11\.user +80 +user 11", out)
    assert re.search(r"\.msg +100 +message for 11", out)
    assert re.search(r"ssh_host_ed25519_key +411 +SSH host key of the admin shell", out)
    assert re.search(rf"{tmp_path.parent / 'elsewhere.key'} +64 +server key", out)
    assert "absent" not in out
    assert "2 user(s), 0 online" in out
    assert "1 pending message(s), 100 bytes, for 1 recipient(s)" in out


def test_help_lists_every_command_and_shows_each() -> None:
    ns, _, _ = setup()
    out = ns["help"]()
    for name in ("issue", "users", "revoke", "pending", "stats", "inventory", "help"):
        assert f"  {name}(" in out
        assert ns[name].__doc__
        one = ns["help"](ns[name])
        assert one.startswith(f"{name}(") and ns[name].__doc__ in one
    assert ns["help"]("revoke") == ns["help"](ns["revoke"])
    with pytest.raises(AdminError, match="no command 'nope'"):
        ns["help"]("nope")
    assert repr(ns["revoke"]).startswith("revoke(user_id): Remove a user")


@attrs.define
class Listener:
    tls: bool | None = False
    port: int | None = 7500


@pytest.mark.parametrize(
    ("address", "listener", "expected"),
    [
        ("chat.example:7500", Listener(), []),
        ("tls:chat.example:7500", Listener(tls=True), []),
        ("127.0.0.1:7500", None, []),
        ("tls:127.0.0.1:7500", Listener(), ["says tls:, but this server's client listener"]),
        ("127.0.0.1:7500", Listener(tls=True), ["speaks TLS, but the address has no tls:"]),
        ("127.0.0.1:7599", Listener(), ["listens for clients on port 7500, not 7599"]),
        ("chat.example:443", Listener(port=None), []),
        # A UNIX socket (unix:): whatever is in front of it may speak TLS or not.
        ("tls:chat.example:443", Listener(tls=None, port=None), []),
        ("chat.example:7500", Listener(tls=None, port=None), []),
        (
            "tls:[::1]:7599",
            Listener(),
            ["says tls:, but", "listens for clients on port 7500, not 7599"],
        ),
    ],
)
def test_address_warnings(address: str, listener: Listener | None, expected: list[str]) -> None:
    from enclaves.admin import address_warnings

    warnings = address_warnings(address, listener)
    assert len(warnings) == len(expected), warnings
    for warning, part in zip(warnings, expected, strict=True):
        assert warning.startswith("warning: ") and part in warning and "\n" not in warning


def test_issue_for_an_address_the_server_does_not_listen_on_warns_but_issues() -> None:
    storage = MemoryStorage()
    clock = task.Clock()
    admin = Admin(storage, SmallRouter(storage), clock, listener=Listener(port=7500))
    ns = make_namespace(admin, "alice")
    out = result(ns["issue"]("tls:127.0.0.1:7599", hours=1))
    token = parse_token(re.search(r"enclaves1:\S+", out).group(0))
    assert token.address == "tls:127.0.0.1:7599"
    assert result(storage.load_user(token.user_id)).enrolling
    lines = out.splitlines()
    assert lines[-2].startswith("warning: the address says tls:, but this server's client")
    assert lines[-1].startswith("warning: this server listens for clients on port 7500, not 7599")
    matching = result(ns["issue"]("chat.example:7500"))
    assert "warning" not in matching
