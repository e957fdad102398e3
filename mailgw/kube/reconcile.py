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

Per CR, in the *gateway's* namespace: a NetworkPolicy selecting the gateway pods that
admits traffic to the CR's gateway ports.  A NetworkPolicy only selects pods of its own
namespace, so it cannot live next to the CR; owner references cannot cross namespaces
either, so it is found by the ``mailgw.io/destination-uid`` label and deleted by the
controller when the CR goes.  With scope ``namespaced`` it admits only the CR's namespace;
with ``clusterWide`` it admits every source (needed as soon as any other policy isolates
the gateway pods, which the namespaced ones do).
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterable, Mapping

from attrs import field, frozen

from mailgw.destination import PROTOCOLS, Destination
from mailgw.kube.model import (
    CONDITION_AVAILABLE,
    CR_ANNOTATION,
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
    DestinationLookupError,
    Problem,
    Route,
    SourceUnavailable,
    is_label_value,
    is_service_name,
    lookup_problem,
)

SERVICE = "Service"
ENDPOINT_SLICE = "EndpointSlice"
NETWORK_POLICY = "NetworkPolicy"

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
SLICE_MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"
SLICE_MANAGED_BY = "mailgw.io"
PROTOCOL_ANNOTATION = "mailgw.io/protocol"

_OUR_LABELS = (MANAGED_BY_LABEL, UID_LABEL, NAME_LABEL, TENANT_LABEL)
_OUR_SLICE_LABELS = _OUR_LABELS + (SERVICE_NAME_LABEL, SLICE_MANAGED_BY_LABEL)
_OUR_POLICY_LABELS = (MANAGED_BY_LABEL, UID_LABEL, NAME_LABEL, NAMESPACE_LABEL)
_OUR_ANNOTATIONS = (CR_ANNOTATION, PORT_ANNOTATION, PROTOCOL_ANNOTATION)


@frozen
class GatewayPod:
    """A ready gateway pod: traffic for every route goes to its IP."""

    name: str
    ip: str


@frozen
class Gateway:
    """Where the gateway runs: its namespace, its pods' labels, its port range."""

    namespace: str
    pod_labels: tuple[tuple[str, str], ...] = field(
        converter=lambda labels: tuple(sorted(dict(labels).items()))
    )
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
    """One write: ``create`` / ``patch`` (JSON merge patch) / ``delete`` of an object."""

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
    event: Event | None = None

    @property
    def available(self) -> bool:
        return not self.problems


class PortsExhausted(Exception):
    pass


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


def read_port(obj: Mapping[str, Any]) -> int | None:
    """The gateway port recorded on an owned Service, or None."""
    text = _annotations(obj).get(PORT_ANNOTATION)
    try:
        port = int(str(text))
    except (TypeError, ValueError):
        return None
    return port if 0 < port < 65536 else None


def route_of(obj: Mapping[str, Any], cr: DestinationCR) -> Route | None:
    """The route an owned Service serves, from its tenant label; None if inconsistent."""
    tenant = _labels(obj).get(TENANT_LABEL) or None
    route = Route(cr.namespace, cr.name, tenant)
    return route if _meta(obj).get("name") == route.service_name else None


def route_of_service(obj: Mapping[str, Any]) -> Route | None:
    """The route of any managed Service, from its annotations (for cluster-wide reads)."""
    if not is_managed(obj):
        return None
    ref = _annotations(obj).get(CR_ANNOTATION)
    if not isinstance(ref, str) or "/" not in ref:
        return None
    namespace, _, name = ref.partition("/")
    tenant = _labels(obj).get(TENANT_LABEL) or None
    route = Route(namespace, name, tenant)
    meta = _meta(obj)
    if meta.get("namespace") != namespace or meta.get("name") != route.service_name:
        return None
    return route


def allocations_from_services(services: Iterable[Mapping[str, Any]]) -> dict[Route, int]:
    """Read the gateway port allocations back from the Services mailgw owns."""
    result: dict[Route, int] = {}
    for svc in services:
        route = route_of_service(svc)
        port = read_port(svc)
        if route is not None and port is not None:
            result[route] = port
    return result


def _bounded_name(base: str, limit: int = 253) -> str:
    if len(base) <= limit:
        return base
    digest = hashlib.sha256(base.encode()).hexdigest()[:10]
    return base[: limit - 11].rstrip("-.") + "-" + digest


def policy_name(cr: DestinationCR) -> str:
    return _bounded_name(f"mailgw-{cr.namespace}-{cr.name}")


def slice_name(service_name: str, ipv6: bool = False) -> str:
    return f"{service_name}-mailgw" + ("-ipv6" if ipv6 else "")


# --- port allocation --------------------------------------------------------------


def allocate(
    routes: Iterable[Route],
    current: Mapping[Route, int],
    taken: Iterable[int],
    port_range: tuple[int, int],
) -> dict[Route, int]:
    """Give each route a gateway port in ``port_range`` not in ``taken``.

    A route keeps its current port when it is in range and free; a new route probes from
    a hash of its key, so the choice does not depend on the order routes appear in.  A
    route for which no port is left is missing from the result.
    """
    lo, hi = port_range
    size = hi - lo + 1
    used = set(taken)
    ordered = sorted(set(routes), key=Route.sort_key)
    result: dict[Route, int] = {}
    for route in ordered:
        port = current.get(route)
        if port is not None and lo <= port <= hi and port not in used:
            result[route] = port
            used.add(port)
    for route in ordered:
        if route in result:
            continue
        start = int.from_bytes(hashlib.sha256(route.key.encode()).digest()[:8], "big") % size
        for i in range(size):
            port = lo + (start + i) % size
            if port not in used:
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
    cr: DestinationCR, route: Route, gateway_port: int, pods: Iterable[GatewayPod], gateway: Gateway
) -> dict[str, dict[str, Any]]:
    """One EndpointSlice per address family in use (the IPv4 one always exists)."""
    families: dict[bool, list[GatewayPod]] = {False: [], True: []}
    for pod in pods:
        families[":" in pod.ip].append(pod)
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
                    "addresses": [pod.ip],
                    "conditions": {"ready": True},
                    "targetRef": {"kind": "Pod", "namespace": gateway.namespace, "name": pod.name},
                }
                for pod in sorted(members, key=lambda p: (p.ip, p.name))
            ],
        }
    return result


def policy_body(cr: DestinationCR, ports: Iterable[int], gateway: Gateway) -> dict[str, Any]:
    labels = {MANAGED_BY_LABEL: MANAGED_BY, UID_LABEL: cr.uid, NAMESPACE_LABEL: cr.namespace}
    if is_label_value(cr.name):
        labels[NAME_LABEL] = cr.name
    rule: dict[str, Any] = {"ports": [{"protocol": "TCP", "port": p} for p in sorted(set(ports))]}
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
            "annotations": {CR_ANNOTATION: cr_ref(cr)},
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
        view.append(
            (tuple(ep.get("addresses") or ()), conditions.get("ready"), target.get("name"))
        )
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
    }
    status: dict[str, Any] = {"conditions": [condition], "observedGeneration": cr.generation}
    if cr.tenants and cr.problem is None:
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

    old = {k: cr.status.get(k) for k in ("conditions", "observedGeneration", "tenants")}
    new = {k: status.get(k) for k in old}
    patch = None
    if old != new:
        patch = dict(status)
        if "tenants" not in status and cr.status.get("tenants") is not None:
            patch["tenants"] = None

    event = None
    if not same:
        if status_value == "False":
            event = Event("Warning", reason, message)
        else:
            event = Event("Normal", reason, message)
    return status, patch, event


# --- the reconciler ---------------------------------------------------------------


def reconcile(
    cr: DestinationCR,
    lookups: Mapping[str | None, Destination | BaseException],
    existing: Existing,
    allocations: Mapping[Route, int],
    pods: Iterable[GatewayPod],
    gateway: Gateway,
    now: str,
    unusable_ports: Iterable[int] = (),
) -> Plan:
    """Compute the :class:`Plan` for one CR.

    ``lookups`` maps each route's tenant (None for the CR's single route) to the
    destination found, or the lookup failure (a :class:`DestinationLookupError`).
    ``allocations`` are the gateway ports of all routes of all CRs as currently known;
    this CR's own ones are also read back from its Services in ``existing``.
    """
    pods = tuple(pods)
    problems: dict[Route | None, Problem] = {}
    if cr.problem is not None:
        problems[None] = cr.problem
    routes = cr.routes()

    owned_services = {n: s for n, s in existing.services.items() if owned_by(s, cr)}
    owned_slices = {n: s for n, s in existing.slices.items() if owned_by(s, cr)}

    current = dict(allocations)
    for svc in owned_services.values():
        route = route_of(svc, cr)
        port = read_port(svc)
        if route is not None and port is not None:
            current[route] = port

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
            if not definitive and svc is not None and read_port(svc) is not None:
                kept[route] = read_port(svc)  # type: ignore[assignment]
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

    own_key = cr.key
    taken = {p for r, p in current.items() if (r.namespace, r.cr_name) != own_key}
    taken.update(kept.values())
    taken.update(unusable_ports)
    ports = allocate(wanted, current, taken, gateway.port_range)

    desired_services: dict[str, dict[str, Any]] = {}
    desired_slices: dict[str, dict[str, Any]] = {}
    slice_routes: dict[str, Route] = {}
    served: dict[Route, int] = dict(kept)
    service_ports: dict[Route, int] = {}
    for route, (service_port, protocol) in sorted(wanted.items(), key=lambda kv: kv[0].sort_key()):
        port = ports.get(route)
        if port is None:
            lo, hi = gateway.port_range
            problems[route] = Problem(REASON_SERVICE_FAILED, f"no free gateway port left in {lo}-{hi}")
            continue
        served[route] = port
        service_ports[route] = service_port
        desired_services[route.service_name] = service_body(cr, route, service_port, port, protocol)
        for name, body in slice_bodies(cr, route, port, pods, gateway).items():
            desired_slices[name] = body
            slice_routes[name] = route
    for route, port in kept.items():
        svc_ports = (owned_services[route.service_name].get("spec") or {}).get("ports") or [{}]
        service_ports[route] = svc_ports[0].get("port", "?")

    kept_names = {r.service_name for r in kept}
    changes: list[Change] = []

    # NetworkPolicy first: traffic is admitted before the Service appears.
    policy = policy_body(cr, served.values(), gateway) if served else None
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
        route = Route(cr.namespace, cr.name, body["metadata"]["labels"][TENANT_LABEL] or None)
        if name in owned_services:
            patch = service_patch(owned_services[name], body)
            if patch is not None:
                changes.append(Change("patch", SERVICE, cr.namespace, name, patch, route))
        else:
            changes.append(Change("create", SERVICE, cr.namespace, name, body, route))

    for name, body in desired_slices.items():
        route = slice_routes[name]
        old = owned_slices.get(name)
        if old is not None and old.get("addressType") not in (None, body["addressType"]):
            changes.append(Change("delete", ENDPOINT_SLICE, cr.namespace, name, None, route))
            old = None
        if old is not None:
            patch = slice_patch(old, body)
            if patch is not None:
                changes.append(Change("patch", ENDPOINT_SLICE, cr.namespace, name, patch, route))
        else:
            changes.append(Change("create", ENDPOINT_SLICE, cr.namespace, name, body, route))

    for name, svc_slice in sorted(owned_slices.items()):
        tenant = _labels(svc_slice).get(TENANT_LABEL) or None
        kept_slice = Route(cr.namespace, cr.name, tenant).service_name in kept_names
        if name not in desired_slices and not kept_slice:
            changes.append(Change("delete", ENDPOINT_SLICE, cr.namespace, name))
    for name in sorted(owned_services):
        if name not in desired_services and name not in kept_names:
            changes.append(Change("delete", SERVICE, cr.namespace, name))

    status, status_patch, event = build_status(cr, problems, served, service_ports, now)
    return Plan(
        routes=served,
        changes=tuple(changes),
        status=status,
        status_patch=status_patch,
        problems=problems,
        service_ports=service_ports,
        event=event,
    )


def failed_plan(
    plan: Plan, cr: DestinationCR, failures: Iterable[tuple[Change, str]], now: str
) -> Plan:
    """The plan with its status rewritten after some of its changes failed to apply."""
    problems = dict(plan.problems)
    for change, message in failures:
        if change.route in problems:
            continue
        problems[change.route] = Problem(
            REASON_SERVICE_FAILED,
            f"could not {change.action} {change.kind} {change.namespace}/{change.name}: {message}",
        )
    status, patch, event = build_status(cr, problems, plan.routes, plan.service_ports, now)
    return Plan(plan.routes, plan.changes, status, patch, problems, plan.service_ports, event)


def served_from_existing(cr: DestinationCR, existing: Existing) -> dict[Route, int]:
    """Routes and gateway ports as the leader recorded them (what a non-leader serves)."""
    wanted = set(cr.routes())
    result = {}
    for svc in existing.services.values():
        if not owned_by(svc, cr):
            continue
        route = route_of(svc, cr)
        port = read_port(svc)
        if route in wanted and port is not None:
            result[route] = port
    return result


def deletion_changes(existing: Existing, gateway: Gateway) -> tuple[Change, ...]:
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
