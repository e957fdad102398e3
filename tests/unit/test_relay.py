"""The relay's wiring: producers, idle timeout, closing, TLS abort grace."""

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from mailgw.relay import CLOSE_GRACE, Relay, close_with_grace


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
