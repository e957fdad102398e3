"""``/status`` on the http listener, and the board the sessions report into.

:class:`StatusBoard` keeps, per destination (the route's destination, the same value
as the metrics' ``destination`` label), the last success, the last failure with its
reason, and when the current access token expires -- the time only, never the token.
Sessions call it; it is bounded (old destinations fall off) and cheap (dict updates on
the reactor thread).

:class:`StatusResource` renders ``GET /status`` as JSON::

    {"version": "0.1.0", "time": "...", "ready": true, "not_ready": [],
     "listeners": [{"route": "office", "destination": "office", "tenant": null,
                    "address": "127.0.0.1:2465", "sessions": 2}],
     "destinations": {"office": {"sessions": 2,
                                 "last_success": {"time": "..."},
                                 "last_failure": {"time": "...", "reason": "...", "kind": "auth"},
                                 "token_expires": "...", "token_expires_in": 3412.5}},
     "audit": {"path": "...", "queued": 0, "written": 17, "dropped": 0, "failing": false},
     "pool": {...}, "controller": {...}}

``pool`` and ``controller`` (and any other section) come from *providers*: callables
returning a JSON-able dict, registered on the page (``GatewayService.status_providers``)
by whoever owns that part -- the warm pool, the Kubernetes controller.  A provider that
fails shows ``{"error": "<exception type>"}`` instead of breaking the page.
"""

from __future__ import annotations

import json
from collections import Counter, OrderedDict
from typing import Any, Callable, Iterable, Mapping

from attrs import define
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import resource
from twisted.web.server import NOT_DONE_YET

from . import __version__
from .destination import host_port
from .logs import isoformat

__all__ = ["ListenerInfo", "StatusBoard", "StatusResource"]

log = Logger(namespace="mailgw.status")

#: Reasons are refusal texts (they name the destination and the cause, never a
#: secret); a long upstream reply is cut to this many characters.
MAX_REASON = 300
#: Destinations remembered at most (Kubernetes mode may serve thousands of routes).
MAX_DESTINATIONS = 5000


@define
class _Destination:
    last_success: float | None = None
    last_failure: float | None = None
    failure_reason: str | None = None
    failure_kind: str | None = None
    token_expires: float | None = None


class StatusBoard:
    """What the sessions report, per destination; read by ``/status``.

    Every ``when`` is seconds since the epoch (``reactor.seconds()``); it defaults to
    ``clock.seconds()``.
    """

    def __init__(self, clock: Any = None, max_destinations: int = MAX_DESTINATIONS):
        if clock is None:
            from twisted.internet import reactor as clock  # noqa: F811
        self.clock = clock
        self.max_destinations = max_destinations
        self._destinations: OrderedDict[str, _Destination] = OrderedDict()

    def _entry(self, name: str) -> _Destination:
        entry = self._destinations.get(name)
        if entry is None:
            entry = self._destinations[name] = _Destination()
            while len(self._destinations) > self.max_destinations:
                self._destinations.popitem(last=False)  # the least recently reported
        else:
            self._destinations.move_to_end(name)
        return entry

    def _now(self, when: float | None) -> float:
        return self.clock.seconds() if when is None else float(when)

    def destination_succeeded(self, name: str, when: float | None = None) -> None:
        """A session of ``name`` reached its upstream and logged in."""
        self._entry(name).last_success = self._now(when)

    def destination_failed(self, name: str, reason: str, when: float | None = None, kind: str | None = None) -> None:
        """A session of ``name`` was refused: ``reason`` is the refusal text the
        application got (it names the cause, never a secret), ``kind`` its class
        (``auth``, ``connect``, ... as in ``mailgw_sessions_refused_total``)."""
        entry = self._entry(name)
        entry.last_failure = self._now(when)
        entry.failure_reason = str(reason)[:MAX_REASON]
        entry.failure_kind = kind

    def token_expires(self, name: str, expires_at: float) -> None:
        """The access token ``name``'s sessions use now expires at ``expires_at``."""
        self._entry(name).token_expires = float(expires_at)

    def forget(self, name: str) -> None:
        """``name`` is no longer served (a deleted Destination)."""
        self._destinations.pop(name, None)

    def destinations(self, now: float | None = None) -> dict[str, dict[str, Any]]:
        """The ``destinations`` section of ``/status`` (without session counts)."""
        now = self.clock.seconds() if now is None else now
        result = {}
        for name, entry in self._destinations.items():
            item: dict[str, Any] = {
                "last_success": None if entry.last_success is None else {"time": isoformat(entry.last_success)},
                "last_failure": None if entry.last_failure is None else {
                    "time": isoformat(entry.last_failure), "reason": entry.failure_reason, "kind": entry.failure_kind,
                },
            }
            if entry.token_expires is not None:
                item["token_expires"] = isoformat(entry.token_expires)
                item["token_expires_in"] = round(entry.token_expires - now, 1)
            result[name] = item
        return result


@define(frozen=True)
class ListenerInfo:
    """One listening socket for ``/status``: its route (the sessions' ``destination``
    and ``tenant``) and where it accepts.  ``name`` is how the route is shown when
    ``destination[/tenant]`` is not right (Kubernetes mode: ``namespace/cr@tenant``)."""

    destination: str
    tenant: str | None
    address: str
    name: str | None = None

    @property
    def route(self) -> str:
        if self.name is not None:
            return self.name
        return self.destination + (f"/{self.tenant}" if self.tenant else "")


def listener_info(destination: str, tenant: str | None, port: Any, name: str | None = None) -> ListenerInfo:
    """A :class:`ListenerInfo` from a listening port (``port.getHost()``)."""
    host = port.getHost()
    return ListenerInfo(destination, tenant, host_port(getattr(host, "host", "?"), getattr(host, "port", 0)), name)


class StatusResource(resource.Resource):
    """``GET /status``: JSON, see the module docstring.

    ``listeners()`` gives the :class:`ListenerInfo` values now (or a Deferred of them);
    ``providers`` maps section names to callables returning JSON-able dicts, looked up
    at every request (so a provider registered after start-up shows).
    """

    isLeaf = True

    def __init__(
        self,
        gateway: Any,
        listeners: Callable[[], Iterable[ListenerInfo] | defer.Deferred] | None = None,
        providers: Mapping[str, Callable[[], Any]] | None = None,
    ):
        super().__init__()
        self.gateway = gateway
        self.listeners = listeners or (lambda: [])
        self.providers = providers if providers is not None else {}

    def render_GET(self, request):
        gone: list = []
        request.notifyFinish().addBoth(gone.append)
        d = defer.maybeDeferred(self.listeners)
        d.addErrback(self._listeners_failed)
        d.addCallback(self.snapshot)
        d.addCallback(lambda page: None if gone else self._write(page, request))
        d.addErrback(lambda f: log.failure("/status failed", f))
        return NOT_DONE_YET

    @staticmethod
    def _listeners_failed(failure):
        log.failure("/status: listing listeners failed", failure)
        return []

    def snapshot(self, listeners: Iterable[ListenerInfo]) -> dict[str, Any]:
        """The page as a dict."""
        gateway = self.gateway
        now = gateway.reactor.seconds()
        by_route: Counter[tuple[str, str | None]] = Counter()
        by_destination: Counter[str] = Counter()
        for session in list(gateway.sessions):
            by_route[(session.route.destination, session.route.tenant)] += 1
            by_destination[session.route.destination] += 1
        destinations = gateway.status.destinations(now)
        for name, count in by_destination.items():
            destinations.setdefault(name, {"last_success": None, "last_failure": None})
        for name, item in destinations.items():
            item["sessions"] = by_destination.get(name, 0)
        page: dict[str, Any] = {
            "version": __version__,
            "time": isoformat(now),
            "ready": gateway.ready,
            "not_ready": gateway.not_ready(),
            "listeners": [
                {
                    "route": info.route, "destination": info.destination, "tenant": info.tenant,
                    "address": info.address, "sessions": by_route.get((info.destination, info.tenant), 0),
                }
                for info in sorted(listeners, key=lambda i: (i.route, i.address))
            ],
            "destinations": dict(sorted(destinations.items())),
        }
        audit = getattr(gateway, "audit", None)
        if audit is not None:
            page["audit"] = audit.status()
        for name, provider in list(self.providers.items()):
            try:
                page[name] = provider()
            except Exception as e:  # one broken section must not hide the rest
                log.failure("/status: the {section} section failed", section=name)
                page[name] = {"error": type(e).__name__}
        return page

    @staticmethod
    def _write(page: dict[str, Any], request) -> None:
        body = (json.dumps(page, indent=2, default=str) + "\n").encode("utf-8")
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        request.write(body)
        request.finish()
