"""Fixtures of the Kubernetes tests: the fake API server (with the gateway's pods), a
helper to call into the reactor, controllers against the fake."""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

import pytest
from twisted.internet.threads import blockingCallFromThread

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import realservers  # noqa: E402
from fakeapi import FakeKubeAPI  # noqa: E402
from kubernetes import client as k8s  # noqa: E402
from kubetest import GW_NS, FakeListeners, free_range, pod, wait_for  # noqa: E402
from support.gatewayprocess import write_config  # noqa: E402

from mailgw.kube.client import KubeApi, user_agent  # noqa: E402
from mailgw.kube.controller import KubeController, KubeSettings  # noqa: E402
from mailgw.kube.main import make_kubernetes_service  # noqa: E402

__all__ = ["wait_for"]  # test_gateway_e2e.py imports it from here


@pytest.fixture
def in_reactor(reactor) -> Callable[..., Any]:
    """``in_reactor(fn, *args)``: run ``fn`` in the reactor thread and return its result
    (waiting for it when it is a Deferred)."""

    def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return blockingCallFromThread(reactor, fn, *args, **kwargs)

    return call


@pytest.fixture
def fake():
    with FakeKubeAPI() as api:
        yield api


@pytest.fixture
def cluster(fake):
    """The fake API server with two gateway pods, gw-0 and gw-1."""
    fake.create("pods", GW_NS, pod("gw-0", "10.0.0.10"))
    fake.create("pods", GW_NS, pod("gw-1", "10.0.0.11"))
    return fake


@pytest.fixture
def controllers(cluster, reactor, in_reactor):
    """``start(settings, api_timeout=1.0, fail_ports=())``: a started KubeController on
    ``cluster`` whose initial lists are done, and its :class:`FakeListeners` (failing to
    listen on ``fail_ports``); every one still running is stopped after the test."""
    running = []

    def start(settings: KubeSettings, api_timeout: float = 1.0, fail_ports=()):
        api_client = k8s.ApiClient(cluster.configuration())
        api_client.user_agent = user_agent(settings.identity)
        api = KubeApi(api_client, timeout=api_timeout, connect_timeout=1.0)
        listeners = FakeListeners()
        listeners.fail_ports.update(fail_ports)
        controller = in_reactor(KubeController.create, api, listeners, settings, reactor)
        in_reactor(controller.startService)
        running.append(controller)
        wait_for(lambda: controller.ready, what="the controller's initial lists")
        return controller, listeners

    yield start
    for controller in running:
        if controller.running:
            in_reactor(controller.stopService)


@pytest.fixture
def http_port():
    """A free port for a gateway's http listener."""
    return realservers.free_port()


@pytest.fixture
def kube_gateway(fake, reactor, in_reactor, tmp_path):
    """``make(http_port)``: the Kubernetes-mode service tree on ``fake`` (identity gw-0,
    no leader election), its http listener on ``http_port``; not started.  Every one
    still running is stopped after the test."""
    services = []

    def make(http_port: int):
        write_config(tmp_path / "gateway.yaml", {"http": {"listen": f"tcp:{http_port}:interface=127.0.0.1"}})
        api = KubeApi(k8s.ApiClient(fake.configuration()), timeout=2.0, connect_timeout=1.0)
        settings = KubeSettings(
            gateway_namespace=GW_NS, identity="gw-0", port_range=free_range(),
            resync_interval=3600, cache_ttl=0, leader_election=False, retry_delay=0.05,
        )
        service = in_reactor(make_kubernetes_service, reactor, str(tmp_path / "gateway.yaml"), api=api, settings=settings)
        services.append(service)
        return service

    yield make
    for service in services:
        if service.running:
            in_reactor(service.stopService)
