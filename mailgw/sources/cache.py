"""A cache in front of a destination source, and the registry of named sources.

Both sit between whoever needs destinations (sessions, the Kubernetes reconciler) and
the sources themselves; neither knows where destinations come from.
"""

from __future__ import annotations

from typing import Any, Mapping

from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure
from zope.interface import implementer

from mailgw.cache import SingleFlightCache
from mailgw.destination import Destination
from mailgw.sources.base import (
    DestinationLookupError,
    FindResult,
    IDestinationSource,
    ITokenExchange,
    InstanceNotFound,
    TokenExchangeFailed,
)


def destination_lifetime(ttl: float):
    """The cache rule of destinations: a destination and a *definitive* failure (it does
    not exist, it is not a MAIL destination) are kept ``ttl`` seconds; a transient
    failure is not kept, so the next caller asks again."""

    def lifetime(result: Any) -> float | None:
        if isinstance(result, Failure):
            error = result.value
            return ttl if isinstance(error, DestinationLookupError) and error.definitive else None
        return ttl

    return lifetime


@implementer(IDestinationSource)
class CachingSource:
    """Caches another source's answers per ``(namespace, name, tenant)``; concurrent
    lookups of one key share one request (:class:`~mailgw.cache.SingleFlightCache`).

    ``run`` (the worker pool a lookup runs in, None: the source's own) goes to the inner
    source on a miss, as do other keyword arguments.  A lookup joins only a request made
    in its own pool: a session must never queue behind a reconcile's request in the
    control pool.  A stored answer serves every pool.
    """

    def __init__(self, source: Any, clock: Any, ttl: float, *, max_entries: int = 10000):
        self.source = source
        self.ttl = ttl
        # keyed (namespace, name, tenant, run): one flight, and its answer, per pool
        self.cache = SingleFlightCache(clock, destination_lifetime(ttl), max_entries=max_entries)
        self._pools: list[Any] = []  # the pools lookups have run in: where answers may be

    def lookup(
        self, namespace: str, name: str, tenant: str | None = None, *, run: Any = None, **kwargs: Any
    ) -> "Deferred[Destination]":
        key = (namespace, name, tenant)
        for pool in self._pools:
            if pool is not run:
                stored = self.cache.peek(key + (pool,))
                if stored is not None:
                    return fail(stored) if isinstance(stored, Failure) else succeed(stored)
        if not any(pool is run for pool in self._pools):
            self._pools.append(run)
        return self.cache.get(key + (run,), lambda: self.source.lookup(namespace, name, tenant, run=run, **kwargs))

    def invalidate(self, namespace: str | None = None, name: str | None = None) -> None:
        """Forget the answers for ``namespace`` / ``name`` (None: any)."""
        self.cache.invalidate_where(
            lambda key: (namespace is None or key[0] == namespace) and (name is None or key[1] == name)
        )

    @property
    def exchanges(self) -> bool:
        return ITokenExchange.providedBy(self.source)

    def exchange(self, *args: Any, **kwargs: Any) -> "Deferred[FindResult]":
        # never cached: each exchange presents the application's own secret
        if not self.exchanges:
            return fail(TokenExchangeFailed("this destination source cannot exchange tokens"))
        return self.source.exchange(*args, **kwargs)


class SourceRegistry:
    """Destination sources by instance name (``spec.destinationServiceInstanceName`` in
    Kubernetes mode), with the default used when none is named."""

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
        self, instance: str | None, namespace: str, name: str, tenant: str | None = None, **kwargs: Any
    ) -> "Deferred[Destination]":
        try:
            source = self.source(instance)
        except InstanceNotFound as e:
            return fail(e)
        return source.lookup(namespace, name, tenant, **kwargs)

    def invalidate(self, namespace: str | None = None, name: str | None = None) -> None:
        for source in self.sources.values():
            if isinstance(source, CachingSource):
                source.invalidate(namespace, name)
