"""SOCKS5ClientEndpoint against real proxies: microsocks, Dante and the 0x80 test server.

The reactor runs in a background thread (started once, tolerated if already running);
tests are plain blocking code that call into it (``support.reactor.in_reactor``).  The
target is a small threaded STARTTLS line server (trustme certificates) so the tests can
prove: banner bytes right after the CONNECT reply, STARTTLS through the tunnel with
certificate verification reaching the real TCP transport, and the typed errors.
"""

from __future__ import annotations

import socket
import socketserver
import ssl
import threading
import time

import pytest
import realservers
from socks80 import SAPSocksServer
from support.reactor import in_reactor
from support.skips import require_or_skip
from support.socks import reply_codes
from twisted.internet import defer, task
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint
from twisted.internet.interfaces import IHandshakeListener, ISSLTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from zope.interface import implementer

from mailgw.endpoints.socks5 import ProxyConnectError, ProxyConnectionLost, SOCKS5ClientEndpoint, SOCKSTimeoutError
from mailgw.protocol.socks5 import ConnectionNotAllowed, ConnectionRefused, HostUnreachable, NoAcceptableMethod
from mailgw.protocol.socks5 import SAPAuthRejected, UserPassRejected


LOCAL = "127.0.0.1"
JWT = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJtYWlsZ3cifQ.sig-secret"
PROXY_USER, PROXY_PASSWORD = "gw", "proxy-pw-secret"
BANNER = b"220 banner ready\r\n"


def call(fn, *args):
    """``fn(*args)`` in the reactor thread; its (Deferred) result within 5 seconds."""
    return in_reactor(fn, *args, timeout=5.0)


# --------------------------------------------------------------------- the target


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    other_ca = trustme.CA()
    d = tmp_path_factory.mktemp("socks5-certs")
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    leaf.configure_cert(server_ctx)
    return {
        "server_ctx": server_ctx,
        "ca": Certificate.loadPEM(ca.cert_pem.bytes()),
        "other_ca": Certificate.loadPEM(other_ca.cert_pem.bytes()),
    }


def _readline(sock) -> bytes | None:
    line = b""
    while not line.endswith(b"\r\n"):
        c = sock.recv(1)
        if not c:
            return None
        line += c
        if len(line) > 1000:
            return None
    return line[:-2]


class _LineHandler(socketserver.BaseRequestHandler):
    """Banner, then ``STARTTLS`` (go-ahead + TLS), ``QUIT`` or echo of any line."""

    def handle(self):
        sock = self.request
        sock.settimeout(5)
        tls = False
        try:
            sock.sendall(BANNER)
            while (line := _readline(sock)) is not None:
                if line == b"STARTTLS":
                    sock.sendall(b"220 go ahead\r\n")
                    sock = self.server.ctx.wrap_socket(sock, server_side=True)
                    tls = True
                elif line == b"QUIT":
                    sock.sendall(b"221 bye\r\n")
                    return
                else:
                    sock.sendall(b"echo: " + line + (b" (tls)" if tls else b"") + b"\r\n")
        except (OSError, ssl.SSLError) as e:
            self.server.errors.append(e)


@pytest.fixture(scope="module")
def target(certs):
    server = socketserver.ThreadingTCPServer((LOCAL, 0), _LineHandler)
    server.daemon_threads = True
    server.block_on_close = False
    server.ctx = certs["server_ctx"]
    server.errors = []
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True)
    t.start()
    yield server
    server.shutdown()
    server.server_close()
    t.join(2)


@implementer(IHandshakeListener)
class LineClient(Protocol):
    """The 'application protocol': collects bytes, can wait for a marker."""

    def __init__(self, reactor):
        self.reactor = reactor
        self.buf = b""
        self.waiters: list[tuple[bytes, defer.Deferred]] = []
        self.handshake_done = False
        self.lost = defer.Deferred()
        self.chunks_in_connect_turn: list[bytes] = []
        self._in_connect_turn = False

    def connectionMade(self):
        # Data delivered in the same reactor turn as connectionMade can only be the
        # leftover the endpoint hands over; a later read comes in a later turn.
        self._in_connect_turn = True
        self.reactor.callLater(0, setattr, self, "_in_connect_turn", False)

    def dataReceived(self, data):
        if self._in_connect_turn:
            self.chunks_in_connect_turn.append(data)
        self.buf += data
        for marker, d in list(self.waiters):
            if marker in self.buf:
                self.waiters.remove((marker, d))
                d.callback(self.buf)

    def until(self, marker: bytes) -> defer.Deferred:
        if marker in self.buf:
            return defer.succeed(self.buf)
        d = defer.Deferred()
        self.waiters.append((marker, d))
        return d

    def send_and_wait(self, line: bytes, marker: bytes) -> defer.Deferred:
        self.transport.write(line + b"\r\n")
        return self.until(marker)

    def handshakeCompleted(self):
        self.handshake_done = True

    def connectionLost(self, reason):
        for _, d in self.waiters:
            d.errback(reason)
        self.waiters = []
        self.lost_reason = reason
        self.lost.callback(None)  # a Failure here would turn into an errback


class LineClientFactory(Factory):
    def __init__(self, reactor):
        self.reactor = reactor

    def buildProtocol(self, addr):
        return LineClient(self.reactor)


def open_tunnel(reactor, endpoint) -> LineClient:
    return call(endpoint.connect, LineClientFactory(reactor))


def close(reactor, client: LineClient) -> None:
    if not client.lost.called:
        call(lambda: (client.transport.loseConnection(), client.lost)[1])


def starttls_round_trip(reactor, client: LineClient, trust_root) -> bytes:
    call(client.until, BANNER)
    call(client.send_and_wait, b"STARTTLS", b"220 go ahead\r\n")

    def start_tls():
        client.transport.startTLS(optionsForClientTLS("localhost", trustRoot=trust_root))
        return client.send_and_wait(b"PING", b"echo: PING (tls)\r\n")

    return call(start_tls)


def endpoint(reactor, proxy_port, host, port, **kw):
    kw.setdefault("timeout", 5)
    return SOCKS5ClientEndpoint(TCP4ClientEndpoint(reactor, LOCAL, proxy_port), host, port,
                                reactor=reactor, **kw)


def closed_port() -> int:
    return realservers.free_port()


# --------------------------------------------------------------------- proxies


@pytest.fixture(scope="module")
def microsocks_auth():
    require_or_skip(realservers.Microsocks.TOOLS)
    with realservers.Microsocks(user=PROXY_USER, password=PROXY_PASSWORD) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def blocked_port():
    """A port Dante's ruleset refuses (reply 0x02)."""
    return realservers.free_port()


@pytest.fixture(scope="module")
def dante(tmp_path_factory, blocked_port):
    require_or_skip(realservers.Dante.TOOLS)
    with realservers.Dante(tmp_path_factory.mktemp("dante"), blocked_ports=(blocked_port,)) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def sap_proxy():
    with SAPSocksServer(expected_jwt=JWT) as server:
        yield server


@pytest.fixture
def sap(sap_proxy):
    sap_proxy.configure(expected_jwt=JWT)
    yield sap_proxy
    sap_proxy.configure(expected_jwt=JWT)


@pytest.fixture
def silent_listener():
    """Accepts TCP (through the backlog) and never says a word."""
    s = socket.socket()
    s.bind((LOCAL, 0))
    s.listen(8)
    yield s.getsockname()[1]
    s.close()


# --------------------------------------------------------------------- microsocks


def test_microsocks_plain_tunnel(reactor, microsocks, target):
    client = open_tunnel(reactor, endpoint(reactor, microsocks.port, LOCAL, target.server_address[1]))
    call(client.until, BANNER)
    assert call(client.send_and_wait, b"HELLO", b"echo: HELLO\r\n").startswith(BANNER)
    close(reactor, client)


def test_microsocks_starttls_through_tunnel_verifies_certificate(reactor, microsocks, target,
                                                                  certs):
    client = open_tunnel(reactor, endpoint(reactor, microsocks.port, LOCAL, target.server_address[1]))
    starttls_round_trip(reactor, client, certs["ca"])
    # startTLS reached the real TCP transport, and the handshake callback the app.
    assert client.handshake_done
    assert ISSLTransport.providedBy(client.transport)
    assert client.transport.getPeerCertificate() is not None
    close(reactor, client)


def test_starttls_through_tunnel_rejects_untrusted_certificate(reactor, microsocks, target,
                                                               certs):
    client = open_tunnel(reactor, endpoint(reactor, microsocks.port, LOCAL, target.server_address[1]))
    with pytest.raises(Exception) as exc:
        starttls_round_trip(reactor, client, certs["other_ca"])
    assert "certificate verify failed" in str(exc.value) or "SSL" in repr(exc.value)
    assert not client.handshake_done


def test_microsocks_target_refused(reactor, microsocks):
    with pytest.raises(ConnectionRefused, match="127.0.0.1:"):
        open_tunnel(reactor, endpoint(reactor, microsocks.port, LOCAL, closed_port()))


def test_microsocks_userpass(reactor, microsocks_auth, target):
    ep = endpoint(reactor, microsocks_auth.port, LOCAL, target.server_address[1],
                  method="userpass", username=PROXY_USER, password=PROXY_PASSWORD)
    client = open_tunnel(reactor, ep)
    call(client.until, BANNER)
    close(reactor, client)


def test_microsocks_wrong_password(reactor, microsocks_auth, target):
    ep = endpoint(reactor, microsocks_auth.port, LOCAL, target.server_address[1],
                  method="userpass", username=PROXY_USER, password="wrong-secret")
    with pytest.raises(UserPassRejected) as exc:
        open_tunnel(reactor, ep)
    assert "wrong-secret" not in str(exc.value) and PROXY_USER in str(exc.value)


def test_no_acceptable_method_against_auth_proxy(reactor, microsocks_auth, target):
    with pytest.raises(NoAcceptableMethod):
        open_tunnel(reactor, endpoint(reactor, microsocks_auth.port, LOCAL, target.server_address[1]))


# --------------------------------------------------------------------- Dante


def test_dante_starttls_through_tunnel(reactor, dante, target, certs):
    # HostnameEndpoint (what the chain uses) wraps the protocol twice; the hand-over
    # must still put the app protocol right on the TCP transport.
    ep = SOCKS5ClientEndpoint(HostnameEndpoint(reactor, LOCAL, dante.port), LOCAL,
                              target.server_address[1], timeout=5, reactor=reactor)
    client = open_tunnel(reactor, ep)
    assert client.transport.protocol is client
    starttls_round_trip(reactor, client, certs["ca"])
    assert client.handshake_done
    close(reactor, client)


def test_dante_ruleset_block_is_no_access_mapping(reactor, dante, blocked_port):
    with pytest.raises(ConnectionNotAllowed, match="no access mapping for 127.0.0.1:"):
        open_tunnel(reactor, endpoint(reactor, dante.port, LOCAL, blocked_port))


def test_dante_unresolvable_host(reactor, dante):
    with pytest.raises(HostUnreachable, match="nonexistent.invalid:25"):
        open_tunnel(reactor, endpoint(reactor, dante.port, "nonexistent.invalid", 25))


def test_dante_target_refused(reactor, dante):
    with pytest.raises(ConnectionRefused):
        open_tunnel(reactor, endpoint(reactor, dante.port, LOCAL, closed_port()))


# --------------------------------------------------------------------- proxy failures


def test_proxy_down(reactor):
    with pytest.raises(ProxyConnectError, match="cannot connect to the SOCKS5 proxy.*refused"):
        open_tunnel(reactor, endpoint(reactor, closed_port(), "mail.corp", 25))


def test_stalling_proxy_times_out(reactor, silent_listener):
    t0 = time.monotonic()
    with pytest.raises(SOCKSTimeoutError, match="timed out after 0.4 s.*method selection"):
        open_tunnel(reactor, endpoint(reactor, silent_listener, "mail.corp", 25, timeout=0.4))
    assert time.monotonic() - t0 < 3


# --------------------------------------------------------------------- method 0x80


def test_sap_success_records_jwt_and_location_and_hands_banner_over(reactor, sap, target,
                                                                     certs):
    sap.configure(coalesce=2.0)  # reply and banner leave the proxy in one send()
    n = len(sap.sessions)

    def provider():  # like the OAuth client: the token arrives a little later
        return task.deferLater(reactor, 0.05, lambda: JWT)

    ep = endpoint(reactor, sap.port, "localhost", target.server_address[1], method="sap",
                  jwt_provider=provider, location_id="Walldorf-1")
    client = open_tunnel(reactor, ep)
    session = sap.sessions[n]
    assert (session.jwt, session.jwt_valid, session.location_id) == (JWT, True, "Walldorf-1")
    assert session.methods == b"\x80" and session.atyp == 0x03
    assert (session.target_host, session.target_port) == ("localhost", target.server_address[1])
    assert session.error is None
    # The banner came with the CONNECT reply and was handed over at once.
    call(client.until, BANNER)
    assert client.chunks_in_connect_turn == [BANNER]
    starttls_round_trip(reactor, client, certs["ca"])
    assert client.handshake_done
    close(reactor, client)


def test_sap_without_location_id(reactor, sap, target):
    n = len(sap.sessions)
    ep = endpoint(reactor, sap.port, "localhost", target.server_address[1], method="sap",
                  jwt_provider=lambda: defer.succeed(JWT))
    client = open_tunnel(reactor, ep)
    assert sap.sessions[n].location_id is None and sap.sessions[n].jwt_valid
    call(client.until, BANNER)
    close(reactor, client)


def test_sap_wrong_jwt(reactor, sap, target):
    sap.configure(expected_jwt="another-token")
    ep = endpoint(reactor, sap.port, "localhost", target.server_address[1], method="sap",
                  jwt_provider=lambda: defer.succeed(JWT))
    with pytest.raises(SAPAuthRejected) as exc:
        open_tunnel(reactor, ep)
    assert JWT not in str(exc.value)
    assert sap.sessions[-1].jwt_valid is False


@pytest.mark.parametrize("code, cls, text", reply_codes("onprem.corp:993"))
def test_sap_reply_codes(reactor, sap, code, cls, text):
    sap.configure(reply=code)
    ep = endpoint(reactor, sap.port, "onprem.corp", 993, method="sap",
                  jwt_provider=lambda: defer.succeed(JWT), location_id="loc")
    with pytest.raises(cls) as exc:
        open_tunnel(reactor, ep)
    assert text.lower() in str(exc.value).lower()
    assert sap.sessions[-1].reply == code


def test_sap_unknown_host_is_host_unreachable(reactor, sap):
    ep = endpoint(reactor, sap.port, "not-local.corp", 25, method="sap",
                  jwt_provider=lambda: defer.succeed(JWT))
    with pytest.raises(HostUnreachable):
        open_tunnel(reactor, ep)


def test_sap_proxy_closes_during_auth(reactor, sap):
    sap.configure(close="auth")
    ep = endpoint(reactor, sap.port, "localhost", 25, method="sap",
                  jwt_provider=lambda: defer.succeed(JWT))
    with pytest.raises(ProxyConnectionLost, match="during the handshake.*authentication reply"):
        open_tunnel(reactor, ep)


def test_sap_proxy_stalls_at_connect(reactor, sap):
    sap.configure(stall="connect")
    ep = endpoint(reactor, sap.port, "localhost", 25, method="sap",
                  jwt_provider=lambda: defer.succeed(JWT), timeout=0.4)
    with pytest.raises(SOCKSTimeoutError, match="CONNECT reply"):
        open_tunnel(reactor, ep)
    # The endpoint aborted the connection, so the stalled handler finished.
    assert sap.sessions[-1].done.wait(2)
