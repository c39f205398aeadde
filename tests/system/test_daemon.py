"""A real ``twistd -n enclaves`` subprocess: start-up, framing limits, shutdown."""

from __future__ import annotations

import os
import signal
import socket
import stat
import struct
import subprocess
from pathlib import Path

import pytest

from enclaves.frames import ErrorCode, FrameDecoder, FrameType, decode_error
from tests.daemon import Daemon, twistd_command
from tests.system.test_client_tls import key_pem, make_ca, make_server_cert, pem

pytestmark = pytest.mark.system


def _read_until_closed(sock: socket.socket, limit: float = 10.0) -> bytes:
    sock.settimeout(limit)
    chunks = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def test_oversize_frame_dropped_then_reconnect_and_sigterm(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path)
    daemon.start()
    try:
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as sock:
            sock.sendall(struct.pack(">I", 65537))
            reply = _read_until_closed(sock)
        (frame,) = FrameDecoder().feed(reply)
        assert frame.type is FrameType.ERROR
        assert decode_error(frame.payload)[0] == ErrorCode.FRAME_TOO_LARGE
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as sock:
            sock.sendall(struct.pack(">I", 0xFFFFFFFF))
            assert _read_until_closed(sock)
        # The server is still serving.
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=10):
            pass
    finally:
        status = daemon.stop(signal.SIGTERM)
    assert status == 0, daemon.log_text()
    key = daemon.data_dir / "server.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert len(key.read_bytes()) == 64
    log = daemon.log_text()
    assert "server key" in log and str(key) in log
    assert key.read_bytes().hex() not in log


def test_sigint_also_stops_cleanly(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path)
    daemon.start()
    assert daemon.stop(signal.SIGINT) == 0


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    daemon = Daemon(tmp_path)
    return subprocess.run(
        [*twistd_command(), "-n", "--pidfile=", "enclaves", *args],
        cwd=tmp_path,
        env=daemon.env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_key_from_another_data_dir_is_refused(tmp_path: Path) -> None:
    first = Daemon(tmp_path)
    first.start()
    assert first.stop() == 0
    other = tmp_path / "other.key"
    other.write_bytes(os.urandom(64))
    other.chmod(0o600)
    result = _run(tmp_path, f"--data-dir={first.data_dir}", f"--key-file={other}")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"enclaves: error: key file {other} does not belong to data directory {first.data_dir}"
    ]


def test_missing_key_for_initialised_dir_is_refused(tmp_path: Path) -> None:
    first = Daemon(tmp_path)
    first.start()
    assert first.stop() == 0
    (first.data_dir / "server.key").unlink()
    result = _run(tmp_path, f"--data-dir={first.data_dir}", "--listen=tcp:0")
    assert result.returncode == 1
    assert "is missing" in result.stderr and "Traceback" not in result.stderr
    assert not (first.data_dir / "server.key").exists()


def test_help_documents_every_option(tmp_path: Path) -> None:
    result = _run(tmp_path, "--help")
    assert result.returncode == 0
    for option in (
        "--listen",
        "--data-dir",
        "--key-file",
        "--max-frame",
        "--manhole",
        "--admin-keys",
    ):
        assert option in result.stdout


def test_daemonizes_with_pidfile(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path)
    pidfile = tmp_path / "twistd.pid"
    argv = daemon.argv()
    argv.remove("-n")
    argv[argv.index("--pidfile=")] = f"--pidfile={pidfile}"
    result = subprocess.run(argv, cwd=tmp_path, env=daemon.env(), timeout=60)
    assert result.returncode == 0
    daemon.wait_listening_without_child = None  # type: ignore[attr-defined]
    import time

    deadline = time.monotonic() + 20
    while not pidfile.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = int(pidfile.read_text())
    try:
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=10):
            pass
    finally:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while pidfile.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    assert not pidfile.exists()


def _held_port() -> socket.socket:
    """A loopback port held by a listening test socket."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def _start_refused(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """twistd -n with its default pid file (in tmp_path) and log file: must refuse to start."""
    daemon = Daemon(tmp_path)
    result = subprocess.run(
        [*twistd_command(), "-n", "--logfile=twistd.log", "enclaves", *args],
        cwd=tmp_path,
        env=daemon.env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    log = (tmp_path / "twistd.log").read_text() if (tmp_path / "twistd.log").exists() else ""
    assert result.returncode != 0, (result, log)
    assert "Traceback" not in result.stderr + result.stdout + log, (result, log)
    assert not (tmp_path / "twistd.pid").exists()  # nothing left behind
    return result


@pytest.mark.parametrize("value", ["131072", "65537"])
def test_max_frame_above_the_protocol_limit_is_refused_at_start_up(
    tmp_path: Path, value: str
) -> None:
    """No client takes a frame above 65,536 bytes, so a server that would send
    one is not started; refused like every out-of-range number (twistd's usage
    check), before anything is created."""
    data_dir = tmp_path / "d"
    result = _start_refused(tmp_path, f"--max-frame={value}", f"--data-dir={data_dir}")
    assert result.returncode == 1
    assert result.stdout.splitlines()[-1].endswith(
        "Parameter type enforcement failed: max-frame must be between 4096 and 65536"
    ), result
    assert not data_dir.exists()


def test_listen_port_in_use_is_a_one_line_error(tmp_path: Path) -> None:
    with _held_port() as held:
        port = held.getsockname()[1]
        endpoint = f"tcp:{port}:interface=127.0.0.1"
        result = _start_refused(tmp_path, f"--listen={endpoint}", f"--data-dir={tmp_path / 'd'}")
    assert result.stderr.splitlines() == [
        f"enclaves: error: --listen {endpoint}: cannot listen: Address already in use"
    ]
    assert f"start-up refused: --listen {endpoint}" in (tmp_path / "twistd.log").read_text()


def test_daemonized_refusal_shows_the_reason_within_twistds_100_bytes(tmp_path: Path) -> None:
    """Started without -n, only twistd's parent reaches the terminal, and it
    prints the first 100 bytes of the child's exception: the reason comes first."""
    with _held_port() as held:
        port = held.getsockname()[1]
        endpoint = "ssl:{}:privateKey={}:certKey={}:interface=127.0.0.1".format(
            port, tmp_path / "a-long-path-to-the-key.pem", tmp_path / "a-long-path-to-the-cert.pem"
        )
        ca_key, ca = make_ca("Enclaves test CA")
        key, cert = make_server_cert(ca_key, ca, "localhost")
        (tmp_path / "a-long-path-to-the-key.pem").write_bytes(key_pem(key))
        (tmp_path / "a-long-path-to-the-cert.pem").write_bytes(pem(cert))
        daemon = Daemon(tmp_path)
        result = subprocess.run(
            [
                *twistd_command(),
                f"--pidfile={tmp_path / 'twistd.pid'}",
                f"--logfile={tmp_path / 'twistd.log'}",
                "enclaves",
                f"--listen={endpoint}",
                f"--data-dir={tmp_path / 'd'}",
            ],
            cwd=tmp_path,
            env=daemon.env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1, result
    assert "cannot listen: Address already in use" in result.stderr, result.stderr
    assert not (tmp_path / "twistd.pid").exists()
    log = (tmp_path / "twistd.log").read_text()
    assert f"start-up refused: --listen {endpoint}: cannot listen: Address already in use" in log


def test_manhole_port_in_use_is_a_one_line_error_and_nothing_keeps_running(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "d"
    data_dir.mkdir(mode=0o700)
    (data_dir / "admin_keys").write_text(
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHR0ZXN0dGVzdHRlc3R0ZXN0dGVzdHRlc3R0ZXN0dGVz t@t\n"
    )
    (data_dir / "admin_keys").chmod(0o600)
    listen = Daemon(tmp_path).port
    with _held_port() as held:
        port = held.getsockname()[1]
        endpoint = f"tcp:{port}:interface=127.0.0.1"
        result = _start_refused(
            tmp_path,
            f"--listen=tcp:{listen}:interface=127.0.0.1",
            f"--manhole={endpoint}",
            f"--data-dir={data_dir}",
        )
    assert result.stderr.splitlines() == [
        f"enclaves: error: --manhole {endpoint}: cannot listen: Address already in use"
    ]
    # The client listener it had opened went with the process.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", listen), timeout=5).close()


@pytest.mark.parametrize(
    ("option", "shell_on"), [("--listen", True), ("--manhole", True), ("--manhole", False)]
)
def test_endpoint_that_does_not_parse_is_a_one_line_error(
    tmp_path: Path, option: str, shell_on: bool
) -> None:
    """Also a --manhole of a server whose admin shell is off (no admin keys):
    the mistake shows now, not when keys are added."""
    data_dir = tmp_path / "d"
    data_dir.mkdir(mode=0o700)
    admin_keys = tmp_path / "admin_keys"
    admin_keys.write_text(
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHR0ZXN0dGVzdHRlc3R0ZXN0dGVzdHRlc3R0ZXN0dGVz t@t\n"
    )
    result = _start_refused(
        tmp_path,
        f"{option}=tcp:notaport",
        "--listen=tcp:0:interface=127.0.0.1" if option == "--manhole" else "--manhole=tcp:0",
        *([f"--admin-keys={admin_keys}"] if shell_on else []),  # off: no keys file at all
        f"--data-dir={data_dir}",
    )
    example = (
        "tcp:7522:interface=127.0.0.1"
        if option == "--manhole"
        else "tcp:7500:interface=127.0.0.1 or ssl:7500:privateKey=key.pem:certKey=cert.pem"
    )
    assert result.stderr.splitlines() == [
        f"enclaves: error: {option} tcp:notaport: not a valid endpoint: 'notaport' is not a "
        f"number, and the port must be one (e.g. {example})"
    ]
