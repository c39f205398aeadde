"""Sans-IO HELLO/WELCOME handshake (docs/protocol.rst, "Handshake").

Bytes in, bytes out: no reactor, no sockets.  Randomness (nonces and the
ephemeral X25519 private keys) can be injected so that tests and vectors are
deterministic; by default it comes from ``os.urandom``.

The server side is split in two steps so that the protocol adapter can look the
user up (a Deferred) in between::

    machine = ServerHandshake()
    user_id = machine.receive_hello(payload)       # size check only
    record = await storage.load_user(user_id)      # UserRecord or None
    welcome, keys = machine.authenticate(record)   # tag, then X25519

No Diffie-Hellman work is done and no state changes before the tag verifies.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable

from attrs import field, frozen
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from enclaves.crypto import CryptoError, KeyPair, Sealer, hkdf_sha256, sha256, x25519
from enclaves.frames import VERSION, ErrorCode, FrameType, encode_frame
from enclaves.storage.interface import UserRecord

__all__ = [
    "HELLO_SIZE",
    "WELCOME_SIZE",
    "AUTH_FAILED_TEXT",
    "HandshakeError",
    "SessionKeys",
    "ClientHandshake",
    "ServerHandshake",
    "derive_session_keys",
]

HELLO_LABEL = b"enclaves/v1/hello"
WELCOME_LABEL = b"enclaves/v1/welcome"
SESSION_INFO = b"enclaves/v1/session"
HELLO_SIZE = 8 + 32 + 32 + 16
WELCOME_SIZE = 32 + 32 + 16
AUTH_FAILED_TEXT = "authentication failed"
_U64 = struct.Struct(">Q")

Random = Callable[[int], bytes]


class HandshakeError(Exception):
    """The handshake cannot go on; ``code`` is the ERROR to send (text is safe)."""

    def __init__(self, code: ErrorCode, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


@frozen
class SessionKeys:
    """The two direction key pairs of one session."""

    c2s: KeyPair = field(repr=False)
    s2c: KeyPair = field(repr=False)


def derive_session_keys(shared: bytes, user_keys: KeyPair, transcript_hash: bytes) -> SessionKeys:
    """HKDF(ikm = X25519 || K_u.enc || K_u.auth, salt = H, info) -> c2s, s2c."""
    okm = hkdf_sha256(shared + user_keys.enc + user_keys.auth, transcript_hash, SESSION_INFO, 128)
    return SessionKeys(KeyPair.from_bytes(okm[:64]), KeyPair.from_bytes(okm[64:]))


def _hello_body(payload: bytes) -> bytes:
    return bytes((VERSION, FrameType.HELLO)) + payload


def _private(raw: bytes | None, random: Random) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(raw if raw is not None else random(32))


class ClientHandshake:
    """The client's side: :meth:`hello` once, then :meth:`receive_welcome` once."""

    def __init__(
        self,
        user_id: int,
        keys: KeyPair,
        *,
        nonce: bytes | None = None,
        ephemeral: bytes | None = None,
        random: Random = os.urandom,
    ) -> None:
        if not 0 < user_id < 1 << 64:
            raise ValueError("user id out of range")
        self.user_id = user_id
        self._keys = keys
        self._sealer = Sealer(keys)
        self._nonce = nonce if nonce is not None else random(32)
        if len(self._nonce) != 32:
            raise ValueError("nonce must be 32 bytes")
        self._ephemeral: X25519PrivateKey | None = _private(ephemeral, random)
        self._hello_payload: bytes | None = None

    def __repr__(self) -> str:
        return f"<ClientHandshake user_id={self.user_id}>"

    def hello_payload(self) -> bytes:
        """The 88-byte HELLO payload (the same bytes on every call)."""
        if self._hello_payload is None:
            assert self._ephemeral is not None
            ec_pub = self._ephemeral.public_key().public_bytes_raw()
            head = _U64.pack(self.user_id) + self._nonce + ec_pub
            self._hello_payload = head + self._sealer.mac(HELLO_LABEL, head)
        return self._hello_payload

    def hello_frame(self) -> bytes:
        """The whole HELLO frame as written to the wire."""
        return encode_frame(FrameType.HELLO, self.hello_payload())

    def receive_welcome(self, payload: bytes) -> SessionKeys:
        """Check the WELCOME tag, then derive the session keys (once)."""
        if self._ephemeral is None or self._hello_payload is None:
            raise HandshakeError(ErrorCode.BAD_FRAME, "unexpected WELCOME")
        if len(payload) != WELCOME_SIZE:
            raise HandshakeError(ErrorCode.BAD_FRAME, "WELCOME has the wrong size")
        ns_es = payload[:64]
        transcript = sha256(_hello_body(self._hello_payload), ns_es)
        try:
            self._sealer.verify(payload[64:], WELCOME_LABEL, transcript)
            shared = x25519(self._ephemeral, payload[32:64])
        except CryptoError:
            raise HandshakeError(
                ErrorCode.AUTH_FAILED, "the server failed to authenticate"
            ) from None
        self._ephemeral = None  # used once, then forgotten
        return derive_session_keys(shared, self._keys, transcript)


# A key pair no user has: unknown ids get the same CMAC work as known ones.
_DUMMY_KEYS = KeyPair(os.urandom(32), os.urandom(32))


class ServerHandshake:
    """The server's side: :meth:`receive_hello`, look the user up, :meth:`authenticate`.

    Every failure raises :class:`HandshakeError`; unknown user and bad tag give
    the same code and text after the same work.
    """

    def __init__(
        self,
        *,
        nonce: bytes | None = None,
        ephemeral: bytes | None = None,
        random: Random = os.urandom,
    ) -> None:
        self._nonce = nonce
        self._ephemeral = ephemeral
        self._random = random
        self._hello: bytes | None = None
        self._done = False
        self.user_id: int | None = None

    def __repr__(self) -> str:
        return f"<ServerHandshake user_id={self.user_id}>"

    def receive_hello(self, payload: bytes) -> int:
        """Size check only; returns the claimed user id to look up."""
        if self._hello is not None or self._done:
            raise HandshakeError(ErrorCode.BAD_FRAME, "unexpected HELLO")
        if len(payload) != HELLO_SIZE:
            raise HandshakeError(ErrorCode.BAD_FRAME, "HELLO has the wrong size")
        self._hello = bytes(payload)
        (self.user_id,) = _U64.unpack_from(payload)
        return self.user_id

    def authenticate(self, record: UserRecord | None) -> tuple[bytes, SessionKeys]:
        """Verify the HELLO tag against ``record`` (None: unknown user), then do X25519.

        Returns the whole WELCOME frame and the session keys.
        """
        hello = self._hello
        if hello is None or self._done:
            raise HandshakeError(ErrorCode.BAD_FRAME, "no HELLO to authenticate")
        self._done = True
        self._hello = None
        known = record is not None and record.user_id == self.user_id
        keys = record.keys if known and record is not None else _DUMMY_KEYS
        sealer = Sealer(keys)
        try:
            sealer.verify(hello[72:], HELLO_LABEL, hello[:72])
        except CryptoError:
            raise HandshakeError(ErrorCode.AUTH_FAILED, AUTH_FAILED_TEXT) from None
        if not known:  # unreachable unless the dummy key was guessed
            raise HandshakeError(ErrorCode.AUTH_FAILED, AUTH_FAILED_TEXT)
        ephemeral = _private(self._ephemeral, self._random)
        self._ephemeral = None
        try:
            shared = x25519(ephemeral, hello[40:72])
        except CryptoError:
            raise HandshakeError(ErrorCode.AUTH_FAILED, AUTH_FAILED_TEXT) from None
        nonce = self._nonce if self._nonce is not None else self._random(32)
        ns_es = nonce + ephemeral.public_key().public_bytes_raw()
        transcript = sha256(_hello_body(hello), ns_es)
        welcome = ns_es + sealer.mac(WELCOME_LABEL, transcript)
        return encode_frame(FrameType.WELCOME, welcome), derive_session_keys(
            shared, keys, transcript
        )
