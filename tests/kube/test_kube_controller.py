"""The controller end to end against the fake API server, with the real kubernetes client
and a recording listener manager."""

from __future__ import annotations

import re
import time

import pytest
from kubetest import GW_LABELS, GW_NS, SMTPS, condition, destination_cr, pod, secret, wait_condition, wait_for
from mailgw.kube import model
from mailgw.kube.controller import KubeSettings
from mailgw.kube.model import Route


@pytest.fixture
def make_controller(controllers):
    def make(identity="gw-0", leader_election=False, api_timeout=1.0, fail_ports=(), **overrides):
        settings = KubeSettings(
            gateway_namespace=GW_NS, pod_labels=GW_LABELS, identity=identity, port_range=(20000, 20999),
            resync_interval=3600, cache_ttl=0, watch_timeout=30, leader_election=leader_election,
            retry_delay=0.05, lease_duration=1.0, renew_deadline=0.8, retry_period=0.1, **overrides,
        )
        return controllers(settings, api_timeout=api_timeout, fail_ports=fail_ports)

    return make


def stop(in_reactor, controller):
    in_reactor(controller.stopService)


def settle(in_reactor, controller):
    """Wait until nothing is queued or running (reconciles triggered by our own writes)."""
    def idle():
        return in_reactor(lambda: not controller.queue.busy)
    wait_for(idle, what="the controller to go idle")


# --- scenarios ----------------------------------------------------------------------


def test_create_gives_service_slice_policy_status_event_and_listener(cluster, make_controller):
    cluster.create("secrets", "apps", secret("example-dest-smtps", SMTPS))
    cluster.create("destinations", "apps", destination_cr())
    controller, listeners = make_controller()
    cond = wait_condition(cluster, "True", model.REASON_OK)
    svc = cluster.get("services", "apps", "mymail")
    port = int(svc["metadata"]["annotations"][model.PORT_ANNOTATION])
    assert svc["spec"]["ports"] == [{"name": "mail", "protocol": "TCP", "port": 465, "targetPort": port}]
    assert svc["metadata"]["ownerReferences"][0]["kind"] == "Destination"
    es = cluster.get("endpointslices", "apps", "mymail-mailgw")
    assert es["metadata"]["labels"]["kubernetes.io/service-name"] == "mymail"
    assert sorted(e["addresses"][0] for e in es["endpoints"]) == ["10.0.0.10", "10.0.0.11"]
    assert es["ports"][0]["port"] == port
    (policy,) = cluster.list("networkpolicies", GW_NS)
    assert policy["spec"]["ingress"][0]["ports"] == [{"protocol": "TCP", "port": port}]
    assert listeners.ports() == {Route("apps", "mymail"): port}
    assert "mymail:465" in cond["message"]
    events = wait_for(lambda: cluster.list("events", "apps"), what="the event")
    assert [(e["type"], e["reason"]) for e in events] == [("Normal", model.REASON_OK)]
    assert events[0]["involvedObject"]["name"] == "mymail"


def test_listener_destination_lookup_follows_the_secret(cluster, make_controller, in_reactor):
    cluster.create("secrets", "apps", secret("example-dest-smtps", SMTPS))
    cluster.create("destinations", "apps", destination_cr())
    controller, listeners = make_controller()
    wait_for(lambda: listeners.ports(), what="a listener")
    (_, dest) = listeners.open_routes[Route("apps", "mymail")]
    found = in_reactor(dest.lookup)
    assert (found.host, found.protocol, found.user) == ("smtp.example.org", "smtps", "app@example.org")
    assert in_reactor(dest.can_exchange) is False
    changed = dict(SMTPS, **{"mail.smtps.host": "smtp2.example.org"})
    cluster.update("secrets", "apps", "example-dest-smtps",
                   {"data": secret("x", changed)["data"]})
    # the Secret watch invalidates the cached destination
    wait_for(lambda: in_reactor(dest.lookup).host == "smtp2.example.org", what="the changed destination")


def test_tenants(cluster, make_controller):
    cluster.create("secrets", "apps", secret("example-dest-smtps", SMTPS))
    cluster.create("destinations", "apps", destination_cr(tenants='["t1", "t2"]'))
    controller, listeners = make_controller()
    wait_condition(cluster, "True", model.REASON_OK)
    assert {s["metadata"]["name"] for s in cluster.list("services", "apps")} == {"mymail-t1", "mymail-t2"}
    status = cluster.get("destinations", "apps", "mymail")["status"]
    assert [t["tenantSubdomain"] for t in status["tenants"]] == ["t1", "t2"]
    ports = listeners.ports()
    assert set(ports) == {Route("apps", "mymail", "t1"), Route("apps", "mymail", "t2")}
    assert len(set(ports.values())) == 2


def test_invalid_annotation(cluster, make_controller):
    cluster.create("secrets", "apps", secret("example-dest-smtps", SMTPS))
    cluster.create("destinations", "apps", destination_cr(tenants="t1,t2"))
    controller, listeners = make_controller()
    cond = wait_condition(cluster, "False", model.REASON_ANNOTATION_INVALID)
    assert model.TENANTS_ANNOTATION in cond["message"]
    assert cluster.list("services", "apps") == []
    assert listeners.ports() == {}
    wait_for(lambda: any(e["type"] == "Warning" for e in cluster.list("events", "apps")), what="warning event")
    assert cluster.list("events", "apps")[0]["reason"] == model.REASON_ANNOTATION_INVALID


def test_destination_not_found_then_created_heals_on_resync(cluster, make_controller, in_reactor):
    cluster.create("destinations", "apps", destination_cr())
    controller, listeners = make_controller()
    cond = wait_condition(cluster, "False", model.REASON_NOT_FOUND)
    assert "example-dest-smtps" in cond["message"]
    assert cluster.list("services", "apps") == []
    cluster.create("secrets", "apps", secret("example-dest-smtps", SMTPS))
    in_reactor(controller.resync)
    wait_condition(cluster, "True", model.REASON_OK)
    assert cluster.get("services", "apps", "mymail") is not None


def test_non_mail_destination(cluster, make_controller):
    cluster.create("secrets", "apps", secret("web", {"Name": "web", "Type": "HTTP", "URL": "https://x"}))
    cluster.create("destinations", "apps", destination_cr(ref="web"))
    make_controller()
    cond = wait_condition(cluster, "False", model.REASON_TYPE_NOT_SUPPORTED)
    assert "HTTP" in cond["message"]


def test_unsupported_proxy_type(cluster, make_controller):
    cluster.create("secrets", "apps", secret("pl", dict(SMTPS, ProxyType="PrivateLink")))
    cluster.create("destinations", "apps", destination_cr(ref="pl"))
    make_controller()
    wait_condition(cluster, "False", model.REASON_PROXY_TYPE_NOT_SUPPORTED)


def test_unknown_instance(cluster, make_controller):
    cluster.create("destinations", "apps", destination_cr(instance="nowhere"))
    make_controller()
    cond = wait_condition(cluster, "False", model.REASON_INSTANCE_NOT_FOUND)
    assert "nowhere" in cond["message"]


def test_name_clash_with_a_service_we_do_not_own(cluster, make_controller):
    cluster.create("secrets", "apps", secret("example-dest-smtps", SMTPS))
    foreign = cluster.create("services", "apps", {"metadata": {"name": "mymail", "labels": {"app": "theirs"}},
                                                  "spec": {"ports": [{"port": 25}], "selector": {"app": "theirs"}}})
    cluster.create("destinations", "apps", destination_cr())
    controller, listeners = make_controller()
    cond = wait_condition(cluster, "False", model.REASON_NAME_PRESENT)
    assert "mymail" in cond["message"]
    assert cluster.get("services", "apps", "mymail") == foreign  # untouched
    assert cluster.list("endpointslices", "apps") == []
    assert listeners.ports() == {}


def test_a_name_clash_costs_a_read_per_resync_and_heals_once_the_name_is_free(cluster, make_controller, in_reactor):
    """The leader remembers names other owners hold across resyncs: a resync reads each
    and writes nothing (forgetting them had the CR create its Service and delete it
    again each time), and the CR is served once the name is free."""
    cluster.create("secrets", "apps", secret("example-dest-smtps", SMTPS))
    cluster.create("services", "apps", {"metadata": {"name": "mymail", "labels": {"app": "theirs"}},
                                        "spec": {"ports": [{"port": 25}], "selector": {"app": "theirs"}}})
    cluster.create("destinations", "apps", destination_cr())
    controller, listeners = make_controller()
    wait_condition(cluster, "False", model.REASON_NAME_PRESENT)
    settle(in_reactor, controller)
    assert cluster.list("networkpolicies", GW_NS) == []  # no port recorded for the clashing route
    before = cluster.tally()
    in_reactor(controller.resync)
    settle(in_reactor, controller)
    assert cluster.tally() - before == {("get", "services"): 1, ("get", "secrets"): 1}  # (cache_ttl 0: a lookup)
    cluster.delete("services", "apps", "mymail")
    in_reactor(controller.resync)
    wait_condition(cluster, "True", model.REASON_OK)
    assert cluster.get("services", "apps", "mymail")["metadata"]["labels"][model.MANAGED_BY_LABEL] == "mailgw"


def test_a_name_clash_is_forgotten_with_its_destination(cluster, make_controller, in_reactor):
    cluster.create("secrets", "apps", secret("example-dest-smtps", SMTPS))
    cluster.create("services", "apps", {"metadata": {"name": "mymail", "labels": {"app": "theirs"}}})
    cluster.create("destinations", "apps", destination_cr())
    controller, _ = make_controller()
    wait_condition(cluster, "False", model.REASON_NAME_PRESENT)
    cluster.delete("destinations", "apps", "mymail")
    wait_for(lambda: in_reactor(lambda: ("apps", "mymail") not in controller.crs), what="the CR gone")
    settle(in_reactor, controller)
    before = cluster.tally()
    in_reactor(controller.resync)
    settle(in_reactor, controller)
    assert ("get", "services") not in cluster.tally() - before  # nothing left to ask about


def test_a_namespace_editor_cannot_make_the_leader_delete_in_another_namespace(cluster, make_controller, in_reactor):
    """Objects in namespace ``a`` labelled as mailgw's and annotated as CR ``b/x``'s are
    not ``b/x``'s: the leader never deletes ``b``'s Service and slice of the same name
    (those of CR ``b/victim``)."""
    cluster.create("secrets", "b", secret("example-dest-smtps", SMTPS, "b"))
    cluster.create("destinations", "b", destination_cr(name="victim"))
    cluster.create("destinations", "b", destination_cr(name="x"))
    bait = {"labels": {model.MANAGED_BY_LABEL: "mailgw"}, "annotations": {model.CR_ANNOTATION: "b/x"}}
    cluster.create("services", "a", {"metadata": {"name": "victim", **bait}})
    cluster.create("endpointslices", "a", {"metadata": {"name": "victim-mailgw", **bait}, "addressType": "IPv4"})
    controller, _ = make_controller()
    wait_condition(cluster, "True", model.REASON_OK, name="x", ns="b")
    wait_condition(cluster, "True", model.REASON_OK, name="victim", ns="b")
    settle(in_reactor, controller)
    in_reactor(controller.resync)
    settle(in_reactor, controller)
    assert cluster.count("DELETE", r"/namespaces/b/") == 0
    assert cluster.get("services", "b", "victim") is not None


def test_a_destination_secret_the_secret_watch_cannot_see_is_refused(cluster, make_controller):
    """The Secret watch sees type Opaque only: a destination in a Secret of another type
    would be cached for an hour with nothing to tell it changed."""
    obj = secret("example-dest-smtps", SMTPS)
    obj["type"] = "example.com/mail"
    cluster.create("secrets", "apps", obj)
    cluster.create("destinations", "apps", destination_cr())
    make_controller(watch_secrets=True)
    cond = wait_condition(cluster, "False", model.REASON_DESTINATION_INVALID)
    assert "example.com/mail" in cond["message"] and "Opaque" in cond["message"]
    assert cluster.list("services", "apps") == []


def test_secrets_are_neither_listed_nor_watched_unless_asked(cluster, make_controller):
    """A list or watch of Secrets is granted cluster-wide or not at all, and the grant
    reads every Secret's data: the Secret watch is opt-in (kubernetes.watchSecrets)."""
    controller, _ = make_controller()
    assert "secrets" not in {w.name for w in controller.watchers}
    assert not [p for m, p in cluster.requests if m == "GET" and re.search(r"/secrets(\?|$)", p)]


def test_cr_update_port_change(cluster, make_controller, in_reactor):
    cluster.create("secrets", "apps", secret("example-dest-smtps", SMTPS))
    cluster.create("destinations", "apps", destination_cr())
    controller, listeners = make_controller()
    wait_condition(cluster, "True", model.REASON_OK)
    before = listeners.ports()
    cluster.update("destinations", "apps", "mymail", {"spec": {"service": {"port": 2465}}})
    wait_for(lambda: cluster.get("services", "apps", "mymail")["spec"]["ports"][0]["port"] == 2465,
             what="the Service port to change")
    wait_for(lambda: "mymail:2465" in condition(cluster)["message"], what="status message")
    assert cluster.get("destinations", "apps", "mymail")["status"]["observedGeneration"] == 2
    assert listeners.ports() == before  # the gateway port did not move
    assert [e for e in listeners.log if e[0] == "close"] == []


def test_cr_delete_closes_listener_and_removes_objects(cluster, make_controller):
    cluster.create("secrets", "apps", secret("example-dest-smtps", SMTPS))
    cluster.create("destinations", "apps", destination_cr(tenants='["t1"]'))
    cluster.create("destinations", "apps", destination_cr(name="other"))
    controller, listeners = make_controller()
    wait_condition(cluster, "True", model.REASON_OK)
    wait_condition(cluster, "True", model.REASON_OK, name="other")
    assert len(listeners.ports()) == 2
    cluster.delete("destinations", "apps", "mymail")
    wait_for(lambda: Route("apps", "mymail", "t1") not in listeners.ports(), what="the listener to close")
    wait_for(lambda: len(cluster.list("networkpolicies", GW_NS)) == 1, what="the policy to go")
    names = {s["metadata"]["name"] for s in cluster.list("services", "apps")}
    assert names == {"other"}
    assert {s["metadata"]["name"] for s in cluster.list("endpointslices", "apps")} == {"other-mailgw"}
    # the other CR's listener was never touched
    assert [e for e in listeners.log if e[1] == Route("apps", "other")] == [("open", Route("apps", "other"), listeners.ports()[Route("apps", "other")])]


def reconciles() -> float:
    from prometheus_client import REGISTRY

    return sum(REGISTRY.get_sample_value("mailgw_kube_reconciles_total", {"result": r}) or 0 for r in ("ok", "error"))


def test_a_reconcile_that_deletes_is_not_run_again_by_its_own_deletions(cluster, make_controller, in_reactor):
    """The deletes' answers reach the caches as the creates' and patches' do: the watch
    events of a tenant's Service and EndpointSlice, deleted by the reconcile of the CR
    change, start no second reconcile."""
    cluster.create("secrets", "apps", secret("example-dest-smtps", SMTPS))
    cluster.create("destinations", "apps", destination_cr(tenants='["t1", "t2"]'))
    controller, listeners = make_controller()
    wait_condition(cluster, "True", model.REASON_OK)
    settle(in_reactor, controller)
    before = reconciles()
    cluster.update("destinations", "apps", "mymail", {"metadata": {"annotations": {model.TENANTS_ANNOTATION: '["t1"]'}}})
    wait_for(lambda: cluster.get("services", "apps", "mymail-t2") is None, what="t2's Service deleted")
    settle(in_reactor, controller)
    wait_for(lambda: cluster.get("endpointslices", "apps", "mymail-t2-mailgw") is None, what="t2's slice deleted")
    time.sleep(0.3)  # time for the watch events of the deletions (an extra reconcile would follow them)
    settle(in_reactor, controller)
    assert reconciles() - before == 1
    assert set(listeners.ports()) == {Route("apps", "mymail", "t1")}


def test_restart_reads_allocations_back(cluster, make_controller, in_reactor):
    cluster.create("secrets", "apps", secret("example-dest-smtps", SMTPS))
    cluster.create("destinations", "apps", destination_cr(tenants='["t1", "t2"]'))
    first, listeners1 = make_controller()
    wait_condition(cluster, "True", model.REASON_OK)
    settle(in_reactor, first)
    ports = listeners1.ports()
    stop(in_reactor, first)
    writes = cluster.count("PATCH", "/services/") + cluster.count("POST", "/services")
    # a restart where the hash-preferred ports are taken in between: read-back must win
    second, listeners2 = make_controller(identity="gw-0-restarted")
    wait_for(lambda: len(listeners2.ports()) == 2, what="listeners after the restart")
    settle(in_reactor, second)
    assert listeners2.ports() == ports
    assert cluster.count("PATCH", "/services/") + cluster.count("POST", "/services") == writes


def test_410_in_the_middle_of_the_stream(cluster, make_controller, in_reactor):
    cluster.create("secrets", "apps", secret("example-dest-smtps", SMTPS))
    controller, listeners = make_controller()
    cr_watcher = controller.watchers[0]
    cluster.expire()
    wait_for(lambda: cr_watcher.lists == 2, what="the re-list")
    cluster.create("destinations", "apps", destination_cr())
    wait_condition(cluster, "True", model.REASON_OK)
    assert cr_watcher.gone >= 1


def test_api_error_during_apply_becomes_status_then_heals(cluster, make_controller):
    cluster.create("secrets", "apps", secret("example-dest-smtps", SMTPS))
    cluster.fault(r"/namespaces/apps/services$", method="POST", status=500, times=1)
    cluster.create("destinations", "apps", destination_cr())
    make_controller()
    wait_for(lambda: any(e["reason"] == model.REASON_SERVICE_FAILED for e in cluster.list("events", "apps")),
             what="a ServiceCreationFailed event")
    wait_condition(cluster, "True", model.REASON_OK)
    assert cluster.get("services", "apps", "mymail") is not None
    history = [e["reason"] for e in cluster.list("events", "apps")]
    assert model.REASON_SERVICE_FAILED in history


def test_timeout_during_apply_is_retried(cluster, make_controller):
    cluster.create("secrets", "apps", secret("example-dest-smtps", SMTPS))
    cluster.fault(r"/endpointslices$", method="POST", status=None, delay=1.5, times=1)
    cluster.create("destinations", "apps", destination_cr())
    make_controller(api_timeout=0.5)
    wait_condition(cluster, "True", model.REASON_OK)
    wait_for(lambda: cluster.get("endpointslices", "apps", "mymail-mailgw") is not None, what="the slice")
    # the first attempt timed out (the server went on and made it: the watch tells)
    assert model.REASON_SERVICE_FAILED in [e["reason"] for e in cluster.list("events", "apps")]


@pytest.mark.parametrize("method, path, status, times", [
    ("PATCH", r"/mymail/status$", 503, 2),  # the status write: two failures, then the write, once
    ("GET", r"^/api/v1/services\?labelSelector", 500, 1),  # the initial list of a watch cache
])
def test_a_failed_call_is_retried(cluster, make_controller, method, path, status, times):
    cluster.create("secrets", "apps", secret("example-dest-smtps", SMTPS))
    fault = cluster.fault(path, method=method, status=status, times=times)
    cluster.create("destinations", "apps", destination_cr())
    make_controller()
    wait_condition(cluster, "True", model.REASON_OK)
    assert fault.hits == times
    if method == "PATCH":
        assert cluster.count(method, path) == times + 1


def test_secret_read_failure_is_transient(cluster, make_controller, in_reactor):
    cluster.create("secrets", "apps", secret("example-dest-smtps", SMTPS))
    cluster.create("destinations", "apps", destination_cr())
    controller, listeners = make_controller(watch_secrets=True)
    wait_condition(cluster, "True", model.REASON_OK)
    settle(in_reactor, controller)
    cluster.fault(r"/secrets/example-dest-smtps$", method="GET", status=500, times=None)
    # a change of the Secret makes the controller read it again, which fails
    cluster.update("secrets", "apps", "example-dest-smtps", {"metadata": {"labels": {"touched": "1"}}})
    wait_condition(cluster, "False", model.REASON_LOOKUP_FAILED)
    assert cluster.get("services", "apps", "mymail") is not None  # kept during the outage
    assert listeners.ports()
    cluster.clear_faults()
    wait_condition(cluster, "True", model.REASON_OK)  # the retry (backoff) heals it


def test_gateway_pods_follow_into_the_endpoint_slice(cluster, make_controller):
    cluster.create("secrets", "apps", secret("example-dest-smtps", SMTPS))
    cluster.create("destinations", "apps", destination_cr())
    make_controller()
    wait_condition(cluster, "True", model.REASON_OK)

    def addresses():
        es = cluster.get("endpointslices", "apps", "mymail-mailgw") or {}
        return sorted(e["addresses"][0] for e in es.get("endpoints") or [])

    cluster.create("pods", GW_NS, pod("gw-2", "10.0.0.12"))
    wait_for(lambda: addresses() == ["10.0.0.10", "10.0.0.11", "10.0.0.12"], what="the new pod")
    cluster.update("pods", GW_NS, "gw-0", {"status": {"conditions": [{"type": "Ready", "status": "False"}]}})
    wait_for(lambda: addresses() == ["10.0.0.11", "10.0.0.12"], what="the unready pod to go")
    cluster.delete("pods", GW_NS, "gw-1")
    wait_for(lambda: addresses() == ["10.0.0.12"], what="the deleted pod to go")


def test_port_that_cannot_be_bound_moves(cluster, make_controller):
    from mailgw.kube.reconcile import allocate

    cluster.create("secrets", "apps", secret("example-dest-smtps", SMTPS))
    route = Route("apps", "mymail")
    natural = allocate([route], {}, (), (20000, 20999))[route]
    cluster.create("destinations", "apps", destination_cr())
    controller, listeners = make_controller(fail_ports={natural})
    wait_condition(cluster, "True", model.REASON_OK)
    port = listeners.ports()[route]
    assert port != natural
    svc = cluster.get("services", "apps", "mymail")
    assert svc["metadata"]["annotations"][model.PORT_ANNOTATION] == str(port)


def test_orphans_are_swept_on_resync(cluster, make_controller, in_reactor):
    orphan_labels = {model.MANAGED_BY_LABEL: "mailgw", model.UID_LABEL: "gone-uid"}
    cluster.create("services", "apps", {"metadata": {"name": "old", "labels": orphan_labels,
                                                     "annotations": {model.CR_ANNOTATION: "apps/old"}}})
    cluster.create("networkpolicies", GW_NS, {"metadata": {"name": "mailgw-apps-old", "labels": orphan_labels}})
    cluster.create("services", "apps", {"metadata": {"name": "not-ours"}})
    controller, _ = make_controller()
    in_reactor(controller.resync)
    wait_for(lambda: cluster.get("services", "apps", "old") is None, what="the orphan Service to go")
    assert cluster.list("networkpolicies", GW_NS) == []
    assert cluster.get("services", "apps", "not-ours") is not None


def test_cluster_wide_scope(cluster, make_controller):
    cluster.create("secrets", "apps", secret("example-dest-smtps", SMTPS))
    cluster.create("destinations", "apps", destination_cr(scope="clusterWide"))
    make_controller()
    wait_condition(cluster, "True", model.REASON_OK)
    (policy,) = cluster.list("networkpolicies", GW_NS)
    assert "from" not in policy["spec"]["ingress"][0]
