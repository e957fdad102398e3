"""Helpers of the Kubernetes tests (a module of its own: several directories of the test
tree have a conftest.py, so ``from conftest import ...`` is ambiguous): the gateway's
namespace and pods, CRs, Secrets and destinations, a recording listener manager, waiting
for a CR's condition, and a controller that runs offline (hand-driven pools, a recording
API) for tests that must place an event between two steps exactly."""

from __future__ import annotations

import base64
import copy
import json

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.task import Clock
from zope.interface import implementer

import realservers
from fakeapi import merge_patch
from mailgw.destination import parse_destination
from mailgw.kube import model
from mailgw.kube.controller import KubeController, KubeSettings, Planes
from mailgw.kube.listeners import IListenerManager
from mailgw.kube.model import Route
from mailgw.sources.base import MappingSource
from mailgw.sources.cache import CachingSource, SourceRegistry
from support.reactor import wait_for

__all__ = [
    "GW_LABELS", "GW_NS", "SMTPS", "FakeListeners", "ManualPool", "RecordingApi", "condition", "destination_cr",
    "free_range", "offline_controller", "pod", "publish", "secret", "wait_condition", "wait_for",
]

GW_NS = "mailgw-system"
GW_LABELS = {"app.kubernetes.io/name": "mailgw"}

SMTPS = {
    "Name": "example-dest-smtps",
    "Type": "MAIL",
    "Authentication": "BasicAuthentication",
    "mail.user": "app@example.org",
    "mail.password": "secret",
    "mail.transport.protocol": "smtps",
    "mail.smtps.host": "smtp.example.org",
    "mail.smtps.port": "465",
    "ProxyType": "Internet",
}


@implementer(IListenerManager)
class FakeListeners:
    """Records what the controller asks for."""

    def __init__(self):
        self.open_routes: dict[Route, tuple[int, object]] = {}
        self.log: list[tuple] = []
        self.fail_ports: set[int] = set()

    def open(self, route, port, destination):
        if port in self.fail_ports:
            raise CannotListenError("", port, OSError("address in use"))
        assert route not in self.open_routes, f"{route} opened twice"
        self.open_routes[route] = (port, destination)
        self.log.append(("open", route, port))
        return succeed(None)

    def close(self, route):
        del self.open_routes[route]
        self.log.append(("close", route))
        return succeed(None)

    def ports(self):
        return {r: p for r, (p, _) in dict(self.open_routes).items()}


def secret(name, destination, ns="apps"):
    return {
        "metadata": {"name": name, "namespace": ns},
        "data": {"destination.json": base64.b64encode(json.dumps(destination).encode()).decode()},
    }


def destination_cr(name="mymail", ref="example-dest-smtps", tenants=None, port=None, scope=None, instance=None):
    spec = {"destinationRef": {"name": ref}}
    if port:
        spec["service"] = {"port": port}
    if scope:
        spec["accessControl"] = {"scope": scope}
    if instance:
        spec["destinationServiceInstanceName"] = instance
    obj = {"apiVersion": "destination.connectivity.api.sap/v1", "kind": "Destination",
           "metadata": {"name": name}, "spec": spec}
    if tenants is not None:
        obj["metadata"]["annotations"] = {model.TENANTS_ANNOTATION: tenants}
    return obj


def pod(name, ip, ready=True):
    return {
        "metadata": {"name": name, "namespace": GW_NS, "labels": dict(GW_LABELS)},
        "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }


def condition(fake, name="mymail", ns="apps"):
    obj = fake.get("destinations", ns, name) or {}
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond["type"] == "Available":
            return cond
    return None


def wait_condition(fake, status, reason, name="mymail", ns="apps", timeout=10):
    def check():
        cond = condition(fake, name, ns)
        return cond is not None and (cond["status"], cond["reason"]) == (status, reason) and cond
    return wait_for(check, timeout, f"{ns}/{name} to be {status}/{reason} (now {condition(fake, name, ns)})")


def publish(fake, cr_name, destination, ns="apps"):
    """A Secret holding ``destination`` and a Destination CR ``cr_name`` that refers to it."""
    fake.create("secrets", ns, secret(destination["Name"], destination, ns))
    fake.create("destinations", ns, destination_cr(name=cr_name, ref=destination["Name"]))


def free_range(size=20):
    """A run of ports nothing listens on (the allocator picks from it)."""
    start = realservers.free_port()
    return (start, start + size - 1)


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
    """The KubeApi calls apply_changes and the controller make, recorded.  It keeps what
    it was given, as an API server would: a write answers with the whole object at a new
    resourceVersion (a patch is a merge patch; ``objects`` may be seeded, e.g. with the
    CR whose status is written)."""

    def __init__(self):
        self.calls: list[tuple[str, ...]] = []
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.version = 100
        self.on_get = None

    def _store(self, kind, namespace, name, obj):
        self.version += 1
        meta = dict(obj.get("metadata") or {}, name=name, namespace=namespace, resourceVersion=str(self.version))
        self.objects[(kind, namespace, name)] = obj = dict(obj, metadata=meta)
        return copy.deepcopy(obj)

    def create(self, kind, namespace, body):
        name = (body.get("metadata") or {}).get("name", "")
        self.calls.append(("create", kind, namespace, name))
        return self._store(kind, namespace, name, copy.deepcopy(dict(body)))

    def patch(self, kind, namespace, name, body):
        self.calls.append(("patch", kind, namespace, name))
        return self._store(kind, namespace, name, merge_patch(self.objects.get((kind, namespace, name), {}), body))

    def delete(self, kind, namespace, name):
        self.calls.append(("delete", kind, namespace, name))
        return self.objects.pop((kind, namespace, name), None) is not None

    def get(self, kind, namespace, name):
        self.calls.append(("get", kind, namespace, name))
        return self.on_get(kind, namespace, name) if self.on_get else self.objects.get((kind, namespace, name))

    def patch_destination_status(self, namespace, name, status):
        self.calls.append(("status", "Destination", namespace, name))
        key = ("Destination", namespace, name)
        return self._store(*key, merge_patch(self.objects.get(key, {}), {"status": dict(status)}))

    def writes(self):
        return [c for c in self.calls if c[0] != "get"]


class ThreadlessClock(Clock):
    """A Clock for a controller whose "worker threads" are the test's own."""

    def callFromThread(self, fn, *args, **kwargs):
        fn(*args, **kwargs)


def offline_controller(obj=None, listeners=None):
    """A leading KubeController without threads or an API server: its pools are
    :class:`ManualPool` instances, its API a :class:`RecordingApi`, its destinations a
    mapping (``SMTPS`` as ``apps/example-dest-smtps``), its listeners ``listeners`` (a
    :class:`FakeListeners` by default), the CR ``obj`` (``apps/mymail`` by default) in its
    cache.  Returns the controller, its control pool and the API."""
    control, api = ManualPool(), RecordingApi()
    planes = Planes(data=ManualPool(), control=control, lease=ManualPool(), data_api=api, control_api=api,
                    lease_api=api, watch_api=api)
    clock = ThreadlessClock()
    destination = parse_destination(SMTPS)
    sources = SourceRegistry({"secrets": CachingSource(MappingSource({("apps", SMTPS["Name"]): destination}), clock, 60)},
                             default="secrets")
    settings = KubeSettings(gateway_namespace=GW_NS, pod_labels=GW_LABELS, identity="gw-0", port_range=(20000, 20099),
                            leader_election=False)
    controller = KubeController(planes, listeners or FakeListeners(), sources, settings, clock)
    if obj is None:
        obj = destination_cr()
    obj["metadata"].update(namespace="apps", uid="uid-1", resourceVersion="1", generation=1)
    controller.crs.put(obj)
    api.objects[("Destination", "apps", obj["metadata"]["name"])] = copy.deepcopy(obj)
    controller._set_leading(True)
    return controller, control, api
