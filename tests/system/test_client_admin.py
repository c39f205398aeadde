"""Tokens issued and users revoked in the real SSH admin shell, with real clients."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.admin.sshshell import SSH, SSH_KEYGEN, PtyShell, make_key, ssh_argv, wait_port
from tests.daemon import Daemon, free_port
from tests.system.clients import Client, chat, enroll

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(
        not (os.path.exists(SSH) and os.path.exists(SSH_KEYGEN)), reason="no OpenSSH client"
    ),
]


def test_issue_in_the_shell_enroll_chat_then_revoke(tmp_path: Path) -> None:
    key = make_key(tmp_path / "admin_key", "admin@test")
    admin_keys = tmp_path / "admin_keys"
    admin_keys.write_text((tmp_path / "admin_key.pub").read_text())
    ssh_port = free_port()
    daemon = Daemon(
        tmp_path, f"--manhole=tcp:{ssh_port}:interface=127.0.0.1", f"--admin-keys={admin_keys}"
    )
    daemon.start()
    running: list[Client] = []
    shell = None
    try:
        wait_port(ssh_port)
        host_pub = daemon.data_dir / "ssh_host_ed25519_key.pub"
        known_hosts = tmp_path / "known_hosts"
        known_hosts.write_text(f"[127.0.0.1]:{ssh_port} {host_pub.read_text()}")
        shell = PtyShell(ssh_argv(ssh_port, key, known_hosts, "-tt"))
        shell.expect(r"enclaves> ")
        ids = {}
        for name in "abc":
            shell.line(f'issue("127.0.0.1:{daemon.port}")')
            token = shell.expect(r"(enclaves1:\S+)").group(1)
            shell.expect(r"enclaves> ")
            result = enroll(token, tmp_path / f"{name}.keystore")
            assert result.process.returncode == 0, result.output()
            ids[name] = int(result.expect(r"^\[enrolled\] you are user (\d+)").group(1))
        a, b = chat(tmp_path / "a.keystore"), chat(tmp_path / "b.keystore")
        running += [a, b]
        a.send(f"/msg {ids['b']} hello")
        a.expect(r"^\[confirm\] ")
        a.send("yes")
        b.expect(rf"^\[msg\] .* {ids['a']} \(unverified\): hello$")
        # The admin revokes b: b stops for good with a plain message, a is told.
        shell.line(f"revoke({ids['b']})")
        shell.expect(rf"revoked user {ids['b']}")
        b.expect(r"^\[fatal\] The admin has removed your account from this server\.$")
        assert b.wait() == 1
        a.expect(rf"^\[removed\] {ids['b']} was removed from the server$")
        a.send(f"/msg {ids['b']} still there?")
        a.expect(rf"^\[refused\] not sent to {ids['b']}: {ids['b']} was removed from the server$")
        # b's keystore can not log in any more; the client says so and gives up.
        again = Client(["--keystore", str(tmp_path / "b.keystore")], "correct horse battery staple")
        again.expect(r"^\[fatal\] The server does not accept this keystore's keys")
        assert again.wait() == 1
        # c is offline; a's message to it is stored (accepted). Revoking c
        # deletes it unread, and a is told that message will never arrive.
        a.send(f"/msg {ids['c']} never read")
        a.expect(r"^\[confirm\] ")
        a.send("yes")
        lost = a.expect(rf"^\[accepted\] id=([0-9a-f]{{8}}) to {ids['c']}$").group(1)
        shell.line(f"revoke({ids['c']})")
        shell.expect(rf"revoked user {ids['c']}: key deleted, 3 pending message")  # + 2 KEX
        a.expect(
            rf"^\[failed\] id={lost} message to {ids['c']} was accepted but will never be "
            "delivered: the recipient was removed from the server before reading it$"
        )
        a.send(f"/history {ids['c']}")
        a.expect(r"^\[history\] .*failed.*never read$")
        # A pipe's /quit ends like a script: the refused send and the lost
        # message make the status 1, and it says so.
        assert a.quit() == 1
        a.expect(r"^\[error\] 1 message\(s\) refused by the server or lost ")
        a.expect(r"^\[error\] 1 command\(s\) not done ")
        shell.send("\x04")
        assert shell.wait() == 0
    finally:
        for client in running:
            client.kill()
        if shell is not None:
            shell.close()
        assert daemon.stop() == 0, daemon.log_text()
