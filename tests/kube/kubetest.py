"""Helpers of the Kubernetes tests (a module of its own: several directories of the test
tree have a conftest.py, so ``from conftest import ...`` is ambiguous): the gateway's
namespace and pods, CRs, Secrets and destinations, a recording listener manager, waiting
for a CR's condition."""

from __future__ import annotations

import base64
import json

from twisted.internet.defer import succeed
from twisted.internet.error import CannotListenError
from zope.interface import implementer

import realservers
from mailgw.kube import model
from mailgw.kube.listeners import IListenerManager
from mailgw.kube.model import Route
from support.reactor import wait_for

__all__ = [
    "GW_LABELS", "GW_NS", "SMTPS", "FakeListeners", "condition", "destination_cr", "free_range", "pod", "publish",
    "secret", "wait_condition", "wait_for",
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
