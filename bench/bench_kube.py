"""Kubernetes mode at scale, against the in-process fake API server (tests/kube/fakeapi.py)
with the real ``kubernetes`` client: N Destination CRs in M namespaces created at once.

Prints: seconds until every CR is Available, API requests per CR to converge, reconciles
per CR to converge (1.00: no CR was reconciled again for the echoes of its own writes),
requests made by one idle resync, requests made when a gateway pod is added.  Watches and Lease
calls are not counted (they do not grow with the number of CRs).  Figures are printed,
never asserted.

    python3 bench/bench_kube.py --crs 1000 --namespaces 20 --runs 3

The controller is imported from ``mailgw`` on ``sys.path``: put another checkout first
on PYTHONPATH to measure it the same way (``PYTHONPATH=../main python3 bench/...``).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..", "tests"), os.path.join(HERE, "..", "tests", "kube")]

from fakeapi import FakeKubeAPI  # noqa: E402
from kubernetes import client as k8s  # noqa: E402
from support.reactor import in_reactor, running_reactor  # noqa: E402
from twisted.internet.defer import succeed  # noqa: E402
from zope.interface import implementer  # noqa: E402

from mailgw.kube.client import KubeApi  # noqa: E402
from mailgw.kube.controller import KubeController, KubeSettings  # noqa: E402
from mailgw.kube.listeners import IListenerManager  # noqa: E402

GW_NS = "mailgw-system"
LABELS = {"app.kubernetes.io/name": "mailgw"}
SMTPS = {"Name": "d", "Type": "MAIL", "ProxyType": "Internet", "Authentication": "BasicAuthentication",
         "mail.user": "u", "mail.password": "p", "mail.transport.protocol": "smtps", "mail.smtps.host": "smtp.example.org"}


@implementer(IListenerManager)
class NoListeners:
    """Counts what the controller opens; binds nothing (the control plane is measured)."""

    def __init__(self):
        self.opened = 0
        self.closed = 0

    def open(self, route, port, destination):
        self.opened += 1
        return succeed(None)

    def close(self, route):
        self.closed += 1
        return succeed(None)


def pod(name, ip):
    return {"metadata": {"name": name, "namespace": GW_NS, "labels": dict(LABELS)},
            "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]}}


def busy(controller) -> bool:
    queue = getattr(controller, "queue", None)
    if queue is not None:
        return queue.busy
    return bool(controller._dirty or controller._running)  # the controller before the work queue


def wait(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.25)  # the poll itself copies every CR: keep it rare


def settle(controller, fake, quiet=0.5):
    """Idle, and no request for ``quiet`` seconds (echoes of our own writes included)."""
    last, since = None, time.monotonic()
    while True:
        now = sum(fake.tally().values())
        if now != last or in_reactor(lambda: busy(controller)):
            last, since = now, time.monotonic()
        elif time.monotonic() - since > quiet:
            return
        time.sleep(0.05)


def requests(fake) -> int:
    return sum(fake.tally().values())


def reconciles() -> int:
    """Reconciles finished so far (mailgw_kube_reconciles_total, both results)."""
    from mailgw import metrics

    return int(sum(metrics.KUBE_RECONCILES.labels(result)._value.get() for result in ("ok", "error")))


def one_run(crs: int, namespaces: int) -> dict[str, float]:
    reactor = running_reactor()
    with FakeKubeAPI() as fake:
        fake.create("pods", GW_NS, pod("gw-0", "10.0.0.10"))
        fake.create("pods", GW_NS, pod("gw-1", "10.0.0.11"))
        names = [f"team-{i}" for i in range(namespaces)]
        per = crs // namespaces
        data = {"destination.json": base64.b64encode(json.dumps(SMTPS).encode()).decode()}
        for ns in names:
            for i in range(per):
                fake.create("secrets", ns, {"metadata": {"name": f"d{i}"}, "data": data})
        api = KubeApi(k8s.ApiClient(fake.configuration()), timeout=10)
        settings = KubeSettings(gateway_namespace=GW_NS, pod_labels=LABELS, identity="gw-0",
                                port_range=(20000, 29999), resync_interval=3600, cache_ttl=3600,
                                leader_election=False, retry_delay=0.5)
        controller = in_reactor(KubeController.create, api, NoListeners(), settings, reactor)
        in_reactor(controller.startService)
        try:
            wait(lambda: controller.ready, 30, "the initial lists")
            before = requests(fake)
            reconciles_before = reconciles()
            started = time.monotonic()
            for ns in names:
                for i in range(per):
                    fake.create("destinations", ns, {
                        "apiVersion": "destination.connectivity.api.sap/v1", "kind": "Destination",
                        "metadata": {"name": f"mail-{i}"}, "spec": {"destinationRef": {"name": f"d{i}"}}})

            def all_available():
                done = 0
                for d in fake.list("destinations"):
                    for c in (d.get("status") or {}).get("conditions") or []:
                        done += c.get("type") == "Available" and c.get("status") == "True"
                return done == per * namespaces

            wait(all_available, 600, "every CR Available")
            seconds = time.monotonic() - started
            settle(controller, fake)
            converge = requests(fake) - before
            converge_reconciles = reconciles() - reconciles_before
            before = requests(fake)
            in_reactor(controller.resync)
            time.sleep(0.2)
            settle(controller, fake)
            resync = requests(fake) - before
            before = requests(fake)
            fake.create("pods", GW_NS, pod("gw-2", "10.0.0.12"))
            time.sleep(0.2)
            settle(controller, fake, quiet=1.0)
            pod_added = requests(fake) - before
        finally:
            in_reactor(controller.stopService)
    total = per * namespaces
    return {"crs": total, "seconds": seconds, "per_cr": converge / total, "converge": converge,
            "reconciles_per_cr": converge_reconciles / total, "resync": resync, "pod_added": pod_added}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crs", type=int, default=1000)
    parser.add_argument("--namespaces", type=int, default=20)
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    results = [one_run(args.crs, args.namespaces) for _ in range(args.runs)]
    for r in results:
        print(f"{r['crs']} CRs: {r['seconds']:.1f} s to all Available, {r['converge']} requests "
              f"({r['per_cr']:.2f} per CR), {r['reconciles_per_cr']:.2f} reconciles per CR, "
              f"idle resync {r['resync']}, pod added {r['pod_added']}")
    if len(results) > 1:
        print(f"median: {statistics.median(r['seconds'] for r in results):.1f} s, "
              f"{statistics.median(r['per_cr'] for r in results):.2f} requests per CR, "
              f"{statistics.median(r['reconciles_per_cr'] for r in results):.2f} reconciles per CR")


if __name__ == "__main__":
    main()
