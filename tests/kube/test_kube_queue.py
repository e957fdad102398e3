"""The controller's work queue on a Clock: one worker per key, bounded concurrency,
backoff with jitter, a token bucket for retries."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from mailgw.kube.queue import TokenBucket, WorkQueue


class Worker:
    def __init__(self):
        self.started: list[str] = []
        self.pending: dict[str, Deferred] = {}

    def __call__(self, key):
        self.started.append(key)
        d = Deferred()
        self.pending[key] = d
        return d

    def finish(self, key, result=None):
        self.pending.pop(key).callback(result)


def test_one_worker_per_key_and_again_after():
    clock, work = Clock(), Worker()
    q = WorkQueue(clock, work, concurrency=4)
    q.add("a")
    q.add("a")  # running: remembered, not started twice
    assert work.started == ["a"] and q.depth == 0
    q.add("a")
    work.finish("a")
    assert work.started == ["a", "a"]  # once more, for the adds made meanwhile
    work.finish("a")
    assert work.started == ["a", "a"] and not q.busy


def test_concurrency_is_bounded_and_fifo():
    clock, work = Clock(), Worker()
    q = WorkQueue(clock, work, concurrency=2)
    for key in "abcd":
        q.add(key)
    q.add("c")  # already queued: once
    assert work.started == ["a", "b"] and q.depth == 2
    work.finish("a")
    assert work.started == ["a", "b", "c"]
    work.finish("b")
    work.finish("c")
    work.finish("d")
    assert work.started == ["a", "b", "c", "d"] and not q.busy


def test_backoff_doubles_with_jitter_and_forget_resets():
    clock, work = Clock(), Worker()
    q = WorkQueue(clock, work, base_delay=1.0, max_delay=8.0, jitter=0.5, rng=lambda: 1.0)
    delays = [q.retry("k") for _ in range(5)]
    assert delays == [1.5, 3.0, 6.0, 12.0, 12.0]  # doubling, capped at max (+50% jitter here)
    q.forget("k")
    assert q.failures("k") == 0
    q2 = WorkQueue(clock, work, base_delay=1.0, jitter=0.5, rng=lambda: 0.0)
    assert q2.retry("k") == 0.5  # jitter spreads both ways


def test_retry_comes_back_after_its_delay_and_forget_cancels_it():
    clock, work = Clock(), Worker()
    q = WorkQueue(clock, work, base_delay=2.0, jitter=0.0)
    q.retry("k")
    clock.advance(1.9)
    assert work.started == []
    clock.advance(0.1)
    assert work.started == ["k"]
    work.finish("k")
    q.retry("j")
    q.forget("j")
    clock.advance(10)
    assert work.started == ["k"]


def test_the_bucket_limits_retries_of_many_keys():
    clock = Clock()
    bucket = TokenBucket(clock, rate=10.0, burst=2)
    assert [bucket.reserve() for _ in range(4)] == [0.0, 0.0, 0.1, 0.2]
    clock.advance(1)
    assert bucket.reserve() == 0.0  # refilled (up to the burst)
    q = WorkQueue(Clock(), Worker(), base_delay=0.001, jitter=0.0, retry_rate=1.0, retry_burst=1)
    assert q.retry("a") == 0.001 and q.retry("b") == 1.0 and q.retry("c") == 2.0


def test_stop_takes_nothing_more_and_waits_for_work_in_progress():
    clock, work = Clock(), Worker()
    q = WorkQueue(clock, work, concurrency=1)
    q.add("a")
    q.add("b")
    q.retry("c")
    done = q.stop()
    assert not done.called and q.depth == 0
    q.add("d")
    work.finish("a")
    assert done.called and work.started == ["a"]
    clock.advance(100)
    assert work.started == ["a"]


def test_depth_is_reported():
    clock, work = Clock(), Worker()
    seen = []
    q = WorkQueue(clock, work, concurrency=1, on_change=lambda q: seen.append(q.depth))
    q.add("a")
    q.add("b")
    work.finish("a")
    assert seen[-1] == 0 and max(seen) == 1


def test_the_store_keeps_the_newest_and_a_late_write_answer_does_not_resurrect():
    from mailgw.kube.store import Store

    def obj(rv, **extra):
        return {"metadata": {"namespace": "ns", "name": "x", "resourceVersion": str(rv), **extra}}

    store = Store()
    assert store.event("ADDED", obj(5))
    assert not store.put(obj(5))  # the echo of our own write changes nothing
    assert not store.put(obj(4))  # older
    assert store.put(obj(6))
    assert store.event("DELETED", obj(9))
    assert not store.put(obj(7))  # the answer to a write made before the deletion
    assert store.get(("ns", "x")) is None
    assert store.put(obj(10))  # created again
    assert store.replace([obj(11)], "ns") == {("ns", "x")}


def test_a_backlog_of_work_that_finishes_at_once_neither_recurses_nor_wedges():
    """Work that finishes synchronously (a reconcile with nothing to do) used to start the
    next key from inside the previous one's callback: thousands of keys queued behind
    busy workers overflowed the stack, left keys in progress for ever and made stop()
    wait for ever."""
    clock = Clock()
    done, slow = [], {}

    def work(key):
        if key.startswith("slow"):
            slow[key] = Deferred()
            return slow[key]
        done.append(key)
        return None

    q = WorkQueue(clock, work, concurrency=4)
    for i in range(4):
        q.add(f"slow{i}")
    for i in range(5000):
        q.add(f"k{i}")
    assert q.depth == 5000
    slow["slow0"].callback(None)
    assert len(done) == 5000 and q.depth == 0
    for key in ("slow1", "slow2", "slow3"):
        slow[key].callback(None)
    assert not q.busy
    q.add("again")
    assert done[-1] == "again"
    assert q.stop().called


def test_tombstones_keep_a_version_only_and_expire():
    """A tombstone only has to outlive the answer of a write made before the deletion
    (at most a write's time budget); they were kept for ever, whole metadata included."""
    from mailgw.kube.store import Store

    def obj(name, rv, **extra):
        return {"metadata": {"namespace": "ns", "name": name, "resourceVersion": str(rv), **extra}}

    now = [0.0]
    store = Store(now=lambda: now[0], tombstone_ttl=20.0)
    for i in range(1000):
        store.event("DELETED", obj(f"x{i}", 5, labels={"big": "x" * 100}))
    assert store.tombstones == 1000
    assert not store.put(obj("x0", 4))  # the late answer of an earlier write
    now[0] = 21.0
    store.event("DELETED", obj("y", 9))  # any deletion sweeps the expired ones out
    assert store.tombstones == 1
    assert store.put(obj("x1", 4))  # long after: an object of that name again


def test_a_deletion_this_replica_made_leaves_the_store_at_once():
    """``forget``: gone now; an older version (a late event or answer) does not bring it
    back; the deletion's own watch event then changes nothing; a later object of that
    name is stored."""
    from mailgw.kube.store import Store

    def obj(rv):
        return {"metadata": {"namespace": "ns", "name": "x", "resourceVersion": str(rv)}}

    store = Store()
    store.put(obj(7))
    assert store.forget(("ns", "x")) and ("ns", "x") not in store
    assert not store.put(obj(6)) and not store.put(obj(7))
    assert not store.event("DELETED", obj(8))  # the echo: nothing to change
    assert not store.forget(("ns", "x"))
    assert store.put(obj(9))
    # deleted and created again by this replica; the deletion's event comes after the
    # new object's answer: it is not the new object's deletion
    store.forget(("ns", "x"))
    assert store.put(obj(12))
    assert not store.event("DELETED", obj(11)) and store.get(("ns", "x")) is not None
    assert store.event("DELETED", obj(13)) and store.get(("ns", "x")) is None


def test_the_store_drops_managed_fields():
    from mailgw.kube.store import Store

    store = Store()
    store.put({"metadata": {"namespace": "ns", "name": "x", "resourceVersion": "1", "managedFields": [{"f": 1}]}})
    assert "managedFields" not in store.get(("ns", "x"))["metadata"]
