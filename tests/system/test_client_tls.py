"""The client over TLS: the server certificate is checked (CA and host name)."""

from __future__ import annotations

import datetime
import re
from pathlib import Path

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from enclaves.token import EnrollmentToken, parse_token
from tests.daemon import Daemon
from tests.system.clients import PASSPHRASE, Client, chat, enroll, new_tokens

pytestmark = pytest.mark.system


def make_ca(name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return key, cert


def make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate, host: str
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@pytest_twisted.ensureDeferred
async def test_tls_checks_ca_and_host_name(tmp_path: Path) -> None:
    ca_key, ca = make_ca("Enclaves test CA")
    _other_key, other_ca = make_ca("Someone else's CA")
    server_key, server_cert = make_server_cert(ca_key, ca, "localhost")
    (tmp_path / "ca.pem").write_bytes(pem(ca))
    (tmp_path / "other-ca.pem").write_bytes(pem(other_ca))
    (tmp_path / "server.key").write_bytes(key_pem(server_key))
    (tmp_path / "server.pem").write_bytes(pem(server_cert))
    probe = Daemon(tmp_path)
    listen = (
        f"--listen=ssl:{probe.port}:privateKey={tmp_path / 'server.key'}"
        f":certKey={tmp_path / 'server.pem'}:interface=127.0.0.1"
    )
    daemon = Daemon(tmp_path, listen, port=probe.port)
    (token,) = await new_tokens(daemon, 1)
    daemon.start()
    keystore = tmp_path / "a.keystore"
    running = []
    try:
        # Plain TCP to a TLS server: the error says what the address should be.
        plain = enroll(token, keystore, "--server", f"localhost:{daemon.port}")
        assert plain.process.returncode == 1, plain.output()
        assert f"if the server uses TLS, its address is tls:localhost:{daemon.port}" in "\n".join(
            plain.err
        )
        assert not keystore.exists()
        # A CA that did not sign the server's certificate: refused, nothing left behind.
        bad_ca = enroll(
            token,
            keystore,
            "--server",
            f"tls:localhost:{daemon.port}",
            "--ca-file",
            str(tmp_path / "other-ca.pem"),
        )
        assert bad_ca.process.returncode == 1, bad_ca.output()
        assert "certificate could not be verified" in "\n".join(bad_ca.err)
        assert not keystore.exists()
        # The right CA but another host name than the certificate's.
        bad_host = enroll(
            token,
            keystore,
            "--server",
            f"tls:127.0.0.1:{daemon.port}",
            "--ca-file",
            str(tmp_path / "ca.pem"),
        )
        assert bad_host.process.returncode == 1, bad_host.output()
        assert "certificate could not be verified" in "\n".join(bad_host.err)
        assert not keystore.exists()
        # A token that names the TLS listener: only the CA file is needed.
        parsed = parse_token(token)
        tls_token = str(
            EnrollmentToken(parsed.user_id, parsed.keys, f"tls:localhost:{daemon.port}")
        )
        good = enroll(tls_token, keystore, "--ca-file", str(tmp_path / "ca.pem"))
        assert good.process.returncode == 0, good.output()
        good.expect(r"^\[enrolled\] ")
        # The keystore remembers the TLS address and the CA file.
        client = chat(keystore)
        running.append(client)
        client.send("/contacts")
        client.expect(r"^\[contact\] no contacts yet$")
        assert client.quit() == 0
    finally:
        for c in running:
            c.kill()
        assert daemon.stop() == 0, daemon.log_text()


@pytest_twisted.ensureDeferred
async def test_tls_to_a_plain_server_stops_with_plain_words(tmp_path: Path) -> None:
    """TLS to a server that does not speak it: one attempt, then a [fatal] line
    saying to drop tls: (not a retry loop quoting OpenSSL)."""
    daemon = Daemon(tmp_path)
    token_a, token_b = await new_tokens(daemon, 2)
    daemon.start()
    wrong = f"tls:127.0.0.1:{daemon.port}"
    words = f"does not speak TLS: give its address as 127.0.0.1:{daemon.port}, without tls:"
    try:
        first = enroll(token_a, tmp_path / "a.keystore", "--server", wrong)
        assert first.process.returncode == 1, first.output()
        assert words in "\n".join(first.err)
        assert "SSL routines" not in first.output()
        good = enroll(token_b, tmp_path / "b.keystore")
        assert good.process.returncode == 0, good.output()
        client = Client(["--keystore", str(tmp_path / "b.keystore"), "--server", wrong], PASSPHRASE)
        assert client.wait(20) == 1, client.output()
        client.expect(r"^\[fatal\] the server at .* " + re.escape(words))
        assert not client.seen(r"^\[conn\] cannot reach")
    finally:
        assert daemon.stop() == 0, daemon.log_text()
