"""``enclaves enroll TOKEN`` and ``enclaves``: the console script (docs/client.rst)."""

from __future__ import annotations

import argparse
import atexit
import getpass
import os
import signal
import sys
import unicodedata
from pathlib import Path
from typing import Any

from attrs import evolve
from twisted.internet.defer import Deferred, ensureDeferred, succeed

from enclaves.client.app import ClientApp
from enclaves.client.core import ClientCore
from enclaves.client.endpoint import EndpointError, normalise, shown
from enclaves.client.keystore import (
    BadPassphrase,
    Keystore,
    KeystoreError,
    check_keystore_path,
    lock_keystore,
    remove_lock,
)
from enclaves.client.state import ClientState
from enclaves.client.terminal import CharacterMode, TerminalIO
from enclaves.client.ui import LineUI
from enclaves.crypto import KeyPair
from enclaves.token import TokenError, parse_token

__all__ = ["main", "default_keystore", "read_passphrase", "unlock", "UserError"]

ENROLL_HELP = """\
Next: verify your contacts. Each contact is 'unverified' until you compare
safety numbers with them: run 'enclaves', type /verify NAME, and read the 60
digits to each other over the phone or in person (recognise their voice).
If every group matches, answer yes. If anything differs, send nothing
sensitive and tell your admin. Or exchange identity keys in person: your key
is the 'enclaves-ik:' line above; theirs goes into /import NAME KEY."""


INPUT_NOTE = (
    "When standard input is not a terminal, the passphrase is its first line "
    "(or the first line of the file named by ENCLAVES_PASSPHRASE_FILE)."
)
ENROLL_INPUT_NOTE = (
    INPUT_NOTE + " Without TOKEN, the token is asked for on a terminal; otherwise it is "
    "the first line of standard input and the passphrase the second."
)
EOF_GRACE = 15.0  # seconds to get the outbox accepted after the end of input
ENROLL_SILENCE = 30.0  # seconds without a word from the server before enroll gives up
ENROLL_SEND_WAIT = 30.0  # seconds for the server to accept enroll's key exchanges
EXIT_INTERRUPTED = 130  # ^C, SIGTERM (128 + SIGINT, as a shell reports it)
EXIT_OUTPUT_CLOSED = 141  # standard output went away (128 + SIGPIPE, as for other tools)
MIN_PASSPHRASE = 10  # characters, for a new keystore
PASSPHRASE_TRIES = 3  # on a terminal: for a new keystore, and to unlock one
CHAT_USAGE = """\
enclaves [--keystore PATH] [--server ADDRESS] [--ca-file FILE] [--plain]
       enclaves enroll [TOKEN] [--keystore PATH] [--server ADDRESS] [--ca-file FILE]
       (enclaves enroll --help: joining a server)"""


class UserError(Exception):
    """A plain-language error for the user; exit status ``code`` (1)."""

    def __init__(self, text: str, code: int = 1) -> None:
        super().__init__(text)
        self.code = code


def default_keystore() -> Path:
    return Path.home() / ".enclaves" / "keystore"


def _parser(enroll: bool) -> argparse.ArgumentParser:
    if enroll:
        parser = argparse.ArgumentParser(
            prog="enclaves enroll",
            description="Join a server with the enrollment token your admin gave you.",
            epilog=ENROLL_INPUT_NOTE,
        )
        parser.add_argument(
            "token",
            nargs="?",
            help="the enrollment token (enclaves1:...); leave it out to be asked for it, "
            "which keeps it out of ps and your shell history",
        )
    else:
        parser = argparse.ArgumentParser(
            prog="enclaves",
            usage=CHAT_USAGE,
            description=(
                "Chat. Join a server first with 'enclaves enroll TOKEN' (the token "
                "comes from your admin). Type /help once running."
            ),
            epilog=INPUT_NOTE,
        )
    parser.add_argument("--keystore", type=Path, default=None, help="default ~/.enclaves/keystore")
    parser.add_argument(
        "--server",
        default=None,
        help="host:port or tls:HOST:PORT (default: from the "
        + ("token)" if enroll else "keystore)"),
    )
    parser.add_argument("--ca-file", default=None, help="PEM CA certificate for tls: servers")
    if not enroll:
        parser.add_argument(
            "--plain",
            action="store_true",
            help="no line editing on a terminal: read plain lines (as from a pipe)",
        )
    parser.add_argument("--send-rate", type=float, default=20.0, help=argparse.SUPPRESS)
    parser.add_argument("--retry-max", type=float, default=30.0, help=argparse.SUPPRESS)
    parser.add_argument("--tick", type=float, default=30.0, help=argparse.SUPPRESS)
    if enroll:
        parser.add_argument("--silence", type=float, default=ENROLL_SILENCE, help=argparse.SUPPRESS)
    if not enroll:
        parser.add_argument("--eof-grace", type=float, default=EOF_GRACE, help=argparse.SUPPRESS)
    return parser


def read_passphrase(prompt: str, new: bool = False) -> str:
    """From ENCLAVES_PASSPHRASE_FILE, the terminal (getpass), or stdin's first line.

    ``new``: for a new keystore; at least :data:`MIN_PASSPHRASE` characters,
    and on a terminal typed twice (asked again, a few times, if the two
    differ or it is too short).
    """
    path = os.environ.get("ENCLAVES_PASSPHRASE_FILE")
    if path:
        try:
            text = Path(path).read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise UserError(f"cannot read ENCLAVES_PASSPHRASE_FILE: {e.strerror}") from None
        passphrase = text[0] if text else ""
    elif os.isatty(0) and new:
        return _new_passphrase_from_terminal(prompt)
    elif os.isatty(0):
        passphrase = getpass.getpass(prompt)
    else:
        passphrase = _read_stdin_line()
    if not passphrase:
        raise UserError("the passphrase must not be empty")
    if new and _too_short(passphrase):
        raise UserError(_TOO_SHORT + "; nothing was created")
    return passphrase


_TOO_SHORT = (
    f"a new keystore needs a passphrase of at least {MIN_PASSPHRASE} characters (anyone "
    "with a copy of the file can try passphrases at leisure)"
)


def _too_short(passphrase: str) -> bool:
    return len(unicodedata.normalize("NFC", passphrase)) < MIN_PASSPHRASE


def _new_passphrase_from_terminal(prompt: str) -> str:
    for _ in range(PASSPHRASE_TRIES):
        passphrase = getpass.getpass(prompt)
        if _too_short(passphrase):
            sys.stderr.write(f"enclaves: {_TOO_SHORT}; try again\n")
        elif getpass.getpass("Same passphrase again: ") != passphrase:
            sys.stderr.write("enclaves: the two passphrases differ; try again\n")
        else:
            return passphrase
    raise UserError(f"no passphrase after {PASSPHRASE_TRIES} tries; nothing was created")


def unlock(path: Path) -> tuple[Keystore, ClientState]:
    """Ask for the passphrase and open the keystore; on a terminal a wrong
    passphrase is asked for again, :data:`PASSPHRASE_TRIES` times in all."""
    tries = (
        PASSPHRASE_TRIES if os.isatty(0) and not os.environ.get("ENCLAVES_PASSPHRASE_FILE") else 1
    )
    for attempt in range(1, tries + 1):
        try:
            return Keystore.unlock(path, read_passphrase("Keystore passphrase: "))
        except (BadPassphrase, UserError) as e:  # UserError: an empty line
            if attempt == tries:
                raise
            sys.stderr.write(f"enclaves: {e}; try again\n")
    raise AssertionError("not reached")


def _read_stdin_line() -> str:
    """One line from fd 0, byte by byte, so that no later command is swallowed."""
    data = bytearray()
    while True:
        byte = os.read(0, 1)
        if not byte or byte == b"\n":
            break
        data += byte
    return data.decode("utf-8", errors="replace").rstrip("\r")


class _Stdout:
    """Standard output for ``enroll``: once it is gone (a closed pipe),
    nothing more is written and ``on_gone`` is called once."""

    gone = False
    on_gone: Any = None

    def write(self, line: str) -> None:
        if self.gone:
            return
        try:
            sys.stdout.write(line)
            sys.stdout.flush()
        except BrokenPipeError:
            self.went()

    def went(self) -> None:
        if self.gone:
            return
        self.gone = True
        # Nothing more can be written; the exit's own flush must not fail either.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)
        if self.on_gone is not None:
            self.on_gone()


STDOUT = _Stdout()


def _print(tag: str, text: str) -> None:
    from enclaves.printable import printable

    STDOUT.write(f"[{tag}] {printable(text)}\n")


def _keystore_path(args: argparse.Namespace) -> Path:
    path: Path = args.keystore if args.keystore is not None else default_keystore()
    return path.expanduser().absolute()


# -- enroll ---------------------------------------------------------------------


def read_token() -> str:
    """The token when not given as an argument: asked for on a terminal
    (hidden, like a passphrase), else the first line of standard input."""
    if os.isatty(0):
        return getpass.getpass("Enrollment token: ")
    return _read_stdin_line()


class _Enrollment:
    """What ``enroll`` settled before the reactor runs (all the questions)."""

    def __init__(
        self, path: Path, keystore: Keystore, state: ClientState, endpoint: str, created: bool
    ) -> None:
        self.path, self.keystore, self.state = path, keystore, state
        self.endpoint, self.created = endpoint, created


def prepare_enroll(args: argparse.Namespace, held: list[tuple[Path, int]]) -> _Enrollment:
    """The token, the keystore's lock, the passphrase and the keystore (made,
    or opened to resume).  Runs before the reactor, so ^C and ^D at a prompt
    are plain ``KeyboardInterrupt`` and ``EOFError``.  A lock this makes for
    a keystore that does not exist is put in ``held`` (removed by
    :func:`main` if no keystore is left at the end)."""
    try:
        token = parse_token(args.token if args.token is not None else read_token())
    except TokenError as e:
        raise UserError(str(e)) from None
    address = args.server or token.address
    if not address:
        raise UserError("this token names no server: give --server HOST:PORT")
    try:
        endpoint = normalise(address, args.ca_file)
    except EndpointError as e:
        raise UserError(str(e)) from None
    path = _keystore_path(args)
    check_keystore_path(path, must_exist=False)
    existed = path.exists()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = lock_keystore(path)
    if not existed:
        held.append((path, fd))
    if path.exists():
        keystore, state = unlock(path)
        if state.user_id != token.user_id or state.enrolled:
            raise UserError(
                f"{path} already holds an account; it was left untouched. To enroll "
                "another account, move that file aside or give --keystore NEW_PATH"
            )
        _print("info", "resuming the interrupted enrollment")
        return _Enrollment(path, keystore, state, endpoint, created=False)
    passphrase = read_passphrase("New keystore passphrase: ", new=True)
    core = ClientCore.new(token.user_id, token.keys, endpoint)
    state = evolve(core.state(), pending_server_keys=KeyPair.generate(), enrolled=False)
    try:
        keystore = Keystore.create(path, passphrase, state)
        _print("info", f"created keystore {path}")
    except BaseException:  # ^C meanwhile: nothing was sent with it
        path.unlink(missing_ok=True)
        raise
    return _Enrollment(path, keystore, state, endpoint, created=True)


async def enroll(reactor: Any, args: argparse.Namespace, prepared: _Enrollment) -> int:
    path, created = prepared.path, prepared.created
    app = ClientApp(
        reactor,
        prepared.keystore,
        prepared.state,
        prepared.endpoint,
        _print,
        send_rate=args.send_rate,
        tick_interval=args.tick,
        reconnect=False,
        pending_keys_sent=not created,
    )
    # ^C or SIGTERM, or standard output closed: save and disconnect cleanly.
    reactor.addSystemEventTrigger("before", "shutdown", app.stop, EXIT_INTERRUPTED, "interrupted")
    STDOUT.on_gone = lambda: app.stop(EXIT_OUTPUT_CLOSED, "standard output was closed")
    finished = app.start()
    watch = _watch_silence(reactor, app, args.silence)
    either: Deferred[None] = Deferred()

    def fire(result: object) -> object:
        if not either.called:
            either.callback(None)
        return result

    app.enrolled.addCallback(fire)
    finished.addCallback(fire)
    try:
        await either
    finally:
        watch.stop()
    if not app.enrolled.called:
        code, text = app.outcome or (1, "stopped")
        if created and (app.token_refused or not app.rotate_sent):
            path.unlink(missing_ok=True)
            text += " (the new keystore was removed)"
        elif app.rotate_sent:
            text = text.rstrip(".") + (
                f". The enrollment may be half done: run the same 'enclaves enroll' command "
                f"again (it reuses {path})."
            )
        raise UserError(text, code if code in (EXIT_INTERRUPTED, EXIT_OUTPUT_CLOSED) else 1)
    await app.wait_sent(ENROLL_SEND_WAIT)
    cut = app.outcome  # the connection ended (or ^C) after the enrollment completed
    pending = app.pending_count()
    core = app.core
    _print("enrolled", f"you are user {core.user_id}")
    _print("fingerprint", f"{core.user_id}: {' '.join(core.fingerprint().split())}")
    _print("ik", core.own_ik_text())
    for line in ENROLL_HELP.splitlines():
        _print("help", line)
    if pending:
        why = "the connection ended" if cut is not None else f"no answer in {ENROLL_SEND_WAIT:g} s"
        _print(
            "warn",
            f"{pending} key exchange(s) not accepted by the server yet ({why}); they are "
            "kept and sent the next time you run 'enclaves'",
        )
    code, _ = await app.stop(0)
    # Enrolled: the keystore is complete whatever ended the connection.
    return code if code in (EXIT_INTERRUPTED, EXIT_OUTPUT_CLOSED) else 0


def _watch_silence(reactor: Any, app: ClientApp, limit: float) -> Any:
    """Stop ``app`` once connected and nothing came from the server for
    ``limit`` seconds (the server or the path stopped answering)."""
    from twisted.internet.task import LoopingCall

    since: list[float] = []

    def check() -> None:
        if app.outcome is not None or app.conn is None:
            return
        now = app.now()
        if not since:
            since.append(now)  # connected: the clock starts
        heard = max(since[0], app.last_heard)  # when the server last spoke
        if now - heard >= limit:
            app.stop(1, f"the server at {shown(app.endpoint)} stopped answering for {limit:g} s")

    watch = LoopingCall(check)
    watch.clock = reactor
    watch.start(min(1.0, limit / 4), now=False)
    return watch


# -- chat -----------------------------------------------------------------------


def prepare_chat(args: argparse.Namespace) -> tuple[Keystore, ClientState, str]:
    """The keystore's lock, the passphrase, the keystore and the server: before
    the reactor runs, so ^C and ^D at the prompt are plain exceptions."""
    path = _keystore_path(args)
    if not path.exists() and not path.is_symlink():
        raise UserError(f"no keystore at {path}: enroll first with 'enclaves enroll TOKEN'")
    check_keystore_path(path, must_exist=True)
    lock_keystore(path)
    keystore, state = unlock(path)
    return keystore, state, _chat_endpoint(args, state)


async def chat(
    reactor: Any, args: argparse.Namespace, prepared: tuple[Keystore, ClientState, str]
) -> int:
    from twisted.internet.stdio import StandardIO

    keystore, state, endpoint = prepared
    holder: list[ClientApp] = []

    attached: list[Deferred[None]] = []  # a script's commands, once attached

    def on_eof() -> None:
        if holder:
            ensureDeferred(_finish(holder[0], ui, args.eof_grace, attached))

    def on_output_gone() -> None:
        if holder:
            holder[0].stop(EXIT_OUTPUT_CLOSED)

    ui = _ChatUI(on_eof=on_eof, quit_waits=not os.isatty(0), on_output_gone=on_output_gone)
    mode = _editing_terminal(args)
    if mode is not None:
        terminal = TerminalIO(ui, ui.prompt, _columns)
        reactor.addSystemEventTrigger("after", "shutdown", _leave, mode)
        _job_control(reactor, mode, terminal)
        StandardIO(terminal, reactor=reactor)
        LOG_SINK.terminal = terminal  # warnings go above the typed line too
    else:
        StandardIO(ui, reactor=reactor)
    try:
        return await _chat(reactor, args, keystore, state, endpoint, ui, holder, attached)
    finally:
        LOG_SINK.terminal = None
        if mode is not None:
            mode.restore()


def _editing_terminal(args: argparse.Namespace) -> CharacterMode | None:
    """Character mode on standard input if both ends are a terminal (and not
    ``--plain``); None: plain lines."""
    if args.plain or os.environ.get("TERM", "dumb") == "dumb":
        return None
    if not (os.isatty(0) and os.isatty(1)):
        return None
    mode = CharacterMode(0)
    mode.enter()
    atexit.register(mode.restore)
    return mode


def _leave(mode: CharacterMode) -> None:
    """Last thing on the way out (also after ^C, when the UI's own clearing
    write may not have left): no half-typed line on the screen, the
    terminal's mode as it was."""
    try:
        os.write(1, b"\r\x1b[K")
    except OSError:
        pass  # the terminal is gone
    mode.restore()


def _columns() -> int:
    try:
        return os.get_terminal_size(1).columns or 80
    except OSError:
        return 80


def _job_control(reactor: Any, mode: CharacterMode, terminal: TerminalIO) -> None:
    """^Z hands the shell a terminal as it was; ``fg`` takes it back (the
    shell may have changed its mode meanwhile) and redraws the typed line."""

    def resume() -> None:
        mode.enter()
        terminal.redraw()

    def suspend(signum: int, frame: Any) -> None:
        _leave(mode)
        signal.signal(signal.SIGTSTP, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTSTP)  # stops here until SIGCONT
        signal.signal(signal.SIGTSTP, suspend)

    signal.signal(signal.SIGTSTP, suspend)
    signal.signal(signal.SIGCONT, lambda *_: reactor.callFromThread(resume))


class _LogSink:
    """Where the client's warnings are written: standard error, or above the
    typed line while the line editor owns the terminal."""

    terminal: TerminalIO | None = None

    def write(self, text: str) -> None:
        if self.terminal is not None and not self.terminal.finished:
            self.terminal.show(text.encode("utf-8", errors="replace"))
        else:
            sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


LOG_SINK = _LogSink()


async def _chat(
    reactor: Any,
    args: argparse.Namespace,
    keystore: Keystore,
    state: ClientState,
    endpoint: str,
    ui: _ChatUI,
    holder: list[ClientApp],
    attached: list[Deferred[None]],
) -> int:
    app = ClientApp(
        reactor,
        keystore,
        state,
        endpoint,
        ui.line,
        send_rate=args.send_rate,
        tick_interval=args.tick,
        retry_max=args.retry_max,
    )
    holder.append(app)
    # ^C or SIGTERM: save and disconnect cleanly before the reactor stops.
    reactor.addSystemEventTrigger("before", "shutdown", app.stop, 130)
    ui.line("info", f"user {state.user_id}; /help lists the commands")
    if os.isatty(0):
        ui.attach(app)
    else:
        # A script's commands wait for the login and the user list (at most
        # the end-of-input grace): contacts and keys are then up to date.
        attached.append(ensureDeferred(_attach_when_logged_in(app, ui, args.eof_grace)))
    code, text = await app.start()
    if ui.output_gone:
        return EXIT_OUTPUT_CLOSED
    if text:
        ui.line("fatal" if code else "info", text)
    await ui.close()
    return code


class _ChatUI(LineUI):
    """The chat's UI; standard output going away (a closed pipe) calls
    ``on_output_gone``: nothing more can be shown, so the client stops."""

    def __init__(self, *args: Any, on_output_gone: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._on_output_gone = on_output_gone
        self.output_gone = False

    def writeConnectionLost(self) -> None:
        if not self.output_gone:
            self.output_gone = True
            if self._on_output_gone is not None:
                self._on_output_gone()

    def close(self) -> Deferred[None]:
        if self.output_gone:  # nothing left to flush (and no close would come)
            return succeed(None)
        return super().close()


async def _attach_when_logged_in(app: ClientApp, ui: LineUI, grace: float) -> None:
    """A script's commands run once the user list and what came right after it
    (key exchanges kept for us) are handled, at most ``grace`` seconds on."""
    start = app.now()
    ready = app.when_directory_handled()
    ready.addTimeout(grace, app._reactor).addErrback(lambda _: None)
    await ready
    await app.quiet(max(grace - (app.now() - start), 0.0))
    app.apply_unlisted()  # before the commands, which may name such a contact
    if ui.app is None:
        ui.attach(app)


async def _finish(app: ClientApp, ui: LineUI, grace: float, attached: list[Deferred[None]]) -> None:
    """End of input: stay (at most ``grace`` seconds) until logged in, the
    user list handled and the outbox accepted; then quit, with status 1 and
    an ``[error]`` line if that did not happen, or if anything during this run
    was not done (an ``[error]``, ``[refused]`` or ``[failed]`` line, or a
    question left unanswered) (docs/client.rst, "Scripts")."""
    for commands in attached:
        await commands  # the script's commands run first (bounded by the grace)
    if app.outcome is None:
        ui.line("info", "end of input: sending what is queued, then quitting")
    await app.settle(grace)
    if app.outcome is not None:
        return  # stopped already: /quit, or a fatal error said why
    pending = app.pending_count()
    kept = f"{pending} message(s) kept in the outbox and sent next time"
    problems = []
    if not app.connected_once:
        why = f" ({app.last_failure})" if app.last_failure else ""
        problems.append(
            f"could not connect to the server at {shown(app.endpoint)} in {grace:g} s{why}"
            + (f"; {kept}" if pending else "")
        )
    elif pending:
        problems.append(
            f"{pending} message(s) not accepted by the server yet; kept in the outbox "
            "and sent next time"
        )
    elif not app.directory_handled:
        problems.append(f"the server at {shown(app.endpoint)} did not finish the login in time")
    failed = app.still_failed()
    if failed:
        problems.append(
            f"{failed} message(s) refused by the server or lost (see the "
            "[failed] lines: each says whether /retry can send it again)"
        )
    undone = ui.commands_not_done()  # a script's; 0 in an interactive session
    if undone:
        problems.append(f"{undone} command(s) not done (see the [error] and [refused] lines)")
    if app.invites_waiting:
        problems.append("no answer to /invite came from the server; no token was shown")
    if ui.question_open:
        problems.append("the input ended before the answer to a question; nothing was done for it")
    for problem in problems:
        ui.line("error", problem)
    # Messages a failed save left in memory only: the final save keeps them,
    # or app.stop says they are lost.
    app.stop(1 if problems or app.unsaved_count() else 0)


def _chat_endpoint(args: argparse.Namespace, state: ClientState) -> str:
    address = args.server or state.endpoint
    if not address:
        raise UserError("the keystore names no server: give --server HOST:PORT")
    try:
        return normalise(address, args.ca_file)
    except EndpointError as e:
        raise UserError(str(e)) from None


# -- entry point ----------------------------------------------------------------


def _log_warnings_to_stderr() -> None:
    """Warnings and errors of the client's own log go to stderr (never secrets),
    as tagged lines; those the UI reports itself are dropped (ui.REPORTED_BY_UI)."""
    from twisted.logger import globalLogBeginner

    from enclaves.client.ui import TaggedLogObserver

    globalLogBeginner.beginLoggingTo([TaggedLogObserver(LOG_SINK.write)], redirectStandardIO=False)


def _stop(reactor: Any) -> None:
    from twisted.internet.error import ReactorNotRunning

    try:
        reactor.stop()
    except ReactorNotRunning:
        pass


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    is_enroll = bool(argv) and argv[0] == "enroll"
    args = _parser(is_enroll).parse_args(argv[1:] if is_enroll else argv)
    held: list[tuple[Path, int]] = []  # lock files made by this enroll
    try:
        return _main(is_enroll, args, held)
    finally:
        for path, fd in held:
            remove_lock(path, fd)  # only if no keystore was left


def _main(is_enroll: bool, args: argparse.Namespace, held: list[tuple[Path, int]]) -> int:
    # The questions first, before the reactor takes over the signals.
    try:
        prepared: Any = prepare_enroll(args, held) if is_enroll else prepare_chat(args)
    except KeyboardInterrupt:
        sys.stderr.write("\n")  # the cursor is still after the prompt
        return EXIT_INTERRUPTED
    except EOFError:
        sys.stderr.write("\nenclaves: error: end of input at the prompt; nothing was done\n")
        return 1
    except (UserError, KeystoreError) as error:
        sys.stderr.write(f"enclaves: error: {error}\n")
        return getattr(error, "code", 1)
    if STDOUT.gone:  # closed before the client connected: nothing was sent
        if is_enroll:
            if prepared.created:
                prepared.path.unlink(missing_ok=True)
                why = "the new keystore was removed"
            else:
                why = f"nothing was sent; {prepared.path} is kept to resume"
            sys.stderr.write(f"enclaves: error: standard output was closed ({why})\n")
        return EXIT_OUTPUT_CLOSED

    from twisted.internet import reactor

    _log_warnings_to_stderr()
    outcome: dict[str, Any] = {"code": 1}

    def report(failure: Any) -> None:
        error = failure.value
        if isinstance(error, (UserError, KeystoreError)):
            sys.stderr.write(f"enclaves: error: {error}\n")
            outcome["code"] = getattr(error, "code", 1)
        else:
            sys.stderr.write(f"enclaves: internal error: {failure.getErrorMessage()}\n")
            failure.printTraceback(file=sys.stderr)
            outcome["code"] = 1

    def go() -> None:
        run = enroll if is_enroll else chat
        d: Deferred[Any] = ensureDeferred(run(reactor, args, prepared))
        d.addCallbacks(lambda code: outcome.update(code=code), report)
        d.addBoth(lambda _: _stop(reactor))

    reactor.callWhenRunning(go)
    reactor.run()
    return int(outcome["code"])
