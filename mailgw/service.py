"""Builds the running gateway: listeners, the http listener and send API, draining on
stop, and applying a re-read configuration file (SIGHUP, standalone mode)."""

from __future__ import annotations

from collections import Counter
from typing import Any, Mapping

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from . import metrics
from .blocking import BlockingPool
from .config import ConfigError, GatewayConfig, ProxyConfig
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
from .send.connection import POOL_SIZE as SEND_POOL_SIZE
from .send.http import BearerTokens, SendResource
from .session import GatewayFactory, GatewaySession
from .settings import Route, Settings

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
    """What every session shares: reactor, settings, destinations, tokens, proxy."""

    def __init__(self, reactor, settings: Settings, source, *, tokens=None, proxy: ProxyConfig | None = None, proxy_endpoint=None):
        self.reactor = reactor
        self.settings = settings
        self.source = source
        self.tokens = tokens
        self.proxy = proxy
        self.proxy_endpoint = proxy_endpoint  # (destination, tenant) -> IStreamClientEndpoint
        self.sessions: set[GatewaySession] = set()
        self._per_destination: Counter[str] = Counter()
        self.draining = False
        #: more conditions for readiness (Kubernetes mode: the controller has synced)
        self.readiness_checks: list = []

    @property
    def ready(self) -> bool:
        """Serving: not draining, and every readiness check passes."""
        return not self.draining and all(check() for check in self.readiness_checks)

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

    def session_started(self, session: GatewaySession) -> None:
        self.sessions.add(session)
        self._per_destination[session.route.destination] += 1
        metrics.SESSIONS_ACCEPTED.labels(session.route.destination).inc()
        metrics.SESSIONS_ACTIVE.labels(session.route.destination).inc()

    def session_ended(self, session: GatewaySession) -> None:
        if session in self.sessions:
            self.sessions.discard(session)
            self._per_destination[session.route.destination] -= 1
            metrics.SESSIONS_ACTIVE.labels(session.route.destination).dec()

    def over_session_limit(self, session: GatewaySession) -> bool:
        return self._per_destination[session.route.destination] > self.settings.max_sessions_per_destination

    def drain(self, timeout: float) -> defer.Deferred:
        """Wait for open sessions to finish, up to ``timeout``; then close the rest."""
        self.draining = True
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


class GatewayService(service.MultiService):
    """The standalone gateway: its application listeners, the http listener (and the
    send API's), the token client and the send pool.

    ``listeners`` and ``web`` are :class:`~mailgw.listening.ListenerGroup` services:
    every port is bound in ``privilegedStartService``, so a port in use stops start-up
    with a :class:`~mailgw.listening.StartupError` before anything else runs.
    """

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
        self.token_client = token_client
        #: False when the caller supplied the proxy endpoint (tests): a reload keeps it
        self.owns_proxy = owns_proxy
        self.listeners = ListenerGroup(gateway.reactor)  # application listeners
        self.listeners.setServiceParent(self)
        self.web = ListenerGroup(gateway.reactor)  # http listener and the send API's own

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
        old = self.config
        gateway = self.gateway
        wanted = _application_listeners(config, gateway)
        before = {item.listen for item in self.listeners.listeners}
        after = {item.listen for item in wanted}

        def commit() -> None:
            gateway.source = StaticSource(config.destinations)
            gateway.settings = config.settings
            if self.owns_proxy:
                gateway.proxy = config.connectivity_proxy
                gateway.proxy_endpoint = _proxy_endpoint(gateway.reactor, config, gateway.tokens)
            if self.token_client is not None:
                self.token_client.timeout = self.token_client.deadline = config.settings.token_timeout
            self.config = config

        def report(_: Any) -> None:
            log.info(
                "configuration reloaded from {origin}: {listeners} listeners ({added} added, {removed} removed), "
                "{destinations} destinations",
                origin=config.origin, listeners=len(after), added=len(after - before), removed=len(before - after),
                destinations=len(config.destinations),
            )
            pending = _restart_only_changes(old, config)
            if pending:
                log.warn("{sections} changed in {origin}: this takes effect at the next restart", sections=", ".join(pending), origin=config.origin)

        return self.listeners.replace(wanted, commit).addCallback(report)

    def stopService(self):
        # Stop accepting first, report not ready, then let open sessions finish.
        self.gateway.draining = True
        d = defer.maybeDeferred(self.listeners.stopService)
        d.addCallback(lambda _: self.gateway.drain(self.gateway.settings.drain_timeout))
        d.addCallback(lambda _: super(GatewayService, self).stopService())
        return d


def _restart_only_changes(old: GatewayConfig | None, new: GatewayConfig) -> list[str]:
    """The sections of ``new`` that differ from ``old`` but are not applied by a reload."""
    if old is None:
        return []
    changed = []
    if old.http != new.http:
        changed.append("http")
    if old.audit != new.audit:
        changed.append("audit")
    if old.logging != new.logging:
        changed.append("logging")
    if old.settings.max_token_requests != new.settings.max_token_requests:
        changed.append("limits.maxTokenRequests")
    return changed


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


def check_listening(config: GatewayConfig, reactor=None, *, kubernetes: bool = False) -> None:
    """Raise :class:`ConfigError` for what would otherwise fail while binding, with a
    traceback, or leave the send API open (SPEC 9.1, 9.6): an endpoint string Twisted
    cannot use, a port out of range, two listeners on one port, a send API reachable
    from other hosts without tokens (or any send API in Kubernetes mode)."""
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
    if kubernetes:
        raise ConfigError(f"{origin}: http.send: the cluster-wide Kubernetes gateway has no send API (run mailgw as a sidecar for it)")
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
    """The http listener, and the send API when ``http.send`` is configured: on the
    http listener, or on its own listener."""
    from .web import make_send_site, make_site

    http, send = config.http, config.http.send
    send_resource = None
    if send is not None:
        pool = BlockingPool(reactor, "mailgw-send", SEND_POOL_SIZE)
        pool.setServiceParent(top)
        send_resource = SendResource(top.send_address, pool=pool, tokens=BearerTokens(send.tokens))
    top.web.setServiceParent(top)
    if send is not None and send.listen:
        top.web.add(Listener(f"{config.origin}: http", http.listen, make_site(top.gateway)))
        top.web.add(Listener(f"{config.origin}: http.send", send.listen, make_send_site(send_resource)))
    else:
        top.web.add(Listener(f"{config.origin}: http", http.listen, make_site(top.gateway, send_resource)))


def make_service(config: GatewayConfig, reactor=None, *, tokens=None, proxy_endpoint=None, source=None) -> GatewayService:
    """The gateway for ``config``; nothing listens until the service starts.

    ``source`` replaces the configuration's destinations (Kubernetes mode: no send API).
    Raises :class:`ConfigError` for listeners that cannot work (see
    :func:`check_listening`).
    """
    if reactor is None:
        from twisted.internet import reactor  # noqa: F811 - the global reactor by default
    check_listening(config, reactor, kubernetes=source is not None)
    token_client = None
    if tokens is None:
        token_client = TokenClient(reactor, timeout=config.settings.token_timeout, max_concurrent=config.settings.max_token_requests)
        tokens = TokenProvider(token_client, TokenCache(reactor, observe=_count_token_cache))
    owns_proxy = proxy_endpoint is None
    if owns_proxy:
        proxy_endpoint = _proxy_endpoint(reactor, config, tokens)
    gateway = Gateway(
        reactor, config.settings, source or StaticSource(config.destinations),
        tokens=tokens, proxy=config.connectivity_proxy, proxy_endpoint=proxy_endpoint,
    )
    top = GatewayService(gateway, config, token_client, owns_proxy=owns_proxy)
    if token_client is not None:
        token_client.setServiceParent(top)  # its thread pool starts and stops with us
    for listener in _application_listeners(config, gateway):
        top.listeners.add(listener)
    if config.http is not None:
        _add_web(top, config, reactor)
    return top
