"""Helpers of the Kubernetes tests (a module of its own: several directories of the test
tree have a conftest.py, so ``from conftest import ...`` is ambiguous)."""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

from twisted.internet import reactor as _reactor

_started = threading.Lock()


def ensure_reactor_running() -> Any:
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
