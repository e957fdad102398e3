"""The contract between the Kubernetes controller and the gateway's listeners.

The controller decides *which* routes this pod serves and on which port; the gateway (an
:class:`IListenerManager` implemented with the real session machinery) opens and closes
the listening sockets.  Every replica opens listeners for every route, leader or not:
the EndpointSlices send traffic to all ready gateway pods.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface, implementer

from mailgw.destination import Destination
from mailgw.kube.model import Route


class IRouteDestination(Interface):
    """What a listener asks, at the start of each session, for its route's destination."""

    route = Attribute("The :class:`~mailgw.kube.model.Route` served.")

    def lookup() -> "Deferred[Destination]":
        """The route's destination now (cached; follows changes of the CR and of the
        destination).  Fails with a DestinationLookupError subclass whose ``message`` is
        fit for the application's refusal line."""

    def can_exchange() -> bool:
        """True when the destination's source exchanges refresh tokens / authorization
        codes itself (the destination service); otherwise the gateway uses the
        destination's tokenServiceURL with its own OAuth2 client."""

    def exchange(*, refresh_token: str | None = None, code: str | None = None) -> "Deferred[Any]":
        """Ask the source to exchange the application's secret; fires with a
        :class:`~mailgw.sources.base.FindResult` whose ``auth_tokens[0].value`` is the
        upstream access token, or fails with ``TokenExchangeFailed``."""


class IListenerManager(Interface):
    """Opens and closes the gateway's listeners for routes (implemented by the gateway)."""

    def open(route: Route, port: int, destination: IRouteDestination) -> "Deferred[None]":
        """Listen on ``port`` (all interfaces of the pod) for ``route``.  Called again with
        a new port when the allocation moves (after :meth:`close`).  Fails when the port
        cannot be bound; the controller then allocates another one."""

    def close(route: Route) -> "Deferred[None]":
        """Stop listening for ``route``.  Sessions already running may finish; they must
        not be disturbed by listeners of other routes coming and going."""


@implementer(IRouteDestination)
class RouteDestination:
    """:class:`IRouteDestination` backed by the controller's current view of the CR."""

    def __init__(
        self,
        route: Route,
        lookup: Callable[[Route], "Deferred[Destination]"],
        exchange: Callable[..., "Deferred[Any]"],
        can_exchange: Callable[[Route], bool],
    ):
        self.route = route
        self._lookup = lookup
        self._exchange = exchange
        self._can_exchange = can_exchange

    def lookup(self) -> "Deferred[Destination]":
        return self._lookup(self.route)

    def can_exchange(self) -> bool:
        return self._can_exchange(self.route)

    def exchange(self, *, refresh_token: str | None = None, code: str | None = None) -> "Deferred[Any]":
        return self._exchange(self.route, refresh_token=refresh_token, code=code)

    def __repr__(self) -> str:
        return f"<RouteDestination {self.route.key}>"
