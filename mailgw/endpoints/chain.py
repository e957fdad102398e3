"""The upstream endpoint chain: TCP, then SOCKS5 for on-premise destinations.

TLS is not an endpoint layer here: the session starts it on the transport it gets
(right away for implicit TLS, after the go-ahead for STARTTLS), see ``endpoints.tls``.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint

from ..destination import Destination

ProxyEndpointFactory = Callable[[Destination, "str | None"], IStreamClientEndpoint]


class ConfigurationError(ValueError):
    """The gateway's configuration cannot serve a destination (e.g. no proxy for OnPremise)."""


def upstream_endpoint(
    reactor,
    destination: Destination,
    tenant: str | None = None,
    *,
    connect_timeout: float = 10.0,
    proxy: ProxyEndpointFactory | None = None,
) -> IStreamClientEndpoint:
    """The endpoint that reaches ``destination``'s mail server (before any TLS)."""
    if destination.on_premise:
        if proxy is None:
            raise ConfigurationError(
                f"destination {destination.name!r} is OnPremise but no connectivityProxy is configured"
            )
        return proxy(destination, tenant)
    # An address needs no name resolution (HostnameEndpoint would still go through the
    # resolver's thread pool, which costs milliseconds per session).
    if isIPAddress(destination.host):
        return TCP4ClientEndpoint(reactor, destination.host, destination.port, timeout=connect_timeout)
    if isIPv6Address(destination.host):
        return TCP6ClientEndpoint(reactor, destination.host, destination.port, timeout=connect_timeout)
    return HostnameEndpoint(reactor, destination.host, destination.port, timeout=connect_timeout)
