"""Fixtures of the Kubernetes tests: a running reactor in a background thread, the fake API
server, and small helpers to call into the reactor and to wait for a condition."""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any, Callable

import pytest
from twisted.internet import reactor as _reactor
from twisted.internet.threads import blockingCallFromThread

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fakeapi import FakeKubeAPI  # noqa: E402

_started = threading.Lock()


def _ensure_reactor_running() -> Any:
    """Run the global reactor in a daemon thread unless something already runs it."""
    with _started:
        if not _reactor.running:
            thread = threading.Thread(
                target=_reactor.run, kwargs={"installSignalHandlers": False},
                name="test-reactor", daemon=True,
            )
            thread.start()
            deadline = time.monotonic() + 10
            while not _reactor.running:
                if time.monotonic() > deadline:
                    raise RuntimeError("reactor did not start")
                time.sleep(0.005)
    return _reactor


@pytest.fixture(scope="session")
def reactor():
    return _ensure_reactor_running()


@pytest.fixture
def in_reactor(reactor) -> Callable[..., Any]:
    """``in_reactor(fn, *args)``: run ``fn`` in the reactor thread and return its result
    (waiting for it when it is a Deferred)."""

    def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return blockingCallFromThread(reactor, fn, *args, **kwargs)

    return call


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll ``predicate`` (from the test thread) until it is truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.fixture
def fake():
    with FakeKubeAPI() as api:
        yield api
