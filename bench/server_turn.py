"""The server's own work per routing turn, in one process: no sockets, no kernel.

Prints JSON.  A turn is what the routing benchmark's senders cause: a SEND
frame of ``m`` messages in, its DELIVER frame out to the receiver, the
receiver's frame of RECEIVEDs in, the receipts (ACCEPTED + DELIVERED) out to
the sender.  Everything is the real server (``ServerProtocol``, ``Router``,
``MemoryStorage``) over ``StringTransport``, with a real reactor's queue of
timed calls (never run: each step runs what is due, as one reactor turn
would).  The client frames are sealed before the clock starts, so only the
server is timed.  The baseline, measured in the same run, is the crypto a
turn cannot avoid: four ``StreamSealer`` seal-or-open calls of frames of the
same sizes.

    python -m bench.server_turn [--turns 3000] [--repeat 5]

Each figure is the best of ``--repeat`` runs (the machine's speed changes
from minute to minute).  The routing benchmark's server CPU per turn is this
plus two wake-ups of Twisted and the kernel (``machine_speed``'s
``twisted_echo``).  For a figure that does not depend on the machine's
minute, count instructions: ``valgrind --tool=callgrind`` of two runs with
different ``--turns``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from twisted.internet.selectreactor import SelectReactor  # noqa: E402

from enclaves.crypto import KeyPair, StreamSealer  # noqa: E402
from enclaves.inner import Received, Send, encode  # noqa: E402

BODY = 240  # a 200-byte text, end-to-end sealed
PAIRS = 20


class DueCalls(SelectReactor):  # type: ignore[misc]
    """A reactor's timed calls (heap, lazy reset) that ``advance`` runs when due."""

    def advance(self, amount: float) -> None:
        self.runUntilCurrent()


def server_turn_us(messages: int, turns: int) -> float:
    import tests.server.harness as harness

    harness.Clock = DueCalls  # type: ignore[misc]  # the harness's clock, real time
    h = harness.Harness(router={"message_rate": 10**9})
    pairs = []
    for i in range(PAIRS):
        sender, receiver = 2 * i + 1, 2 * i + 2
        cs = h.raw(sender, h.add_user(sender))
        cr = h.raw(receiver, h.add_user(receiver))
        cs.login()
        cr.login()
        pairs.append((cs, cr, receiver))
    blob = os.urandom(BODY)
    plan = []
    for t in range(turns):
        cs, cr, receiver = pairs[t % PAIRS]
        ids = [os.urandom(16) for _ in range(messages)]
        assert cs.session is not None and cr.session is not None
        sends = cs.session.seal([Send(i, receiver, blob) for i in ids])
        receipts = cr.session.seal([Received(i) for i in ids])
        plan.append((cs, cr, sends, receipts))
    advance = h.clock.advance
    gc.collect()
    start = time.perf_counter()
    for cs, cr, sends, receipts in plan:
        cs.proto.dataReceived(sends)
        advance(0)
        cr.transport.clear()
        cr.proto.dataReceived(receipts)
        advance(0)
        cs.transport.clear()
    elapsed = time.perf_counter() - start
    # Every message was routed live and acknowledged (so its receipts went out).
    if h.router.messages_delivered != turns * messages:
        raise RuntimeError(f"{h.router.messages_delivered} of {turns * messages} delivered")
    return elapsed / turns * 1e6


def crypto_floor_us(messages: int, rounds: int) -> float:
    """Seal and open a SEND-sized and a RECEIVED-sized plaintext: four calls."""
    keys = KeyPair.generate()
    sealer, opener = StreamSealer(keys), StreamSealer(keys)
    sends = encode(Send(os.urandom(16), 2, os.urandom(BODY))) * messages
    receipts = encode(Received(os.urandom(16))) * messages
    aad = bytes(8)
    start = time.perf_counter()
    for _ in range(rounds):
        opener.open(aad, sealer.seal(aad, sends))
        opener.open(aad, sealer.seal(aad, receipts))
    return (time.perf_counter() - start) / rounds * 1e6


def main(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"pairs": PAIRS, "body_bytes": BODY, "turns": args.turns}
    sizes = (1, 8)
    turns: dict[int, list[float]] = {m: [] for m in sizes}
    floors: dict[int, list[float]] = {m: [] for m in sizes}
    for _ in range(args.repeat):  # interleaved: the machine's minute hits both alike
        for m in sizes:
            turns[m].append(server_turn_us(m, args.turns))
            floors[m].append(crypto_floor_us(m, args.turns))
    for m in sizes:
        turn, floor = min(turns[m]), min(floors[m])
        out[f"messages_{m}"] = {
            "server_us_per_turn": round(turn, 1),
            "baseline_crypto_us_per_turn": round(floor, 1),
            "server_over_crypto": round(turn / floor, 2),
        }
    one, eight = out["messages_1"], out["messages_8"]
    out["server_us_per_extra_message"] = round(
        (eight["server_us_per_turn"] - one["server_us_per_turn"]) / 7, 2
    )
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--turns", type=int, default=3000)
    parser.add_argument("--repeat", type=int, default=5)
    print(json.dumps(main(parser.parse_args()), indent=2))
