"""kill -9 at random moments while storing: every completed store survives, intact."""

from __future__ import annotations

import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest_twisted

from enclaves.crypto import KeyPair, Sealer
from enclaves.storage.filestore import PENDING_DIR, QUARANTINE_DIR
from enclaves.storage.formats import decode_msg, parse_msg_name
from tests.storage.crash_child import SENDER, USER, payload
from tests.storage.helpers import make_storage

ROOT = Path(__file__).resolve().parents[2]
ROUNDS = 25


def _run_round(data_dir: Path, keys: KeyPair, round_no: int, rng: random.Random) -> list[int]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.storage.crash_child",
            str(data_dir),
            keys.to_bytes().hex(),
            str(round_no),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=ROOT,
    )
    assert child.stdout is not None
    output = b""
    deadline = time.monotonic() + 30
    try:
        while b"ready\n" not in output:
            assert time.monotonic() < deadline, "crash child never became ready"
            readable, _, _ = select.select([child.stdout], [], [], 1.0)
            if readable:
                chunk = os.read(child.stdout.fileno(), 65536)
                assert chunk or child.poll() is None, child.stderr.read() if child.stderr else ""
                output += chunk
        time.sleep(rng.uniform(0.0, 0.4))
    finally:
        child.send_signal(signal.SIGKILL)
        rest, err = child.communicate(timeout=30)
    assert child.returncode == -signal.SIGKILL, err.decode()
    lines = (output + rest).split(b"\n")[:-1]  # only complete lines
    assert lines[0] == b"ready"
    return [int(line) for line in lines[1:]]


@pytest_twisted.ensureDeferred
async def test_sigkill_while_storing_loses_nothing_completed(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    keys = KeyPair.generate()
    sealer = Sealer(keys)
    rng = random.Random()
    completed: dict[int, list[int]] = {}
    for round_no in range(ROUNDS):
        completed[round_no] = _run_round(data_dir, keys, round_no, rng)
        # Right after the kill, before any clean-up: every visible .msg file is
        # whole and valid; only hidden temporary files may be partial.
        for entry in os.scandir(data_dir / PENDING_DIR):
            file_id = parse_msg_name(entry.name)
            if file_id is None:
                assert entry.name.startswith(".") and entry.name.endswith(".tmp"), entry.name
                continue
            decode_msg(sealer, file_id, Path(entry.path).read_bytes())
    assert sum(len(v) for v in completed.values()) > ROUNDS, "the child stored (almost) nothing"
    storage = make_storage(data_dir, keys, max_pending_count=10**7, max_pending_bytes=1 << 40)
    try:
        pending = await storage.pending_for(USER)
    finally:
        await storage.stopService()
    assert os.listdir(data_dir / QUARANTINE_DIR) == []
    assert not [n for n in os.listdir(data_dir / PENDING_DIR) if n.endswith(".tmp")]
    found = {m.msg_id: m for m in pending}
    assert len(found) == len(pending), "a message was stored twice"
    for round_no, indices in completed.items():
        for index in indices:
            msg_id, blob = payload(round_no, index)
            message = found.get(msg_id)
            assert message is not None, f"round {round_no} message {index} lost"
            assert message.blob == blob and message.sender == SENDER
    # Arrival order survives the restarts: within each round, by index.
    order = [(int.from_bytes(m.msg_id[:8]), int.from_bytes(m.msg_id[8:])) for m in pending]
    assert order == sorted(order)
