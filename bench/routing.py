"""Routing benchmark: the full server against a bare relay and a naive crypto relay.

Prints JSON.  N sender->receiver pairs over loopback exchange 200-byte
bodies; each sender keeps ``--window`` messages in flight (closed loop) to
find the peak rate, then the full server is run open loop at half of its peak
for latency: with the senders taking turns (``enclaves_half_rate``, as
independent clients) and with all of them sending at the same instant every
5 ms (``enclaves_half_rate_bursts``, the worst case for queueing).  Just
before each of those, the bare relay runs the same load
(``bare_relay_half_rate``, ``bare_relay_half_rate_bursts``): the latency
that the generator, Twisted and the machine give in that minute with no
crypto and no receipts.  The clients are bench/loadgen.py.  The load runs in ``--workers``
processes; server CPU is read from /proc.  Finally, memory per idle
authenticated connection is measured with ``--idle`` connections.

    python -m bench.routing [--pairs 20] [--seconds 3] [--latency-seconds 10]
                            [--idle 5000] [--workers 1]

On a small machine the load generator shares the CPUs with the server, so
``msgs_per_s`` is partly the client's limit; ``msgs_per_server_cpu_s``
(messages per second of server CPU) is the figure to compare between the
three servers.  More workers than (cores - 1) inflate the latencies.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import cpu_seconds, rss_kib  # noqa: E402
from bench.common import percentile as common_percentile  # noqa: E402

BODY = 200


# -- helpers run in the orchestrator ------------------------------------------------


def free_port() -> int:
    from tests.daemon import free_port as free

    return free()


def run_py(*args: str, **kwargs: Any) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, env=env, text=True, **kwargs)


def make_users(data_dir: Path, count: int) -> Path:
    out = data_dir.parent / f"users-{count}.json"
    proc = run_py("bench.routing", "make-users", str(data_dir), str(count), str(out))
    if proc.wait() != 0:
        raise RuntimeError("make-users failed")
    return out


def percentile(values: list[float], q: float) -> float:
    """``bench.common.percentile``, NaN for no values (a target check then fails)."""
    value = common_percentile(values, q)
    return float("nan") if value is None else value


def load(
    mode: str,
    port: int,
    pid: int,
    args: argparse.Namespace,
    users: Path | None,
    rate: float = 0,
    seconds: float | None = None,
    arrivals: str = "staggered",
) -> dict[str, Any]:
    seconds = seconds or args.seconds
    start_at = time.time() + 2.0
    per = args.pairs // args.workers
    workers = []
    for w in range(args.workers):
        argv = [
            "bench.routing", "worker", mode, str(port), str(per), str(w * per),
            str(start_at), str(args.warmup), str(seconds), str(args.window),
            str(rate / args.workers), str(users or ""), arrivals,
        ]  # fmt: skip
        workers.append(run_py(*argv, stdout=subprocess.PIPE))
    time.sleep(max(0.0, start_at + args.warmup - time.time()))
    cpu0 = cpu_seconds(pid)
    time.sleep(seconds)
    cpu1 = cpu_seconds(pid)
    count, sent, lag, latencies = 0, 0, 0.0, []
    for proc in workers:
        out, _ = proc.communicate(timeout=60)
        result = json.loads(out.strip().splitlines()[-1])
        count += result["count"]
        sent += result["sent"]
        lag = max(lag, result["max_lag_ms"])
        latencies += [us / 1e6 for us in result["latencies"]]
    rate_measured = count / seconds
    server_cpu = (cpu1 - cpu0) / seconds
    figures: dict[str, Any] = {
        "msgs_per_s": round(rate_measured),
        "p50_ms": round(percentile(latencies, 0.50) * 1000, 3),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 3),
        "server_cpu": round(server_cpu, 3),
        "msgs_per_server_cpu_s": round(rate_measured / server_cpu) if server_cpu else None,
        # Of the messages sent in the window, the share received (by 0.5 s after it).
        "delivered_of_sent": round(count / sent, 4) if sent else 0.0,
    }
    if rate:  # open loop: did the generator keep to the asked rate and schedule?
        figures["asked_per_s"] = round(rate)
        figures["sent_per_s"] = round(sent / seconds)
        figures["generator_max_lag_ms"] = lag
    return figures


def start_relay(mode: str) -> tuple[subprocess.Popen[str], int]:
    port = free_port()
    proc = run_py("bench.relay", mode, str(port), stdout=subprocess.PIPE)
    assert proc.stdout is not None
    proc.stdout.readline()
    return proc, port


def start_server(workdir: Path, users: int) -> tuple[Any, Path]:
    from tests.daemon import Daemon

    daemon = Daemon(
        workdir,
        "--message-rate=10000000",
        "--max-connections=100000",
        # Every bench client connects from 127.0.0.1: no per-address share.
        "--max-handshakes-per-address=100000",
        "--max-pending=1000000",
        "--idle-timeout=86400",
    )
    path = make_users(daemon.data_dir, users)
    daemon.start(timeout=120)
    return daemon, path


def main(args: argparse.Namespace) -> None:
    results: dict[str, Any] = {"pairs": args.pairs, "body_bytes": BODY, "cpus": os.cpu_count()}
    bare, bare_port = start_relay("bare")
    try:
        results["bare_relay"] = load("bare", bare_port, bare.pid, args, None)
        naive, naive_port = start_relay("naive")
        try:
            results["naive_relay"] = load("naive", naive_port, naive.pid, args, None)
        finally:
            naive.terminate()
            naive.wait()
        with tempfile.TemporaryDirectory() as tmp:
            daemon, users = start_server(Path(tmp), 2 * args.pairs)
            try:
                assert daemon.process is not None
                pid = daemon.process.pid
                peak = load("enclaves", daemon.port, pid, args, users)
                results["enclaves"] = peak
                half = peak["msgs_per_s"] / 2
                for suffix, arrivals in (("", "staggered"), ("_bursts", "bursts")):
                    # First the bare relay (no crypto, no receipts) with the
                    # same load in the same minute: the tail the generator,
                    # Twisted and the machine give without Enclaves' work.
                    results[f"bare_relay_half_rate{suffix}"] = load(
                        "bare", bare_port, bare.pid, args, None, half,
                        args.latency_seconds, arrivals,
                    )  # fmt: skip
                    results[f"enclaves_half_rate{suffix}"] = load(
                        "enclaves", daemon.port, pid, args, users, half,
                        args.latency_seconds, arrivals,
                    )  # fmt: skip
            finally:
                daemon.stop()
    finally:
        bare.terminate()
        bare.wait()
    naive_rate = results["naive_relay"]["msgs_per_s"]
    results["enclaves_vs_naive"] = round(results["enclaves"]["msgs_per_s"] / naive_rate, 2)
    if args.idle:
        results["idle"] = idle_memory(args)
    print(json.dumps(results, indent=2))


def idle_memory(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        daemon, users = start_server(Path(tmp), args.idle)
        try:
            assert daemon.process is not None
            pid = daemon.process.pid
            time.sleep(0.5)
            before = rss_kib(pid)
            per = args.idle // args.workers
            workers = [
                run_py(
                    "bench.routing",
                    "idle",
                    str(daemon.port),
                    str(per),
                    str(w * per),
                    str(users),
                    stdout=subprocess.PIPE,
                    stdin=subprocess.PIPE,
                )
                for w in range(args.workers)
            ]
            for proc in workers:
                assert proc.stdout is not None
                line = proc.stdout.readline()
                if not line.startswith("ready"):
                    raise RuntimeError(f"idle worker failed: {line!r}")
            time.sleep(0.5)
            after = rss_kib(pid)
            for proc in workers:
                proc.send_signal(signal.SIGTERM)
                proc.wait()
        finally:
            daemon.stop()
    return {
        "connections": per * args.workers,
        "server_rss_before_kib": before,
        "server_rss_after_kib": after,
        "kib_per_connection": round((after - before) / (per * args.workers), 2),
    }


# -- subprocess roles --------------------------------------------------------------


def cmd_make_users(data_dir: str, count: str, out: str) -> None:
    from twisted.internet import task
    from twisted.internet.defer import ensureDeferred, gatherResults

    from enclaves.crypto import KeyPair
    from enclaves.serverkey import open_server_key
    from enclaves.storage.filestore import FileStorage

    async def run(reactor: Any) -> None:
        keys, _ = open_server_key(Path(data_dir), None)
        storage = FileStorage(Path(data_dir), keys, reactor=reactor, threads=8)
        storage.startService()
        users = [(1000 + i, KeyPair.generate()) for i in range(int(count))]
        await gatherResults([storage.add_user(uid, k, None) for uid, k in users])
        await storage.stopService()
        Path(out).write_text(json.dumps([[u, k.enc.hex(), k.auth.hex()] for u, k in users]))

    task.react(lambda reactor: ensureDeferred(run(reactor)))


def _read_users(path: str) -> list[tuple[int, Any]]:
    from enclaves.crypto import KeyPair

    return [
        (u, KeyPair(bytes.fromhex(e), bytes.fromhex(a)))
        for u, e, a in json.loads(Path(path).read_text())
    ]


def cmd_worker(*argv: str) -> None:
    from bench.loadgen import main as loadgen

    loadgen([*argv, str(BODY)])


def cmd_idle(port: str, count: str, offset: str, users_path: str) -> None:
    from twisted.internet import reactor
    from twisted.internet.defer import ensureDeferred

    from enclaves.client.connection import connect

    users = _read_users(users_path)[int(offset) : int(offset) + int(count)]
    conns = []

    async def run() -> None:
        for uid, keys in users:
            conns.append(await connect(reactor, f"tcp:127.0.0.1:{port}", uid, keys))
        print("ready", flush=True)

    ensureDeferred(run()).addErrback(
        lambda f: (print("failed", f.getErrorMessage(), flush=True), reactor.stop())
    )
    reactor.run()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("make-users", "worker", "idle"):
        {"make-users": cmd_make_users, "worker": cmd_worker, "idle": cmd_idle}[sys.argv[1]](
            *sys.argv[2:]
        )
    else:
        parser = argparse.ArgumentParser(description=__doc__)
        parser.add_argument("--pairs", type=int, default=20)
        parser.add_argument("--workers", type=int, default=1)
        parser.add_argument("--seconds", type=float, default=3.0)
        parser.add_argument("--warmup", type=float, default=1.0)
        parser.add_argument("--window", type=int, default=50)
        parser.add_argument(
            "--latency-seconds",
            type=float,
            default=10.0,
            help="length of the half-peak latency run (a p99 over more than one "
            "or two 100 ms stretches of a busy machine)",
        )
        parser.add_argument("--idle", type=int, default=5000)
        main(parser.parse_args())
