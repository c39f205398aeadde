"""Join benchmark: what it costs the 1,001st user to join a server of 1,000; JSON out.

    python bench/join.py [--users 1000] [--online 1000] [--workers N] [--timeout 600]

A real ``twistd -n enclaves`` holds ``--users`` enrolled users and one
newcomer with an enrollment token, all made on disk before it starts.
``--online`` of the existing users are connected, each a real
:class:`enclaves.client.core.ClientCore` in one of ``--workers`` processes,
which answers an OFFER with a real ACCEPT (hybrid X25519 + ML-KEM-768).

The newcomer, in a process of its own, logs in with its token, ROTATEs to
fresh keys, receives the DIRECTORY and offers a key exchange to every user in
it, paced under the server's ``--message-rate`` (a client that sent 1,000
OFFERs at once would be disconnected with MESSAGE_RATE).  Offers to offline
users are stored by the server for later; the clock stops when the newcomer
has pair keys with every online user.

Reported: the DIRECTORY inner message in bytes; the number and sizes of OFFER
and ACCEPT blobs; the newcomer's bytes on the wire both ways; seconds from
connecting to WELCOME, ROTATED, DIRECTORY, the last OFFER sent, and pair keys
with every online user (``seconds_to_all_pair_keys``); the server's CPU
seconds over the join; and how many online users heard JOINED.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Control, Worker, cpu_seconds, make_users, read_users, wait_for

FIRST_ID = 1000


# -- the orchestrator ------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tests.daemon import Daemon

    deadline = time.monotonic() + args.timeout
    existing = [FIRST_ID + i for i in range(args.users)]
    online = existing[: args.online]
    newcomer = FIRST_ID + args.users
    result: dict[str, Any] = {
        "users": args.users,
        "online": args.online,
        "workers": args.workers,
        "server_message_rate": args.message_rate,
        "newcomer_pace_per_s": args.pace * args.message_rate,
    }
    with tempfile.TemporaryDirectory(prefix="enclaves-join-") as tmp:
        work = Path(tmp)
        daemon = Daemon(
            work,
            f"--message-rate={args.message_rate}",
            "--max-connections=100000",
            # Every bench client connects from 127.0.0.1: no per-address share.
            "--max-handshakes-per-address=100000",
        )
        users_path = work / "users.json"
        make_users(daemon.data_dir, existing, [newcomer], users_path)
        daemon.start(timeout=60)
        workers: list[Worker] = []
        try:
            for n in range(args.workers):
                config = {
                    "port": daemon.port,
                    "users": str(users_path),
                    "ids": online[n :: args.workers],
                    "deadline": time.time() + args.timeout + 30,
                }
                path = work / f"existing{n}.json"
                path.write_text(json.dumps(config))
                workers.append(Worker("bench.join", "existing", str(path)))

            def total_of(key: str) -> int:
                return sum(int(w.status().get(key, 0)) for w in workers)

            def check_alive() -> bool:
                if not all(w.alive() for w in workers):
                    raise RuntimeError("a join worker died; see its stderr above")
                return False

            t0 = time.monotonic()
            if not wait_for(lambda: check_alive() or total_of("ready") == len(online), deadline):
                raise RuntimeError(f"only {total_of('ready')} online users ready in time")
            result["existing_connect_seconds"] = round(time.monotonic() - t0, 2)
            assert daemon.process is not None
            pid = daemon.process.pid
            result["server_rss_kib_with_online_users"] = _rss(pid)
            cpu0 = cpu_seconds(pid)
            config = {
                "port": daemon.port,
                "users": str(users_path),
                "id": newcomer,
                "online": online,
                "pace": args.pace * args.message_rate,
                "deadline": time.time() + max(1.0, deadline - time.monotonic()),
            }
            path = work / "newcomer.json"
            path.write_text(json.dumps(config))
            joiner = Worker("bench.join", "newcomer", str(path))
            wait_for(lambda: joiner.result is not None or not joiner.alive(), deadline, 0.02)
            result["server_cpu_seconds"] = round(cpu_seconds(pid) - cpu0, 2)
            # The last ACCEPTEDs and JOINEDs settle.
            wait_for(lambda: total_of("joined") == len(online), time.monotonic() + 5)
            newcomer_result = joiner.finish(timeout=30)
            results = [w.finish(timeout=30) for w in workers]
        finally:
            for w in workers:
                if w.alive():
                    w.proc.kill()
                    w.proc.wait()
            if daemon.process is not None and daemon.process.poll() is None:
                daemon.stop()
    if newcomer_result is None:
        raise RuntimeError("the newcomer gave no result")
    newcomer_result.pop("type", None)
    result.update(newcomer_result)
    counters: Counter[str] = Counter()
    for r in results:
        if r is not None:
            counters.update(r["counters"])
    result["online_users_told_joined"] = counters.pop("joined", 0)
    result["accepts_sent_by_online_users"] = counters.pop("accepts", 0)
    result["existing_users_other"] = dict(counters)
    result["ok"] = result.get("keyed") == len(online) and result.get("timed_out") is False
    return result


def _rss(pid: int) -> int:
    from bench.common import rss_kib

    return rss_kib(pid)


# -- existing users --------------------------------------------------------------------


class Existing:
    """Online users who answer OFFERs automatically, as the real client does."""

    def __init__(self, reactor: Any, config: dict[str, Any]) -> None:
        from twisted.internet.defer import DeferredSemaphore

        from enclaves.client.core import ClientCore

        self.reactor = reactor
        self.port = config["port"]
        self.deadline = config["deadline"]
        keys = read_users(config["users"])
        self.cores = {uid: ClientCore.new(uid, keys[uid]) for uid in config["ids"]}
        self.keys = keys
        self.conns: dict[int, Any] = {}
        self.ready: set[int] = set()
        self.counters: Counter[str] = Counter()
        self.sem = DeferredSemaphore(32)
        self.stopping = False
        Control(reactor, self.command)

    def start(self) -> None:
        from twisted.internet.task import LoopingCall

        for uid in self.cores:
            self.sem.run(self._connect, uid).addErrback(self._failed, uid)
        LoopingCall(self.report).start(0.1)

    def _connect(self, uid: int) -> Any:
        from enclaves.client.connection import connect

        def on_message(message: Any) -> None:
            self.on_message(uid, message)

        d = connect(
            self.reactor,
            f"tcp:127.0.0.1:{self.port}",
            uid,
            self.keys[uid],
            on_message=on_message,
            timeout=30,
        )
        return d.addCallback(lambda conn: self.conns.__setitem__(uid, conn))

    def _failed(self, failure: Any, uid: int) -> None:
        self.counters["connect_failures"] += 1
        if not self.stopping:
            self.reactor.callLater(0.5, lambda: self.sem.run(self._connect, uid))

    def on_message(self, uid: int, message: Any) -> None:
        from enclaves import inner
        from enclaves.client.core import KexCompleted, SendBlob

        core, conn = self.cores[uid], self.conns.get(uid)
        now = time.time()
        if isinstance(message, inner.Directory):
            core.on_directory(message.user_ids, now, start_kex=False)
            self.ready.add(uid)
        elif isinstance(message, inner.Joined):
            core.add_contact(message.user_id)
            self.counters["joined"] += 1
        elif isinstance(message, inner.Deliver):
            for event in core.handle_blob(message.sender, message.msg_id, message.blob, now):
                if isinstance(event, SendBlob) and conn is not None:
                    conn.send(inner.Send(event.msg_id, event.recipient, event.blob))
                    self.counters["accepts"] += 1
                elif isinstance(event, KexCompleted):
                    self.counters["kex_completed"] += 1
                else:
                    self.counters[type(event).__name__] += 1
            if conn is not None:
                conn.send(inner.Received(message.msg_id))
        elif isinstance(message, inner.Accepted):
            core.on_accepted(message.msg_id)
        elif isinstance(message, inner.Delivered | inner.Ping | inner.Pong):
            pass
        else:
            self.counters[f"unexpected {type(message).__name__}"] += 1

    def report(self) -> None:
        if time.time() > self.deadline:
            self.command({"cmd": "stop"})
        if not self.stopping:
            Control.emit(type="status", ready=len(self.ready), joined=self.counters["joined"])

    def command(self, command: dict[str, Any]) -> None:
        if command.get("cmd") == "stop" and not self.stopping:
            self.stopping = True
            Control.emit(type="result", counters=dict(self.counters))
            self.reactor.stop()


# -- the newcomer ----------------------------------------------------------------------


def _counting_connection() -> Any:
    from enclaves.client.connection import ClientConnection

    class Counting(ClientConnection):
        """A client connection that counts its bytes on the wire."""

        bytes_in = 0
        bytes_out = 0

        def dataReceived(self, data: bytes) -> None:
            self.bytes_in += len(data)
            super().dataReceived(data)

        def _write(self, data: bytes) -> None:
            self.bytes_out += len(data)
            super()._write(data)

    return Counting


class Newcomer:
    """The 1,001st user: enroll, read the directory, key with everyone."""

    def __init__(self, reactor: Any, config: dict[str, Any]) -> None:
        from enclaves.client.core import ClientCore
        from enclaves.crypto import KeyPair
        from enclaves.server.limits import TokenBucket

        self.reactor = reactor
        self.port = config["port"]
        self.uid = config["id"]
        self.token_keys = read_users(config["users"])[self.uid]
        self.new_keys = KeyPair.generate()
        self.online = set(config["online"])
        self.deadline = config["deadline"]
        self.core = ClientCore.new(self.uid, self.token_keys)
        pace = float(config["pace"])
        self.bucket = TokenBucket(pace, pace, time.monotonic())
        self.queue: list[Any] = []
        self.conn: Any = None
        self.keyed: set[int] = set()
        self.marks: dict[str, float] = {}
        self.figures: dict[str, Any] = {}
        self.offer_sizes: list[int] = []
        self.accept_sizes: list[int] = []
        self.errors: Counter[str] = Counter()
        self.done = False
        Control(reactor, self.command)

    def mark(self, name: str) -> None:
        if name not in self.marks:
            self.marks[name] = time.monotonic() - self.t0

    async def run(self) -> None:
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
        from twisted.internet.task import LoopingCall

        from enclaves import inner

        self.t0 = time.monotonic()
        self.cpu0 = time.process_time()
        conn = _counting_connection()(self.uid, self.token_keys, clock=self.reactor)
        conn.on_message = self.on_message
        endpoint = TCP4ClientEndpoint(self.reactor, "127.0.0.1", self.port)
        self.conn = conn
        await connectProtocol(endpoint, conn)
        await conn.ready
        self.mark("welcome")
        conn.send(inner.Rotate(self.new_keys.enc, self.new_keys.auth))
        LoopingCall(self.pump).start(0.005)

    def pump(self) -> None:
        from enclaves import inner

        if time.time() > self.deadline:
            self.finish(timed_out=True)
            return
        now = time.monotonic()
        sent = 0
        while self.queue and self.bucket.take(now):
            event = self.queue.pop(0)
            self.conn.send(inner.Send(event.msg_id, event.recipient, event.blob))
            sent += 1
        if sent and not self.queue:
            self.mark("last_offer_sent")

    def on_message(self, message: Any) -> None:
        from enclaves import inner
        from enclaves.client.core import KexCompleted, SendBlob

        now = time.time()
        if isinstance(message, inner.Rotated):
            self.core.set_server_keys(self.new_keys)
            self.mark("rotated")
        elif isinstance(message, inner.Directory):
            self.mark("directory")
            self.figures["directory_users"] = len(message.user_ids)
            self.figures["directory_bytes"] = len(inner.encode(message))
            events = self.core.on_directory(message.user_ids, now, start_kex=True)
            offers = [e for e in events if isinstance(e, SendBlob)]
            self.offer_sizes = [len(e.blob) for e in offers]
            self.queue.extend(offers)
            if self.online <= self.keyed:  # nobody online to wait for
                self.mark("all_pair_keys")
                self.finish(timed_out=False)
        elif isinstance(message, inner.Deliver):
            self.accept_sizes.append(len(message.blob))
            for event in self.core.handle_blob(message.sender, message.msg_id, message.blob, now):
                if isinstance(event, KexCompleted):
                    self.keyed.add(event.peer)
            self.conn.send(inner.Received(message.msg_id))
            if self.online <= self.keyed:
                self.mark("all_pair_keys")
                self.finish(timed_out=False)
        elif isinstance(message, inner.Accepted):
            self.core.on_accepted(message.msg_id)
        elif isinstance(message, inner.Error):
            self.errors[str(message.code)] += 1
        elif isinstance(message, inner.Delivered | inner.Joined | inner.Ping | inner.Pong):
            pass

    def finish(self, timed_out: bool) -> None:
        if self.done:
            return
        self.done = True
        conn = self.conn
        offers, accepts = self.offer_sizes, self.accept_sizes
        Control.emit(
            type="result",
            **self.figures,
            kex={
                "offers_sent": len(offers),
                "offer_blob_bytes": offers[0] if offers else None,
                "offers_total_bytes": sum(offers),
                "accepts_received": len(accepts),
                "accept_blob_bytes": accepts[0] if accepts else None,
                "accepts_total_bytes": sum(accepts),
            },
            keyed=len(self.keyed & self.online),
            newcomer_wire_bytes_sent=conn.bytes_out if conn else 0,
            newcomer_wire_bytes_received=conn.bytes_in if conn else 0,
            seconds={k: round(v, 3) for k, v in self.marks.items()},
            seconds_to_all_pair_keys=(
                round(self.marks["all_pair_keys"], 3) if "all_pair_keys" in self.marks else None
            ),
            newcomer_cpu_seconds=round(time.process_time() - getattr(self, "cpu0", 0.0), 2),
            errors=dict(self.errors),
            timed_out=timed_out,
        )

    def command(self, command: dict[str, Any]) -> None:
        if command.get("cmd") == "stop":
            self.finish(timed_out=not self.done)
            if self.reactor.running:
                self.reactor.stop()


def cmd_role(role: str, config_path: str) -> None:
    from twisted.internet import reactor
    from twisted.internet.defer import ensureDeferred

    config = json.loads(Path(config_path).read_text())
    if role == "existing":
        existing = Existing(reactor, config)
        reactor.callWhenRunning(existing.start)
    else:
        newcomer = Newcomer(reactor, config)

        def failed(failure: Any) -> None:
            failure.printTraceback(file=sys.stderr)
            newcomer.finish(timed_out=True)

        def go() -> None:
            ensureDeferred(newcomer.run()).addErrback(failed)

        reactor.callWhenRunning(go)
    reactor.run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=1000, help="users already enrolled")
    parser.add_argument("--online", type=int, default=None, help="of them online (default: all)")
    parser.add_argument(
        "--workers", type=int, default=max(1, min(4, os.cpu_count() or 1)),
        help="processes running the online users (default: CPUs, at most 4)",
    )  # fmt: skip
    parser.add_argument("--message-rate", type=int, default=500, help="the server's option")
    parser.add_argument(
        "--pace", type=float, default=0.9, help="newcomer's send rate as a fraction of it"
    )
    parser.add_argument("--timeout", type=float, default=600, help="seconds for the whole run")
    args = parser.parse_args(argv)
    if args.users < 1:
        parser.error("need at least 1 user")
    args.online = args.users if args.online is None else max(0, min(args.online, args.users))
    args.workers = max(1, min(args.workers, max(1, args.online)))
    result = run(args)
    print(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] in ("existing", "newcomer"):
        cmd_role(sys.argv[1], sys.argv[2])
    else:
        sys.exit(main())
