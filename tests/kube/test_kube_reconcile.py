"""Table tests of the pure reconciler: CR + destination + what exists -> objects and status."""

from __future__ import annotations

import copy
import json

import pytest
from fakeapi import merge_patch  # RFC 7386, as the (fake) API server applies it

from mailgw.destination import parse_destination
from mailgw.kube import model
from mailgw.kube.model import (
    REASON_ANNOTATION_INVALID,
    REASON_LOOKUP_FAILED,
    REASON_NAME_PRESENT,
    REASON_NOT_FOUND,
    REASON_OK,
    REASON_PROXY_TYPE_NOT_SUPPORTED,
    REASON_SERVICE_FAILED,
    REASON_SPEC_INVALID,
    REASON_TYPE_NOT_SUPPORTED,
    Route,
    parse_cr,
)
from mailgw.kube.apply import ApplyFailure
from mailgw.sources.base import (
    DestinationNotFound,
    ProxyTypeNotSupported,
    SourceUnavailable,
    TypeNotSupported,
)
from mailgw.kube.reconcile import (
    Existing,
    GatewayPlacement,
    GatewayPod,
    allocate,
    deletion_changes,
    failed_plan,
    policy_name,
    reconcile,
    routes_from_policy,
    unbound_warnings,
)

NOW = "2026-01-01T00:00:00Z"
LATER = "2026-01-01T00:05:00Z"
GW = GatewayPlacement("mailgw-system", {"app.kubernetes.io/name": "mailgw"}, (20000, 20099))
PODS = (GatewayPod("gw-1", "10.0.0.1"), GatewayPod("gw-0", "10.0.0.2"))

SMTPS = parse_destination(
    {
        "Name": "example-dest-smtps",
        "Type": "MAIL",
        "Authentication": "BasicAuthentication",
        "mail.user": "u",
        "mail.password": "p",
        "mail.transport.protocol": "smtps",
        "mail.smtps.host": "smtp.example.org",
        "mail.smtps.port": "465",
        "ProxyType": "Internet",
    }
)
IMAPS = parse_destination(
    {"Name": "i", "Type": "MAIL", "mail.transport.protocol": "imap4s", "mail.imap4s.host": "imap.example.org"}
)


def cr_obj(name="mymail", ns="apps", uid="uid-1", tenants=None, spec=None, status=None, generation=1):
    obj = {
        "apiVersion": "destination.connectivity.api.sap/v1",
        "kind": "Destination",
        "metadata": {"name": name, "namespace": ns, "uid": uid, "generation": generation},
        "spec": {"destinationRef": {"name": "example-dest-smtps"}} if spec is None else spec,
    }
    if tenants is not None:
        obj["metadata"]["annotations"] = {model.TENANTS_ANNOTATION: tenants}
    if status is not None:
        obj["status"] = status
    return obj


def apply(plan, existing: Existing) -> Existing:
    """Apply a plan's changes to an Existing the way the API server would."""
    stores = {"Service": dict(existing.services), "EndpointSlice": dict(existing.slices),
              "NetworkPolicy": dict(existing.policies)}
    for change in plan.changes:
        store = stores[change.kind]
        if change.action == "create":
            assert change.name not in store, change
            store[change.name] = copy.deepcopy(dict(change.body))
        elif change.action == "patch":
            store[change.name] = merge_patch(store[change.name], change.body)
        else:
            del store[change.name]
    return Existing(stores["Service"], stores["EndpointSlice"], stores["NetworkPolicy"])


def run(obj, lookups=None, existing=None, allocations=None, pods=PODS, now=NOW, **kw):
    cr = parse_cr(obj)
    if lookups is None:
        lookups = {t: SMTPS for t in (cr.tenants or (None,))}
    return cr, reconcile(cr, lookups, existing or Existing(), allocations or {}, pods, GW, now, **kw)


def created(plan, kind):
    return {c.name: c.body for c in plan.changes if c.action == "create" and c.kind == kind}


def condition(plan):
    (cond,) = plan.status["conditions"]
    return cond


# --- the happy path ------------------------------------------------------------------


def test_single_service_slice_policy_and_status():
    cr, plan = run(cr_obj())
    route = Route("apps", "mymail")
    port = plan.routes[route]
    assert 20000 <= port <= 20099
    services = created(plan, "Service")
    assert list(services) == ["mymail"]
    svc = services["mymail"]
    assert svc["metadata"]["namespace"] == "apps"
    assert "selector" not in svc["spec"]
    assert svc["spec"]["ports"] == [{"name": "mail", "protocol": "TCP", "port": 465, "targetPort": port}]
    assert svc["metadata"]["labels"][model.MANAGED_BY_LABEL] == "mailgw"
    assert svc["metadata"]["labels"][model.UID_LABEL] == "uid-1"
    assert svc["metadata"]["annotations"][model.PORT_ANNOTATION] == str(port)
    assert svc["metadata"]["ownerReferences"] == [
        {"apiVersion": "destination.connectivity.api.sap/v1", "kind": "Destination", "name": "mymail",
         "uid": "uid-1", "controller": True, "blockOwnerDeletion": True}
    ]
    slices = created(plan, "EndpointSlice")
    assert list(slices) == ["mymail-mailgw"]
    es = slices["mymail-mailgw"]
    assert es["metadata"]["labels"]["kubernetes.io/service-name"] == "mymail"
    assert es["addressType"] == "IPv4"
    assert es["ports"] == [{"name": "mail", "protocol": "TCP", "port": port}]
    assert [e["addresses"] for e in es["endpoints"]] == [["10.0.0.1"], ["10.0.0.2"]]
    assert es["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    policies = created(plan, "NetworkPolicy")
    (policy,) = policies.values()
    assert policy["metadata"]["namespace"] == "mailgw-system"
    assert policy["spec"]["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "mailgw"}}
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": port}]
    assert rule["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "apps"}}}]
    cond = condition(plan)
    assert (cond["type"], cond["status"], cond["reason"]) == ("Available", "True", REASON_OK)
    assert cond["lastUpdateTime"] == NOW
    assert "mymail:465" in cond["message"]
    assert plan.status["observedGeneration"] == 1
    assert "tenants" not in plan.status
    assert plan.status_patch == plan.status
    assert plan.event.type == "Normal"
    # policy first, then the Service, then its EndpointSlice
    assert [c.kind for c in plan.changes] == ["NetworkPolicy", "Service", "EndpointSlice"]


@pytest.mark.parametrize(
    "spec_port,dest,expected",
    [(None, SMTPS, 465), (2465, SMTPS, 2465), (None, IMAPS, 993), (1143, IMAPS, 1143)],
)
def test_service_port_is_spec_port_or_protocol_default(spec_port, dest, expected):
    spec = {"destinationRef": {"name": "x"}}
    if spec_port:
        spec["service"] = {"port": spec_port}
    _, plan = run(cr_obj(spec=spec), lookups={None: dest})
    assert created(plan, "Service")["mymail"]["spec"]["ports"][0]["port"] == expected


def test_second_reconcile_is_a_no_op():
    cr, plan = run(cr_obj(tenants='["t1", "t2"]'))
    existing = apply(plan, Existing())
    status = plan.status
    cr2, plan2 = run(cr_obj(tenants='["t1", "t2"]', status=status), existing=existing, now=LATER)
    assert plan2.changes == ()
    assert plan2.status_patch is None
    assert plan2.event is None
    assert plan2.routes == plan.routes
    assert condition(plan2)["lastUpdateTime"] == NOW


def test_tenants_get_one_service_each():
    cr, plan = run(cr_obj(tenants='["t1", "another-tenant"]'))
    assert sorted(created(plan, "Service")) == ["mymail-another-tenant", "mymail-t1"]
    assert sorted(created(plan, "EndpointSlice")) == ["mymail-another-tenant-mailgw", "mymail-t1-mailgw"]
    assert set(plan.routes) == {Route("apps", "mymail", "t1"), Route("apps", "mymail", "another-tenant")}
    assert len(set(plan.routes.values())) == 2
    assert created(plan, "Service")["mymail-t1"]["metadata"]["labels"][model.TENANT_LABEL] == "t1"
    (policy,) = created(plan, "NetworkPolicy").values()
    assert sorted(p["port"] for p in policy["spec"]["ingress"][0]["ports"]) == sorted(plan.routes.values())
    assert plan.status["tenants"] == [
        {"tenantSubdomain": "t1", "serviceName": "mymail-t1", "status": "True"},
        {"tenantSubdomain": "another-tenant", "serviceName": "mymail-another-tenant", "status": "True"},
    ]
    assert condition(plan)["status"] == "True"


def test_one_tenant_failing_leaves_the_others():
    lookups = {"t1": SMTPS, "t2": DestinationNotFound("no destination 'x' for tenant t2")}
    cr, plan = run(cr_obj(tenants='["t1", "t2"]'), lookups=lookups)
    assert list(created(plan, "Service")) == ["mymail-t1"]
    cond = condition(plan)
    assert (cond["status"], cond["reason"]) == ("False", REASON_NOT_FOUND)
    assert "t2" in cond["message"]
    assert plan.status["tenants"][1] == {
        "tenantSubdomain": "t2", "serviceName": "mymail-t2", "status": "False", "reason": REASON_NOT_FOUND}


@pytest.mark.parametrize(
    "annotation",
    ["t1", '{"t1": 1}', "[]", '["T1"]', '["t_1"]', '[1]', '["t1", "t1"]', '["' + "a" * 64 + '"]', '"t1"', "[null]"],
)
def test_invalid_tenant_annotation(annotation):
    cr, plan = run(cr_obj(tenants=annotation), lookups={})
    assert plan.changes == ()
    assert plan.routes == {}
    cond = condition(plan)
    assert (cond["status"], cond["reason"]) == ("False", REASON_ANNOTATION_INVALID)
    assert model.TENANTS_ANNOTATION in cond["message"]
    assert plan.event.type == "Warning"


def test_invalid_annotation_removes_what_existed():
    _, plan = run(cr_obj())
    existing = apply(plan, Existing())
    _, plan2 = run(cr_obj(tenants="not json", status=plan.status), existing=existing, lookups={})
    assert sorted((c.action, c.kind) for c in plan2.changes) == [
        ("delete", "EndpointSlice"), ("delete", "NetworkPolicy"), ("delete", "Service")]


@pytest.mark.parametrize(
    "error,reason",
    [
        (DestinationNotFound("destination 'x' not found"), REASON_NOT_FOUND),
        (TypeNotSupported("destination 'x' has type HTTP, not MAIL"), REASON_TYPE_NOT_SUPPORTED),
        (ProxyTypeNotSupported("ProxyType PrivateLink"), REASON_PROXY_TYPE_NOT_SUPPORTED),
    ],
)
def test_definitive_lookup_failures(error, reason):
    _, ok = run(cr_obj())
    existing = apply(ok, Existing())
    _, plan = run(cr_obj(status=ok.status), lookups={None: error}, existing=existing, now=LATER)
    cond = condition(plan)
    assert (cond["status"], cond["reason"], cond["message"]) == ("False", reason, error.message)
    assert cond["lastUpdateTime"] == LATER
    assert plan.routes == {}
    assert {(c.action, c.kind) for c in plan.changes} == {
        ("delete", "EndpointSlice"), ("delete", "NetworkPolicy"), ("delete", "Service")}
    assert plan.event.type == "Warning" and plan.event.reason == reason


def test_transient_lookup_failure_keeps_the_objects():
    _, ok = run(cr_obj())
    existing = apply(ok, Existing())
    _, plan = run(cr_obj(status=ok.status), lookups={None: SourceUnavailable("timeout")},
                  existing=existing, allocations=ok.routes)
    assert plan.changes == ()
    assert plan.routes == ok.routes
    assert condition(plan)["reason"] == REASON_LOOKUP_FAILED


def test_name_clash_with_a_foreign_service():
    foreign = {"metadata": {"name": "mymail", "namespace": "apps", "labels": {"app": "theirs"}},
               "spec": {"ports": [{"port": 25}], "selector": {"app": "theirs"}}}
    _, plan = run(cr_obj(), existing=Existing(services={"mymail": foreign}))
    assert plan.changes == ()
    cond = condition(plan)
    assert (cond["status"], cond["reason"]) == ("False", REASON_NAME_PRESENT)
    assert "mymail" in cond["message"]


def test_name_clash_with_a_service_of_another_destination():
    # CR "a" with tenant "b" and CR "a-b" both want Service "a-b"
    _, other = run(cr_obj(name="a-b", uid="uid-other"))
    existing = apply(other, Existing())
    _, plan = run(cr_obj(name="a", tenants='["b"]'), existing=Existing(services=existing.services))
    assert condition(plan)["reason"] == REASON_NAME_PRESENT
    assert plan.changes == ()


def test_objects_of_another_namespace_are_never_ours():
    """An editor of namespace ``a`` labels a Service of theirs as mailgw's and points its
    annotation at CR ``b/x``: neither the index nor the reconciler takes it for ``b/x``'s,
    so no plan deletes ``b``'s object of the same name."""
    from mailgw.kube.reconcile import cr_key_of

    bait = {"metadata": {"name": "victim", "namespace": "a", "labels": {model.MANAGED_BY_LABEL: "mailgw"},
                         "annotations": {model.CR_ANNOTATION: "b/x"}}}
    assert cr_key_of(bait) is None
    _, plan = run(cr_obj(name="x", ns="b"), existing=Existing(
        services={"victim": bait}, slices={"victim-mailgw": dict(bait, metadata=dict(bait["metadata"], name="victim-mailgw"))}))
    assert [c for c in plan.changes if c.action == "delete"] == []
    assert condition(plan)["status"] == "True"


def test_leftovers_of_a_recreated_cr_are_adopted():
    _, old = run(cr_obj(uid="old-uid"))
    existing = apply(old, Existing())
    _, plan = run(cr_obj(uid="new-uid"), existing=existing)
    assert condition(plan)["status"] == "True"
    assert {(c.action, c.kind) for c in plan.changes} == {
        ("patch", "Service"), ("patch", "EndpointSlice"), ("patch", "NetworkPolicy")}
    svc_patch = next(c.body for c in plan.changes if c.kind == "Service")
    assert svc_patch["metadata"]["ownerReferences"][0]["uid"] == "new-uid"
    assert plan.routes == old.routes  # the port survives


def test_port_change_patches_the_service_only():
    _, ok = run(cr_obj())
    existing = apply(ok, Existing())
    spec = {"destinationRef": {"name": "x"}, "service": {"port": 2465}}
    _, plan = run(cr_obj(spec=spec, status=ok.status, generation=2), existing=existing, now=LATER)
    assert [(c.action, c.kind) for c in plan.changes] == [("patch", "Service")]
    assert plan.changes[0].body["spec"]["ports"][0]["port"] == 2465
    assert plan.routes == ok.routes
    assert plan.status["observedGeneration"] == 2
    assert "mymail:2465" in condition(plan)["message"]


def test_tenant_removed_deletes_its_objects():
    _, ok = run(cr_obj(tenants='["t1", "t2"]'))
    existing = apply(ok, Existing())
    _, plan = run(cr_obj(tenants='["t1"]', status=ok.status), existing=existing)
    deletes = sorted((c.kind, c.name) for c in plan.changes if c.action == "delete")
    assert deletes == [("EndpointSlice", "mymail-t2-mailgw"), ("Service", "mymail-t2")]
    assert [c.kind for c in plan.changes if c.action == "patch"] == ["NetworkPolicy"]
    assert plan.status["tenants"] == [{"tenantSubdomain": "t1", "serviceName": "mymail-t1", "status": "True"}]


def test_tenants_to_single_clears_status_tenants():
    _, ok = run(cr_obj(tenants='["t1"]'))
    existing = apply(ok, Existing())
    _, plan = run(cr_obj(status=ok.status), existing=existing)
    assert plan.status_patch["tenants"] is None
    assert created(plan, "Service").keys() == {"mymail"}


def test_allocations_are_recorded_on_the_policy_and_read_back_from_it():
    _, ok = run(cr_obj(tenants='["t1", "t2"]'))
    existing = apply(ok, Existing())
    (policy,) = existing.policies.values()
    assert json.loads(policy["metadata"]["annotations"][model.PORTS_ANNOTATION]) == {
        r.tenant: p for r, p in ok.routes.items()}
    assert routes_from_policy(policy, GW.port_range) == dict(ok.routes)
    # a port outside the range, or one the rule does not admit, is not believed
    edited = copy.deepcopy(policy)
    unadmitted = next(p for p in range(20000, 20100) if p not in ok.routes.values())
    edited["metadata"]["annotations"][model.PORTS_ANNOTATION] = json.dumps({"t1": 80, "t2": unadmitted})
    assert routes_from_policy(edited, GW.port_range) == {}


def test_an_edited_service_annotation_is_not_believed_but_restored_with_an_event():
    _, ok = run(cr_obj())
    existing = apply(ok, Existing())
    svc = existing.services["mymail"]
    route = Route("apps", "mymail")
    svc["metadata"]["annotations"][model.PORT_ANNOTATION] = "22"
    svc["spec"]["ports"][0]["targetPort"] = 22
    _, plan = run(cr_obj(status=ok.status), existing=existing, allocations=ok.routes)
    assert plan.routes == ok.routes  # the trusted allocation stands
    (change,) = plan.changes
    assert change.kind == "Service" and change.body["spec"]["ports"][0]["targetPort"] == ok.routes[route]
    assert change.body["metadata"]["annotations"][model.PORT_ANNOTATION] == str(ok.routes[route])
    (warning,) = plan.warnings
    assert warning.type == "Warning" and warning.reason == model.EVENT_SERVICE_EDITED
    assert "'22'" in warning.message and str(ok.routes[route]) in warning.message


def test_a_pod_that_cannot_open_the_port_is_warned_about_once():
    """A ready pod that cannot open a route's port: one Warning when the slices first list
    it neither ready nor serving, none while they already do, none for a pod not ready."""
    _, ok = run(cr_obj())
    port = ok.routes[Route("apps", "mymail")]
    existing = apply(ok, Existing())
    unbound = (GatewayPod("gw-1", "10.0.0.1", unbound_ports={port}), GatewayPod("gw-0", "10.0.0.2"),
               GatewayPod("gw-2", "10.0.0.3", ready=False, serving=False, unbound_ports={port}))
    _, plan = run(cr_obj(status=ok.status), existing=existing, allocations=ok.routes, pods=unbound)
    (warning,) = plan.warnings
    assert warning.type == "Warning" and warning.reason == model.EVENT_PORT_UNAVAILABLE
    assert "gw-1" in warning.message and str(port) in warning.message and "apps/mymail" in warning.message
    (patch,) = [c for c in plan.changes if c.kind == "EndpointSlice"]
    _, again = run(cr_obj(status=ok.status), existing=apply(plan, existing), allocations=ok.routes, pods=unbound)
    assert again.warnings == () and again.changes == ()
    # a slice someone mangled is no reason to fail: the pod is simply not known as told
    mangled = apply(plan, existing)
    mangled.slices["mymail-mailgw"]["endpoints"] = ["x", {"conditions": "no", "targetRef": 3}]
    _, plan = run(cr_obj(status=ok.status), existing=mangled, allocations=ok.routes, pods=unbound)
    assert [w.reason for w in plan.warnings] == [model.EVENT_PORT_UNAVAILABLE]


def test_a_port_warning_is_not_repeated_while_the_slice_write_fails_and_is_new_for_a_new_port():
    route = Route("apps", "mymail")
    _, ok = run(cr_obj())
    port = ok.routes[route]
    existing = apply(ok, Existing())
    pods = (GatewayPod("gw-1", "10.0.0.1", unbound_ports={port, port + 1}), GatewayPod("gw-0", "10.0.0.2"))
    _, plan = run(cr_obj(status=ok.status), existing=existing, allocations=ok.routes, pods=pods)
    (patch,) = plan.changes
    assert len(plan.warnings) == 1
    # the slice patch fails (an outage, a webhook): the retry would find the same cache
    failed = failed_plan(plan, parse_cr(cr_obj(status=ok.status)), [ApplyFailure(patch, "boom")], NOW)
    assert failed.warnings == ()
    # told for the old port is not told for the new one
    told = apply(plan, existing).slices
    assert unbound_warnings(parse_cr(cr_obj()), route, port, pods, told) == []
    moved = copy.deepcopy(told)
    moved["mymail-mailgw"]["ports"][0]["port"] = port + 1
    assert [w.route for w in unbound_warnings(parse_cr(cr_obj()), route, port, pods, moved)] == [route]


def test_allocation_avoids_ports_of_other_destinations():
    route = Route("apps", "mymail")
    natural = allocate([route], {}, (), GW.port_range)[route]
    other = {Route("other", "x"): natural}
    _, plan = run(cr_obj(), allocations=other)
    assert plan.routes[route] != natural


def test_allocation_is_stable_and_deterministic():
    routes = [Route("ns", f"d{i}") for i in range(20)]
    a = allocate(routes, {}, (), (1000, 1099))
    b = allocate(list(reversed(routes)), {}, (), (1000, 1099))
    assert a == b and len(set(a.values())) == 20
    # adding a route never moves existing ones
    c = allocate(routes + [Route("ns", "new")], a, (), (1000, 1099))
    assert {r: c[r] for r in routes} == a
    # out-of-range allocations (range changed) are moved into the range
    d = allocate(routes[:1], {routes[0]: 5}, (), (1000, 1099))
    assert 1000 <= d[routes[0]] <= 1099


def test_ports_exhausted():
    gw = GatewayPlacement("mailgw-system", {"a": "b"}, (20000, 20000))
    cr = parse_cr(cr_obj(tenants='["t1", "t2"]'))
    plan = reconcile(cr, {"t1": SMTPS, "t2": SMTPS}, Existing(), {}, PODS, gw, NOW)
    assert len(plan.routes) == 1
    assert condition(plan)["reason"] == REASON_SERVICE_FAILED
    assert "no free gateway port" in condition(plan)["message"]


def test_unusable_ports_are_skipped():
    route = Route("apps", "mymail")
    natural = allocate([route], {}, (), GW.port_range)[route]
    _, plan = run(cr_obj(), unusable_ports={natural})
    assert plan.routes[route] != natural


def test_cluster_wide_scope_admits_everyone():
    spec = {"destinationRef": {"name": "x"}, "accessControl": {"scope": "clusterWide"}}
    _, plan = run(cr_obj(spec=spec))
    (policy,) = created(plan, "NetworkPolicy").values()
    assert "from" not in policy["spec"]["ingress"][0]


def test_pod_changes_patch_the_endpoint_slices():
    _, ok = run(cr_obj())
    existing = apply(ok, Existing())
    pods = (GatewayPod("gw-0", "10.0.0.2"), GatewayPod("gw-2", "10.0.0.3"))
    _, plan = run(cr_obj(status=ok.status), existing=existing, pods=pods)
    assert [(c.action, c.kind) for c in plan.changes] == [("patch", "EndpointSlice")]
    assert [e["addresses"] for e in plan.changes[0].body["endpoints"]] == [["10.0.0.2"], ["10.0.0.3"]]
    _, plan = run(cr_obj(status=ok.status), existing=existing, pods=())
    assert plan.changes[0].body["endpoints"] == []


def test_ipv6_pods_get_their_own_slice():
    pods = PODS + (GatewayPod("gw-6", "fd00::6"),)
    _, plan = run(cr_obj(), pods=pods)
    slices = created(plan, "EndpointSlice")
    assert slices["mymail-mailgw-ipv6"]["addressType"] == "IPv6"
    assert [e["addresses"] for e in slices["mymail-mailgw-ipv6"]["endpoints"]] == [["fd00::6"]]
    assert len(slices["mymail-mailgw"]["endpoints"]) == 2


def test_service_name_too_long():
    _, plan = run(cr_obj(name="x" * 60, tenants='["tenant"]'))
    assert condition(plan)["reason"] == REASON_SERVICE_FAILED
    assert plan.changes == ()


def test_someone_edits_our_service_back_to_desired():
    _, ok = run(cr_obj())
    existing = apply(ok, Existing())
    existing.services["mymail"]["spec"]["selector"] = {"app": "x"}
    existing.services["mymail"]["metadata"]["labels"]["extra"] = "kept"
    _, plan = run(cr_obj(status=ok.status), existing=existing)
    (change,) = plan.changes
    assert change.body["spec"]["selector"] is None
    fixed = apply(plan, existing)
    assert fixed.services["mymail"]["metadata"]["labels"]["extra"] == "kept"
    _, plan = run(cr_obj(status=ok.status), existing=fixed)
    assert plan.changes == ()


def test_server_defaults_do_not_cause_patches():
    _, ok = run(cr_obj())
    existing = apply(ok, Existing())
    svc = existing.services["mymail"]
    svc["spec"].update(clusterIP="10.96.0.10", sessionAffinity="None", ipFamilies=["IPv4"])
    svc["metadata"].update(resourceVersion="7", creationTimestamp=NOW)
    _, plan = run(cr_obj(status=ok.status), existing=existing)
    assert plan.changes == ()


def test_failed_apply_becomes_service_creation_failed():
    cr, plan = run(cr_obj())
    svc_change = next(c for c in plan.changes if c.kind == "Service")
    failed = failed_plan(plan, cr, [ApplyFailure(svc_change, "API error 500")], NOW)
    cond = condition(failed)
    assert (cond["status"], cond["reason"]) == ("False", REASON_SERVICE_FAILED)
    assert "Service apps/mymail" in cond["message"] and "500" in cond["message"]
    assert failed.event.type == "Warning"


def test_a_foreign_object_met_when_applying_is_a_name_clash():
    cr, plan = run(cr_obj())
    svc_change = next(c for c in plan.changes if c.kind == "Service")
    failed = failed_plan(plan, cr, [ApplyFailure(svc_change, "exists", foreign=True)], NOW)
    assert condition(failed)["reason"] == REASON_NAME_PRESENT
    assert failed.routes == {}


def test_deletion():
    cr, plan = run(cr_obj(tenants='["t1", "t2"]'))
    existing = apply(plan, Existing())
    changes = deletion_changes(existing, GW)
    assert sorted((c.kind, c.name) for c in changes) == sorted(
        [("Service", "mymail-t1"), ("Service", "mymail-t2"), ("EndpointSlice", "mymail-t1-mailgw"),
         ("EndpointSlice", "mymail-t2-mailgw"), ("NetworkPolicy", "mailgw-apps.mymail")])


def test_policy_names_are_unique_per_cr():
    a, b = parse_cr(cr_obj(name="b-c", ns="a")), parse_cr(cr_obj(name="c", ns="a-b"))
    assert policy_name(a) != policy_name(b)
    assert (policy_name(a), policy_name(b)) == ("mailgw-a.b-c", "mailgw-a-b.c")


def test_terminating_pods_stay_listed_as_not_ready_and_dual_stack_pods_are_in_both_slices():
    pods = (
        GatewayPod("gw-0", ("10.0.0.2", "fd00::2")),
        GatewayPod("gw-1", "10.0.0.1", ready=False, serving=False, terminating=True),
        GatewayPod("gw-2", "10.0.0.3", ready=False, serving=False),  # not ready, not going: left out
    )
    _, plan = run(cr_obj(), pods=pods)
    slices = created(plan, "EndpointSlice")
    v4 = {e["addresses"][0]: e["conditions"] for e in slices["mymail-mailgw"]["endpoints"]}
    assert v4 == {"10.0.0.2": {"ready": True, "serving": True, "terminating": False},
                  "10.0.0.1": {"ready": False, "serving": False, "terminating": True}}
    assert [e["addresses"] for e in slices["mymail-mailgw-ipv6"]["endpoints"]] == [["fd00::2"]]


@pytest.mark.parametrize(
    "spec,fragment",
    [
        ({}, "destinationRef"),
        ({"destinationRef": {}}, "destinationRef"),
        ({"destinationRef": {"name": "x"}, "service": {"port": 0}}, "port"),
        ({"destinationRef": {"name": "x"}, "service": {"port": "465"}}, "port"),
        ({"destinationRef": {"name": "x"}, "accessControl": {"scope": "world"}}, "scope"),
    ],
)
def test_bad_spec(spec, fragment):
    cr, plan = run(cr_obj(spec=spec), lookups={})
    assert cr.problem.reason == REASON_SPEC_INVALID
    assert fragment in condition(plan)["message"]
    assert plan.changes == ()


def test_parse_cr_fields():
    obj = cr_obj(spec={"destinationRef": {"name": "d"}, "destinationServiceInstanceName": "dest-svc",
                       "service": {"port": 2465}, "accessControl": {"scope": "clusterWide"}},
                 tenants=json.dumps(["a", "b"]))
    obj["metadata"]["resourceVersion"] = "12"
    cr = parse_cr(obj)
    assert (cr.destination_ref, cr.instance, cr.service_port, cr.scope, cr.tenants) == (
        "d", "dest-svc", 2465, "clusterWide", ("a", "b"))
    assert cr.resource_version == "12" and cr.generation == 1
    assert [r.service_name for r in cr.routes()] == ["mymail-a", "mymail-b"]
    with pytest.raises(ValueError):
        parse_cr({"metadata": {}})
