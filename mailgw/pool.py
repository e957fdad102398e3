"""Warm upstream pools (SPEC 9.7): upstream sessions connected, TLS-protected and logged
in before an application asks for one.

A pooled connection is a :class:`~mailgw.session.GatewaySession` in warm mode: it runs
the same look-up, token, connect, TLS and login steps as any session, then waits,
health-checked (NOOP) and retired before the server would drop it or its token expires.
An application connecting to the listener takes one (it is greeted at once) and the
pool starts another; a pooled connection serves exactly one application session and is
never reused.  Refills back off while the upstream fails, so a broken server never
makes the pool spin.
"""

from __future__ import annotations

import random
from typing import Any

from twisted.logger import Logger

from . import metrics
from .protocol.refusal import Refusal
from .settings import Route

log = Logger()

#: Refill back-off after consecutive failures: 1 s, 2 s, 4 s ... at most a minute.
FIRST_RETRY, MAX_RETRY = 1.0, 60.0

#: A connection that fails this soon after its login (a server that ends every session
#: at once: ``* BYE``, ``421``, a close) counts as a failing upstream: its replacement
#: backs off too, instead of logging in again at once, in a loop.
SHORT_LIVED = 10.0


class UpstreamPool:
    """Up to ``size`` warm sessions for one route (destination and tenant)."""

    def __init__(self, gateway: Any, route: Route, destination, rng: random.Random | None = None):
        self.gateway = gateway
        self.reactor = gateway.reactor
        self.route = route
        self.destination = destination  # what the pooled connections were made for
        self.size = destination.pool_size
        self.ready: list = []  # warm sessions, oldest first
        self.warming: set = set()
        self.failures = 0  # consecutive
        self.short_lived = 0  # consecutive connections that failed soon after their login
        self.last_failure: str | None = None
        self._warmed_at: dict = {}  # ready session -> when it logged in
        self.served = 0
        self._retry = None  # the delayed refill after a failure
        self._running = False
        self._rng = rng or random.Random()

    # -- life cycle ------------------------------------------------------------------------

    def start(self) -> None:
        self._running = True
        self._fill()

    def stop(self) -> None:
        """Close every pooled connection and stop refilling."""
        self._running = False
        self._cancel_retry()
        self._retire_all("the pool stopped")

    def update(self, destination) -> None:
        """The route's destination now: a changed one replaces every pooled connection
        (and may change the pool's size)."""
        if destination == self.destination:
            return
        self.destination, self.size = destination, destination.pool_size
        log.info("warm pool {route}: the destination changed, replacing its connections", route=str(self.route))
        self._retire_all("the destination changed")
        self.failures = 0
        self._cancel_retry()
        self._fill()

    # -- the sessions' reports ---------------------------------------------------------------

    def take(self):
        """A warm, healthy session for an application (the youngest), or None (one whose
        health check is running waits for the next application)."""
        for session in reversed(self.ready):
            if session.machine.ready_for_application:
                self.ready.remove(session)
                self._warmed_at.pop(session, None)
                self.short_lived = 0  # the upstream served one
                self.served += 1
                self._publish()
                self._fill()
                return session
        return None

    def warmed(self, session) -> None:
        self.warming.discard(session)
        if not self._running:
            session.retire("the pool stopped")
            return
        self.failures, self.last_failure = 0, None
        self.ready.append(session)
        self._warmed_at[session] = self.reactor.seconds()
        self._publish()

    def discarded(self, session, refusal: Refusal) -> None:
        """A pooled connection failed or was retired by its own timers."""
        was_warming = session in self.warming
        warmed_at = self._warmed_at.pop(session, None)
        self.warming.discard(session)
        if session in self.ready:
            self.ready.remove(session)
        self._publish()
        if not self._running:
            return
        if was_warming:  # it never got ready: the upstream, its login or its token fails
            self._back_off(refusal, "no connection made")
        elif warmed_at is not None and self.reactor.seconds() - warmed_at < SHORT_LIVED:
            self.short_lived += 1
            self._back_off(refusal, "a connection failed right after its login", streak=self.short_lived)
        else:  # worn out (its time in the pool, a failed health check): replace it now
            self.short_lived = 0
            self._fill()

    def _back_off(self, refusal: Refusal, what: str, streak: int | None = None) -> None:
        """A failure: refill after a back-off that grows with ``streak``, the failures
        of this kind in a row (default: failures of any kind in a row)."""
        self.failures += 1
        streak = self.failures if streak is None else streak
        self.last_failure = refusal.text
        log.info(
            "warm pool {route}: {what} ({streak} in a row): {reason}",
            route=str(self.route), what=what, streak=streak, reason=refusal.text,
        )
        self._retry_later(streak)

    # -- filling -------------------------------------------------------------------------------

    def _fill(self) -> None:
        if not self._running or self._retry is not None:
            return
        from .session import GatewaySession  # the session module imports this one

        # (a session that fails at once schedules a retry: stop filling then)
        while self._running and self._retry is None and len(self.ready) + len(self.warming) < self.size:
            session = GatewaySession(self.route, self.gateway, pool=self)
            self.warming.add(session)
            self._publish()
            session.start_warming()

    def _retry_later(self, attempt: int) -> None:
        """Fill again after the back-off for the ``attempt``-th failure in a row."""
        if self._retry is not None:
            return
        delay = min(FIRST_RETRY * 2 ** (attempt - 1), MAX_RETRY) * self._rng.uniform(0.5, 1.5)
        self._retry = self.reactor.callLater(delay, self._retry_now)

    def _retry_now(self) -> None:
        self._retry = None
        self._fill()

    def _cancel_retry(self) -> None:
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None

    def _retire_all(self, reason: str) -> None:
        sessions = self.ready + list(self.warming)
        self.ready, self.warming = [], set()
        self._warmed_at.clear()
        for session in sessions:
            session.retire(reason)
        self._publish()

    def _publish(self) -> None:
        # One pool per route: labelled by the destination alone, a tenant's listener
        # would overwrite another's count of the same destination.
        name = str(self.route)
        metrics.POOL_CONNECTIONS.labels(name, "ready").set(len(self.ready))
        metrics.POOL_CONNECTIONS.labels(name, "connecting").set(len(self.warming))

    def status(self) -> dict:
        """For /status: the pool's size, what it holds, how it fares."""
        return {
            "route": str(self.route),
            "size": self.size,
            "ready": len(self.ready),
            "connecting": len(self.warming),
            "served": self.served,
            "failures_in_a_row": self.failures,
            "last_failure": self.last_failure,
        }
