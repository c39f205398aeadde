"""Regenerate tests/vectors/handshake.json (fixed inputs -> exact bytes).

Run from the worktree root: ``python -m tests.vectors.generate_handshake``.
The sealed frames are built here with explicit IVs from the block primitives,
not with :class:`enclaves.session.Session`, so the vectors check the session
code rather than repeat it.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from enclaves import inner
from enclaves.crypto import KeyPair, cbc_encrypt, cmac_tag, sha256
from enclaves.frames import ErrorCode, FrameType, encode_error, encode_frame
from enclaves.handshake import AUTH_FAILED_TEXT, ClientHandshake, ServerHandshake
from enclaves.storage.interface import UserRecord

HERE = Path(__file__).resolve().parent


def _seal_with_iv(keys: KeyPair, seq: int, iv: bytes, plaintext: bytes) -> bytes:
    aad = b"\x01\x10" + struct.pack(">Q", seq)
    body = cbc_encrypt(keys.enc, iv, plaintext)
    tag = cmac_tag(keys.auth, struct.pack(">H", len(aad)) + aad + iv + body)
    payload = struct.pack(">Q", seq) + iv + body + tag
    return struct.pack(">I", len(payload) + 2) + b"\x01\x10" + payload


def build() -> dict[str, object]:
    user_id = 0x0123456789ABCDEF
    k_u = KeyPair(bytes(range(32)), bytes(range(32, 64)))
    nc = bytes([0xA1]) * 32
    ec = bytes(range(64, 96))
    ns = bytes([0xB2]) * 32
    es = bytes(range(96, 128))
    client = ClientHandshake(user_id, k_u, nonce=nc, ephemeral=ec)
    hello = client.hello_frame()
    server = ServerHandshake(nonce=ns, ephemeral=es)
    assert server.receive_hello(hello[6:]) == user_id
    welcome, keys = server.authenticate(UserRecord(user_id, k_u))
    assert client.receive_welcome(welcome[6:]) == keys
    c2s_plain = inner.encode_all([inner.Send(bytes(range(16)), 0x1111, b"e2e blob"), inner.Ping(7)])
    s2c_plain = inner.encode_all(
        [inner.Directory((0x1111, user_id)), inner.Accepted(bytes(range(16)))]
    )
    c2s_ivs = [bytes([0xC0]) * 16, bytes([0xC1]) * 16]
    s2c_ivs = [bytes([0xD0]) * 16]
    c2s = [
        _seal_with_iv(keys.c2s, 0, c2s_ivs[0], c2s_plain),
        _seal_with_iv(keys.c2s, 1, c2s_ivs[1], inner.encode(inner.Received(bytes(16)))),
    ]
    s2c = [_seal_with_iv(keys.s2c, 0, s2c_ivs[0], s2c_plain)]
    # Intermediate values, for an implementation to find where it goes wrong.
    ec_key = X25519PrivateKey.from_private_bytes(ec)
    es_key = X25519PrivateKey.from_private_bytes(es)
    shared = ec_key.exchange(es_key.public_key())
    transcript = sha256(hello[4:] + welcome[6:70])
    # Negative cases: a HELLO with its last tag bit flipped gets exactly this
    # ERROR frame; the first c2s frame with one ciphertext bit flipped must
    # not open.
    bad_hello = hello[:-1] + bytes([hello[-1] ^ 0x01])
    refused = ServerHandshake(nonce=ns, ephemeral=es)
    refused.receive_hello(bad_hello[6:])
    try:
        refused.authenticate(UserRecord(user_id, k_u))
    except Exception as error:  # HandshakeError: the server's answer is this frame
        assert getattr(error, "code", None) is ErrorCode.AUTH_FAILED, error
    else:
        raise AssertionError("a flipped HELLO tag was accepted")
    auth_failed = encode_frame(
        FrameType.ERROR, encode_error(ErrorCode.AUTH_FAILED, AUTH_FAILED_TEXT)
    )
    tampered = bytearray(c2s[0])
    tampered[4 + 2 + 8 + 16] ^= 0x80  # the first ciphertext byte after the IV
    return {
        "description": "Enclaves v1 handshake and first sealed frames; all hex; "
        "frames include their u32 length prefix. Sealed frames use the IVs in "
        "c2s_ivs / s2c_ivs (also bytes 14-29 of each frame). shared_secret is "
        "X25519(ec, es), transcript_hash is H. bad_tag_hello_frame is hello_frame "
        "with the last tag bit flipped: a server answers it with exactly "
        "auth_failed_frame. tampered_c2s_frame is c2s_frames[0] with one "
        "ciphertext bit flipped: it must not open.",
        "user_id": user_id,
        "k_u_enc": k_u.enc.hex(),
        "k_u_auth": k_u.auth.hex(),
        "nc": nc.hex(),
        "ec_private": ec.hex(),
        "ns": ns.hex(),
        "es_private": es.hex(),
        "hello_frame": hello.hex(),
        "welcome_frame": welcome.hex(),
        "c2s_enc": keys.c2s.enc.hex(),
        "c2s_auth": keys.c2s.auth.hex(),
        "s2c_enc": keys.s2c.enc.hex(),
        "s2c_auth": keys.s2c.auth.hex(),
        "c2s_plaintexts": [c2s_plain.hex(), inner.encode(inner.Received(bytes(16))).hex()],
        "c2s_frames": [frame.hex() for frame in c2s],
        "s2c_plaintexts": [s2c_plain.hex()],
        "s2c_frames": [frame.hex() for frame in s2c],
        "c2s_ivs": [iv.hex() for iv in c2s_ivs],
        "s2c_ivs": [iv.hex() for iv in s2c_ivs],
        "shared_secret": shared.hex(),
        "transcript_hash": transcript.hex(),
        "bad_tag_hello_frame": bad_hello.hex(),
        "auth_failed_frame": auth_failed.hex(),
        "tampered_c2s_frame": bytes(tampered).hex(),
    }


if __name__ == "__main__":
    (HERE / "handshake.json").write_text(json.dumps(build(), indent=2) + "\n")
