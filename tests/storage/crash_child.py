"""Child of the crash test: stores messages in a loop until SIGKILLed.

``python -m tests.storage.crash_child DATA_DIR KEY_HEX ROUND`` prints
``ready`` once storage is up, then ``<index>`` for every store whose Deferred
has fired (the message is durable), flushed at once.
"""

from __future__ import annotations

import sys
from pathlib import Path

from twisted.internet import defer, task

from enclaves.crypto import KeyPair
from enclaves.storage.filestore import FileStorage

USER = 4242
SENDER = 7


def payload(round_no: int, index: int) -> tuple[bytes, bytes]:
    """The msg_id and blob of message ``index`` of ``round_no``: checkable later."""
    msg_id = round_no.to_bytes(8, "big") + index.to_bytes(8, "big")
    return msg_id, msg_id * (1 + index % 64)


async def run(reactor: object, data_dir: str, key_hex: str, round_no: str) -> None:
    storage = FileStorage(
        Path(data_dir),
        KeyPair.from_bytes(bytes.fromhex(key_hex)),
        max_pending_count=10**7,
        max_pending_bytes=1 << 40,
        reactor=reactor,
    )
    storage.startService()
    if await storage.load_user(USER) is None:
        await storage.add_user(USER, KeyPair.generate(), None)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    number = int(round_no)

    def stored(_: int, index: int) -> None:
        sys.stdout.write(f"{index}\n")
        sys.stdout.flush()

    index = 0
    while True:  # bounded by the parent's SIGKILL (and by its own timeout)
        batch = []
        for _ in range(8):
            msg_id, blob = payload(number, index)
            d = storage.store_message(USER, SENDER, msg_id, blob)
            batch.append(d.addCallback(stored, index))
            index += 1
        await defer.gatherResults(batch)
        if index > 200_000:
            break


if __name__ == "__main__":
    task.react(lambda reactor, *args: defer.ensureDeferred(run(reactor, *args)), sys.argv[1:])
