"""An attacker with the server's disk: reading it (a thief) or changing it (tampering).

What must hold: without the server key the files show no message, no key
and no sender or recipient of a message; a changed, truncated, forged or
swapped file is refused (quarantined, logged) and never delivered, and the
daemon keeps serving everyone else.  What tampering can do — destroy a
message, lock a user out until the admin restores its file — is in
docs/security.rst.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
import pytest_twisted

from enclaves.client.connection import LoginFailed
from enclaves.crypto import KeyPair
from enclaves.frames import ErrorCode
from enclaves.inner import Accepted, Deliver, Received, Send
from tests.adversarial.live import A, Live
from tests.system.helpers import expect, quiet

pytestmark = pytest.mark.system

C, D = 3_000_003, 4_000_004


def pending_files(live: Live) -> list[Path]:
    """The stored messages, in arrival order (their ids carry it, docs/storage.rst)."""
    files = (live.daemon.data_dir / "pending").glob("*.msg")
    return sorted(files, key=lambda p: int(p.stem))


async def store(live: Live, sender: int, recipient: int, blobs: list[bytes]) -> list[bytes]:
    """``sender`` sends each blob to the offline ``recipient``, one ACCEPTED at a time."""
    conn = await live.login(sender)
    ids = []
    for blob in blobs:
        ids.append(os.urandom(16))
        conn.send(Send(ids[-1], recipient, blob))
        await expect(conn, Accepted, where=lambda m: m.msg_id == ids[-1])
    await conn.disconnect()
    return ids


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest_twisted.ensureDeferred
async def test_tampered_files_are_quarantined_and_others_served(tmp_path: Path) -> None:
    """While the daemon is stopped the attacker flips a bit in one of C's stored
    messages, truncates D's user file and drops in a forged message file; while
    it runs, it changes another of C's messages.  After a restart: the bad files
    are in quarantine/ and logged, C gets exactly its intact messages in order,
    D cannot log in until the admin restores its file from a backup (then gets
    its message), and the honest pair chats throughout."""
    live = Live(tmp_path, users={C: KeyPair.generate(), D: KeyPair.generate()})
    await live.start()
    blobs = [b"c%d" % i for i in range(5)]
    c_ids = await store(live, A, C, blobs)
    (d_id,) = await store(live, A, D, [b"for d"])
    live.stop()
    files = pending_files(live)
    assert len(files) == 6
    flip_byte(files[1], 40)  # C's second message
    user_d = live.daemon.data_dir / "users" / f"{D}.user"
    backup = user_d.read_bytes()
    user_d.write_bytes(backup[:40])
    forged_id = (10**6 << 16) | 7
    forged = live.daemon.data_dir / "pending" / f"{forged_id}.msg"
    forged.write_bytes(os.urandom(96))
    live.daemon.start()
    quarantine = live.daemon.data_dir / "quarantine"
    assert sorted(p.name for p in quarantine.iterdir()) == sorted(
        [files[1].name, user_d.name, forged.name]
    )
    assert "3 files quarantined" in live.daemon.log_text()
    await live.check()
    # While the daemon runs: C's fourth message is changed on disk.
    flip_byte(files[3], -1)
    c = await live.login(C)
    got = [await expect(c, Deliver) for _ in range(3)]
    assert [d.msg_id for d in got] == [c_ids[0], c_ids[2], c_ids[4]]
    assert [d.blob for d in got] == [blobs[0], blobs[2], blobs[4]]
    for d in got:
        c.send(Received(d.msg_id))
    assert [m for m in await quiet(c, 0.5) if isinstance(m, Deliver)] == []
    await c.disconnect()
    assert files[3].name in {p.name for p in quarantine.iterdir()}
    with pytest.raises(LoginFailed) as refused:
        await live.login(D)
    assert refused.value.code == ErrorCode.AUTH_FAILED
    await live.check()
    live.stop()
    # The admin restores D's file from a backup and restarts.
    user_d.write_bytes(backup)
    live.daemon.start()
    d = await live.login(D)
    assert (await expect(d, Deliver)).msg_id == d_id
    await d.disconnect()
    await live.check()
    live.stop()


@pytest_twisted.ensureDeferred
async def test_a_thief_with_the_data_disk_learns_no_message_key_or_correspondent(
    tmp_path: Path,
) -> None:
    """The thief copies the data directory of a server whose key is kept elsewhere
    (``--key-file``).  No file holds a message blob, a msg_id, a user's key, or
    the sender or recipient id of a stored message; what the thief does learn
    is the list of user ids (file names), and the count, sizes and order of
    pending messages (docs/storage.rst)."""
    live = Live(tmp_path, users={C: KeyPair.generate()})
    await live.start()
    blob = b"e2e ciphertext the server must not show: " + os.urandom(32)
    ids = await store(live, A, C, [blob, blob[::-1]])
    live.stop()
    # The admin keeps the key on another disk (docs/storage.rst).
    key_file = tmp_path / "keydisk" / "server.key"
    key_file.parent.mkdir(mode=0o700)
    os.replace(live.daemon.data_dir / "server.key", key_file)
    live.daemon.extra.append(f"--key-file={key_file}")
    live.daemon.start()
    await live.check()
    live.stop()
    secrets = [blob, blob[::-1], *ids]
    for keys in live.keys.values():
        secrets += [keys.enc, keys.auth]
    correspondents = [struct.pack(">Q", A), struct.pack(">Q", C)]
    everything = [p for p in live.daemon.data_dir.rglob("*") if p.is_file()]
    assert key_file.exists() and key_file not in everything
    assert len(list((live.daemon.data_dir / "pending").iterdir())) == 2
    for path in everything:
        data = path.read_bytes()
        for secret in secrets + correspondents:
            assert secret not in data, path
        if path.parent.name == "pending":
            assert str(A) not in path.name and str(C) not in path.name
