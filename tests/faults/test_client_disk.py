"""The real client's keystore disk fills up while it runs.

The keystore is on a small tmpfs in a private mount namespace
(tests/faults/namespace.py; the test skips where the machine cannot set that
up), the client a real ``python -m enclaves`` process run inside it, the
server a real daemon.  Invariant: what the client says about a trust change
is what its keystore holds after it exits: a /verify whose save fails says
so and changes nothing, so the contact is unverified after the restart, as
the user was told; once there is room again a /verify is saved.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import pytest
import pytest_twisted

from enclaves.client.contacts import Trust
from enclaves.client.keystore import Keystore
from tests.daemon import Daemon
from tests.faults.namespace import MountNamespace
from tests.system.clients import FAST, PASSPHRASE, Client, enroll, new_tokens

pytestmark = pytest.mark.system


def fill(path: Path) -> None:
    """Write ``path`` until its file system is full."""
    with path.open("wb") as filler:
        try:
            while True:
                filler.write(bytes(1 << 16))
                filler.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC, e


def user_id(enrolled: Client) -> int:
    assert enrolled.process.returncode == 0, enrolled.output()
    return int(enrolled.expect(r"^\[enrolled\] you are user (\d+)").group(1))


@pytest_twisted.ensureDeferred
async def test_a_verify_on_a_full_disk_is_refused_and_the_restart_agrees(
    tmp_path: Path,
) -> None:
    ns = MountNamespace(tmp_path / "mnt", "1m").start()
    daemon = Daemon(tmp_path)
    tokens = await new_tokens(daemon, 2)
    daemon.start()
    try:
        alice = user_id(enroll(tokens[0], tmp_path / "a.keystore"))
        bob = user_id(enroll(tokens[1], tmp_path / "b.keystore"))  # offers to alice
        keystore = ns.mnt / "a.keystore"  # as the client sees it
        shutil.copy2(tmp_path / "a.keystore", ns.outside(keystore))
        argv = ["--keystore", str(keystore), *FAST]

        def run() -> Client:
            client = Client(argv, PASSPHRASE, wrapper=ns.enter([]))
            client.expect(r"^\[conn\] connected as ")
            return client

        a = run()
        a.expect(rf"^\[kex\] keys agreed with {bob} ")  # alice answered bob's offer
        filler = ns.outside(ns.mnt / "filler")
        fill(filler)
        a.send(f"/verify {bob} yes")
        a.expect(
            rf"^\[error\] {bob} not verified: could not save the keystore \(No space left on "
            r"device\); nothing changed: try again once it can be saved$"
        )
        assert a.quit() == 1  # a script's command not done
        assert not a.seen(r"^\[trust\] ")
        _, state = Keystore.unlock(ns.outside(keystore), PASSPHRASE)
        assert state.contacts[bob].trust is Trust.UNVERIFIED  # as the client said

        a = run()  # still full: it says the same again
        a.send(f"/verify {bob} yes")
        a.expect(rf"^\[error\] {bob} not verified: could not save the keystore ")
        filler.unlink()
        a.expect(r"^\[info\] the keystore could be saved again$")
        a.send(f"/verify {bob} yes")
        a.expect(rf"^\[trust\] {bob} is now verified$")
        a.quit()
        _, state = Keystore.unlock(ns.outside(keystore), PASSPHRASE)
        assert state.contacts[bob].trust is Trust.VERIFIED
        assert alice == state.user_id
    finally:
        daemon.stop()
        ns.stop()
