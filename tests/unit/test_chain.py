"""The endpoint chain's own TCP endpoint (AddressEndpoint): no sockets, a MemoryReactor."""

from __future__ import annotations

from twisted.internet import error
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock

from mailgw.endpoints.chain import AddressEndpoint


def test_cancelling_a_connect_fails_it_as_cancelled_and_stops_connecting():
    reactor = MemoryReactorClock()
    d = AddressEndpoint(reactor, "192.0.2.1", 25, 10).connect(Factory.forProtocol(Protocol))
    d.cancel()
    failures = []
    d.addErrback(failures.append)
    # What Twisted's own endpoints say, not the UserError stopConnecting reports.
    assert failures[0].check(error.ConnectingCancelledError)
    assert reactor.connectors[0].stoppedConnecting
