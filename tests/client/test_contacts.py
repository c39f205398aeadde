"""Contact values: identity key text, in-person import, safety numbers, grace keys."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from enclaves.client.contacts import (
    Contact,
    IKFormatError,
    IKMismatch,
    Trust,
    encode_ik,
    import_in_person,
    own_fingerprint,
    parse_ik,
)
from enclaves.crypto import KeyPair, fingerprint
from tests.client.helpers import identity

KEYS1 = KeyPair(bytes([1]) * 32, bytes([2]) * 32)
KEYS2 = KeyPair(bytes([3]) * 32, bytes([4]) * 32)


def test_ik_text_round_trip() -> None:
    ik = bytes(range(32))
    text = encode_ik(ik)
    assert text.startswith("enclaves-ik:") and len(text) == 12 + 43 and "=" not in text
    assert parse_ik(text) == ik
    assert parse_ik("  " + text + "\n") == ik


@pytest.mark.parametrize(
    "text",
    [
        "",
        "enclaves-ik:",
        "enclaves1:AAAA",
        "enclaves-ik:" + "A" * 42,
        "enclaves-ik:" + "A" * 44,
        "enclaves-ik:" + "*" * 43,
        "enclaves-ik:" + "A" * 42 + "B",  # non-canonical trailing bits
    ],
)
def test_ik_text_rejects(text: str) -> None:
    with pytest.raises(IKFormatError):
        parse_ik(text)


@given(st.text(max_size=80))
def test_parse_ik_only_its_error(text: str) -> None:
    try:
        parse_ik(text)
    except IKFormatError:
        pass


def test_import_matching_key_upgrades_trust() -> None:
    ik = bytes(range(32))
    contact = Contact(5, ik=ik)
    assert import_in_person(contact, encode_ik(ik)).trust is Trust.IN_PERSON


def test_import_mismatch_is_an_error_and_changes_nothing() -> None:
    contact = Contact(5, ik=bytes(range(32)), trust=Trust.VERIFIED)
    with pytest.raises(IKMismatch) as info:
        import_in_person(contact, encode_ik(bytes(32)))
    assert "NOT" in str(info.value)
    assert contact.trust is Trust.VERIFIED


def test_import_before_any_kex_pins_the_key() -> None:
    ik = bytes(range(32))
    pinned = import_in_person(Contact(5), encode_ik(ik))
    assert pinned.ik == ik and pinned.trust is Trust.IN_PERSON


def test_import_matching_a_pending_change_accepts_it() -> None:
    new = bytes(range(1, 33))
    contact = Contact(5, ik=bytes(range(32)), pending_ik=new)
    after = import_in_person(contact, encode_ik(new))
    assert after.ik == new and after.pending_ik is None and after.trust is Trust.IN_PERSON


def test_safety_number_same_on_both_sides() -> None:
    alice, bob = identity(10, b"a"), identity(20, b"b")
    at_alice = Contact(20, ik=bob.public).safety_number(alice)
    at_bob = Contact(10, ik=alice.public).safety_number(bob)
    assert at_alice == at_bob
    groups = at_alice.split(" ")
    assert len(groups) == 12 and all(len(g) == 5 and g.isdigit() for g in groups)
    assert fingerprint(alice.public, 10) in at_alice.replace(" ", "")
    assert own_fingerprint(alice).replace(" ", "") == fingerprint(alice.public, 10)


def test_grace_keys() -> None:
    c = Contact(5).with_keys(1, KEYS1, now=0.0).with_keys(2, KEYS2, now=100.0)
    assert c.keys_for(2, 100.0).keys == KEYS2
    assert c.keys_for(1, 100.0 + 59, grace=60).keys == KEYS1
    assert c.keys_for(1, 100.0 + 60, grace=60) is None
    assert c.expire(100.0 + 59, grace=60).previous is not None
    assert c.expire(100.0 + 60, grace=60).previous is None
    c3 = c.with_keys(3, KEYS1, now=101.0)
    assert c3.keys_for(1, 101.0) is None  # only one previous epoch is ever kept


def test_repr_holds_no_secrets() -> None:
    c = Contact(5, ik=bytes(range(32))).with_keys(1, KEYS1, now=0.0)
    assert KEYS1.enc.hex() not in repr(c) and "\\x01\\x01" not in repr(c)
