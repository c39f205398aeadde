"""Properties of seal/open, the MAC and the safety numbers."""

from __future__ import annotations

import array
import os
import struct
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from enclaves import crypto

KEYS = crypto.KeyPair(bytes(range(32)), bytes(range(32, 64)))
SEALER = crypto.Sealer(KEYS)
# A session's sealer keeps its cipher contexts: it must behave exactly alike.
STREAM = crypto.StreamSealer(KEYS)
BOTH = pytest.mark.parametrize("sealer", [SEALER, STREAM], ids=["Sealer", "StreamSealer"])


def _raw_cbc_mac(key: bytes, msg: bytes) -> bytes:
    enc = Cipher(algorithms.AES(key), modes.CBC(bytes(16))).encryptor()
    return (enc.update(msg) + enc.finalize())[-16:]


def test_raw_cbc_mac_forgery_fails() -> None:
    key = os.urandom(32)
    m = os.urandom(16)
    # The forgery works against raw CBC-MAC...
    t_raw = _raw_cbc_mac(key, m)
    forged = m + bytes(a ^ b for a, b in zip(m, t_raw, strict=True))
    assert _raw_cbc_mac(key, forged) == t_raw
    # ...and not against the project's MAC.
    t = crypto.cmac_tag(key, m)
    forged = m + bytes(a ^ b for a, b in zip(m, t, strict=True))
    with pytest.raises(crypto.CryptoError):
        crypto.cmac_verify(key, forged, t)
    sealer = crypto.Sealer(crypto.KeyPair(os.urandom(32), key))
    with pytest.raises(crypto.CryptoError):
        sealer.verify(sealer.mac(m), forged)


def test_padding_never_inspected_when_tag_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bytes] = []
    real_unpad = crypto._unpad

    def spy(padded: bytes) -> bytes:
        calls.append(padded)
        return real_unpad(padded)

    monkeypatch.setattr(crypto, "_unpad", spy)
    blob = SEALER.seal(b"aad", b"hello")
    assert SEALER.open(b"aad", blob) == b"hello"
    assert len(calls) == 1
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(crypto.CryptoError):
        SEALER.open(b"aad", tampered)
    assert len(calls) == 1


@BOTH
def test_bad_padding_under_valid_tag_is_the_same_error(sealer: crypto.Sealer) -> None:
    iv = os.urandom(16)
    enc = Cipher(algorithms.AES(KEYS.enc), modes.CBC(iv)).encryptor()
    body = enc.update(b"x" * 15 + b"\x07") + enc.finalize()  # invalid PKCS#7
    tag = sealer.mac(struct.pack(">H", 0), b"", iv, body)
    with pytest.raises(crypto.CryptoError) as bad_padding:
        sealer.open(b"", iv + body + tag)
    with pytest.raises(crypto.CryptoError) as bad_tag:
        sealer.open(b"", iv + body + bytes(16))
    assert str(bad_padding.value) == str(bad_tag.value)


@BOTH
def test_sealing_twice_differs(sealer: crypto.Sealer) -> None:
    assert sealer.seal(b"a", b"same") != sealer.seal(b"a", b"same")


@BOTH
def test_aad_is_bound(sealer: crypto.Sealer) -> None:
    blob = sealer.seal(b"one", b"msg")
    with pytest.raises(crypto.CryptoError):
        sealer.open(b"two", blob)
    # The aad length prefix keeps aad and IV from sliding into each other.
    with pytest.raises(crypto.CryptoError):
        sealer.open(b"one" + blob[:1], blob[1:])


@BOTH
def test_wrong_key_fails(sealer: crypto.Sealer) -> None:
    blob = sealer.seal(b"", b"msg")
    with pytest.raises(crypto.CryptoError):
        crypto.open_sealed(crypto.KeyPair.generate(), b"", blob)


def test_keypair_rules() -> None:
    with pytest.raises(ValueError):
        crypto.KeyPair(bytes(32), bytes(32))
    with pytest.raises(ValueError):
        crypto.KeyPair(bytes(31), bytes(32))
    assert "enc" not in repr(KEYS) or KEYS.enc.hex() not in repr(KEYS)
    assert crypto.KeyPair.from_bytes(KEYS.to_bytes()) == KEYS


def test_low_order_point_refused() -> None:
    private, _ = crypto.x25519_keypair()
    with pytest.raises(crypto.CryptoError):
        crypto.x25519(private, bytes(32))


@settings(max_examples=300)
@given(aad=st.binary(max_size=300), plaintext=st.binary(max_size=2000))
def test_round_trip(aad: bytes, plaintext: bytes) -> None:
    for sealer in (SEALER, STREAM):
        assert sealer.open(aad, sealer.seal(aad, plaintext)) == plaintext
        assert crypto.open_sealed(KEYS, aad, crypto.seal(KEYS, aad, plaintext)) == plaintext


@settings(max_examples=200)
@given(
    aad=st.binary(max_size=64),
    plaintext=st.binary(max_size=200),
    data=st.data(),
)
def test_every_single_bit_flip_is_rejected(
    aad: bytes, plaintext: bytes, data: st.DataObject
) -> None:
    for sealer in (SEALER, STREAM):
        blob = sealer.seal(aad, plaintext)
        bit = data.draw(st.integers(0, len(blob) * 8 - 1))
        flipped = bytearray(blob)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(crypto.CryptoError):
            sealer.open(aad, bytes(flipped))


@BOTH
def test_every_bit_of_one_blob_is_covered(sealer: crypto.Sealer) -> None:
    blob = sealer.seal(b"aad", b"exhaustive")
    for bit in range(len(blob) * 8):
        flipped = bytearray(blob)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(crypto.CryptoError):
            sealer.open(b"aad", bytes(flipped))


@given(plaintext=st.binary(max_size=200), data=st.data())
def test_truncation_and_extension_rejected(plaintext: bytes, data: st.DataObject) -> None:
    for sealer in (SEALER, STREAM):
        blob = sealer.seal(b"", plaintext)
        cut = data.draw(st.integers(0, len(blob) - 1))
        with pytest.raises(crypto.CryptoError):
            sealer.open(b"", blob[:cut])
        extra = data.draw(st.binary(min_size=1, max_size=48))
        with pytest.raises(crypto.CryptoError):
            sealer.open(b"", blob + extra)


@given(blob=st.binary(max_size=200), aad=st.binary(max_size=20))
def test_open_never_raises_anything_else(blob: bytes, aad: bytes) -> None:
    for sealer in (SEALER, STREAM):
        with pytest.raises(crypto.CryptoError):
            sealer.open(aad, blob)


# -- the session's stream sealer --------------------------------------------------


@settings(max_examples=200)
@given(frames=st.lists(st.tuples(st.binary(max_size=40), st.binary(max_size=600)), max_size=8))
def test_stream_sealer_speaks_the_same_format(frames: list[tuple[bytes, bytes]]) -> None:
    """Either side may be a plain Sealer: one per frame, in any interleaving."""
    stream_out, stream_in = crypto.StreamSealer(KEYS), crypto.StreamSealer(KEYS)
    for aad, plaintext in frames:
        assert SEALER.open(aad, stream_out.seal(aad, plaintext)) == plaintext
        assert stream_in.open(aad, SEALER.seal(aad, plaintext)) == plaintext
        assert stream_in.open(aad, stream_out.seal(aad, plaintext)) == plaintext


def test_stream_sealer_ivs_are_not_the_previous_block() -> None:
    """Chained CBC's predictable IV (the last ciphertext block) must not appear."""
    sealer = crypto.StreamSealer(KEYS)
    previous = sealer.seal(b"", b"x" * 40)
    ivs = {previous[:16]}
    for _ in range(200):
        blob = sealer.seal(b"", b"x" * 40)
        assert blob[:16] != previous[-32:-16]  # the last block of C
        ivs.add(blob[:16])
        previous = blob
    assert len(ivs) == 201


def test_stream_sealer_decrypts_nothing_when_the_tag_fails() -> None:
    sealer = crypto.StreamSealer(KEYS)
    blob = SEALER.seal(b"aad", b"hello")
    with pytest.raises(crypto.CryptoError):
        sealer.open(b"aad", blob[:-1] + bytes([blob[-1] ^ 1]))
    assert sealer._decryptor is None  # no decryption context was even made
    assert sealer.open(b"aad", blob) == b"hello"


@pytest.mark.parametrize("pad", [0, 17, 255])
def test_stream_sealer_refuses_padding_bytes_out_of_range(pad: int) -> None:
    iv = os.urandom(16)
    enc = Cipher(algorithms.AES(KEYS.enc), modes.CBC(iv)).encryptor()
    body = enc.update(b"y" * 31 + bytes((pad,))) + enc.finalize()
    tag = SEALER.mac(struct.pack(">H", 0), b"", iv, body)
    with pytest.raises(crypto.CryptoError):
        crypto.StreamSealer(KEYS).open(b"", iv + body + tag)


@pytest.mark.parametrize(
    "odd",
    [memoryview(b"\x00\x0f").cast("H"), array.array("H", b"\x00\x0f")],
    ids=["memoryview-H", "array-H"],
)
def test_stream_sealer_pads_bytes_not_items(odd: Any) -> None:
    """A buffer of 2-byte items must not leave the running encryptor off its
    block boundary: that would shift every later frame under a valid tag."""
    sealer = crypto.StreamSealer(KEYS)
    assert crypto.open_sealed(KEYS, b"", sealer.seal(b"", odd)) == bytes(odd)
    plaintext = b"hello\n"  # ends in 0x0a, its own pad length: a shifted frame would unpad
    assert crypto.open_sealed(KEYS, b"", sealer.seal(b"", plaintext)) == plaintext


def test_stream_sealer_iv_is_the_encryption_of_a_fresh_random_block(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """IV = AES(K.enc, R xor the last block sent), R drawn from os.urandom per frame."""
    sealer = crypto.StreamSealer(KEYS)
    previous = sealer.seal(b"", b"first")[-32:-16]
    drawn: list[bytes] = []
    real = os.urandom

    def urandom(n: int) -> bytes:
        drawn.append(real(n))
        return drawn[-1]

    monkeypatch.setattr(crypto.os, "urandom", urandom)
    blob = sealer.seal(b"", b"second")
    one_block = Cipher(algorithms.AES(KEYS.enc), modes.CBC(bytes(16))).decryptor()
    block = one_block.update(blob[:16]) + one_block.finalize()  # AES^-1(IV)
    assert bytes(a ^ b for a, b in zip(block, previous, strict=True)) == drawn[-1]


class _CountingDecryptor:
    def __init__(self, inner: Any) -> None:
        self.inner, self.calls = inner, 0

    def update(self, data: bytes) -> bytes:
        self.calls += 1
        return bytes(self.inner.update(data))


def test_stream_sealer_running_decryptor_untouched_by_a_bad_tag() -> None:
    opener = crypto.StreamSealer(KEYS)
    assert opener.open(b"a", SEALER.seal(b"a", b"warm up")) == b"warm up"
    spy = _CountingDecryptor(opener._decryptor)
    opener._decryptor = spy
    blob = SEALER.seal(b"a", b"x" * 40)
    with pytest.raises(crypto.CryptoError):
        opener.open(b"a", blob[:-1] + bytes([blob[-1] ^ 1]))
    assert spy.calls == 0
    assert opener.open(b"a", blob) == b"x" * 40 and spy.calls == 1


def test_stream_sealer_opens_regardless_of_history_and_buffer_type() -> None:
    opener = crypto.StreamSealer(KEYS)
    blobs = [crypto.StreamSealer(KEYS).seal(b"", bytes([i]) * (i * 7)) for i in range(6)]
    for i in (3, 0, 5, 5, 1, 4, 2, 0):  # replays, any order: the chain state never matters
        for form in (bytes, bytearray, memoryview):
            assert opener.open(b"", form(blobs[i])) == bytes([i]) * (i * 7)


# -- safety numbers -------------------------------------------------------------

# Fixed vector (computed with this implementation and committed, so a second
# implementation can check itself): IK = 32 bytes 0x01..0x20, id = 1.
IK_A = bytes(range(1, 33))
IK_B = bytes(range(33, 65))


def test_fingerprint_shape_and_stability() -> None:
    fp = crypto.fingerprint(IK_A, 1)
    assert len(fp) == 30 and fp.isdigit()
    assert fp == crypto.fingerprint(IK_A, 1)
    assert fp != crypto.fingerprint(IK_A, 2)
    assert fp != crypto.fingerprint(IK_B, 1)


def test_fingerprint_matches_the_libsignal_algorithm() -> None:
    import hashlib

    digest = struct.pack(">H", 0) + IK_A + struct.pack(">Q", 1)
    for _ in range(5200):
        digest = hashlib.sha512(digest + IK_A).digest()
    expected = "".join(
        f"{int.from_bytes(digest[i : i + 5], 'big') % 100000:05d}" for i in range(0, 30, 5)
    )
    assert crypto.fingerprint(IK_A, 1) == expected
    assert crypto.fingerprint(IK_A, 1) == FINGERPRINT_VECTOR


FINGERPRINT_VECTOR = "504547818253006795785552558685"


def test_safety_number_is_symmetric() -> None:
    ab = crypto.safety_number(IK_A, 1, IK_B, 2)
    ba = crypto.safety_number(IK_B, 2, IK_A, 1)
    assert ab == ba and len(ab) == 60
    assert ab in (
        crypto.fingerprint(IK_A, 1) + crypto.fingerprint(IK_B, 2),
        crypto.fingerprint(IK_B, 2) + crypto.fingerprint(IK_A, 1),
    )
    assert ab[:30] <= ab[30:]
    grouped = crypto.format_digits(ab)
    assert len(grouped.split()) == 12


def test_safety_number_changes_with_a_substituted_key() -> None:
    mallory = bytes(range(100, 132))
    assert crypto.safety_number(IK_A, 1, IK_B, 2) != crypto.safety_number(IK_A, 1, mallory, 2)
