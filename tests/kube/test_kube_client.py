"""KubeApi against the fake API server: what one call of a plane may cost."""

from __future__ import annotations

import time

import pytest
from kubernetes import client as k8s

from mailgw.kube.client import KubeApi, KubeApiError


def test_a_plane_call_is_one_request_within_its_budget(fake):
    """A clone (a plane's client) never retries behind the caller's back -- urllib3's
    default retries a failed connect for every verb and a failed read for DELETE and PUT,
    each attempt with the whole timeout again -- and takes at most its budget in all."""
    config = fake.configuration()
    config.retries = None  # what a kubeconfig or the in-cluster configuration gives
    api = KubeApi(k8s.ApiClient(config), timeout=10.0, connect_timeout=5.0)
    plane = api.clone(0.3)
    stall = fake.fault(r"/services/x$", method="DELETE", status=None, delay=1.0, times=None)
    started = time.monotonic()
    with pytest.raises(KubeApiError):
        plane.delete("Service", "apps", "x")
    assert time.monotonic() - started < 0.9
    assert stall.hits == 1
    assert config.retries is None  # the original configuration is left alone
