"""The line-mode UI: commands in, tagged lines out (docs/client.rst, "Chatting").

Works the same on a terminal and on pipes: input comes line by line (from
``StandardIO`` + ``LineReceiver``, or on a terminal from the line editor in
``enclaves.client.terminal``), every output line starts with a ``[tag]``.
A question (send to an unverified contact? does the safety number match?)
is answered by the very next line: ``yes`` (or ``y``) means yes, anything
else means no.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.logger import ILogObserver, LogEvent, LogLevel, formatEvent
from twisted.protocols.basic import LineReceiver
from zope.interface import implementer

from enclaves.client.app import QUEUED_WHY, ClientApp, NotSaved, clock_text, short_id
from enclaves.client.contacts import Contact, ContactError, Trust
from enclaves.client.core import Refused
from enclaves.printable import printable

__all__ = ["LineUI", "HELP", "format_contact", "printable", "TaggedLogObserver", "REPORTED_BY_UI"]

HELP = """\
/msg WHO TEXT      send TEXT to WHO (a petname or a user id)
/to WHO            talk to WHO: every line not starting with / goes to them
                   (start a line with // to send one starting with /)
/to                leave the conversation
/contacts          every contact with trust level and key state
/name ID PETNAME   give user ID a local name (never sent anywhere)
/verify WHO        show the safety number to compare with WHO; answer yes if it matches
/verify WHO yes    the same, already confirmed (for scripts)
/fingerprint       your own fingerprint and identity key (for /import by others)
/import WHO KEY    WHO's identity key (enclaves-ik:...) received in person
/accept WHO        accept WHO's changed identity key after checking the new safety number
/rekey WHO         run a fresh key exchange with WHO
/history WHO       your conversation with WHO
/outbox            messages not yet accepted by the server, and failed ones
/retry ID          send a failed message again (ID: the 8 hex digits shown)
/invite            ask the server for a token for a newcomer
/rotate            replace your keys for this server with fresh ones
/help              this list
/quit              save and leave"""

YES = {"yes", "y"}
NO = {"no", "n"}
TROUBLE_TAGS = frozenset({"error", "refused", "failed"})


# Warnings of the client's own log (by their format string) that the UI
# reports itself with a tagged line: not shown a second time.
REPORTED_BY_UI = frozenset(
    {
        "the directory lists removed user {peer}: ignored",  # [warn] ... lists N again
        "identity key change of {peer} rejected by an in-person import",  # /import's [warn]
        "key confirmation failed for {peer}: ACCEPT dropped",  # KexFailed: [warn]
        "unusable key exchange offer from {peer}",  # KexFailed: [warn]
        "refused a blob under the id of removed user {sender}",  # BlobFromRemoved: [warn]
        "identity key of {peer} changed",  # IdentityKeyChanged: [warn]
    }
)


@implementer(ILogObserver)
class TaggedLogObserver:
    """Writes the client's own log warnings and errors as tagged lines
    (``[warn] TEXT``, ``[error] TEXT``, a traceback line by line), so that
    every line the client prints starts with a tag; drops what is below
    ``warn`` and what the UI reports itself (:data:`REPORTED_BY_UI`)."""

    def __init__(self, write: Callable[[str], object]) -> None:
        self._write = write

    def __call__(self, event: LogEvent) -> None:
        level = event.get("log_level")
        if not isinstance(level, type(LogLevel.warn)) or level < LogLevel.warn:
            return
        if event.get("log_format") in REPORTED_BY_UI:
            return
        tag = "warn" if level == LogLevel.warn else "error"
        lines = (formatEvent(event) or "").splitlines() or [""]
        failure = event.get("log_failure")
        if failure is not None:
            lines[0] += f": {failure.getErrorMessage()}"
            lines += failure.getTraceback().splitlines()
        self._write("".join(f"[{tag}] {printable(line)}\n" for line in lines))


def format_contact(contact: Contact) -> str:
    """``NAME id=N trust=T keys=...[ answered=...]`` for /contacts (every value
    one word: ``trust=in-person``)."""
    if contact.pending_ik is not None:
        keys = "IDENTITY-KEY-CHANGED"
    elif contact.current is not None:
        keys = f"epoch-{contact.current.epoch}"
    elif contact.kex.pending is not None:
        keys = "exchanging"
    else:
        keys = "none"
    # One word per value (``in person`` is ``in-person``), for key=value parsing.
    trust = contact.trust.value.replace(" ", "-")
    line = f"{contact.name} id={contact.user_id} trust={trust} keys={keys}"
    answered = sorted({t.epoch for t in contact.tentative})
    if answered and contact.pending_ik is None:
        # Exchanges we answered whose keys the contact has not yet proven.
        line += " answered=" + ",".join(f"epoch-{epoch}" for epoch in answered)
    if contact.unlisted:
        line += " listed=no"  # missing from the server's user list: nothing is sent
    return line


@implementer(IHalfCloseableProtocol)
class LineUI(LineReceiver):
    """Reads commands, writes ``[tag] text`` lines; ``app`` is attached later.

    End of input (a closed pipe, ^D) calls ``on_eof``; output keeps working
    until :meth:`close`, whose Deferred fires once every line is written.
    """

    delimiter = b"\n"
    MAX_LENGTH = 64 * 1024

    def __init__(self, on_eof: Callable[[], None] | None = None, quit_waits: bool = False) -> None:
        self.app: ClientApp | None = None
        self._to: int | None = None
        self._answer: Callable[[str], None] | None = None
        self._on_eof = on_eof
        self._quit_waits = quit_waits  # a script's /quit ends like the end of its input
        self._early: list[str] = []
        self._quitting = False
        self._sent_unasked = False  # the last line sent a message without asking
        self.lost: Deferred[None] = Deferred()
        # Lines that say something was not done, by tag.
        self.troubles: Counter[str] = Counter()
        self._undone = 0  # input lines that printed an [error] or [refused] line

    @property
    def script(self) -> bool:
        """Commands come from a script (not a terminal): its exit status counts them."""
        return self._quit_waits

    def commands_not_done(self) -> int:
        """For a script's exit status: its commands that printed an ``[error]`` or
        ``[refused]`` line (each counted once, whatever the number of lines), and
        its ``/invite`` requests the server refused.  0 in an interactive session:
        the user saw each error when it happened."""
        if not self.script:
            return 0
        return self._undone + (self.app.invites_failed if self.app is not None else 0)

    @property
    def question_open(self) -> bool:
        """A question waits for its answer (nothing was done for it yet)."""
        return self._answer is not None

    # -- output -----------------------------------------------------------------

    def line(self, tag: str, text: str) -> None:
        """One output line; never raises."""
        if tag in TROUBLE_TAGS:
            self.troubles[tag] += 1
        data = f"[{tag}] {printable(text)}\n".encode("utf-8", errors="replace")
        if self.transport is not None:
            self.transport.write(data)

    def prompt(self) -> str:
        """Shown before the line being typed on a terminal: ``> ``, ``NAME> ``
        in a conversation, ``yes/no> `` when a question waits."""
        if self._answer is not None:
            return "yes/no> "
        if self._to is not None and self.app is not None:
            try:
                name = self.app.core.contact(self._to).name
            except ContactError:
                return "> "
            name = printable(name)
            return (name if len(name) <= 24 else name[:23] + "~") + "> "
        return "> "

    # -- input ------------------------------------------------------------------

    def lineLengthExceeded(self, line: bytes) -> None:
        self.line("error", f"input line longer than {self.MAX_LENGTH} bytes ignored")

    def readConnectionLost(self) -> None:
        if self._on_eof is not None:
            self._on_eof()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Any = None) -> None:
        if not self.lost.called:
            self.lost.callback(None)

    def close(self) -> Deferred[None]:
        """Flush every line written, then close; fires when done."""
        if self.transport is not None and not self.lost.called:
            self.transport.loseConnection()
        return self.lost

    def lineReceived(self, raw: bytes) -> None:
        line = raw.decode("utf-8", errors="replace").rstrip("\r")
        if self.app is None:
            self._early.append(line)
            return
        self.handle(line)

    def attach(self, app: ClientApp) -> None:
        """Start reading commands for ``app`` (lines typed before are handled now)."""
        self.app = app
        early, self._early = self._early, []
        for line in early:
            self.handle(line)

    def handle(self, line: str) -> None:
        before = self.troubles["error"] + self.troubles["refused"]
        try:
            self._handle(line)
        finally:
            if self.troubles["error"] + self.troubles["refused"] > before:
                self._undone += 1

    def _handle(self, line: str) -> None:
        if self._quitting:
            return  # after a script's /quit
        text = line.strip()
        sent_unasked, self._sent_unasked = self._sent_unasked, False
        try:
            if self._answer is not None:
                answer, self._answer = self._answer, None
                if self._quit_waits and text.lower() not in YES | NO:
                    # A script went on without answering: that is a no, said
                    # as such, and the line runs as what it is.
                    answer("no")
                    self.line("refused", "the question above got no yes/no answer")
                    self.handle(line)
                    return
                answer(text)
            elif self._quit_waits and sent_unasked and text.lower() in YES | NO:
                # A script's "yes" for a question that was not asked (it is
                # asked once per contact): never sent as a message.
                self.line("info", f"no question was asked; {text!r} skipped")
            elif not text:
                return
            elif text.startswith("//") and self._to is not None:
                self._send(self._to, line.lstrip()[1:])  # "//" sends a leading "/"
            elif text.startswith("/"):
                self._command(text)
            elif self._to is not None:
                self._send(self._to, line)
            else:
                self.line("error", "not in a conversation: /to WHO first, or /msg WHO TEXT")
        except (ContactError, NotSaved) as e:
            self.line("error", str(e))

    def ask(self, tag: str, question: str, then: Callable[[bool], None]) -> None:
        """Show ``question``; the next input line answers it."""
        self.line(tag, f"{question} (yes/no)")
        self._answer = lambda reply: then(reply.lower() in YES)

    # -- commands -----------------------------------------------------------------

    def _command(self, text: str) -> None:
        app = self.app
        assert app is not None
        name, _, rest = text.partition(" ")
        rest = rest.strip()
        args = rest.split()
        core = app.core
        if name == "/msg":
            who, _, body = rest.partition(" ")
            if not who or not body.strip():
                raise ContactError("usage: /msg WHO TEXT")
            contact = core.find(who)
            asked_before = self._answer is None
            self._send(contact.user_id, body)
            # Sent to an unverified contact without asking (asked once per
            # contact): a script's "yes" on the next line is for no question.
            unverified = contact.trust is Trust.UNVERIFIED
            self._sent_unasked = asked_before and self._answer is None and unverified
        elif name == "/to":
            if not args:
                if self._to is None:
                    self.line("info", "not in a conversation")
                else:
                    self.line("info", f"left the conversation with {self._name(self._to)}")
                    self._to = None
                return
            if len(args) != 1:
                raise ContactError("usage: /to WHO (or /to alone to leave the conversation)")
            contact = core.find(args[0])
            if contact.removed or contact.unlisted:
                raise ContactError(
                    f"{contact.name} was removed from the server"
                    if contact.removed
                    else f"{contact.name} is not on the server's user list; sending is "
                    "refused until it lists them again"
                )
            self._to = contact.user_id
            self.line(
                "info",
                f"talking to {contact.name} ({contact.trust.value}); /to WHO to switch, "
                "/to alone to leave",
            )
        elif name == "/contacts":
            contacts = core.contacts()
            if not contacts:
                self.line("contact", "no contacts yet")
            for contact in contacts:
                self.line("contact", format_contact(contact))
        elif name == "/name":
            if len(args) != 2:
                raise ContactError("usage: /name ID PETNAME")
            contact = core.find(args[0])
            app.set_petname(contact.user_id, args[1])
            self.line("info", f"{contact.user_id} is now called {args[1]}")
        elif name == "/verify":
            self._verify(args)
        elif name == "/accept":
            self._accept(args)
        elif name == "/fingerprint":
            self.line("fingerprint", f"{core.user_id}: {_one_line(core.fingerprint())}")
            self.line("ik", core.own_ik_text())
        elif name == "/import":
            if len(args) != 2:
                raise ContactError("usage: /import WHO enclaves-ik:...")
            contact = core.find(args[0])
            app.import_ik(contact.user_id, args[1])
            after = core.contact(contact.user_id)
            if contact.pending_ik is not None and after.ik == contact.ik:
                self.line(
                    "warn",
                    f"{after.name} still has the key you knew: the identity key change was "
                    "false (is someone tampering with the server?); it is rejected and "
                    "sending works again",
                )
            self.line("trust", f"{after.name} is now {after.trust.value}")
        elif name == "/rekey":
            if len(args) != 1:
                raise ContactError("usage: /rekey WHO")
            contact = core.find(args[0])
            if app.rekey(contact.user_id):
                self.line("kex", f"key exchange with {contact.name} started")
        elif name == "/history":
            self._history(args)
        elif name == "/outbox":
            entries = core.outbox()
            if not entries:
                self.line("outbox", "empty")
            for entry in entries:
                why = f": {entry.reason}" if entry.reason else ""
                if app.is_held(entry.msg_id):
                    why = " (in memory only: the keystore could not be saved)"
                self.line(
                    "outbox",
                    f"id={short_id(entry.msg_id)} {entry.kind} to {self._name(entry.recipient)} "
                    f"{entry.status}{why}",
                )
        elif name == "/retry":
            if len(args) != 1:
                raise ContactError("usage: /retry ID")
            item = app.retry(args[0])
            self._sent(item.msg_id, item.recipient, " (again)")
        elif name == "/invite":
            if app.invite():
                self.line("info", "asked the server for an invitation token")
            else:
                self.line("error", "not connected to the server; try /invite again later")
        elif name == "/rotate":
            app.rotate()
            self.line("info", "asked the server to replace your keys")
        elif name == "/help":
            for help_line in HELP.splitlines():
                self.line("help", help_line)
        elif name == "/quit":
            if self._quit_waits and self._on_eof is not None:
                on_eof, self._on_eof = self._on_eof, None
                self._quitting = True  # a script: like the end of its input
                on_eof()
                return
            self.line("info", "bye")
            app.stop(0)
        else:
            self.line("error", f"unknown command {name}; /help lists them")

    def _send(self, user_id: int, text: str, confirmed: bool = False) -> None:
        app = self.app
        assert app is not None
        result = app.send_text(user_id, text, confirmed)
        if isinstance(result, Refused):
            if result.reason == "confirm unverified":

                def then(yes: bool) -> None:
                    if yes:
                        self._send(user_id, text, confirmed=True)
                    else:
                        self.line("info", "not sent")

                self.ask("confirm", result.text, then)
                return
            self.line("refused", f"not sent to {self._name(user_id)}: {result.text}")
            return
        self._sent(result.msg_id, user_id)

    def _sent(self, msg_id: bytes, recipient: int, again: str = "") -> None:
        """Say what became of a message just sealed: sent, queued, or held
        because the keystore could not be saved."""
        app = self.app
        assert app is not None
        what = f"id={short_id(msg_id)} to {self._name(recipient)}"
        if app.is_held(msg_id):
            self.line(
                "error",
                f"{what} not sent: could not save the keystore ({app.save_error}); it is "
                "kept in memory only and sent once a save succeeds"
                f"{' (free some space)' if app.save_full else ''}; "
                "quitting before then loses it",
            )
        elif app.online:
            self.line("sent", what + again)
        else:
            self.line("queued", f"{what}{again} ({QUEUED_WHY})")

    def _verify(self, args: list[str]) -> None:
        app = self.app
        assert app is not None
        if len(args) not in (1, 2):
            raise ContactError("usage: /verify WHO [yes]")
        contact = app.core.find(args[0])
        number = app.core.safety_number(contact.user_id)
        self.line("safety", f"{contact.name}: {_one_line(number)}")

        def then(yes: bool) -> None:
            if yes:
                app.verify(contact.user_id)
                after = app.core.contact(contact.user_id)
                self.line("trust", f"{after.name} is now {after.trust.value}")
            else:
                self.line(
                    "warn",
                    f"not verified. If the numbers differ, someone may be between you and "
                    f"{contact.name}: send nothing sensitive and tell your admin",
                )

        if len(args) == 2:
            then(args[1].lower() in YES)
        else:
            self.ask("confirm", f"does {contact.name} read out exactly these 60 digits?", then)

    def _accept(self, args: list[str]) -> None:
        app = self.app
        assert app is not None
        if len(args) not in (1, 2):
            raise ContactError("usage: /accept WHO [yes]")
        contact = app.core.find(args[0])
        number = app.core.pending_safety_number(contact.user_id)
        self.line("safety", f"{contact.name} (new key): {_one_line(number)}")

        def then(yes: bool) -> None:
            if yes:
                app.accept_new_ik(contact.user_id)
                self.line(
                    "trust",
                    f"accepted the new identity key of {contact.name}; trust is now unverified",
                )
            else:
                self.line("info", f"not accepted; sending to {contact.name} stays blocked")

        if len(args) == 2:
            then(args[1].lower() in YES)
        else:
            self.ask("confirm", f"accept {contact.name}'s new identity key?", then)

    def _history(self, args: list[str]) -> None:
        app = self.app
        assert app is not None
        if len(args) != 1:
            raise ContactError("usage: /history WHO")
        contact = app.core.find(args[0])
        entries = app.core.history(contact.user_id)
        if not entries:
            self.line("history", f"nothing with {contact.name} yet")
        for entry in entries:
            who = "me" if entry.direction == "out" else contact.name
            self.line(
                "history",
                f"{clock_text(entry.unix_ms, app.now())} {who} "
                f"({entry.trust.value}, {entry.status}): {entry.text}",
            )

    def _name(self, user_id: int) -> str:
        assert self.app is not None
        try:
            return self.app.core.contact(user_id).name
        except ContactError:
            return str(user_id)


def _one_line(digits: str) -> str:
    return " ".join(digits.split())
