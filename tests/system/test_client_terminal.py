"""The client in a real terminal (tmux), typed at the way a person would."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytest_twisted

from tests.daemon import Daemon
from tests.system.clients import PASSPHRASE, chat, client_env, enroll, new_tokens

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux"),
]


class Terminal:
    """A tmux session on a private server socket running an interactive shell."""

    def __init__(self, cwd: Path) -> None:
        self.socket = f"enclaves-test-{os.getpid()}-{time.monotonic_ns()}"
        self.tmux("new-session", "-d", "-s", "t", "-x", "200", "-y", "60",
                  "env PS1='PROMPT> ' bash --norc --noprofile", cwd=cwd)  # fmt: skip

    def tmux(self, *args: str, cwd: Path | None = None) -> str:
        result = subprocess.run(
            ["tmux", "-L", self.socket, *args],
            env=client_env(),
            cwd=cwd,
            capture_output=True,
            timeout=10,
            check=True,
        )
        return result.stdout.decode("utf-8", errors="replace")

    def type(self, text: str) -> None:
        self.tmux("send-keys", "-t", "t", "-l", text)
        self.tmux("send-keys", "-t", "t", "Enter")

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-J", "-t", "t", "-S", "-2000")

    def wait_for(self, text: str, timeout: float = 20.0, count: int = 1) -> str:
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if screen.count(text) >= count:
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not on the screen within {timeout}s:\n{screen}")
            time.sleep(0.05)

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=10)


@pytest_twisted.ensureDeferred
async def test_enroll_and_chat_in_a_real_terminal(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path)
    token_a, token_b = await new_tokens(daemon, 2)
    daemon.start()
    term = Terminal(tmp_path)
    bob = None
    try:
        result = enroll(token_b, tmp_path / "b.keystore")
        assert result.process.returncode == 0, result.output()
        bob_id = result.expect(r"^\[enrolled\] you are user (\d+)").group(1)
        bob = chat(tmp_path / "b.keystore")
        python = sys.executable
        term.type(f"{python} -m enclaves enroll --keystore a.keystore")
        term.wait_for("Enrollment token:")  # asked for: not in ps, not in the history
        term.type(token_a)
        # Too short, then a mistyped confirmation: asked again each time.
        term.wait_for("New keystore passphrase:")
        term.type("short")
        term.wait_for("at least 10 characters")
        term.wait_for("New keystore passphrase:", count=2)
        term.type(PASSPHRASE)
        term.wait_for("Same passphrase again:")
        term.type(PASSPHRASE + "x")
        term.wait_for("the two passphrases differ; try again")
        term.wait_for("New keystore passphrase:", count=3)
        term.type(PASSPHRASE)
        term.wait_for("Same passphrase again:", count=2)
        term.type(PASSPHRASE)
        term.wait_for("[enrolled] you are user")
        term.wait_for("[help] Next: verify your contacts")
        term.type(f"{python} -m enclaves --keystore a.keystore --retry-max 1 --tick 1")
        term.wait_for("Keystore passphrase:")
        term.type(PASSPHRASE)
        term.wait_for("[conn] connected as")
        # Key exchange: bob answered the offer; wait until the keys show.
        deadline = time.monotonic() + 20
        while "keys=epoch-1" not in term.screen():
            assert time.monotonic() < deadline, term.screen()
            term.type("/contacts")
            time.sleep(0.3)
        term.type(f"/name {bob_id} bob")
        term.wait_for(f"[info] {bob_id} is now called bob")
        term.type("/msg bob hello from a terminal")
        term.wait_for("Send anyway? (yes/no)")
        term.type("yes")
        term.wait_for("[delivered] id=")
        bob.expect(r"\(unverified\): hello from a terminal$")
        bob.send("/verify " + term.screen().split("[enrolled] you are user ")[1].split()[0])
        safety = bob.expect(r"^\[safety\] \d+: ((?:\d{5} ){11}\d{5})$").group(1)
        bob.send("yes")
        term.type("/verify bob")
        term.wait_for(f"[safety] bob: {safety}")
        term.type("yes")
        term.wait_for("[trust] bob is now verified")
        assert bob.quit() == 0
        term.type("/quit")
        term.wait_for("[info] bye")
        term.type("echo exit-status-$?")
        term.wait_for("exit-status-0")
        # ^C leaves cleanly too (the keystore is saved, the terminal usable).
        term.type(f"{python} -m enclaves --keystore a.keystore")
        term.wait_for("Keystore passphrase:", count=2)
        term.type(PASSPHRASE)
        term.wait_for("[conn] connected as", count=3)
        prompts = term.screen().count("PROMPT> ")
        term.tmux("send-keys", "-t", "t", "C-c")
        term.wait_for("PROMPT> ", count=prompts + 1)  # the shell is back
        term.type("echo after-interrupt-$((40 + 2))")
        screen = term.wait_for("after-interrupt-42")
        # The passphrase and the token never appeared on the screen; no traceback either.
        assert PASSPHRASE not in screen and token_a not in screen
        assert "Traceback" not in screen
    finally:
        if bob is not None:
            bob.kill()
        term.close()
        assert daemon.stop() == 0, daemon.log_text()


SANE = "stty -a | grep -q ' icanon' && stty -a | grep -q ' echo ' && echo mode-is-$((6 * 7))"


@pytest_twisted.ensureDeferred
async def test_line_editing_keeps_the_typed_line_when_a_message_arrives(tmp_path: Path) -> None:
    """A message printed while a line is half typed goes above it; the line is
    sent whole; Up recalls it; the terminal's mode is back after /quit and ^C."""
    daemon = Daemon(tmp_path)
    token_a, token_b = await new_tokens(daemon, 2)
    daemon.start()
    term = Terminal(tmp_path)
    bob = None
    try:
        ids = []
        for token, name in ((token_a, "a"), (token_b, "b")):
            result = enroll(token, tmp_path / f"{name}.keystore")
            assert result.process.returncode == 0, result.output()
            ids.append(result.expect(r"^\[enrolled\] you are user (\d+)").group(1))
        a_id, bob_id = ids
        bob = chat(tmp_path / "b.keystore")
        term.type(f"{sys.executable} -m enclaves --keystore a.keystore --retry-max 1 --tick 1")
        term.wait_for("Keystore passphrase:")
        term.type(PASSPHRASE)
        term.wait_for("[conn] connected as")
        deadline = time.monotonic() + 20
        while "keys=epoch-1" not in term.screen():
            assert time.monotonic() < deadline, term.screen()
            term.type("/contacts")
            time.sleep(0.3)
        term.tmux("send-keys", "-t", "t", "-l", f"/msg {bob_id} half a")
        term.wait_for(f"> /msg {bob_id} half a")
        bob.send(f"/msg {a_id} meanwhile from bob")
        bob.expect(r"Send anyway\? \(yes/no\)$")
        bob.send("yes")
        screen = term.wait_for(": meanwhile from bob")
        rows = [row for row in screen.splitlines() if row.strip()]
        assert rows[-1] == f"> /msg {bob_id} half a", screen  # still there, at the bottom
        assert ": meanwhile from bob" in rows[-2], screen
        term.tmux("send-keys", "-t", "t", "-l", "XX")
        term.tmux("send-keys", "-t", "t", "BSpace", "BSpace", "Left")
        term.tmux("send-keys", "-t", "t", "-l", "an ")
        term.tmux("send-keys", "-t", "t", "End")
        term.type(" line")
        term.wait_for("Send anyway? (yes/no)")
        term.wait_for("yes/no> ")
        term.type("yes")
        bob.expect(r"\(unverified\): half an a line$")
        term.tmux("send-keys", "-t", "t", "Up", "Up", "Enter")  # the /msg again (yes was last)
        bob.expect(r"\(unverified\): half an a line$")
        term.type("/quit")
        term.wait_for("[info] bye")
        term.type(SANE)
        term.wait_for("mode-is-42")
        term.type(f"{sys.executable} -m enclaves --keystore a.keystore")
        term.wait_for("Keystore passphrase:", count=2)
        term.type(PASSPHRASE)
        term.wait_for("[conn] connected as", count=2)
        # ^Z: the shell gets a sane terminal; fg: the typed line is back.
        term.tmux("send-keys", "-t", "t", "-l", "typed")
        term.wait_for("> typed")
        prompts = term.screen().count("PROMPT> ")
        term.tmux("send-keys", "-t", "t", "C-z")
        term.wait_for("PROMPT> ", count=prompts + 1)
        term.type(SANE)
        term.wait_for("mode-is-42", count=2)
        term.type("fg")
        term.tmux("send-keys", "-t", "t", "-l", ", never sent")
        term.wait_for("> typed, never sent")
        prompts = term.screen().count("PROMPT> ")
        term.tmux("send-keys", "-t", "t", "C-c")
        term.wait_for("PROMPT> ", count=prompts + 1)  # the shell is back
        term.type(SANE)
        screen = term.wait_for("mode-is-42", count=3)
        rows = [row for row in screen.splitlines() if row.strip()]
        assert rows[-3:-1] == [f"PROMPT> {SANE}", "mode-is-42"], screen
        assert "> typed, never sent" not in rows[-4], screen  # cleared on the way out
        assert "Traceback" not in screen
    finally:
        if bob is not None:
            bob.kill()
        term.close()
        assert daemon.stop() == 0, daemon.log_text()
