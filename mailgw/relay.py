"""The relay after release: bytes in, bytes out, with backpressure and an idle timeout.

:func:`make_relay` is what the session calls at release: it returns the zero-copy
:class:`mailgw.splice.SpliceRelay` where both legs are plain sockets on Linux, and the
Twisted :class:`Relay` otherwise (TLS on a leg, no ``os.splice``, other transports,
or ``MAILGW_SPLICE=0`` in the environment).

The Twisted relay's hot path costs one Python call per received chunk (the transport's
read size, 64 KiB, or one TLS record): ``write`` on the other leg, a byte count and the
time of the traffic for the idle timer.  Backpressure is Twisted's producer/consumer:
each transport is registered as the streaming producer of the other, so a full write
buffer on one side pauses reading on the other.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from .relaycore import Closer, RelayCore
from .splice import SpliceRelay, splice_unusable

log = Logger()


def make_relay(reactor, app_transport, upstream_transport, *, idle_timeout: float, sid: str,
               leftover: bytes = b"", pending: bytes = b"", closer: Closer | None = None, debug: bool = False):
    """The relay for a session released now: the splice relay where it can work, else ``Relay``.

    Call it once, at release, before anything else is written to either transport.
    ``pending`` (bytes the upstream sent that the session still holds) goes to the
    application and ``leftover`` (bytes the application sent after its releasing
    command) to the upstream, each before anything relayed later in its direction.
    The session then routes ``dataReceived`` of each leg to ``from_app`` /
    ``from_upstream`` and both ``connectionLost`` to ``close()``.  Both relays count
    ``bytes_to_upstream`` and ``bytes_to_app`` (``leftover`` and ``pending`` included).
    ``closer`` closes the legs (the session's, which cancels each abort timer as its
    leg is lost); ``debug`` (the gateway logs at debug level) logs which relay was
    chosen and why.  To end a session with a goodbye, write it to the application
    transport and call ``close()`` in the same reactor turn: both relays send it after
    the bytes already relayed.
    """

    why = splice_unusable(reactor, app_transport) or splice_unusable(reactor, upstream_transport)
    relay = None
    if why is None:
        try:
            relay = SpliceRelay(reactor, app_transport, upstream_transport,
                                idle_timeout=idle_timeout, sid=sid, closer=closer)
        except OSError as e:  # out of descriptors: the Twisted relay needs none more
            why = f"no pipes: {e}"
    if relay is None:
        if debug:  # not an event built and filtered out on every release
            log.debug("session {sid}: Twisted relay ({why})", sid=sid, why=why)
        relay = Relay(reactor, app_transport, upstream_transport, idle_timeout=idle_timeout, sid=sid, closer=closer)
    if pending:
        relay.from_upstream(pending)
    if leftover:
        relay.from_app(leftover)
    return relay


class Relay(RelayCore):
    """Relays two connected protocols' transports with Twisted's producer/consumer.

    The session routes each leg's ``dataReceived`` here (``from_app``,
    ``from_upstream``) and calls ``close()`` when a leg is lost.  ``bytes_to_upstream``
    and ``bytes_to_app`` count the bytes handed to each leg.
    """

    __slots__ = ("bytes_to_upstream", "bytes_to_app", "_write_up", "_write_app")

    def __init__(self, reactor: IReactorTime, app_transport, upstream_transport, *, idle_timeout: float, sid: str,
                 closer: Closer | None = None):
        super().__init__(reactor, app_transport, upstream_transport, idle_timeout=idle_timeout, sid=sid, closer=closer)
        self.bytes_to_upstream = 0  # for mailgw_relay_bytes_total and the audit log
        self.bytes_to_app = 0
        self.app.registerProducer(self.upstream, True)
        self.upstream.registerProducer(self.app, True)
        # Bound methods looked up once: these run for every chunk.
        self._write_up = self.upstream.write
        self._write_app = self.app.write

    def from_app(self, data: bytes) -> None:
        self._write_up(data)
        self.bytes_to_upstream += len(data)
        self.last_traffic = self._clock()

    def from_upstream(self, data: bytes) -> None:
        self._write_app(data)
        self.bytes_to_app += len(data)
        self.last_traffic = self._clock()

    def close(self) -> None:
        """Close both legs once (after what was already written is flushed)."""
        if self.closing:
            return
        self.closing = True
        self._stop_idle_timer()
        # A transport with a registered producer waits for unregisterProducer before
        # it really closes; unregister first.
        for transport in (self.app, self.upstream):
            try:
                transport.unregisterProducer()
            except Exception:  # pragma: no cover - already gone
                pass
            # A paused leg would never flush its buffer or notice its peer closing.
            try:
                transport.resumeProducing()
            except Exception:  # pragma: no cover
                pass
            self.closer.close(transport)
