"""Sans-IO cryptographic core (DESIGN.md §2 and §5).

Every primitive comes from ``cryptography``.  Every failure to open, verify or
agree raises :class:`CryptoError` with one fixed message, so that callers can
not leak which check failed.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from typing import Any

from attrs import field, frozen
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import cmac, hashes, padding
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "BLOCK",
    "TAG_SIZE",
    "CryptoError",
    "KeyPair",
    "Sealer",
    "StreamSealer",
    "seal",
    "open_sealed",
    "cmac_tag",
    "cmac_verify",
    "cbc_encrypt",
    "cbc_decrypt",
    "hkdf_sha256",
    "x25519_keypair",
    "x25519_public",
    "x25519",
    "sha256",
    "fingerprint",
    "safety_number",
    "format_digits",
]

BLOCK = 16
TAG_SIZE = 16
KEY_SIZE = 32
_MIN_SEALED = BLOCK + BLOCK + TAG_SIZE  # IV, one padded block, tag
_U16 = struct.Struct(">H")
_PADS = [bytes((n,)) * n for n in range(BLOCK + 1)]  # PKCS#7 padding of n bytes


class CryptoError(Exception):
    """Any failure to open, verify, agree or derive.  The message never varies."""

    def __init__(self) -> None:
        super().__init__("cryptographic check failed")


def _is_key(_inst: object, attribute: object, value: bytes) -> None:
    if not isinstance(value, bytes) or len(value) != KEY_SIZE:
        raise ValueError("a key must be 32 bytes")


@frozen
class KeyPair:
    """An (enc, auth) pair of 32-byte keys: one for AES-CBC, one for CMAC."""

    enc: bytes = field(repr=False, validator=_is_key)
    auth: bytes = field(repr=False, validator=_is_key)

    def __attrs_post_init__(self) -> None:
        if hmac.compare_digest(self.enc, self.auth):
            raise ValueError("enc and auth keys must differ")

    @classmethod
    def generate(cls) -> KeyPair:
        return cls(os.urandom(KEY_SIZE), os.urandom(KEY_SIZE))

    @classmethod
    def from_bytes(cls, raw: bytes) -> KeyPair:
        if len(raw) != 2 * KEY_SIZE:
            raise ValueError("a key pair is 64 bytes")
        return cls(bytes(raw[:KEY_SIZE]), bytes(raw[KEY_SIZE:]))

    def to_bytes(self) -> bytes:
        return self.enc + self.auth


# -- block primitives ---------------------------------------------------------


def cbc_encrypt(key: bytes, iv: bytes, plaintext: bytes) -> bytes:
    """AES-CBC with PKCS#7 padding."""
    padder = padding.PKCS7(128).padder()
    padded = padder.update(plaintext) + padder.finalize()
    enc = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    return enc.update(padded) + enc.finalize()


def cbc_decrypt(key: bytes, iv: bytes, ciphertext: bytes) -> bytes:
    """AES-CBC decryption and strict PKCS#7 unpadding; any failure is CryptoError."""
    if len(ciphertext) == 0 or len(ciphertext) % BLOCK or len(iv) != BLOCK:
        raise CryptoError()
    dec = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
    padded = dec.update(ciphertext) + dec.finalize()
    return _unpad(padded)


def _unpad(padded: bytes) -> bytes:
    unpadder = padding.PKCS7(128).unpadder()
    try:
        return unpadder.update(padded) + unpadder.finalize()
    except ValueError:
        raise CryptoError() from None


def cmac_tag(key: bytes, data: bytes) -> bytes:
    """AES-CMAC (NIST SP 800-38B) of ``data``."""
    mac = cmac.CMAC(algorithms.AES(key))
    mac.update(data)
    return mac.finalize()


def cmac_verify(key: bytes, data: bytes, tag: bytes) -> None:
    """Constant-time CMAC check; raises CryptoError on mismatch."""
    mac = cmac.CMAC(algorithms.AES(key))
    mac.update(data)
    try:
        mac.verify(tag)
    except InvalidSignature:
        raise CryptoError() from None


# -- seal / open ----------------------------------------------------------------


class Sealer:
    """Seal and open under one key pair; key objects are built once, not per call."""

    __slots__ = ("_aes", "_mac")

    def __init__(self, keys: KeyPair) -> None:
        self._aes = algorithms.AES(keys.enc)
        self._mac = cmac.CMAC(algorithms.AES(keys.auth))

    def __repr__(self) -> str:
        return "<Sealer>"

    def mac(self, *parts: bytes) -> bytes:
        """CMAC over the concatenation of ``parts`` with this pair's auth key."""
        mac = self._mac.copy()
        for part in parts:
            mac.update(part)
        return mac.finalize()

    def verify(self, tag: bytes, *parts: bytes) -> None:
        """Constant-time check of ``tag`` over ``parts``; raises CryptoError."""
        mac = self._mac.copy()
        for part in parts:
            mac.update(part)
        try:
            mac.verify(tag)
        except InvalidSignature:
            raise CryptoError() from None

    def encrypt_raw(self, iv: bytes, data: bytes) -> bytes:
        """Unpadded AES-CBC of whole blocks (for the synthetic-IV user file)."""
        enc = Cipher(self._aes, modes.CBC(iv)).encryptor()
        return enc.update(data) + enc.finalize()

    def decrypt_raw(self, iv: bytes, data: bytes) -> bytes:
        dec = Cipher(self._aes, modes.CBC(iv)).decryptor()
        return dec.update(data) + dec.finalize()

    def seal(self, aad: bytes, plaintext: bytes) -> bytes:
        """``IV || C || T`` as DESIGN.md §2: encrypt-then-MAC over length-prefixed aad."""
        if len(aad) > 0xFFFF:
            raise CryptoError()
        iv = os.urandom(BLOCK)
        padder = padding.PKCS7(128).padder()
        padded = padder.update(plaintext) + padder.finalize()
        enc = Cipher(self._aes, modes.CBC(iv)).encryptor()
        body = enc.update(padded) + enc.finalize()
        mac = self._mac.copy()
        mac.update(struct.pack(">H", len(aad)))
        mac.update(aad)
        mac.update(iv)
        mac.update(body)
        return iv + body + mac.finalize()

    def open(self, aad: bytes, blob: bytes) -> bytes:
        """Length check, constant-time tag check, decrypt, strict unpad."""
        size = len(blob)
        if size < _MIN_SEALED or (size - TAG_SIZE) % BLOCK or len(aad) > 0xFFFF:
            raise CryptoError()
        blob = bytes(blob)
        iv = blob[:BLOCK]
        body = blob[BLOCK:-TAG_SIZE]
        mac = self._mac.copy()
        mac.update(struct.pack(">H", len(aad)))
        mac.update(aad)
        mac.update(iv)
        mac.update(body)
        try:
            mac.verify(blob[-TAG_SIZE:])
        except InvalidSignature:
            raise CryptoError() from None
        dec = Cipher(self._aes, modes.CBC(iv)).decryptor()
        return _unpad(dec.update(body) + dec.finalize())


class StreamSealer(Sealer):
    """A :class:`Sealer` for one connection's frames, used from one thread only.

    Same bytes on the wire as :class:`Sealer`, without building an OpenSSL
    cipher context per call (most of the cost of sealing a small frame): it
    keeps one CBC encryptor and one CBC decryptor for its whole life.

    - ``seal`` lets the encryptor's chain run on from the previous frame and
      feeds it 16 fresh random bytes first; their ciphertext block is the IV
      (the forward cipher under the same key applied to a random block, as in
      NIST SP 800-38A, appendix C).  docs/design-changes.rst explains it.
    - ``open`` feeds ``IV || C`` to the running decryptor: the first block out
      is the IV decrypted against the previous chain and is dropped; the rest
      is exactly AES-CBC-decrypt(IV, C).  The tag is checked first, as always.
    """

    __slots__ = ("_decryptor", "_encryptor")

    def __init__(self, keys: KeyPair) -> None:
        super().__init__(keys)
        self._encryptor: Any = None
        self._decryptor: Any = None

    def __repr__(self) -> str:
        return "<StreamSealer>"

    def seal(self, aad: bytes, plaintext: bytes) -> bytes:
        if len(aad) > 0xFFFF:
            raise CryptoError()
        encryptor = self._encryptor
        if encryptor is None:
            encryptor = Cipher(self._aes, modes.CBC(os.urandom(BLOCK))).encryptor()
            self._encryptor = encryptor
        data = os.urandom(BLOCK) + bytes(plaintext)
        data += _PADS[BLOCK - len(data) % BLOCK]
        iv_body = encryptor.update(data)
        if len(iv_body) != len(data):  # never: the chain must stay block-aligned
            self._encryptor = None
            raise CryptoError()
        mac = self._mac.copy()
        mac.update(_U16.pack(len(aad)) + aad)
        mac.update(iv_body)
        return iv_body + mac.finalize()

    def open(self, aad: bytes, blob: bytes) -> bytes:
        size = len(blob)
        if size < _MIN_SEALED or (size - TAG_SIZE) % BLOCK or len(aad) > 0xFFFF:
            raise CryptoError()
        blob = bytes(blob)
        iv_body = blob[:-TAG_SIZE]
        mac = self._mac.copy()
        mac.update(_U16.pack(len(aad)) + aad)
        mac.update(iv_body)
        try:
            mac.verify(blob[-TAG_SIZE:])
        except InvalidSignature:
            raise CryptoError() from None
        decryptor = self._decryptor
        if decryptor is None:
            decryptor = Cipher(self._aes, modes.CBC(bytes(BLOCK))).decryptor()
            self._decryptor = decryptor
        padded = decryptor.update(iv_body)
        if len(padded) != len(iv_body):  # never, with padding left to us
            self._decryptor = None
            raise CryptoError()
        # Strict PKCS#7; the tag is already good, so no oracle is left to time.
        pad = padded[-1]
        if not 1 <= pad <= BLOCK or not padded.endswith(_PADS[pad]):
            raise CryptoError()
        return padded[BLOCK:-pad]


def seal(keys: KeyPair, aad: bytes, plaintext: bytes) -> bytes:
    """One-shot :meth:`Sealer.seal`; build a Sealer for repeated use."""
    return Sealer(keys).seal(aad, plaintext)


def open_sealed(keys: KeyPair, aad: bytes, blob: bytes) -> bytes:
    """One-shot :meth:`Sealer.open`; build a Sealer for repeated use."""
    return Sealer(keys).open(aad, blob)


# -- key agreement and derivation ---------------------------------------------


def hkdf_sha256(ikm: bytes, salt: bytes | None, info: bytes, length: int) -> bytes:
    """HKDF-SHA256 (RFC 5869); an impossible length is CryptoError."""
    try:
        return HKDF(hashes.SHA256(), length, salt, info).derive(ikm)
    except ValueError:
        raise CryptoError() from None


def x25519_keypair() -> tuple[X25519PrivateKey, bytes]:
    """A fresh X25519 private key and its 32-byte public key."""
    key = X25519PrivateKey.generate()
    return key, x25519_public(key)


def x25519_public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def x25519(private: X25519PrivateKey | bytes, peer_public: bytes) -> bytes:
    """X25519 agreement; a malformed or low-order peer key is CryptoError."""
    try:
        if isinstance(private, bytes):
            private = X25519PrivateKey.from_private_bytes(private)
        shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError:
        raise CryptoError() from None
    if shared == bytes(32):
        raise CryptoError()
    return shared


def sha256(*parts: bytes) -> bytes:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.digest()


# -- safety numbers (libsignal numeric fingerprint, version 0) -------------------

_FINGERPRINT_ITERATIONS = 5200


def fingerprint(identity_key: bytes, user_id: int) -> str:
    """A user's 30-digit fingerprint of their identity key and id (DESIGN.md §5)."""
    if len(identity_key) != KEY_SIZE:
        raise ValueError("an identity key is 32 bytes")
    digest = struct.pack(">H", 0) + identity_key + struct.pack(">Q", user_id)
    for _ in range(_FINGERPRINT_ITERATIONS):
        digest = hashlib.sha512(digest + identity_key).digest()
    chunks = []
    for offset in range(0, 30, 5):
        value = int.from_bytes(digest[offset : offset + 5], "big") % 100000
        chunks.append(f"{value:05d}")
    return "".join(chunks)


def safety_number(ik_a: bytes, id_a: int, ik_b: bytes, id_b: int) -> str:
    """The pair's 60 digits, the smaller fingerprint first: equal on both sides."""
    first, second = sorted((fingerprint(ik_a, id_a), fingerprint(ik_b, id_b)))
    return first + second


def format_digits(digits: str) -> str:
    """Groups of five digits separated by spaces, for reading aloud."""
    return " ".join(digits[i : i + 5] for i in range(0, len(digits), 5))
