"""A TCP relay between a client and the daemon that counts the client's
frames and, after a given number, stops forwarding or cuts the connection."""

from __future__ import annotations

import socket
import struct
import threading


class Relay:
    """Forwards ``127.0.0.1:port`` to ``upstream``.  Once the client's first
    ``after`` frames are forwarded, ``"silent"`` forwards nothing more either
    way (the connection stays open); ``"cut"`` closes both sides when the
    client's next frame comes (not forwarded).  Later connections are
    forwarded whole."""

    def __init__(self, upstream: int, after: int, action: str) -> None:
        self.upstream, self.after, self.action = upstream, after, action
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.sockets: list[socket.socket] = []
        self.client_frames: list[int] = []  # sizes, first connection
        self.server_bytes = 0
        self.done = threading.Event()  # the action was taken
        self._first = True
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream))
            self.sockets += [client, server]
            first, self._first = self._first, False
            threading.Thread(target=self._up, args=(client, server, first), daemon=True).start()
            threading.Thread(target=self._down, args=(server, client, first), daemon=True).start()

    def _up(self, client: socket.socket, server: socket.socket, first: bool) -> None:
        buffer = b""
        while True:
            try:
                data = client.recv(65536)
            except OSError:
                return
            if not data:
                server.close()
                return
            if not first:
                server.sendall(data)
                continue
            if self.done.is_set():
                continue  # silent: dropped
            buffer += data
            while len(buffer) >= 4:
                (size,) = struct.unpack(">I", buffer[:4])
                if len(buffer) < 4 + size:
                    break
                frame, buffer = buffer[: 4 + size], buffer[4 + size :]
                if len(self.client_frames) == self.after:  # "cut"
                    self._act(client, server)
                    return
                server.sendall(frame)
                self.client_frames.append(size)
                if len(self.client_frames) == self.after and self.action == "silent":
                    self._act(client, server)
                    return

    def _act(self, client: socket.socket, server: socket.socket) -> None:
        if self.action == "cut":
            for sock in (client, server):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
        self.done.set()

    def _down(self, server: socket.socket, client: socket.socket, first: bool) -> None:
        while True:
            try:
                data = server.recv(65536)
            except OSError:
                return
            if not data:
                try:
                    client.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            if first and self.done.is_set():
                continue  # silent: dropped
            self.server_bytes += len(data)
            try:
                client.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self.sock.close()
        for sock in self.sockets:
            try:
                sock.close()
            except OSError:
                pass
