"""Lease leader election: the pure decision, the elector on a Clock, and two controllers."""

from __future__ import annotations

import copy

import pytest
from kubernetes import client as k8s
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock

from mailgw.kube import model
from mailgw.kube.client import KubeApi, KubeApiError
from mailgw.kube.controller import KubeController, KubeSettings
from mailgw.kube.leader import LeaderElector, Observed, decide
from mailgw.kube.model import Route
from kubetest import GW_LABELS, GW_NS, SMTPS, FakeListeners, destination_cr, pod, secret, wait_condition, wait_for


class LeaseStore:
    """In-memory Lease API with resourceVersion conflicts (what the elector calls)."""

    def __init__(self):
        self.lease = None
        self.rv = 0
        self.fail = 0  # number of calls to fail with a 500

    def _check(self):
        if self.fail:
            self.fail -= 1
            raise KubeApiError("injected", 500)

    def get(self, kind, ns, name):
        self._check()
        return copy.deepcopy(self.lease)

    def create(self, kind, ns, body):
        self._check()
        if self.lease is not None:
            raise KubeApiError("exists", 409, "AlreadyExists")
        self.rv += 1
        self.lease = copy.deepcopy(body)
        self.lease["metadata"]["resourceVersion"] = str(self.rv)
        return self.lease

    def replace(self, kind, ns, name, body):
        self._check()
        if self.lease is None:
            raise KubeApiError("missing", 404)
        if body["metadata"].get("resourceVersion") != self.lease["metadata"]["resourceVersion"]:
            raise KubeApiError("conflict", 409, "Conflict")
        self.rv += 1
        self.lease = copy.deepcopy(body)
        self.lease["metadata"]["resourceVersion"] = str(self.rv)
        return self.lease

    @property
    def holder(self):
        return (self.lease or {}).get("spec", {}).get("holderIdentity")


def run(fn, *args):
    return maybeDeferred(fn, *args)


def elector(store, clock, identity, events):
    return LeaderElector(
        store, run, clock, "gw", "lease", identity, lease_duration=15, renew_deadline=10, retry_period=2,
        on_started=lambda: events.append((identity, "started")),
        on_stopped=lambda: events.append((identity, "stopped")),
    )


@pytest.mark.parametrize(
    "lease,observed,now,expected",
    [
        (None, None, 0, "create"),
        ({"spec": {"holderIdentity": "me"}}, None, 0, "renew"),
        ({"spec": {"holderIdentity": None}}, None, 0, "takeover"),
        ({"spec": {"holderIdentity": ""}}, None, 0, "takeover"),
        ({"spec": {"holderIdentity": "other", "renewTime": "t1"}}, None, 100, "wait"),
        ({"spec": {"holderIdentity": "other", "renewTime": "t1"}},
         Observed(("other", "t1", None, None), 0), 10, "wait"),
        ({"spec": {"holderIdentity": "other", "renewTime": "t1"}},
         Observed(("other", "t1", None, None), 0), 16, "takeover"),
        ({"spec": {"holderIdentity": "other", "renewTime": "t1", "leaseDurationSeconds": 60}},
         Observed(("other", "t1", None, None), 0), 30, "wait"),
        ({"spec": {"holderIdentity": "other", "renewTime": "t2"}},
         Observed(("other", "t1", None, None), 0), 100, "wait"),  # renewed meanwhile
    ],
)
def test_decide(lease, observed, now, expected):
    action, _ = decide(lease, "me", now, observed, 15)
    assert action == expected


def test_first_elector_creates_and_renews():
    store, clock, events = LeaseStore(), Clock(), []
    a = elector(store, clock, "a", events)
    a.start()
    assert a.is_leader and store.holder == "a" and events == [("a", "started")]
    first = store.lease["spec"]["renewTime"]
    clock.advance(2)
    assert store.rv == 2 and a.is_leader
    assert store.lease["spec"]["acquireTime"] is not None and store.lease["spec"]["leaseTransitions"] == 0
    assert events == [("a", "started")]
    assert first is not None


def test_follower_waits_while_the_leader_renews_and_takes_over_when_it_stops():
    store, clock, events = LeaseStore(), Clock(), []
    a, b = elector(store, clock, "a", events), elector(store, clock, "b", events)
    a.start()
    b.start()
    for _ in range(30):  # a minute of renewals
        clock.advance(2)
    assert a.is_leader and not b.is_leader and store.holder == "a"
    a._loop.stop()  # a hangs (no release)
    for _ in range(7):
        clock.advance(2)
    assert not b.is_leader  # 14 s: not yet
    clock.advance(2)
    clock.advance(2)
    assert b.is_leader and store.holder == "b"
    assert store.lease["spec"]["leaseTransitions"] == 1
    # a stepped down at its renew deadline, before b could take over: never two leaders
    a.tick()
    assert not a.is_leader
    assert events == [("a", "started"), ("a", "stopped"), ("b", "started")]


def test_a_hanging_lease_call_does_not_keep_a_leader():
    """The renew deadline is a timer on the clock: it fires while the call still hangs."""
    store, clock, events = LeaseStore(), Clock(), []
    hanging = []

    def run_or_hang(fn, *args):
        if hanging:
            d = Deferred()
            hanging.append(d)
            return d
        return maybeDeferred(fn, *args)

    a = LeaderElector(store, run_or_hang, clock, "gw", "lease", "a", lease_duration=15, renew_deadline=10,
                      retry_period=2, on_stopped=lambda: events.append("stopped"))
    a.start()
    assert a.is_leader
    clock.advance(2)  # renewed at t=2
    hanging.append(None)
    clock.advance(2)  # the round of t=4 hangs
    for _ in range(3):
        clock.advance(2)
    assert a.is_leader and events == []  # t=10: within the deadline
    clock.advance(2)  # t=12 = last renewal + 10
    assert not a.is_leader and events == ["stopped"]
    assert len(hanging) == 2  # one call made, the loop waited for it instead of piling up


def test_release_on_stop_hands_over_at_once():
    store, clock, events = LeaseStore(), Clock(), []
    a, b = elector(store, clock, "a", events), elector(store, clock, "b", events)
    a.start()
    b.start()
    a.stop()
    assert not a.is_leader and store.holder is None
    clock.advance(2)
    assert b.is_leader


class HandRun:
    """A lease pool whose calls wait until the test runs them, one by one."""

    def __init__(self):
        self.calls = []

    def __call__(self, fn, *args):
        d = Deferred()
        self.calls.append((fn, args, d))
        return d

    def next(self):
        fn, args, d = self.calls.pop(0)
        maybeDeferred(fn, *args).chainDeferred(d)
        return fn


def test_a_takeover_in_flight_at_stop_is_released():
    """stop() came while a takeover was on its way: the Lease it acquired was kept (by a
    replica that campaigns no more) until it expired."""
    store, clock, run, events = LeaseStore(), Clock(), HandRun(), []
    store.lease = {"metadata": {"resourceVersion": "0"}, "spec": {"holderIdentity": None}}
    store.rv = 0
    b = LeaderElector(store, run, clock, "gw", "lease", "b", on_started=lambda: events.append("started"))
    b.start()
    run.next()  # the read: released, take it over
    stopped = b.stop()  # while the takeover is in flight
    assert not stopped.called
    run.next()  # the takeover succeeds
    assert store.holder == "b" and not b.is_leader and events == []
    run.next()  # the release
    assert store.holder is None and stopped.called and run.calls == []


def test_a_renewal_in_flight_at_stop_does_not_keep_the_lease():
    """The release used to go out at once: the renewal in flight changed the Lease's
    version under it, the release met a conflict, and the Lease stayed held."""
    store, clock, run, events = LeaseStore(), Clock(), HandRun(), []
    a = LeaderElector(store, run, clock, "gw", "lease", "a", on_stopped=lambda: events.append("stopped"))
    a.start()
    run.next(), run.next()  # read, create: leader
    clock.advance(2)
    run.next()  # the next round read the Lease; its renewal waits for a worker
    stopped = a.stop()
    assert not a.is_leader and events == ["stopped"] and not stopped.called
    # the release waits for the renewal (the pool would run them side by side)
    assert [fn for fn, _, _ in run.calls] == [store.replace]
    run.next()  # the renewal
    run.next()  # then the release
    assert store.holder is None and stopped.called


def test_a_release_that_meets_a_conflict_tries_once_more():
    store, clock, events = LeaseStore(), Clock(), []
    a = elector(store, clock, "a", events)
    a.start()
    replace = store.replace
    changed = []

    def changed_meanwhile(kind, ns, name, body):
        if not changed:  # the Lease changed between the release's read and its write
            changed.append(True)
            store.lease["metadata"]["resourceVersion"] = str(store.rv + 1)
            store.rv += 1
        return replace(kind, ns, name, body)

    store.replace = changed_meanwhile
    a.stop()
    assert store.holder is None and changed


def test_leader_steps_down_when_it_cannot_renew():
    store, clock, events = LeaseStore(), Clock(), []
    a = elector(store, clock, "a", events)
    a.start()
    store.fail = 100
    for _ in range(4):
        clock.advance(2)
        assert a.is_leader  # within the 10 s renew deadline
    clock.advance(2)
    assert not a.is_leader  # at the deadline, on the clock
    assert events == [("a", "started"), ("a", "stopped")]
    store.fail = 0
    clock.advance(2)
    assert a.is_leader  # the record is still ours: renew


def test_only_one_of_two_racing_takes_over():
    store, clock, events = LeaseStore(), Clock(), []
    store.lease = {"metadata": {"resourceVersion": "0"}, "spec": {"holderIdentity": None}}
    a, b = elector(store, clock, "a", events), elector(store, clock, "b", events)
    # both read the released lease before either writes
    lease = store.get("Lease", "gw", "lease")
    a._got(lease)
    b._got(lease).addErrback(b._failed)
    assert a.is_leader and not b.is_leader and store.holder == "a"


def _controller(cluster, reactor, in_reactor, identity):
    api_client = k8s.ApiClient(cluster.configuration())
    api_client.user_agent = identity
    api = KubeApi(api_client, timeout=2)
    settings = KubeSettings(
        gateway_namespace=GW_NS, pod_labels=GW_LABELS, identity=identity, port_range=(20000, 20999),
        resync_interval=3600, cache_ttl=0, watch_timeout=30, leader_election=True, retry_delay=0.05,
        lease_duration=2.0, renew_deadline=1.5, retry_period=0.1,
    )
    listeners = FakeListeners()
    controller = in_reactor(KubeController.create, api, listeners, settings, reactor)
    in_reactor(controller.startService)
    return controller, listeners


def test_two_controllers_one_writer_both_listen_and_failover(fake, reactor, in_reactor):
    fake.create("pods", GW_NS, pod("gw-a", "10.0.0.1"))
    fake.create("pods", GW_NS, pod("gw-b", "10.0.0.2"))
    fake.create("secrets", "apps", secret("example-dest-smtps", SMTPS))
    a, la = _controller(fake, reactor, in_reactor, "gw-a")
    b, lb = _controller(fake, reactor, in_reactor, "gw-b")
    try:
        wait_for(lambda: a.leading or b.leading, what="a leader")
        leader, follower = (a, b) if a.leading else (b, a)
        fake.create("destinations", "apps", destination_cr())
        wait_condition(fake, "True", model.REASON_OK)
        route = Route("apps", "mymail")
        wait_for(lambda: route in la.ports() and route in lb.ports(), what="both replicas listening")
        assert la.ports() == lb.ports()
        writers = {agent for method, path, agent in fake.agents
                   if method in ("POST", "PATCH", "PUT", "DELETE") and "/leases" not in path}
        assert writers == {leader.settings.identity}
        assert not follower.leading

        in_reactor(leader.stopService)  # releases the lease
        wait_for(lambda: follower.leading, what="the follower to take over")
        fake.create("destinations", "apps", destination_cr(name="second"))
        wait_condition(fake, "True", model.REASON_OK, name="second")
        assert fake.get("services", "apps", "second") is not None
    finally:
        for c in (a, b):
            if c.running:
                in_reactor(c.stopService)
