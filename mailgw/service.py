"""Builds the running gateway: listeners, the http listener and send API, draining on
stop, and applying a re-read configuration file (SIGHUP, standalone mode)."""

from __future__ import annotations

from collections import Counter

import attrs
from typing import Any, Mapping

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import Interface

from . import audit as audit_log
from . import metrics
from .blocking import BlockingPool
from .config import ConfigError, GatewayConfig, HttpConfig, LoggingConfig
from .destination import Destination
from .endpoints.chain import socks_proxy, upstream_endpoint
from .errors import GatewayError
from .listening import (
    Listener,
    ListenerGroup,
    StartupError,
    endpoint_from_string,
    find_conflict,
    reachable_off_loopback,
)
from .oauth import TokenCache, TokenClient, TokenProvider
from .pool import UpstreamPool
from .protocol import families
from .protocol.refusal import Reason, Refusal
from .send.connection import POOL_SIZE as SEND_POOL_SIZE
from .send.http import BearerTokens, SendResource
from .session import GatewayFactory, GatewaySession
from .settings import Route, Settings
from .status import StatusBoard, StatusResource, listener_info

log = Logger()


class StaticSource:
    """Destinations from the configuration file."""

    def __init__(self, destinations: Mapping[str, Destination]):
        self.destinations = dict(destinations)

    def lookup(self, name: str, tenant: str | None = None) -> Destination:
        try:
            return self.destinations[name]
        except KeyError:
            raise GatewayError(f"unknown destination {name!r}") from None

    def family(self, name: str) -> str | None:
        destination = self.destinations.get(name)
        return destination.family if destination else None


class Gateway:
    """What every session shares: reactor, settings, destinations, tokens, proxy, and
    the bookkeeping of open sessions (limits, metrics, drain)."""

    def __init__(
        self, reactor, settings: Settings, source, *, tokens=None, proxy_endpoint=None,
        audit=None, status: StatusBoard | None = None,
    ):
        self.reactor = reactor
        self.settings = settings
        self.source = source
        self.tokens = tokens
        self.proxy_endpoint = proxy_endpoint  # (destination, tenant) -> IStreamClientEndpoint
        self.sessions: set[GatewaySession] = set()
        self._per_destination: Counter[str] = Counter()
        self._per_client: Counter[str] = Counter()
        self._metrics: dict[str, metrics.DestinationMetrics] = {}
        self.draining = False
        #: sessions log every step (gateway.yaml ``logging.level: debug``); off, they do
        #: not even build the events (measurably cheaper per session)
        self.debug = False
        #: more conditions for readiness (Kubernetes mode: the controller has synced):
        #: ``(reason, check)`` pairs, see :meth:`add_readiness_check`; a bare callable
        #: counts as ``("starting", check)``
        self.readiness_checks: list = []
        #: warm upstream pools by route (SPEC 9.7)
        self.pools: dict[Route, UpstreamPool] = {}
        #: the audit log (mailgw.audit.AuditLog), None when gateway.yaml has no ``audit``
        self.audit = audit
        #: what sessions report per destination, for /status (mailgw.status.StatusBoard)
        self.status = status if status is not None else StatusBoard(reactor)

    def add_readiness_check(self, reason: str, check) -> None:
        """Not ready while ``check()`` is false; ``/readyz`` then says ``reason``
        (e.g. ``"controller not synced"``)."""
        self.readiness_checks.append((reason, check))

    def not_ready(self) -> list[str]:
        """Why the gateway is not ready (``/readyz``, ``/status``); empty when it is."""
        reasons = ["draining"] if self.draining else []
        for item in self.readiness_checks:
            reason, check = item if isinstance(item, tuple) else ("starting", item)
            if not check():
                reasons.append(reason)
        return reasons

    @property
    def ready(self) -> bool:
        """Serving: not draining, and every readiness check passes."""
        return not self.not_ready()

    def _source(self, route: Route):
        """Where ``route``'s sessions find their destination: the listener's own source
        when it has one (:attr:`Route.source`), else the gateway's."""
        return self.source if route.source is None else route.source

    def lookup(self, route: Route):
        return self._source(route).lookup(route.destination, route.tenant)

    def exchange(self, route: Route, destination: Destination, secret: str) -> defer.Deferred:
        """The upstream access token for the application's refresh token or authorization
        code: from the destination's source when it exchanges secrets itself (the
        destination service in Kubernetes mode), else from the token service."""
        by_source = getattr(self._source(route), "exchange", None)
        d = by_source(route.destination, destination, secret) if by_source is not None else None
        if d is None:
            d = self.tokens.exchange(destination, route.tenant, secret).addCallback(lambda token: token.access_token)
        return d

    def family_of(self, route: Route) -> str:
        """The protocol family to refuse in when the destination itself is unavailable."""
        return self._source(route).family(route.destination) or "smtp"

    def upstream_endpoint(self, destination: Destination, tenant: str | None):
        return upstream_endpoint(
            self.reactor, destination, tenant,
            connect_timeout=self.settings.connect_timeout, proxy=self.proxy_endpoint,
        )

    # -- the sessions' reports ---------------------------------------------------------

    def _metrics_of(self, destination: str) -> metrics.DestinationMetrics:
        found = self._metrics.get(destination)
        if found is None:
            found = self._metrics[destination] = metrics.DestinationMetrics(destination)
        return found

    def session_started(self, session: GatewaySession) -> Refusal | None:
        """Count a new session; the refusal when it is over a limit (SPEC 6, 9.6)."""
        name, client = session.route.destination, session.client_host
        self.sessions.add(session)
        self._per_destination[name] += 1
        if client is not None:
            self._per_client[client] += 1
        counted = self._metrics_of(name)
        counted.accepted.inc()
        counted.active.inc()
        return self._over_limits(name, client)

    def admits(self, route: Route, client_host: str | None) -> bool:
        """Whether one more session of ``route`` from ``client_host`` is within the limits."""
        return self._over_limits(route.destination, client_host, joining=1) is None

    def _over_limits(self, name: str, client: str | None, joining: int = 0) -> Refusal | None:
        """The refusal when the sessions counted (plus ``joining``) exceed a limit.  A
        client without an IP address (``None``: a UNIX socket) has no per-client limit."""
        if self._per_destination[name] + joining > self.settings.max_sessions_per_destination:
            return Refusal("too many sessions for this destination, try again later", Reason.LIMIT, permanent=False)
        if client is not None and self._per_client[client] + joining > self.settings.max_sessions_per_client:
            return Refusal(f"too many sessions from {client}, try again later", Reason.LIMIT, permanent=False)
        return None

    def session_refused(self, session: GatewaySession, refusal: Refusal) -> None:
        self._metrics_of(session.route.destination).refused(refusal.reason.value).inc()
        self.status.destination_failed(session.route.destination, refusal.text, kind=refusal.reason.value)

    def session_milestone(self, session: GatewaySession, name: str) -> None:
        """A :class:`~mailgw.protocol.session.Milestone`: ``connected``, ``tls``,
        ``authenticating``, ``login``."""
        if name == "login":  # reached the upstream and logged in: /status's last success
            self.status.destination_succeeded(session.route.destination)
            self._note_token_expiry(session)

    def _note_token_expiry(self, session: GatewaySession) -> None:
        """/status: when the client-credentials token the session logged in with expires
        (the time only; the token itself stays with the session)."""
        if session.token_expires_at is not None:
            self.status.token_expires(session.route.destination, session.token_expires_at)

    def upstream_phase(self, session: GatewaySession, phase: str, seconds: float) -> None:
        self._metrics_of(session.route.destination).upstream(phase).observe(seconds)

    def session_ended(self, session: GatewaySession) -> None:
        if session not in self.sessions:
            return
        name = session.route.destination
        self.sessions.discard(session)
        self._per_destination[name] -= 1
        client = session.client_host
        if client is not None:
            self._per_client[client] -= 1
            if not self._per_client[client]:
                del self._per_client[client]
        counted = self._metrics_of(name)
        counted.active.dec()
        outcome = session.machine.outcome.value
        counted.duration(outcome).observe(self.reactor.seconds() - session.started_at)
        relay = session.relay
        if relay is not None:
            counted.relay_bytes("to_upstream").inc(relay.bytes_to_upstream)
            counted.relay_bytes("to_app").inc(relay.bytes_to_app)
        if self.audit is not None:
            try:
                self.audit.write(self._session_audit(session))
            except Exception:  # a bug of ours must not break the session's bookkeeping
                log.failure("session {sid}: audit record failed", sid=session.sid)

    def _session_audit(self, session: GatewaySession) -> audit_log.SessionAudit:
        """The audit log's line for an ended session (SPEC 9.3)."""
        now = self.reactor.seconds()
        destination, machine, relay = session.destination, session.machine, session.relay
        outcome = machine.outcome.value
        return audit_log.SessionAudit(
            time=now, sid=session.sid, destination=session.route.destination, tenant=session.route.tenant,
            client=session.client, upstream=destination.address if destination is not None else None,
            authentication=destination.authentication if destination is not None else None,
            outcome=outcome, reason=machine.refusal.reason.value if outcome == "refused" else None,
            released=machine.released,
            bytes_to_upstream=relay.bytes_to_upstream if relay is not None else 0,
            bytes_to_app=relay.bytes_to_app if relay is not None else 0,
            seconds=max(0.0, now - session.started_at), tls=session.upstream_tls,
        )

    # -- warm pools ----------------------------------------------------------------------

    def update_pools(self, routes) -> defer.Deferred:
        """Make the warm pools match ``routes`` and their destinations now: start the
        pools of destinations with ``mailgw.pool.size``, replace the connections of
        those whose destination changed, stop the rest."""
        routes = set(routes)
        for route in [r for r in self.pools if r not in routes]:
            self.pools.pop(route).stop()

        def update(destination, route):
            pool = self.pools.get(route)
            if self.draining or not destination.pool_size or families.is_lazy(destination):
                if pool is not None:
                    self.pools.pop(route).stop()
            elif pool is None:
                self.pools[route] = pool = UpstreamPool(self, route, destination)
                pool.start()
            else:
                pool.update(destination)

        def unavailable(failure, route):
            log.info("warm pool {route}: destination not available: {why}", route=str(route), why=failure.getErrorMessage())

        return defer.DeferredList([
            defer.maybeDeferred(self.lookup, route).addCallbacks(update, unavailable, (route,), None, (route,))
            for route in routes
        ])

    def drain(self, timeout: float) -> defer.Deferred:
        """Wait for open sessions to finish, up to ``timeout``; then close the rest."""
        self.draining = True
        for pool in self.pools.values():
            pool.stop()
        self.pools.clear()
        if not self.sessions:
            return defer.succeed(None)
        log.info("draining {count} open sessions (up to {timeout:.0f}s)", count=len(self.sessions), timeout=timeout)
        waiting = defer.DeferredList([s.closed for s in list(self.sessions)], consumeErrors=True)

        def give_up():
            for session in list(self.sessions):
                session.shutdown("the gateway is shutting down")

        timer = self.reactor.callLater(timeout, give_up)
        waiting.addBoth(lambda _: timer.cancel() if timer.active() else None)
        return waiting


class IDrainParticipant(Interface):
    """A child service that takes part in the start of the drain (SIGTERM)."""

    def startDrain():
        """The drain starts: stop taking new work (stop accepting, hand leadership
        over).  May return a Deferred; the gateway waits for it before draining the
        open sessions."""


class GatewayService(service.MultiService):
    """The standalone gateway: its application listeners, the http listener (and the
    send API's), the token client and the send pool.

    ``listeners`` and ``web`` are :class:`~mailgw.listening.ListenerGroup` services:
    every port is bound in ``privilegedStartService``, so a port in use stops start-up
    with a :class:`~mailgw.listening.StartupError` before anything else runs.

    Children providing :class:`IDrainParticipant` (the Kubernetes controller, whose
    listeners are its own) are told when the drain starts.
    """

    #: gateway.yaml's ``logging`` section (set by make_service; the twistd plugin reads it)
    logging = LoggingConfig()

    def __init__(
        self,
        gateway: Gateway,
        config: GatewayConfig | None = None,
        token_client: TokenClient | None = None,
        *,
        owns_proxy: bool = True,
    ):
        super().__init__()
        self.gateway = gateway
        #: the configuration running now (replaced by :meth:`reconfigure`)
        self.config = config
        #: what the process started with: sections a reload does not apply keep it
        self.started_config = config
        #: the send API's resource (its tokens follow a reload), None without a send API
        self.send_resource = None
        self.token_client = token_client
        #: False when the caller supplied the proxy endpoint (tests): a reload keeps it
        self.owns_proxy = owns_proxy
        self.listeners = ListenerGroup(gateway.reactor)  # application listeners
        self.listeners.setServiceParent(self)
        self.web = ListenerGroup(gateway.reactor)  # http listener and the send API's own
        #: more listening sockets for /status (Kubernetes mode: the controller's), each a
        #: callable returning mailgw.status.ListenerInfo values
        self.listener_sources: list = []
        #: more sections of /status: name -> callable returning a JSON-able dict
        #: (the warm pools, Kubernetes mode's ``controller``)
        self.status_providers: dict = {
            "pools": lambda: [pool.status() for pool in gateway.pools.values()],
        }

    def listener_status(self) -> defer.Deferred:
        """Fires with a mailgw.status.ListenerInfo for every listening socket."""
        found = [
            listener_info(item.route.destination, item.route.tenant, item.port)
            for item in self.listeners.listeners if item.port is not None
        ]
        waiting = [defer.succeed(found)]
        waiting += [defer.maybeDeferred(lambda source=source: list(source())) for source in self.listener_sources]
        d = defer.gatherResults(waiting, consumeErrors=True)
        return d.addCallback(lambda lists: [info for found in lists for info in found])

    def send_address(self, name: str) -> defer.Deferred:
        """Where the send API reaches destination ``name``: the host and port of its
        first SMTP listener (``None`` when there is none), as a Deferred."""
        if self.gateway.source.family(name) != "smtp":
            return defer.succeed(None)
        listener = self.listeners.find(
            lambda item: item.route.destination == name and item.route.tenant is None and item.port is not None
        )
        return defer.succeed(_connectable(listener.address) if listener is not None else None)

    def listening_ports(self) -> defer.Deferred:
        """Fires with the application listeners' ports, in configuration order
        (``getHost()`` tells where port 0 landed)."""
        return defer.succeed([item.port for item in self.listeners.listeners])

    def reopen_files(self) -> None:
        """Open the audit file again (SIGHUP after logrotate moved it)."""
        if self.gateway.audit is not None:
            self.gateway.audit.reopen()

    def reconfigure(self, config: GatewayConfig) -> defer.Deferred:
        """Apply a re-read configuration file (SIGHUP, SPEC 9.5).

        Listeners added, removed or changed and destinations changed take effect:
        a removed listener stops accepting (its sessions go on), a new one listens, and
        new sessions use the new destinations, settings and connectivity proxy.  Open
        sessions are untouched.  The http listener, the send API, the token client's
        concurrency, audit and logging keep running as they are until a restart (a log
        line names what changed).

        Fails with :class:`ConfigError` or :class:`StartupError` (a new listener cannot
        listen) and then leaves the running configuration as it was.
        """
        if self.gateway.draining:
            return defer.fail(StartupError("the gateway is shutting down"))
        try:
            check_listening(config, self.gateway.reactor)
        except ConfigError as e:
            return defer.fail(e)
        gateway = self.gateway
        wanted = _application_listeners(config, gateway)
        before = {item.listen for item in self.listeners.listeners}
        after = {item.listen for item in wanted}

        def commit() -> None:
            gateway.source = StaticSource(config.destinations)
            gateway.settings = config.settings
            if self.owns_proxy:
                gateway.proxy_endpoint = _proxy_endpoint(gateway.reactor, config, gateway.tokens)
            if self.token_client is not None:
                self.token_client.deadline = config.settings.token_timeout
            if self.send_resource is not None and config.http is not None and config.http.send is not None:
                # Rotating the tokens (after a leak, say) needs no restart.
                self.send_resource.tokens = BearerTokens(config.http.send.tokens)
            self.config = config

        def report(_: Any) -> None:
            # Warm pools follow: new routes get theirs, changed destinations new connections.
            gateway.update_pools(self._routes())
            log.info(
                "configuration reloaded from {origin}: {listeners} listeners ({added} added, {removed} removed), "
                "{destinations} destinations",
                origin=config.origin, listeners=len(after), added=len(after - before), removed=len(before - after),
                destinations=len(config.destinations),
            )
            pending = _restart_only_changes(self.started_config, config)
            if pending:
                log.warn("{sections} changed in {origin}: this takes effect at the next restart", sections=", ".join(pending), origin=config.origin)

        return self.listeners.replace(wanted, commit).addCallback(report)

    def startService(self):
        super().startService()
        self.gateway.update_pools(self._routes())

    def _routes(self) -> list[Route]:
        return [listener.route for listener in self.listeners.listeners]

    def stopService(self):
        # Stop accepting first, report not ready, then let open sessions finish.
        self.gateway.draining = True
        participants = [child for child in self if IDrainParticipant.providedBy(child)]
        d = defer.gatherResults([defer.maybeDeferred(p.startDrain) for p in participants], consumeErrors=True)
        d.addErrback(lambda f: log.failure("starting the drain failed", f))
        d.addCallback(lambda _: self.listeners.stopService())
        d.addCallback(lambda _: self.gateway.drain(self.gateway.settings.drain_timeout))
        d.addCallback(lambda _: super(GatewayService, self).stopService())
        return d


def _restart_only_changes(running: GatewayConfig | None, new: GatewayConfig) -> list[str]:
    """The sections of ``new`` that differ from what runs since the start (``running``)
    and that a reload does not apply (the send API's tokens it does)."""
    if running is None:
        return []
    changed = []
    if _without_send_tokens(running.http) != _without_send_tokens(new.http):
        changed.append("http")
    if running.audit != new.audit:
        changed.append("audit")
    if running.logging != new.logging:
        changed.append("logging")
    if running.settings.max_token_requests != new.settings.max_token_requests:
        changed.append("limits.maxTokenRequests")
    return changed


def _without_send_tokens(http: HttpConfig | None) -> HttpConfig | None:
    if http is None or http.send is None:
        return http
    return attrs.evolve(http, send=attrs.evolve(http.send, tokens=()))


def _connectable(address) -> tuple[str, int] | None:
    """A listening address as a client on this host can reach it (None: not IP)."""
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    if host is None or port is None:
        return None
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return host, port


def _listening_names(config: GatewayConfig) -> list[tuple[str, str]]:
    named = [(f"listeners[{index}]", listener.listen) for index, listener in enumerate(config.listeners)]
    if config.http is not None:
        named.append(("http", config.http.listen))
        if config.http.send is not None and config.http.send.listen:
            named.append(("http.send", config.http.send.listen))
    return named


def check_listening(config: GatewayConfig, reactor=None, *, send_api: bool = True) -> None:
    """Raise :class:`ConfigError` for what would otherwise fail while binding, with a
    traceback, or leave the send API open (SPEC 9.1, 9.6): an endpoint string Twisted
    cannot use, a port out of range, two listeners on one port, a send API reachable
    from other hosts without tokens (or any send API where ``send_api`` is False: the
    cluster-wide Kubernetes gateway)."""
    if reactor is None:
        from twisted.internet import reactor  # noqa: F811 - endpoints are only built, never bound
    origin = config.origin
    named = _listening_names(config)
    for name, description in named:
        try:
            endpoint_from_string(reactor, description)
        except ValueError as e:
            raise ConfigError(f"{origin}: {name}: invalid endpoint string {description!r}: {e}") from None
    conflict = find_conflict(named)
    if conflict is not None:
        raise ConfigError(f"{origin}: {conflict}")
    send = config.http.send if config.http is not None else None
    if send is None:
        return
    if not send_api:
        raise ConfigError(f"{origin}: http.send: the cluster-wide gateway has no send API (run mailgw as a sidecar for that)")
    where = send.listen or config.http.listen
    if not send.tokens and reachable_off_loopback(where):
        raise ConfigError(
            f"{origin}: http.send: the send API would be reachable from other hosts on {where!r} without tokens: "
            "add http.send.tokens, or listen on loopback (interface=127.0.0.1)"
        )


def _application_listeners(config: GatewayConfig, gateway: Gateway) -> list[Listener]:
    result = []
    for index, listener in enumerate(config.listeners):
        route = Route(listener.destination, listener.tenant)
        result.append(Listener(f"{config.origin}: listeners[{index}]", listener.listen, GatewayFactory(route, gateway), route))
    return result


def _proxy_endpoint(reactor, config: GatewayConfig, tokens):
    proxy = config.connectivity_proxy
    if proxy is None:
        return None
    return socks_proxy(
        reactor, proxy, connect_timeout=config.settings.connect_timeout,
        jwt_for_tenant=lambda tenant: tokens.for_connectivity_proxy(proxy, tenant),
    )


def _count_token_cache(result: str) -> None:
    metrics.TOKEN_CACHE.labels(result).inc()


def _add_web(top: GatewayService, config: GatewayConfig, reactor) -> None:
    """The http listener (probes, metrics, /status), and the send API when ``http.send``
    is configured: on the http listener, or on its own listener."""
    from .web import make_send_site, make_site

    http, send = config.http, config.http.send
    gateway = top.gateway
    send_resource = None
    if send is not None:
        pool = BlockingPool(reactor, "mailgw-send", SEND_POOL_SIZE)
        pool.setServiceParent(top)
        send_resource = SendResource(top.send_address, pool=pool, tokens=BearerTokens(send.tokens), audit=gateway.audit)
        top.send_resource = send_resource
    top.web.setServiceParent(top)
    status = StatusResource(gateway, top.listener_status, top.status_providers)
    if send is not None and send.listen:
        top.web.add(Listener(f"{config.origin}: http", http.listen, make_site(gateway, status=status)))
        top.web.add(Listener(f"{config.origin}: http.send", send.listen, make_send_site(send_resource)))
    else:
        top.web.add(Listener(f"{config.origin}: http", http.listen, make_site(gateway, send_resource, status=status)))


def make_service(
    config: GatewayConfig, reactor=None, *, tokens=None, proxy_endpoint=None, source=None, send_api: bool = True
) -> GatewayService:
    """The gateway for ``config``; nothing listens until the service starts.

    ``source`` replaces the configuration's destinations (Kubernetes mode).  With
    ``send_api`` False there is no send API even when ``http.send`` asks for one (the
    cluster-wide gateway): that is a :class:`ConfigError`, like listeners that cannot
    work (see :func:`check_listening`).
    """
    if reactor is None:
        from twisted.internet import reactor  # noqa: F811 - the global reactor by default
    check_listening(config, reactor, send_api=send_api)
    token_client = None
    if tokens is None:
        token_client = TokenClient(reactor, deadline=config.settings.token_timeout, max_concurrent=config.settings.max_token_requests)
        tokens = TokenProvider(token_client, TokenCache(reactor, observe=_count_token_cache))
    owns_proxy = proxy_endpoint is None
    if owns_proxy:
        proxy_endpoint = _proxy_endpoint(reactor, config, tokens)
    try:
        audit = audit_log.from_config(config, reactor)
    except audit_log.AuditOpenError as e:
        raise ConfigError(f"{config.origin}: {e}") from None
    gateway = Gateway(
        reactor, config.settings, source or StaticSource(config.destinations),
        tokens=tokens, proxy_endpoint=proxy_endpoint,
        audit=audit, status=StatusBoard(reactor),
    )
    gateway.debug = config.logging.level == "debug"
    top = GatewayService(gateway, config, token_client, owns_proxy=owns_proxy)
    top.logging = config.logging
    if audit is not None:
        # Stops after the listeners' drain; records of sessions that end before it
        # starts wait in its queue.
        audit.setServiceParent(top)
    if token_client is not None:
        token_client.setServiceParent(top)  # its thread pool starts and stops with us
    for listener in _application_listeners(config, gateway):
        top.listeners.add(listener)
    if config.http is not None:
        _add_web(top, config, reactor)
    return top
