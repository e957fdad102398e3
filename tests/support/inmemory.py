"""The gateway on in-memory transports and a Clock, for the unit tests of the session,
the warm pool and what sessions report: no sockets, no reactor.

    clock, gateway, upstreams = in_memory_gateway(parse_destination(plain("plain")))
    session, app = open_session(gateway, Route("plain"))
    upstreams.smtp_ready()              # the upstream greets and answers EHLO
    assert app.value().startswith(b"220 ")
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from mailgw.destination import Destination
from mailgw.service import Gateway, StaticSource
from mailgw.session import GatewaySession
from mailgw.settings import Route, Settings


class Transport(StringTransport):
    """A StringTransport that says whether it was closed."""

    disconnected = False

    def loseConnection(self):
        super().loseConnection()
        self.disconnected = True


class Upstreams:
    """An upstream endpoint whose every connect succeeds at once on a new
    :class:`Transport` (or fails while ``down``).  ``connections`` holds each
    ``(protocol, transport)``; ``protocol`` and ``transport`` are the last one's."""

    def __init__(self):
        self.connections: list[tuple[Any, Transport]] = []
        self.down = False

    def connect(self, factory):
        if self.down:
            return fail(ConnectionRefusedError())
        protocol, transport = factory.buildProtocol(None), Transport()
        protocol.makeConnection(transport)
        self.connections.append((protocol, transport))
        return succeed(protocol)

    @property
    def protocol(self):
        return self.connections[-1][0]

    @property
    def transport(self) -> Transport:
        return self.connections[-1][1]

    def smtp_ready(self, index: int = -1) -> Transport:
        """The SMTP upstream at ``index`` greets and answers EHLO (no AUTH, no STARTTLS):
        the session's login is done.  Its transport."""
        protocol, transport = self.connections[index]
        protocol.dataReceived(b"220 upstream ESMTP\r\n")
        assert transport.value() == b"EHLO mailgw\r\n"
        protocol.dataReceived(b"250-upstream\r\n250 PIPELINING\r\n")
        return transport


def in_memory_gateway(*destinations: Destination, settings: Settings = Settings(), clock: Clock | None = None,
                      **services: Any) -> tuple[Clock, Gateway, Upstreams]:
    """A Gateway serving ``destinations`` whose upstream connections are in memory;
    ``services`` (tokens, audit, ...) go to the Gateway."""
    clock = clock or Clock()
    gateway = Gateway(clock, settings, StaticSource({d.name: d for d in destinations}), **services)
    upstreams = Upstreams()
    gateway.upstream_endpoint = lambda destination, tenant: upstreams
    return clock, gateway, upstreams


def open_session(gateway: Gateway, route: Route, peer: Any = None) -> tuple[GatewaySession, Transport]:
    """An application connected to ``route`` (from ``peer``, an address; default
    StringTransport's IPv4 one): the session and the application's transport."""
    session = GatewaySession(route, gateway)
    app = Transport() if peer is None else Transport(peerAddress=peer)
    session.makeConnection(app)
    return session, app
