"""The routing benchmark's load generator: sender/receiver pairs on raw sockets.

One process drives ``pairs`` sender -> receiver pairs against the Enclaves
server or a baseline relay (``bench/relay.py``), on non-blocking sockets and
one ``epoll`` loop: no Twisted, no client library above the sans-IO session,
so that on a small machine as much CPU as possible is left to the server.
It does what the server needs from real clients and nothing more:

- Enclaves: the real handshake (``ClientHandshake``) and sealed session
  frames; each sender coalesces what it sends in one turn into one frame, as
  the client library does; each receiver opens every frame and answers the
  DELIVERs of a frame with one frame of RECEIVEDs.  Senders read and drop
  what the server sends them (ACCEPTED, DELIVERED) unopened: opening it is
  the client's cost, not the server's.
- Baselines: a login frame with the user id, then a sender's turn as one
  frame in the clear (``bare``, framed as for Enclaves) or one sealed frame
  per message (``naive``); no receipts.

Closed loop (``rate`` 0): each sender keeps ``window`` messages in flight and
sends one more for each one its receiver gets.  Open loop: every 5 ms each
sender sends its share of ``rate`` messages per second in one frame; with
``staggered`` arrivals the senders take turns (sender i due at i/N of the
5 ms, as independent clients would; ``epoll`` wakes this loop at most once a
millisecond, so a few senders' turns come together), with ``bursts`` all
send at the same instant (the worst case for queueing).  Each burst is
stamped with the time it was due, so a late wake-up of the generator counts
as latency.  The sample is every message stamped inside the measured
window, received whenever (the loop reads on for 0.5 s after the window);
latency runs from the stamp to the receiver having opened its frame.
"""

from __future__ import annotations

import errno
import gc
import itertools
import json
import os
import select
import socket
import struct
import time
from typing import Any

from enclaves.frames import MAX_FRAME, FrameDecoder, FrameType, encode_frame
from enclaves.handshake import ClientHandshake
from enclaves.inner import Deliver, Ping, decode_all
from enclaves.session import Session

TICK = 0.005  # open loop: seconds between bursts
_SEND_HEAD = struct.Struct(">IB16sQ")  # u32 length, kind SEND, msg_id, recipient
_RECEIVED = struct.Struct(">IB16s")  # u32 length, kind RECEIVED, msg_id
_KIND_SEND, _KIND_RECEIVED = 0x01, 0x04
_STAMP = struct.Struct(">d")


class Conn:
    """One non-blocking socket with its session and unsent bytes."""

    def __init__(self, sock: socket.socket, session: Session | None) -> None:
        self.sock = sock
        self.session = session
        self.decoder = FrameDecoder(MAX_FRAME)
        self.pending = bytearray()  # what the kernel did not take yet
        self.partner: Conn | None = None  # a receiver's sender
        self.recipient = 0  # a sender's receiver id

    def write(self, data: bytes, poller: Any) -> None:
        if self.pending:
            self.pending += data
            return
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            sent = 0
        if sent < len(data):
            self.pending += data[sent:]
            poller.modify(self.sock.fileno(), select.EPOLLIN | select.EPOLLOUT)

    def drain(self, poller: Any) -> None:
        try:
            sent = self.sock.send(self.pending)
        except BlockingIOError:
            return
        del self.pending[:sent]
        if not self.pending:
            poller.modify(self.sock.fileno(), select.EPOLLIN)


def _read_frames_blocking(conn: Conn) -> list[Any]:
    while True:
        data = conn.sock.recv(65536)
        if not data:
            raise ConnectionError("the server closed the connection during login")
        frames = conn.decoder.feed(data)
        if frames:
            return frames


def _connect(port: int, mode: str, user_id: int, keys: Any) -> Conn:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if mode == "enclaves":
        handshake = ClientHandshake(user_id, keys)
        conn = Conn(sock, None)
        sock.sendall(handshake.hello_frame())
        (welcome, *_rest) = _read_frames_blocking(conn)
        if welcome.type is not FrameType.WELCOME:
            raise ConnectionError(f"login of {user_id} refused: {welcome.type.name}")
        conn.session = Session(handshake.receive_welcome(welcome.payload), "client", MAX_FRAME)
        sock.sendall(conn.session.seal([Ping(1)]))  # the server goes live on it
    else:
        from bench.relay import bench_keys

        session = Session(bench_keys(user_id), "client", MAX_FRAME) if mode == "naive" else None
        conn = Conn(sock, session)
        sock.sendall(encode_frame(FrameType.HELLO, struct.pack(">Q", user_id)))
    sock.setblocking(False)
    return conn


def run(
    mode: str,
    port: int,
    users: list[tuple[int, Any]],
    start_at: float,
    t_measure: float,
    t_end: float,
    window: int,
    rate: float,
    body_size: int,
    staggered: bool,
) -> dict[str, Any]:
    """Drive ``len(users) // 2`` pairs; returns the count and latencies (µs) measured."""
    pairs = []
    for i in range(0, len(users) - 1, 2):
        (sender_id, sender_keys), (receiver_id, receiver_keys) = users[i], users[i + 1]
        sender = _connect(port, mode, sender_id, sender_keys)
        receiver = _connect(port, mode, receiver_id, receiver_keys)
        sender.recipient, receiver.partner = receiver_id, sender
        pairs.append((sender, receiver))
    poller = select.epoll()
    by_fd: dict[int, Conn] = {}
    for sender, receiver in pairs:
        for conn in (sender, receiver):
            by_fd[conn.sock.fileno()] = conn
            poller.register(conn.sock.fileno(), select.EPOLLIN)
    receivers = {receiver.sock.fileno() for _sender, receiver in pairs}

    pad = bytes(body_size - _STAMP.size)
    prefix, counter = struct.pack(">Q", os.getpid()), itertools.count(1)
    latencies: list[float] = []
    sent = 0  # messages stamped inside the measured window
    # Enclaves and the bare relay: a sender's turn is one frame; naive: one
    # frame per message.  Only Enclaves' receivers answer with RECEIVEDs.
    coalesce = mode != "naive"
    acknowledge = mode == "enclaves"

    def send(sender: Conn, how_many: int, when: float) -> None:
        nonlocal sent
        if t_measure <= when < t_end:
            sent += how_many
        body = _STAMP.pack(when) + pad
        head = _SEND_HEAD.pack
        size = 25 + len(body)
        messages = [
            head(size, _KIND_SEND, prefix + next(counter).to_bytes(8, "big"), sender.recipient)
            + body
            for _ in range(how_many)
        ]
        session = sender.session
        if session is None:  # bare: in the clear
            data = encode_frame(FrameType.SEALED, b"".join(messages))
        elif coalesce:
            data = session.seal_frame(b"".join(messages))
        else:
            data = b"".join(session.seal_frame(m) for m in messages)
        sender.write(data, poller)

    def received(receiver: Conn, data: bytes) -> None:
        acks: list[bytes] = []
        delivered = 0
        for frame in receiver.decoder.feed(data):
            if frame.type is not FrameType.SEALED:
                raise ConnectionError(f"unexpected {frame.type.name} frame")
            session = receiver.session
            if session is not None:
                messages = session.open(frame.payload)
            else:
                messages = decode_all(frame.payload)
            now = time.time()  # the frame is open: its messages reached the application
            for message in messages:
                if type(message) is not Deliver:
                    continue  # DIRECTORY, PONG: not ours to measure
                delivered += 1
                (stamp,) = _STAMP.unpack_from(message.blob)
                if t_measure <= stamp < t_end:  # sent in the window, received whenever
                    latencies.append(now - stamp)
                if acknowledge:
                    acks.append(_RECEIVED.pack(17, _KIND_RECEIVED, message.msg_id))
        if acks:
            assert receiver.session is not None
            receiver.write(receiver.session.seal_frame(b"".join(acks)), poller)
        if delivered and not rate and receiver.partner is not None:
            now = time.time()
            if now < t_end:
                send(receiver.partner, delivered, now)

    # The set-up's objects leave the collector's sight (as the server does).
    gc.collect()
    gc.freeze()
    while time.time() < start_at:
        time.sleep(min(0.01, max(0.0, start_at - time.time())))
    if not rate:
        now = time.time()
        for sender, _receiver in pairs:
            send(sender, window, now)
    n = len(pairs)
    share = rate / n * TICK  # each sender's messages per TICK
    credits = [0.0] * n
    turn = 0  # staggered: the sender whose turn it is
    step = TICK / n if staggered else TICK
    next_tick = time.time()
    stop_at = t_end + 0.5
    max_lag = 0.0
    while True:
        now = time.time()
        if now >= stop_at:
            break
        if rate and now >= next_tick:
            if next_tick < t_end:
                # Stamped with the time the burst was due: a late wake-up of
                # this loop counts as latency, it is not hidden.
                max_lag = max(max_lag, now - next_tick)
                for index in (turn,) if staggered else range(n):
                    credits[index] += share
                    rounds = int(credits[index])
                    credits[index] -= rounds
                    if rounds:
                        send(pairs[index][0], rounds, next_tick)
                turn = (turn + 1) % n
            next_tick += step
        timeout = max(0.0, min(next_tick if rate else stop_at, stop_at) - time.time())
        for fd, events in poller.poll(timeout):
            conn = by_fd[fd]
            if events & select.EPOLLOUT:
                conn.drain(poller)
            if events & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                try:
                    data = conn.sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError as error:
                    if error.errno == errno.EAGAIN:
                        continue
                    raise
                if not data:
                    raise ConnectionError("the server closed a connection")
                if fd in receivers:
                    received(conn, data)
                # a sender's receipts are dropped unopened
    poller.close()
    for sender, receiver in pairs:
        sender.sock.close()
        receiver.sock.close()
    # Microseconds, as integers: a few hundred thousand of them stay a small JSON.
    return {
        "sent": sent,
        "count": len(latencies),
        "latencies": [round(x * 1e6) for x in latencies],
        "max_lag_ms": round(max_lag * 1000, 3),
    }


def main(argv: list[str]) -> None:
    """``worker MODE PORT PAIRS OFFSET START WARMUP SECONDS WINDOW RATE USERS BODY``."""
    (mode, port, pairs, offset, start_at, warmup, seconds, window, rate, users_path, arrivals,
     body) = argv  # fmt: skip
    if arrivals not in ("staggered", "bursts"):
        raise SystemExit(f"arrivals must be staggered or bursts, not {arrivals!r}")
    n, first = int(pairs), int(offset)
    if mode == "enclaves":
        from bench.routing import _read_users

        users = _read_users(users_path)[2 * first : 2 * (first + n)]
    else:
        users = [(1 + 2 * first + i, None) for i in range(2 * n)]
    t_measure = float(start_at) + float(warmup)
    result = run(
        mode,
        int(port),
        users,
        float(start_at),
        t_measure,
        t_measure + float(seconds),
        int(window),
        float(rate),
        int(body),
        arrivals == "staggered",
    )
    print(json.dumps(result))
