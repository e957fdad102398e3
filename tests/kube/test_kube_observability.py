"""Operations in Kubernetes mode against the fake API server: /status shows the
controller and its listeners, /readyz says why it waits, and a real
``twistd -n mailgw --kubernetes`` logs JSON when gateway.yaml asks for it."""

from __future__ import annotations

import json
import os
import re
import signal

import pytest

import realservers
from kubetest import free_range, publish, wait_for
from support.clients import http
from support.destinations import plain
from support.gatewayprocess import Twistd

def publish_unreachable(fake, cr_name):
    publish(fake, cr_name, plain(f"{cr_name}-dest", "smtp", 1, **{"mail.smtp.starttls.enable": None}))


@pytest.fixture
def base(http_port):
    return f"http://127.0.0.1:{http_port}"


@pytest.fixture
def gateway(kube_gateway, http_port):
    return kube_gateway(http_port)


def test_readyz_names_the_controller_until_it_has_synced(gateway, base, in_reactor):
    in_reactor(gateway.privilegedStartService)  # the http listener, not the controller yet
    try:
        assert http(base + "/readyz") == (503, b"not ready: controller not synced\n")
        page = json.loads(http(base + "/status")[1])
        assert page["not_ready"] == ["controller not synced"]
        assert page["controller"]["synced"] is False
    finally:
        in_reactor(gateway.startService)
    wait_for(lambda: http(base + "/readyz") == (200, b"ready\n"), what="/readyz")


def test_status_lists_the_controllers_listeners_and_state(fake, gateway, base, in_reactor):
    in_reactor(gateway.startService)
    publish_unreachable(fake, "mymail")

    def listed():
        page = json.loads(http(base + "/status")[1] or b"{}")
        return page if page.get("listeners") else None

    page = wait_for(listed, what="the CR's listener in /status")
    (listener,) = page["listeners"]
    port = next(p.getHost().port for r, p in gateway.getServiceNamed("kubernetes").listeners.ports.items() if r.cr_name == "mymail")
    assert listener["route"] == "apps/mymail" and listener["destination"] == "apps/mymail"
    assert re.fullmatch(rf".*:{port}", listener["address"]) and listener["sessions"] == 0
    assert page["controller"]["leader"] is True and page["controller"]["synced"] is True


def test_twistd_kubernetes_mode_logs_json(fake, tmp_path):
    http_port = realservers.free_port()
    lo, hi = free_range()
    (tmp_path / "kubeconfig").write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": fake.url}}],
        "users": [{"name": "fake", "user": {}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
    }))
    (tmp_path / "gateway.yaml").write_text(json.dumps({
        "http": {"listen": f"tcp:{http_port}:interface=127.0.0.1"},
        "logging": {"format": "json"},
        "kubernetes": {"kubeconfig": str(tmp_path / "kubeconfig"), "leaderElection": False, "portRange": f"{lo}-{hi}"},
    }))
    # A CR whose destination is missing: the controller logs why (a mailgw.kube line).
    fake.create("destinations", "apps", {
        "apiVersion": "destination.connectivity.api.sap/v1", "kind": "Destination",
        "metadata": {"name": "broken"}, "spec": {"destinationRef": {"name": "no-such-destination"}},
    })
    env = dict(os.environ, POD_NAMESPACE="mailgw-system", POD_NAME="gw-json")
    with Twistd(["mailgw", "--kubernetes", "--config", "gateway.yaml"], tmp_path, env) as gateway:
        wait_for(lambda: http(f"http://127.0.0.1:{http_port}/readyz")[0] == 200, timeout=60, what="/readyz")
        page = json.loads(http(f"http://127.0.0.1:{http_port}/status")[1])
        assert page["ready"] is True and "controller" in page
        wait_for(lambda: (fake.get("destinations", "apps", "broken").get("status") or {}).get("conditions"),
                 timeout=60, what="the broken CR's status")
        assert gateway.stop(60) in (0, -signal.SIGTERM), gateway.stderr()
    out, err = gateway.log(), gateway.stderr()
    lines = [json.loads(line) for line in out.splitlines()]  # one JSON object per line
    assert lines and all({"time", "level", "namespace", "message"} <= set(line) for line in lines)
    kube = [line for line in lines if line["namespace"].startswith("mailgw.kube")]
    assert any("broken" in line["message"] for line in kube), [(line["namespace"], line["message"]) for line in lines]
    assert "Traceback" not in err
