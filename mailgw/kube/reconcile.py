"""The reconciler's pure core: from a Destination CR and what exists to what should exist.

No I/O and no Twisted here.  :func:`reconcile` takes the parsed CR, the destination
lookup result of each of its routes, the objects that exist now, the gateway's port
allocations and its ready pods, and returns a :class:`Plan`: the routes the gateway
serves (with their gateway ports), the create/patch/delete changes that make the API
server's objects match, and the CR's new status.  Applying a plan twice changes nothing
the second time, so a missed event is healed by the next resync.

Objects, per route ``(CR, tenant)``, in the CR's namespace (so they can carry an
ownerReference to the CR and are garbage-collected with it):

- Service ``<cr>`` or ``<cr>-<tenant>``: no selector, one port named ``mail`` on the
  requested port (``spec.service.port`` or the protocol's default);
- EndpointSlice ``<service>-mailgw`` (and ``<service>-mailgw-ipv6`` when gateway pods have
  IPv6 addresses): the ready gateway pods on the port the gateway allocated.

Per CR, in the *gateway's* namespace: a NetworkPolicy ``mailgw-<namespace>.<name>``
(unique: a namespace name has no dot) selecting the gateway pods that admits traffic to
the CR's gateway ports.  It also records which route has which gateway port (annotation
``mailgw.io/gateway-ports``): objects in the gateway's namespace can only be written by
the gateway and cluster administrators, so that record -- not the Service annotation,
which any editor of the CR's namespace can change -- is what every replica trusts.  A NetworkPolicy only selects pods of its own
namespace, so it cannot live next to the CR; owner references cannot cross namespaces
either, so it is found by the ``mailgw.io/destination-uid`` label and deleted by the
controller when the CR goes.  With scope ``namespaced`` it admits only the CR's namespace;
with ``clusterWide`` it admits every source (needed as soon as any other policy isolates
the gateway pods, which the namespaced ones do).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Container, Iterable, Mapping, Sequence

from attrs import field, frozen

from mailgw.destination import PROTOCOLS, Destination
from mailgw.kube.model import (
    PORTS_ANNOTATION,
    CONDITION_AVAILABLE,
    CR_ANNOTATION,
    EVENT_PORT_UNAVAILABLE,
    EVENT_SERVICE_EDITED,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    NAME_LABEL,
    NAMESPACE_LABEL,
    PORT_ANNOTATION,
    PORT_NAME,
    REASON_NAME_PRESENT,
    REASON_OK,
    REASON_SERVICE_FAILED,
    SCOPE_NAMESPACED,
    TENANT_LABEL,
    UID_LABEL,
    DestinationCR,
    Problem,
    Route,
    is_label_value,
    is_service_name,
    lookup_problem,
)
from mailgw.sources.base import DestinationLookupError, SourceUnavailable

SERVICE = "Service"
ENDPOINT_SLICE = "EndpointSlice"
NETWORK_POLICY = "NetworkPolicy"
#: the CR itself: its status subresource (Change action ``status``)
DESTINATION = "Destination"
EVENT = "Event"

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
SLICE_MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"
SLICE_MANAGED_BY = "mailgw.io"
PROTOCOL_ANNOTATION = "mailgw.io/protocol"

_OUR_LABELS = (MANAGED_BY_LABEL, UID_LABEL, NAME_LABEL, TENANT_LABEL)
_OUR_SLICE_LABELS = _OUR_LABELS + (SERVICE_NAME_LABEL, SLICE_MANAGED_BY_LABEL)
_OUR_POLICY_LABELS = (MANAGED_BY_LABEL, UID_LABEL, NAME_LABEL, NAMESPACE_LABEL)
_OUR_ANNOTATIONS = (CR_ANNOTATION, PORT_ANNOTATION, PROTOCOL_ANNOTATION)


def _ips(value: str | Iterable[str]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


@frozen
class GatewayPod:
    """A gateway pod as the EndpointSlices list it: its IPs (``podIPs``, one per address
    family), whether it is ready, and whether it is terminating.  A terminating pod stays
    in the slices with ``ready: false`` and ``terminating: true`` (``serving`` says
    whether it still passes its readiness probe), so clients stop being sent to it while
    its open sessions drain."""

    name: str
    ips: tuple[str, ...] = field(converter=_ips)
    #: ready and not terminating (the controller's pod_of says so)
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    #: gateway ports this pod could not open (``UNBOUND_PORTS_ANNOTATION``)
    unbound_ports: frozenset[int] = field(default=frozenset(), converter=frozenset)

    def conditions(self, port: int) -> dict[str, bool]:
        """The EndpointSlice conditions of this pod for gateway ``port``: where it could
        not open the port it is neither ready nor serving."""
        listening = port not in self.unbound_ports
        return {"ready": self.ready and listening, "serving": self.serving and listening,
                "terminating": self.terminating}


def sorted_pairs(mapping: Mapping[str, str] | Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """A mapping (or its items) as sorted pairs: a hashable value for frozen settings."""
    return tuple(sorted(dict(mapping).items()))


@frozen
class GatewayPlacement:
    """Where the gateway runs: its namespace, its pods' labels, its port range.  (Not to
    be confused with :class:`mailgw.service.Gateway`, what the sessions share.)"""

    namespace: str
    pod_labels: tuple[tuple[str, str], ...] = field(converter=sorted_pairs)
    port_range: tuple[int, int] = (20000, 29999)

    @property
    def labels(self) -> dict[str, str]:
        return dict(self.pod_labels)


@frozen
class Existing:
    """Objects read from the API server for one CR, as JSON objects keyed by name.

    ``services``: Services of the CR's namespace that the CR owns *and* any other Service
    whose name the CR wants (to detect a clash).  ``slices``: EndpointSlices the CR owns.
    ``policies``: NetworkPolicies of the gateway's namespace the CR owns.
    """

    services: Mapping[str, Mapping[str, Any]] = field(factory=dict)
    slices: Mapping[str, Mapping[str, Any]] = field(factory=dict)
    policies: Mapping[str, Mapping[str, Any]] = field(factory=dict)


@frozen
class Change:
    """One write: ``create`` / ``patch`` (JSON merge patch) / ``delete`` of an object, or
    ``status``: a merge patch of a Destination's status subresource."""

    action: str
    kind: str
    namespace: str
    name: str
    body: Mapping[str, Any] | None = field(default=None, eq=False, repr=False)
    route: Route | None = None


@frozen
class Event:
    """A Kubernetes Event to record on the CR."""

    type: str  # Normal | Warning
    reason: str
    message: str
    #: the route it is about, when it is about one: not recorded when that route's writes failed
    route: Route | None = None


@frozen
class Plan:
    """What :func:`reconcile` decided."""

    #: routes the gateway serves for this CR, with their gateway ports
    routes: Mapping[Route, int]
    changes: tuple[Change, ...]
    #: the CR's whole new status
    status: Mapping[str, Any]
    #: merge patch for the status subresource, or None when nothing changed
    status_patch: Mapping[str, Any] | None
    #: per-route problems (key None: the CR as a whole)
    problems: Mapping[Route | None, Problem]
    #: the Service port of each served route
    service_ports: Mapping[Route, int] = field(factory=dict)
    #: the Event recording a change of the Available condition
    event: Event | None = None
    #: more Events: objects found edited behind the gateway's back (and restored)
    warnings: tuple[Event, ...] = ()


# --- small helpers ----------------------------------------------------------------


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def _labels(obj: Mapping[str, Any]) -> Mapping[str, str]:
    labels = _meta(obj).get("labels")
    return labels if isinstance(labels, Mapping) else {}


def _annotations(obj: Mapping[str, Any]) -> Mapping[str, str]:
    annotations = _meta(obj).get("annotations")
    return annotations if isinstance(annotations, Mapping) else {}


def cr_ref(cr: DestinationCR) -> str:
    return f"{cr.namespace}/{cr.name}"


def is_managed(obj: Mapping[str, Any]) -> bool:
    return _labels(obj).get(MANAGED_BY_LABEL) == MANAGED_BY


def owned_by(obj: Mapping[str, Any], cr: DestinationCR) -> bool:
    """Is ``obj`` ours for this CR?

    Matched by uid, or by the ``namespace/name`` annotation: a CR deleted and created
    again under the same name adopts what its predecessor left behind.
    """
    if not is_managed(obj):
        return False
    return _labels(obj).get(UID_LABEL) == cr.uid or _annotations(obj).get(CR_ANNOTATION) == cr_ref(cr)


def _namespace_of(obj: Mapping[str, Any], cr: DestinationCR) -> str:
    """Where a delete of ``obj`` goes: its own namespace, never one derived from a name."""
    return str(_meta(obj).get("namespace") or cr.namespace)


def _here(obj: Mapping[str, Any], cr: DestinationCR) -> bool:
    """Is ``obj`` in ``cr``'s namespace (an object without one is taken to be)?"""
    return _meta(obj).get("namespace", cr.namespace) == cr.namespace


def read_port(obj: Mapping[str, Any]) -> int | None:
    """The gateway port recorded on an owned Service, or None."""
    text = _annotations(obj).get(PORT_ANNOTATION)
    try:
        port = int(str(text))
    except (TypeError, ValueError):
        return None
    return port if 0 < port < 65536 else None


def _annotated_cr(obj: Mapping[str, Any]) -> tuple[str, str] | None:
    """``(namespace, name)`` from a managed object's ``mailgw.io/destination`` annotation."""
    if not is_managed(obj):
        return None
    ref = _annotations(obj).get(CR_ANNOTATION)
    if not isinstance(ref, str) or "/" not in ref:
        return None
    namespace, _, name = ref.partition("/")
    return (namespace, name)


def cr_key_of(obj: Mapping[str, Any]) -> tuple[str, str] | None:
    """``(namespace, name)`` of the CR a managed Service or EndpointSlice belongs to: its
    annotation, believed only when it names the object's own namespace.  Anyone who may
    edit one namespace may label and annotate objects there; were an object in ``a``
    annotated ``b/x`` taken for CR ``b/x``'s, the leader would delete ``b``'s objects of
    its name."""
    key = _annotated_cr(obj)
    return key if key is not None and _meta(obj).get("namespace") == key[0] else None


def policy_cr_key_of(policy: Mapping[str, Any]) -> tuple[str, str] | None:
    """``(namespace, name)`` of the CR a managed NetworkPolicy belongs to.  Policies live
    in the gateway's namespace (only they are watched), which only the gateway and
    cluster administrators write, so their annotation is believed as it is."""
    return _annotated_cr(policy)


def route_of_service(obj: Mapping[str, Any]) -> Route | None:
    """The route of any managed Service, from its annotations (for cluster-wide reads)."""
    key = cr_key_of(obj)
    if key is None:
        return None
    namespace, name = key
    tenant = _labels(obj).get(TENANT_LABEL) or None
    route = Route(namespace, name, tenant)
    meta = _meta(obj)
    if meta.get("namespace") != namespace or meta.get("name") != route.service_name:
        return None
    return route


def _bounded_name(base: str, limit: int = 253) -> str:
    if len(base) <= limit:
        return base
    digest = hashlib.sha256(base.encode()).hexdigest()[:10]
    return base[: limit - 11].rstrip("-.") + "-" + digest


def policy_name(cr: DestinationCR) -> str:
    """``mailgw-<namespace>.<name>``: unique per CR, because a namespace name never holds
    a dot (``a/b-c`` and ``a-b/c`` give ``mailgw-a.b-c`` and ``mailgw-a-b.c``)."""
    return _bounded_name(f"mailgw-{cr.namespace}.{cr.name}")


def ports_annotation(routes: Mapping[Route, int]) -> str:
    """The route -> gateway port record on the NetworkPolicy (tenant, or "" for the
    CR's single route)."""
    return json.dumps({(r.tenant or ""): p for r, p in sorted(routes.items(), key=lambda kv: kv[0].sort_key())},
                      separators=(",", ":"), sort_keys=True)


def admitted_ports(policy: Mapping[str, Any]) -> set[int]:
    """The ports a NetworkPolicy's ingress rules admit."""
    admitted = set()
    spec = policy.get("spec") if isinstance(policy.get("spec"), Mapping) else {}
    for rule in spec.get("ingress") or []:
        for p in (rule.get("ports") or []) if isinstance(rule, Mapping) else []:
            if isinstance(p, Mapping) and isinstance(p.get("port"), int):
                admitted.add(p["port"])
    return admitted


def routes_from_policy(policy: Mapping[str, Any], port_range: tuple[int, int]) -> dict[Route, int]:
    """The routes and ports a managed NetworkPolicy records for its CR.

    Only ports within ``port_range`` that the policy itself admits count: the record is
    checked against the rule it sits next to.  ``{}`` for anything else.
    """
    key = policy_cr_key_of(policy)
    if key is None:
        return {}
    namespace, name = key
    try:
        record = json.loads(_annotations(policy).get(PORTS_ANNOTATION) or "{}")
    except ValueError:
        record = {}
    if not isinstance(record, Mapping):
        record = {}
    lo, hi = port_range
    admitted = admitted_ports(policy)
    routes: dict[Route, int] = {}
    for tenant, port in record.items():
        if isinstance(tenant, str) and isinstance(port, int) and not isinstance(port, bool) \
                and lo <= port <= hi and port in admitted:
            routes[Route(namespace, name, tenant or None)] = port
    return routes


def slice_name(service_name: str, ipv6: bool = False) -> str:
    return f"{service_name}-mailgw" + ("-ipv6" if ipv6 else "")


# --- port allocation --------------------------------------------------------------


def allocate(
    routes: Iterable[Route],
    current: Mapping[Route, int],
    taken: Container[int],
    port_range: tuple[int, int],
    unusable: Container[int] = (),
) -> dict[Route, int]:
    """Give each route a gateway port in ``port_range`` not in ``taken`` (ports of other
    routes) nor ``unusable`` (ports these routes could not bind).

    A route keeps its current port when it is in range and free; a new route probes from
    a hash of its key, so the choice does not depend on the order routes appear in.  A
    route for which no port is left is missing from the result.
    """
    lo, hi = port_range
    size = hi - lo + 1
    used: set[int] = set()

    def free(port: int) -> bool:
        return port not in used and port not in taken and port not in unusable

    ordered = sorted(set(routes), key=Route.sort_key)
    result: dict[Route, int] = {}
    for route in ordered:
        port = current.get(route)
        if port is not None and lo <= port <= hi and free(port):
            result[route] = port
            used.add(port)
    for route in ordered:
        if route in result:
            continue
        start = int.from_bytes(hashlib.sha256(route.key.encode()).digest()[:8], "big") % size
        for i in range(size):
            port = lo + (start + i) % size
            if free(port):
                result[route] = port
                used.add(port)
                break
    return result


# --- desired objects --------------------------------------------------------------


def _object_labels(cr: DestinationCR, route: Route) -> dict[str, str]:
    labels = {MANAGED_BY_LABEL: MANAGED_BY, UID_LABEL: cr.uid, TENANT_LABEL: route.tenant or ""}
    if is_label_value(cr.name):
        labels[NAME_LABEL] = cr.name
    return labels


def service_body(
    cr: DestinationCR, route: Route, service_port: int, gateway_port: int, protocol: str
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": SERVICE,
        "metadata": {
            "name": route.service_name,
            "namespace": cr.namespace,
            "labels": _object_labels(cr, route),
            "annotations": {
                CR_ANNOTATION: cr_ref(cr),
                PORT_ANNOTATION: str(gateway_port),
                PROTOCOL_ANNOTATION: protocol,
            },
            "ownerReferences": [cr.owner_reference()],
        },
        "spec": {
            "type": "ClusterIP",
            "ports": [
                {"name": PORT_NAME, "protocol": "TCP", "port": service_port, "targetPort": gateway_port}
            ],
        },
    }


def slice_bodies(
    cr: DestinationCR, route: Route, gateway_port: int, pods: Iterable[GatewayPod], gateway: GatewayPlacement
) -> dict[str, dict[str, Any]]:
    """One EndpointSlice per address family in use (the IPv4 one always exists); a
    dual-stack pod is in both, with the address of each family (its ``podIPs``)."""
    families: dict[bool, list[tuple[str, GatewayPod]]] = {False: [], True: []}
    for pod in pods:
        if not (pod.ready or pod.terminating):
            continue
        for ip in dict.fromkeys(pod.ips):
            families[":" in ip].append((ip, pod))
    result = {}
    for ipv6, members in families.items():
        if ipv6 and not members:
            continue
        name = slice_name(route.service_name, ipv6)
        labels = _object_labels(cr, route)
        labels[SERVICE_NAME_LABEL] = route.service_name
        labels[SLICE_MANAGED_BY_LABEL] = SLICE_MANAGED_BY
        result[name] = {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": ENDPOINT_SLICE,
            "metadata": {
                "name": name,
                "namespace": cr.namespace,
                "labels": labels,
                "annotations": {CR_ANNOTATION: cr_ref(cr), PORT_ANNOTATION: str(gateway_port)},
                "ownerReferences": [cr.owner_reference()],
            },
            "addressType": "IPv6" if ipv6 else "IPv4",
            "ports": [{"name": PORT_NAME, "protocol": "TCP", "port": gateway_port}],
            "endpoints": [
                {
                    "addresses": [ip],
                    "conditions": pod.conditions(gateway_port),
                    "targetRef": {"kind": "Pod", "namespace": gateway.namespace, "name": pod.name},
                }
                for ip, pod in sorted(members, key=lambda m: (m[0], m[1].name))
            ],
        }
    return result


def policy_body(cr: DestinationCR, routes: Mapping[Route, int], gateway: GatewayPlacement) -> dict[str, Any]:
    labels = {MANAGED_BY_LABEL: MANAGED_BY, UID_LABEL: cr.uid, NAMESPACE_LABEL: cr.namespace}
    if is_label_value(cr.name):
        labels[NAME_LABEL] = cr.name
    rule: dict[str, Any] = {"ports": [{"protocol": "TCP", "port": p} for p in sorted(set(routes.values()))]}
    if cr.scope == SCOPE_NAMESPACED:
        rule["from"] = [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": cr.namespace}}}
        ]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": NETWORK_POLICY,
        "metadata": {
            "name": policy_name(cr),
            "namespace": gateway.namespace,
            "labels": labels,
            "annotations": {CR_ANNOTATION: cr_ref(cr), PORTS_ANNOTATION: ports_annotation(routes)},
        },
        "spec": {
            "podSelector": {"matchLabels": gateway.labels},
            "policyTypes": ["Ingress"],
            "ingress": [rule],
        },
    }


# --- comparing desired with existing -----------------------------------------------


def _subset(mapping: Mapping[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    return {k: mapping.get(k) for k in keys}


def _owner_view(obj: Mapping[str, Any]) -> list[tuple[Any, ...]]:
    refs = _meta(obj).get("ownerReferences") or []
    return sorted(
        (r.get("apiVersion"), r.get("kind"), r.get("name"), r.get("uid"), bool(r.get("controller")))
        for r in refs
        if isinstance(r, Mapping)
    )


def _ports_view(ports: Any, with_target: bool) -> list[tuple[Any, ...]]:
    view = []
    for p in ports or []:
        if not isinstance(p, Mapping):
            continue
        item = (p.get("name"), p.get("protocol") or "TCP", p.get("port"))
        if with_target:
            item += (str(p.get("targetPort", p.get("port"))),)
        view.append(item)
    return sorted(view, key=repr)


def _meta_patch(desired: Mapping[str, Any], label_keys: Iterable[str], with_owner: bool) -> dict[str, Any]:
    meta = desired["metadata"]
    patch: dict[str, Any] = {
        "labels": {k: meta["labels"].get(k) for k in label_keys},
        "annotations": dict(meta["annotations"]),
    }
    if with_owner:
        patch["ownerReferences"] = meta["ownerReferences"]
    return patch


def _meta_differs(
    existing: Mapping[str, Any], desired: Mapping[str, Any], label_keys: Iterable[str], with_owner: bool
) -> bool:
    keys = list(label_keys)
    if _subset(_labels(existing), keys) != _subset(desired["metadata"]["labels"], keys):
        return True
    if _subset(_annotations(existing), desired["metadata"]["annotations"]) != dict(
        desired["metadata"]["annotations"]
    ):
        return True
    return with_owner and _owner_view(existing) != _owner_view(desired)


def service_patch(existing: Mapping[str, Any], desired: Mapping[str, Any]) -> dict[str, Any] | None:
    """A merge patch turning ``existing`` into ``desired`` on the fields we manage."""
    spec = existing.get("spec") if isinstance(existing.get("spec"), Mapping) else {}
    differs = (
        _meta_differs(existing, desired, _OUR_LABELS, True)
        or (spec.get("type") or "ClusterIP") != "ClusterIP"
        or bool(spec.get("selector"))
        or _ports_view(spec.get("ports"), True) != _ports_view(desired["spec"]["ports"], True)
    )
    if not differs:
        return None
    return {
        "metadata": _meta_patch(desired, _OUR_LABELS, True),
        "spec": {"type": "ClusterIP", "selector": None, "ports": desired["spec"]["ports"]},
    }


def _endpoints_view(endpoints: Any) -> list[tuple[Any, ...]]:
    view = []
    for ep in endpoints or []:
        if not isinstance(ep, Mapping):
            continue
        conditions = ep.get("conditions") if isinstance(ep.get("conditions"), Mapping) else {}
        target = ep.get("targetRef") if isinstance(ep.get("targetRef"), Mapping) else {}
        view.append((
            tuple(ep.get("addresses") or ()),
            conditions.get("ready"), conditions.get("serving"), conditions.get("terminating"),
            target.get("name"),
        ))
    return sorted(view, key=repr)


def slice_patch(existing: Mapping[str, Any], desired: Mapping[str, Any]) -> dict[str, Any] | None:
    differs = (
        _meta_differs(existing, desired, _OUR_SLICE_LABELS, True)
        or _ports_view(existing.get("ports"), False) != _ports_view(desired["ports"], False)
        or _endpoints_view(existing.get("endpoints")) != _endpoints_view(desired["endpoints"])
    )
    if not differs:
        return None
    return {
        "metadata": _meta_patch(desired, _OUR_SLICE_LABELS, True),
        "ports": desired["ports"],
        "endpoints": desired["endpoints"],
    }


def policy_patch(existing: Mapping[str, Any], desired: Mapping[str, Any]) -> dict[str, Any] | None:
    spec = existing.get("spec") if isinstance(existing.get("spec"), Mapping) else {}
    differs = _meta_differs(existing, desired, _OUR_POLICY_LABELS, False) or _subset(
        spec, ("podSelector", "policyTypes", "ingress")
    ) != dict(desired["spec"])
    if not differs:
        return None
    return {
        "metadata": _meta_patch(desired, _OUR_POLICY_LABELS, False),
        "spec": {**desired["spec"], "egress": None},
    }


# --- status -----------------------------------------------------------------------


def _previous_condition(status: Mapping[str, Any]) -> Mapping[str, Any] | None:
    for cond in status.get("conditions") or []:
        if isinstance(cond, Mapping) and cond.get("type") == CONDITION_AVAILABLE:
            return cond
    return None


def build_status(
    cr: DestinationCR,
    problems: Mapping[Route | None, Problem],
    served: Mapping[Route, int],
    service_ports: Mapping[Route, int],
    now: str,
) -> tuple[dict[str, Any], dict[str, Any] | None, Event | None]:
    """The CR's new status, the merge patch to write it (None: unchanged), and an Event."""
    if problems:
        ordered = sorted(problems.items(), key=lambda kv: ("",) if kv[0] is None else kv[0].sort_key())
        first = ordered[0][1]
        if len(ordered) == 1:
            message = first.message
        else:
            message = "; ".join(
                (f"tenant {route.tenant}: " if route is not None and route.tenant else "") + p.message
                for route, p in ordered
            )
        status_value, reason = "False", first.reason
    else:
        names = ", ".join(
            f"{route.service_name}:{service_ports.get(route, '?')}"
            for route in sorted(served, key=Route.sort_key)
        )
        status_value, reason = "True", REASON_OK
        message = f"Service {names} ready" if len(served) == 1 else f"Services {names} ready"

    previous = _previous_condition(cr.status) or {}
    same = (previous.get("status"), previous.get("reason"), previous.get("message")) == (
        status_value,
        reason,
        message,
    )
    condition = {
        "type": CONDITION_AVAILABLE,
        "status": status_value,
        "reason": reason,
        "message": message,
        "lastUpdateTime": previous.get("lastUpdateTime") if same and previous.get("lastUpdateTime") else now,
        "lastTransitionTime": (
            previous.get("lastTransitionTime")
            if previous.get("status") == status_value and previous.get("lastTransitionTime")
            else now
        ),
        "observedGeneration": cr.generation,
    }
    status: dict[str, Any] = {"conditions": [condition], "observedGeneration": cr.generation}
    # one-line summaries for `kubectl get dst` (printer columns cannot join lists)
    if served:
        status["services"] = ",".join(r.service_name for r in sorted(served, key=Route.sort_key))
    if cr.tenants and cr.problem is None:
        status["tenantSubdomains"] = ",".join(cr.tenants)
        tenants = []
        for tenant in cr.tenants:
            route = Route(cr.namespace, cr.name, tenant)
            entry: dict[str, Any] = {
                "tenantSubdomain": tenant,
                "serviceName": route.service_name,
                "status": "False" if route in problems else "True",
            }
            if route in problems:
                entry["reason"] = problems[route].reason
            tenants.append(entry)
        status["tenants"] = tenants

    keys = ("conditions", "observedGeneration", "tenants", "services", "tenantSubdomains")
    old = {k: cr.status.get(k) for k in keys}
    new = {k: status.get(k) for k in keys}
    patch = None
    if old != new:
        patch = dict(status)
        for key in keys:  # merge patch: null removes what is no longer there
            if key not in status and cr.status.get(key) is not None:
                patch[key] = None

    event = None
    if not same:
        if status_value == "False":
            event = Event("Warning", reason, message)
        else:
            event = Event("Normal", reason, message)
    return status, patch, event


# --- the reconciler ---------------------------------------------------------------


def _drift_warning(cr: DestinationCR, svc: Mapping[str, Any], route: Route, port: int) -> Event | None:
    """An Event when an owned Service names another gateway port than the route has: it
    was edited behind the gateway's back (the annotation or the targetPort)."""
    recorded = read_port(svc)
    targets = {
        str(p.get("targetPort"))
        for p in ((svc.get("spec") or {}).get("ports") or [])
        if isinstance(p, Mapping)
    }
    if recorded == port and targets <= {str(port)}:
        return None
    shown = _annotations(svc).get(PORT_ANNOTATION)
    return Event(
        "Warning",
        EVENT_SERVICE_EDITED,
        f"Service {cr.namespace}/{route.service_name} was edited: gateway port annotation "
        f"{str(shown)[:20]!r}, targetPort {', '.join(sorted(t[:20] for t in targets)) or 'none'}; "
        f"the gateway port of this route is {port}: restored",
        route,
    )


def unbound_warnings(
    cr: DestinationCR, route: Route, gateway_port: int, pods: Iterable[GatewayPod], slices: Mapping[str, Any]
) -> list[Event]:
    """A Warning for each ready gateway pod that cannot open ``gateway_port`` (``route``'s)
    and that ``slices`` (the CR's EndpointSlices as they are, name -> object) do not list
    for that port as neither ready nor serving (nor terminating) yet: one Event when the
    slices change, not one a pass."""
    told = set()
    for ipv6 in (False, True):
        found = slices.get(slice_name(route.service_name, ipv6))
        if not isinstance(found, Mapping) or _slice_port(found) != gateway_port:
            continue
        endpoints = found.get("endpoints")
        for endpoint in endpoints if isinstance(endpoints, list) else ():
            if not isinstance(endpoint, Mapping):
                continue
            conditions, target = endpoint.get("conditions"), endpoint.get("targetRef")
            if (isinstance(conditions, Mapping) and isinstance(target, Mapping)
                    and (conditions.get("ready"), conditions.get("serving"), conditions.get("terminating"))
                    == (False, False, False)):
                told.add(target.get("name"))
    return [
        Event(
            "Warning",
            EVENT_PORT_UNAVAILABLE,
            f"gateway pod {pod.name} cannot listen on port {gateway_port} for Service "
            f"{cr.namespace}/{route.service_name} (something else holds it there): it is listed "
            "neither ready nor serving in the Service's EndpointSlices until it can",
            route,
        )
        for pod in pods
        if pod.ready and gateway_port in pod.unbound_ports and pod.name not in told
    ]


def _slice_port(obj: Mapping[str, Any]) -> Any:
    """The port an EndpointSlice lists (its first; mailgw's list one)."""
    ports = obj.get("ports")
    first = ports[0] if isinstance(ports, list) and ports else None
    return first.get("port") if isinstance(first, Mapping) else None


def reconcile(
    cr: DestinationCR,
    lookups: Mapping[str | None, Destination | BaseException],
    existing: Existing,
    allocations: Mapping[Route, int],
    pods: Iterable[GatewayPod],
    gateway: GatewayPlacement,
    now: str,
    unusable_ports: Container[int] = (),
    taken: Container[int] | None = None,
) -> Plan:
    """Compute the :class:`Plan` for one CR.

    ``lookups`` maps each route's tenant (None for the CR's single route) to the
    destination found, or the lookup failure (a ``DestinationLookupError``).
    ``allocations`` are the trusted gateway ports of routes (from the NetworkPolicies in
    the gateway's namespace, and the leader's own decisions); this CR's routes keep
    theirs.  ``taken`` holds the ports of other CRs' routes (default: computed from
    ``allocations``); ``unusable_ports`` the ports this CR's routes could not bind.
    Service annotations are never trusted: an edited one is restored, with an Event.
    """
    pods = tuple(pods)
    problems: dict[Route | None, Problem] = {}
    if cr.problem is not None:
        problems[None] = cr.problem
    routes = cr.routes()
    own_key = cr.key

    # (a Service or slice of another namespace is never this CR's, whatever it says)
    owned_services = {n: s for n, s in existing.services.items() if owned_by(s, cr) and _here(s, cr)}
    owned_slices = {n: s for n, s in existing.slices.items() if owned_by(s, cr) and _here(s, cr)}
    current = {r: p for r, p in allocations.items() if (r.namespace, r.cr_name) == own_key}
    if taken is None:
        taken = {p for r, p in allocations.items() if (r.namespace, r.cr_name) != own_key}

    # Which routes get objects, on which Service port.
    wanted: dict[Route, tuple[int, str]] = {}
    kept: dict[Route, int] = {}  # transient lookup failures: leave their objects alone
    for route in routes:
        result = lookups.get(route.tenant)
        if result is None:
            result = SourceUnavailable("destination was not looked up")
        if isinstance(result, BaseException):
            problems[route] = lookup_problem(result)
            definitive = isinstance(result, DestinationLookupError) and result.definitive
            svc = owned_services.get(route.service_name)
            if not definitive and svc is not None and current.get(route) is not None:
                kept[route] = current[route]
            continue
        if not is_service_name(route.service_name):
            problems[route] = Problem(
                REASON_SERVICE_FAILED,
                f"Service name {route.service_name!r} is not a valid DNS-1035 label "
                "(lower case letters, digits and '-', at most 63 characters)",
            )
            continue
        svc = existing.services.get(route.service_name)
        if svc is not None and not owned_by(svc, cr):
            problems[route] = Problem(
                REASON_NAME_PRESENT,
                f"a Service named {route.service_name!r} already exists in namespace "
                f"{cr.namespace!r} and is not managed by mailgw for this Destination",
            )
            continue
        foreign_slice = next(
            (
                name
                for name in (slice_name(route.service_name), slice_name(route.service_name, True))
                if name in existing.slices and not owned_by(existing.slices[name], cr)
            ),
            None,
        )
        if foreign_slice is not None:
            problems[route] = Problem(
                REASON_NAME_PRESENT,
                f"an EndpointSlice named {foreign_slice!r} already exists in namespace "
                f"{cr.namespace!r} and is not managed by mailgw for this Destination",
            )
            continue
        port = cr.service_port or PROTOCOLS[result.protocol][2]
        wanted[route] = (port, result.protocol)

    kept_ports = set(kept.values())
    ports = allocate(
        wanted, current, _Either(taken, kept_ports), gateway.port_range, unusable_ports
    )

    desired_services: dict[str, dict[str, Any]] = {}
    desired_slices: dict[str, tuple[Route, dict[str, Any]]] = {}
    service_routes: dict[str, Route] = {}
    served: dict[Route, int] = dict(kept)
    service_ports: dict[Route, int] = {}
    warnings: list[Event] = []
    for route, (service_port, protocol) in sorted(wanted.items(), key=lambda kv: kv[0].sort_key()):
        port = ports.get(route)
        if port is None:
            lo, hi = gateway.port_range
            problems[route] = Problem(REASON_SERVICE_FAILED, f"no free gateway port left in {lo}-{hi}")
            continue
        served[route] = port
        service_ports[route] = service_port
        desired_services[route.service_name] = service_body(cr, route, service_port, port, protocol)
        service_routes[route.service_name] = route
        svc = owned_services.get(route.service_name)
        if svc is not None and current.get(route) == port:
            warning = _drift_warning(cr, svc, route, port)
            if warning is not None:
                warnings.append(warning)
        for name, body in slice_bodies(cr, route, port, pods, gateway).items():
            desired_slices[name] = (route, body)
        warnings += unbound_warnings(cr, route, port, pods, owned_slices)
    for route, port in kept.items():
        svc_ports = (owned_services[route.service_name].get("spec") or {}).get("ports") or [{}]
        service_ports[route] = svc_ports[0].get("port", "?")

    kept_names = {r.service_name for r in kept}
    changes: list[Change] = []

    # NetworkPolicy first: traffic is admitted (and the allocation recorded where every
    # replica trusts it) before the Service appears.
    policy = policy_body(cr, served, gateway) if served else None
    for name, existing_policy in sorted(existing.policies.items()):
        if not owned_by(existing_policy, cr):
            continue
        if policy is None or name != policy["metadata"]["name"]:
            changes.append(Change("delete", NETWORK_POLICY, gateway.namespace, name))
    if policy is not None:
        name = policy["metadata"]["name"]
        if name in existing.policies and owned_by(existing.policies[name], cr):
            patch = policy_patch(existing.policies[name], policy)
            if patch is not None:
                changes.append(Change("patch", NETWORK_POLICY, gateway.namespace, name, patch))
        else:
            changes.append(Change("create", NETWORK_POLICY, gateway.namespace, name, policy))

    for name, body in desired_services.items():
        route = service_routes[name]
        if name in owned_services:
            patch = service_patch(owned_services[name], body)
            if patch is not None:
                changes.append(Change("patch", SERVICE, cr.namespace, name, patch, route))
        else:
            changes.append(Change("create", SERVICE, cr.namespace, name, body, route))

    changes += slice_writes(cr, desired_slices, owned_slices)

    for name, svc_slice in sorted(owned_slices.items()):
        tenant = _labels(svc_slice).get(TENANT_LABEL) or None
        kept_slice = Route(cr.namespace, cr.name, tenant).service_name in kept_names
        if name not in desired_slices and not kept_slice:
            changes.append(Change("delete", ENDPOINT_SLICE, _namespace_of(svc_slice, cr), name))
    for name, svc in sorted(owned_services.items()):
        if name not in desired_services and name not in kept_names:
            changes.append(Change("delete", SERVICE, _namespace_of(svc, cr), name))

    status, status_patch, event = build_status(cr, problems, served, service_ports, now)
    return Plan(
        routes=served,
        changes=tuple(changes),
        status=status,
        status_patch=status_patch,
        problems=problems,
        service_ports=service_ports,
        event=event,
        warnings=tuple(warnings),
    )


def slice_changes(
    cr: DestinationCR,
    routes: Mapping[Route, int],
    slices: Mapping[str, Mapping[str, Any]],
    pods: Iterable[GatewayPod],
    gateway: GatewayPlacement,
) -> tuple[Change, ...] | None:
    """The gateway pods changed: the patches that bring the EndpointSlices of ``cr``'s
    served ``routes`` (route -> gateway port) up to date with ``pods``, given its
    ``slices`` (name -> object).  None when that takes more than patching the slices
    there are (a slice to create or delete: a new or gone address family, a slice
    missing) -- a full reconcile's job."""
    pods = tuple(pods)
    owned = {n: o for n, o in slices.items() if owned_by(o, cr) and _here(o, cr)}
    desired: dict[str, tuple[Route, dict[str, Any]]] = {}
    for route, port in routes.items():
        for name, body in slice_bodies(cr, route, port, pods, gateway).items():
            desired[name] = (route, body)
    changes = slice_writes(cr, dict(sorted(desired.items())), owned)
    if set(desired) != set(owned) or any(c.action != "patch" for c in changes):
        return None
    return tuple(changes)


def slice_writes(
    cr: DestinationCR, desired: Mapping[str, tuple[Route, dict[str, Any]]], owned: Mapping[str, Mapping[str, Any]]
) -> list[Change]:
    """The writes that make the EndpointSlices ``desired`` (name -> route and body) out
    of those ``owned`` (name -> object): a create, a patch where anything differs, and a
    delete before the create where the address type changed (it cannot be patched).
    Owned slices not desired are left to the caller."""
    changes = []
    for name, (route, body) in desired.items():
        old = owned.get(name)
        if old is not None and old.get("addressType") not in (None, body["addressType"]):
            changes.append(Change("delete", ENDPOINT_SLICE, cr.namespace, name, None, route))
            old = None
        if old is None:
            changes.append(Change("create", ENDPOINT_SLICE, cr.namespace, name, body, route))
        elif (patch := slice_patch(old, body)) is not None:
            changes.append(Change("patch", ENDPOINT_SLICE, cr.namespace, name, patch, route))
    return changes


class _Either:
    """``port in a or port in b`` without building a set of every port in use."""

    def __init__(self, *parts: Container[int]):
        self.parts = parts

    def __contains__(self, port: object) -> bool:
        return any(port in part for part in self.parts)


def event_body(cr: DestinationCR, event: Event, now: str, reporter: str) -> dict[str, Any]:
    """The Kubernetes Event recording ``event`` on ``cr`` (``reporter``: this replica)."""
    return {
        "apiVersion": "v1",
        "kind": EVENT,
        "metadata": {"generateName": f"{cr.name}.", "namespace": cr.namespace},
        "involvedObject": {
            "apiVersion": "destination.connectivity.api.sap/v1",
            "kind": "Destination",
            "name": cr.name,
            "namespace": cr.namespace,
            "uid": cr.uid,
            "resourceVersion": cr.resource_version,
        },
        "reason": event.reason,
        "message": event.message[:1024],
        "type": event.type,
        "source": {"component": "mailgw"},
        "reportingComponent": "mailgw",
        "reportingInstance": reporter,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }


def report_changes(cr: DestinationCR, plan: Plan, now: str, reporter: str) -> tuple[Change, ...]:
    """The writes that report ``plan`` on the CR: its status (when it changed), then its
    Events.  They go through the same fenced write path as the objects."""
    changes = []
    if plan.status_patch is not None:
        changes.append(Change("status", DESTINATION, cr.namespace, cr.name, plan.status_patch))
    return tuple(changes) + event_changes(cr, ((plan.event,) if plan.event else ()) + plan.warnings, now, reporter)


def event_changes(cr: DestinationCR, events: Iterable[Event], now: str, reporter: str) -> tuple[Change, ...]:
    """The writes that record ``events`` on ``cr``."""
    return tuple(Change("create", EVENT, cr.namespace, "", event_body(cr, event, now, reporter)) for event in events)


def failed_plan(plan: Plan, cr: DestinationCR, failures: Sequence[Any], now: str) -> Plan:
    """The plan with its status rewritten after some of its changes failed to apply
    (``failures``: :class:`~mailgw.kube.apply.ApplyFailure`).  An object of a wanted
    name that exists and is not ours is a name clash; anything else a creation failure."""
    problems = dict(plan.problems)
    routes = dict(plan.routes)
    for failure in failures:
        change = failure.change
        if change.route in problems:
            continue
        if failure.foreign:
            routes.pop(change.route, None)
            # reconcile()'s words, so the next plan, which knows the clash, writes no new status
            article = "an" if change.kind[0] in "AEIOU" else "a"
            problems[change.route] = Problem(
                REASON_NAME_PRESENT,
                f"{article} {change.kind} named {change.name!r} already exists in namespace "
                f"{change.namespace!r} and is not managed by mailgw for this Destination",
            )
        else:
            problems[change.route] = Problem(
                REASON_SERVICE_FAILED,
                f"could not {change.action} {change.kind} {change.namespace}/{change.name}: {failure.message}",
            )
    status, patch, event = build_status(cr, problems, routes, plan.service_ports, now)
    # A warning about a route whose writes failed would be written again at every retry.
    failed = {failure.change.route for failure in failures}
    warnings = tuple(w for w in plan.warnings if w.route is None or w.route not in failed)
    return Plan(routes, plan.changes, status, patch, problems, plan.service_ports, event, warnings)


def deletion_changes(existing: Existing, gateway: GatewayPlacement) -> tuple[Change, ...]:
    """Delete everything listed in ``existing`` (the CR is gone); managed objects only."""
    changes: list[Change] = []
    for name, obj in sorted(existing.policies.items()):
        if is_managed(obj):
            changes.append(Change("delete", NETWORK_POLICY, gateway.namespace, name))
    for kind, objects in ((ENDPOINT_SLICE, existing.slices), (SERVICE, existing.services)):
        for name, obj in sorted(objects.items()):
            if is_managed(obj):
                changes.append(Change("delete", kind, _meta(obj).get("namespace", ""), name))
    return tuple(changes)
