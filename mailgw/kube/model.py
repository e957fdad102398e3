"""Values of Kubernetes mode: the Destination custom resource, routes, typed lookup failures.

Everything here is pure: it parses the JSON the API server returns into frozen attrs
values and names the constants (API group, labels, annotations, status reasons) the
reconciler, the applier and the manifests in ``k8s/`` share.
"""

from __future__ import annotations

import json
import re
from typing import Any, Mapping

from attrs import field, frozen

from mailgw.settings import Route as ListenerRoute
from mailgw.sources.base import (
    DestinationLookupError,
    DestinationNotFound,
    InstanceNotFound,
    InvalidDestination,
    ProxyTypeNotSupported,
    TypeNotSupported,
)

GROUP = "destination.connectivity.api.sap"
VERSION = "v1"
PLURAL = "destinations"
KIND = "Destination"
API_VERSION = f"{GROUP}/{VERSION}"

#: The reference's annotation listing the tenant subdomains of a shared (multi-tenant) CR.
TENANTS_ANNOTATION = "transparent-proxy.connectivity.api.sap/tenant-subdomains"

MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "mailgw"
#: uid of the Destination CR an object belongs to (label: selectable, always <= 63 chars).
UID_LABEL = "mailgw.io/destination-uid"
#: CR name, only set when it is a valid label value (for ``kubectl get -l``).
NAME_LABEL = "mailgw.io/destination"
#: namespace of the CR (on NetworkPolicies, which live in the gateway's namespace).
NAMESPACE_LABEL = "mailgw.io/destination-namespace"
#: tenant subdomain of a Service/EndpointSlice, empty for the CR's single Service.
TENANT_LABEL = "mailgw.io/tenant"
#: ``<namespace>/<name>`` of the CR (annotation: CR names can be longer than a label value).
CR_ANNOTATION = "mailgw.io/destination"
#: The gateway port of a Service's route, for people reading the Service.  Informative
#: only: anyone who may edit the CR's namespace may edit it, so nothing trusts it.
PORT_ANNOTATION = "mailgw.io/gateway-port"
#: The gateway ports of a CR's routes, ``{"<tenant>" or "": port}`` as JSON, on the CR's
#: NetworkPolicy in the gateway's namespace: the record every replica trusts, and what
#: a new leader reads back after a restart.
PORTS_ANNOTATION = "mailgw.io/gateway-ports"
#: On a gateway pod, written by that pod itself: the gateway ports it could not open
#: (``20458,20461``; absent when none).  The leader lists the pod neither ready nor
#: serving in those routes' EndpointSlices, so clients are not sent where nobody listens.
UNBOUND_PORTS_ANNOTATION = "mailgw.io/unbound-ports"
#: Name of the single port on Services and EndpointSlices (they must agree on it).
PORT_NAME = "mail"

SCOPE_NAMESPACED = "namespaced"
SCOPE_CLUSTER_WIDE = "clusterWide"
SCOPES = (SCOPE_NAMESPACED, SCOPE_CLUSTER_WIDE)

CONDITION_AVAILABLE = "Available"

# Status reasons.  The ConfigurationError-* and ServiceCreationFailed ones are the
# reference's; the others name failures the reference has no word for.
REASON_OK = "ConfigurationSuccessful"
REASON_NOT_FOUND = "ConfigurationError-ReferencedDestination-NotFound"
REASON_TYPE_NOT_SUPPORTED = "ConfigurationError-ReferencedDestination-TypeNotSupported"
REASON_PROXY_TYPE_NOT_SUPPORTED = "ConfigurationError-ProxyTypeNotSupported"
REASON_NAME_PRESENT = "ConfigurationError-K8sResourceWithNameAlreadyPresent"
REASON_ANNOTATION_INVALID = "ConfigurationError-MultitenancyAnnotation-Invalid"
REASON_SERVICE_FAILED = "ServiceCreationFailed"
REASON_DESTINATION_INVALID = "ConfigurationError-ReferencedDestination-Invalid"
REASON_SPEC_INVALID = "ConfigurationError-Spec-Invalid"
REASON_INSTANCE_NOT_FOUND = "ConfigurationError-DestinationServiceInstance-NotFound"
REASON_LOOKUP_FAILED = "DestinationLookupFailed"
#: Event reason: an object the gateway owns was edited behind its back (and restored).
EVENT_SERVICE_EDITED = "ServiceEdited"
#: Event reason: a gateway replica cannot open a route's port (something else holds it there).
EVENT_PORT_UNAVAILABLE = "PortUnavailable"

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def is_dns_label(text: str) -> bool:
    """RFC 1123 label: what a tenant subdomain must be."""
    return isinstance(text, str) and len(text) <= 63 and bool(_DNS_LABEL.match(text))


def is_service_name(text: str) -> bool:
    """RFC 1035 label: what a Service name must be."""
    return len(text) <= 63 and bool(_DNS1035_LABEL.match(text))


def is_label_value(text: str) -> bool:
    return len(text) <= 63 and bool(_LABEL_VALUE.match(text))


@frozen
class Problem:
    """Why a CR (or one of its routes) is not available: a status reason and a message."""

    reason: str
    message: str


@frozen(order=True)
class Route:
    """One Service of a Destination CR: the CR, and the tenant in shared mode.

    The gateway opens one listener per route.  What that listener serves, in the
    vocabulary of the session layer, is :meth:`listener_route`: a
    :class:`mailgw.settings.Route` whose lookup name is :attr:`key` (the destination
    source of Kubernetes mode resolves it through the CR) and whose tenant is the
    route's tenant.
    """

    namespace: str
    cr_name: str
    tenant: str | None = None

    @property
    def service_name(self) -> str:
        return self.cr_name if self.tenant is None else f"{self.cr_name}-{self.tenant}"

    @property
    def key(self) -> str:
        """Stable text form, used for hashing and logs."""
        return f"{self.namespace}/{self.cr_name}" + (f"@{self.tenant}" if self.tenant else "")

    def sort_key(self) -> tuple[str, str, str]:
        return (self.namespace, self.cr_name, self.tenant or "")

    def listener_route(self, source: Any = None) -> ListenerRoute:
        """The session layer's view of this route (lookup name and tenant, and the
        destination source its sessions ask)."""
        return ListenerRoute(self.key, self.tenant, source)


@frozen
class DestinationCR:
    """A parsed Destination custom resource.

    ``problem`` is set when the CR itself is unusable (bad annotation, bad spec); the
    identity fields are always filled so that status can still be written.
    """

    namespace: str
    name: str
    uid: str
    generation: int = 0
    resource_version: str | None = None
    destination_ref: str | None = None
    instance: str | None = None
    service_port: int | None = None
    scope: str = SCOPE_NAMESPACED
    tenants: tuple[str, ...] = ()
    problem: Problem | None = None
    #: the CR's current ``status`` as read, to decide whether a write is needed
    status: Mapping[str, Any] = field(factory=dict, eq=False, repr=False)

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    def routes(self) -> tuple[Route, ...]:
        """One route per tenant in shared mode, else a single route without tenant."""
        if self.problem is not None:
            return ()
        if self.tenants:
            return tuple(Route(self.namespace, self.name, t) for t in self.tenants)
        return (Route(self.namespace, self.name, None),)

    def owner_reference(self) -> dict[str, Any]:
        return {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


def parse_tenants(value: Any) -> tuple[str, ...]:
    """Parse the tenant-subdomains annotation.  Raises ValueError with a clear message."""
    if not isinstance(value, str):
        raise ValueError("must be a string holding a JSON list")
    try:
        tenants = json.loads(value)
    except ValueError:
        raise ValueError(f"is not valid JSON: {value[:100]!r}") from None
    if not isinstance(tenants, list):
        raise ValueError("must be a JSON list of tenant subdomains")
    if not tenants:
        raise ValueError("must list at least one tenant subdomain")
    seen: list[str] = []
    for tenant in tenants:
        if not isinstance(tenant, str) or not is_dns_label(tenant):
            shown = tenant if isinstance(tenant, str) else json.dumps(tenant)[:60]
            raise ValueError(f"{shown[:70]!r} is not a valid subdomain (a DNS label)")
        if tenant in seen:
            raise ValueError(f"{tenant!r} is listed twice")
        seen.append(tenant)
    return tuple(seen)


def parse_cr(obj: Mapping[str, Any]) -> DestinationCR:
    """Parse a Destination CR as returned by the API server (a JSON object).

    Never raises for a bad spec: the problem is recorded on the value so the caller can
    report it in the CR's status.  Only a missing namespace/name is a ``ValueError``.
    """
    meta = obj.get("metadata") if isinstance(obj, Mapping) else None
    if not isinstance(meta, Mapping) or not meta.get("name") or not meta.get("namespace"):
        raise ValueError("Destination object without metadata.name/namespace")
    namespace = str(meta["namespace"])
    name = str(meta["name"])
    uid = str(meta.get("uid") or "")
    generation = meta.get("generation")
    generation = generation if isinstance(generation, int) else 0
    resource_version = meta.get("resourceVersion")
    status = obj.get("status")
    status = status if isinstance(status, Mapping) else {}
    ident = dict(
        namespace=namespace,
        name=name,
        uid=uid,
        generation=generation,
        resource_version=str(resource_version) if resource_version is not None else None,
        status=status,
    )

    def bad(reason: str, message: str) -> DestinationCR:
        return DestinationCR(**ident, problem=Problem(reason, message))

    spec = obj.get("spec")
    if not isinstance(spec, Mapping):
        return bad(REASON_SPEC_INVALID, "spec is missing")
    ref = spec.get("destinationRef")
    ref_name = ref.get("name") if isinstance(ref, Mapping) else None
    if not isinstance(ref_name, str) or not ref_name.strip():
        return bad(REASON_SPEC_INVALID, "spec.destinationRef.name is missing")
    ident["destination_ref"] = ref_name.strip()

    instance = spec.get("destinationServiceInstanceName")
    if instance is not None and not isinstance(instance, str):
        return bad(REASON_SPEC_INVALID, "spec.destinationServiceInstanceName must be a string")
    ident["instance"] = (instance.strip() or None) if isinstance(instance, str) else None

    service = spec.get("service")
    port = None
    if service is not None:
        if not isinstance(service, Mapping):
            return bad(REASON_SPEC_INVALID, "spec.service must be an object")
        port = service.get("port")
        if port is not None and (
            isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536
        ):
            return bad(REASON_SPEC_INVALID, f"spec.service.port must be 1-65535, not {port!r}")
    ident["service_port"] = port

    access = spec.get("accessControl")
    scope = SCOPE_NAMESPACED
    if access is not None:
        if not isinstance(access, Mapping):
            return bad(REASON_SPEC_INVALID, "spec.accessControl must be an object")
        scope = access.get("scope") or SCOPE_NAMESPACED
        if scope not in SCOPES:
            return bad(
                REASON_SPEC_INVALID,
                f"spec.accessControl.scope must be {' or '.join(SCOPES)}, not {scope!r}",
            )
    ident["scope"] = scope

    annotations = meta.get("annotations")
    if isinstance(annotations, Mapping) and TENANTS_ANNOTATION in annotations:
        try:
            ident["tenants"] = parse_tenants(annotations[TENANTS_ANNOTATION])
        except ValueError as e:
            return bad(REASON_ANNOTATION_INVALID, f"annotation {TENANTS_ANNOTATION} {e}")
    return DestinationCR(**ident)


# --- lookup failures as status reasons ---------------------------------------------------

#: The CR status reason of each lookup failure (the sources know nothing of CRs).
_LOOKUP_REASONS: tuple[tuple[type[DestinationLookupError], str], ...] = (
    (DestinationNotFound, REASON_NOT_FOUND),
    (TypeNotSupported, REASON_TYPE_NOT_SUPPORTED),
    (ProxyTypeNotSupported, REASON_PROXY_TYPE_NOT_SUPPORTED),
    (InvalidDestination, REASON_DESTINATION_INVALID),
    (InstanceNotFound, REASON_INSTANCE_NOT_FOUND),
)


def lookup_problem(error: BaseException) -> Problem:
    """The CR condition for a failed destination lookup."""
    if isinstance(error, DestinationLookupError):
        reason = next((r for cls, r in _LOOKUP_REASONS if isinstance(error, cls)), REASON_LOOKUP_FAILED)
        return Problem(reason, error.message)
    return Problem(REASON_LOOKUP_FAILED, f"destination lookup failed: {type(error).__name__}")
