"""Storage benchmark: durable stores per second and start-up index time, as JSON.

    python bench/storage.py [--messages 3000] [--concurrency 64] [--index-size 100000]
                            [--dir PATH]

Measured in one run on one filesystem (``--dir``, default: a temporary
directory under the current one; tmpfs makes fsync free and the figures
meaningless):

* ``bare``: a loop of write + fsync + rename + fsync(dir) of 1 KiB-message-sized
  files -- the same durability a store promises -- and ``bare_no_dir_fsync``,
  the same loop without the directory fsync;
* ``storage``: ``FileStorage.store_message`` of 1 KiB blobs with
  ``--concurrency`` stores in flight (so group commit can help); every store
  counted has fired, i.e. is durable;
* ``ratio`` = storage / bare (target >= 0.7), median over ``--rounds``
  interleaved rounds (and its minimum), and the ratio to the loop without the
  directory fsync for reference;
* ``index``: ``FileStorage.load()`` over ``--index-size`` pending messages, and
  the memory the index takes per pending message (a second load, traced by
  ``tracemalloc``).

Not run in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twisted.internet import defer, task

from enclaves.atomic import fsync_dir
from enclaves.crypto import KeyPair, Sealer
from enclaves.storage.filestore import PENDING_DIR, SEQ_SHIFT, FileStorage
from enclaves.storage.formats import encode_msg, msg_file_size

BLOB = 1024
RECIPIENTS = 16


def bare_loop(directory: Path, count: int, dir_fsync: bool) -> float:
    directory.mkdir()
    data = os.urandom(msg_file_size(BLOB))
    started = time.perf_counter()
    for number in range(count):
        temp = directory / f".{number}.tmp"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, data)
        os.fsync(fd)
        os.close(fd)
        os.rename(temp, directory / f"{number}.msg")
        if dir_fsync:
            fsync_dir(directory)
    return count / (time.perf_counter() - started)


async def storage_rate(reactor: object, data_dir: Path, count: int, concurrency: int) -> float:
    storage = FileStorage(
        data_dir, KeyPair.generate(), max_pending_count=10**7, max_pending_bytes=1 << 40,
        reactor=reactor,
    )  # fmt: skip
    storage.startService()
    try:
        for user in range(1, RECIPIENTS + 1):
            await storage.add_user(user, KeyPair.generate(), None)
        blob = os.urandom(BLOB)
        sem = defer.DeferredSemaphore(concurrency)
        started = time.perf_counter()
        stores = [
            sem.run(storage.store_message, 1 + n % RECIPIENTS, 999, n.to_bytes(16, "big"), blob)
            for n in range(count)
        ]
        await defer.gatherResults(stores)
        return count / (time.perf_counter() - started)
    finally:
        await storage.stopService()


def index_time(data_dir: Path, size: int) -> dict[str, float]:
    keys = KeyPair.generate()
    sealer = Sealer(keys)
    pending = data_dir / PENDING_DIR
    pending.mkdir(parents=True)
    blob = os.urandom(BLOB)
    for n in range(size):  # set-up: no fsync needed
        file_id = (n + 1) << SEQ_SHIFT
        data = encode_msg(sealer, file_id, 1 + n % 100, 999, n.to_bytes(16, "big"), blob)
        (pending / f"{file_id}.msg").write_bytes(data)
    storage = FileStorage(data_dir, keys)
    started = time.perf_counter()
    storage.load()
    seconds = time.perf_counter() - started
    storage._release_lock()
    del storage
    tracemalloc.start()
    try:
        storage = FileStorage(data_dir, keys)
        before = tracemalloc.get_traced_memory()[0]
        storage.load()
        held = tracemalloc.get_traced_memory()[0] - before
        storage._release_lock()
    finally:
        tracemalloc.stop()
    return {
        "messages": size,
        "seconds": round(seconds, 3),
        "per_second": round(size / seconds),
        "bytes_per_message": round(held / size),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=3000, help="stores per measurement")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--index-size", type=int, default=100_000)
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds; medians are reported"
    )
    parser.add_argument("--dir", type=Path, default=Path.cwd())
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="enclaves-bench-", dir=args.dir))
    try:
        task.react(lambda reactor: defer.ensureDeferred(_report(reactor, work, args)))
    finally:
        shutil.rmtree(work, ignore_errors=True)


async def _report(reactor: object, work: Path, args: argparse.Namespace) -> None:
    # Interleaved so that a noisy neighbour slows every contestant alike.
    bare, bare_nodir, rates = [], [], []
    for number in range(args.rounds):
        bare.append(bare_loop(work / f"bare{number}", args.messages, dir_fsync=True))
        rates.append(
            await storage_rate(reactor, work / f"storage{number}", args.messages, args.concurrency)
        )
        bare_nodir.append(bare_loop(work / f"nodir{number}", args.messages, dir_fsync=False))
    index = index_time(work / "index", args.index_size)
    ratios = sorted(r / b for r, b in zip(rates, bare, strict=True))
    ratios_nodir = sorted(r / b for r, b in zip(rates, bare_nodir, strict=True))
    print(
        json.dumps(
            {
                "filesystem_dir": str(args.dir),
                "message_blob_bytes": BLOB,
                "messages": args.messages,
                "concurrency": args.concurrency,
                "rounds": args.rounds,
                "bare_stores_per_s": round(median(bare)),
                "bare_no_dir_fsync_stores_per_s": round(median(bare_nodir)),
                "storage_stores_per_s": round(median(rates)),
                "ratio": round(median(ratios), 2),
                "ratio_min": round(ratios[0], 2),
                "ratio_vs_no_dir_fsync": round(median(ratios_nodir), 2),
                "target_ratio": 0.7,
                "index": index,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
