"""Leader election through a coordination.k8s.io/v1 Lease, the client-go way, kept small.

Every ``retry_period`` seconds each replica reads the Lease.  Absent: create it holding
it.  Held by us: renew ``renewTime``.  Held by another: take it over only after its
record has not changed for ``leaseDurationSeconds`` as measured by *our* clock (so clock
skew between nodes does not matter; it is the reactor's ``seconds()``, wall-clock time,
so a step of this node's clock lengthens or shortens that one wait), or at once when the
holder released it.  Writes use
the Lease's resourceVersion, so of two replicas racing only one wins.  A leader that has
not renewed for ``renew_deadline`` seconds steps down, as does one that sees another
holder.  On stop a leader releases the Lease so a successor takes over immediately (so
does a replica whose round, in flight at the stop, may have acquired it).

The renew deadline is a timer on the reactor's clock, armed at every successful renewal:
it fires whatever the Lease calls are doing (a call that hangs holds only the elector's
own worker pool, and the round that made it), so a leader cut off from the API server
stops writing ``renew_deadline`` seconds after its last renewal -- before any follower
can take over, which waits ``leaseDurationSeconds`` after the record last changed.
"""

from __future__ import annotations

import datetime
from typing import Any, Callable, Mapping

from attrs import frozen
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from mailgw.kube.client import KubeApiError

log = Logger(namespace="mailgw.kube.leader")

LEASE = "Lease"


def micro_time(now: datetime.datetime | None = None) -> str:
    now = now or datetime.datetime.now(datetime.timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@frozen
class Observed:
    """The last Lease record seen and when it last changed, in the elector's
    ``clock.seconds()`` (the reactor's: wall-clock time, not a monotonic clock)."""

    record: tuple[Any, ...]
    since: float


def lease_record(lease: Mapping[str, Any]) -> tuple[Any, ...]:
    spec = lease.get("spec") or {}
    return (
        spec.get("holderIdentity"),
        spec.get("renewTime"),
        spec.get("acquireTime"),
        spec.get("leaseTransitions"),
    )


def decide(
    lease: Mapping[str, Any] | None,
    identity: str,
    now: float,
    observed: Observed | None,
    default_duration: float,
) -> tuple[str, Observed | None]:
    """``create`` / ``renew`` / ``takeover`` / ``wait``, and the new observation."""
    if lease is None:
        return "create", None
    spec = lease.get("spec") or {}
    holder = spec.get("holderIdentity")
    record = lease_record(lease)
    if holder == identity:
        return "renew", Observed(record, now)
    if not holder:
        return "takeover", Observed(record, now)
    if observed is None or observed.record != record:
        return "wait", Observed(record, now)
    duration = spec.get("leaseDurationSeconds")
    if not isinstance(duration, (int, float)) or isinstance(duration, bool) or duration <= 0:
        duration = default_duration
    if now - observed.since > duration:
        return "takeover", observed
    return "wait", observed


class LeaderElector:
    """Runs the election; calls ``on_started`` / ``on_stopped`` in the reactor thread."""

    def __init__(
        self,
        api: Any,
        run: Callable[..., "Deferred[Any]"],
        clock: Any,
        namespace: str,
        name: str,
        identity: str,
        lease_duration: float = 15.0,
        renew_deadline: float = 10.0,
        retry_period: float = 2.0,
        on_started: Callable[[], Any] | None = None,
        on_stopped: Callable[[], Any] | None = None,
        wall_clock: Callable[[], str] = micro_time,
    ):
        self.api = api
        self.run = run
        self.clock = clock
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self.on_started = on_started
        self.on_stopped = on_stopped
        self.wall_clock = wall_clock
        self.is_leader = False
        self._observed: Observed | None = None
        self._busy = False
        #: fired when the round in flight is over (see stop)
        self._round_waiters: list[Deferred[None]] = []
        self._stopped = False
        self._loop: LoopingCall | None = None
        self._deadline: Any = None

    def start(self) -> None:
        self._loop = LoopingCall(self.tick)
        self._loop.clock = self.clock
        self._loop.start(self.retry_period, now=True)

    def stop(self) -> "Deferred[None]":
        """Stop campaigning; a leader steps down at once and releases the Lease (best
        effort: the Deferred fires when the release is done or has failed)."""
        self._stopped = True
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._cancel_deadline()
        leading = self.is_leader
        self._step_down("stopping")
        if not (leading or self._busy):
            return succeed(None)

        def released(done: bool) -> None:
            if done:
                log.info("{identity} released lease {name}", identity=self.identity, name=self.name)

        # A round still in flight may yet renew the Lease (a release made meanwhile would
        # meet its new version) or acquire it (a create or takeover sent before the stop,
        # which _won then ignores): release once it is over, if the Lease is ours.
        d = self._round_over()
        d.addCallback(lambda _: self.run(self._release))
        d.addCallback(released)
        d.addErrback(lambda f: log.warn("could not release lease {name}: {e}", name=self.name, e=f.value))
        return d

    def _round_over(self) -> "Deferred[None]":
        if not self._busy:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._round_waiters.append(d)
        return d

    def tick(self) -> "Deferred[None] | None":
        """One round of the election (the LoopingCall calls it)."""
        if self._busy:
            return None  # the previous round still waits; the deadline timer watches it
        if self._stopped:
            return None
        self._busy = True
        d = self.run(self.api.get, LEASE, self.namespace, self.name)
        d.addCallback(self._got)
        d.addErrback(self._failed)
        d.addBoth(self._idle)
        return d

    def _idle(self, _: Any) -> None:
        self._busy = False
        waiters, self._round_waiters = self._round_waiters, []
        for d in waiters:
            d.callback(None)

    def _got(self, lease: Mapping[str, Any] | None) -> "Deferred[None] | None":
        if self._stopped:
            return None
        now = self.clock.seconds()
        action, self._observed = decide(lease, self.identity, now, self._observed, self.lease_duration)
        if action == "wait":
            if self.is_leader:
                self._step_down(f"the lease is held by {lease_record(lease)[0]}")  # type: ignore[arg-type]
            return None
        if action == "create":
            d = self.run(self.api.create, LEASE, self.namespace, self._body(None))
        else:
            d = self.run(self.api.replace, LEASE, self.namespace, self.name, self._body(lease, action))
        d.addCallback(self._won, now)
        return d

    def _body(self, lease: Mapping[str, Any] | None, action: str = "create") -> dict[str, Any]:
        stamp = self.wall_clock()
        spec: dict[str, Any] = dict((lease or {}).get("spec") or {})
        meta: dict[str, Any] = {"name": self.name, "namespace": self.namespace}
        if lease is not None:
            meta["resourceVersion"] = lease["metadata"]["resourceVersion"]
        if action in ("create", "takeover"):
            spec["acquireTime"] = stamp
            spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + (1 if lease else 0)
        spec.update(
            holderIdentity=self.identity,
            leaseDurationSeconds=int(self.lease_duration),
            renewTime=stamp,
        )
        return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": meta, "spec": spec}

    def _won(self, _: Any, now: float) -> None:
        if self._stopped:
            return  # stop() releases it, once this round is over
        # measured from the start of the round, like the Lease record's renewTime
        self._cancel_deadline()
        self._deadline = self.clock.callLater(
            max(0.0, self.renew_deadline - (self.clock.seconds() - now)), self._deadline_passed
        )
        if not self.is_leader:
            self.is_leader = True
            log.info("{identity} became the leader (lease {name})", identity=self.identity, name=self.name)
            if self.on_started is not None:
                self.on_started()

    def _failed(self, failure: Any) -> None:
        error = failure.value
        if not isinstance(error, KubeApiError):
            log.failure("leader election round failed", failure)
        elif not error.conflict:
            log.warn("leader election: {error}", error=str(error))
        if self.is_leader and isinstance(error, KubeApiError) and error.conflict:
            self._step_down("the lease changed under us")

    def _cancel_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _deadline_passed(self) -> None:
        self._deadline = None
        if self.is_leader:
            self._step_down(f"could not renew the lease within {self.renew_deadline:g}s")

    def _step_down(self, why: str) -> None:
        if self.is_leader:
            self.is_leader = False
            self._cancel_deadline()
            log.info("{identity} is no longer the leader: {why}", identity=self.identity, why=why)
            if self.on_stopped is not None:
                self.on_stopped()

    def _release(self) -> bool:
        """Give the Lease up if it is ours (blocking); True when released.  A conflict
        (the Lease changed between the read and the write) is tried once more."""
        for attempt in (1, 2):
            lease = self.api.get(LEASE, self.namespace, self.name)
            if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                return False
            spec = dict(lease.get("spec") or {})
            spec.update(holderIdentity=None, leaseDurationSeconds=1, renewTime=self.wall_clock())
            body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": self.name, "namespace": self.namespace,
                                 "resourceVersion": lease["metadata"]["resourceVersion"]},
                    "spec": spec}
            try:
                self.api.replace(LEASE, self.namespace, self.name, body)
                return True
            except KubeApiError as e:
                if not e.conflict or attempt == 2:
                    raise
        return False
