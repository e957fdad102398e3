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
    return tcp_endpoint(reactor, destination.host, destination.port, connect_timeout)


def tcp_endpoint(reactor, host: str, port: int, timeout: float) -> IStreamClientEndpoint:
    """A TCP client endpoint; addresses skip name resolution."""
    # HostnameEndpoint resolves even an address through the resolver's thread pool,
    # which costs milliseconds per session.
    if isIPAddress(host):
        return TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
    if isIPv6Address(host):
        return TCP6ClientEndpoint(reactor, host, port, timeout=timeout)
    return HostnameEndpoint(reactor, host, port, timeout=timeout)


def socks_proxy(reactor, proxy, *, connect_timeout: float, jwt_for_tenant=None) -> ProxyEndpointFactory:
    """The factory of SOCKS5 endpoints through the connectivity proxy ``proxy``
    (a :class:`mailgw.config.ProxyConfig`).  For ``sap`` authentication
    ``jwt_for_tenant(tenant)`` returns a Deferred JWT (a cached client-credentials token).
    """
    from .socks5 import SOCKS5ClientEndpoint

    def endpoint(destination: Destination, tenant: str | None) -> IStreamClientEndpoint:
        jwt_provider = None
        if proxy.authentication == "sap":
            jwt_provider = lambda: jwt_for_tenant(tenant)  # noqa: E731
        return SOCKS5ClientEndpoint(
            tcp_endpoint(reactor, proxy.host, proxy.port, connect_timeout),
            destination.host,
            destination.port,
            method=proxy.authentication,
            username=proxy.username,
            password=proxy.password,
            jwt_provider=jwt_provider,
            location_id=destination.location_id,
            timeout=connect_timeout,
            reactor=reactor,
        )

    return endpoint
