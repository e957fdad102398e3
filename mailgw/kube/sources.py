"""Destination sources as Kubernetes mode uses them: the interface, a cache, the registry
of instances, and the JSON checks every source shares.

A source answers ``lookup(namespace, name, tenant=None)`` with a Deferred firing with a
:class:`~mailgw.destination.Destination`, or failing with a
:class:`~mailgw.kube.model.DestinationLookupError` subclass (``DestinationNotFound``,
``TypeNotSupported``, ``ProxyTypeNotSupported``, ``InvalidDestination``,
``SourceUnavailable``...).  The ``secrets`` and ``btp`` sources live in
:mod:`mailgw.sources`.  A source that can exchange an application's refresh token or
authorization code (the destination service does) also provides :class:`ITokenExchange`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from attrs import field, frozen
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from mailgw.destination import PROXY_TYPES, Destination, DestinationError, parse_destination
from mailgw.kube.model import (
    DestinationLookupError,
    InstanceNotFound,
    InvalidDestination,
    ProxyTypeNotSupported,
    TypeNotSupported,
)

log = Logger(namespace="mailgw.kube.sources")


class IDestinationSource(Interface):
    """Where destinations come from."""

    def lookup(namespace: str, name: str, tenant: str | None = None) -> "Deferred[Destination]":
        """The destination ``name`` as seen from ``namespace`` (and ``tenant``); fails
        with a DestinationLookupError subclass."""


@frozen
class AuthToken:
    """A token the destination service returned with a destination (``authTokens``)."""

    type: str
    value: str = field(repr=False)
    expires_in: int | None = None
    error: str | None = None


@frozen
class FindResult:
    """A destination and the tokens that came with it."""

    destination: Destination
    auth_tokens: tuple[AuthToken, ...] = ()


class TokenExchangeFailed(DestinationLookupError):
    """The destination service could not turn the presented secret into a token.  The
    message carries the service's error text, never the secret."""

    definitive = False


class ITokenExchange(Interface):
    """A source that exchanges the application's secret for an upstream token (the
    destination service, for OAuth2RefreshToken / OAuth2AuthorizationCode)."""

    def exchange(
        namespace: str, name: str, tenant: str | None = None, *,
        refresh_token: str | None = None, code: str | None = None,
    ) -> "Deferred[FindResult]":
        """Find the destination presenting ``refresh_token`` (``X-refresh-token``) or
        ``code`` (``X-code``); the result's ``auth_tokens`` hold the upstream token."""


def destination_from_json(obj: Any, origin: str) -> Destination:
    """Check and parse a destination JSON object into the typed lookup errors."""
    if not isinstance(obj, Mapping):
        raise InvalidDestination(f"{origin}: the destination is not a JSON object")
    kind = obj.get("Type")
    if kind != "MAIL":
        raise TypeNotSupported(
            f"{origin}: destination {obj.get('Name')!r} has type {kind!r}; only MAIL is supported"
        )
    proxy_type = obj.get("ProxyType") or "Internet"
    if proxy_type not in PROXY_TYPES:
        raise ProxyTypeNotSupported(
            f"{origin}: destination {obj.get('Name')!r} has ProxyType {proxy_type!r}; "
            f"supported: {', '.join(PROXY_TYPES)}"
        )
    try:
        return parse_destination(obj, origin=origin)
    except DestinationError as e:
        raise InvalidDestination(str(e)) from None


def as_lookup_error(failure: Failure, what: str) -> None:
    """Errback for sources: anything that is not already a DestinationLookupError
    (the worker pool shut down, a bug) becomes a transient SourceUnavailable."""
    if failure.check(DestinationLookupError):
        failure.raiseException()
    from mailgw.kube.client import KubeApiError
    from mailgw.kube.model import SourceUnavailable

    if not failure.check(KubeApiError):
        log.failure("{what} failed unexpectedly", failure, what=what)
    raise SourceUnavailable(f"{what} failed: {failure.value if failure.check(KubeApiError) else type(failure.value).__name__}")


class CachingSource:
    """Caches another source's answers for ``ttl`` seconds, per (namespace, name, tenant).

    Destinations and definitive failures are cached; a transient failure is not (the next
    session asks again).  Concurrent lookups of the same key share one request.
    """

    def __init__(self, source: Any, ttl: float, clock: Any):
        self.source = source
        self.ttl = ttl
        self.clock = clock
        self._cache: dict[tuple[str, str, str | None], tuple[float, Any]] = {}
        self._pending: dict[tuple[str, str, str | None], list[Deferred[Destination]]] = {}

    def lookup(self, namespace: str, name: str, tenant: str | None = None) -> "Deferred[Destination]":
        key = (namespace, name, tenant)
        hit = self._cache.get(key)
        now = self.clock.seconds()
        if hit is not None and hit[0] > now:
            value = hit[1]
            return fail(value) if isinstance(value, BaseException) else succeed(value)
        waiter: Deferred[Destination] = Deferred()
        if key in self._pending:
            self._pending[key].append(waiter)
            return waiter
        self._pending[key] = [waiter]

        def done(result: Any) -> None:
            value = result.value if isinstance(result, Failure) else result
            cacheable = not isinstance(value, BaseException) or (
                isinstance(value, DestinationLookupError) and value.definitive
            )
            if cacheable:
                self._cache[key] = (self.clock.seconds() + self.ttl, value)
            else:
                self._cache.pop(key, None)
            for d in self._pending.pop(key, []):
                if isinstance(value, BaseException):
                    d.errback(result)
                else:
                    d.callback(value)

        try:
            d = self.source.lookup(namespace, name, tenant)
        except Exception as e:  # a source bug must not break the caller
            d = fail(e)
        d.addBoth(done)
        return waiter

    def invalidate(self, namespace: str | None = None, name: str | None = None) -> None:
        for key in list(self._cache):
            if (namespace is None or key[0] == namespace) and (name is None or key[1] == name):
                del self._cache[key]

    def exchange(self, *args: Any, **kwargs: Any) -> "Deferred[FindResult]":
        if not ITokenExchange.providedBy(self.source):
            return fail(TokenExchangeFailed("this destination source cannot exchange tokens"))
        return self.source.exchange(*args, **kwargs)


class SourceRegistry:
    """Destination sources by instance name (``spec.destinationServiceInstanceName``),
    with the default used when a CR names none."""

    def __init__(self, sources: Mapping[str, Any], default: str | None = None):
        self.sources = dict(sources)
        self.default = default

    def source(self, instance: str | None) -> Any:
        name = instance or self.default
        if name is None:
            raise InstanceNotFound(
                "spec.destinationServiceInstanceName is not set and no default instance is configured"
            )
        try:
            return self.sources[name]
        except KeyError:
            raise InstanceNotFound(
                f"destination service instance {name!r} is not configured "
                f"(known: {', '.join(sorted(self.sources)) or 'none'})"
            ) from None

    def lookup(
        self, instance: str | None, namespace: str, name: str, tenant: str | None = None
    ) -> "Deferred[Destination]":
        try:
            source = self.source(instance)
        except InstanceNotFound as e:
            return fail(e)
        return source.lookup(namespace, name, tenant)

    def invalidate(self) -> None:
        for source in self.sources.values():
            if isinstance(source, CachingSource):
                source.invalidate()


@implementer(IDestinationSource)
class StaticSource:
    """Destinations from a mapping ``(namespace, name) -> Destination`` (tests, demos)."""

    def __init__(self, destinations: Mapping[tuple[str, str], Destination] | Callable[[], Mapping]):
        self._destinations = destinations

    def lookup(self, namespace: str, name: str, tenant: str | None = None) -> "Deferred[Destination]":
        from mailgw.kube.model import DestinationNotFound

        table = self._destinations() if callable(self._destinations) else self._destinations
        found = table.get((namespace, name))
        if found is None:
            return fail(DestinationNotFound(f"destination {name!r} not found"))
        if isinstance(found, BaseException):
            return fail(found)
        return succeed(found)
