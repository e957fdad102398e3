"""GatewaySession: the Twisted glue of one session.

Every decision is made by :class:`mailgw.protocol.session.SessionMachine` (sans-IO);
this module feeds it events from the two connections, from the destination source, the
token services and the timers, and carries out the actions it returns: writes, TLS,
look-ups, connects, token exchanges, timers, release (the splice of
:mod:`mailgw.relay`) and closes.  It also reports what the operator sees: metrics, the
status board, the audit trail (through the :class:`~mailgw.service.Gateway`).
"""

from __future__ import annotations

import itertools
from typing import Callable

from twisted.internet import defer, error
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IHandshakeListener, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer

from . import errors
from .destination import host_port
from .endpoints.tls import client_tls_options
from .protocol.actions import SendToApp, SendUpstream, StartTLS
from .protocol.refusal import Reason, Refusal
from .protocol.session import (
    CloseApp,
    Connect,
    Exchange,
    FetchToken,
    ForgetToken,
    Log,
    LookUp,
    Milestone,
    Phase,
    Refused,
    Discarded,
    SessionMachine,
    StartRelay,
    StartTimer,
    StopTimer,
    Warmed,
)
from .relaycore import Closer
from .relay import Relay, make_relay
from .settings import Route, Settings

log = Logger()
_session_ids = itertools.count(1)


class GatewayFactory(Factory):
    """Builds a :class:`GatewaySession` for every connection to one listener."""

    noisy = False  # a listener starting and stopping is logged by the gateway

    def __init__(self, route: Route, gateway):
        self.route = route
        self.gateway = gateway

    def buildProtocol(self, addr):
        # A warm pool's session, logged in already, when one is ready (SPEC 9.7) and the
        # limits admit one more session: a session they refuse must not use up (and
        # close) a logged-in upstream connection.
        pool = self.gateway.pools.get(self.route)
        warm = None
        if pool is not None and self.gateway.admits(self.route, client_host(addr)):
            warm = pool.take()
        return warm or GatewaySession(self.route, self.gateway)


@implementer(IHandshakeListener)
class _UpstreamProtocol(Protocol):
    """The upstream leg: everything goes straight to the session."""

    def __init__(self, session: "GatewaySession"):
        self.session = session

    def connectionMade(self):
        self.session._upstream_connected(self)

    def dataReceived(self, data):
        # (at release the relay's from_upstream takes this method's place)
        self.session._upstream_data(data)

    def handshakeCompleted(self):
        self.session._feed(self.session.machine.upstream_tls_done)

    def connectionLost(self, reason=None):
        self.session._upstream_lost(reason)


class _UpstreamFactory(Factory):
    noisy = False  # one session's connection is not worth two log lines

    def __init__(self, session: "GatewaySession"):
        self.session = session

    def buildProtocol(self, addr):
        return _UpstreamProtocol(self.session)


@implementer(IPushProducer)
class GatewaySession(Protocol):
    """The application leg of one session, and the executor of its machine's actions.

    Before release the session is the streaming producer of the application's
    transport: when more than the transport's buffer (64 KiB) of replies is unread,
    Twisted pauses it and it stops reading from the application (SPEC 9.6), so a client
    that streams commands without reading the answers cannot grow memory.
    """

    def __init__(self, route: Route, gateway, pool=None):
        self.route = route
        self.gateway = gateway
        self.reactor = gateway.reactor
        self.settings: Settings = gateway.settings
        self.sid = f"s{next(_session_ids)}"
        self.pool = pool  # a warm pool's session until an application takes it
        self.machine = SessionMachine(route, gateway.settings, gateway.family_of(route), warm=pool is not None)
        self.client = "?"  # host:port, for the audit log
        self.client_host: str | None = None  # what the per-client limit counts
        self.started_at = self.reactor.seconds()
        self.upstream_tls: str | None = None  # the negotiated TLS version, for the audit
        self.token_expires_at: float | None = None  # the client-credentials token's, for /status
        self._upstream: _UpstreamProtocol | None = None
        self._tls_options = None
        self._pending: set[defer.Deferred] = set()  # look-ups, tokens, connects in flight
        self._timers: dict[str, object] = {}
        self._marks: dict[str, float] = {}  # when each upstream phase started
        self._closer = Closer(self.reactor)  # both legs', before and after release
        self.relay: Relay | None = None
        self.closed = defer.Deferred()

    @property
    def phase(self) -> Phase:
        return self.machine.phase

    @property
    def destination(self):
        return self.machine.destination

    # -- the application leg -------------------------------------------------------------

    def connectionMade(self):
        peer = self.transport.getPeer()
        self.client = host_port(getattr(peer, "host", "?"), getattr(peer, "port", "?"))
        self.client_host = client_host(peer)
        self.transport.registerProducer(self, True)
        refusal = self.gateway.session_started(self)
        if self.pool is not None:  # a warm session taken from its pool
            self.pool, self.started_at = None, self.reactor.seconds()
            self._feed(self.machine.app_attached, refusal)
            return
        if refusal is not None:
            self._feed(self.machine.failed, refusal)
        else:
            self._feed(self.machine.accepted)

    def start_warming(self) -> None:
        """A warm pool's session: connect and log in before any application comes."""
        self._feed(self.machine.accepted)

    def dataReceived(self, data: bytes):
        # (at release the relay's from_app takes this method's place: see _release)
        self._feed(self.machine.app_data, data)

    def connectionLost(self, reason=None):
        self._feed(self.machine.closed)
        for pending in list(self._pending):
            pending.cancel()
        if self.relay is not None:
            self.relay.close()
        elif self._upstream is not None and self._upstream.transport is not None:
            self._closer.close(self._upstream.transport)
        self._closer.lost(self.transport)
        if not self.closed.called:
            self.gateway.session_ended(self)
            self.closed.callback(None)

    # IPushProducer: the application's transport pauses us while its buffer is full.
    def pauseProducing(self):
        self.transport.pauseProducing()

    def resumeProducing(self):
        self.transport.resumeProducing()

    def stopProducing(self):
        pass  # the connection is going; connectionLost does the rest

    # -- the upstream leg ----------------------------------------------------------------

    def _upstream_connected(self, upstream: _UpstreamProtocol):
        if self.machine.phase is not Phase.STARTING:
            upstream.transport.abortConnection()
            return
        self._upstream = upstream
        self._feed(self.machine.upstream_connected)

    def _upstream_data(self, data: bytes):
        self._feed(self.machine.upstream_data, data)

    def _upstream_lost(self, reason: Failure | None):
        if self._upstream is not None:
            self._closer.lost(self._upstream.transport)
        self._upstream = None
        if self.relay is not None:
            if self.gateway.debug:
                log.debug("session {sid} closed by the upstream", sid=self.sid)
            self.relay.close()
            return
        refusal = None
        if reason is not None and not reason.check(error.ConnectionDone):
            refusal = self._describe(reason)
        self._feed(self.machine.upstream_lost, refusal)

    # -- carrying out actions ------------------------------------------------------------

    def _feed(self, event: Callable[..., list], *args) -> None:
        """Give the machine an event (``event(*args)``, a machine method) and carry out
        the actions it returns."""
        try:
            for action in event(*args):
                self._do(action)
        except Exception:
            # A bug of ours (a machine misused, an action we cannot carry out), whether
            # the machine raised it or an action did: log it with its traceback and end
            # this session only.
            log.failure("session {sid}: internal error", sid=self.sid)
            self._internal_error()

    def _do(self, action) -> None:
        if isinstance(action, SendToApp):
            self.transport.write(action.data)
        elif isinstance(action, SendUpstream):
            self._upstream.transport.write(action.data)
        elif isinstance(action, StartTLS):
            self._marks.setdefault("tls", self.reactor.seconds())
            self._upstream.transport.startTLS(self._tls_options)
        elif isinstance(action, StartTimer):
            self._start_timer(action.name, action.seconds)
        elif isinstance(action, StopTimer):
            self._stop_timer(action.name)
        elif isinstance(action, LookUp):
            self._call(self.gateway.lookup, self.route, then=self.machine.destination_found)
        elif isinstance(action, FetchToken):
            self._call(
                self.gateway.tokens.for_client_credentials, self.destination, self.route.tenant,
                then=self._token_found,
            )
        elif isinstance(action, Connect):
            self._connect(action.destination)
        elif isinstance(action, Exchange):
            self._call(
                self.gateway.exchange, self.route, self.destination, action.secret,
                then=self.machine.exchanged, failed=self.machine.exchange_failed,
            )
        elif isinstance(action, ForgetToken):
            self.gateway.tokens.invalidate(self.destination, self.route.tenant, secret=action.secret)
        elif isinstance(action, Milestone):
            self._milestone(action.name)
        elif isinstance(action, Refused):
            self.gateway.session_refused(self, action.refusal)
        elif isinstance(action, Log):
            if action.level != "debug" or self.gateway.debug:
                log.emit(_LEVELS[action.level], "session {sid}: {message}", sid=self.sid, message=action.message)
        elif isinstance(action, StartRelay):
            self._release(action)
        elif isinstance(action, Warmed):
            self.pool.warmed(self)
        elif isinstance(action, Discarded):
            self._discard(action.refusal)
        elif isinstance(action, CloseApp):
            self._close()
        else:  # pragma: no cover - the machine returned something new
            raise TypeError(f"unknown action {action!r}")

    def _call(self, function: Callable, *args, then: Callable, failed: Callable | None = None) -> None:
        """Call ``function`` (maybe returning a Deferred) and feed its outcome to the
        machine: ``then(result)``, or ``failed(refusal)`` (default: the session's set-up
        failed)."""
        try:
            d = function(*args)
        except Exception:
            self._failed(Failure(), failed)
            return
        if not isinstance(d, defer.Deferred):  # an answer at once (a static source)
            self._feed(then, d)
            return
        self._track(d).addCallbacks(lambda result: self._feed(then, result), lambda f: self._failed(f, failed))

    def _track(self, d: defer.Deferred) -> defer.Deferred:
        """Keep ``d`` (a look-up, token, exchange or connect in flight) until it fires,
        so that the session cancels it when it ends; ``d``, for more callbacks."""
        self._pending.add(d)

        def settled(result):
            self._pending.discard(d)
            return result

        return d.addBoth(settled)  # (one that fired already, a cache hit, is let go at once)

    def _failed(self, failure: Failure, failed: Callable | None) -> None:
        if self.machine.phase in (Phase.CLOSING, Phase.CLOSED):
            # The session is ending and cancelled what it waited for; whatever that
            # failed with (CancelledError, a connector's UserError...) is no news.
            return
        refusal = self._describe(failure)
        self._feed(failed or self.machine.failed, refusal)

    def _describe(self, failure: Failure) -> Refusal:
        address = self.destination.address if self.destination else self.route.destination
        refusal = errors.describe(failure, address)
        if refusal.reason is Reason.INTERNAL:
            log.failure("session {sid}: internal error", failure, sid=self.sid)
        return refusal

    def _internal_error(self) -> None:
        # Refused before the greeting, a goodbye after it; a warm connection is
        # discarded, so that its pool forgets it and starts another.
        if self.machine.phase in (Phase.STARTING, Phase.WARM, Phase.DIALOGUE):
            refusal = Refusal("internal error in the gateway", Reason.INTERNAL, permanent=False)
            try:
                for action in self.machine.failed(refusal):
                    self._do(action)
                return
            except Exception:  # not even the refusal works: close without it
                log.failure("session {sid}: internal error while refusing", sid=self.sid)
        self._close()

    def _token_found(self, token):
        self.token_expires_at = token.expires_at
        return self.machine.token_found(token.access_token, token.expires_at - self.reactor.seconds())

    def _connect(self, destination) -> None:
        try:
            # Unusable PEM files, an OnPremise destination without a proxy: refusals
            # with their own messages (errors.describe), like a failed connect.
            if destination.implicit_tls or destination.starttls_enable:
                self._tls_options = client_tls_options(destination)
            endpoint = self.gateway.upstream_endpoint(destination, self.route.tenant)
            self._marks["connect"] = self.reactor.seconds()
            d = endpoint.connect(_UpstreamFactory(self))
        except Exception:
            self._failed(Failure(), None)
            return
        # Success arrives through the protocol's connectionMade.
        self._track(d).addErrback(self._failed, None)

    def _milestone(self, name: str) -> None:
        now = self.reactor.seconds()
        phase = {"connected": "connect", "tls": "tls", "login": "login"}.get(name)
        if phase is not None:
            started = self._marks.pop(phase, None)
            if started is not None:
                self.gateway.upstream_phase(self, phase, now - started)
        if name in ("connected", "tls", "authenticating"):
            # The login starts once the transport is usable, or for the lazy types
            # once the application's token is exchanged (not at the greeting).
            self._marks["login"] = now
        if name == "tls" and self._upstream is not None:
            self.upstream_tls = _tls_version(self._upstream.transport)
        self.gateway.session_milestone(self, name)

    def _release(self, action: StartRelay) -> None:
        if self.gateway.debug:
            log.debug("session {sid} released", sid=self.sid)
        # From now on the relay (make_relay: splice or Twisted) owns both transports.
        self.transport.unregisterProducer()
        self.transport.resumeProducing()
        self.relay = make_relay(
            self.reactor, self.transport, self._upstream.transport,
            idle_timeout=self.settings.relay_idle_timeout, sid=self.sid,
            leftover=action.to_upstream, pending=action.to_app, closer=self._closer, debug=self.gateway.debug,
        )
        # The hot path: each leg's bytes go straight to the relay, one Python call per
        # chunk fewer than through the session (the splice relay reads the sockets itself).
        self.dataReceived = self.relay.from_app
        self._upstream.dataReceived = self.relay.from_upstream

    def _close(self) -> None:
        for pending in list(self._pending):
            pending.cancel()
        if self.relay is not None:
            self.relay.close()
            return
        if self._upstream is not None and self._upstream.transport is not None:
            self._closer.close(self._upstream.transport)
        if self.transport is not None:
            self.transport.unregisterProducer()
            self._closer.close(self.transport)

    def _discard(self, refusal: Refusal) -> None:
        """A warm session that cannot serve: close it; its pool replaces it."""
        pool, self.pool = self.pool, None
        self._feed(self.machine.closed)
        self._close()
        if pool is not None:
            pool.discarded(self, refusal)

    def retire(self, reason: str) -> None:
        """Close a warm session that waits in its pool (flush, stop)."""
        self.pool = None
        self._feed(self.machine.closed)
        self._close()

    # -- timers --------------------------------------------------------------------------

    def _start_timer(self, name: str, seconds: float) -> None:
        existing = self._timers.get(name)
        if existing is not None and existing.active():
            existing.reset(seconds)
        else:
            self._timers[name] = self.reactor.callLater(seconds, self._timer_fired, name)

    def _stop_timer(self, name: str) -> None:
        timer = self._timers.pop(name, None)
        if timer is not None and timer.active():
            timer.cancel()

    def _timer_fired(self, name: str) -> None:
        self._timers.pop(name, None)
        self._feed(self.machine.timer, name)

    # -- shutdown ------------------------------------------------------------------------

    def shutdown(self, reason: str) -> None:
        """Close this session now (drain timeout reached): the protocol's goodbye first."""
        if self.relay is not None:
            self.transport.write(self.machine.goodbye_bytes(reason))
            self.relay.close()
        else:
            self._feed(self.machine.shutdown, reason)


def client_host(address) -> str | None:
    """What the per-client session limit counts for a peer ``address``: its IP address;
    ``None`` for a peer without one (a UNIX socket's), which that limit leaves alone
    rather than lumping every such client together."""
    if isinstance(address, (IPv4Address, IPv6Address)):
        return address.host
    return None


_LEVELS = {"debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn}


def _tls_version(transport) -> str | None:
    """The TLS version the upstream connection negotiated (``TLSv1.3``), if any."""
    get_handle = getattr(transport, "getHandle", None)
    connection = get_handle() if get_handle is not None else None
    version = getattr(connection, "get_protocol_version_name", None)
    try:
        return version() if version is not None else None
    except Exception:  # noqa: BLE001 - a closed connection has no version to tell
        return None
