"""SingleFlightCache and BlockingPool: the one cache and the one pool every layer uses."""

from __future__ import annotations

import threading

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from mailgw.blocking import BlockingPool, PoolStopped
from mailgw.cache import SingleFlightCache


class Definitive(Exception):
    pass


def keep(seconds):
    return lambda result: None if isinstance(result, Failure) and not result.check(Definitive) else seconds


def test_concurrent_gets_share_one_fetch_and_report_hit_miss_shared():
    clock, seen, fetches = Clock(), [], []
    cache = SingleFlightCache(clock, keep(10), observe=seen.append)
    pending = defer.Deferred()
    fetch = lambda: fetches.append(1) or pending  # noqa: E731
    first, second = cache.get("k", fetch), cache.get("k", fetch)
    assert cache.in_flight == 1 and fetches == [1]
    pending.callback("value")
    assert first.result == second.result == "value"
    assert cache.get("k", fetch).result == "value"
    assert seen == ["miss", "shared", "hit"] and fetches == [1]


def test_lifetime_rule_decides_what_is_kept():
    clock = Clock()
    cache = SingleFlightCache(clock, keep(10))
    results = []
    cache.get("gone", lambda: defer.fail(Definitive("no such destination"))).addErrback(results.append)
    cache.get("down", lambda: defer.fail(RuntimeError("unreachable"))).addErrback(results.append)
    assert isinstance(cache.peek("gone"), Failure) and cache.peek("down") is None
    cache.get("gone", lambda: pytest.fail("a definitive failure is served from the cache")).addErrback(results.append)
    assert [r.type for r in results] == [Definitive, RuntimeError, Definitive]
    clock.advance(10)
    assert cache.peek("gone") is None


def test_cancelling_one_waiter_leaves_the_fetch_and_the_others():
    cache = SingleFlightCache(Clock(), keep(10))
    pending = defer.Deferred()
    first, second = cache.get("k", lambda: pending), cache.get("k", lambda: pending)
    first.cancel()
    first.addErrback(lambda f: f.trap(defer.CancelledError))
    pending.callback("v")
    assert second.result == "v" and cache.peek("k") == "v"


def test_invalidate_and_bounded_size():
    clock = Clock()
    cache = SingleFlightCache(clock, keep(10), max_entries=2)
    for key in "abc":
        cache.get(key, lambda key=key: key)
    assert len(cache) == 2 and cache.peek("a") is None
    cache.invalidate("c")
    cache.invalidate_where(lambda key: key == "b")
    assert len(cache) == 0


def test_blocking_pool_runs_off_the_reactor_thread_and_refuses_when_stopped(reactor):
    from support.reactor import in_reactor

    pool = BlockingPool(reactor, "test-pool", 2)
    with pytest.raises(PoolStopped):
        in_reactor(pool, threading.current_thread)
    in_reactor(pool.startService)
    try:
        worker = in_reactor(pool, threading.current_thread)
        assert "test-pool" in worker.name and worker is not threading.current_thread()
    finally:
        in_reactor(pool.stopService)
    assert not pool.started


def test_a_lifetime_rule_that_raises_still_settles_every_waiter(events):
    cache = SingleFlightCache(Clock(), lambda result: 1 / 0)
    pending = defer.Deferred()
    first, second = cache.get("k", lambda: pending), cache.get("k", lambda: pending)
    pending.callback("v")
    assert first.result == second.result == "v"
    assert cache.peek("k") is None and cache.in_flight == 0
    assert any(e.get("log_failure") for e in events)  # our bug, logged with its traceback


def test_expired_entries_go_at_the_next_store_and_before_the_oldest_valid_one():
    clock = Clock()
    lifetimes = {"a": 100, "b": 10, "c": 100, "d": 100, "e": 100}
    cache = SingleFlightCache(clock, lambda result: lifetimes[result], max_entries=3)
    for key in "abc":
        cache.get(key, lambda key=key: key)
    clock.advance(20)
    cache.get("d", lambda: "d")
    assert (cache.peek("a"), cache.peek("b"), len(cache)) == ("a", None, 3)  # b expired, a stays
    cache.get("e", lambda: "e")
    assert cache.peek("a") is None and len(cache) == 3  # full of valid ones: the oldest goes
    cache.invalidate("e")
    clock.advance(100)
    cache.get("a", lambda: "a")
    assert len(cache) == 1  # the expired ones did not wait for the cache to fill up


@pytest.mark.parametrize("forget", ["invalidate", "invalidate_where", "clear"])
def test_a_fetch_in_flight_when_its_key_is_invalidated_is_delivered_but_not_kept(forget):
    cache = SingleFlightCache(Clock(), keep(10))
    stale = defer.Deferred()
    waiter = cache.get("k", lambda: stale)
    {"invalidate": lambda: cache.invalidate("k"), "invalidate_where": lambda: cache.invalidate_where(lambda k: k == "k"),
     "clear": cache.clear}[forget]()
    fresh = defer.Deferred()
    newer = cache.get("k", lambda: fresh)  # a fetch of its own: the one in flight is stale
    stale.errback(Definitive("the revoked token's refusal"))
    assert waiter.result.check(Definitive) and cache.peek("k") is None
    waiter.addErrback(lambda f: None)
    fresh.callback("new")
    assert newer.result == "new" and cache.peek("k") == "new"
