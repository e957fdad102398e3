"""The upstream endpoint chain: TCP, then SOCKS5 for on-premise destinations.

TLS is not an endpoint layer here: the session starts it on the transport it gets
(right away for implicit TLS, after the go-ahead for STARTTLS), see ``endpoints.tls``.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet import error
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import ClientFactory
from zope.interface import implementer

from ..destination import Destination
from ..errors import GatewayError
from ..protocol.refusal import Reason

ProxyEndpointFactory = Callable[[Destination, "str | None"], IStreamClientEndpoint]


class ConfigurationError(GatewayError, ValueError):
    """The gateway's configuration cannot serve a destination (e.g. no proxy for
    OnPremise): a session that needs it is refused under ``connect``, with this message."""

    def __init__(self, message: str):
        super().__init__(message, permanent=True, reason=Reason.CONNECT)


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
    if isIPAddress(host) or isIPv6Address(host):
        return AddressEndpoint(reactor, host, port, timeout)
    return HostnameEndpoint(reactor, host, port, timeout=timeout)


@implementer(IStreamClientEndpoint)
class AddressEndpoint:
    """A TCP client endpoint for an IP address whose protocol is the factory's own.

    Twisted's TCP4ClientEndpoint puts a wrapping protocol between the transport and the
    factory's protocol so that its Deferred can fire on ``connectionMade``; every byte
    then takes one more Python call.  Here the Deferred fires right after the
    protocol's ``makeConnection`` (as the endpoint contract wants: connected, transport
    set) and the transport talks to the protocol directly.  Cancelling it stops
    connecting.
    """

    def __init__(self, reactor, host: str, port: int, timeout: float):
        self.reactor = reactor
        self.host = host
        self.port = port
        self.timeout = timeout

    def connect(self, protocol_factory) -> Deferred:
        connector = None

        def cancel(done: Deferred) -> None:
            # As Twisted's own endpoints do: fail first, so that stopConnecting's
            # UserError (which reaches clientConnectionFailed) finds it settled.
            done.errback(error.ConnectingCancelledError(connector.getDestination()))
            connector.stopConnecting()

        done = Deferred(cancel)
        # (connectTCP takes IPv4 and IPv6 address literals alike)
        connector = self.reactor.connectTCP(self.host, self.port, _Direct(protocol_factory, done), timeout=self.timeout)
        return done


class _Direct(ClientFactory):
    """Hands the connection to the wrapped factory's own protocol."""

    noisy = False

    def __init__(self, wrapped, done: Deferred):
        self.wrapped = wrapped
        self.done = done

    def buildProtocol(self, addr):
        protocol = self.wrapped.buildProtocol(addr)
        if protocol is None:
            return None
        done = self.done

        def made(transport):
            # Only for the first call: then the protocol is its own again.
            del protocol.makeConnection
            protocol.makeConnection(transport)
            if not done.called:
                done.callback(protocol)

        protocol.makeConnection = made
        return protocol

    def clientConnectionFailed(self, connector, reason):
        if not self.done.called:
            self.done.errback(reason)


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
