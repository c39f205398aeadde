"""What this machine gives in this minute: the costs every other figure rests on.

Prints JSON.  The machine is a virtual machine whose speed changes from day to
day (and minute to minute); these figures let two reports be compared:

- ``python_loop_ms``: a fixed pure-Python workload (dict, attribute and
  bytes work, no I/O): the interpreter's speed.
- ``seal_open_us``: one session-frame seal + open of 200 bytes
  (``StreamSealer``): the crypto per frame.
- ``twisted_echo`` and ``epoll_echo``: the CPU an echo server spends per
  round trip of 300 bytes over loopback (one read and one write: one
  wake-up), user and system, read from ``/proc``.  The first is Twisted's
  epoll reactor with ``write_now``, as the Enclaves server writes; the second a
  bare ``epoll`` loop.  The system part is the kernel's loopback and
  scheduler; the difference in the user part is Twisted's loop and dispatch.

    python -m bench.machine_speed [--round-trips 20000]

An Enclaves routing turn (a SEND frame in, its DELIVER out, the RECEIVED in,
the receipts out) is two such wake-ups plus Enclaves' own work, so at the
routing benchmark's half-peak load (20 senders, a turn each every 5 ms:
8,000 wake-ups a second) Twisted and the kernel alone take about
``8000 * twisted_echo total`` of a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import TICK  # noqa: E402

PAYLOAD = b"x" * 300


def python_loop_ms() -> float:
    """The best of five runs of a fixed workload, in ms."""

    class Item:
        __slots__ = ("key", "value")

        def __init__(self, key: int, value: bytes) -> None:
            self.key, self.value = key, value

    def work() -> int:
        table: dict[int, Item] = {}
        total = 0
        for i in range(20_000):
            table[i & 1023] = Item(i, i.to_bytes(8, "big"))
            item = table.get((i * 7) & 1023)
            if item is not None:
                total += len(item.value + b"!") + item.key
        return total

    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - started)
    return round(best * 1000, 2)


def seal_open_us() -> float:
    from enclaves.crypto import KeyPair, StreamSealer

    keys = KeyPair.generate()
    sealer, opener = StreamSealer(keys), StreamSealer(keys)
    body, aad = os.urandom(200), b"\x01\x10" + bytes(8)
    count = 5000
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(count):
            opener.open(aad, sealer.seal(aad, body))
        best = min(best, time.perf_counter() - started)
    return round(best / count * 1e6, 2)


def _cpu(pid: int) -> tuple[float, float]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICK, int(fields[12]) / TICK


def echo(kind: str, round_trips: int) -> dict[str, float]:
    """Server CPU per round trip (µs, user and system) of a child echo server."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    server = subprocess.Popen(
        [sys.executable, "-m", "bench.machine_speed", "serve", kind],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for _ in range(1000):  # warm up
                _round_trip(sock)
            user0, sys0 = _cpu(server.pid)
            started = time.perf_counter()
            for _ in range(round_trips):
                _round_trip(sock)
            seconds = time.perf_counter() - started
            user1, sys1 = _cpu(server.pid)
    finally:
        server.terminate()
        server.wait(10)
    user = (user1 - user0) / round_trips * 1e6
    system = (sys1 - sys0) / round_trips * 1e6
    return {
        "round_trip_us": round(seconds / round_trips * 1e6, 1),
        "server_user_us": round(user, 1),
        "server_system_us": round(system, 1),
        "server_total_us": round(user + system, 1),
    }


def _round_trip(sock: socket.socket) -> None:
    sock.sendall(PAYLOAD)
    got = 0
    while got < len(PAYLOAD):
        chunk = sock.recv(4096)
        if not chunk:
            raise RuntimeError("the echo server closed the connection")
        got += len(chunk)


def serve_twisted() -> None:
    from twisted.internet import reactor
    from twisted.internet.protocol import Factory, Protocol

    from enclaves.transport import no_nagle, write_now

    class Echo(Protocol):
        def connectionMade(self) -> None:
            no_nagle(self.transport)

        def dataReceived(self, data: bytes) -> None:
            write_now(self.transport, data)

    port = reactor.listenTCP(0, Factory.forProtocol(Echo), interface="127.0.0.1")  # type: ignore[attr-defined]
    print(port.getHost().port, flush=True)
    reactor.run()  # type: ignore[attr-defined]


def serve_epoll() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    print(listener.getsockname()[1], flush=True)
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn.setblocking(False)
    poller = select.epoll()
    poller.register(conn.fileno(), select.EPOLLIN)
    while True:
        for _fd, _event in poller.poll():
            data = conn.recv(65536)
            if not data:
                return
            conn.send(data)


def main(args: argparse.Namespace) -> None:
    result = {
        "python_loop_ms": python_loop_ms(),
        "seal_open_us": seal_open_us(),
        "twisted_echo": echo("twisted", args.round_trips),
        "epoll_echo": echo("epoll", args.round_trips),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        {"twisted": serve_twisted, "epoll": serve_epoll}[sys.argv[2]]()
    else:
        parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
        parser.add_argument("--round-trips", type=int, default=20_000)
        main(parser.parse_args())
