"""One single-flight cache with per-value lifetimes, for tokens and destinations alike.

Concurrent :meth:`SingleFlightCache.get` calls for a key share one fetch; every caller
gets a Deferred of its own (cancelling one waiter leaves the others and the fetch
alone).  How long a result is kept is the caller's rule, given as ``lifetime(result)``:
access tokens live until shortly before they expire, destinations for a fixed TTL, and a
definitive failure (a destination that does not exist) may be cached like a value while
a transient one is not.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Any, Callable, Hashable

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

#: What :meth:`SingleFlightCache.get` reports to ``observe``: a cached result, a new
#: fetch, or a fetch already in flight joined.
HIT, MISS, SHARED = "hit", "miss", "shared"


class SingleFlightCache:
    """Results by key, each until its own expiry on ``clock``; single flight.

    ``lifetime(result)`` is called with a fetched value or a :class:`Failure` and returns
    the seconds to keep it (``None`` or ``<= 0``: not kept).  ``observe(kind)``, when
    given, is told ``"hit"``, ``"miss"`` or ``"shared"`` for every :meth:`get` (metrics).
    At most ``max_entries`` results are kept; expired ones go first (at the next store,
    full or not), then the oldest.  Expiries are kept in a heap, so a store costs
    O(log n) however full the cache is.
    """

    def __init__(
        self,
        clock: Any,
        lifetime: Callable[[Any], float | None],
        *,
        max_entries: int = 10000,
        observe: Callable[[str], None] | None = None,
    ):
        self._clock = clock
        self._lifetime = lifetime
        self.max_entries = max_entries
        self._observe = observe
        self._entries: dict[Hashable, tuple[float, Any]] = {}  # key -> (valid until, result), oldest first
        self._expiries: list[tuple[float, int, Hashable]] = []  # heap of (valid until, serial, key)
        self._serial = itertools.count()  # orders equal expiries without comparing keys
        self._inflight: dict[Hashable, list[Deferred]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    def peek(self, key: Hashable) -> Any:
        """The cached, still valid result for ``key`` (a value or a Failure), else None."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self._clock.seconds() < entry[0]:
            return entry[1]
        del self._entries[key]
        return None

    def invalidate(self, key: Hashable) -> None:
        """Forget ``key`` (a token the upstream refused, a destination that changed).

        A fetch of ``key`` in flight is forgotten too: its waiters still get its
        result, but it is not kept, and the next :meth:`get` fetches afresh (what was
        asked before the invalidation may be what it invalidated)."""
        self._entries.pop(key, None)
        self._inflight.pop(key, None)

    def invalidate_where(self, predicate: Callable[[Hashable], bool]) -> None:
        """Forget every key for which ``predicate(key)`` is true (as :meth:`invalidate`)."""
        for key in [k for k in (*self._entries, *self._inflight) if predicate(k)]:
            self.invalidate(key)

    def clear(self) -> None:
        """Forget everything (as :meth:`invalidate` for every key)."""
        self._entries.clear()
        self._expiries.clear()
        self._inflight.clear()

    def get(self, key: Hashable, fetch: Callable[[], Any]) -> Deferred:
        """The result for ``key``: cached, joined to a fetch in flight, or fetched now."""
        cached = self.peek(key)
        if cached is not None:
            self._tell(HIT)
            return fail(cached) if isinstance(cached, Failure) else succeed(cached)

        waiters = self._inflight.get(key)
        joining = waiters is not None
        if not joining:
            # This list is the fetch's identity: an invalidation that replaces or drops
            # it in _inflight tells _settle not to keep the result.
            waiters = self._inflight[key] = []

        def forget_waiter(waiter: Deferred) -> None:
            if waiter in waiters:
                waiters.remove(waiter)

        waiter: Deferred = Deferred(forget_waiter)
        waiters.append(waiter)
        self._tell(SHARED if joining else MISS)
        if not joining:
            maybeDeferred(fetch).addBoth(self._settle, key, waiters)
        return waiter

    def _tell(self, kind: str) -> None:
        if self._observe is not None:
            self._observe(kind)

    def _settle(self, result: Any, key: Hashable, waiters: list[Deferred]) -> None:
        try:
            if self._inflight.get(key) is waiters:  # not invalidated while in flight
                del self._inflight[key]
                self._store(key, result)
        except Exception:
            # A bug in the caller's lifetime rule: the result is not kept, but every
            # waiter still gets it.  (The key may be made of a secret: not logged.)
            log.failure("cache: the lifetime rule failed; the result is not kept")
        for waiter in waiters:
            waiter.callback(result)  # a Failure errbacks; each waiter has its own chain
        return None  # the fetch's own failure is delivered to the waiters

    def _store(self, key: Hashable, result: Any) -> None:
        seconds = self._lifetime(result)
        if seconds is None or seconds <= 0:
            self._entries.pop(key, None)
            return
        now = self._clock.seconds()
        if isinstance(result, Failure):
            result.cleanFailure()  # no frames kept alive by the cache
        self._entries.pop(key, None)
        self._entries[key] = (now + seconds, result)
        heapq.heappush(self._expiries, (now + seconds, next(self._serial), key))
        self._trim(now)

    def _trim(self, now: float) -> None:
        expiries = self._expiries
        while expiries and expiries[0][0] <= now:
            until, _, key = heapq.heappop(expiries)
            entry = self._entries.get(key)
            if entry is not None and entry[0] == until:  # not stored again since
                del self._entries[key]
        while len(self._entries) > self.max_entries:
            del self._entries[next(iter(self._entries))]  # the oldest
        if len(expiries) > 2 * len(self._entries) + 64:
            # Mostly expiries of entries invalidated, replaced or evicted: start afresh.
            self._expiries = [(until, next(self._serial), key) for key, (until, _) in self._entries.items()]
            heapq.heapify(self._expiries)
