"""Fencing: a write is made only while the leadership it began under lasts, checked in
the worker right before each request (not when the write was queued).

The controller runs on a Clock with a worker pool the test drives by hand and an API
that records every call, so the moment leadership ends can be placed exactly between a
write being queued and being sent."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from kubetest import GW_LABELS, GW_NS, SMTPS, FakeListeners, destination_cr
from mailgw.destination import parse_destination
from mailgw.kube.apply import apply_changes
from mailgw.kube.client import KubeApiError
from mailgw.kube.controller import KubeController, KubeSettings, Planes
from mailgw.kube.model import parse_cr
from mailgw.kube.reconcile import SERVICE, Change
from mailgw.sources.base import MappingSource
from mailgw.sources.cache import CachingSource, SourceRegistry


class ManualPool(Service):
    """A worker pool whose calls wait until the test runs them, one by one."""

    def __init__(self):
        self.calls: list[tuple[Any, tuple, dict, Deferred]] = []

    def __call__(self, fn, *args, **kwargs):
        d: Deferred = Deferred()
        self.calls.append((fn, args, kwargs, d))
        return d

    def run_next(self):
        fn, args, kwargs, d = self.calls.pop(0)
        try:
            result = fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - handed to the caller, as a thread pool would
            d.errback(e)
        else:
            d.callback(result)


class RecordingApi:
    """The KubeApi calls apply_changes and the controller make, recorded; writes answer
    with the object at a new resourceVersion."""

    def __init__(self):
        self.calls: list[tuple[str, ...]] = []
        self.version = 100
        self.on_get = None

    def _stored(self, body, namespace):
        self.version += 1
        meta = dict(body.get("metadata") or {}, namespace=namespace, resourceVersion=str(self.version))
        return dict(body, metadata=meta)

    def create(self, kind, namespace, body):
        self.calls.append(("create", kind, namespace, (body.get("metadata") or {}).get("name", "")))
        return self._stored(body, namespace)

    def patch(self, kind, namespace, name, body):
        self.calls.append(("patch", kind, namespace, name))
        return self._stored(dict(body, metadata=dict(body.get("metadata") or {}, name=name)), namespace)

    def delete(self, kind, namespace, name):
        self.calls.append(("delete", kind, namespace, name))
        return True

    def get(self, kind, namespace, name):
        self.calls.append(("get", kind, namespace, name))
        return self.on_get(kind, namespace, name) if self.on_get else None

    def patch_destination_status(self, namespace, name, status):
        self.calls.append(("status", "Destination", namespace, name))
        return self._stored({"metadata": {"name": name}, "status": dict(status)}, namespace)

    def create_event(self, namespace, body):
        return self.create("Event", namespace, body)

    def writes(self):
        return [c for c in self.calls if c[0] != "get"]


@pytest.fixture
def harness():
    control, api = ManualPool(), RecordingApi()
    planes = Planes(data=ManualPool(), control=control, lease=ManualPool(), data_api=api, control_api=api,
                    lease_api=api, watch_api=api)
    clock = Clock()
    destination = parse_destination(SMTPS)
    sources = SourceRegistry({"secrets": CachingSource(MappingSource({("apps", SMTPS["Name"]): destination}), clock, 60)},
                             default="secrets")
    settings = KubeSettings(gateway_namespace=GW_NS, pod_labels=GW_LABELS, identity="gw-0", port_range=(20000, 20099),
                            leader_election=False)
    controller = KubeController(planes, FakeListeners(), sources, settings, clock)
    obj = destination_cr()
    obj["metadata"].update(namespace="apps", uid="uid-1", resourceVersion="1", generation=1)
    controller.crs.put(obj)
    controller._set_leading(True)
    return controller, control, api, parse_cr(obj)


def test_status_and_events_queued_under_a_leadership_that_then_ends_are_not_sent(harness):
    controller, control, api, cr = harness
    done = Deferred.fromCoroutine(controller._reconcile_as_leader(cr, controller.epoch))
    control.run_next()  # the objects: NetworkPolicy, Service, EndpointSlice
    assert [c[1] for c in api.writes()] == ["NetworkPolicy", "Service", "EndpointSlice"]
    assert control.calls, "the status and the Event wait for a worker"
    controller._set_leading(False)  # leadership ends while they wait
    while control.calls:
        control.run_next()
    assert [c[1] for c in api.writes()] == ["NetworkPolicy", "Service", "EndpointSlice"]
    assert done.called


def test_a_create_that_meets_our_own_object_patches_it_only_while_the_fence_holds():
    api = RecordingApi()
    leading = [True]
    body = {"metadata": {"name": "mymail", "labels": {"app.kubernetes.io/managed-by": "mailgw",
                                                       "mailgw.io/destination-uid": "uid-1"}}}

    def conflict(kind, namespace, b):
        api.calls.append(("create", kind, namespace, "mymail"))
        raise KubeApiError("create Service apps/mymail: 409 AlreadyExists", 409, "AlreadyExists")

    def found(kind, namespace, name):
        leading[0] = False  # leadership ends while the create's fallback reads the object
        return body

    api.create, api.on_get = conflict, found
    result = apply_changes(api, [Change("create", SERVICE, "apps", "mymail", body)], lambda: leading[0])
    assert result.fenced and ("patch", SERVICE, "apps", "mymail") not in api.calls
