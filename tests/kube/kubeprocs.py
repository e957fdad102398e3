"""Real ``twistd -n mailgw --kubernetes`` processes against the fake API server: each a
replica with its own identity (POD_NAME, and the User-Agent the fake records), its own
loopback address for the gateway listeners (several replicas on one host share ports)
and its own http port."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from typing import Any

import realservers
from kubetest import wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GW_NS = "mailgw-system"
#: Short leadership timings for tests; the gap between the two is the margin a hung
#: leader has to stop writing before a follower may take over, kept wide enough for a
#: loaded 2-core machine.
RENEW_DEADLINE = 2.0
LEASE_DURATION = 5.0


def kubeconfig(path, fake) -> str:
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": fake.url}}],
        "users": [{"name": "fake", "user": {}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
    }))
    return str(path)


class Replica:
    """One gateway process; :meth:`stop` (SIGTERM) or :meth:`kill` (SIGKILL) it."""

    def __init__(self, tmp_path, fake, identity: str, interface: str, port_range: tuple[int, int],
                 drain: float = 5.0, **kube: Any):
        self.identity = identity
        self.interface = interface
        self.http_port = realservers.free_port()
        folder = tmp_path / identity
        folder.mkdir()
        section = {
            "namespace": GW_NS, "portRange": f"{port_range[0]}-{port_range[1]}", "listenInterface": interface,
            "leaseDuration": LEASE_DURATION, "renewDeadline": RENEW_DEADLINE, "retryPeriod": 0.3, "resyncInterval": 3600,
            "destinationCacheTTL": 60, "watchTimeout": 60, "apiTimeout": 5,
            "kubeconfig": kubeconfig(folder / "kubeconfig", fake),
        }
        section.update(kube)
        config = {"http": {"listen": f"tcp:{self.http_port}:interface=127.0.0.1"}, "timeouts": {"drain": drain},
                  "kubernetes": section}
        (folder / "gateway.yaml").write_text(json.dumps(config))
        env = dict(os.environ, POD_NAME=identity, POD_NAMESPACE=GW_NS, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
        env.pop("KUBECONFIG", None)
        self.log = open(folder / "twistd.log", "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
             "-n", "--pidfile=", "mailgw", "--kubernetes", "--config", str(folder / "gateway.yaml")],
            cwd=str(folder), env=env, stdout=self.log, stderr=subprocess.STDOUT,
        )
        self.folder = folder

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/readyz", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def wait_ready(self, timeout: float = 30) -> None:
        wait_for(lambda: self.ready() or self.process.poll() is not None, timeout, f"{self.identity} ready")
        assert self.process.poll() is None, self.output()

    def output(self) -> str:
        self.log.flush()
        return (self.folder / "twistd.log").read_text(errors="replace")[-6000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()

    def close(self) -> None:
        self.kill()
        self.process.wait(10)
        self.log.close()


def lease_holder(fake) -> str | None:
    lease = fake.get("leases", GW_NS, "mailgw-leader")
    return ((lease or {}).get("spec") or {}).get("holderIdentity")


def recorded_port(fake, namespace: str, name: str) -> int | None:
    """The gateway port the leader recorded for a CR's single route."""
    for policy in fake.list("networkpolicies", GW_NS):
        if policy["metadata"]["annotations"].get("mailgw.io/destination") == f"{namespace}/{name}":
            return json.loads(policy["metadata"]["annotations"]["mailgw.io/gateway-ports"]).get("")
    return None
