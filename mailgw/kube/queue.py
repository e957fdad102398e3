"""The controller's work queue: which Destination to reconcile next, and when.

Sans-IO apart from a clock (``callLater``/``seconds``), so every rule is a unit test on
``twisted.internet.task.Clock``:

- a key is never worked on twice at the same time; one added while it is being worked on
  is worked on again afterwards (a level-triggered reconciler needs no more);
- at most ``concurrency`` keys are worked on at once (bounded load on the API server);
- a failed key comes back after a per-key exponential backoff with jitter (so keys
  failing together do not retry in lockstep), and no faster than a token bucket shared by
  all retries allows (a broken API server is not hammered);
- a key that succeeds forgets its failures.
"""

from __future__ import annotations

import random
from collections import deque
from typing import Any, Callable, Hashable

from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger(namespace="mailgw.kube.queue")


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved; :meth:`reserve` takes one now
    and says how long to wait for it (the bucket may go into debt)."""

    def __init__(self, clock: Any, rate: float, burst: int):
        self.clock = clock
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.stamp = clock.seconds()

    def reserve(self) -> float:
        now = self.clock.seconds()
        self.tokens = min(float(self.burst), self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= 1
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


class WorkQueue:
    """Keys for ``work(key)`` (which returns a Deferred, or a value)."""

    def __init__(
        self,
        clock: Any,
        work: Callable[[Hashable], Any],
        *,
        concurrency: int = 4,
        base_delay: float = 1.0,
        max_delay: float = 300.0,
        jitter: float = 0.2,
        retry_rate: float = 10.0,
        retry_burst: int = 100,
        rng: Callable[[], float] = random.random,
        on_change: Callable[["WorkQueue"], None] | None = None,
    ):
        self.clock = clock
        self.work = work
        self.concurrency = max(1, concurrency)
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.jitter = jitter
        self.bucket = TokenBucket(clock, retry_rate, retry_burst)
        self.rng = rng
        self.on_change = on_change
        self._ready: deque[Hashable] = deque()
        self._queued: set[Hashable] = set()
        self._running: dict[Hashable, Deferred] = {}
        self._again: set[Hashable] = set()
        self._delayed: dict[Hashable, Any] = {}
        self._failures: dict[Hashable, int] = {}
        self._pumping = False
        self.stopped = False

    # --- what callers see -----------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Keys waiting to be worked on (not counting those in progress or in backoff)."""
        return len(self._ready)

    @property
    def busy(self) -> bool:
        return bool(self._ready or self._running)

    def running(self, key: Hashable) -> bool:
        return key in self._running

    def pending(self, key: Hashable) -> bool:
        """Will ``key`` be worked on (again) without another :meth:`add`?"""
        return key in self._queued or key in self._again

    def failures(self, key: Hashable) -> int:
        return self._failures.get(key, 0)

    def add(self, key: Hashable) -> None:
        if self.stopped:
            return
        if key in self._running:
            self._again.add(key)
        elif key not in self._queued:
            self._queued.add(key)
            self._ready.append(key)
        self._pump()

    def add_after(self, key: Hashable, delay: float) -> None:
        """Add ``key`` in ``delay`` seconds (an earlier pending add wins)."""
        if self.stopped:
            return
        if delay <= 0:
            self.add(key)
            return
        call = self._delayed.get(key)
        if call is not None and call.active():
            if call.getTime() <= self.clock.seconds() + delay:
                return
            call.cancel()
        self._delayed[key] = self.clock.callLater(delay, self._fire_delayed, key)

    def retry(self, key: Hashable) -> float:
        """``key`` failed: add it again after its backoff; returns the delay."""
        n = self._failures.get(key, 0)
        self._failures[key] = n + 1
        delay = min(self.base_delay * (2 ** n), self.max_delay)
        delay *= 1 + self.jitter * (2 * self.rng() - 1)
        delay = max(delay, self.bucket.reserve())
        self.add_after(key, delay)
        return delay

    def forget(self, key: Hashable) -> None:
        """``key`` succeeded: no backoff next time, no retry pending."""
        self._failures.pop(key, None)
        call = self._delayed.pop(key, None)
        if call is not None and call.active():
            call.cancel()

    def stop(self) -> "Deferred[None]":
        """Take no more keys; fires when the keys in progress are done."""
        self.stopped = True
        for call in self._delayed.values():
            if call.active():
                call.cancel()
        self._delayed.clear()
        self._ready.clear()
        self._queued.clear()
        self._changed()
        if not self._running:
            return succeed(None)
        return DeferredList(list(self._running.values()), consumeErrors=True).addCallback(lambda _: None)

    # --- machinery ------------------------------------------------------------------------

    def _fire_delayed(self, key: Hashable) -> None:
        self._delayed.pop(key, None)
        self.add(key)

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self)

    def _pump(self) -> None:
        # Not re-entrant: work that finishes at once calls back into _pump (through
        # _finished, or add()); that inner call returns and this loop starts the next
        # key.  Nested, a backlog of such keys would grow the stack by one level per key.
        if self._pumping:
            return
        self._pumping = True
        try:
            while self._ready and len(self._running) < self.concurrency and not self.stopped:
                key = self._ready.popleft()
                self._queued.discard(key)
                done: Deferred = Deferred()
                self._running[key] = done
                d = maybeDeferred(self.work, key)
                d.addBoth(self._finished, key, done)
        finally:
            self._pumping = False
        self._changed()

    def _finished(self, result: Any, key: Hashable, done: Deferred) -> None:
        del self._running[key]
        if key in self._again:
            self._again.discard(key)
            self.add(key)
        self._pump()
        done.callback(None)
        if isinstance(result, Failure):
            log.failure("work on {key} failed", result, key=key)
        return None
