"""The Twisted relay's wiring (producers, idle timeout, closing, TLS abort grace) and
``make_relay``'s choice; the splice relay runs on real sockets in
tests/integration/test_relay_sockets.py."""

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from mailgw.relaycore import CLOSE_GRACE, close_with_grace
from mailgw.relay import Relay, make_relay


class Transport(StringTransport):
    """A StringTransport that records pause/resume/abort like a real one would see them."""

    disconnected = False

    def __init__(self):
        super().__init__()
        self.aborted = False
        self.unregistered_before_close = None

    def abortConnection(self):
        self.aborted = True
        self.disconnected = True

    def loseConnection(self):
        self.unregistered_before_close = self.producer is None
        super().loseConnection()


def make(idle=60.0):
    clock, app, up = Clock(), Transport(), Transport()
    relay = Relay(clock, app, up, idle_timeout=idle, sid="t")
    return clock, app, up, relay


def test_each_leg_is_the_streaming_producer_of_the_other():
    _, app, up, _ = make()
    # A full write buffer on one leg pauses reading on the other (Twisted's backpressure).
    assert app.producer is up and app.streaming
    assert up.producer is app and up.streaming


def test_bytes_flow_both_ways_untouched():
    _, app, up, relay = make()
    relay.from_app(b"A1 SELECT INBOX\r\n")
    relay.from_upstream(b"* 3 EXISTS\r\n")
    assert up.value() == b"A1 SELECT INBOX\r\n" and app.value() == b"* 3 EXISTS\r\n"


def test_idle_timeout_closes_both_legs_and_traffic_resets_it():
    clock, app, up, relay = make(idle=100)
    clock.advance(90)
    relay.from_upstream(b"x")
    clock.advance(90)
    assert not app.disconnecting
    clock.advance(11)
    assert app.disconnecting and up.disconnecting


def test_close_unregisters_producers_first_and_resumes_paused_legs():
    _, app, up, relay = make()
    app.pauseProducing()
    relay.close()
    assert app.unregistered_before_close and up.unregistered_before_close
    assert app.producerState == "producing"
    relay.close()  # idempotent


def test_close_with_grace_aborts_a_transport_that_never_closes():
    clock, transport = Clock(), Transport()
    close_with_grace(clock, transport)
    assert transport.disconnecting and not transport.aborted
    clock.advance(CLOSE_GRACE)
    assert transport.aborted


def test_close_with_grace_leaves_closed_transports_alone():
    clock, transport = Clock(), Transport()
    close_with_grace(clock, transport)
    transport.disconnected = True
    clock.advance(CLOSE_GRACE)
    assert not transport.aborted


# -- byte counts and make_relay's choice --------------------------------------------------


def test_byte_counts_per_direction():
    _, app, up, relay = make()
    relay.from_app(b"A1 SELECT INBOX\r\n")
    relay.from_upstream(b"* 3 EXISTS\r\n")
    relay.from_upstream(b"A1 OK\r\n")
    assert (relay.bytes_to_upstream, relay.bytes_to_app) == (17, 19)


def test_make_relay_gives_in_memory_transports_the_twisted_relay_with_pending_then_leftover():
    clock, app, up = Clock(), Transport(), Transport()
    relay = make_relay(clock, app, up, idle_timeout=60, sid="t", leftover=b"A2 FETCH 1 BODY[]\r\n",
                       pending=b"* 1 RECENT\r\n")
    assert type(relay) is Relay
    assert app.value() == b"* 1 RECENT\r\n" and up.value() == b"A2 FETCH 1 BODY[]\r\n"
    assert (relay.bytes_to_upstream, relay.bytes_to_app) == (19, 12)
    clock.advance(61)
    assert relay.closing


def test_splice_is_refused_for_tls_wrapped_and_non_socket_legs(monkeypatch):
    from twisted.internet import reactor
    from twisted.internet.interfaces import ISSLTransport
    from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
    from zope.interface import directlyProvides

    from mailgw import splice

    plain = Transport()
    assert splice.splice_unusable(reactor, plain) == "the leg is not a file descriptor"
    assert splice.splice_unusable(Clock(), plain) == "the reactor does not watch file descriptors"
    tls = Transport()
    directlyProvides(tls, ISSLTransport)
    assert splice.splice_unusable(reactor, tls) == "the leg is TLS"
    wrapper = ProtocolWrapper(WrappingFactory(None), None)
    assert splice.splice_unusable(reactor, wrapper) == "the leg is a wrapped transport"
    monkeypatch.delattr("os.splice")
    assert splice.splice_unusable(reactor, plain) == "os.splice is not available"
    monkeypatch.setattr(splice, "ENABLED", False)
    assert splice.splice_unusable(reactor, plain) == "MAILGW_SPLICE=0"


def test_bytes_arriving_after_close_or_the_idle_timeout_raise_nothing():
    # TLSMemoryBIOProtocol goes on delivering what it decrypted after loseConnection.
    clock, app, up, relay = make(idle=100)
    relay.close()
    relay.from_upstream(b"* BYE\r\n")
    clock, app, up, relay = make(idle=100)
    clock.advance(100)
    assert relay.closing
    relay.from_app(b"A1 LOGOUT\r\n")


def test_make_relay_says_which_relay_only_when_the_gateway_logs_debug(events):
    make_relay(Clock(), Transport(), Transport(), idle_timeout=60, sid="t")
    assert events == []  # no event built at all on every release
    make_relay(Clock(), Transport(), Transport(), idle_timeout=60, sid="t", debug=True)
    assert [e["why"] for e in events] == ["the reactor does not watch file descriptors"]
