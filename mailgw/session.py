"""GatewaySession: one application connection, its upstream connection, and the splice.

The session is thin glue.  Protocol decisions are made by the sans-IO machines in
``mailgw.protocol``; the session feeds them bytes, carries out the actions they return,
runs the timers, and hands over to :class:`~mailgw.relay.Relay` at release.

Life of a session (eager authentication types)::

    accepted -> destination looked up -> upstream connected -> TLS -> login
             -> application greeted -> local dialogue -> release -> relay -> closed

and for the lazy ones (OAuth2RefreshToken, OAuth2AuthorizationCode), where the
application presents the secret::

    accepted -> destination looked up -> upstream connected -> TLS -> capabilities
             -> application greeted (XOAUTH2, OAUTHBEARER offered)
             -> application's AUTH -> secret exchanged at the token service (off the
                reactor) -> upstream login with the access token -> result relayed
                (a refusal leaves the session open for another try)
             -> local dialogue -> release -> relay -> closed
"""

from __future__ import annotations

import itertools
from typing import Callable

from attrs import frozen
from twisted.internet import defer
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from . import errors, metrics
from .destination import BASIC, NO_AUTH, OAUTH2_AUTHORIZATION_CODE, OAUTH2_CLIENT_CREDENTIALS, Destination
from .endpoints.tls import client_tls_options
from .oauth import TokenError
from .protocol import families
from .protocol.actions import (
    Close,
    ExchangeSecret,
    LoginRefused,
    ProtocolError,
    Release,
    SendToApp,
    SendUpstream,
    StartTLS,
    UpstreamConnected,
    UpstreamFailed,
    UpstreamReady,
)
from .protocol.credentials import BearerToken, Password
from .relay import Relay, close_with_grace, make_relay

log = Logger()
_session_ids = itertools.count(1)


@frozen
class Route:
    """What a listener serves: a destination, optionally for one tenant."""

    destination: str
    tenant: str | None = None

    def __str__(self) -> str:
        return self.destination + (f"/{self.tenant}" if self.tenant else "")


@frozen
class Settings:
    """Timeouts (seconds) and limits that apply to every session."""

    connect_timeout: float = 10.0
    tls_timeout: float = 10.0
    login_timeout: float = 30.0  # from accept until the upstream is ready
    idle_timeout: float = 300.0  # application silent before release
    relay_idle_timeout: float = 1800.0  # after release; long enough for IMAP IDLE
    max_line: int = 16384  # application command line before release
    max_sessions_per_destination: int = 1000
    token_timeout: float = 10.0  # each HTTP call to a token service
    max_token_requests: int = 8  # concurrent token requests, all destinations together
    hostname: str = "mailgw"


class GatewayFactory(Factory):
    """Builds a :class:`GatewaySession` for every connection to one listener."""

    def __init__(self, route: Route, gateway):
        self.route = route
        self.gateway = gateway

    def buildProtocol(self, addr):
        return GatewaySession(self.route, self.gateway)


@implementer(IHandshakeListener)
class _UpstreamProtocol(Protocol):
    """The upstream leg: everything goes straight to the session."""

    def __init__(self, session: "GatewaySession"):
        self.session = session

    def connectionMade(self):
        self.session._upstream_connected(self)

    def dataReceived(self, data):
        self.session._upstream_data(data)

    def handshakeCompleted(self):
        self.session._upstream_tls_done()

    def connectionLost(self, reason=None):
        self.session._upstream_lost(reason)


class _UpstreamFactory(Factory):
    noisy = False  # one session's connection is not worth two log lines

    def __init__(self, session: "GatewaySession"):
        self.session = session

    def buildProtocol(self, addr):
        return _UpstreamProtocol(self.session)


class GatewaySession(Protocol):
    """The application leg of one session, and the session's driver."""

    def __init__(self, route: Route, gateway):
        self.route = route
        self.gateway = gateway
        self.reactor = gateway.reactor
        self.settings: Settings = gateway.settings
        self.sid = f"s{next(_session_ids)}"
        self.destination: Destination | None = None
        self.phase = "starting"  # starting | dialogue | relay | closed
        self._early = bytearray()  # application bytes that arrived before the greeting
        self._app_machine = None
        self._up_machine = None
        self._upstream: _UpstreamProtocol | None = None
        self._connecting: defer.Deferred | None = None
        self._tls_options = None
        self._timers: dict[str, object] = {}
        self._exchanging: defer.Deferred | None = None  # lazy types: the token exchange
        self._presented: str | None = None  # lazy types: the secret being tried upstream
        self.relay: Relay | None = None
        self.closed = defer.Deferred()

    # -- application leg -------------------------------------------------------------

    def connectionMade(self):
        peer = self.transport.getPeer()
        log.info(
            "session {sid} accepted from {peer} for {route}",
            sid=self.sid, peer=f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}", route=str(self.route),
        )
        self.gateway.session_started(self)
        self._timer("login", self.settings.login_timeout, self._login_timed_out)
        d = defer.maybeDeferred(self.gateway.lookup, self.route)
        d.addCallbacks(self._got_destination, self._setup_failed)
        d.addErrback(self._internal_error)

    def dataReceived(self, data: bytes):
        if self.phase == "relay":
            self.relay.from_app(data)
        elif self.phase == "dialogue":
            self._timer("idle", self.settings.idle_timeout, self._app_idle)
            self._feed_app(data)
        elif self.phase == "starting":
            # The application spoke before its greeting: keep it, in order, but bounded.
            self._early += data
            if len(self._early) > self.settings.max_line:
                self._refuse("application sent too much data before the greeting", permanent=True)

    def connectionLost(self, reason=None):
        previous, self.phase = self.phase, "closed"
        self._cancel_timers()
        self._presented = None
        if self._connecting is not None:
            self._connecting.cancel()
        if self._exchanging is not None:
            self._exchanging.cancel()
        if self.relay is not None:
            self.relay.close()
        elif self._upstream is not None and self._upstream.transport is not None:
            close_with_grace(self.reactor, self._upstream.transport)
        if previous != "closed":
            log.info("session {sid} closed (was {phase})", sid=self.sid, phase=previous)
            self.gateway.session_ended(self)
            self.closed.callback(None)

    # -- set-up ----------------------------------------------------------------------

    def _got_destination(self, destination: Destination):
        if self.phase == "closed":
            return
        self.destination = destination
        if self.gateway.over_session_limit(self):
            self._refuse("too many sessions for this destination, try again later", permanent=False)
            return
        credentials_d = defer.maybeDeferred(self._credentials, destination)
        credentials_d.addCallbacks(self._connect, self._setup_failed)
        credentials_d.addErrback(self._internal_error)

    def _credentials(self, destination: Destination):
        if destination.authentication == NO_AUTH or not destination.auth:
            return None
        if destination.authentication == BASIC:
            return Password(destination.user, destination.password)
        if destination.authentication == OAUTH2_CLIENT_CREDENTIALS:
            d = self.gateway.tokens.for_client_credentials(destination, self.route.tenant)
            return d.addCallback(lambda token: BearerToken(destination.user, token.access_token))
        if destination.lazy:
            return None  # the application presents the secret: families.login_later
        raise errors.UnsupportedError(f"authentication type {destination.authentication} is not supported")

    def _connect(self, credentials):
        if self.phase == "closed":
            return
        destination = self.destination
        self._tls_options = client_tls_options(destination) if self._needs_tls(destination) else None
        self._up_machine = families.upstream_machine(destination, credentials, self.settings)
        endpoint = self.gateway.upstream_endpoint(destination, self.route.tenant)
        log.debug("session {sid}: connecting to {address}", sid=self.sid, address=destination.address)
        self._connecting = endpoint.connect(_UpstreamFactory(self))
        self._connecting.addBoth(self._connect_done)

    @staticmethod
    def _needs_tls(destination: Destination) -> bool:
        return destination.implicit_tls or destination.starttls_enable

    def _connect_done(self, result):
        self._connecting = None
        if isinstance(result, Failure):
            if self.phase != "closed":
                self._setup_failed(result)
            return None
        return result

    def _upstream_connected(self, upstream: _UpstreamProtocol):
        if self.phase == "closed":
            upstream.transport.abortConnection()
            return
        self._upstream = upstream
        self._feed_upstream(self._up_machine.start)

    def _upstream_data(self, data: bytes):
        if self.phase == "relay":
            self.relay.from_upstream(data)
        elif self.phase != "closed":
            self._feed_upstream(self._up_machine.receive, data)

    def _upstream_tls_done(self):
        self._cancel_timer("tls")
        if self.phase in ("starting", "dialogue"):
            self._feed_upstream(self._up_machine.tls_established)

    def _upstream_lost(self, reason: Failure):
        upstream, self._upstream = self._upstream, None
        if self.phase == "relay":
            log.info("session {sid} closed by the upstream", sid=self.sid)
            self.relay.close()
        elif self.phase == "starting":
            text, permanent = errors.describe(reason, self.destination.address)
            self._refuse(text, permanent)
        elif self.phase == "dialogue":
            log.info("session {sid}: upstream closed before release", sid=self.sid)
            self._goodbye("the upstream server closed the connection")
        del upstream

    # -- actions ---------------------------------------------------------------------

    def _feed_upstream(self, method, *args):
        try:
            actions = method(*args)
        except ProtocolError as e:  # the upstream broke its protocol
            actions = [UpstreamFailed(str(e))]
        self._run(actions)

    def _feed_app(self, data: bytes):
        try:
            actions = self._app_machine.receive(data)
        except ProtocolError as e:  # the application broke its protocol
            log.info("session {sid}: application protocol error: {error}", sid=self.sid, error=str(e))
            self._goodbye(str(e))
            return
        self._run(actions)

    def _run(self, actions: list):
        for action in actions:
            if self.phase == "closed":
                return
            if isinstance(action, SendToApp):
                self.transport.write(action.data)
            elif isinstance(action, SendUpstream):
                self._upstream.transport.write(action.data)
            elif isinstance(action, StartTLS):
                self._timer("tls", self.settings.tls_timeout, self._tls_timed_out)
                self._upstream.transport.startTLS(self._tls_options)
            elif isinstance(action, UpstreamReady):
                if self._app_machine is None:
                    self._greet(action.capabilities, lazy=False)
                else:
                    self._logged_in(action)
            elif isinstance(action, UpstreamConnected):
                self._greet(action.capabilities, lazy=True)
            elif isinstance(action, ExchangeSecret):
                self._exchange(action)
            elif isinstance(action, LoginRefused):
                self._login_refused(action)
            elif isinstance(action, UpstreamFailed):
                self._refuse(action.reason, action.permanent)
            elif isinstance(action, Release):
                self._release(action.leftover)
            elif isinstance(action, Close):
                log.info("session {sid}: closing: {reason}", sid=self.sid, reason=action.reason)
                self._close_app()
            else:  # pragma: no cover - a machine returned something new
                raise TypeError(f"unknown action {action!r}")

    def _greet(self, capabilities: tuple[str, ...], lazy: bool):
        self._cancel_timer("login")
        self._app_machine = families.app_machine(self.destination, capabilities, self.settings, lazy=lazy)
        self.phase = "dialogue"
        log.info(
            "session {sid}: upstream {address} ready{waiting}, greeting the application",
            sid=self.sid, address=self.destination.address,
            waiting=", login waits for the application's token" if lazy else "",
        )
        if not lazy:
            metrics.SESSIONS_READY.labels(self.route.destination).inc()
        self.transport.write(self._app_machine.greeting())
        self._timer("idle", self.settings.idle_timeout, self._app_idle)
        if self._early:
            early, self._early = bytes(self._early), bytearray()
            self._feed_app(early)

    # -- lazy authentication ---------------------------------------------------------

    def _exchange(self, request: ExchangeSecret):
        """The application presented its refresh token or authorisation code."""
        destination = self.destination
        what = "authorization code" if destination.authentication == OAUTH2_AUTHORIZATION_CODE else "refresh token"
        user = request.user or destination.user
        if not user:
            self._run(self._app_machine.auth_refused(
                f"no user: the {request.mechanism} response names none and destination {destination.name} has no mail.user"
            ))
            return
        log.info(
            "session {sid}: the application presented a {what} ({mechanism}); exchanging it at the token service",
            sid=self.sid, what=what, mechanism=request.mechanism,
        )
        secret = request.secret
        d = defer.maybeDeferred(self.gateway.exchange, self.route, destination, secret)
        self._exchanging = d
        d.addCallbacks(self._exchanged, self._exchange_failed, callbackArgs=(user, secret))
        d.addErrback(self._internal_error)

    def _exchanged(self, access_token: str, user: str, secret: str):
        self._exchanging = None
        if self.phase != "dialogue" or self._upstream is None:
            return  # the application or the upstream went away meanwhile
        self._presented = secret
        self._timer("login", self.settings.login_timeout, self._login_timed_out)
        self._feed_upstream(self._up_machine.authenticate, BearerToken(user, access_token))

    def _exchange_failed(self, failure: Failure):
        self._exchanging = None
        if self.phase != "dialogue":
            return None  # the application went away (its Deferred was cancelled)
        if not failure.check(TokenError):
            log.failure("session {sid}: token exchange failed", failure, sid=self.sid)
            self._run(self._app_machine.auth_refused("internal error in the gateway", transient=True))
            return None
        _, permanent = errors.describe(failure, self.destination.address)
        error = failure.value
        log.info("session {sid}: token exchange refused: {error}", sid=self.sid, error=str(error))
        self._run(self._app_machine.auth_refused(str(error), transient=not permanent))
        return None

    def _logged_in(self, ready: UpstreamReady):
        self._cancel_timer("login")
        self._presented = None
        log.info("session {sid}: upstream {address} accepted the access token", sid=self.sid, address=self.destination.address)
        metrics.SESSIONS_READY.labels(self.route.destination).inc()
        self._run(self._app_machine.auth_succeeded(ready.capabilities))

    def _login_refused(self, refused: LoginRefused):
        self._cancel_timer("login")
        if self._presented is not None:
            # The cached token may have been revoked: the next attempt exchanges afresh.
            self.gateway.tokens.invalidate(self.destination, self.route.tenant, secret=self._presented)
            self._presented = None
        log.info("session {sid}: {reason}", sid=self.sid, reason=refused.reason)
        self._run(self._app_machine.auth_refused(refused.reason))

    # -- release ---------------------------------------------------------------------

    def _release(self, leftover: bytes):
        self._cancel_timers()
        self.phase = "relay"
        log.info("session {sid} released", sid=self.sid)
        self.relay = make_relay(
            self.reactor, self.transport, self._upstream.transport,
            idle_timeout=self.settings.relay_idle_timeout, sid=self.sid,
            leftover=leftover, pending=self._up_machine.take_pending(),
        )

    # -- endings ---------------------------------------------------------------------

    def _refuse(self, reason: str, permanent: bool = True):
        """Refuse the session with the protocol's own greeting, naming the cause."""
        if self.phase == "closed":
            return
        name = self.destination.name if self.destination else self.route.destination
        text = f"destination {name}: {reason}"
        log.warn("session {sid} refused: {text}", sid=self.sid, text=text)
        metrics.SESSIONS_REFUSED.labels(self.route.destination).inc()
        family = self.destination.family if self.destination else self.gateway.family_of(self.route)
        self.transport.write(families.refusal(family, text, permanent))
        self._close_app()

    def _goodbye(self, reason: str):
        if self.phase == "closed":
            return
        family = self.destination.family if self.destination else self.gateway.family_of(self.route)
        self.transport.write(families.goodbye(family, reason))
        self._close_app()

    def shutdown(self, reason: str):
        """Close this session now (drain timeout reached): the protocol's goodbye first."""
        if self.phase in ("starting",):
            self._refuse(reason, permanent=False)
        elif self.phase in ("dialogue", "relay"):
            if self.relay is not None:
                self.transport.write(families.goodbye(self.destination.family, reason))
                self.relay.close()
            else:
                self._goodbye(reason)

    def _close_app(self):
        self._cancel_timers()
        if self._connecting is not None:
            self._connecting.cancel()
        if self._upstream is not None and self._upstream.transport is not None:
            close_with_grace(self.reactor, self._upstream.transport)
        close_with_grace(self.reactor, self.transport)

    def _setup_failed(self, failure: Failure):
        if self.phase == "closed":
            return
        address = self.destination.address if self.destination else self.route.destination
        text, permanent = errors.describe(failure, address)
        self._refuse(text, permanent)

    def _internal_error(self, failure: Failure):
        # A bug of ours: log the traceback (no secrets are in our exception messages)
        # and refuse this session only.
        log.failure("session {sid}: internal error", failure, sid=self.sid)
        self._refuse("internal error in the gateway", permanent=False)

    # -- timers ----------------------------------------------------------------------

    def _timer(self, name: str, seconds: float, callback: Callable[[], None]):
        existing = self._timers.get(name)
        if existing is not None and existing.active():
            existing.reset(seconds)
        else:
            self._timers[name] = self.reactor.callLater(seconds, callback)

    def _cancel_timer(self, name: str):
        timer = self._timers.pop(name, None)
        if timer is not None and timer.active():
            timer.cancel()

    def _cancel_timers(self):
        for name in list(self._timers):
            self._cancel_timer(name)

    def _login_timed_out(self):
        self._timers.pop("login", None)
        where = self.destination.address if self.destination else "the upstream"
        self._refuse(f"{where} did not complete the login within {self.settings.login_timeout:.0f}s", permanent=False)

    def _tls_timed_out(self):
        self._timers.pop("tls", None)
        self._refuse(f"TLS handshake with {self.destination.address} timed out", permanent=False)

    def _app_idle(self):
        self._timers.pop("idle", None)
        log.info("session {sid}: application idle before release, closing", sid=self.sid)
        self._goodbye("idle timeout")

