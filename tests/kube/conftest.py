"""Fixtures of the Kubernetes tests: the fake API server, and a helper to call into the reactor."""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

import pytest
from twisted.internet.threads import blockingCallFromThread

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fakeapi import FakeKubeAPI  # noqa: E402
from kubetest import wait_for  # noqa: E402,F401

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
