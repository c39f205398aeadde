"""Random interleavings of sends, resends, acknowledgements, logins and lost
connections: every message reaches its recipient and its sender learns so.

The router has a short path for the usual case (a SEND to a recipient whose
DELIVERs go straight out, the RECEIVED of a live delivery) beside the long
one (storage, the flow-control window, resends); with a window of two, both
are taken in every run.  Steps are not settled one by one (storage answers up to 2 ms later, and a
client reads only when told), so sends, acknowledgements and logins overlap
the router's waits.  At the end everyone logs in and reads until quiet:
each message sent has been delivered to its recipient (possibly more than
once on the wire: the client drops duplicates by ``msg_id``), with its own
blob, first in the order its sender sent it, and its sender has had
DELIVERED for it; nobody got an ERROR, and no more DELIVERs than the window
were ever unacknowledged, and no message is left in storage.
"""

from __future__ import annotations

import random
import struct
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred

from enclaves.crypto import KeyPair
from enclaves.inner import Deliver, Delivered, Error, InnerMessage, Ping, Pong, Received, Send
from enclaves.server.protocol import ServerFactory
from enclaves.server.router import Router
from enclaves.storage.memory import MemoryStorage
from tests.server.harness import Harness, RawClient

USERS = (11, 22, 33)
WINDOW = 4

user = st.sampled_from(USERS)
op = st.one_of(
    st.tuples(st.just("login"), user),
    st.tuples(st.just("lose"), user, st.booleans()),
    st.tuples(st.just("send"), user, user, st.integers(1, 5)),
    st.tuples(st.just("resend"), user, st.integers(0, 40)),
    st.tuples(st.just("ack"), user, st.integers(0, 4)),
    st.tuples(st.just("read"), user),
    st.tuples(st.just("tick"), user),
)


class LaterStorage(MemoryStorage):
    """MemoryStorage whose message and notice calls answer 0-2 ms later, in a
    random order, as a thread pool's would: the router's waits (stores in
    flight, refills, a spilled window) then last across other traffic."""

    LATER = (
        "held_message", "store_message", "pending_for", "remove_message",
        "store_notice", "notices_for", "remove_notices",
    )  # fmt: skip

    def __init__(self, clock: Any, rng: random.Random) -> None:
        super().__init__(max_pending_count=50, max_pending_bytes=100_000, clock=clock.seconds)
        self._later_clock, self._later_rng = clock, rng

    def __getattribute__(self, name: str) -> Any:
        method = super().__getattribute__(name)
        if name not in LaterStorage.LATER:
            return method

        def later(*args: Any) -> Deferred[Any]:
            out: Deferred[Any] = Deferred()
            delay = self._later_rng.choice((0, 0.001, 0.002))
            method(*args).addBoth(lambda r: self._later_clock.callLater(delay, out.callback, r))
            return out

        return later


class Model:
    def __init__(self, rng: random.Random) -> None:
        self.h = h = Harness()
        h.storage = LaterStorage(h.clock, rng)
        h.router = Router(h.storage, h.clock, max_inflight=WINDOW)
        h.factory = ServerFactory(h.router, h.storage, h.clock)
        self.keys: dict[int, KeyPair] = {u: self.h.add_user(u) for u in USERS}
        self.online: dict[int, RawClient] = {}
        self.sent: dict[bytes, tuple[int, int, bytes]] = {}  # msg_id -> sender, recipient, blob
        self.order: list[bytes] = []
        self.delivered: dict[int, set[bytes]] = {u: set() for u in USERS}
        self.first_order: dict[int, list[bytes]] = {u: [] for u in USERS}
        self.unacked: dict[int, list[bytes]] = {u: [] for u in USERS}
        self.told_delivered: set[bytes] = set()
        self.errors: list[Error] = []
        # Senders whose connection dropped with output unread: a DELIVERED
        # can be lost with it (their client's outbox resends, which the
        # server answers; not modelled).
        self.deaf: set[int] = set()

    def take(self, uid: int, messages: list[InnerMessage]) -> None:
        pongs = []
        for m in messages:
            if isinstance(m, Deliver):
                sender, recipient, blob = self.sent[m.msg_id]
                assert (m.sender, uid, m.blob) == (sender, recipient, blob), m
                if m.msg_id not in self.delivered[uid]:
                    self.first_order[uid].append(m.msg_id)
                self.delivered[uid].add(m.msg_id)
                self.unacked[uid].append(m.msg_id)
                assert len(self.unacked[uid]) <= WINDOW, "more DELIVERs out than the window"
            elif isinstance(m, Delivered):
                assert self.sent[m.msg_id][0] == uid, m
                self.told_delivered.add(m.msg_id)
            elif isinstance(m, Error):
                self.errors.append(m)
            elif isinstance(m, Ping):
                pongs.append(Pong(m.nonce))
        if pongs:
            self.online[uid].send(*pongs)

    def settle(self) -> None:
        """Read what every online client was sent, until nothing more comes."""
        for _ in range(50):
            self.h.clock.advance(0.001)  # storage's answers come
            got = False
            for uid, client in list(self.online.items()):
                messages = client.received()
                got = got or bool(messages)
                self.take(uid, messages)
            soon = self.h.clock.seconds() + 0.002
            if not got and all(c.getTime() > soon for c in self.h.clock.getDelayedCalls()):
                return  # quiet, and no storage answer on its way
        raise AssertionError("the server kept talking")

    def apply(self, step: tuple) -> None:
        kind, uid = step[0], step[1]
        client = self.online.get(uid)
        if kind == "login" and client is None:
            client = self.online[uid] = self.h.raw(uid, self.keys[uid])
            self.unacked[uid] = []  # a new session: the server resends what was out
            self.take(uid, client.login())
            for _ in range(3):  # the session starts (storage answers late)
                self.h.clock.advance(0.001)
        elif kind == "lose" and client is not None:
            if step[2]:  # what the server wrote before the drop reached the client
                self.take(uid, client.received())
            else:  # lost on the way: receipts among it are gone for good
                self.deaf.add(uid)
            client.lose()
            del self.online[uid]
        elif kind == "send" and client is not None and len(self.sent) < 40:
            sends = []
            for _ in range(step[3]):
                msg_id = struct.pack(">QQ", 1, len(self.sent))
                self.sent[msg_id] = (uid, step[2], b"blob %d" % len(self.sent))
                self.order.append(msg_id)
                sends.append(Send(msg_id, step[2], self.sent[msg_id][2]))
            client.send(*sends)
        elif kind == "resend" and client is not None:
            mine = [m for m in self.order if self.sent[m][0] == uid]
            if mine:
                msg_id = mine[step[2] % len(mine)]
                _, recipient, blob = self.sent[msg_id]
                client.send(Send(msg_id, recipient, blob))
        elif kind == "ack" and client is not None and self.unacked[uid]:
            count = step[2] or len(self.unacked[uid])
            acks, self.unacked[uid] = self.unacked[uid][:count], self.unacked[uid][count:]
            client.send(*(Received(m) for m in acks))
        elif kind == "read" and client is not None:
            self.take(uid, client.received())
        elif kind == "tick":
            self.h.clock.advance(0.001)  # some of storage's answers come


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op, min_size=10, max_size=80), st.integers(0, 2**32))
def test_every_message_is_delivered_and_its_sender_told(steps: list[tuple], seed: int) -> None:
    # A plain Random: hypothesis's own would end a test from inside the router.
    model = Model(random.Random(seed))
    for step in steps:
        model.apply(step)
    for uid in USERS:
        model.apply(("login", uid))
    model.settle()
    for _ in range(40):  # everyone acknowledges until nothing is left
        if not any(model.unacked.values()):
            break
        for uid in USERS:
            model.apply(("ack", uid, 0))
        model.settle()
    assert not any(model.unacked.values())
    assert model.h.storage._messages == {}, "a delivered message was left on disk"
    assert model.errors == []
    for msg_id, (_, recipient, _) in model.sent.items():
        assert msg_id in model.delivered[recipient], msg_id
    told = {m for m, (sender, _, _) in model.sent.items() if sender not in model.deaf}
    assert told <= model.told_delivered
    # In order: each sender's messages reach a recipient first in the order sent.
    for recipient, firsts in model.first_order.items():
        for sender in USERS:
            mine = [m for m in firsts if model.sent[m][0] == sender]
            assert mine == sorted(mine, key=model.order.index), (sender, recipient)
