"""Byte-exact layouts of the server's files, proven with raw ``cryptography`` primitives."""

from __future__ import annotations

import struct

import pytest
from cryptography.hazmat.primitives import cmac, padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from enclaves.crypto import KeyPair, Sealer
from enclaves.storage.formats import (
    MAX_NOTICE_DATA,
    FormatError,
    decode_enrollment,
    decode_msg,
    decode_notice,
    decode_user,
    encode_enrollment,
    encode_msg,
    encode_notice,
    encode_user,
    msg_file_size,
    notice_file_name,
    parse_msg_name,
    parse_notice_name,
    parse_user_name,
)

S = KeyPair(bytes(range(32)), bytes(range(32, 64)))
SEALER = Sealer(S)
OTHER = Sealer(KeyPair.generate())
U64 = st.integers(1, 2**64 - 1)


def raw_cmac(key: bytes, data: bytes) -> bytes:
    mac = cmac.CMAC(algorithms.AES(key))
    mac.update(data)
    return mac.finalize()


def raw_cbc_decrypt(key: bytes, iv: bytes, data: bytes) -> bytes:
    dec = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
    return dec.update(data) + dec.finalize()


def test_user_file_layout_with_raw_primitives() -> None:
    user = KeyPair.generate()
    user_id = 0x0102030405060708
    data = encode_user(SEALER, user_id, user)
    assert len(data) == 80
    iv, body = data[:16], data[16:]
    plain = raw_cbc_decrypt(S.enc, iv, body)
    assert plain == user.enc + user.auth
    expected_iv = raw_cmac(S.auth, b"enclaves/v1/user" + struct.pack(">Q", user_id) + plain)
    assert iv == expected_iv
    assert decode_user(SEALER, user_id, data) == user
    # Deterministic (synthetic IV): the same user encodes the same.
    assert encode_user(SEALER, user_id, user) == data


def test_msg_file_layout_with_raw_primitives() -> None:
    blob = b"\x01e2e blob bytes" * 7
    file_id = 0xFEDCBA9876543210
    data = encode_msg(SEALER, file_id, 42, 7, b"M" * 16, blob)
    assert len(data) == msg_file_size(len(blob))
    iv, body, tag = data[:16], data[16:-16], data[-16:]
    assert tag == raw_cmac(S.auth, b"enclaves/v1/msg" + struct.pack(">Q", file_id) + iv + body)
    padded = raw_cbc_decrypt(S.enc, iv, body)
    unpadder = padding.PKCS7(128).unpadder()
    plain = unpadder.update(padded) + unpadder.finalize()
    assert plain == struct.pack(">QQ", 42, 7) + b"M" * 16 + blob
    record = decode_msg(SEALER, file_id, data)
    assert (record.recipient, record.sender, record.msg_id, record.blob) == (42, 7, b"M" * 16, blob)


def test_enrollment_layout_with_raw_primitives() -> None:
    data = encode_enrollment(SEALER, {9: 1000, 3: 2**63})
    iv, body, tag = data[:16], data[16:-16], data[-16:]
    aad = b"enclaves/v1/enrollment"
    assert tag == raw_cmac(S.auth, struct.pack(">H", len(aad)) + aad + iv + body)
    padded = raw_cbc_decrypt(S.enc, iv, body)
    unpadder = padding.PKCS7(128).unpadder()
    plain = unpadder.update(padded) + unpadder.finalize()
    assert plain == struct.pack(">IQQQQ", 2, 3, 2**63, 9, 1000)
    assert decode_enrollment(SEALER, data) == {3: 2**63, 9: 1000}
    assert decode_enrollment(SEALER, encode_enrollment(SEALER, {})) == {}


def test_notice_file_layout_with_raw_primitives() -> None:
    file_id = 0x0000000500001234
    data = encode_notice(SEALER, file_id, 42, 1_800_000_000_123, b"\0\0\0\x11\x05" + b"D" * 16)
    iv, body, tag = data[:16], data[16:-16], data[-16:]
    aad = b"enclaves/v1/notice" + struct.pack(">Q", file_id)
    assert tag == raw_cmac(S.auth, struct.pack(">H", len(aad)) + aad + iv + body)
    padded = raw_cbc_decrypt(S.enc, iv, body)
    unpadder = padding.PKCS7(128).unpadder()
    plain = unpadder.update(padded) + unpadder.finalize()
    assert plain == struct.pack(">QQ", 42, 1_800_000_000_123) + b"\0\0\0\x11\x05" + b"D" * 16
    record = decode_notice(SEALER, file_id, data)
    assert (record.user_id, record.created_ms) == (42, 1_800_000_000_123)
    assert record.data == b"\0\0\0\x11\x05" + b"D" * 16


def test_notice_file_bound_to_its_name_label_and_key() -> None:
    data = encode_notice(SEALER, 5, 7, 1000, b"x")
    assert decode_notice(SEALER, 5, data).user_id == 7
    with pytest.raises(FormatError):
        decode_notice(SEALER, 6, data)  # renamed to another notice id
    with pytest.raises(FormatError):
        decode_notice(OTHER, 5, data)  # another server's key
    with pytest.raises(FormatError):
        decode_notice(SEALER, 5, data[:-1])
    plain = struct.pack(">QQ", 7, 1000) + b"x"
    for label in (b"enclaves/v1/msg", b"enclaves/v1/enrollment", b"enclaves/v1/notices"):
        # The same plaintext sealed for another purpose never opens as a notice.
        with pytest.raises(FormatError):
            decode_notice(SEALER, 5, SEALER.seal(label + struct.pack(">Q", 5), plain))
    with pytest.raises(FormatError):  # a message file renamed to .notice
        decode_notice(SEALER, 5, encode_msg(SEALER, 5, 7, 1, bytes(16), b"x"))
    with pytest.raises(FormatError):  # user 0 is the server, never a notice's user
        decode_notice(SEALER, 5, SEALER.seal(b"enclaves/v1/notice" + struct.pack(">Q", 5),
                                             struct.pack(">QQ", 0, 1000) + b"x"))  # fmt: skip
    with pytest.raises(FormatError):  # no data
        decode_notice(SEALER, 5, SEALER.seal(b"enclaves/v1/notice" + struct.pack(">Q", 5),
                                             struct.pack(">QQ", 7, 1000)))  # fmt: skip
    too_big = struct.pack(">QQ", 7, 1000) + b"x" * (MAX_NOTICE_DATA + 1)
    with pytest.raises(FormatError):
        decode_notice(SEALER, 5, SEALER.seal(b"enclaves/v1/notice" + struct.pack(">Q", 5),
                                             too_big))  # fmt: skip
    for bad in (b"", b"x" * (MAX_NOTICE_DATA + 1)):
        with pytest.raises(ValueError):
            encode_notice(SEALER, 5, 7, 1000, bad)
    with pytest.raises(ValueError):
        encode_notice(SEALER, 5, 0, 1000, b"x")
    assert notice_file_name(5) == "5.notice" and parse_notice_name("5.notice") == 5
    assert parse_notice_name("05.notice") is None and parse_notice_name("5.msg") is None


def test_user_file_bound_to_its_id_and_key() -> None:
    data = encode_user(SEALER, 5, KeyPair.generate())
    with pytest.raises(FormatError):
        decode_user(SEALER, 6, data)
    with pytest.raises(FormatError):
        decode_user(OTHER, 5, data)
    with pytest.raises(FormatError):
        decode_user(SEALER, 5, data[:79])
    with pytest.raises(FormatError):
        decode_user(SEALER, 5, data + b"\0")


def test_msg_file_bound_to_its_name_and_key() -> None:
    data = encode_msg(SEALER, 5, 1, 2, bytes(16), b"")
    assert len(data) == 80
    with pytest.raises(FormatError):
        decode_msg(SEALER, 6, data)
    with pytest.raises(FormatError):
        decode_msg(OTHER, 5, data)
    with pytest.raises(FormatError):
        decode_msg(SEALER, 5, data[:-1])


def test_every_error_has_one_message() -> None:
    messages = set()
    for call in (
        lambda: decode_user(SEALER, 5, b""),
        lambda: decode_user(OTHER, 5, encode_user(SEALER, 5, KeyPair.generate())),
        lambda: decode_msg(SEALER, 1, b"x" * 80),
        lambda: decode_enrollment(SEALER, b"x" * 48),
    ):
        with pytest.raises(FormatError) as info:
            call()
        messages.add(str(info.value))
    assert len(messages) == 1


def test_enrollment_rejects_bad_tables() -> None:
    for plain in (
        b"",
        struct.pack(">I", 1),  # count says one entry, none present
        struct.pack(">IQQ", 1, 0, 5),  # user id 0
        struct.pack(">IQQQQ", 2, 9, 5, 3, 5),  # unsorted
        struct.pack(">IQQQQ", 2, 9, 5, 9, 5),  # repeated
        struct.pack(">IQQ", 1, 9, 5) + b"\0",  # trailing byte
    ):
        with pytest.raises(FormatError):
            decode_enrollment(SEALER, SEALER.seal(b"enclaves/v1/enrollment", plain))
    # Sealed under another label: refused.
    with pytest.raises(FormatError):
        decode_enrollment(SEALER, SEALER.seal(b"enclaves/v1/check", struct.pack(">I", 0)))


def test_file_names() -> None:
    assert parse_user_name("12.user") == 12
    assert parse_user_name("18446744073709551615.user") == 2**64 - 1
    for bad in ("0.user", "012.user", "+1.user", "18446744073709551616.user", "1.msg", ".user"):
        assert parse_user_name(bad) is None
    assert parse_msg_name("0.msg") == 0
    for bad in ("00.msg", "1.msg.tmp", "x.msg", " 1.msg", "1 .msg", "\u0661.msg"):
        assert parse_msg_name(bad) is None


# -- hypothesis: no input crashes a decoder; every bit flip is rejected --------------


@settings(max_examples=300)
@given(U64, st.binary(max_size=200))
def test_decode_user_never_crashes(user_id: int, data: bytes) -> None:
    try:
        decode_user(SEALER, user_id, data)
    except FormatError:
        pass


@settings(max_examples=300)
@given(st.integers(0, 2**64 - 1), st.binary(max_size=300))
def test_decode_msg_never_crashes(file_id: int, data: bytes) -> None:
    try:
        decode_msg(SEALER, file_id, data)
    except FormatError:
        pass


@settings(max_examples=300)
@given(st.integers(0, 2**64 - 1), st.binary(max_size=300))
def test_decode_notice_never_crashes(file_id: int, data: bytes) -> None:
    try:
        decode_notice(SEALER, file_id, data)
    except FormatError:
        pass


@settings(max_examples=30, deadline=None)
@given(
    st.integers(0, 2**64 - 1), U64, st.integers(0, 2**64 - 1), st.binary(min_size=1, max_size=40)
)
def test_every_bit_flip_of_a_notice_file_is_rejected(
    file_id: int, user_id: int, created_ms: int, payload: bytes
) -> None:
    data = encode_notice(SEALER, file_id, user_id, created_ms, payload)
    record = decode_notice(SEALER, file_id, data)
    assert (record.user_id, record.created_ms, record.data) == (user_id, created_ms, payload)
    for bit in range(len(data) * 8):
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(FormatError):
            decode_notice(SEALER, file_id, bytes(flipped))


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_decode_enrollment_never_crashes(data: bytes) -> None:
    try:
        decode_enrollment(SEALER, data)
    except FormatError:
        pass


@settings(max_examples=30, deadline=None)
@given(U64)
def test_every_bit_flip_of_a_user_file_is_rejected(user_id: int) -> None:
    data = encode_user(SEALER, user_id, KeyPair.generate())
    for bit in range(len(data) * 8):
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(FormatError):
            decode_user(SEALER, user_id, bytes(flipped))


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**64 - 1), U64, st.integers(0, 2**64 - 1), st.binary(max_size=40))
def test_every_bit_flip_of_a_msg_file_is_rejected(
    file_id: int, recipient: int, sender: int, blob: bytes
) -> None:
    data = encode_msg(SEALER, file_id, recipient, sender, bytes(16), blob)
    assert decode_msg(SEALER, file_id, data).blob == blob
    for bit in range(len(data) * 8):
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(FormatError):
            decode_msg(SEALER, file_id, bytes(flipped))


@settings(max_examples=20, deadline=None)
@given(st.dictionaries(U64, st.integers(0, 2**64 - 1), max_size=3))
def test_every_bit_flip_of_the_enrollment_state_is_rejected(table: dict[int, int]) -> None:
    data = encode_enrollment(SEALER, table)
    assert decode_enrollment(SEALER, data) == table
    for bit in range(len(data) * 8):
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(FormatError):
            decode_enrollment(SEALER, bytes(flipped))
