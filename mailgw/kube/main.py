"""``twistd -n mailgw --kubernetes``: the controller opens gateway listeners per route.

The controller (``mailgw.kube.controller``) decides which routes exist and on which
port; :class:`ListenerManager` opens real gateway listeners for them, and
:class:`RouteSource` answers each session's destination lookup through the controller's
view of the CR (so a changed destination applies to the next session).
"""

from __future__ import annotations

import os

import attrs
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ServerEndpoint
from zope.interface import implementer

from ..config import ConfigError, HttpConfig, load_config, parse_config
from ..destination import OAUTH2_REFRESH_TOKEN
from ..errors import GatewayError
from ..oauth import TokenError
from ..protocol.common import printable
from ..service import GatewayService, make_service
from ..session import GatewayFactory
from ..settings import Route as SessionRoute
from ..status import listener_info
from .listeners import IListenerManager, IRouteDestination
from .model import Route
from .sources import DestinationLookupError

DEFAULT_HTTP = "tcp:9494"  # probes and metrics; the Deployment points at this port


class RouteSource:
    """Destinations for sessions on controller-opened listeners, keyed by ``Route.key``."""

    def __init__(self):
        self.routes: dict[str, IRouteDestination] = {}
        self._families: dict[str, str] = {}

    def lookup(self, name: str, tenant: str | None = None):
        route_destination = self.routes.get(name)
        if route_destination is None:
            raise GatewayError(f"route {name} is no longer served")

        def remember(destination):
            self._families[name] = destination.family
            return destination

        def explain(failure):
            failure.trap(DestinationLookupError)
            raise GatewayError(getattr(failure.value, "message", None) or str(failure.value))

        return route_destination.lookup().addCallbacks(remember, explain)

    def family(self, name: str) -> str | None:
        return self._families.get(name)

    def exchange(self, name: str, destination, secret: str):
        """The destination service's token for the application's secret (sent as
        ``X-refresh-token`` or ``X-code``), or ``None`` when the route's source does not
        exchange secrets (the gateway then uses the destination's token service)."""
        route_destination = self.routes.get(name)
        if route_destination is None or not route_destination.can_exchange():
            return None
        if destination.authentication == OAUTH2_REFRESH_TOKEN:
            d = route_destination.exchange(refresh_token=secret)
        else:
            d = route_destination.exchange(code=secret)

        def token_of(result):
            for token in result.auth_tokens:
                if token.value and not token.error:
                    return token.value
            # The service's own error text: made printable and short before it is shown.
            errors = "; ".join(printable(t.error.encode("utf-8", "replace"), 120) for t in result.auth_tokens if t.error)
            errors = errors or "no token returned"
            raise TokenError("destination_service", f"destination service: {errors}")

        def explain(failure):
            failure.trap(DestinationLookupError)
            raise TokenError("destination_service", f"destination service: {failure.value}")

        return d.addCallbacks(token_of, explain)


@implementer(IListenerManager)
class ListenerManager:
    """Real listeners: one TCP port per route, all interfaces of the pod."""

    def __init__(self, reactor, gateway, source: RouteSource, interface: str = ""):
        self.reactor = reactor
        self.gateway = gateway
        self.source = source
        self.interface = interface
        self.ports: dict[Route, object] = {}

    def open(self, route: Route, port: int, destination: IRouteDestination):
        self.source.routes[route.key] = destination
        endpoint = TCP4ServerEndpoint(self.reactor, port, interface=self.interface)
        factory = GatewayFactory(SessionRoute(route.key, route.tenant), self.gateway)
        factory.noisy = False

        def listening(listening_port):
            self.ports[route] = listening_port

        return endpoint.listen(factory).addCallback(listening)

    def close(self, route: Route):
        # Sessions already running keep their connections and their destination.
        self.source.routes.pop(route.key, None)
        listening_port = self.ports.pop(route, None)
        if listening_port is None:
            return defer.succeed(None)
        return defer.maybeDeferred(listening_port.stopListening)


def make_kubernetes_service(reactor, config_path: str | None, *, api=None, settings=None) -> GatewayService:
    """The cluster-wide gateway: http listener, token client, controller, listeners."""
    from .client import KubeApi, load_api_client
    from .config import parse_kube_section
    from .controller import KubeController

    try:
        config = load_config(config_path) if config_path else parse_config({}, "(no --config)")
        if config.http is None:  # the probes and metrics need it
            config = attrs.evolve(config, http=HttpConfig(DEFAULT_HTTP))
        parsed_settings, kubeconfig = parse_kube_section(config.kubernetes, config.origin)
    except (ConfigError, ValueError) as e:
        raise SystemExit(f"mailgw: configuration error: {e}") from None
    settings = settings or parsed_settings
    if api is None:
        api = KubeApi(load_api_client(kubeconfig or os.environ.get("KUBECONFIG")), timeout=settings.api_timeout)
    source = RouteSource()
    service = make_service(config, reactor, source=source)
    listeners = ListenerManager(reactor, service.gateway, source)
    controller = KubeController.create(api, listeners, settings, reactor)
    controller.setServiceParent(service)
    service.controller = controller
    service.gateway.add_readiness_check("controller not synced", lambda: controller.ready)  # initial lists in
    # /status: the controller's listeners and its state (mailgw.status)
    service.listener_sources.append(lambda: [
        listener_info(route.key, route.tenant, port, name=route.key) for route, port in list(listeners.ports.items())
    ])
    service.status_providers["controller"] = lambda: _controller_status(controller)
    return service


def _controller_status(controller) -> dict:
    """The ``controller`` section of /status: the controller's own ``status()`` when it
    has one, else what its public attributes tell."""
    status = getattr(controller, "status", None)
    if callable(status):
        return status()
    return {"leader": controller.is_leader, "synced": controller.ready}
