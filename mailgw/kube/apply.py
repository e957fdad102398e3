"""Apply a reconcile plan through :class:`~mailgw.kube.client.KubeApi` (blocking).

Idempotent by construction: the plan only holds the writes needed; a delete of something
already gone counts as done.  Failures are collected, never raised, so one failing write
does not stop the others; the caller turns them into the CR's status and a retry.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from attrs import frozen

from mailgw.kube.client import KubeApi, KubeApiError
from mailgw.kube.model import MANAGED_BY, MANAGED_BY_LABEL, UID_LABEL, DestinationCR
from mailgw.kube.reconcile import ENDPOINT_SLICE, NETWORK_POLICY, SERVICE, Change, Existing, policy_name


@frozen
class ApplyResult:
    done: tuple[Change, ...]
    failures: tuple[tuple[Change, str], ...]


def apply_changes(api: KubeApi, changes: Iterable[Change]) -> ApplyResult:
    """Perform ``changes`` in order.  Blocking: call from a worker thread."""
    done: list[Change] = []
    failures: list[tuple[Change, str]] = []
    for change in changes:
        try:
            if change.action == "create":
                assert change.body is not None
                _create(api, change)
            elif change.action == "patch":
                assert change.body is not None
                api.patch(change.kind, change.namespace, change.name, change.body)
            elif change.action == "delete":
                api.delete(change.kind, change.namespace, change.name)
            else:  # pragma: no cover - the reconciler only makes the three above
                raise ValueError(change.action)
        except KubeApiError as e:
            failures.append((change, str(e)))
        else:
            done.append(change)
    return ApplyResult(tuple(done), tuple(failures))


def _create(api: KubeApi, change: Change) -> None:
    """Create; when the object exists already and is ours (an earlier create whose answer
    was lost to a timeout), patch it to the desired state instead."""
    assert change.body is not None
    try:
        api.create(change.kind, change.namespace, change.body)
        return
    except KubeApiError as e:
        if not e.conflict:
            raise
        found = api.get(change.kind, change.namespace, change.name)
        labels = ((found or {}).get("metadata") or {}).get("labels") or {}
        wanted = (change.body.get("metadata") or {}).get("labels") or {}
        if found is None or labels.get(MANAGED_BY_LABEL) != MANAGED_BY or labels.get(UID_LABEL) != wanted.get(UID_LABEL):
            raise KubeApiError(
                f"create {change.kind} {change.namespace}/{change.name}: it already exists "
                "and is not managed by mailgw for this Destination", 409, "AlreadyExists"
            ) from None
    body = {k: v for k, v in change.body.items() if k not in ("apiVersion", "kind")}
    api.patch(change.kind, change.namespace, change.name, body)


def _by_name(items: Iterable[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    return {i["metadata"]["name"]: i for i in items if isinstance(i.get("metadata"), Mapping)}


def owned_selector(uid: str) -> str:
    return f"{MANAGED_BY_LABEL}={MANAGED_BY},{UID_LABEL}={uid}"


def read_existing(
    api: KubeApi, cr: DestinationCR, wanted_names: Iterable[str], gateway_namespace: str
) -> Existing:
    """What exists for ``cr``: its owned Services, EndpointSlices and NetworkPolicy, plus
    any Service with a name it wants (to notice a clash, or adopt what an earlier CR of
    the same name left).  Blocking."""
    selector = owned_selector(cr.uid)
    services, _ = api.list(SERVICE, cr.namespace, selector)
    by_name = _by_name(services)
    for name in wanted_names:
        if name not in by_name:
            svc = api.get(SERVICE, cr.namespace, name)
            if svc is not None:
                by_name[name] = svc
    slices, _ = api.list(ENDPOINT_SLICE, cr.namespace, selector)
    slices_by_name = _by_name(slices)
    policies, _ = api.list(NETWORK_POLICY, gateway_namespace, selector)
    policies_by_name = _by_name(policies)
    own_policy = policy_name(cr)
    if own_policy not in policies_by_name:
        found = api.get(NETWORK_POLICY, gateway_namespace, own_policy)
        if found is not None:
            policies_by_name[own_policy] = found
    return Existing(by_name, slices_by_name, policies_by_name)


def read_owned_by_uid(api: KubeApi, namespace: str, uid: str, gateway_namespace: str) -> Existing:
    """Everything mailgw made for the CR with ``uid`` (for deleting it).  Blocking."""
    selector = owned_selector(uid)
    services, _ = api.list(SERVICE, namespace, selector)
    slices, _ = api.list(ENDPOINT_SLICE, namespace, selector)
    policies, _ = api.list(NETWORK_POLICY, gateway_namespace, selector)
    return Existing(_by_name(services), _by_name(slices), _by_name(policies))
