"""Both relays on real loopback sockets: what ``make_relay`` returns must behave the same.

A small Twisted listener plays the gateway: it connects each accepted connection to an
upstream socket the test holds and hands both transports to ``make_relay``, as the
session does at release.  The test thread plays the application and the upstream with
blocking sockets.  Every test runs with the splice relay and with the Twisted relay
(``MAILGW_SPLICE=0``'s switch); timers run on a Clock where a test needs them.  No
assertion depends on wall-clock time: waits have generous caps only so that a broken
relay fails instead of hanging.
"""

from __future__ import annotations

import hashlib
import imaplib
import os
import resource
import select
import socket
import threading
import uuid

import pytest
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IReactorFDSet, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from zope.interface import implementer

import realservers
from gatewayharness import LogCapture
from support.reactor import in_reactor
from mailgw import splice
from mailgw.relay import Relay, make_relay
from mailgw.splice import SpliceRelay

MiB = 1 << 20
WAIT = 30  # seconds: only a cap for a broken relay


@implementer(IReactorFDSet, IReactorTime)
class ClockedReactor:
    """The running reactor for descriptors, a Clock for timers."""

    def __init__(self, clock: Clock):
        self.clock = clock

    def __getattr__(self, name):
        return getattr(reactor, name)

    def callLater(self, *args, **kwargs):
        return self.clock.callLater(*args, **kwargs)

    def seconds(self):
        return self.clock.seconds()


class _Upstream(Protocol):
    def __init__(self, pair):
        self.pair = pair

    def dataReceived(self, data):
        self.pair.relay.from_upstream(data)

    def connectionLost(self, reason=None):
        self.pair.lost_upstream.callback(None)
        self.pair.relay.close()


class _App(Protocol):
    """The application leg: like the session, keeps early bytes as the leftover."""

    def __init__(self, harness):
        self.harness = harness
        self.relay = None
        self.early = bytearray()
        self.lost_app = defer.Deferred()
        self.lost_upstream = defer.Deferred()
        self.upstream_transport = None

    def connectionMade(self):
        h = self.harness
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", h.upstream_port)
        d = endpoint.connect(Factory.forProtocol(lambda: _Upstream(self)))
        d.addCallback(self._connected)

    def _connected(self, upstream):
        h = self.harness
        self.upstream_transport = upstream.transport
        self.relay = make_relay(
            h.reactor, self.transport, upstream.transport, idle_timeout=h.idle_timeout, sid="t",
            leftover=h.leftover + bytes(self.early), pending=h.pending,
        )
        h.pairs.append(self)
        h.ready.release()

    def dataReceived(self, data):
        if self.relay is None:
            self.early += data
        else:
            self.relay.from_app(data)

    def connectionLost(self, reason=None):
        self.lost_app.callback(None)
        if self.relay is not None:
            self.relay.close()


class Harness:
    """Listens on ``port``; each connection is relayed to the test's upstream socket."""

    def __init__(self, reactor_=None, idle_timeout=3600.0, leftover=b"", pending=b""):
        self.reactor = reactor_ or reactor
        self.idle_timeout = idle_timeout
        self.leftover = leftover
        self.pending = pending
        self.pairs: list[_App] = []
        self.ready = threading.Semaphore(0)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.upstream_port = self.server.getsockname()[1]
        self.listener = in_reactor(
            lambda: reactor.listenTCP(0, Factory.forProtocol(lambda: _App(self)), interface="127.0.0.1")
        )
        self.port = self.listener.getHost().port

    def connect(self):
        """(application socket, upstream socket, the pair's _App) for one new relayed connection."""
        app = socket.create_connection(("127.0.0.1", self.port))
        self.server.settimeout(WAIT)
        upstream, _ = self.server.accept()
        assert self.ready.acquire(timeout=WAIT), "the relay was never made"
        for s in (app, upstream):
            s.settimeout(WAIT)
        return app, upstream, self.pairs[-1]

    def close(self):
        in_reactor(self.listener.stopListening)
        self.server.close()


@pytest.fixture(autouse=True)
def no_logged_failures():
    """An exception in a relay's reactor callbacks is only logged: make it fail the test."""
    with LogCapture() as logs:
        yield
    failures = [e["log_failure"].getTraceback() for e in logs.events if e.get("log_failure") is not None]
    assert not failures, failures[0]


@pytest.fixture(params=["splice", "twisted"])
def kind(request, monkeypatch, reactor):
    """Which relay make_relay must pick: the test runs with each."""
    if request.param == "twisted":
        monkeypatch.setattr(splice, "ENABLED", False)
    return request.param


@pytest.fixture
def harness_factory(reactor):
    made = []

    def make(**kwargs):
        h = Harness(**kwargs)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


def expected_type(kind):
    return SpliceRelay if kind == "splice" else Relay


def recv_all(sock, limit=None) -> bytes:
    """Read until EOF (or ``limit`` bytes)."""
    chunks, total = [], 0
    while limit is None or total < limit:
        chunk = sock.recv(min(1 << 20, (limit - total) if limit else 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def sender(sock, data, shut=True):
    def run():
        try:
            sock.sendall(data)
            if shut:
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def wait_lost(pair):
    in_reactor(lambda: defer.gatherResults([pair.lost_app, pair.lost_upstream]))


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def stall(sock, data) -> int:
    """Send ``data`` without blocking until the peer stops taking it; return bytes sent."""
    sock.setblocking(False)
    sent = 0
    try:
        while sent < len(data):
            try:
                sent += sock.send(data[sent:sent + MiB])
            except BlockingIOError:
                # Stalled once nothing drains for a while: the relay stopped reading.
                _, writable, _ = select.select([], [sock], [], 0.5)
                if not writable:
                    return sent
    finally:
        sock.setblocking(True)
        sock.settimeout(WAIT)
    return sent


# ------------------------------------------------------------------------------------


def test_large_transfer_both_directions_byte_for_byte(kind, harness_factory):
    h = harness_factory()
    app, upstream, pair = h.connect()
    assert type(pair.relay) is expected_type(kind)
    to_up, to_app = os.urandom(50 * MiB), os.urandom(50 * MiB)
    # Both directions at once; neither side half-closes (an end of file closes both legs).
    threads = [sender(app, to_up, shut=False), sender(upstream, to_app, shut=False)]
    got = {}
    reader = threading.Thread(target=lambda: got.setdefault("up", recv_all(upstream, len(to_up))), daemon=True)
    reader.start()
    got["app"] = recv_all(app, len(to_app))
    reader.join(WAIT)
    for t in threads:
        t.join(WAIT)
    assert hashlib.sha256(got["up"]).digest() == hashlib.sha256(to_up).digest()
    assert hashlib.sha256(got["app"]).digest() == hashlib.sha256(to_app).digest()
    app.close()
    assert recv_all(upstream) == b""
    wait_lost(pair)
    assert pair.relay.bytes_to_upstream == len(to_up)
    assert pair.relay.bytes_to_app == len(to_app)


def test_pending_and_leftover_go_first_and_are_counted(kind, harness_factory):
    # 8 MiB of pending bytes cannot all be written at once: they sit in Twisted's
    # buffer, and the upstream's first bytes must still come after them.
    pending = os.urandom(8 * MiB)
    h = harness_factory(pending=pending, leftover=b"A2 FETCH 1 BODY[]\r\n")
    app, upstream, pair = h.connect()
    assert upstream.recv(100) == b"A2 FETCH 1 BODY[]\r\n"
    upstream.sendall(b"after the pending bytes")
    app.sendall(b"after the leftover")
    assert recv_all(upstream, len(b"after the leftover")) == b"after the leftover"
    got = recv_all(app, len(pending) + len(b"after the pending bytes"))
    assert got == pending + b"after the pending bytes"
    app.close()
    wait_lost(pair)
    assert pair.relay.bytes_to_upstream == len(b"A2 FETCH 1 BODY[]\r\nafter the leftover")
    assert pair.relay.bytes_to_app == len(pending) + len(b"after the pending bytes")


def test_slow_reader_keeps_memory_bounded(kind, harness_factory):
    h = harness_factory()
    app, upstream, pair = h.connect()
    data = os.urandom(96 * MiB)
    before = rss()
    sent = stall(upstream, data)
    # The application reads nothing: the sender is stopped once the kernel's socket
    # buffers (autotuned up to tcp_rmem/tcp_wmem's maxima, 32 + 4 MiB here) and the
    # relay's own buffer are full ...
    assert sent < len(data)
    # ... and the gateway process did not buffer what it could not deliver.
    assert rss() - before < 16 * MiB
    if kind == "splice":
        assert pair.relay.buffered <= pair.relay._to_app.capacity + pair.relay._to_up.capacity
    # Everything still arrives, in order, once the application reads.
    rest = sender(upstream, data[sent:])
    assert hashlib.sha256(recv_all(app, len(data))).digest() == hashlib.sha256(data).digest()
    rest.join(WAIT)


@pytest.mark.parametrize("side", ["app", "upstream"])
def test_half_close_delivers_what_was_sent_then_closes_both(kind, harness_factory, side):
    h = harness_factory()
    app, upstream, pair = h.connect()
    closer, other = (app, upstream) if side == "app" else (upstream, app)
    data = os.urandom(3 * MiB)
    closer.sendall(data)
    closer.shutdown(socket.SHUT_WR)
    assert recv_all(other) == data  # everything, then end of file
    assert recv_all(closer) == b""  # the closer's leg is closed too
    wait_lost(pair)
    assert pair.relay.closing


def test_idle_timeout_closes_both_legs_and_traffic_resets_it(kind, harness_factory):
    clock = Clock()
    h = harness_factory(reactor_=ClockedReactor(clock), idle_timeout=100)
    app, upstream, pair = h.connect()
    assert type(pair.relay) is expected_type(kind)
    in_reactor(clock.advance, 90)
    app.sendall(b"ping")
    assert upstream.recv(4) == b"ping"
    in_reactor(clock.advance, 90)
    upstream.sendall(b"pong")  # still open: 90 s since the last traffic
    assert app.recv(4) == b"pong"
    in_reactor(clock.advance, 90)
    assert not pair.relay.closing
    in_reactor(clock.advance, 11)
    assert pair.relay.closing
    assert recv_all(app) == b"" and recv_all(upstream) == b""
    wait_lost(pair)


def test_close_during_transfer_delivers_a_prefix_then_closes(kind, harness_factory):
    h = harness_factory()
    app, upstream, pair = h.connect()
    data = os.urandom(64 * MiB)
    sent = stall(upstream, data)
    first = recv_all(app, MiB)
    in_reactor(pair.relay.close)
    sender(upstream, data[sent:])  # the upstream keeps sending into a closing relay
    got = first + recv_all(app)
    assert 0 < len(got) < len(data)
    assert got == data[:len(got)]
    wait_lost(pair)


def test_drain_goodbye_comes_after_the_relayed_bytes(kind, harness_factory):
    """The session's shutdown(): goodbye written to the app transport, then close()."""
    h = harness_factory()
    app, upstream, pair = h.connect()
    data = os.urandom(64 * MiB)
    stall(upstream, data)  # the pipe and the socket buffers are full

    def shutdown():
        pair.transport.write(b"* BYE mailgw: shutting down\r\n")
        pair.relay.close()

    in_reactor(shutdown)
    got = recv_all(app)
    assert got.endswith(b"* BYE mailgw: shutting down\r\n")
    body = got[: -len(b"* BYE mailgw: shutting down\r\n")]
    assert body == data[: len(body)]
    assert recv_all(upstream) == b""
    wait_lost(pair)


def test_application_reset_while_the_pending_bytes_are_flushed(kind, harness_factory):
    # The application never reads its 8 MiB of pending bytes and resets: the relay is
    # still waiting for Twisted's buffer to empty when the leg is lost.
    h = harness_factory(pending=os.urandom(8 * MiB))
    app, upstream, pair = h.connect()
    upstream.sendall(b"queued behind the pending bytes")
    app.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    app.close()  # RST
    assert recv_all(upstream) == b""
    wait_lost(pair)
    assert pair.relay.closing


def test_upstream_reset_closes_the_application_leg(kind, harness_factory):
    h = harness_factory()
    app, upstream, pair = h.connect()
    app.sendall(b"x" * 1000)
    assert recv_all(upstream, 1000) == b"x" * 1000
    upstream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    upstream.close()  # RST
    assert recv_all(app) == b""
    wait_lost(pair)


def test_no_os_splice_falls_back_to_the_twisted_relay(monkeypatch, harness_factory):
    monkeypatch.delattr(os, "splice")
    h = harness_factory()
    app, upstream, pair = h.connect()
    assert type(pair.relay) is Relay
    app.sendall(b"still relayed")
    assert recv_all(upstream, 13) == b"still relayed"


def test_out_of_descriptors_falls_back_to_the_twisted_relay(monkeypatch, harness_factory):
    def no_pipes(flags):
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(os, "pipe2", no_pipes)
    h = harness_factory()
    app, upstream, pair = h.connect()
    assert type(pair.relay) is Relay
    upstream.sendall(b"still relayed")
    assert recv_all(app, 13) == b"still relayed"


def test_a_tls_leg_gets_the_twisted_relay(reactor):
    from twisted.internet import ssl

    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    class Hold(Protocol):
        pass

    def connect():
        e = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        return defer.gatherResults([e.connect(Factory.forProtocol(Hold)), e.connect(Factory.forProtocol(Hold))])

    plain, tls = in_reactor(connect)
    peers = [server.accept()[0], server.accept()[0]]

    def check():
        from mailgw.splice import splice_unusable

        assert splice_unusable(reactor, plain.transport) is None
        tls.transport.startTLS(ssl.optionsForClientTLS("localhost"))
        assert splice_unusable(reactor, tls.transport) == "the leg is TLS"
        relay = make_relay(reactor, tls.transport, plain.transport, idle_timeout=60, sid="t")
        assert type(relay) is Relay
        relay.close()

    in_reactor(check)
    for s in [*peers, server]:
        s.close()


def test_many_sessions_release_their_descriptors(harness_factory, kind):
    h = harness_factory()
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        app, upstream, pair = h.connect()
        app.sendall(b"hello")
        assert recv_all(upstream, 5) == b"hello"
        app.close()
        assert recv_all(upstream) == b""
        upstream.close()
        wait_lost(pair)
    assert len(os.listdir("/proc/self/fd")) <= before + 2


def test_from_app_while_splicing_comes_after_what_was_relayed(kind, harness_factory):
    h = harness_factory()
    app, upstream, pair = h.connect()
    app.sendall(b"first ")
    assert recv_all(upstream, 6) == b"first "
    in_reactor(pair.relay.from_app, b"injected ")
    app.sendall(b"last")
    assert recv_all(upstream, 13) == b"injected last"
    # Read in the reactor thread: the peer can have the bytes before the count is updated.
    assert in_reactor(lambda: pair.relay.bytes_to_upstream) == 19


# -- through the session: release, FETCH, the drain's goodbye ---------------------------


@pytest.fixture
def plain_imap_gateway(dovecot, gateway_factory):
    def dest(name):
        return {
            "Name": name, "Type": "MAIL", "ProxyType": "Internet", "Authentication": "BasicAuthentication",
            "mail.transport.protocol": "imap4", "mail.imap4.host": "127.0.0.1",
            "mail.imap4.port": str(dovecot.imap_port), "mail.imap4.starttls.enable": "false",
            "mail.user": "alice", "mail.password": realservers.DEFAULT_USERS["alice"],
        }

    return gateway_factory({"destinations": [dest("plain-imap")]})


def _sessions(running):
    return in_reactor(lambda: list(running.gateway.sessions))


def test_session_fetch_through_the_splice_relay_byte_for_byte(dovecot, plain_imap_gateway):
    mailbox = f"big-{uuid.uuid4().hex}"
    body = b"".join(b"%08d " % i + os.urandom(30).hex().encode() + b"\r\n" for i in range(80_000))
    dovecot.seed("alice", b"Subject: big\r\n\r\n" + body, mailbox=mailbox)
    direct = imaplib.IMAP4("127.0.0.1", dovecot.imap_port)
    direct.login("alice", realservers.DEFAULT_USERS["alice"])
    assert direct.select(mailbox)[0] == "OK"
    expected = direct.fetch("1", "(BODY.PEEK[])")[1][0][1]
    direct.logout()
    client = imaplib.IMAP4(*plain_imap_gateway.address())
    client.login("anything", "at all")  # answered by the gateway
    assert client.select(mailbox)[0] == "OK"  # releases the session
    (session,) = _sessions(plain_imap_gateway)
    assert type(session.relay) is SpliceRelay
    assert client.fetch("1", "(BODY.PEEK[])")[1][0][1] == expected
    client.logout()
    relay = session.relay
    in_reactor(lambda: session.closed)
    assert relay.bytes_to_app > len(expected) and relay.bytes_to_upstream > 0


def test_session_shutdown_while_splicing_sends_the_goodbye_then_closes(plain_imap_gateway):
    client = socket.create_connection(plain_imap_gateway.address(), timeout=WAIT)
    f = client.makefile("rb")
    assert f.readline().startswith(b"* OK")
    client.sendall(b"a1 SELECT INBOX\r\n")
    while not f.readline().startswith(b"a1 "):
        pass
    (session,) = _sessions(plain_imap_gateway)
    assert type(session.relay) is SpliceRelay
    in_reactor(session.shutdown, "the gateway is shutting down")
    rest = f.read()  # up to end of file
    assert rest.startswith(b"* BYE") and b"the gateway is shutting down" in rest
    in_reactor(lambda: session.closed)
