"""Shared pieces of the multi-process benchmarks (bench/load.py, bench/join.py).

The orchestrator is plain Python (no reactor): it makes users on disk in a
child process, starts ``twistd -n enclaves`` (tests/daemon.py) and worker
processes that each run many client connections on their own reactor, and
talks to the workers with one JSON object per line: commands on stdin,
status and results on stdout.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TICK = os.sysconf("SC_CLK_TCK")


# -- machine and process figures -------------------------------------------------------


def machine() -> dict[str, Any]:
    """Where the figures come from: CPUs, CPU model, memory, versions."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in ("twisted", "cryptography"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            raise SystemExit(
                f"{sys.executable} has no {name} installed: run the benchmarks with the "
                "development environment's Python (see docs/performance.rst)"
            ) from None
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kib = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "memory_mib": mem_kib // 1024,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "twisted": versions["twisted"],
        "cryptography": versions["cryptography"],
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process, from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- users on disk -----------------------------------------------------------------------


def make_users(data_dir: Path, ids: list[int], enrolling: list[int], out: Path) -> None:
    """Store users ``ids`` (and ``enrolling`` ones, valid 1 h) in ``data_dir``
    before the daemon runs; their keys go to ``out`` as JSON."""
    spec = data_dir.parent / "users-spec.json"
    spec.write_text(json.dumps({"ids": ids, "enrolling": enrolling}))
    proc = python("bench.common", "make-users", str(data_dir), str(spec), str(out))
    if proc.wait(timeout=600) != 0:
        raise RuntimeError("make-users failed")


def read_users(path: Path | str) -> dict[int, Any]:
    from enclaves.crypto import KeyPair

    return {
        int(u): KeyPair(bytes.fromhex(e), bytes.fromhex(a))
        for u, e, a in json.loads(Path(path).read_text())
    }


def _cmd_make_users(data_dir: str, spec_path: str, out: str) -> None:
    from twisted.internet import task
    from twisted.internet.defer import DeferredSemaphore, ensureDeferred, gatherResults

    from enclaves.crypto import KeyPair
    from enclaves.serverkey import open_server_key
    from enclaves.storage.filestore import FileStorage

    spec = json.loads(Path(spec_path).read_text())

    async def run(reactor: Any) -> None:
        keys, _ = open_server_key(Path(data_dir), None)
        storage = FileStorage(Path(data_dir), keys, reactor=reactor, threads=8)
        storage.startService()
        expires = int((time.time() + 3600) * 1000)
        users: list[tuple[int, KeyPair, int | None]]
        users = [(u, KeyPair.generate(), None) for u in spec["ids"]]
        users += [(u, KeyPair.generate(), expires) for u in spec["enrolling"]]
        sem = DeferredSemaphore(64)
        await gatherResults([sem.run(storage.add_user, u, k, e) for u, k, e in users])
        await storage.stopService()
        Path(out).write_text(json.dumps([[u, k.enc.hex(), k.auth.hex()] for u, k, _ in users]))

    task.react(lambda reactor: ensureDeferred(run(reactor)))


# -- child processes ---------------------------------------------------------------------


def python(*args: str, **kwargs: Any) -> subprocess.Popen[str]:
    """``python -m ARGS`` from the source tree."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, env=env, text=True, **kwargs)


class Worker:
    """A child speaking JSON lines: ``send`` commands, read ``latest`` status."""

    def __init__(self, *args: str) -> None:
        self.proc = python(*args, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.latest: dict[str, Any] = {}
        self.result: dict[str, Any] | None = None
        self.lines: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                sys.stderr.write(line)
                continue
            with self._lock:
                if message.get("type") == "result":
                    self.result = message
                else:
                    self.latest = message
                    self.lines.append(message)

    def status(self) -> dict[str, Any]:
        with self._lock:
            return dict(self.latest)

    def send(self, **command: Any) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(command) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            pass

    def alive(self) -> bool:
        return self.proc.poll() is None

    def finish(self, timeout: float) -> dict[str, Any] | None:
        """Ask for the result, wait for the process to end (killed after ``timeout``)."""
        self.send(cmd="stop")
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._thread.join(5)
        return self.result


def wait_for(predicate: Any, deadline: float, step: float = 0.05) -> bool:
    """Poll ``predicate`` until it is true (True) or ``deadline`` passes (False)."""
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return bool(predicate())


# -- inside a worker ---------------------------------------------------------------------


class Control:
    """A worker's side of the JSON-lines channel.

    Commands are read from stdin by a thread and handed to ``on_command`` on
    the reactor thread; end of input counts as ``{"cmd": "stop"}``.  ``emit``
    prints one JSON object per line to stdout (blocking; the orchestrator
    reads all the time).
    """

    def __init__(self, reactor: Any, on_command: Any) -> None:
        self.reactor = reactor
        self._on_command = on_command
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in sys.stdin:
            try:
                command = json.loads(line)
            except ValueError:
                continue
            self.reactor.callFromThread(self._on_command, command)
        self.reactor.callFromThread(self._on_command, {"cmd": "stop"})

    @staticmethod
    def emit(**message: Any) -> None:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "make-users":
        _cmd_make_users(*sys.argv[2:])
    else:
        sys.exit("usage: python -m bench.common make-users DATA_DIR SPEC OUT")
