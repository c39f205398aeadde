"""atheris target: coverage-guided bytes against the server protocol and the codecs.

Run by tests/adversarial/test_fuzz.py as ``python -m tests.adversarial.fuzz_server
-max_total_time=N``.  The first input byte picks where the rest goes:

0. raw bytes on a new connection, before any session;
1. the plaintext of a validly sealed frame, in a logged-in session;
2. raw bytes after a login (the attacker on the path, without the keys);
3. the client's side: an e2e blob handed to a client core with keys.

Any exception escaping the code under test, or a failure logged by it, is a
crash: atheris then exits non-zero with the input that caused it.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["enclaves"]):
    from enclaves.crypto import KeyPair
    from enclaves.inner import Ping
    from tests.server.harness import Harness

from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from zope.interface import provider

from tests.client.helpers import Relay, make_core

A, B = 11, 22
FAILURES: list[LogEvent] = []


@provider(ILogObserver)
def _observe(event: LogEvent) -> None:
    if "log_failure" in event:
        FAILURES.append(event)


class Target:
    def __init__(self) -> None:
        self.h = Harness()
        self.keys = self.h.add_user(A)
        self.h.add_user(B)
        self.core = make_core(A)
        peer = make_core(B)
        relay = Relay(self.core, peer)
        relay.post(A, self.core.on_directory([B], 0.0, start_kex=True))
        relay.flush(1.0)
        self.sends = 0

    def run(self, data: bytes) -> None:
        if not data:
            return
        mode, rest = data[0] % 4, data[1:]
        if mode == 3:
            self.sends += 1
            self.core.handle_blob(B, self.sends.to_bytes(16, "big"), rest, 2.0)
            return
        # Mode 0 fails handshakes: its own address, so the limiter never blocks the others.
        if mode == 0:
            client = self.h.raw(A, KeyPair(bytes(32), bytes([1]) * 32), host="192.0.2.66")
        else:
            client = self.h.raw(A, self.keys, host="203.0.113.5")
        if mode == 0:
            client.write(rest)
        else:
            client.login()
            if mode == 1:
                if len(rest) <= 65000:
                    client.write(client.session.seal_frame(rest))  # type: ignore[union-attr]
            else:
                client.write(rest)
            if not client.closing:
                client.send(Ping(1))
        self.h.clock.advance(0)
        client.frames()
        client.lose()
        if FAILURES:
            raise AssertionError(FAILURES[0]["log_failure"].getTraceback())


def main() -> None:
    globalLogPublisher.addObserver(_observe)
    target = Target()
    atheris.Setup(sys.argv, target.run)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
