"""Where the client connects: server addresses as users type them.

Accepted forms (docs/client.rst, "Servers and TLS"):

- ``host:port`` — plain TCP (what an enrollment token's ``@host:port`` says);
- ``tcp:...`` — any Twisted ``clientFromString`` TCP description;
- ``tls:HOST:PORT`` or ``ssl:HOST:PORT`` (also ``host=``/``port=`` keywords,
  and ``ca=PATH``) — TLS with the server certificate checked against HOST by
  ``service_identity``, trusting the CA file given (``ca=`` or ``--ca-file``)
  or else the system's trust store.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet.endpoints import HostnameEndpoint, clientFromString, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.ssl import Certificate, optionsForClientTLS, platformTrust

__all__ = ["EndpointError", "normalise", "client_endpoint", "host_port", "is_tls", "shown"]


class EndpointError(ValueError):
    """A server address the client can not use; the text is plain."""


def normalise(address: str, ca_file: str | None = None) -> str:
    """A full endpoint description for ``address``; ``ca_file`` is folded into TLS ones."""
    address = address.strip()
    if not address:
        raise EndpointError("no server address given")
    scheme, _, rest = address.partition(":")
    if scheme in ("tls", "ssl"):
        fields = _tls_fields(rest)
        if ca_file is not None:
            fields["ca"] = str(Path(ca_file).absolute())
        text = f"tls:host={fields['host']}:port={fields['port']}"
        if fields.get("ca"):
            text += f":ca={fields['ca']}"
        return text
    if ca_file is not None:
        raise EndpointError("--ca-file needs a tls: server address (tls:HOST:PORT)")
    if scheme == "tcp" or scheme.startswith(("unix", "tcp6")):
        return address
    host, _, port = address.rpartition(":")
    if host and port.isdigit():
        return f"tcp:host={host}:port={port}"
    raise EndpointError(f"not a server address: {address!r} (use host:port or tls:host:port)")


def is_tls(description: str) -> bool:
    """Is a :func:`normalise`-d description a TLS one?"""
    return description.startswith("tls:")


def host_port(description: str) -> str | None:
    """``HOST:PORT`` of a :func:`normalise`-d TCP or TLS description (None for others)."""
    scheme, _, rest = description.partition(":")
    if scheme not in ("tls", "tcp"):
        return None
    try:
        fields = _tls_fields(rest)
    except EndpointError:
        return None
    return f"{fields['host']}:{fields['port']}"


def shown(description: str) -> str:
    """A :func:`normalise`-d description as users type it: ``HOST:PORT`` or
    ``tls:HOST:PORT`` (anything else as it is)."""
    address = host_port(description)
    if address is None:
        return description
    return f"tls:{address}" if is_tls(description) else address


def _tls_fields(rest: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    positional = []
    for part in rest.split(":"):
        if "=" in part:
            key, _, value = part.partition("=")
            fields[key] = value
        elif part:
            positional.append(part)
    for key, value in zip(("host", "port"), positional, strict=False):
        fields.setdefault(key, value)
    unknown = set(fields) - {"host", "port", "ca"}
    if unknown:
        raise EndpointError(f"unknown TLS option(s): {', '.join(sorted(unknown))}")
    if not fields.get("host") or not fields.get("port", "").isdigit():
        raise EndpointError("a TLS server address is tls:HOST:PORT")
    return fields


def client_endpoint(reactor: Any, description: str) -> IStreamClientEndpoint:
    """The endpoint for a :func:`normalise`-d description."""
    if description.startswith("tls:"):
        fields = _tls_fields(description[4:])
        trust: Any
        if fields.get("ca"):
            try:
                trust = Certificate.loadPEM(Path(fields["ca"]).read_bytes())
            except OSError as e:
                raise EndpointError(f"cannot read CA file {fields['ca']}: {e.strerror}") from None
            except Exception:
                raise EndpointError(f"{fields['ca']} is not a PEM certificate") from None
        else:
            trust = platformTrust()
        options = optionsForClientTLS(fields["host"], trustRoot=trust)
        return wrapClientTLS(
            options, HostnameEndpoint(reactor, fields["host"], int(fields["port"]))
        )
    try:
        return clientFromString(reactor, description)
    except (ValueError, TypeError) as e:
        raise EndpointError(f"bad server address {description!r}: {e}") from None
