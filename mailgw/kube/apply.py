"""Apply a reconcile plan through :class:`~mailgw.kube.client.KubeApi` (blocking).

Idempotent by construction: the plan only holds the writes needed; a delete of something
already gone counts as done.  The CR's status and its Events are written the same way
(:func:`~mailgw.kube.reconcile.report_changes`), so one fence guards every write.  Failures are collected, never raised, so one failing write
does not stop the others -- except that the EndpointSlices of a route whose Service could
not be written are left out (a slice names its Service: it must never add endpoints to a
Service that is not ours).  Every write is *fenced*: ``fence()`` is asked just before it,
and once it answers False nothing more is written (the leadership the plan was made under
has ended).  Each object the API server answers with is handed to ``on_written`` as
soon as it arrives, so the caller's caches know a write before its watch event comes
(which then changes nothing) -- not only once the whole plan is written.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from attrs import frozen

from mailgw.kube.client import KubeApi, KubeApiError
from mailgw.kube.model import MANAGED_BY, MANAGED_BY_LABEL, UID_LABEL
from mailgw.kube.reconcile import ENDPOINT_SLICE, NETWORK_POLICY, SERVICE, Change

#: kinds whose create may meet an object of ours made earlier (and is then a patch)
_ADOPTABLE = (SERVICE, ENDPOINT_SLICE, NETWORK_POLICY)


@frozen
class ApplyFailure:
    change: Change
    message: str
    #: the object exists and belongs to someone else (a name clash, not an outage)
    foreign: bool = False


@frozen
class ApplyResult:
    failures: tuple[ApplyFailure, ...]
    #: True when the fence stopped the writes
    fenced: bool = False


class ForeignObject(KubeApiError):
    """An object of the wanted name exists and is not ours."""


class _Fenced(Exception):
    """The fence fell between two requests of one change: write nothing more."""


def apply_changes(
    api: KubeApi,
    changes: Iterable[Change],
    fence: Callable[[], bool] = lambda: True,
    on_written: Callable[[str, dict[str, Any]], None] = lambda kind, obj: None,
    on_deleted: Callable[[str, str, str], None] = lambda kind, namespace, name: None,
) -> ApplyResult:
    """Perform ``changes`` in order; ``on_written(kind, obj)`` is called (in this thread)
    with every object the API server answers a create, patch or status write with, and
    ``on_deleted(kind, namespace, name)`` for every object a delete removed.
    Blocking: call from a worker thread."""
    failures: list[ApplyFailure] = []
    failed_routes = set()
    for change in changes:
        if change.kind == ENDPOINT_SLICE and change.route is not None and change.route in failed_routes:
            # Not written, and no failure of its own: the Service's failure (a clash or
            # an outage) already stands for the route.
            continue
        if not fence():
            return ApplyResult(tuple(failures), fenced=True)
        try:
            answer = None
            if change.action == "create":
                assert change.body is not None
                answer = _create(api, change, fence)
            elif change.action == "patch":
                assert change.body is not None
                answer = api.patch(change.kind, change.namespace, change.name, change.body)
            elif change.action == "status":
                assert change.body is not None
                answer = api.patch_destination_status(change.namespace, change.name, change.body)
            elif change.action == "delete":
                if api.delete(change.kind, change.namespace, change.name):
                    on_deleted(change.kind, change.namespace, change.name)
                # (already gone: not this delete's doing; its watch event tells the cache)
            else:  # pragma: no cover - the reconciler only makes the four above
                raise ValueError(change.action)
        except _Fenced:
            return ApplyResult(tuple(failures), fenced=True)
        except KubeApiError as e:
            failures.append(ApplyFailure(change, str(e), isinstance(e, ForeignObject)))
            if change.kind == SERVICE and change.route is not None:
                failed_routes.add(change.route)
        else:
            if isinstance(answer, dict):
                on_written(change.kind, answer)
    return ApplyResult(tuple(failures))


def _create(api: KubeApi, change: Change, fence: Callable[[], bool]) -> dict[str, Any]:
    """Create; when the object exists already and is ours (an earlier create whose answer
    was lost to a timeout, or a cache that has not seen it yet), patch it to the desired
    state instead.  One that is not ours is a :class:`ForeignObject`.  The patch is a
    request of its own: the fence is asked again before it."""
    assert change.body is not None
    try:
        return api.create(change.kind, change.namespace, change.body)
    except KubeApiError as e:
        if not e.conflict or change.kind not in _ADOPTABLE:
            raise
        found = api.get(change.kind, change.namespace, change.name)
        labels = ((found or {}).get("metadata") or {}).get("labels") or {}
        wanted = (change.body.get("metadata") or {}).get("labels") or {}
        if found is None or labels.get(MANAGED_BY_LABEL) != MANAGED_BY or labels.get(UID_LABEL) != wanted.get(UID_LABEL):
            raise ForeignObject(
                f"create {change.kind} {change.namespace}/{change.name}: it already exists "
                "and is not managed by mailgw for this Destination", 409, "AlreadyExists"
            ) from None
    if not fence():
        raise _Fenced()
    body = {k: v for k, v in change.body.items() if k not in ("apiVersion", "kind")}
    return api.patch(change.kind, change.namespace, change.name, body)
