"""``--listen`` and ``--manhole`` endpoints that do not parse: one line naming both."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock

from enclaves.server.listening import listening_service
from enclaves.serverkey import StartupError


def _refusal(description: str, option: str = "--listen") -> str:
    with pytest.raises(StartupError) as info:
        listening_service(option, description, Factory(), Clock())
    return str(info.value)


def test_control_characters_in_an_endpoint_are_escaped() -> None:
    message = _refusal("nonsense\x1b[2J:7500\n")
    assert message.startswith("--listen nonsense\\x1b[2J:7500\\n: ")
    assert "\x1b" not in message and "\n" not in message


@pytest.mark.parametrize(
    ("description", "reason"),
    [
        ("tcp:notaport", "'notaport' is not a number, and the port must be one"),
        ("tcp:7500:bogus=1", "unknown parameter 'bogus'"),
        # A number other than the port: not blamed on the port.
        ("tcp:7500:backlog=x", "'x' is not a number, and that parameter must be one"),
        # An IPv6 address's colons split the description unless escaped.
        (
            "tcp6:7500:interface=::1",
            "too many ':'-separated fields; a ':' inside a value, as in an IPv6 address, "
            "is written '\\:' (tcp6:7500:interface=\\:\\:1)",
        ),
        (
            "tcp:7500:100:127.0.0.1:x:y",
            "too many ':'-separated fields; a ':' inside a value, as in an IPv6 address, "
            "is written '\\:' (tcp6:7500:interface=\\:\\:1)",
        ),
        ("nonsense:7500", "unknown endpoint type 'nonsense'"),
    ],
)
def test_an_endpoint_that_does_not_parse_is_named_with_the_reason(
    description: str, reason: str
) -> None:
    message = _refusal(description, "--manhole")
    assert message.startswith(f"--manhole {description}: not a valid endpoint: {reason} (e.g. ")
    assert "invalid literal" not in message and "_parse" not in message
    assert "positional" not in message and "multiple values" not in message
    assert "\n" not in message


def test_a_certificate_that_cannot_be_read_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "key.pem"
    message = _refusal(f"ssl:7500:privateKey={missing}")
    assert message == (
        f"--listen ssl:7500:privateKey={missing}: cannot read {missing}: No such file or directory"
    )


def test_the_listener_tells_its_port_once_listening_and_whether_it_is_tls(
    tmp_path: Path,
) -> None:
    """What issue() checks a token's address against."""
    from twisted.internet.testing import MemoryReactor

    from tests.system.test_client_tls import key_pem, make_ca, make_server_cert, pem

    reactor = MemoryReactor()
    plain = listening_service("--listen", "tcp:7500:interface=127.0.0.1", Factory(), reactor)
    assert plain.tls is False and plain.port is None
    plain.privilegedStartService()
    assert plain.port == 7500 and reactor.tcpServers[0][0] == 7500
    ca_key, ca = make_ca("ca")
    key, cert = make_server_cert(ca_key, ca, "localhost")
    (tmp_path / "key.pem").write_bytes(key_pem(key))
    (tmp_path / "cert.pem").write_bytes(pem(cert))
    description = f"ssl:0:privateKey={tmp_path / 'key.pem'}:certKey={tmp_path / 'cert.pem'}"
    assert listening_service("--listen", description, Factory(), reactor).tls is True
    # A UNIX socket: a proxy stands in front, speaking TLS or not (unknown).
    unix = listening_service("--listen", f"unix:{tmp_path / 's'}", Factory(), reactor)
    assert unix.tls is None
    unix.privilegedStartService()
    assert unix.port is None
