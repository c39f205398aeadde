"""The sealed state's JSON codec: exact round trip, strict decoding."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enclaves.client.contacts import Contact, HeldBlob, Trust
from enclaves.client.e2e import ReplayWindow
from enclaves.client.kex import KexState, PendingOffer
from enclaves.client.state import (
    ClientState,
    HistoryEntry,
    OutboxEntry,
    StateError,
    decode_state,
    encode_state,
)
from enclaves.crypto import KeyPair

KEYS = KeyPair(bytes([1]) * 32, bytes([2]) * 32)


def full_state() -> ClientState:
    pending = PendingOffer(4, bytes(32), bytes(64), b"\x02" * 1253, 1.5, 2.5, 2, True)
    contact = (
        Contact(
            2**64 - 1,
            petname="zoë",
            ik=bytes(range(32)),
            trust=Trust.IN_PERSON,
            pending_ik=bytes(range(1, 33)),
            send_counter=17,
            kex=KexState(pending, b"d" * 32, b"\x03" * 1173),
            send_confirmed=True,
            held=(HeldBlob(b"m" * 16, b"\x01blob"),),
        )
        .with_keys(2, KEYS, 10.0)
        .with_keys(3, KeyPair(bytes([5]) * 32, bytes([6]) * 32), 20.0)
        .with_window(3, ReplayWindow(70, 2**64 - 1))
        .with_tentative(4, KeyPair(bytes([7]) * 32, bytes([8]) * 32), 30.0)
        .with_tentative(4, KeyPair(bytes([9]) * 32, bytes([10]) * 32), 31.0)
    )
    return ClientState(
        user_id=42,
        server_keys=KEYS,
        identity_private=bytes(range(32)),
        endpoint="tls:example.org:7777",
        contacts={contact.user_id: contact, 7: Contact(7)},
        outbox=(OutboxEntry(b"o" * 16, 7, b"blob", "kex", "failed", "quota", 3.0),),
        seen=(b"s" * 16, b"t" * 16),
        history={
            7: (HistoryEntry("out", b"h" * 16, 99, "hi ☃", Trust.UNVERIFIED, "delivered", 1),)
        },
    )


def test_round_trip() -> None:
    state = full_state()
    data = encode_state(state)
    assert decode_state(data) == state
    assert encode_state(decode_state(data)) == data
    doc = json.loads(data)
    assert doc["format"] == 1 and doc["user_id"] == "42"


def test_empty_state_round_trip() -> None:
    state = ClientState(1, KEYS, bytes(32))
    assert decode_state(encode_state(state)) == state


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.pop("contacts"),
        lambda d: d.update(format=2),
        lambda d: d.update(user_id="0"),
        lambda d: d.update(user_id=42),
        lambda d: d.update(server_keys="!!"),
        lambda d: d["contacts"][1].update(trust="trusted"),
        lambda d: d["contacts"][1]["current"].update(window=[1]),
        lambda d: d["contacts"][1].update(tentative="none"),
        lambda d: d["contacts"][1].update(tentative=[None]),
        lambda d: d["contacts"][1].update(tentative=d["contacts"][1]["tentative"] * 3),
        lambda d: d["outbox"][0].update(created="x"),
        lambda d: d["history"]["7"][0].pop(),
    ],
)
def test_decode_refuses_malformed(mutate: object) -> None:
    doc = json.loads(encode_state(full_state()))
    mutate(doc)  # type: ignore[operator]
    with pytest.raises(StateError):
        decode_state(json.dumps(doc).encode())


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_decode_never_crashes(data: bytes) -> None:
    try:
        decode_state(data)
    except StateError:
        pass


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=5),
        lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=8), kids),
        max_leaves=12,
    )
)
def test_decode_any_json_only_its_error(doc: object) -> None:
    try:
        decode_state(json.dumps(doc).encode())
    except StateError:
        pass


def test_state_without_removed_field_still_decodes() -> None:
    """Keystores written before contact tombstones have no "removed": not removed."""
    state = ClientState(7, KeyPair(b"\x01" * 32, b"\x02" * 32), b"\x03" * 32, None, {9: Contact(9)})
    doc = json.loads(encode_state(state))
    del doc["contacts"][0]["removed"]
    old = decode_state(json.dumps(doc).encode())
    assert old.contacts[9].removed is False
    doc["contacts"][0]["removed"] = "yes"
    with pytest.raises(StateError):
        decode_state(json.dumps(doc).encode())


def test_state_without_tentative_field_still_decodes() -> None:
    """Keystores written before tentative pair keys have no "tentative": none."""
    state = full_state()
    assert len(state.contacts[2**64 - 1].tentative) == 2
    doc = json.loads(encode_state(state))
    assert [t["epoch"] for t in doc["contacts"][1]["tentative"]] == [4, 4]
    for contact in doc["contacts"]:
        del contact["tentative"]
    old = decode_state(json.dumps(doc).encode())
    assert old.contacts[2**64 - 1].tentative == ()
    assert old.contacts[2**64 - 1].current == state.contacts[2**64 - 1].current
