"""Builds the running gateway: listeners, the http listener, draining on stop."""

from __future__ import annotations

from collections import Counter
from typing import Mapping

from twisted.application import internet, service
from twisted.internet import defer, endpoints
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface

from . import audit as audit_log
from . import logs, metrics
from .config import ConfigError, GatewayConfig, LoggingConfig, ProxyConfig
from .destination import OAUTH2_CLIENT_CREDENTIALS, Destination
from .endpoints.chain import socks_proxy, upstream_endpoint
from .errors import GatewayError
from .oauth import AccessToken, TokenCache, TokenClient, TokenProvider
from .pool import UpstreamPool
from .protocol.refusal import Reason, Refusal
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
        self, reactor, settings: Settings, source, *, tokens=None, proxy: ProxyConfig | None = None, proxy_endpoint=None,
        audit=None, status: StatusBoard | None = None,
    ):
        self.reactor = reactor
        self.settings = settings
        self.source = source
        self.tokens = tokens
        self.proxy = proxy
        self.proxy_endpoint = proxy_endpoint  # (destination, tenant) -> IStreamClientEndpoint
        self.sessions: set[GatewaySession] = set()
        self._per_destination: Counter[str] = Counter()
        self._per_client: Counter[str] = Counter()
        self.draining = False
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

    def lookup(self, route: Route):
        return self.source.lookup(route.destination, route.tenant)

    def exchange(self, route: Route, destination: Destination, secret: str) -> defer.Deferred:
        """The upstream access token for the application's refresh token or authorization
        code: from the destination's source when it exchanges secrets itself (the
        destination service in Kubernetes mode), else from the token service."""
        by_source = getattr(self.source, "exchange", None)
        d = by_source(route.destination, destination, secret) if by_source is not None else None
        if d is None:
            d = self.tokens.exchange(destination, route.tenant, secret).addCallback(lambda token: token.access_token)
        return d

    def family_of(self, route: Route) -> str:
        """The protocol family to refuse in when the destination itself is unavailable."""
        return self.source.family(route.destination) or "smtp"

    def upstream_endpoint(self, destination: Destination, tenant: str | None):
        return upstream_endpoint(
            self.reactor, destination, tenant,
            connect_timeout=self.settings.connect_timeout, proxy=self.proxy_endpoint,
        )

    # -- the sessions' reports ---------------------------------------------------------

    def session_started(self, session: GatewaySession) -> Refusal | None:
        """Count a new session; the refusal when it is over a limit (SPEC 6, 9.6)."""
        name, client = session.route.destination, _client_host(session.client)
        self.sessions.add(session)
        self._per_destination[name] += 1
        self._per_client[client] += 1
        metrics.SESSIONS_ACCEPTED.labels(name).inc()
        metrics.SESSIONS_ACTIVE.labels(name).inc()
        if self._per_destination[name] > self.settings.max_sessions_per_destination:
            return Refusal("too many sessions for this destination, try again later", Reason.LIMIT, permanent=False)
        if self._per_client[client] > self.settings.max_sessions_per_client:
            return Refusal(f"too many sessions from {client}, try again later", Reason.LIMIT, permanent=False)
        return None

    def session_refused(self, session: GatewaySession, refusal: Refusal) -> None:
        metrics.SESSIONS_REFUSED.labels(session.route.destination, refusal.reason.value).inc()
        self.status.destination_failed(session.route.destination, refusal.text, kind=refusal.reason.value)

    def session_milestone(self, session: GatewaySession, name: str) -> None:
        """``connected``, ``tls``, ``login``, ``greeted``, ``released``."""
        if name == "login":  # reached the upstream and logged in: /status's last success
            self.status.destination_succeeded(session.route.destination)
            self._note_token_expiry(session)

    def _note_token_expiry(self, session: GatewaySession) -> None:
        """/status: when the client-credentials token the session used expires (read
        from the token cache; the token itself never leaves it)."""
        destination = session.destination
        if destination is None or destination.authentication != OAUTH2_CLIENT_CREDENTIALS:
            return
        cache, key_of = getattr(self.tokens, "cache", None), getattr(self.tokens, "client_credentials_key", None)
        if cache is None or key_of is None:
            return
        token = cache.peek(key_of(destination, session.route.tenant))
        if isinstance(token, AccessToken):
            self.status.token_expires(session.route.destination, token.expires_at)

    def upstream_phase(self, session: GatewaySession, phase: str, seconds: float) -> None:
        metrics.UPSTREAM_SECONDS.labels(session.route.destination, phase).observe(seconds)

    def session_ended(self, session: GatewaySession) -> None:
        if session not in self.sessions:
            return
        name = session.route.destination
        self.sessions.discard(session)
        self._per_destination[name] -= 1
        client = _client_host(session.client)
        self._per_client[client] -= 1
        if not self._per_client[client]:
            del self._per_client[client]
        metrics.SESSIONS_ACTIVE.labels(name).dec()
        outcome = session.machine.outcome.value
        metrics.SESSION_DURATION.labels(name, outcome).observe(self.reactor.seconds() - session.started_at)
        relay = session.relay
        if relay is not None:
            metrics.RELAY_BYTES.labels(name, "to_upstream").inc(relay.bytes_to_upstream)
            metrics.RELAY_BYTES.labels(name, "to_app").inc(relay.bytes_to_app)
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
            if self.draining or not destination.pool_size or destination.lazy:
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


def _client_host(client: str) -> str:
    """The address part of ``host:port`` (IPv6 addresses have colons of their own)."""
    return client.rsplit(":", 1)[0]


class IDrainParticipant(Interface):
    """A child service that takes part in the start of the drain (SIGTERM)."""

    def startDrain():
        """The drain starts: stop taking new work (stop accepting, hand leadership
        over).  May return a Deferred; the gateway waits for it before draining the
        open sessions."""


class GatewayService(service.MultiService):
    """The standalone gateway: one listening service per listener, plus http.

    Children providing :class:`IDrainParticipant` (the Kubernetes controller, whose
    listeners are its own) are told when the drain starts.
    """

    #: gateway.yaml's ``logging`` section (set by make_service)
    logging = LoggingConfig()
    #: set by the twistd plugin when gateway.yaml asks for JSON logs (mailgw.logs)
    log_observer = None

    def __init__(self, gateway: Gateway):
        super().__init__()
        self.gateway = gateway
        self.listeners = service.MultiService()
        self.listeners.setServiceParent(self)
        #: more listening sockets for /status (Kubernetes mode: the controller's), each a
        #: callable returning mailgw.status.ListenerInfo values
        self.listener_sources: list = []
        #: more sections of /status: name -> callable returning a JSON-able dict
        #: (the warm pools, Kubernetes mode's ``controller``)
        self.status_providers: dict = {
            "pools": lambda: [pool.status() for pool in gateway.pools.values()],
        }

    def setServiceParent(self, parent):
        super().setServiceParent(parent)
        if self.log_observer is not None:
            # twistd's application: its AppLogger logs to this component (mailgw.logs)
            logs.offer_observer(parent, self.log_observer)

    def listener_status(self) -> defer.Deferred:
        """Fires with a mailgw.status.ListenerInfo for every listening socket."""

        def one(listening):
            route = listening.route
            d = _port_of(listening)
            return d.addCallbacks(lambda port: [listener_info(route.destination, route.tenant, port)], lambda _: [])

        waiting = [one(listening) for listening in self.listeners if listening.running]
        waiting += [defer.maybeDeferred(lambda source=source: list(source())) for source in self.listener_sources]
        d = defer.gatherResults(waiting, consumeErrors=True)
        return d.addCallback(lambda lists: [info for found in lists for info in found])

    def send_address(self, name: str):
        """Where the send API reaches destination ``name``: the host and port of its
        first SMTP listener (``None`` when there is none), as a Deferred."""
        if self.gateway.source.family(name) != "smtp":
            return defer.succeed(None)
        for listener in self.listeners:
            if listener.route.destination == name and listener.route.tenant is None:
                return _port_of(listener).addCallback(_connectable)
        return defer.succeed(None)

    def listening_ports(self) -> defer.Deferred:
        """Fires with the listening ports (``getHost()`` tells where port 0 landed)."""
        return defer.gatherResults([_port_of(s) for s in self.listeners])

    def startService(self):
        super().startService()
        self.gateway.update_pools([listener.route for listener in self.listeners])

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


def _port_of(listening: internet.StreamServerEndpointService) -> defer.Deferred:
    """A new Deferred for the service's listening port, leaving the service's own alone.

    StreamServerEndpointService keeps its port Deferred privately (and stops the port
    through it); this is the one place that reads it.
    """
    observed = defer.Deferred()

    def tell(result):
        observed.callback(result) if not isinstance(result, Failure) else observed.errback(result)
        return result

    listening._waitingForPort.addBoth(tell)
    return observed


def _connectable(port) -> tuple[str, int]:
    """A listening port's address as a client on this host can reach it."""
    address = port.getHost()
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(address.host, address.host)
    return host, address.port


def _server_endpoint(reactor, description: str, where: str):
    try:
        return endpoints.serverFromString(reactor, description)
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"{where}: invalid endpoint string {description!r}: {e}") from None


def make_service(
    config: GatewayConfig, reactor=None, *, tokens=None, proxy_endpoint=None, source=None, send_api: bool = True
) -> GatewayService:
    """The gateway for ``config``; nothing listens until the service starts.

    ``source`` replaces the configuration's destinations (Kubernetes mode).  With
    ``send_api`` False the http listener serves no send API (the cluster-wide gateway).
    """
    if reactor is None:
        from twisted.internet import reactor  # noqa: F811 - the global reactor by default
    token_client = None
    if tokens is None:
        token_client = TokenClient(reactor, timeout=config.settings.token_timeout, max_concurrent=config.settings.max_token_requests)
        tokens = TokenProvider(token_client, TokenCache(reactor))
    if proxy_endpoint is None and config.connectivity_proxy is not None:
        proxy_endpoint = socks_proxy(
            reactor, config.connectivity_proxy, connect_timeout=config.settings.connect_timeout,
            jwt_for_tenant=lambda tenant: tokens.for_connectivity_proxy(config.connectivity_proxy, tenant),
        )
    try:
        audit = audit_log.from_config(config, reactor)
    except audit_log.AuditOpenError as e:
        raise ConfigError(f"{config.origin}: {e}") from None
    gateway = Gateway(
        reactor, config.settings, source or StaticSource(config.destinations),
        tokens=tokens, proxy=config.connectivity_proxy, proxy_endpoint=proxy_endpoint,
        audit=audit, status=StatusBoard(reactor),
    )
    top = GatewayService(gateway)
    top.logging = config.logging
    if audit is not None:
        # Stops after the listeners' drain; records of sessions that end before it
        # starts wait in its queue.
        audit.setServiceParent(top)
    if token_client is not None:
        token_client.setServiceParent(top)  # its thread pool starts and stops with us
    for index, listener in enumerate(config.listeners):
        route = Route(listener.destination, listener.tenant)
        endpoint = _server_endpoint(reactor, listener.listen, f"{config.origin}: listeners[{index}]")
        listening = internet.StreamServerEndpointService(endpoint, GatewayFactory(route, gateway))
        listening._raiseSynchronously = True  # a port in use fails start-up, loudly
        listening.setName(f"listener {route} on {listener.listen}")
        listening.route = route
        listening.setServiceParent(top.listeners)
    if config.http is not None:
        from .web import make_site

        endpoint = _server_endpoint(reactor, config.http.listen, f"{config.origin}: http")
        http = internet.StreamServerEndpointService(endpoint, make_site(
            gateway, top.send_address if send_api else None,
            status=StatusResource(gateway, top.listener_status, top.status_providers),
        ))
        http._raiseSynchronously = True
        http.setServiceParent(top)
    return top


