"""The global reactor, run once per test session in a daemon thread, for tests written
as plain blocking code (real clients, real servers) that call into Twisted."""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

from twisted.internet import defer
from twisted.internet import reactor as _reactor
from twisted.internet.threads import blockingCallFromThread

_started = threading.Lock()


def running_reactor() -> Any:
    """The global reactor, started in a daemon thread unless something already runs it."""
    with _started:
        if not _reactor.running:
            ready = threading.Event()
            _reactor.callWhenRunning(ready.set)
            threading.Thread(
                target=_reactor.run, kwargs={"installSignalHandlers": False}, name="test-reactor", daemon=True,
            ).start()
            if not ready.wait(10):
                raise RuntimeError("the reactor did not start")
    return _reactor


def in_reactor(function: Callable[..., Any], *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
    """Call ``function`` in the reactor thread and wait for its result (a Deferred's too),
    failing with ``TimeoutError`` after ``timeout`` seconds when one is given."""
    reactor = running_reactor()

    def run():
        d = defer.maybeDeferred(function, *args, **kwargs)
        if timeout is not None:
            d.addTimeout(timeout, reactor)
        return d

    return blockingCallFromThread(reactor, run)


def holds(predicate: Callable[[], Any], seconds: float, what: str = "condition") -> None:
    """Poll ``predicate`` from the test thread for ``seconds``; fail as soon as it is
    false.  For what must *not* happen (a write, an event), which no event can signal."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert predicate(), f"no longer true: {what}"
        time.sleep(0.01)
    assert predicate(), f"no longer true: {what}"


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll ``predicate`` from the test thread until it is truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)
