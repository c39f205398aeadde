"""Child of the client-kill test: a client that sends as fast as it can until it is killed.

``python -m tests.faults.sender_child PORT USER_ID ENC_HEX AUTH_HEX RECIPIENT TAG``
sends SEND(msg_id = u64 TAG || u64 n) with 1 KiB blobs, 20 every 5 ms (at most 20 000),
and prints ``ACCEPTED <msg_id hex>`` (flushed) for each ACCEPTED.
"""

from __future__ import annotations

import os
import struct
import sys

from twisted.internet import defer, task

from enclaves.client.connection import connect
from enclaves.crypto import KeyPair
from enclaves.inner import Accepted, InnerMessage, Send


async def main(reactor: object, argv: list[str]) -> None:
    port, user_id, enc, auth, recipient, tag = argv
    keys = KeyPair(bytes.fromhex(enc), bytes.fromhex(auth))

    def on_message(message: InnerMessage) -> None:
        if isinstance(message, Accepted):
            sys.stdout.write(f"ACCEPTED {message.msg_id.hex()}\n")
            sys.stdout.flush()

    conn = await connect(
        reactor, f"tcp:127.0.0.1:{port}", int(user_id), keys, on_message=on_message
    )
    sys.stdout.write("READY\n")
    sys.stdout.flush()
    n = 0
    while conn.established and n < 20_000:
        for _ in range(20):
            conn.send(Send(struct.pack(">QQ", int(tag), n), int(recipient), os.urandom(1024)))
            n += 1
        await task.deferLater(reactor, 0.005)  # type: ignore[arg-type]


if __name__ == "__main__":
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, sys.argv[1:])))
