"""Kubernetes mode as an operator runs it, in process against the fake API server: many
CRs at once, a leader and a follower, requests per CR, idle resyncs, pod changes,
fencing, the drain, edited Services, colliding names, watchNamespaces, status."""

from __future__ import annotations

import json
import time

import pytest

from mailgw import metrics
from mailgw.kube import model
from mailgw.kube.client import KubeApiError
from mailgw.kube.controller import KubeSettings
from mailgw.kube.model import Route, parse_cr
from mailgw.kube.reconcile import allocate, policy_body
from kubetest import (
    GW_LABELS, GW_NS, SMTPS, FakeListeners, condition, destination_cr, offline_controller, pod, secret, wait_condition,
    wait_for,
)
from twisted.internet.defer import Deferred
from support.reactor import holds

RANGE = (20000, 24999)


@pytest.fixture
def start(controllers):
    def make(identity="gw-0", leader_election=False, fail_ports=(), **overrides):
        values = dict(
            gateway_namespace=GW_NS, pod_labels=GW_LABELS, identity=identity, port_range=RANGE,
            resync_interval=3600, cache_ttl=60, watch_timeout=60, leader_election=leader_election,
            retry_delay=0.05, lease_duration=30.0, renew_deadline=20.0, retry_period=0.2,
        )
        values.update(overrides)
        return controllers(KubeSettings(**values), api_timeout=5.0, fail_ports=fail_ports)

    return make


def held_lease(fake, holder="gw-0"):
    """A Lease another replica holds (for a long time): whoever starts now follows."""
    fake.create("leases", GW_NS, {"metadata": {"name": "mailgw-leader"}, "spec": {
        "holderIdentity": holder, "leaseDurationSeconds": 3600, "renewTime": "2026-01-01T00:00:00.000000Z"}})


def idle(in_reactor, *controllers):
    for c in controllers:
        wait_for(lambda: in_reactor(lambda: not c.queue.busy), what="the controller to go idle")


def requests_for_a_third_pod(cluster, in_reactor, controller):
    """Add gateway pod gw-2; the requests made until it is in every slice and all is idle."""
    before = cluster.tally()
    cluster.create("pods", GW_NS, pod("gw-2", "10.0.0.12"))
    wait_for(lambda: all(len(s["endpoints"]) == 3 for s in cluster.list("endpointslices", "apps")),
             what="the new pod in every slice")
    idle(in_reactor, controller)
    return cluster.tally() - before


def available(fake):
    return sum(1 for d in fake.list("destinations") if (condition(fake, d["metadata"]["name"], d["metadata"]["namespace"]) or {}).get("status") == "True")


def ports_of(fake):
    """route key -> gateway port, from the NetworkPolicies (the trusted record)."""
    found = {}
    for policy in fake.list("networkpolicies", GW_NS):
        ns, _, name = policy["metadata"]["annotations"][model.CR_ANNOTATION].partition("/")
        for tenant, port in json.loads(policy["metadata"]["annotations"][model.PORTS_ANNOTATION]).items():
            found[Route(ns, name, tenant or None)] = port
    return found


def slice_conditions(fake, name="mymail-mailgw"):
    """pod name -> its conditions in EndpointSlice ``name`` of namespace apps."""
    found = fake.get("endpointslices", "apps", name) or {"endpoints": []}
    return {e["targetRef"]["name"]: e["conditions"] for e in found["endpoints"]}


def writes(fake):
    return sum(n for (verb, _), n in fake.tally().items() if verb not in ("get", "list"))


def test_five_hundred_crs_at_once(cluster, start, in_reactor):
    """All Available, every port distinct, no port ever moves, on the leader and on a
    follower; each CR costs at most 6 requests (its Secret, policy, Service, slice,
    status and Event)."""
    held_lease(cluster)
    leader, on_leader = start("gw-0")
    follower, on_follower = start("gw-1", leader_election=True)
    namespaces = [f"team-{i}" for i in range(5)]
    for ns in namespaces:
        for i in range(100):
            cluster.create("secrets", ns, secret(f"d{i}", SMTPS, ns))
    before = sum(cluster.tally().values())
    for ns in namespaces:
        for i in range(100):
            cluster.create("destinations", ns, destination_cr(name=f"mail-{i}", ref=f"d{i}"))
    wait_for(lambda: available(cluster) == 500, timeout=120, what="500 CRs Available")
    idle(in_reactor, leader, follower)
    assert not follower.leading
    recorded = ports_of(cluster)
    assert len(recorded) == 500 and len(set(recorded.values())) == 500
    wait_for(lambda: on_follower.ports() == recorded, timeout=30, what="the follower to serve every route")
    assert on_leader.ports() == recorded
    for listeners in (on_leader, on_follower):
        assert [e for e in listeners.log if e[0] == "close"] == []  # no port ever moved
        assert len(listeners.log) == 500
    for svc in cluster.list("services"):
        assert int(svc["metadata"]["annotations"][model.PORT_ANNOTATION]) == recorded[
            Route(svc["metadata"]["namespace"], svc["metadata"]["name"])]
    spent = sum(cluster.tally().values()) - before
    assert spent <= 6 * 500, cluster.tally()
    assert {a for _, _, a in cluster.agents if "gw-1" in a} and not cluster.writes_by("gw-1")


def test_idle_resync_and_a_pod_change(cluster, start, in_reactor):
    for i in range(20):
        cluster.create("secrets", "apps", secret(f"d{i}", SMTPS))
        cluster.create("destinations", "apps", destination_cr(name=f"m{i}", ref=f"d{i}"))
    controller, _ = start()
    wait_for(lambda: available(cluster) == 20, timeout=30, what="20 CRs Available")
    idle(in_reactor, controller)
    before = cluster.tally()
    in_reactor(controller.resync)
    idle(in_reactor, controller)
    assert cluster.tally() - before == {}  # an idle resync asks nothing and writes nothing
    assert requests_for_a_third_pod(cluster, in_reactor, controller) == {("patch", "endpointslices"): 20}


def test_a_pod_change_patches_the_slices_without_looking_destinations_up(cluster, start, in_reactor):
    """A pod added or gone changes EndpointSlices only: the leader patches them from its
    caches, without a reconcile's destination lookups (here each would be a request)."""
    for i in range(5):
        cluster.create("secrets", "apps", secret(f"d{i}", SMTPS))
        cluster.create("destinations", "apps", destination_cr(name=f"m{i}", ref=f"d{i}"))
    controller, _ = start(cache_ttl=0)  # nothing cached
    wait_for(lambda: available(cluster) == 5, timeout=30, what="5 CRs Available")
    idle(in_reactor, controller)
    assert requests_for_a_third_pod(cluster, in_reactor, controller) == {("patch", "endpointslices"): 5}
    # a new address family needs slices created: that is a reconcile's job
    cluster.create("pods", GW_NS, dict(pod("gw-3", "10.0.0.13"), status={
        "podIPs": [{"ip": "10.0.0.13"}, {"ip": "fd00::13"}], "conditions": [{"type": "Ready", "status": "True"}]}))
    wait_for(lambda: len(cluster.list("endpointslices", "apps")) == 10, what="the IPv6 slices")


def test_a_pod_change_does_not_cancel_the_retry_of_a_failed_reconcile(cluster, start):
    """The slices-only pass a pod change causes succeeds; the failed full reconcile (its
    status write) is still retried after its backoff, not at the next resync."""
    cluster.create("secrets", "apps", secret("example-dest-smtps", SMTPS))
    fault = cluster.fault(r"/destinations/mymail/status$", method="PATCH", status=500, times=1)
    start(retry_delay=1.0)
    cluster.create("destinations", "apps", destination_cr())
    wait_for(lambda: fault.hits == 1, what="the status write to fail")
    cluster.create("pods", GW_NS, pod("gw-2", "10.0.0.12"))
    wait_for(lambda: len(slice_conditions(cluster)) == 3, what="the new pod in the slice")
    wait_condition(cluster, "True", model.REASON_OK)


def test_terminating_pod_is_listed_not_ready(cluster, start):
    cluster.create("secrets", "apps", secret("example-dest-smtps", SMTPS))
    cluster.create("destinations", "apps", destination_cr())
    start()
    wait_condition(cluster, "True", model.REASON_OK)
    cluster.update("pods", GW_NS, "gw-1", {"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"}})
    wait_for(lambda: slice_conditions(cluster)["gw-1"]["terminating"], what="gw-1 terminating in the slice")
    assert slice_conditions(cluster) == {"gw-0": {"ready": True, "serving": True, "terminating": False},
                            "gw-1": {"ready": False, "serving": True, "terminating": True}}


def test_a_follower_that_cannot_open_a_port_is_listed_not_ready_for_it(cluster, start, in_reactor):
    """Something else holds a route's port on the follower: the follower says so on its
    own Pod (mailgw.io/unbound-ports) and the leader lists it neither ready nor serving in
    that route's EndpointSlice, so clients are not sent where nobody listens.  Once the
    follower opens the port (its retries), it is listed ready again."""
    cluster.create("secrets", "apps", secret("example-dest-smtps", SMTPS))
    route = Route("apps", "mymail")
    port = allocate([route], {}, (), RANGE)[route]
    held_lease(cluster)
    leader, _ = start("gw-0")
    follower, on_follower = start("gw-1", leader_election=True, fail_ports={port})
    cluster.create("destinations", "apps", destination_cr())
    wait_condition(cluster, "True", model.REASON_OK)
    wait_for(lambda: slice_conditions(cluster).get("gw-1", {}).get("ready") is False, what="gw-1 not ready for the port")
    assert slice_conditions(cluster) == {"gw-0": {"ready": True, "serving": True, "terminating": False},
                            "gw-1": {"ready": False, "serving": False, "terminating": False}}
    annotations = cluster.get("pods", GW_NS, "gw-1")["metadata"]["annotations"]
    assert annotations[model.UNBOUND_PORTS_ANNOTATION] == str(port)
    assert ports_of(cluster) == {route: port}  # the port did not move for one pod's sake

    def warned():
        return [e for e in cluster.list("events", "apps") if e["reason"] == model.EVENT_PORT_UNAVAILABLE]

    wait_for(warned, what="the Warning on the Destination")
    in_reactor(leader.resync)
    idle(in_reactor, leader, follower)
    (event,) = warned()  # once, not at every pass
    assert event["type"] == "Warning" and event["involvedObject"]["name"] == "mymail"
    assert f"gw-1 cannot listen on port {port}" in event["message"]
    in_reactor(on_follower.fail_ports.clear)
    wait_for(lambda: slice_conditions(cluster).get("gw-1", {}).get("ready") is True, what="gw-1 ready once it listens")
    assert model.UNBOUND_PORTS_ANNOTATION not in (cluster.get("pods", GW_NS, "gw-1")["metadata"].get("annotations") or {})
    assert on_follower.ports() == {route: port}


def test_a_restarted_replica_clears_the_ports_its_predecessor_could_not_open(cluster, start):
    """The annotation outlives a container restart: the new process, which opens every
    port, removes it, so the leader lists the pod ready again."""
    cluster.create("secrets", "apps", secret("example-dest-smtps", SMTPS))
    cluster.update("pods", GW_NS, "gw-1", {"metadata": {"annotations": {model.UNBOUND_PORTS_ANNOTATION: "20001"}}})
    start("gw-1")
    cluster.create("destinations", "apps", destination_cr())
    wait_condition(cluster, "True", model.REASON_OK)
    wait_for(lambda: model.UNBOUND_PORTS_ANNOTATION not in (cluster.get("pods", GW_NS, "gw-1")["metadata"].get("annotations") or {}),
             what="the stale annotation removed")


def test_network_policy_names_do_not_collide(cluster, start):
    for ns, name in (("a", "b-c"), ("a-b", "c")):
        cluster.create("secrets", ns, secret("example-dest-smtps", SMTPS, ns))
        cluster.create("destinations", ns, destination_cr(name=name))
    _, listeners = start()
    wait_condition(cluster, "True", model.REASON_OK, name="b-c", ns="a")
    wait_condition(cluster, "True", model.REASON_OK, name="c", ns="a-b")
    names = sorted(p["metadata"]["name"] for p in cluster.list("networkpolicies", GW_NS))
    assert names == ["mailgw-a-b.c", "mailgw-a.b-c"]
    assert set(listeners.ports()) == {Route("a", "b-c"), Route("a-b", "c")}


def test_an_edited_annotation_is_refused_and_restored(cluster, start, in_reactor):
    held_lease(cluster)
    cluster.create("secrets", "apps", secret("example-dest-smtps", SMTPS))
    cluster.create("destinations", "apps", destination_cr())
    cluster.create("destinations", "apps", destination_cr(name="other"))
    leader, _ = start("gw-0")
    follower, on_follower = start("gw-1", leader_election=True)
    wait_condition(cluster, "True", model.REASON_OK)
    wait_condition(cluster, "True", model.REASON_OK, name="other")
    wait_for(lambda: len(on_follower.ports()) == 2, what="the follower listening")
    ports = on_follower.ports()
    mine, theirs = ports[Route("apps", "mymail")], ports[Route("apps", "other")]
    # a namespace admin points the Service at another route's port, then outside the range
    for edited in (theirs, 80):
        cluster.update("services", "apps", "mymail", {
            "metadata": {"annotations": {model.PORT_ANNOTATION: str(edited)}},
            "spec": {"ports": [{"name": "mail", "protocol": "TCP", "port": 465, "targetPort": edited}]}})

        def warned(edited=edited):
            return [e for e in cluster.list("events", "apps")
                    if e["reason"] == model.EVENT_SERVICE_EDITED and f"'{edited}'" in e["message"]]

        wait_for(warned, what=f"the Warning about {edited}")
        wait_for(lambda: cluster.get("services", "apps", "mymail")["metadata"]["annotations"][model.PORT_ANNOTATION]
                 == str(mine), what="the annotation restored")
        svc = cluster.get("services", "apps", "mymail")
        assert svc["spec"]["ports"][0]["targetPort"] == mine
        idle(in_reactor, leader, follower)
        assert on_follower.ports() == ports  # the follower never opened the edited port
        assert [e for e in on_follower.log if e[0] == "close"] == []


def test_a_reconcile_whose_leadership_ended_writes_nothing(cluster, start, in_reactor):
    cluster.create("secrets", "apps", secret("example-dest-smtps", SMTPS))
    controller, _ = start()
    stall = cluster.fault(r"/networkpolicies$", method="POST", status=None, delay=1.0, times=1)
    cluster.create("destinations", "apps", destination_cr())
    wait_for(lambda: stall.hits == 1, what="the first write to be under way")
    in_reactor(controller._stopped_leading)  # leadership ends while the write hangs
    since = time.monotonic()
    wait_for(lambda: stall.answered == 1, what="the stalled write to be answered")
    idle(in_reactor, controller)
    assert cluster.writes_by("gw-0", since) == []  # no Service, slice, status or Event
    assert cluster.get("services", "apps", "mymail") is None


def test_drain_start_releases_the_lease_and_closes_listeners(cluster, start, in_reactor):
    cluster.create("secrets", "apps", secret("example-dest-smtps", SMTPS))
    cluster.create("destinations", "apps", destination_cr())
    controller, listeners = start(leader_election=True)
    wait_for(lambda: controller.leading, what="leadership")
    wait_condition(cluster, "True", model.REASON_OK)
    wait_for(lambda: listeners.ports(), what="a listener")
    in_reactor(controller.startDrain)
    assert listeners.ports() == {} and not controller.leading
    wait_for(lambda: not (cluster.get("leases", GW_NS, "mailgw-leader")["spec"].get("holderIdentity")),
             what="the Lease released")
    since = time.monotonic()
    cluster.update("pods", GW_NS, "gw-1", {"status": {"conditions": [{"type": "Ready", "status": "False"}]}})
    holds(lambda: cluster.writes_by("gw-0", since) == [], 0.3, "no write by the drained gw-0")


def test_watch_namespaces_limit_what_is_served(cluster, start):
    for ns in ("apps", "elsewhere"):
        cluster.create("secrets", ns, secret("example-dest-smtps", SMTPS, ns))
        cluster.create("destinations", ns, destination_cr())
    controller, listeners = start(watch_namespaces=("apps",))
    wait_condition(cluster, "True", model.REASON_OK)
    holds(lambda: condition(cluster, ns="elsewhere") is None, 0.3, "no status in an unwatched namespace")
    assert set(listeners.ports()) == {Route("apps", "mymail")}
    assert all(ns == "apps" for ns, _ in controller.crs)
    watched = {p for m, p in cluster.requests if "watch=true" in p}
    assert not any(p.startswith("/api/v1/services") or "/apis/destination.connectivity.api.sap/v1/destinations?" in p
                   for p in watched)  # no cluster-wide watches


def test_status_and_metrics(cluster, start, in_reactor):
    cluster.create("secrets", "apps", secret("example-dest-smtps", SMTPS))
    cluster.create("destinations", "apps", destination_cr(tenants='["t1", "t2"]'))
    controller, _ = start()
    wait_condition(cluster, "True", model.REASON_OK)
    idle(in_reactor, controller)
    status = in_reactor(controller.status)
    assert status == {"leader": True, "synced": True, "queue_depth": 0, "routes_served": 2, "last_error": None}
    json.dumps(status)
    assert metrics.KUBE_LEADER._value.get() == 1
    assert metrics.KUBE_RECONCILES.labels("ok")._value.get() >= 1
    assert metrics.KUBE_API_REQUESTS.labels("create", "services", "201")._value.get() >= 2
    assert metrics.KUBE_API_REQUESTS.labels("watch", "destinations", "200")._value.get() >= 1
    cr = cluster.get("destinations", "apps", "mymail")["status"]
    assert cr["services"] == "mymail-t1,mymail-t2" and cr["tenantSubdomains"] == "t1,t2"
    assert cr["conditions"][0]["observedGeneration"] == 1


def test_a_follower_forgets_a_deleted_cr(cluster, start, in_reactor):
    held_lease(cluster)
    cluster.create("secrets", "apps", secret("example-dest-smtps", SMTPS))
    cluster.create("destinations", "apps", destination_cr())
    leader, _ = start("gw-0")
    follower, on_follower = start("gw-1", leader_election=True)
    wait_for(lambda: on_follower.ports(), what="the follower listening")
    cluster.delete("destinations", "apps", "mymail")
    wait_for(lambda: not on_follower.ports(), what="the follower's listener to close")
    wait_for(lambda: not cluster.list("networkpolicies", GW_NS), what="the policy to go")
    idle(in_reactor, leader, follower)
    assert in_reactor(lambda: (follower.allocations, follower.owners, follower.served)) == ({}, {}, {})


def test_no_listener_opens_once_the_drain_has_begun():
    """The drain was checked only when a listener sync began: a listener still opening
    when SIGTERM came stayed open, and the CR's next route was opened after it."""

    class SlowListeners(FakeListeners):
        def __init__(self):
            super().__init__()
            self.opening: list[Deferred] = []

        def open(self, route, port, destination):
            super().open(route, port, destination)
            self.opening.append(Deferred())
            return self.opening[-1]

    listeners = SlowListeners()
    controller, _, _ = offline_controller(destination_cr(tenants='["t1", "t2"]'), listeners)
    cr = parse_cr(controller.crs.get(("apps", "mymail")))
    Deferred.fromCoroutine(controller._reconcile_as_leader(cr, controller.epoch))
    assert [r.tenant for r in listeners.open_routes] == ["t1"]  # still opening
    controller.startDrain()
    listeners.opening[0].callback(None)
    assert listeners.open_routes == {} and controller.served == {}


def test_a_slice_patch_that_fails_after_a_pod_change_becomes_a_full_reconcile(cluster, start, in_reactor):
    cluster.create("secrets", "apps", secret("example-dest-smtps", SMTPS))
    cluster.create("destinations", "apps", destination_cr())
    controller, _ = start()
    wait_condition(cluster, "True", model.REASON_OK)
    idle(in_reactor, controller)
    fault = cluster.fault(r"/endpointslices/mymail-mailgw$", method="PATCH", status=500, times=2)
    cluster.create("pods", GW_NS, pod("gw-2", "10.0.0.12"))
    wait_for(lambda: len(cluster.get("endpointslices", "apps", "mymail-mailgw")["endpoints"]) == 3,
             what="the new pod in the slice, after the retry")
    assert fault.hits == 2
    assert model.REASON_SERVICE_FAILED in [e["reason"] for e in cluster.list("events", "apps")]
    wait_condition(cluster, "True", model.REASON_OK)


def test_a_follower_serves_a_route_refused_a_port_once_the_port_is_free():
    """The leader moved mymail off a port and gave it to other; this follower read other's
    record first and refused it (mymail still held the port).  When mymail's record moves,
    other is served: nothing else would read its record again until it changed."""
    other = destination_cr(name="other")
    other["metadata"].update(namespace="apps", uid="uid-2", resourceVersion="2", generation=1)
    controller, _, _ = offline_controller()
    controller.crs.put(other)
    controller._set_leading(False)
    controller._synced[("everything", None)] = True  # the initial lists are in: the queue runs
    listeners, version = controller.listeners, iter(range(10, 100))

    def record(name, port):
        cr = parse_cr(controller.crs.get(("apps", name)))
        body = policy_body(cr, {Route("apps", name): port}, controller.placement)
        body["metadata"]["resourceVersion"] = str(next(version))
        controller._event("networkpolicies", controller.policy_store, "MODIFIED", body)
        controller.reactor.advance(0)

    record("mymail", 20001)
    record("other", 20001)
    assert listeners.ports() == {Route("apps", "mymail"): 20001}
    record("mymail", 20002)
    assert listeners.ports() == {Route("apps", "mymail"): 20002, Route("apps", "other"): 20001}
    # mymail's listener moved away before other's opened on its old port
    assert listeners.log.index(("close", Route("apps", "mymail"))) < listeners.log.index(
        ("open", Route("apps", "other"), 20001))


def test_a_name_clash_leaves_no_port_recorded():
    """An EndpointSlice of the wanted name belongs to someone else: the NetworkPolicy,
    written before the slice, recorded the route's port; the CR is reconciled once more,
    knowing the clash, which takes the record back (and writes no second status)."""
    controller, control, api = offline_controller()
    controller._synced[("everything", None)] = True  # the initial lists are in: the queue runs
    create = api.create

    def clash(kind, namespace, body):
        if kind == "EndpointSlice":
            api.calls.append(("create", kind, namespace, body["metadata"]["name"]))
            raise KubeApiError("create: 409 AlreadyExists", 409, "AlreadyExists")
        return create(kind, namespace, body)

    api.create = clash
    api.on_get = lambda kind, ns, name: {"metadata": {"name": name, "namespace": ns}} \
        if kind == "EndpointSlice" else api.objects.get((kind, ns, name))
    controller.enqueue(("apps", "mymail"))
    while control.calls:
        control.run_next()
    assert not controller.queue.busy
    assert not [o for (kind, _, _), o in api.objects.items() if kind in ("NetworkPolicy", "Service")]
    assert controller.allocations == {} and controller.listeners.ports() == {}
    cr = api.objects[("Destination", "apps", "mymail")]
    assert cr["status"]["conditions"][0]["reason"] == model.REASON_NAME_PRESENT
    assert [c[:2] for c in api.writes() if c[1] in ("Destination", "Event")] == [
        ("status", "Destination"), ("create", "Event")]
