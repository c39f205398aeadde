"""MemoryStorage: the IStorage contract with already-fired Deferreds."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred
from zope.interface.verify import verifyObject

from enclaves.crypto import KeyPair
from enclaves.storage.interface import (
    IStorage,
    KeysReplaced,
    PendingSummary,
    QuotaExceeded,
    StorageFailed,
    UnknownUser,
    UserExists,
)
from enclaves.storage.memory import MemoryStorage


def _result(d: Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "MemoryStorage Deferreds fire at once"
    if hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]


def test_contract() -> None:
    store = MemoryStorage(max_pending_count=2, max_pending_bytes=10)
    assert verifyObject(IStorage, store)
    keys = KeyPair.generate()
    _result(store.add_user(5, keys, 1000))
    with pytest.raises(UserExists):
        _result(store.add_user(5, keys, None))
    assert _result(store.load_user(5)).enrolling
    assert _result(store.load_user(6)) is None
    new = KeyPair.generate()
    _result(store.replace_user_keys(5, new))
    record = _result(store.load_user(5))
    assert record.keys == new and not record.enrolling
    with pytest.raises(KeysReplaced):  # from keys no longer the user's
        _result(store.replace_user_keys(5, KeyPair.generate(), {keys}))
    assert _result(store.load_user(5)).keys == new
    with pytest.raises(UnknownUser):
        _result(store.store_message(6, 5, bytes(16), b"x"))
    first = _result(store.store_message(5, 9, b"a" * 16, b"12345"))
    _result(store.store_message(5, 9, b"b" * 16, b"12345"))
    with pytest.raises(QuotaExceeded):
        _result(store.store_message(5, 9, b"c" * 16, b""))
    # A resend (same sender and msg_id) is answered by its copy, quota full or not.
    assert _result(store.store_message(5, 9, b"a" * 16, b"12345")) == first
    assert _result(store.held_message(5, 9, b"a" * 16)) == first
    assert _result(store.held_message(5, 8, b"a" * 16)) is None
    assert _result(store.held_message(6, 9, b"a" * 16)) is None
    with pytest.raises(QuotaExceeded):  # another sender's message
        _result(store.store_message(5, 8, b"a" * 16, b"12345"))
    assert [m.msg_id for m in _result(store.pending_for(5))] == [b"a" * 16, b"b" * 16]
    assert _result(store.pending_summary()) == {5: PendingSummary(2, 10)}
    _result(store.remove_message(first))
    _result(store.remove_message(first))
    assert _result(store.held_message(5, 9, b"a" * 16)) is None
    store.fail_writes = True
    with pytest.raises(StorageFailed):
        _result(store.store_message(5, 9, b"c" * 16, b""))
    store.fail_writes = False
    assert _result(store.remove_user(5)) == [(9, b"b" * 16)]
    with pytest.raises(UnknownUser):
        _result(store.remove_user(5))
    assert _result(store.list_users()) == []
