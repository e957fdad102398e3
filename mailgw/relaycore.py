"""What both relays share (the Twisted one in :mod:`mailgw.relay`, the zero-copy one in
:mod:`mailgw.splice`): the post-release idle timer, the closing state, and closing a
connection that might never finish closing.

A TLS ``loseConnection`` can wait forever for the peer's close_notify, and a plain one
for a peer that never reads what is still buffered: every leg the gateway closes gets a
deadline after which it is aborted.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

log = Logger(namespace="mailgw.relay")

#: How long a closing leg may take (flushing, TLS close_notify) before it is aborted.
CLOSE_GRACE = 5.0


def close_with_grace(reactor: IReactorTime, transport, grace: float = CLOSE_GRACE):
    """``loseConnection`` and, if the transport is still open after ``grace``, abort it.
    Returns the abort's DelayedCall (``None`` for a transport that cannot abort).

    TLS ``loseConnection`` can wait forever for the peer's close_notify.
    """
    transport.loseConnection()
    abort = getattr(transport, "abortConnection", None)
    if abort is None:
        return None
    return reactor.callLater(grace, _abort_if_open, transport)


def _abort_if_open(transport) -> None:
    # Both TCP and TLS transports set ``disconnected`` once connectionLost ran.
    if not getattr(transport, "disconnected", True):
        transport.abortConnection()


class Closer:
    """Closes one session's legs with :func:`close_with_grace` and cancels each abort
    timer when that leg's ``connectionLost`` arrives (:meth:`lost`): a pending timer
    would keep the transport, and through it the whole session, alive for
    ``CLOSE_GRACE`` seconds after the leg closed."""

    __slots__ = ("reactor", "_aborts")

    def __init__(self, reactor: IReactorTime):
        self.reactor = reactor
        self._aborts: dict = {}  # transport -> its abort DelayedCall

    def close(self, transport) -> None:
        """Close ``transport`` (once: a second call changes nothing)."""
        if transport in self._aborts:
            return
        abort = close_with_grace(self.reactor, transport)
        if abort is not None:
            self._aborts[transport] = abort

    def lost(self, transport) -> None:
        """``transport``'s connection is gone: its abort is moot."""
        abort = self._aborts.pop(transport, None)
        if abort is not None and abort.active():
            abort.cancel()


class RelayCore:
    """The part of a relay that is not about moving bytes: the two legs' transports,
    the idle timer, the closing state and the :class:`Closer` that closes the legs.
    Subclasses implement ``from_app``,
    ``from_upstream`` and ``close``, and note every chunk they move in
    ``last_traffic`` (``self.last_traffic = self._clock()``).

    Traffic only notes the time: the idle timer reads it when it fires and waits on
    for the rest of the timeout.  Resetting a DelayedCall on every chunk cost more,
    and raised for chunks that arrive after ``close()`` cancelled it (a TLS transport
    goes on delivering what it decrypted after ``loseConnection``).
    """

    __slots__ = (
        "reactor", "app", "upstream", "sid", "idle_timeout", "closing", "closer", "last_traffic", "_clock", "_idle",
    )

    def __init__(self, reactor: IReactorTime, app_transport, upstream_transport, *, idle_timeout: float, sid: str,
                 closer: Closer | None = None):
        self.reactor = reactor
        self.closer = closer or Closer(reactor)  # the session's: it sees the legs' connectionLost
        self.app = app_transport
        self.upstream = upstream_transport
        self.sid = sid
        self.idle_timeout = idle_timeout
        self.closing = False
        self._clock = reactor.seconds  # bound once: it runs for every chunk
        self.last_traffic = self._clock()
        self._idle = reactor.callLater(idle_timeout, self._idle_check)

    def close(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _idle_check(self) -> None:
        quiet = self._clock() - self.last_traffic
        if quiet < self.idle_timeout:
            self._idle = self.reactor.callLater(self.idle_timeout - quiet, self._idle_check)
            return
        log.info("session {sid}: no traffic for {seconds:.0f}s, closing", sid=self.sid, seconds=self.idle_timeout)
        self.close()

    def _stop_idle_timer(self) -> None:
        if self._idle.active():
            self._idle.cancel()
