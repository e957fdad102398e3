"""``twistd -n mailgw --kubernetes``: the controller opens gateway listeners per route.

The controller (``mailgw.kube.controller``) decides which routes exist and on which
port; :class:`ListenerManager` opens real gateway listeners for them, each with a
:class:`RouteSource` of its own that answers its sessions' destination lookups through
the controller's view of the CR (so a changed destination applies to the next session).
"""

from __future__ import annotations

import errno
import os
import socket

import attrs
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.error import CannotListenError
from zope.interface import implementer

from ..config import ConfigError, HttpConfig, load_config, parse_config
from ..destination import OAUTH2_REFRESH_TOKEN
from ..errors import GatewayError
from ..listening import DEFAULT_BACKLOG
from ..oauth import TokenError
from ..service import GatewayService, StaticSource, make_service
from ..session import GatewayFactory
from ..settings import Route as ListenerRoute
from ..sources.base import DestinationLookupError
from ..status import listener_info
from .listeners import IListenerManager, IRouteDestination
from .model import Route

DEFAULT_HTTP = "tcp:9494"  # probes and metrics; the Deployment points at this port


class RouteSource:
    """The destination source of one controller-opened listener, carried by its route
    (:attr:`mailgw.settings.Route.source`): its sessions ask it directly, never a table
    by name, so a session keeps it after the listener has closed (the drain, the CR
    deleted, a port moved) and still exchanges its secret where the route says."""

    def __init__(self, destination: IRouteDestination):
        self.destination = destination
        self._family: str | None = None

    def lookup(self, name: str, tenant: str | None = None):
        def remember(destination):
            self._family = destination.family
            return destination

        def explain(failure):
            failure.trap(DestinationLookupError)
            raise GatewayError(getattr(failure.value, "message", None) or str(failure.value))

        return self.destination.lookup().addCallbacks(remember, explain)

    def family(self, name: str) -> str | None:
        return self._family

    def exchange(self, name: str, destination, secret: str):
        """The destination service's token for the application's secret (sent as
        ``X-refresh-token`` or ``X-code``), or ``None`` when the route's source does not
        exchange secrets (the gateway then uses the destination's token service)."""
        if not self.destination.can_exchange():
            return None
        if destination.authentication == OAUTH2_REFRESH_TOKEN:
            d = self.destination.exchange(refresh_token=secret)
        else:
            d = self.destination.exchange(code=secret)

        def explain(failure):
            failure.trap(DestinationLookupError)
            raise TokenError("destination_service", f"destination service: {failure.value}")

        # (the source checked the token: see BtpSource._check_tokens)
        return d.addCallbacks(lambda result: result.auth_tokens[0].value, explain)


def listen_tcp(reactor, port: int, factory, interface: str = ""):
    """Listen on ``port``: on ``interface`` when given, else on every address of both
    families -- one dual-stack socket (``IPV6_V6ONLY`` off, whatever the host's default),
    or IPv4 alone where the pod has no IPv6.  Every way listens with the gateway's
    backlog (SPEC 9.6), not Twisted's 50.  Fires with the listening port."""
    if interface:
        endpoint_class = TCP6ServerEndpoint if ":" in interface else TCP4ServerEndpoint
        return endpoint_class(reactor, port, backlog=DEFAULT_BACKLOG, interface=interface).listen(factory)
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    except OSError:
        return TCP4ServerEndpoint(reactor, port, backlog=DEFAULT_BACKLOG).listen(factory)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", port))
        sock.listen(DEFAULT_BACKLOG)
        sock.setblocking(False)
        listening = reactor.adoptStreamPort(sock.fileno(), socket.AF_INET6, factory)
    except OSError as e:
        if e.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):  # IPv6 switched off
            return TCP4ServerEndpoint(reactor, port, backlog=DEFAULT_BACKLOG).listen(factory)
        return defer.fail(CannotListenError("::", port, e))
    finally:
        sock.close()  # the reactor has its own duplicate
    return defer.succeed(listening)


@implementer(IListenerManager)
class ListenerManager:
    """Real listeners: one TCP port per route, IPv4 and IPv6 (``interface``: one only)."""

    def __init__(self, reactor, gateway, interface: str = ""):
        self.reactor = reactor
        self.gateway = gateway
        self.interface = interface
        self.ports: dict[Route, object] = {}
        #: the session layer's route of each open listener (it carries the source)
        self.routes: dict[Route, ListenerRoute] = {}

    def open(self, route: Route, port: int, destination: IRouteDestination):
        listener_route = route.listener_route(source=RouteSource(destination))
        factory = GatewayFactory(listener_route, self.gateway)
        factory.noisy = False

        def listening(listening_port):
            self.ports[route] = listening_port
            self.routes[route] = listener_route
            self._update_pools()

        return listen_tcp(self.reactor, port, factory, self.interface).addCallback(listening)

    def close(self, route: Route):
        # Sessions already running keep their connections and their route's source.
        listening_port = self.ports.pop(route, None)
        self.routes.pop(route, None)
        if listening_port is None:
            return defer.succeed(None)
        self._update_pools()
        return defer.maybeDeferred(listening_port.stopListening)

    def _update_pools(self) -> None:
        """Warm pools (SPEC 9.7) for the routes served now."""
        self.gateway.update_pools(list(self.routes.values()))


def make_kubernetes_service(reactor, config_path: str | None, *, api=None, settings=None) -> GatewayService:
    """The cluster-wide gateway: http listener (no send API), token client, controller
    (the child service named ``kubernetes``) and the listeners it opens."""
    from .client import KubeApi, load_api_client
    from .config import parse_kube_section
    from .controller import KubeController

    try:
        config = load_config(config_path) if config_path else parse_config({}, "(no --config)")
        if config.http is None:  # the probes and metrics need it
            config = attrs.evolve(config, http=HttpConfig(DEFAULT_HTTP))
        if config.http.send is not None:
            raise ConfigError(
                f"{config.origin}: http.send: the cluster-wide gateway has no send API "
                "(run mailgw as a sidecar for that)"
            )
        parsed_settings, kubeconfig = parse_kube_section(config.kubernetes, config.origin)
    except (ConfigError, ValueError) as e:
        raise SystemExit(f"mailgw: configuration error: {e}") from None
    settings = settings or parsed_settings
    if api is None:
        api_client = load_api_client(kubeconfig or os.environ.get("KUBECONFIG"), identity=settings.identity)
        api = KubeApi(api_client, timeout=settings.api_timeout)
    # every listener the controller opens brings its route's own source (RouteSource)
    service = make_service(config, reactor, source=StaticSource({}), send_api=False)
    listeners = ListenerManager(reactor, service.gateway, settings.listen_interface)
    controller = KubeController.create(api, listeners, settings, reactor, tokens=service.gateway.tokens)
    controller.setServiceParent(service)
    service.gateway.add_readiness_check("controller not synced", lambda: controller.ready)  # initial lists in
    # /status: the controller's listeners and its state (mailgw.status)
    service.listener_sources.append(lambda: [
        listener_info(route.listener_route().destination, route.tenant, port, name=route.key)
        for route, port in list(listeners.ports.items())
    ])
    service.status_providers["controller"] = controller.status
    return service

