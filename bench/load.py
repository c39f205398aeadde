"""Load benchmark: many clients, random pairs, one server restart in the middle; JSON out.

    python bench/load.py [--clients 500] [--messages 200] [--contacts 8] [--workers N]
                         [--restart term|kill|none] [--e2e real|opaque] [--timeout 900]

A real ``twistd -n enclaves`` serves ``--clients`` users made on disk before
it starts.  Each user gets ``--contacts`` random partners (a random regular
graph: random pairs, so that key exchanges stay affordable) and sends
``--messages`` messages, each to one of its partners picked at random.  The
clients run in ``--workers`` processes, many connections per reactor.

Every client behaves as the real one must (DESIGN.md §4): an outbox keeps
each message until the server answers ACCEPTED, at most ``--window``
unaccepted at a time, sent no faster than ``--pace`` times the server's
``--message-rate``; after a reconnect the whole outbox is sent again (same
msg_id); a recipient acknowledges every DELIVER with RECEIVED and drops
duplicates by msg_id.  When half the messages are ACCEPTED the server is
stopped (SIGTERM, or SIGKILL with ``--restart kill``) and started again on the
same data directory; clients reconnect by themselves.

``--e2e real`` (the default): every client is a real
:class:`enclaves.client.core.ClientCore`; the hybrid X25519 + ML-KEM key
exchange with every partner runs through the server first (timed separately),
then every message is a real e2e MESSAGE, opened, replay-checked and
de-duplicated by the core.  ``--e2e opaque``: the e2e blobs are opaque bytes
of the same size (routing only).

The JSON counts, over distinct messages: ``created``, ``accepted`` (the
sender got ACCEPTED), ``delivered`` (handed to the recipient's application
after de-duplication), ``duplicated`` (handed to an application twice: must be
0), ``lost`` (accepted, never delivered: must be 0), ``unaccepted`` (still in
an outbox at the end: 0 unless the run timed out), and separately the raw
duplicates the server re-sent (``server_resent_duplicates``; expected after a
restart: dropped by the recipient) and the SENDs clients repeated
(``client_resends``).  ``delivered_per_s`` is delivered messages over the
wall time of the message phase, restart included.  Exit status 1 if anything
was lost or duplicated.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import struct
import sys
import tempfile
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    Control,
    Worker,
    cpu_seconds,
    make_users,
    percentile,
    read_users,
    wait_for,
)

FIRST_ID = 1000
OPAQUE_MAGIC = b"LOAD"
_OPAQUE = struct.Struct(">4sQQQ")


# -- the orchestrator ------------------------------------------------------------------


def partner_graph(ids: list[int], degree: int, seed: int) -> dict[int, list[int]]:
    """Random partners, symmetric: every id gets ``degree`` of them (all the
    others if there are fewer; with an odd degree and an odd count of ids, a
    few get more).

    A random circulant graph over a shuffled order (steps 1 .. degree/2); an
    odd degree adds a perfect matching (step n/2), or with n odd a random
    partner for each id still short of ``degree``.
    """
    rng = random.Random(seed)
    order = list(ids)
    rng.shuffle(order)
    n = len(order)
    links: dict[int, set[int]] = {u: set() for u in ids}

    def link(u: int, v: int) -> None:
        if u != v:
            links[u].add(v)
            links[v].add(u)

    degree = min(degree, n - 1)
    for i, u in enumerate(order):
        for step in range(1, degree // 2 + 1):
            link(u, order[(i + step) % n])
    if degree % 2:
        if n % 2 == 0:
            for i in range(n // 2):
                link(order[i], order[i + n // 2])
        else:
            for u in order:
                if len(links[u]) < degree:
                    link(u, rng.choice([v for v in order if v != u and v not in links[u]]))
    return {u: sorted(p) for u, p in links.items()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tests.daemon import Daemon

    started = time.monotonic()
    deadline = started + args.timeout
    ids = [FIRST_ID + i for i in range(args.clients)]
    graph = partner_graph(ids, args.contacts, args.seed)
    total = args.clients * args.messages
    result: dict[str, Any] = {
        "clients": args.clients,
        "messages_per_client": args.messages,
        "contacts_per_client": args.contacts,
        "workers": args.workers,
        "window": args.window,
        "server_message_rate": args.message_rate,
        "client_pace_per_s": args.pace * args.message_rate,
        "body_bytes": args.body,
        "restart": args.restart,
        "e2e": (
            "real: every client is a ClientCore; hybrid KEX with each partner through the "
            "server, then every message a sealed e2e MESSAGE"
            if args.e2e == "real"
            else "opaque: e2e blobs are opaque bytes of the same size (routing only)"
        ),
    }
    with tempfile.TemporaryDirectory(prefix="enclaves-load-") as tmp:
        work = Path(tmp)
        daemon = Daemon(
            work,
            f"--message-rate={args.message_rate}",
            "--max-connections=100000",
            # Every bench client connects from 127.0.0.1: no per-address share.
            "--max-handshakes-per-address=100000",
            f"--max-pending={max(1000, 4 * args.messages * args.contacts)}",
        )
        users_path = work / "users.json"
        make_users(daemon.data_dir, ids, [], users_path)
        daemon.start(timeout=60)
        workers: list[Worker] = []
        server_cpu = 0.0
        try:
            for n in range(args.workers):
                mine = ids[n :: args.workers]
                config = {
                    "port": daemon.port,
                    "users": str(users_path),
                    "ids": mine,
                    "partners": {str(u): graph[u] for u in mine},
                    "messages": args.messages,
                    "window": args.window,
                    "pace": args.pace * args.message_rate,
                    "e2e": args.e2e,
                    "body": args.body,
                    "seed": args.seed * 1000 + n,
                    "deadline": time.time() + args.timeout + 30,
                }
                path = work / f"worker{n}.json"
                path.write_text(json.dumps(config))
                workers.append(Worker("bench.load", "worker", str(path)))

            def total_of(key: str) -> int:
                return sum(int(w.status().get(key, 0)) for w in workers)

            def check_alive() -> bool:
                for w in workers:
                    if not w.alive():
                        raise RuntimeError("a load worker died; see its stderr above")
                return False

            # Phase 1: everyone connected and keyed with every partner.
            t0 = time.monotonic()
            ok = wait_for(lambda: check_alive() or total_of("keyed") == args.clients, deadline, 0.1)
            if not ok:
                raise RuntimeError(f"clients not ready within --timeout: {total_of('keyed')}")
            result["setup_seconds"] = round(time.monotonic() - t0, 2)
            result["kex_exchanges"] = sum(len(p) for p in graph.values()) // 2
            # Phase 2: messages, with one restart when half are accepted.
            assert daemon.process is not None
            cpu_mark = cpu_seconds(daemon.process.pid)
            t_go = time.monotonic()
            for w in workers:
                w.send(cmd="go")
            if args.restart != "none":
                wait_for(lambda: check_alive() or total_of("accepted") >= total // 2, deadline)
                server_cpu += cpu_seconds(daemon.process.pid) - cpu_mark
                result["restart_at_accepted"] = total_of("accepted")
                t_stop = time.monotonic()
                sig = signal.SIGKILL if args.restart == "kill" else signal.SIGTERM
                code = daemon.stop(sig)
                result["server_exit_status"] = code
                daemon.start(timeout=60)
                result["restart_seconds"] = round(time.monotonic() - t_stop, 2)
                cpu_mark = cpu_seconds(daemon.process.pid)
            wait_for(lambda: check_alive() or total_of("accepted") >= total, deadline, 0.1)
            # Everything accepted: deliveries get --drain seconds more to arrive.
            wait_for(
                lambda: total_of("delivered") >= total,
                min(deadline, time.monotonic() + args.drain),
                0.1,
            )
            t_end = time.monotonic()
            server_cpu += cpu_seconds(daemon.process.pid) - cpu_mark
            results = [w.finish(timeout=30) for w in workers]
        finally:
            for w in workers:
                if w.alive():
                    w.proc.kill()
                    w.proc.wait()
            if daemon.process is not None and daemon.process.poll() is None:
                daemon.stop()
        if any(r is None for r in results):
            raise RuntimeError("a load worker gave no result")
    result.update(tally([r for r in results if r is not None], total))
    seconds = t_end - t_go
    result["message_phase_seconds"] = round(seconds, 2)
    result["delivered_per_s"] = round(result["delivered"] / seconds) if seconds else None
    result["server_cpu_seconds"] = round(server_cpu, 2)
    result["delivered_per_server_cpu_s"] = (
        round(result["delivered"] / server_cpu) if server_cpu else None
    )
    result["timed_out"] = time.monotonic() >= deadline
    result["ok"] = (
        result["lost"] == 0
        and result["duplicated"] == 0
        and result["misrouted"] == 0
        and result["delivered"] == total
    )
    return result


def tally(results: list[dict[str, Any]], total: int) -> dict[str, Any]:
    accepted: set[tuple[int, int]] = set()
    delivered: set[tuple[int, int]] = set()
    created = duplicated = 0
    counters: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    latencies: list[float] = []
    for r in results:
        created += r["created"]
        for sender, seqs in r["accepted"].items():
            accepted.update((int(sender), s) for s in seqs)
        for sender, seq in r["delivered"]:
            if (sender, seq) in delivered:
                duplicated += 1  # cannot happen across workers; counted anyway
            delivered.add((sender, seq))
        duplicated += r["app_duplicates"]
        counters.update(r["counters"])
        errors.update(r["errors"])
        latencies += r["latencies"]
    return {
        "created": created,
        "accepted": len(accepted),
        "delivered": len(delivered),
        "duplicated": duplicated,
        "lost": len(accepted - delivered),
        "unaccepted": created - len(accepted),
        "delivered_not_accepted": len(delivered - accepted),
        "misrouted": counters.pop("misrouted", 0),
        "server_resent_duplicates": counters.pop("raw_duplicates", 0),
        "client_resends": counters.pop("resends", 0),
        "reconnects": counters.pop("reconnects", 0),
        "other": dict(counters),
        "errors": dict(errors),
        "latency_ms": {
            "p50": _ms(percentile(latencies, 0.5)),
            "p99": _ms(percentile(latencies, 0.99)),
            "max": _ms(max(latencies) if latencies else None),
            "samples": len(latencies),
        },
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def _code_name(code: int) -> str:
    from enclaves.frames import ErrorCode

    try:
        return ErrorCode(code).name
    except ValueError:
        return str(code)


# -- a worker process ------------------------------------------------------------------


class LoadClient:
    """One user: a connection that comes back, an outbox, de-duplication."""

    def __init__(self, worker: LoadWorker, uid: int, keys: Any, partners: list[int]) -> None:
        from enclaves.client.core import ClientCore
        from enclaves.server.limits import TokenBucket

        self.w = worker
        self.uid, self.keys, self.partners = uid, keys, partners
        self.core = ClientCore.new(uid, keys) if worker.e2e else None
        self.conn: Any = None
        self.connecting = False
        self.outbox: dict[bytes, tuple[int, bytes, int]] = {}  # msg_id -> recipient, blob, seq
        self.resend: deque[bytes] = deque()
        self.unsent: set[bytes] = set()  # KEX blobs queued for their first send
        self.inflight = 0  # unaccepted messages (not KEX)
        self.next_seq = 0
        self.accepted: list[int] = []
        self.keyed: set[int] = set()
        self.seen: set[bytes] = set()  # msg_ids (opaque mode; the core does it otherwise)
        self.delivered: set[tuple[int, int]] = set()
        self.kex_started = False
        now = time.monotonic()
        self.bucket = TokenBucket(worker.pace, max(1.0, min(worker.pace, 4 * worker.window)), now)

    @property
    def ready(self) -> bool:
        keyed = len(self.keyed) == len(self.partners) or not self.w.e2e
        return keyed and self.conn is not None

    # -- connection ---------------------------------------------------------------------

    def connect(self) -> None:
        if self.connecting or self.conn is not None or self.w.stopping:
            return
        self.connecting = True
        self.w.sem.run(self._connect).addBoth(self._connected)

    def _connect(self) -> Any:
        from enclaves.client.connection import connect

        return connect(
            self.w.reactor,
            f"tcp:127.0.0.1:{self.w.port}",
            self.uid,
            self.keys,
            on_message=self.on_message,
            timeout=15,
        )

    def _connected(self, result: Any) -> None:
        from twisted.python.failure import Failure

        self.connecting = False
        if isinstance(result, Failure):
            self.w.counters["connect_failures"] += 1
            self.w.later(0.3 + random.random() * 0.5, self.connect)
            return
        if self.w.stopping:
            result.disconnect()
            return
        self.conn = result
        self.w.counters["logins"] += 1
        result.closed.addCallback(self._closed)
        # Everything unaccepted goes out again, oldest first, paced like the rest.
        self.resend = deque(self.outbox)
        if self.core is not None and not self.kex_started:
            self.kex_started = True
            now = time.time()
            for partner in self.partners:
                if self.uid < partner:
                    self._events(self.core.start_kex(partner, now))

    def _closed(self, reason: Any) -> None:
        self.conn = None
        if self.w.stopping:
            return
        self.w.counters["reconnects"] += 1
        self.w.later(0.2 + random.random() * 0.5, self.connect)

    # -- sending --------------------------------------------------------------------------

    def pump(self, now: float) -> None:
        """Send what the pace and window allow: resends first, then new messages."""
        conn = self.conn
        if conn is None:
            return
        from enclaves.inner import Send

        while self.resend:
            msg_id = self.resend[0]
            entry = self.outbox.get(msg_id)
            if entry is None:
                self.resend.popleft()
                continue
            if not self.bucket.take(now):
                return
            self.resend.popleft()
            conn.send(Send(msg_id, entry[0], entry[1]))
            if msg_id in self.unsent:
                self.unsent.discard(msg_id)
                self.w.counters["kex_sends"] += 1
            else:
                self.w.counters["resends"] += 1
        while (
            self.w.go
            and self.next_seq < self.w.messages
            and self.inflight < self.w.window
            and self.bucket.take(now)
        ):
            msg_id, recipient, blob = self._new_message()
            self.outbox[msg_id] = (recipient, blob, self.next_seq)
            self.next_seq += 1
            self.inflight += 1
            conn.send(Send(msg_id, recipient, blob))

    def _new_message(self) -> tuple[bytes, int, bytes]:
        from enclaves.client.core import SendBlob

        recipient = self.w.rng.choice(self.partners)
        head = f"{self.uid}:{self.next_seq}:{recipient}:"
        if self.core is None:
            blob = _OPAQUE.pack(OPAQUE_MAGIC, self.uid, self.next_seq, recipient)
            blob += struct.pack(">d", time.time())
            return os.urandom(16), recipient, blob + bytes(max(0, self.w.blob_size - len(blob)))
        text = head + "x" * max(0, self.w.body - len(head))
        event = self.core.encrypt_message(recipient, text, time.time(), confirmed=True)
        if not isinstance(event, SendBlob):
            raise RuntimeError(f"could not encrypt: {event.reason}")
        return event.msg_id, recipient, event.blob

    def _events(self, events: list[Any]) -> None:
        from enclaves.client.core import (
            BlobDropped,
            BlobHeld,
            KexCompleted,
            MessageReceived,
            SendBlob,
        )

        for event in events:
            if isinstance(event, MessageReceived):
                self._to_application(event.sender, event.text, event.unix_ms / 1000)
            elif isinstance(event, SendBlob):  # a KEX OFFER or ACCEPT
                self.outbox[event.msg_id] = (event.recipient, event.blob, -1)
                self.resend.appendleft(event.msg_id)
                self.unsent.add(event.msg_id)
            elif isinstance(event, KexCompleted):
                self.keyed.add(event.peer)
            elif isinstance(event, BlobDropped):
                if event.reason == "duplicate":
                    self.w.counters["raw_duplicates"] += 1
                else:
                    self.w.counters[f"dropped {event.reason}"] += 1
            elif isinstance(event, BlobHeld):
                self.w.counters["held"] += 1
            else:
                self.w.counters[type(event).__name__] += 1

    # -- receiving -------------------------------------------------------------------------

    def on_message(self, message: Any) -> None:
        from enclaves import inner

        if isinstance(message, inner.Deliver):
            self._deliver(message)
            if self.conn is not None:
                self.conn.send(inner.Received(message.msg_id))
        elif isinstance(message, inner.Accepted):
            entry = self.outbox.pop(message.msg_id, None)
            if entry is not None:
                if entry[2] >= 0:
                    self.inflight -= 1
                    self.accepted.append(entry[2])
                if self.core is not None:
                    self.core.on_accepted(message.msg_id)
        elif isinstance(message, inner.Delivered):
            self.w.counters["delivered_receipts"] += 1
        elif isinstance(message, inner.Error):
            self.w.errors[_code_name(message.code)] += 1
            if message.msg_id in self.outbox:  # refused: try again a little later
                self.w.later(1.0, lambda: self.resend.append(message.msg_id))
        elif isinstance(message, inner.Directory | inner.Joined):
            pass
        else:
            self.w.counters[f"unexpected {type(message).__name__}"] += 1

    def _deliver(self, message: Any) -> None:
        if self.core is not None:
            self._events(self.core.handle_blob(message.sender, message.msg_id, message.blob,
                                               time.time()))  # fmt: skip
            return
        if message.msg_id in self.seen:
            self.w.counters["raw_duplicates"] += 1
            return
        self.seen.add(message.msg_id)
        try:
            magic, sender, seq, recipient = _OPAQUE.unpack_from(message.blob)
            (sent,) = struct.unpack_from(">d", message.blob, _OPAQUE.size)
        except struct.error:
            self.w.counters["misrouted"] += 1
            return
        if magic != OPAQUE_MAGIC or sender != message.sender:
            self.w.counters["misrouted"] += 1
            return
        self._to_application(sender, f"{sender}:{seq}:{recipient}:", sent)

    def _to_application(self, sender: int, text: str, sent_at: float) -> None:
        try:
            claimed, seq_text, recipient, _ = text.split(":", 3)
            seq = int(seq_text)
        except ValueError:
            self.w.counters["misrouted"] += 1
            return
        if int(claimed) != sender or int(recipient) != self.uid:
            self.w.counters["misrouted"] += 1
            return
        key = (sender, seq)
        if key in self.delivered:
            self.w.app_duplicates += 1
            return
        self.delivered.add(key)
        self.w.delivered += 1
        if len(self.w.latencies) < 20000:
            self.w.latencies.append(time.time() - sent_at)


class LoadWorker:
    """Many :class:`LoadClient` on one reactor, driven by the orchestrator."""

    def __init__(self, reactor: Any, config: dict[str, Any]) -> None:
        from twisted.internet.defer import DeferredSemaphore

        self.reactor = reactor
        self.port = config["port"]
        self.messages = config["messages"]
        self.window = config["window"]
        self.pace = float(config["pace"])
        self.e2e = config["e2e"] == "real"
        self.body = config["body"]
        self.blob_size = self.body + 60  # about a MESSAGE blob of that body
        self.rng = random.Random(config["seed"])
        self.deadline = config["deadline"]
        self.sem = DeferredSemaphore(32)
        self.go = False
        self.stopping = False
        self.counters: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.delivered = 0
        self.app_duplicates = 0
        self.latencies: list[float] = []
        keys = read_users(config["users"])
        self.clients = [
            LoadClient(self, uid, keys[uid], config["partners"][str(uid)]) for uid in config["ids"]
        ]
        self.control = Control(reactor, self.command)

    def later(self, seconds: float, fn: Any) -> None:
        if not self.stopping:
            self.reactor.callLater(seconds, fn)

    def start(self) -> None:
        from twisted.internet.task import LoopingCall

        for client in self.clients:
            client.connect()
        LoopingCall(self.tick).start(0.01)
        LoopingCall(self.report).start(0.1)

    def tick(self) -> None:
        if time.time() > self.deadline:
            self.command({"cmd": "stop"})
            return
        now = time.monotonic()
        try:
            for client in self.clients:
                client.pump(now)
        except Exception:
            # A bug here must end the run loudly, not stall it until the deadline.
            import traceback

            traceback.print_exc()
            os._exit(2)

    def report(self) -> None:
        if self.stopping:
            return
        Control.emit(
            type="status",
            connected=sum(c.conn is not None for c in self.clients),
            keyed=sum(c.ready for c in self.clients),
            created=sum(c.next_seq for c in self.clients),
            accepted=sum(len(c.accepted) for c in self.clients),
            delivered=self.delivered,
        )

    def command(self, command: dict[str, Any]) -> None:
        if command.get("cmd") == "go":
            self.go = True
        elif command.get("cmd") == "stop" and not self.stopping:
            self.stopping = True
            self.report_result()
            self.reactor.stop()

    def report_result(self) -> None:
        Control.emit(
            type="result",
            created=sum(c.next_seq for c in self.clients),
            accepted={str(c.uid): c.accepted for c in self.clients},
            delivered=[list(k) for c in self.clients for k in c.delivered],
            app_duplicates=self.app_duplicates,
            counters=dict(self.counters),
            errors=dict(self.errors),
            latencies=[round(x, 5) for x in self.latencies],
        )


def cmd_worker(config_path: str) -> None:
    from twisted.internet import reactor

    worker = LoadWorker(reactor, json.loads(Path(config_path).read_text()))
    reactor.callWhenRunning(worker.start)
    reactor.run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=500)
    parser.add_argument("--messages", type=int, default=200, help="messages per client")
    parser.add_argument("--contacts", type=int, default=8, help="random partners per client")
    parser.add_argument(
        "--workers", type=int, default=max(1, min(4, os.cpu_count() or 1)),
        help="client processes (default: CPUs, at most 4)",
    )  # fmt: skip
    parser.add_argument("--window", type=int, default=8, help="unaccepted messages per client")
    parser.add_argument("--message-rate", type=int, default=500, help="the server's option")
    parser.add_argument(
        "--pace", type=float, default=0.5, help="client send rate as a fraction of message-rate"
    )
    parser.add_argument("--body", type=int, default=100, help="bytes of text per message")
    parser.add_argument("--restart", choices=("term", "kill", "none"), default="term")
    parser.add_argument("--e2e", choices=("real", "opaque"), default="real")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=900, help="seconds for the whole run")
    parser.add_argument(
        "--drain", type=float, default=60, help="seconds to wait for deliveries once all accepted"
    )
    args = parser.parse_args(argv)
    if args.clients < 2 or args.messages < 1:
        parser.error("need at least 2 clients and 1 message")
    args.workers = max(1, min(args.workers, args.clients))
    args.contacts = max(1, min(args.contacts, args.clients - 1))
    result = run(args)
    print(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "worker":
        cmd_worker(sys.argv[2])
    else:
        sys.exit(main())
