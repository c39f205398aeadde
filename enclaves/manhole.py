"""The SSH admin shell: a twisted.conch manhole, public-key auth only (docs/admin.rst)."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import stat
import struct
from collections.abc import Callable, Iterator, Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

from attrs import frozen
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.application.service import IService
from twisted.conch import error as conch_error
from twisted.conch import interfaces as iconch
from twisted.conch import manhole_ssh
from twisted.conch.checkers import InMemorySSHKeyDB, SSHPublicKeyChecker
from twisted.conch.insults import insults
from twisted.conch.ssh import channel as ssh_channel
from twisted.conch.ssh import common, connection, keys, session, transport, userauth
from twisted.cred import error as cred_error
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer
from twisted.internet.protocol import connectionDone
from twisted.logger import (
    ILogObserver,
    LogEvent,
    Logger,
    LogLevel,
    formatEvent,
    globalLogPublisher,
)
from twisted.python import components
from twisted.python.failure import Failure
from zope.interface import implementer

from enclaves.adminshell import AdminLineShell, AdminManhole
from enclaves.atomic import create_exclusive, write_atomic
from enclaves.printable import printable
from enclaves.server.listening import listening_service
from enclaves.serverkey import StartupError

__all__ = [
    "HOST_KEY_FILE",
    "AdminIdentity",
    "AdminKeys",
    "AdminManhole",
    "AdminShellFactory",
    "load_or_create_host_key",
    "manhole_service",
    "openssh_fingerprint",
    "read_admin_keys",
]

HOST_KEY_FILE = "ssh_host_ed25519_key"

log = Logger()


@implementer(ILogObserver)
class ConchLogFilter:
    """Where the SSH machinery's own log events go: only warnings and errors
    pass, and their text is escaped (a client chooses some of it).

    Conch logs each packet's bookkeeping (``adding 98304 to 32768 in channel
    0``, key exchange steps, channel opens) at debug and info level: more
    than a third of the lines of an admin session.  This shell logs what
    matters itself (logins, refused keys, typed lines, disconnects).
    """

    def __init__(self, observer: ILogObserver = globalLogPublisher) -> None:
        self._observer = observer

    def __call__(self, event: LogEvent) -> None:
        if event.get("log_level", LogLevel.info) < LogLevel.warn:
            return
        if event.get("log_format") is not None:
            event = dict(event, log_format="{conch_text}", conch_text=printable(formatEvent(event)))
        self._observer(event)


#: The logger of every Conch class the admin shell uses (their ``_log``).
_conch_log = Logger(observer=ConchLogFilter())


def openssh_fingerprint(key: keys.Key) -> str:
    """The key's fingerprint as OpenSSH prints it: ``SHA256:`` + unpadded base64."""
    digest = hashlib.sha256(key.blob()).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


# Host key ------------------------------------------------------------------


def _read_host_key(path: Path) -> keys.Key:
    try:
        info = path.stat()
        if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise StartupError(
                f"SSH host key {path} is readable by others "
                f"(mode {stat.S_IMODE(info.st_mode):04o}); run: chmod 600 {path}"
            )
        data = path.read_bytes()
    except OSError as error:
        raise StartupError(f"cannot read SSH host key {path}: {error.strerror}") from None
    try:
        key = keys.Key.fromString(data)
    except (keys.BadKeyError, keys.EncryptedKeyError, ValueError):
        raise StartupError(f"SSH host key {path} is not a valid private key") from None
    if key.isPublic() or key.type() != "Ed25519":
        raise StartupError(f"SSH host key {path} is not an Ed25519 private key")
    return key


def load_or_create_host_key(data_dir: Path) -> tuple[keys.Key, bool]:
    """Load ``DATA-DIR/ssh_host_ed25519_key``, or make it (mode 0600) on first start.

    Also (re)writes the public half beside it, ``ssh_host_ed25519_key.pub``,
    for the admin's known_hosts.  Returns the key and whether it was created.
    """
    path = Path(data_dir) / HOST_KEY_FILE
    created = False
    if not path.exists():
        private = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
        try:
            create_exclusive(path, private, 0o600)
            created = True
        except FileExistsError:
            pass  # another start made it first: use that one
        except OSError as error:
            raise StartupError(f"cannot create SSH host key {path}: {error.strerror}") from None
    key = _read_host_key(path)
    public_path = path.with_name(HOST_KEY_FILE + ".pub")
    public_line = key.public().toString("openssh", comment=b"enclaves-manhole") + b"\n"
    try:
        if not public_path.exists() or public_path.read_bytes() != public_line:
            write_atomic(public_path, public_line, 0o644)
    except OSError as error:
        raise StartupError(f"cannot write {public_path}: {error.strerror}") from None
    return key, created


# Admin keys and who is who ---------------------------------------------------


@frozen
class AdminIdentity:
    """Who is at the shell: SSH user name, key fingerprint and authorized_keys comment."""

    username: str
    fingerprint: str
    comment: str

    def __str__(self) -> str:
        label = f"{self.username} key {self.fingerprint}"
        return f"{label} ({self.comment})" if self.comment else label


@frozen
class AdminKeys:
    """The admins' public keys, and the comment each had in authorized_keys."""

    public_keys: tuple[keys.Key, ...]
    comments: Mapping[bytes, str]

    def comment_for(self, key: keys.Key) -> str:
        return self.comments.get(key.blob(), "")


def _refuse_writable_by_others(path: Path) -> None:
    """Like sshd's StrictModes: whoever can write the admin keys file (or
    replace it through its directory) can become admin, so refuse that."""
    for target, what in ((path, "admin keys file"), (path.parent, "directory of the admin keys")):
        try:
            mode = os.stat(target).st_mode
        except OSError as error:
            raise StartupError(f"cannot read admin keys {path}: {error.strerror}") from None
        if mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise StartupError(
                f"{what} {target} is writable by group or others "
                f"(mode {stat.S_IMODE(mode):o}); run chmod go-w on it"
            )


#: A public key after something else on its line: authorized_keys options.
_KEY_AFTER_OPTIONS = re.compile(rb"(?=\s((?:ssh-|ecdsa-|sk-)\S+\s+AAAA\S+.*)$)")


def _has_options(line: bytes) -> bool:
    """Whether ``line`` is a public key with authorized_keys options before it
    (``from="..."``, ``command="..."``, ``restrict``, ...)."""
    for match in _KEY_AFTER_OPTIONS.finditer(line):
        try:
            if keys.Key.fromString(match.group(1)).isPublic():
                return True
        except Exception:  # noqa: S112 - not a key there; the line is skipped anyway
            continue
    return False


def read_admin_keys(path: Path) -> AdminKeys:
    """Parse an OpenSSH authorized_keys file; lines that are not keys are skipped and logged.

    Not ``readAuthorizedKeyFile``: it logs a bad line verbatim, and a private
    key pasted into the file by mistake must not end up in the log.
    """
    found: list[keys.Key] = []
    comments: dict[bytes, str] = {}
    _refuse_writable_by_others(Path(path))
    try:
        with open(path, "rb") as handle:
            lines = handle.read().splitlines()
    except OSError as error:
        raise StartupError(f"cannot read admin keys {path}: {error.strerror}") from None
    in_private = False
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith(b"#"):
            continue
        if b"PRIVATE KEY" in line and line.startswith(b"-----BEGIN"):
            in_private = True
            log.error(
                "admin keys {path} line {number}: a PRIVATE key was pasted here; it is "
                "skipped (put the .pub file in, and treat that private key as exposed to "
                "whoever could read this file)",
                path=str(path),
                number=number,
            )
            continue
        if in_private:
            if b"PRIVATE KEY" in line and line.startswith(b"-----END"):
                in_private = False
                continue
            if not line.startswith((b"ssh-", b"ecdsa-", b"sk-")):
                continue  # the key's body
            in_private = False  # no END line: a public key follows
        try:
            key = keys.Key.fromString(line)
            if not key.isPublic():
                raise keys.BadKeyError("not a public key")
        except Exception:
            if _has_options(line):
                # Admitting the key without its from= or command= would give it
                # more than it was meant to have; honouring them is not done.
                log.warn(
                    "admin keys {path} line {number}: authorized_keys options (from=, "
                    "command=, restrict, ...) are not supported; the key is skipped (remove "
                    "the options to admit it)",
                    path=str(path),
                    number=number,
                )
                continue
            log.warn(
                "admin keys {path} line {number}: not an OpenSSH public key, skipped",
                path=str(path),
                number=number,
            )
            continue
        fields = line.split(None, 2)
        comment = fields[2].decode("utf-8", "replace").strip() if len(fields) > 2 else ""
        comment = printable(comment)  # it is logged with each login
        comments.setdefault(key.blob(), comment)
        found.append(key)
    return AdminKeys(tuple(found), comments)


class _AnyUserName(Mapping[bytes, tuple[keys.Key, ...]]):
    """Every SSH user name maps to the admin keys: the key, not the name, is checked."""

    def __init__(self, admin_keys: tuple[keys.Key, ...]) -> None:
        self._keys = admin_keys

    def __getitem__(self, name: bytes) -> tuple[keys.Key, ...]:
        return self._keys

    def __iter__(self) -> Iterator[bytes]:
        return iter(())

    def __len__(self) -> int:
        return 0


class AdminKeyChecker(SSHPublicKeyChecker):
    """``SSHPublicKeyChecker`` over the admin keys; the avatar id is an :class:`AdminIdentity`.

    Being the portal's only checker, it makes Conch offer ``publickey`` alone.
    """

    def __init__(self, admin_keys: AdminKeys) -> None:
        super().__init__(InMemorySSHKeyDB(_AnyUserName(admin_keys.public_keys)))
        self._admin_keys = admin_keys

    def requestAvatarId(self, credentials: Any) -> defer.Deferred[AdminIdentity]:
        # Any bytes the client likes: logged, so escaped.
        username = printable(credentials.username.decode("utf-8", "replace"))
        result: defer.Deferred[Any] = super().requestAvatarId(credentials)

        def accepted(_username: bytes) -> AdminIdentity:
            key = keys.Key.fromString(credentials.blob)
            return AdminIdentity(
                username, openssh_fingerprint(key), self._admin_keys.comment_for(key)
            )

        def refused(failure: Failure) -> Failure:
            if failure.check(cred_error.UnauthorizedLogin) and not failure.check(
                conch_error.ValidPublicKey
            ):
                try:
                    offered = openssh_fingerprint(keys.Key.fromString(credentials.blob))
                except (keys.BadKeyError, ValueError):
                    offered = "(unreadable key)"
                log.warn(
                    "admin shell: refused SSH key {fingerprint} for user {username}",
                    fingerprint=offered,
                    username=username,
                )
            return failure

        return result.addCallbacks(accepted, refused)


# The SSH session --------------------------------------------------------------


class AdminSessionTransport(manhole_ssh.TerminalSessionTransport):
    """Glues the SSH channel to the terminal; leaving the shell ends with exit status 0."""

    def __init__(self, proto: Any, chainedProtocol: Any, avatar: Any, width: int, height: int):
        super().__init__(proto, chainedProtocol, avatar, width, height)
        channel = proto.session

        def close() -> None:
            if channel.closing:
                return
            avatar.conn.sendRequest(channel, b"exit-status", struct.pack(">L", 0))
            # The channel's own close (not the session's, which would come back
            # here): sent once the output still buffered for the client is out.
            ssh_channel.SSHChannel.loseConnection(channel)

        proto.transport.loseConnection = close


def _end_session(channel: Any, status: int) -> None:
    """Send the exit status; close the channel once its buffered output has gone out."""
    channel.conn.sendRequest(channel, b"exit-status", struct.pack(">L", status))
    channel.loseConnection()


class _LineShellInput:
    """Where Conch writes what the client sends (the session's client transport).

    For a command given to ssh the command is the whole input: what the
    client sends is dropped (``to_shell`` false).
    """

    def __init__(self, shell: AdminLineShell, to_shell: bool) -> None:
        self._shell = shell
        self._to_shell = to_shell

    def write(self, data: bytes) -> None:
        if self._to_shell:
            self._shell.dataReceived(data)

    def loseConnection(self) -> None:
        self._shell.connectionLost(connectionDone)


@implementer(iconch.ISession)
class AdminTerminalSession(manhole_ssh.TerminalSession):
    """One SSH session: the terminal shell with a pty, the line shell without one.

    With a pty (``ssh``, ``ssh -t``) it is the stock terminal session minus
    its crashes: window changes and EOF are ignored (the stock
    ``eofReceived`` raises).  Without one (``ssh -T``, or input from a
    pipe) the shell is :class:`AdminLineShell`, which ends the session after
    the output of the last command once the input ends.  A command given to
    ssh (exec) runs in the line shell too, as if it were the whole input.
    """

    width = 80
    height = 24
    transportFactory = AdminSessionTransport

    def __init__(
        self,
        original: Any,
        line_shell: Callable[[Callable[[int], None], bytes], AdminLineShell],
        reactor: Any,
    ) -> None:
        super().__init__(original)
        self._make_line_shell = line_shell
        self._reactor = reactor
        self._pty = False
        self._line_shell: AdminLineShell | None = None

    def getPty(self, term: bytes, windowSize: Any, attrs: Any) -> None:
        super().getPty(term, windowSize, attrs)
        self._pty = True

    def openShell(self, proto: Any) -> None:
        if self._pty:
            super().openShell(proto)
        else:
            self._line_shell = self._open_line_shell(proto, from_client=True)

    def execCommand(self, proto: Any, cmd: bytes) -> None:
        shell = self._open_line_shell(proto, from_client=False)
        # On the next turn: the channel is not set up until this returns.
        self._reactor.callLater(0, _run_script, shell, cmd)

    def _open_line_shell(self, proto: Any, *, from_client: bool) -> AdminLineShell:
        channel = proto.session
        newline = b"\r\n" if self._pty else b"\n"  # a pty would not return the carriage
        shell = self._make_line_shell(lambda status: _end_session(channel, status), newline)
        shell.makeConnection(proto)
        proto.makeConnection(_LineShellInput(shell, from_client))
        return shell

    def windowChanged(self, newWindowSize: Any) -> None:
        pass

    def eofReceived(self) -> None:
        if self._line_shell is not None:
            self._line_shell.end_of_input()


def _run_script(shell: AdminLineShell, script: bytes) -> None:
    shell.dataReceived(script + b"\n")
    shell.end_of_input()


class AdminSessionChannel(session.SSHSession):
    """An SSH session channel with a session object of its own.

    (Conch's looks one up per login, so two channels of one connection
    would share their pty and shell state.)  Its ``exec`` request does not
    log the command verbatim as Conch's does: the line shell logs each line
    with tokens masked.  Its ``shell`` and ``pty-req`` requests are not
    logged at all (Conch logs them at info level, the shell logs the login).
    """

    _log = _conch_log

    @cached_property
    def _session(self) -> Any:
        made = self.session = self.avatar.make_session()  # type: ignore[union-attr]
        return made

    def _start(self, what: str, start: Callable[[session.SSHSessionProcessProtocol], None]) -> int:
        if self.client is not None:
            return 0
        client = session.SSHSessionProcessProtocol(self)
        try:
            start(client)
        except Exception:
            log.failure("admin shell: could not {what}", what=what)
            return 0
        self.client = client
        return 1

    def request_exec(self, data: bytes) -> int:
        command = common.getNS(data)[0]
        return self._start("run a command", lambda c: self._session.execCommand(c, command))

    def request_shell(self, data: bytes) -> int:
        return self._start("open the shell", self._session.openShell)

    def request_subsystem(self, data: bytes) -> int:
        """No subsystems (``sftp``, which ``scp`` uses): refused, logged once
        in our words (Conch's would log the request at info level)."""
        name = common.getNS(data)[0].decode("utf-8", "replace")
        log.info("admin shell: subsystem {name} refused", name=printable(name))
        return 0

    def request_pty_req(self, data: bytes) -> int:
        term, window_size, modes = session.parseRequest_pty_req(data)
        try:
            self._session.getPty(term, window_size, modes)
        except Exception:
            log.failure("admin shell: could not set up a terminal")
            return 0
        return 1


#: Session channels one admin SSH connection may have open at once.
MAX_CHANNELS = 8


class AdminUser(manhole_ssh.TerminalUser):
    """The SSH avatar of one admin; each session channel gets ``make_session()``."""

    _log = _conch_log

    def __init__(
        self, original: Any, identity: AdminIdentity, make_session: Callable[[], Any]
    ) -> None:
        super().__init__(original, identity)
        self.identity = identity
        self.make_session = make_session
        self.channelLookup[b"session"] = AdminSessionChannel

    def lookupChannel(
        self, channelType: bytes, windowSize: int, maxPacket: int, data: bytes
    ) -> Any:
        """A new channel, unless this connection has MAX_CHANNELS open already
        (each runs a shell: one admin connection must not eat the server)."""
        if self.conn is not None and len(self.conn.channels) >= MAX_CHANNELS:
            raise conch_error.ConchError(
                connection.OPEN_ADMINISTRATIVELY_PROHIBITED,
                f"at most {MAX_CHANNELS} sessions per connection",
            )
        return super().lookupChannel(channelType, windowSize, maxPacket, data)


@implementer(IRealm)
class AdminRealm:
    """Gives each admin SSH sessions running :class:`AdminManhole` on a terminal,
    :class:`AdminLineShell` without one."""

    def __init__(
        self, make_namespace: Callable[[AdminIdentity], dict[str, Any]], reactor: Any
    ) -> None:
        self._make_namespace = make_namespace
        self._reactor = reactor

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> tuple[Any, Any, Any]:
        if iconch.IConchUser not in interfaces:
            raise NotImplementedError("only SSH shells")
        identity: AdminIdentity = avatarId
        component = components.Componentized()
        namespace_factory = self._make_namespace

        def shell() -> insults.ServerProtocol:
            log.info("admin {admin} opened the admin shell", admin=str(identity))
            return insults.ServerProtocol(AdminManhole, namespace_factory(identity), identity)

        def line_shell(finish: Callable[[int], None], newline: bytes) -> AdminLineShell:
            log.info("admin {admin} opened the admin shell without a terminal", admin=str(identity))
            return AdminLineShell(namespace_factory(identity), identity, finish, newline=newline)

        def make_session() -> AdminTerminalSession:
            made = AdminTerminalSession(component, line_shell, self._reactor)
            made.chainedProtocolFactory = shell  # type: ignore[assignment]
            return made

        user = AdminUser(component, identity, make_session)
        component.setComponent(iconch.IConchUser, user)
        component.setComponent(iconch.ISession, make_session())
        return iconch.IConchUser, user, lambda: None


# Conch's defaults minus the weak: no 3DES or CBC, no MD5 or SHA-1 MACs, no
# SHA-1 key exchanges.  OpenSSH's defaults all remain.  Finite-field group
# exchange is off too: it needs a moduli file of vetted primes, which Conch
# does not read (it would log, per connection, that it turns it off).
SSH_CIPHERS = [b"aes256-ctr", b"aes192-ctr", b"aes128-ctr"]
SSH_MACS = [b"hmac-sha2-512", b"hmac-sha2-384", b"hmac-sha2-256"]
_WEAK_KEX = {b"diffie-hellman-group-exchange-sha1", b"diffie-hellman-group14-sha1",
             b"diffie-hellman-group1-sha1"}  # fmt: skip
_NO_KEX = _WEAK_KEX | {b"diffie-hellman-group-exchange-sha256"}


class AdminUserAuth(userauth.SSHUserAuthServer):
    """Conch's user authentication, logging through :class:`ConchLogFilter`."""

    _log = _conch_log


class AdminConnection(connection.SSHConnection):
    """Conch's connection service, logging through :class:`ConchLogFilter`."""

    _log = _conch_log


class AdminServerTransport(transport.SSHServerTransport):
    """Conch's server transport; a client's normal disconnect is not logged as an error.

    Logs through :class:`ConchLogFilter`, like every Conch class of the shell.

    OpenSSH ends every session with DISCONNECT "disconnected by user"
    (``DISCONNECT_BY_APPLICATION``), which Conch logs at error level;
    every other reason still is.
    """

    _log = _conch_log

    def receiveError(self, reasonCode: int, description: bytes) -> None:
        if reasonCode != transport.DISCONNECT_BY_APPLICATION:
            super().receiveError(reasonCode, description)
            return
        log.info(
            "admin shell: SSH client {peer} disconnected ({reason})",
            peer=_peer(self),
            reason=printable(description.decode("utf-8", "replace")[:200]),
        )


def _peer(protocol: Any) -> str:
    address = protocol.transport.getPeer()
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    return f"{host}:{port}" if host is not None else str(address)


class AdminShellFactory(manhole_ssh.ConchFactory):
    """The SSH factory with this server's own host key (never the class-level dicts)
    and only strong algorithms."""

    protocol = AdminServerTransport
    services = {b"ssh-userauth": AdminUserAuth, b"ssh-connection": AdminConnection}
    _log = _conch_log
    noisy = False  # no "Starting factory" / "Stopping factory" lines

    def __init__(self, portal: Portal, host_key: keys.Key) -> None:
        super().__init__(portal)
        # Twisted declares these dict[bytes, bytes]; they hold Key objects.
        self.publicKeys = {b"ssh-ed25519": host_key.public()}  # type: ignore[dict-item,unused-ignore]
        self.privateKeys = {b"ssh-ed25519": host_key}  # type: ignore[dict-item]

    def buildProtocol(self, addr: Any) -> Any:
        transport = super().buildProtocol(addr)
        transport.supportedCiphers = [c for c in transport.supportedCiphers if c in SSH_CIPHERS]
        transport.supportedMACs = [m for m in transport.supportedMACs if m in SSH_MACS]
        transport.supportedKeyExchanges = [
            k for k in transport.supportedKeyExchanges if k not in _NO_KEX
        ]
        return transport


def manhole_service(
    endpoint: str,
    admin_keys_path: Path,
    data_dir: Path,
    make_namespace: Callable[[AdminIdentity], dict[str, Any]],
    reactor: Any,
) -> IService | None:
    """The admin shell's listening service, or None (and a log line) without usable keys.

    Raises :class:`StartupError` for an unreadable key file or host key, or
    an endpoint that does not parse.
    """
    admin_keys = read_admin_keys(admin_keys_path)
    if not admin_keys.public_keys:
        log.error(
            "admin shell is off: {path} holds no usable public key; add an OpenSSH "
            "public key line (ssh-ed25519 AAAA... you@host) and restart",
            path=str(admin_keys_path),
        )
        return None
    host_key, created = load_or_create_host_key(data_dir)
    fingerprint = openssh_fingerprint(host_key)
    log.info(
        "admin shell on {endpoint} for {count} admin key(s); SSH host key {path} "
        "({state}), fingerprint {fingerprint}",
        endpoint=printable(endpoint),
        count=len(admin_keys.public_keys),
        path=str(Path(data_dir) / HOST_KEY_FILE),
        state="created now" if created else "existing",
        fingerprint=fingerprint,
    )
    portal = Portal(AdminRealm(make_namespace, reactor), [AdminKeyChecker(admin_keys)])
    factory = AdminShellFactory(portal, host_key)
    return listening_service("--manhole", endpoint, factory, reactor)
