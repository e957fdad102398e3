"""SOCKS5ClientEndpoint glue: hand-over, failures, timeout and cancellation, no sockets."""

from __future__ import annotations

import struct

import pytest
from twisted.internet import defer, error
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.test import iosim

from mailgw.endpoints.socks5 import ProxyConnectError, ProxyConnectionLost, SOCKS5ClientEndpoint, SOCKSTimeoutError
from mailgw.protocol.socks5 import ConnectionNotAllowed, DomainNameTooLong, MalformedReply, NoAcceptableMethod
from mailgw.protocol.socks5 import SAPAuthRejected, SOCKSConfigurationError, SOCKSError, UserPassRejected
from support.socks import reply_codes

HOST = "imap.corp"
PORT = 143
CONNECT = b"\x05\x01\x00\x03\x09imap.corp\x00\x8f"
OK = b"\x05\x00\x00\x01\x7f\x00\x00\x01\x04\x38"
JWT = "header.payload.signature-secret"
PASSWORD = "pw-secret"


class App(Protocol):
    """Records what the application protocol sees, in order."""

    def __init__(self, events):
        self.events = events
        self.received = b""
        self.lost = None

    def connectionMade(self):
        self.events.append(("connectionMade", self.transport))

    def dataReceived(self, data):
        self.received += data
        self.events.append(("data", data))

    def connectionLost(self, reason):
        self.lost = reason
        self.events.append(("lost", reason.type))


class AppFactory(Factory):
    def __init__(self):
        self.events = []
        self.addrs = []

    def buildProtocol(self, addr):
        self.addrs.append(addr)
        return App(self.events)


class ProtoTransport(StringTransport):
    """A StringTransport that, like a TCP connection, dispatches to ``.protocol``."""

    def __init__(self):
        super().__init__()
        self.protocol = None

    def deliver(self, data):
        self.protocol.dataReceived(data)

    def lose(self, reason=error.ConnectionDone):
        self.protocol.connectionLost(Failure(reason()))


class Harness:
    """An endpoint over TCP4ClientEndpoint on a MemoryReactorClock."""

    def __init__(self, **kw):
        self.reactor = MemoryReactorClock()
        kw.setdefault("timeout", 10)
        self.endpoint = SOCKS5ClientEndpoint(
            TCP4ClientEndpoint(self.reactor, "127.0.0.1", 1080), HOST, PORT,
            reactor=self.reactor, **kw,
        )
        self.factory = AppFactory()
        self.d = self.endpoint.connect(self.factory)
        self.outcome = []
        self.d.addBoth(self._record)
        self.transport = None

    def _record(self, result):
        self.outcome.append(result)
        self.factory.events.append(("fired", None))
        return None

    def connect_proxy(self, transport=None):
        host, port, factory, _, _ = self.reactor.tcpClients[-1]
        assert (host, port) == ("127.0.0.1", 1080)
        proto = factory.buildProtocol(None)  # the endpoint's wrapping protocol
        self.transport = transport if transport is not None else ProtoTransport()
        self.transport.protocol = proto
        proto.makeConnection(self.transport)
        return self.transport

    def fail_proxy(self, exc):
        _, _, factory, _, _ = self.reactor.tcpClients[-1]
        factory.clientConnectionFailed(self.reactor.connectors[-1], Failure(exc))

    def take(self):
        data = self.transport.value()
        self.transport.clear()
        return data

    def result(self):
        assert len(self.outcome) == 1, self.outcome
        return self.outcome[0]

    def failure(self, cls):
        result = self.result()
        assert isinstance(result, Failure), result
        assert isinstance(result.value, cls), result.value
        return result.value


def handshake_none(h):
    h.connect_proxy()
    assert h.take() == b"\x05\x01\x00"
    h.transport.deliver(b"\x05\x00")
    assert h.take() == CONNECT


# --------------------------------------------------------------------- success


def test_success_hands_real_transport_and_leftover_to_app():
    h = Harness()
    handshake_none(h)
    assert h.outcome == []
    h.transport.deliver(OK + b"* OK ready\r\n")
    app = h.result()
    assert isinstance(app, App)
    # The application protocol sits directly on the real transport.
    assert app.transport is h.transport
    assert h.transport.protocol is app
    # Same order as a plain TCP endpoint: connectionMade, Deferred, then data.
    assert [e[0] for e in h.factory.events] == ["connectionMade", "fired", "data"]
    assert app.received == b"* OK ready\r\n"
    # Later bytes and the close go straight to the application.
    h.transport.deliver(b"more")
    h.transport.lose()
    assert app.received.endswith(b"more")
    assert app.lost.check(error.ConnectionDone)
    assert h.factory.addrs[0].hostname == b"imap.corp" and h.factory.addrs[0].port == PORT
    assert h.reactor.getDelayedCalls() == []  # timeout cancelled
    assert not h.transport.disconnecting


def test_success_without_leftover_delivers_no_data():
    h = Harness()
    handshake_none(h)
    h.transport.deliver(OK)
    assert [e[0] for e in h.factory.events] == ["connectionMade", "fired"]


def test_reply_split_byte_by_byte():
    h = Harness()
    handshake_none(h)
    for i in range(len(OK)):
        h.transport.deliver(OK[i : i + 1])
    assert isinstance(h.result(), App)


def test_userpass_success_bytes():
    h = Harness(method="userpass", username="bob", password=PASSWORD)
    h.connect_proxy()
    assert h.take() == b"\x05\x01\x02"
    h.transport.deliver(b"\x05\x02")
    assert h.take() == b"\x01\x03bob\x09" + PASSWORD.encode()
    h.transport.deliver(b"\x01\x00")
    assert h.take() == CONNECT
    h.transport.deliver(OK)
    assert isinstance(h.result(), App)


def test_sap_waits_for_jwt_then_sends_it():
    token = defer.Deferred()
    calls = []

    def provider():
        calls.append(1)
        return token

    h = Harness(method="sap", jwt_provider=provider, location_id="loc")
    assert calls == [1]  # called at connect time, in parallel with the TCP connect
    h.connect_proxy()
    assert h.take() == b""  # no greeting before the token is there
    token.callback(JWT)
    assert h.take() == b"\x05\x01\x80"
    h.transport.deliver(b"\x05\x80")
    assert h.take() == b"\x01" + struct.pack(">I", len(JWT)) + JWT.encode() + b"\x04bG9j"
    h.transport.deliver(b"\x01\x00")
    assert h.take() == CONNECT
    h.transport.deliver(OK + b"220 x\r\n")
    assert h.result().received == b"220 x\r\n"


def test_sap_token_already_available():
    h = Harness(method="sap", jwt_provider=lambda: defer.succeed(JWT))
    h.connect_proxy()
    assert h.take() == b"\x05\x01\x80"


def test_forwarding_when_transport_has_no_protocol_attribute():
    h = Harness()
    t = StringTransport()
    assert not hasattr(t, "protocol")
    # Drive the handshake protocol directly, as a transport without .protocol would.
    _, _, factory, _, _ = h.reactor.tcpClients[-1]
    wrapper = factory.buildProtocol(None)
    wrapper.makeConnection(t)
    wrapper.dataReceived(b"\x05\x00")
    wrapper.dataReceived(OK + b"a")
    app = h.result()
    wrapper.dataReceived(b"b")
    wrapper.connectionLost(Failure(error.ConnectionDone()))
    assert app.received == b"ab" and app.transport is t
    assert app.lost is not None


def test_iosim_round_trip_after_hand_over():
    """A scripted proxy over iosim: the app talks to the 'target' through the tunnel."""
    clock = Clock()

    class ScriptedProxy(Protocol):
        def __init__(self):
            self.buf = b""
            self.stage = 0
            self.after = b""

        def dataReceived(self, data):
            if self.stage == 2:
                self.after += data
                self.transport.write(b"echo:" + data)
                return
            self.buf += data
            if self.stage == 0 and self.buf == b"\x05\x01\x00":
                self.buf, self.stage = b"", 1
                self.transport.write(b"\x05\x00")
            elif self.stage == 1 and self.buf == CONNECT:
                self.buf, self.stage = b"", 2
                self.transport.write(OK + b"banner\r\n")

    server = ScriptedProxy()
    pumps = []

    class IOSimEndpoint:
        def connect(self, factory):
            proto = factory.buildProtocol(None)
            ct = iosim.FakeTransport(proto, isServer=False)
            st = iosim.FakeTransport(server, isServer=True)
            pumps.append(iosim.connect(server, st, proto, ct, greet=False, clock=clock))
            return defer.succeed(proto)

    ep = SOCKS5ClientEndpoint(IOSimEndpoint(), HOST, PORT, reactor=clock, timeout=5)
    d = ep.connect(AppFactory())
    pumps[0].flush()
    app = []
    d.addCallback(app.append)
    [app] = app
    assert app.received == b"banner\r\n"
    assert app.transport.protocol is app
    app.transport.write(b"hello")
    pumps[0].flush()
    assert server.after == b"hello"
    assert app.received == b"banner\r\necho:hello"
    assert clock.getDelayedCalls() == []


# --------------------------------------------------------------------- failures



@pytest.mark.parametrize("code, cls, text", reply_codes(f"{HOST}:{PORT}"))
def test_reply_codes_errback_typed_and_abort(code, cls, text):
    h = Harness()
    handshake_none(h)
    h.transport.deliver(bytes([0x05, code, 0x00, 0x01, 0, 0, 0, 0, 0, 0]))
    exc = h.failure(cls)
    assert exc.code == code and text.lower() in str(exc).lower()
    assert h.transport.disconnected
    assert h.factory.events == [("fired", None)]  # no app protocol was built
    assert h.reactor.getDelayedCalls() == []


def test_no_access_mapping_message():
    h = Harness()
    handshake_none(h)
    h.transport.deliver(b"\x05\x02")
    assert "no access mapping for imap.corp:143" in str(h.failure(ConnectionNotAllowed))


def test_no_acceptable_method():
    h = Harness()
    h.connect_proxy()
    h.transport.deliver(b"\x05\xff")
    h.failure(NoAcceptableMethod)
    assert h.transport.disconnected


def test_userpass_rejected_message_has_no_password():
    h = Harness(method="userpass", username="bob", password=PASSWORD)
    h.connect_proxy()
    h.transport.deliver(b"\x05\x02")
    h.transport.deliver(b"\x01\x01")
    assert PASSWORD not in str(h.failure(UserPassRejected))


def test_sap_rejected():
    h = Harness(method="sap", jwt_provider=lambda: defer.succeed(JWT))
    h.connect_proxy()
    h.transport.deliver(b"\x05\x80\x01\x01"[:2])
    h.transport.deliver(b"\x01\x01")
    assert JWT not in str(h.failure(SAPAuthRejected))


def test_jwt_provider_failure_is_passed_on_and_aborts():
    class TokenError(Exception):
        pass

    token = defer.Deferred()
    h = Harness(method="sap", jwt_provider=lambda: token)
    h.connect_proxy()
    token.errback(TokenError("token service said invalid_client"))
    h.failure(TokenError)
    assert h.transport.disconnected


def test_jwt_provider_raising_synchronously():
    def provider():
        raise RuntimeError("no credentials for the connectivity service")

    h = Harness(method="sap", jwt_provider=provider)
    h.failure(RuntimeError)
    assert h.reactor.tcpClients == []  # never even connected the proxy


def test_jwt_provider_empty_token():
    h = Harness(method="sap", jwt_provider=lambda: defer.succeed(""))
    h.failure(SOCKSConfigurationError)


def test_data_before_greeting_is_malformed():
    h = Harness(method="sap", jwt_provider=lambda: defer.Deferred())
    h.connect_proxy()
    h.transport.deliver(b"\x05\x00")
    h.failure(MalformedReply)


def test_proxy_closes_mid_handshake():
    h = Harness()
    handshake_none(h)
    h.transport.deliver(OK[:5])
    h.transport.lose()
    exc = h.failure(ProxyConnectionLost)
    assert isinstance(exc, error.ConnectionLost) and isinstance(exc, SOCKSError)
    assert "closed the connection during the handshake" in str(exc)
    assert "CONNECT reply" in str(exc)
    assert h.reactor.getDelayedCalls() == []


def test_proxy_unreachable():
    h = Harness()
    h.fail_proxy(error.ConnectionRefusedError("111: Connection refused"))
    exc = h.failure(ProxyConnectError)
    assert isinstance(exc, error.ConnectError)
    assert "cannot connect to the SOCKS5 proxy" in str(exc)
    assert "refused" in str(exc)
    assert isinstance(exc.reason, error.ConnectionRefusedError)


def test_build_protocol_returning_none():
    h = Harness()
    h.factory.buildProtocol = lambda addr: None
    handshake_none(h)
    h.transport.deliver(OK)
    h.failure(error.NoProtocol)
    assert h.transport.disconnected


# --------------------------------------------------------------------- timeout, cancel


def test_timeout_during_handshake():
    h = Harness(timeout=3)
    handshake_none(h)
    h.reactor.advance(2.9)
    assert h.outcome == []
    h.reactor.advance(0.2)
    exc = h.failure(SOCKSTimeoutError)
    assert isinstance(exc, defer.TimeoutError)
    assert "timed out after 3 s" in str(exc) and "CONNECT reply" in str(exc)
    assert h.transport.disconnected


def test_timeout_while_connecting_stops_connect():
    h = Harness(timeout=1)
    h.reactor.advance(1)
    assert "connecting to the proxy" in str(h.failure(SOCKSTimeoutError))
    assert h.reactor.connectors[-1].stoppedConnecting


def test_timeout_waiting_for_token_cancels_it():
    token = defer.Deferred()
    h = Harness(method="sap", jwt_provider=lambda: token, timeout=2)
    h.connect_proxy()
    h.reactor.advance(2)
    assert "token" in str(h.failure(SOCKSTimeoutError))
    assert token.called  # cancelled
    assert h.transport.disconnected


def test_late_data_after_timeout_is_ignored():
    h = Harness(timeout=1)
    handshake_none(h)
    h.reactor.advance(1)
    h.transport.deliver(OK)
    h.failure(SOCKSTimeoutError)


def test_cancel_during_handshake_aborts():
    h = Harness()
    handshake_none(h)
    h.d.cancel()
    h.failure(defer.CancelledError)
    assert h.transport.disconnected
    assert h.reactor.getDelayedCalls() == []
    h.transport.deliver(OK)  # nothing happens any more
    assert len(h.outcome) == 1


def test_cancel_while_connecting():
    h = Harness()
    h.d.cancel()
    h.failure(defer.CancelledError)
    assert h.reactor.connectors[-1].stoppedConnecting
    assert h.reactor.getDelayedCalls() == []


def test_cancel_while_waiting_for_token():
    token = defer.Deferred()
    h = Harness(method="sap", jwt_provider=lambda: token)
    h.connect_proxy()
    h.d.cancel()
    h.failure(defer.CancelledError)
    assert token.called
    assert h.transport.disconnected


def test_no_timeout():
    h = Harness(timeout=None)
    assert h.reactor.getDelayedCalls() == []
    handshake_none(h)
    h.transport.deliver(OK)
    assert isinstance(h.result(), App)


# --------------------------------------------------------------------- configuration


def test_configuration_errors_at_construction():
    ep = TCP4ClientEndpoint(MemoryReactorClock(), "127.0.0.1", 1080)
    with pytest.raises(SOCKSConfigurationError, match="jwt_provider"):
        SOCKS5ClientEndpoint(ep, HOST, PORT, method="sap")
    with pytest.raises(DomainNameTooLong):
        SOCKS5ClientEndpoint(ep, "x" * 300, PORT)
    with pytest.raises(SOCKSConfigurationError):
        SOCKS5ClientEndpoint(ep, HOST, PORT, method="userpass", username="u")


def test_repr_has_no_secrets():
    ep = SOCKS5ClientEndpoint(
        TCP4ClientEndpoint(MemoryReactorClock(), "127.0.0.1", 1080), HOST, PORT,
        method="userpass", username="u", password=PASSWORD,
    )
    assert PASSWORD not in repr(ep) and "imap.corp:143" in repr(ep)
