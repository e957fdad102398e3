"""The Kubernetes controller: watch caches, a work queue, leader election, listeners.

Watches (each in a thread of its own, see :mod:`mailgw.kube.watch`) keep
:class:`~mailgw.kube.store.Store` caches of the Destination CRs, the Services,
EndpointSlices and NetworkPolicies mailgw manages, and the gateway's own pods; when asked
(``watch_secrets``), a metadata-only watch of Secrets tells which ``secrets``
destinations changed.  Every change queues the CRs concerned in a
:class:`~mailgw.kube.queue.WorkQueue`; a timer queues all of them every
``resync_interval`` seconds.  Reconciles read only the caches and the destination cache:
a resync of an idle cluster whose destinations are cached makes no requests at all, and
a reconcile makes only the writes its plan needs.

On the leader a reconcile looks the destination(s) up, computes a plan
(:func:`mailgw.kube.reconcile.reconcile`) and *records the ports it chose before it waits
for anything*, so reconciles running at the same time never pick the same port; then it
opens the listeners, applies the plan, writes the status and Events.  Each write is fenced
by the leadership epoch the reconcile started under, checked in the worker right before
its request: once this replica has stepped down (or the drain has begun) nothing more is
written, however long the write waited for a worker.  Other replicas serve the routes whose
ports the leader recorded on the NetworkPolicies in the gateway's namespace, which only
the gateway can write (Service annotations are informative: anyone who may edit the
CR's namespace may edit them).

Blocking work runs in three worker pools of its own, so the planes never wait on each
other: ``data`` (destination lookups for sessions), ``control`` (reconcile lookups and
writes) and ``lease`` (the leader election).  Nothing here raises into the reactor.
"""

from __future__ import annotations

import datetime
import os
import random
import socket
from typing import Any, Callable, Hashable, Mapping

from attrs import field, frozen
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, fail, maybeDeferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailgw import metrics
from mailgw.blocking import BlockingPool
from mailgw.destination import Destination
from mailgw.kube.apply import ApplyResult, apply_changes
from mailgw.kube.client import KubeApi, KubeApiError
from mailgw.kube.leader import LeaderElector
from mailgw.kube.listeners import IListenerManager, RouteDestination
from mailgw.kube.model import (
    MANAGED_BY,
    MANAGED_BY_LABEL,
    PLURAL,
    PORTS_ANNOTATION,
    UNBOUND_PORTS_ANNOTATION,
    DestinationCR,
    Route,
    lookup_problem,
    parse_cr,
)
from mailgw.kube.queue import WorkQueue
from mailgw.kube.reconcile import (
    DESTINATION,
    ENDPOINT_SLICE,
    EVENT,
    NETWORK_POLICY,
    SERVICE,
    Change,
    Event,
    Existing,
    GatewayPlacement,
    GatewayPod,
    Plan,
    admitted_ports,
    cr_key_of,
    policy_cr_key_of,
    deletion_changes,
    event_changes,
    failed_plan,
    policy_name,
    read_port,
    reconcile,
    report_changes,
    slice_changes,
    route_of_service,
    routes_from_policy,
    slice_name,
    sorted_pairs,
    unbound_warnings,
)
from mailgw.kube.store import Store, key_of
from mailgw.kube.watch import Watcher
from mailgw.service import IDrainParticipant
from mailgw.sources.base import DestinationLookupError, DestinationNotFound, FindResult, TokenExchangeFailed
from mailgw.sources.cache import CachingSource, SourceRegistry

log = Logger(namespace="mailgw.kube.controller")

CRKey = tuple[str, str]
SECRETS = "secrets"
#: How long a ``secrets`` destination stays cached while the Secret watch runs: changes
#: invalidate it at once, so this only bounds the damage of a lost watch event.
WATCHED_SECRET_TTL = 3600.0
#: The only Secret type the Secret watch asks for (the others, service account tokens,
#: TLS certificates, Helm releases, are many and never destinations); destination
#: Secrets of another type are refused rather than cached unwatched.
WATCHED_SECRET_TYPE = "Opaque"


@frozen
class KubeSettings:
    """Settings of Kubernetes mode (``kubernetes:`` in gateway.yaml, and the pod's env)."""

    gateway_namespace: str = "mailgw-system"
    #: labels of the gateway's pods (EndpointSlices and NetworkPolicies select them)
    pod_labels: tuple[tuple[str, str], ...] = field(
        default=(("app.kubernetes.io/name", "mailgw"),), converter=sorted_pairs
    )
    #: this replica's identity in the Lease (the pod name)
    identity: str = field(factory=socket.gethostname)
    port_range: tuple[int, int] = (20000, 29999)
    resync_interval: float = 180.0
    cache_ttl: float = 120.0
    watch_timeout: int = 300
    api_timeout: float = 10.0
    leader_election: bool = True
    lease_name: str = "mailgw-leader"
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0
    #: first retry of a failed reconcile; doubles (with jitter) up to ``resync_interval``
    retry_delay: float = 5.0
    #: destination source used when a CR names no ``destinationServiceInstanceName``
    default_instance: str | None = "secrets"
    #: destination service instances: (instance name, binding Secret name) pairs; the
    #: Secret (clientid, clientsecret, url, uri) lives in the gateway's namespace
    btp_instances: tuple[tuple[str, str], ...] = field(default=(), converter=sorted_pairs)
    #: watch the Secrets (type Opaque, metadata only) of the watched namespaces, so a
    #: changed ``secrets`` destination applies within seconds (and stays cached up to an
    #: hour meanwhile).  Off by default: listing or watching Secrets needs a grant that
    #: reads every Secret's data (k8s/rbac-secret-watch.yaml); off, ``secrets``
    #: destinations are cached ``cache_ttl`` seconds like any other.
    watch_secrets: bool = False
    #: namespaces whose Destinations (and Services, EndpointSlices, Secrets) are watched;
    #: empty: all
    watch_namespaces: tuple[str, ...] = field(default=(), converter=lambda v: tuple(sorted(set(v))))
    #: where the gateway's listeners bind: "" is every address of both families
    listen_interface: str = ""
    #: reconciles in progress at once
    concurrency: int = 4
    #: threads of each worker pool (data, control, lease)
    threads: int = 4

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> "KubeSettings":
        """POD_NAMESPACE and POD_NAME (downward API) fill namespace and identity."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        if env.get("POD_NAMESPACE"):
            values["gateway_namespace"] = env["POD_NAMESPACE"]
        if env.get("POD_NAME"):
            values["identity"] = env["POD_NAME"]
        values.update(overrides)
        return cls(**values)

    @property
    def placement(self) -> GatewayPlacement:
        return GatewayPlacement(self.gateway_namespace, dict(self.pod_labels), self.port_range)

    @property
    def pod_selector(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.pod_labels)

    @property
    def namespaces(self) -> tuple[str | None, ...]:
        """What each namespaced watch covers: the listed namespaces, or everything."""
        return self.watch_namespaces or (None,)


def _version_of(obj: Mapping[str, Any] | None) -> str | None:
    meta = (obj or {}).get("metadata") or {}
    version = meta.get("resourceVersion") if isinstance(meta, Mapping) else None
    return str(version) if version is not None else None


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def pod_of(obj: Mapping[str, Any]) -> GatewayPod | None:
    """A gateway pod as the EndpointSlices list it (None: no IP yet, or gone)."""
    meta = obj.get("metadata") or {}
    status = obj.get("status") or {}
    ips = [p.get("ip") for p in status.get("podIPs") or [] if isinstance(p, Mapping) and p.get("ip")]
    if not ips and status.get("podIP"):
        ips = [status["podIP"]]
    if not ips:
        return None
    ready = any(
        isinstance(c, Mapping) and c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )
    terminating = bool(meta.get("deletionTimestamp"))
    unbound = str((meta.get("annotations") or {}).get(UNBOUND_PORTS_ANNOTATION) or "").split(",")
    return GatewayPod(meta.get("name", ""), tuple(ips), ready=ready and not terminating, serving=ready,
                      terminating=terminating,
                      unbound_ports={int(p) for p in (p.strip() for p in unbound) if p.isascii() and p.isdigit()})


@frozen
class Planes:
    """One worker pool and one API client (connection pool) per plane."""

    data: BlockingPool
    control: BlockingPool
    lease: BlockingPool
    data_api: KubeApi
    control_api: KubeApi
    lease_api: KubeApi
    watch_api: KubeApi


class _Taken:
    """Ports held by routes of other CRs (a view, not a copy)."""

    def __init__(self, owners: Mapping[int, Route], key: CRKey):
        self.owners, self.key = owners, key

    def __contains__(self, port: object) -> bool:
        owner = self.owners.get(port)  # type: ignore[call-overload]
        return owner is not None and (owner.namespace, owner.cr_name) != self.key


@implementer(IDrainParticipant)
class KubeController(MultiService):
    """Reconciles Destination CRs into Services and gateway listeners.

    A twisted service; its worker pools are child services.  Found in the gateway's
    service tree by its name, ``kubernetes``.
    """

    name = "kubernetes"

    def __init__(
        self,
        planes: Planes,
        listeners: IListenerManager,
        sources: SourceRegistry,
        settings: KubeSettings,
        reactor: Any = None,
        *,
        now: Callable[[], str] = utc_now,
        rng: Callable[[], float] = random.random,
    ):
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.planes = planes
        for pool in (planes.data, planes.control, planes.lease):
            pool.setServiceParent(self)
        self.listeners = listeners
        self.sources = sources
        self.settings = settings
        self.reactor = reactor
        self.now = now
        self.placement = settings.placement

        # a deletion is remembered as long as a write made before it may take to be
        # answered (no plane's budget exceeds api_timeout), twice over
        remember = dict(now=reactor.seconds, tombstone_ttl=2 * settings.api_timeout)
        self.crs = Store(**remember)
        self.service_store = Store(index=cr_key_of, **remember)
        self.slice_store = Store(index=cr_key_of, **remember)
        self.policy_store = Store(index=policy_cr_key_of, **remember)
        self.pods: dict[str, GatewayPod] = {}

        #: every route's gateway port as this replica knows it, and each port's route
        self.allocations: dict[CRKey, dict[Route, int]] = {}
        self.owners: dict[int, Route] = {}
        #: ports of CRs' recorded routes refused because another route held them
        self._refused: dict[CRKey, set[int]] = {}
        #: CRs whose ports this leader decided itself (in this leadership epoch)
        self.decided: set[CRKey] = set()
        #: ports a route could not bind here (it gets another; others keep theirs)
        self.bind_failures: dict[Route, set[int]] = {}
        #: names another owner holds, met when creating: (kind, namespace, name) -> the CR
        #: that wanted it.  Each resync asks whether they are still held (a read each).
        self.foreign: dict[tuple[str, str, str], CRKey] = {}
        #: listeners open, by CR
        self.served: dict[CRKey, dict[Route, int]] = {}
        self.secret_refs: dict[tuple[str, str], set[CRKey]] = {}
        self._secret_of: dict[CRKey, tuple[str, str]] = {}

        #: the answers to the writes of each reconcile running now: (store, key, version)
        self._answers: dict[CRKey, set[tuple[Store, tuple[str, str], str | None]]] = {}
        #: changes that arrived for a CR while its reconcile ran: (store, key, version)
        self._seen: dict[CRKey, list[tuple[Store, tuple[str, str], str | None]]] = {}
        #: CRs queued because the gateway pods changed, and for nothing else: their
        #: EndpointSlices are patched from the caches, without a full reconcile
        self._slices_only: set[CRKey] = set()

        self.epoch = 0
        self.leading = False
        self.draining = False
        self.last_error: str | None = None
        self._synced: dict[tuple[str, str | None], bool] = {}
        self._initial_done = False
        self.watchers: list[Watcher] = []
        self.elector: LeaderElector | None = None
        self._resync: LoopingCall | None = None
        self._releasing: Deferred | None = None
        #: the ports this pod could not open, by CR, and what its Pod says of them now
        #: (None: not known; the pod watch's copy of the Pod tells)
        self._unbound: dict[CRKey, set[int]] = {}
        self._told_unbound: tuple[int, ...] | None = None
        self._telling: Deferred | None = None
        self._tell_again: Any = None  # the DelayedCall of a retry after a failed patch
        self.queue = WorkQueue(
            reactor, self._work, concurrency=settings.concurrency, base_delay=settings.retry_delay,
            max_delay=settings.resync_interval, rng=rng,
            on_change=lambda q: metrics.KUBE_QUEUE_DEPTH.set(q.depth),
        )

    # --- construction -------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        api: KubeApi,
        listeners: IListenerManager,
        settings: KubeSettings,
        reactor: Any = None,
        extra_sources: Mapping[str, Any] | None = None,
        tokens: Any = None,
    ) -> "KubeController":
        """A controller with its pools, per-plane API clients and destination sources:
        ``secrets``, one ``btp`` source per ``settings.btp_instances`` entry (binding
        Secret in the gateway's namespace; ``tokens`` is the gateway's
        :class:`~mailgw.oauth.TokenProvider`), and ``extra_sources`` (name -> source),
        each behind a cache."""
        from mailgw.kube.secrets import SecretsSource, binding_credentials
        from mailgw.sources.btp import BtpSource

        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        s = settings
        # Lease calls must give up before the renew deadline; writes should end before
        # a successor may take over (lease duration after our last renewal).  Each is a
        # whole-call budget, never retried underneath (KubeApi.clone).
        base = api.timeout_seconds
        lease_timeout = max(0.5, min(base, s.renew_deadline / 2))
        write_timeout = base
        if s.leader_election:
            write_timeout = max(0.5, min(base, s.lease_duration - s.renew_deadline))
        planes = Planes(
            data=BlockingPool(reactor, "mailgw-kube-data", s.threads),
            control=BlockingPool(reactor, "mailgw-kube-control", s.threads),
            lease=BlockingPool(reactor, "mailgw-kube-lease", 2),
            data_api=api.clone(base),
            control_api=api.clone(write_timeout),
            lease_api=api.clone(lease_timeout),
            watch_api=api,
        )
        if s.watch_secrets:
            # the watch invalidates a changed destination; a type it cannot see is refused
            secrets = SecretsSource(planes.data_api, planes.data, required_type=WATCHED_SECRET_TYPE)
            ttls = {SECRETS: max(s.cache_ttl, WATCHED_SECRET_TTL)}
        else:
            secrets, ttls = SecretsSource(planes.data_api, planes.data), {}
        raw: dict[str, Any] = {SECRETS: secrets}
        if s.btp_instances:
            if tokens is None:
                raise ValueError("btp instances need the gateway's token provider")
            for instance, secret_name in s.btp_instances:
                raw[instance] = BtpSource(
                    binding_credentials(planes.data_api, s.gateway_namespace, secret_name),
                    planes.data, tokens.client, tokens.cache, timeout=s.api_timeout,
                    clock=reactor, credentials_ttl=s.cache_ttl,
                )
        raw.update(extra_sources or {})
        sources = SourceRegistry(
            {name: CachingSource(src, reactor, ttls.get(name, s.cache_ttl)) for name, src in raw.items()},
            default=s.default_instance,
        )
        return cls(planes, listeners, sources, settings, reactor)

    # --- state for others ---------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """The initial lists are in (before that no reconcile runs)."""
        return bool(self._synced) and all(self._synced.values())

    def status(self) -> dict[str, Any]:
        """What the /status page shows (JSON-able)."""
        return {
            "leader": self.leading,
            "synced": self.ready,
            "queue_depth": self.queue.depth,
            "routes_served": sum(len(r) for r in self.served.values()),
            "last_error": self.last_error,
        }

    # --- lifecycle ----------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()  # the pools
        s = self.settings
        api = self.planes.watch_api
        managed = f"{MANAGED_BY_LABEL}={MANAGED_BY}"
        specs: list[tuple[str, str, str | None, dict[str, Any], Store | None]] = []
        for ns in s.namespaces:
            specs.append((PLURAL, "Destination", ns, {}, self.crs))
            specs.append(("services", SERVICE, ns, {"label_selector": managed}, self.service_store))
            specs.append(("endpointslices", ENDPOINT_SLICE, ns, {"label_selector": managed}, self.slice_store))
            if s.watch_secrets and SECRETS in self.sources.sources:
                # metadata only, and only the type destinations are stored as
                specs.append(("secrets", "Secret", ns, {"field_selector": f"type={WATCHED_SECRET_TYPE}",
                                                        "metadata_only": True}, None))
        specs.append(("networkpolicies", NETWORK_POLICY, s.gateway_namespace, {"label_selector": managed}, self.policy_store))
        specs.append(("pods", "Pod", s.gateway_namespace, {"label_selector": s.pod_selector}, None))
        self._synced = {(name, ns): False for name, _, ns, _, _ in specs}
        self.watchers = []
        for name, kind, ns, kw, store in specs:
            self.watchers.append(Watcher(
                name,
                lambda kind=kind, ns=ns, kw=kw: api.list(kind, ns, **kw),
                lambda kind=kind, ns=ns, kw=kw: api.watch_source(kind, ns, **kw),
                lambda items, name=name, ns=ns, store=store: self._listed(name, ns, store, items),
                lambda kind, obj, name=name, store=store: self._event(name, store, kind, obj),
                self.reactor, s.watch_timeout,
            ))
        for w in self.watchers:
            w.start()
        if s.leader_election:
            self.elector = LeaderElector(
                self.planes.lease_api, self.planes.lease, self.reactor, s.gateway_namespace, s.lease_name,
                s.identity, s.lease_duration, s.renew_deadline, s.retry_period,
                on_started=self._started_leading, on_stopped=self._stopped_leading,
            )
            self.elector.start()
        else:
            self._started_leading()
        self._resync = LoopingCall(self.resync)
        self._resync.clock = self.reactor
        self._resync.start(s.resync_interval, now=False)

    def startDrain(self) -> "Deferred[None]":
        """SIGTERM: stop writing and hand the Lease over at once, stop accepting on every
        listener; open sessions go on (the gateway drains them)."""
        self.draining = True
        if self._resync is not None and self._resync.running:
            self._resync.stop()
        self.queue.stop()
        if self.elector is not None:
            self._releasing = self.elector.stop()
        self._set_leading(False)
        closing = [self._sync_listeners(key, {}) for key in list(self.served)]
        return DeferredList([Deferred.fromCoroutine(c) for c in closing], consumeErrors=True).addCallback(lambda _: None)

    def stopService(self) -> "Deferred[None]":
        """Stop watching, reconciling and campaigning (a leader releases the Lease), then
        the pools.  Listeners still open stay open: they close with the process (the
        gateway's drain decides when)."""
        self.draining = True
        if self._resync is not None and self._resync.running:
            self._resync.stop()
        if self._tell_again is not None and self._tell_again.active():
            self._tell_again.cancel()
        steps: list[Deferred[Any]] = [w.stop() for w in self.watchers]
        steps.append(self.queue.stop())
        if self._telling is not None:  # a Pod patch under way finishes before the pools stop
            steps.append(self._telling)
        if self.elector is not None:
            steps.append(self._releasing or self.elector.stop())
        self._set_leading(False)
        d = DeferredList(steps, consumeErrors=True)
        d.addCallback(lambda _: MultiService.stopService(self))
        d.addCallback(lambda _: None)
        return d

    def _set_leading(self, leading: bool) -> None:
        if leading == self.leading:
            return
        self.leading = leading
        self.epoch += 1  # fences every write begun under the previous leadership
        self.decided.clear()
        metrics.KUBE_LEADER.set(1 if leading else 0)
        # back to what the NetworkPolicies record (a leader's undecided ports go)
        for key in set(self.allocations) | {self.policy_store.index_of(p) for p in self.policy_store.values()} - {None}:
            self._refresh_trusted(key)  # type: ignore[arg-type]
        self.enqueue_all()

    def _started_leading(self) -> None:
        if not self.draining:
            self._set_leading(True)

    def _stopped_leading(self) -> None:
        self._set_leading(False)

    # --- watch callbacks (reactor thread) -----------------------------------------------

    def _listed(self, name: str, namespace: str | None, store: Store | None, items: list[dict[str, Any]]) -> None:
        if name == "pods":
            self._set_pods({p.name: p for p in map(pod_of, items) if p is not None})
        elif name == "secrets":
            # a fresh list: anything may have changed while the watch was away
            bindings = {(self.settings.gateway_namespace, binding) for _, binding in self.settings.btp_instances}
            for ns, secret in set(self.secret_refs) | bindings:
                if namespace is None or ns == namespace:
                    self._secret_changed(ns, secret)
        else:
            assert store is not None
            before = {k: store.index_of(o) for k in store if (o := store.get(k)) is not None}
            changed = store.replace(items, namespace if name != "networkpolicies" else None)
            for key in changed:
                obj = store.get(key)
                self._changed(name, store, key, obj, before.get(key) if obj is None else store.index_of(obj) or before.get(key))
        self._synced[(name, namespace)] = True
        if self.ready and not self._initial_done:
            self._initial_done = True
            self.enqueue_all()

    def _event(self, name: str, store: Store | None, kind: str, obj: dict[str, Any]) -> None:
        key = key_of(obj)
        if key is None:
            return
        if name == "pods":
            pods = dict(self.pods)
            pod = pod_of(obj) if kind != "DELETED" else None
            if pod is None:
                pods.pop(key[1], None)
            else:
                pods[pod.name] = pod
            self._set_pods(pods)
            return
        if name == "secrets":
            self._secret_changed(*key)
            return
        assert store is not None
        old = store.get(key)
        if store.event(kind, obj):
            current = None if kind == "DELETED" else obj  # (a deletion is noted without a version)
            self._changed(name, store, key, current, store.index_of(obj) or (store.index_of(old) if old else None))

    def _changed(self, name: str, store: Store, key: tuple[str, str], obj: Mapping[str, Any] | None,
                 cr: CRKey | None) -> None:
        """Object ``key`` of ``store`` changed (``obj``: as it is now, None: gone); ``cr``
        is the CR it belongs to."""
        if name == PLURAL:
            self._index_secret(key)
            cr = key
        elif cr is not None and name == "networkpolicies":
            self._refresh_trusted(cr)
        if cr is None:
            return
        if cr in self._answers:
            # cr's reconcile is writing: this may be the watch echo of one of its writes,
            # arrived before the write's answer; decided when the reconcile ends
            self._seen.setdefault(cr, []).append((store, key, _version_of(obj)))
        else:
            self.enqueue(cr)

    def _set_pods(self, pods: dict[str, GatewayPod]) -> None:
        if pods != self.pods:
            self.pods = pods
            if self.leading:
                for key in sorted(self.allocations):  # the CRs with slices
                    self._enqueue_slices(key)

    def _index_secret(self, key: CRKey) -> None:
        old = self._secret_of.pop(key, None)
        if old is not None:
            refs = self.secret_refs.get(old, set())
            refs.discard(key)
            if not refs:
                self.secret_refs.pop(old, None)
        obj = self.crs.get(key)
        if obj is None:
            return
        try:
            cr = parse_cr(obj)
        except ValueError:
            return
        if (cr.instance or self.sources.default) == SECRETS and cr.destination_ref:
            ref = (cr.namespace, cr.destination_ref)
            self._secret_of[key] = ref
            self.secret_refs.setdefault(ref, set()).add(key)

    def _secret_changed(self, namespace: str, name: str) -> None:
        if namespace == self.settings.gateway_namespace:
            for instance, binding in self.settings.btp_instances:
                # a destination service binding: its credentials are read again
                forget = getattr(getattr(self.sources.sources.get(instance), "source", None), "forget_credentials", None)
                if binding == name and forget is not None:
                    forget()
        keys = self.secret_refs.get((namespace, name))
        if not keys:
            return
        source = self.sources.sources.get(SECRETS)
        if isinstance(source, CachingSource):
            source.invalidate(namespace, name)
        for key in sorted(keys):
            self.enqueue(key)

    # --- allocations ----------------------------------------------------------------------

    def _refresh_trusted(self, key: CRKey) -> None:
        """Take ``key``'s ports from its NetworkPolicy (unless this leader decided them)."""
        if self.leading and key in self.decided:
            return
        routes: dict[Route, int] = {}
        for policy in self.policy_store.by_index(key):
            found = routes_from_policy(policy, self.placement.port_range)
            if not found and PORTS_ANNOTATION not in ((policy["metadata"].get("annotations")) or {}):
                found = self._legacy_routes(key, policy)
            routes.update(found)
        self._set_allocations(key, routes)

    def _legacy_routes(self, key: CRKey, policy: Mapping[str, Any]) -> dict[Route, int]:
        """A policy written before the ports were recorded on it: a Service's annotation
        counts only for a port that policy admits."""
        admitted = admitted_ports(policy)
        lo, hi = self.placement.port_range
        routes = {}
        for svc in self.service_store.by_index(key):
            route, port = route_of_service(svc), read_port(svc)
            if route is not None and port in admitted and lo <= port <= hi:  # type: ignore[operator]
                routes[route] = port  # type: ignore[assignment]
        return routes

    def _set_allocations(self, key: CRKey, routes: Mapping[Route, int]) -> None:
        old = self.allocations.pop(key, {})
        for route, port in old.items():
            if self.owners.get(port) == route:
                del self.owners[port]
        self._refused.pop(key, None)
        mine: dict[Route, int] = {}
        for route, port in sorted(routes.items()):
            owner = self.owners.get(port)
            if owner is not None and owner != route:
                log.warn("port {port} is recorded for both {a} and {b}: {b} is not served here",
                         port=port, a=owner.key, b=route.key)
                self._refused.setdefault(key, set()).add(port)
                continue
            self.owners[port] = route
            mine[route] = port
        if mine:
            self.allocations[key] = mine
        # A route refused a port held by another is served once that port is free: the
        # records are read in the order their events came (the leader moved the holder
        # away before it gave the port on), and nothing else reads the refused one again
        # until its own NetworkPolicy changes.
        freed = {port for port in old.values() if port not in self.owners}
        for other in [k for k, ports in self._refused.items() if k != key and ports & freed]:
            self._refresh_trusted(other)
            # queued after whatever freed the port, which closes its listener first
            self.reactor.callLater(0, self.enqueue, other)

    # --- the queue ----------------------------------------------------------------------

    def enqueue(self, key: CRKey) -> None:
        """Queue a full reconcile of ``key``."""
        if self.ready and not self.draining:
            self._slices_only.discard(key)
            self.queue.add(key)

    def _enqueue_slices(self, key: CRKey) -> None:
        """Queue a pass over ``key``'s EndpointSlices only (the pods changed), unless a
        full reconcile is due anyway."""
        if self.ready and not self.draining:
            if not self.queue.pending(key):
                self._slices_only.add(key)
            self.queue.add(key)

    def enqueue_all(self) -> None:
        for key in sorted(set(self.crs) | set(self.served) | set(self.allocations)):
            self.enqueue(key)

    def resync(self) -> "Deferred[None]":
        """Queue every CR again, and (leader) remove objects whose CR is gone."""
        self.enqueue_all()
        if not (self.leading and self.ready):
            return succeed(None)
        d = Deferred.fromCoroutine(self._resync_as_leader(self.epoch))
        d.addErrback(lambda f: log.failure("resync sweep failed", f))  # the timer must survive
        return d

    async def _resync_as_leader(self, epoch: int) -> None:
        await self._recheck_foreign()
        await self._sweep(epoch)

    async def _recheck_foreign(self) -> None:
        """Ask whether the names other owners held are still theirs: a CR whose clash
        is gone is reconciled again.  (Forgetting them all instead had every clashing CR
        create its Service and delete it again at each resync.)"""
        for (kind, namespace, name), key in list(self.foreign.items()):
            if name not in self._wanted_names(key):  # the CR is gone, or wants it no more
                del self.foreign[(kind, namespace, name)]
                continue
            try:
                found = await self.planes.control(self.planes.control_api.get, kind, namespace, name)
            except KubeApiError as e:  # the API is down: ask again at the next resync
                log.warn("cannot read {kind} {namespace}/{name}: {e}", kind=kind, namespace=namespace, name=name, e=e)
                continue
            if found is None:
                del self.foreign[(kind, namespace, name)]
                self.enqueue(key)

    def _wanted_names(self, key: CRKey) -> set[str]:
        """The Service and EndpointSlice names CR ``key`` wants now (none once it is gone)."""
        try:
            cr = parse_cr(self.crs.get(key))
        except ValueError:  # gone (None) or malformed
            return set()
        return {n for r in cr.routes() for n in (r.service_name, slice_name(r.service_name), slice_name(r.service_name, True))}

    def _work(self, key: Hashable) -> "Deferred[None]":
        started = self.reactor.seconds()
        self._answers[key] = set()  # type: ignore[index]
        slices_only = key in self._slices_only
        self._slices_only.discard(key)  # type: ignore[arg-type]
        d = Deferred.fromCoroutine(self._reconcile(key, slices_only))  # type: ignore[arg-type]

        def done(ok: Any) -> None:
            answers = self._answers.pop(key, set())  # type: ignore[arg-type]
            if any(change not in answers for change in self._seen.pop(key, ())):  # type: ignore[arg-type]
                self.enqueue(key)  # type: ignore[arg-type] # someone else's change came meanwhile: again
            metrics.KUBE_RECONCILE_SECONDS.observe(max(0.0, self.reactor.seconds() - started))
            metrics.KUBE_RECONCILES.labels("ok" if ok else "error").inc()
            if ok and not slices_only:  # (a slices-only pass leaves a pending retry be)
                self.queue.forget(key)
            elif not self.draining:
                self.queue.retry(key)

        def crashed(failure: Any) -> bool:
            log.failure("reconciling {key} failed", failure, key="/".join(key))  # type: ignore[arg-type]
            self.last_error = f"reconciling {'/'.join(key)}: internal error {failure.type.__name__}"  # type: ignore[arg-type]
            return False

        d.addErrback(crashed)
        d.addCallback(done)
        return d

    def _error(self, message: str) -> bool:
        self.last_error = message
        return False

    # --- reconciling (reactor thread; blocking work in the pools) -------------------------

    async def _reconcile(self, key: CRKey, slices_only: bool = False) -> bool:
        """One pass for ``key`` (``slices_only``: the pods changed, and nothing else);
        True when everything wanted is in place."""
        raw = self.crs.get(key)
        if raw is None:
            return await self._forget(key)
        try:
            cr = parse_cr(raw)
        except ValueError as e:
            log.warn("ignoring malformed Destination object {key}: {e}", key="/".join(key), e=e)
            return True
        if self.leading and slices_only and key in self.decided:
            return await self._reconcile_slices(cr, self.epoch)
        if self.leading:
            return await self._reconcile_as_leader(cr, self.epoch)
        wanted = set(cr.routes())
        routes = {r: p for r, p in self.allocations.get(key, {}).items() if r in wanted}
        failed = await self._sync_listeners(key, routes)
        return not failed or self._error(f"cannot listen for {'/'.join(key)}")

    def _fence(self, epoch: int) -> Callable[[], bool]:
        """True while the leadership ``epoch`` lasts (asked from worker threads too)."""
        return lambda: self.leading and self.epoch == epoch and not self.draining

    async def _lookups(self, cr: DestinationCR) -> dict[str | None, Any]:
        if cr.problem is not None:
            return {}
        routes = cr.routes()
        results = await DeferredList(
            [self.sources.lookup(cr.instance, cr.namespace, cr.destination_ref or "", r.tenant,
                                 run=self.planes.control) for r in routes],
            consumeErrors=True,
        )
        return {route.tenant: (value if ok else value.value) for route, (ok, value) in zip(routes, results)}

    def _owned(self, key: CRKey) -> Existing:
        """The objects the caches list as ``key``'s.  (The policy store holds the gateway's
        namespace only: nothing else is watched or written there.)"""
        def by_name(store: Store) -> dict[str, dict[str, Any]]:
            return {o["metadata"]["name"]: o for o in store.by_index(key)}

        return Existing(by_name(self.service_store), by_name(self.slice_store), by_name(self.policy_store))

    def _existing(self, cr: DestinationCR) -> Existing:
        """What exists for ``cr``, from the caches: what they list as its own, and
        whatever holds the names it wants."""
        ns = cr.namespace
        owned = self._owned(cr.key)
        services, slices, policies = dict(owned.services), dict(owned.slices), dict(owned.policies)
        for route in cr.routes():
            name = route.service_name
            svc = self.service_store.get((ns, name))
            if svc is not None:
                services[name] = svc
            elif (SERVICE, ns, name) in self.foreign:
                services[name] = {"metadata": {"name": name, "namespace": ns}}  # someone else's
            for sname in (slice_name(name), slice_name(name, True)):
                found = self.slice_store.get((ns, sname))
                if found is not None:
                    slices[sname] = found
                elif (ENDPOINT_SLICE, ns, sname) in self.foreign:
                    slices[sname] = {"metadata": {"name": sname, "namespace": ns}}  # someone else's
        own = self.policy_store.get((self.placement.namespace, policy_name(cr)))
        if own is not None:
            policies[own["metadata"]["name"]] = own
        return Existing(services, slices, policies)

    def _plan(self, cr: DestinationCR, lookups: Mapping[str | None, Any]) -> Plan:
        unusable: set[int] = set()
        for route in cr.routes():
            unusable |= self.bind_failures.get(route, set())
        plan = reconcile(
            cr, lookups, self._existing(cr), self.allocations.get(cr.key, {}),
            sorted(self.pods.values(), key=lambda p: p.name), self.placement, self.now(),
            unusable, taken=_Taken(self.owners, cr.key),
        )
        # decided now, before anything waits: a concurrent reconcile sees these ports taken
        self._set_allocations(cr.key, plan.routes)
        self.decided.add(cr.key)
        return plan

    async def _reconcile_slices(self, cr: DestinationCR, epoch: int) -> bool:
        """The pods changed: patch ``cr``'s EndpointSlices from the caches, with the ports
        this leader decided -- no destination lookup, no listener, no status.  Anything
        more (a slice to create or delete) or a failed patch makes it a full reconcile,
        which reports as always."""
        slices = {o["metadata"]["name"]: o for o in self.slice_store.by_index(cr.key)}
        pods = sorted(self.pods.values(), key=lambda p: p.name)
        routes = self.allocations.get(cr.key, {})
        changes = slice_changes(cr, routes, slices, pods, self.placement)
        if changes is None:
            return await self._reconcile_as_leader(cr, epoch)
        warnings = [w for route, port in sorted(routes.items()) for w in unbound_warnings(cr, route, port, pods, slices)]
        fence = self._fence(epoch)
        result = await self._apply(changes, fence, cr.key)
        for failure in result.failures:
            log.warn("Destination {key}: {message}", key="/".join(cr.key), message=failure.message)
        if result.failures and not result.fenced:
            return await self._reconcile_as_leader(cr, epoch)
        if warnings and not result.fenced:
            await self._record(cr, warnings, fence)
        return True

    async def _reconcile_as_leader(self, cr: DestinationCR, epoch: int) -> bool:
        key = cr.key
        fence = self._fence(epoch)
        lookups = await self._lookups(cr)
        current = self.crs.get(key)
        if not fence() or current is None or current["metadata"].get("resourceVersion") != cr.resource_version:
            self.enqueue(key)  # leadership or the CR changed meanwhile: start over
            return True
        plan = self._plan(cr, lookups)
        for _ in range(3):  # a port this pod cannot bind moves elsewhere
            failed = await self._sync_listeners(key, plan.routes)
            if not failed or not fence():
                break
            for route, port in failed:
                self.bind_failures.setdefault(route, set()).add(port)
            plan = self._plan(cr, lookups)

        if not fence():
            return True
        result = await self._apply(plan.changes, fence, key)
        if result.fenced:
            return True
        ok = True
        for failure in result.failures:
            log.warn("Destination {key}: {message}", key="/".join(key), message=failure.message)
            if failure.foreign:
                self.foreign[(failure.change.kind, failure.change.namespace, failure.change.name)] = key
        if result.failures:
            ok = all(f.foreign for f in result.failures)  # a name clash waits for a resync
            if ok and any(f.change.route is not None for f in result.failures):
                # The NetworkPolicy, written first, still records the clashing route's
                # port; the next plan knows the clash (self.foreign) and leaves it out.
                self.enqueue(key)
            plan = failed_plan(plan, cr, result.failures, self.now())
            self._set_allocations(key, plan.routes)
            await self._sync_listeners(key, plan.routes)
            if not ok:
                self.last_error = f"Destination {'/'.join(key)}: {result.failures[0].message}"
        reports = report_changes(cr, plan, self.now(), self.settings.identity)
        if reports:
            result = await self._apply(reports, fence, key)
            for failure in result.failures:
                if failure.change.kind == EVENT:
                    self._lost_event(key, failure.message)
                else:
                    ok = self._error(f"cannot write the status of Destination {'/'.join(key)}: {failure.message}")
                    log.warn("{message}", message=self.last_error)
        transient = [e for e in lookups.values() if isinstance(e, BaseException)
                     and not (isinstance(e, DestinationLookupError) and e.definitive)]
        if transient:
            ok = self._error(f"Destination {'/'.join(key)}: {lookup_problem(transient[0]).message}")
        for route, problem in plan.problems.items():
            log.info(
                "Destination {key}{tenant}: {reason}: {message}", key="/".join(key),
                tenant=f" tenant {route.tenant}" if route is not None and route.tenant else "",
                reason=problem.reason, message=problem.message,
            )
        return ok

    async def _record(self, cr: DestinationCR, events: list[Event], fence: Callable[[], bool]) -> None:
        """Record ``events`` on ``cr``."""
        result = await self._apply(event_changes(cr, events, self.now(), self.settings.identity), fence, cr.key)
        for failure in result.failures:
            self._lost_event(cr.key, failure.message)

    def _lost_event(self, key: CRKey, message: str) -> None:
        # An Event is a notice: a lost one is logged, nothing more (no retry, no error).
        log.warn("cannot record an event on Destination {key}: {e}", key="/".join(key), e=message)

    async def _apply(
        self, changes: tuple[Change, ...] | list[Change], fence: Callable[[], bool], cr: CRKey | None = None
    ) -> ApplyResult:
        """Write ``changes`` (for ``cr``'s reconcile) in the control pool; nothing to
        write: no thread hop."""
        if not changes:
            return ApplyResult(())

        def hand_back(kind: str, obj: dict[str, Any]) -> None:  # (worker thread)
            self.reactor.callFromThread(self._written, cr, kind, obj)

        def hand_back_deletion(kind: str, namespace: str, name: str) -> None:  # (worker thread)
            self.reactor.callFromThread(self._deleted, cr, kind, (namespace, name))

        return await self.planes.control(
            apply_changes, self.planes.control_api, changes, fence, hand_back, hand_back_deletion)

    def _store_of(self, kind: str) -> Store | None:
        return {SERVICE: self.service_store, ENDPOINT_SLICE: self.slice_store, NETWORK_POLICY: self.policy_store,
                DESTINATION: self.crs}.get(kind)

    def _written(self, cr: CRKey | None, kind: str, obj: dict[str, Any]) -> None:
        """The API server's answer to one of ``cr``'s writes goes into the cache as soon
        as it arrives, while the rest of the plan is still being written: its watch
        event, which usually comes later with the same version, then changes nothing.
        The answer is also noted for the reconcile, in case the event came first."""
        store = self._store_of(kind)
        if store is None:
            return
        store.put(obj)
        key = key_of(obj)
        if cr in self._answers and key is not None:
            answers = self._answers[cr]
            # A deletion seen from now on is not the one this reconcile made (it wrote
            # the object again since): it must queue the CR again.
            answers.discard((store, key, None))
            answers.add((store, key, _version_of(obj)))

    def _deleted(self, cr: CRKey | None, kind: str, key: tuple[str, str]) -> None:
        """One of ``cr``'s deletes is done: the object leaves the cache now, so its watch
        event changes nothing (and starts no reconcile); noted for the reconcile as a
        deletion (no version), in case the event came first."""
        store = self._store_of(kind)
        if store is None:
            return
        store.forget(key)
        if cr in self._answers:
            self._answers[cr].add((store, key, None))

    async def _sync_listeners(self, key: CRKey, routes: Mapping[Route, int]) -> set[tuple[Route, int]]:
        """Make this pod's listeners for ``key`` match ``routes``; those that failed."""
        if self.draining and routes:
            routes = {}
        current = self.served.setdefault(key, {})
        for route, port in list(current.items()):
            if routes.get(route) != port:
                del current[route]
                await self._close_listener(route)
        failed: set[tuple[Route, int]] = set()
        for route, port in sorted(routes.items()):
            if self.draining:
                break  # the drain began while an open was under way: open nothing more
            if current.get(route) == port:
                continue
            try:
                await maybeDeferred(self.listeners.open, route, port, self._route_destination(route))
            except Exception as e:  # noqa: BLE001
                log.warn("cannot listen on port {port} for {route}: {e}", port=port, route=route.key, e=e)
                failed.add((route, port))
            else:
                current[route] = port
        if self.draining:
            # opens that finished after the drain began (which closed what was open then)
            for route in list(current):
                del current[route]
                await self._close_listener(route)
        if not current and self.served.get(key) is current:
            self.served.pop(key, None)
        if failed:
            self._unbound[key] = {port for _, port in failed}
        else:
            self._unbound.pop(key, None)
        self._tell_unbound()
        return failed

    def _tell_unbound(self) -> None:
        """Say on this pod's own Pod which gateway ports it could not open (something
        else holds them here): the leader then lists it neither ready nor serving in
        those routes' EndpointSlices.  One patch at a time, the latest state last; a
        failed one is tried again after ``retry_delay``."""
        ports = tuple(sorted(set().union(*self._unbound.values())))
        if self._told_unbound is None:
            # What the Pod says now (a restarted process may find its predecessor's
            # ports); nothing when it is not among the pods watched (not a pod, no IP yet).
            own = self.pods.get(self.settings.identity)
            self._told_unbound = tuple(sorted(own.unbound_ports)) if own is not None else ()
        if self._telling is not None or ports == self._told_unbound or self.draining:
            return
        value = ",".join(map(str, ports)) or None  # None: a merge patch removes the annotation
        patch = {"metadata": {"annotations": {UNBOUND_PORTS_ANNOTATION: value}}}
        self._telling = self.planes.control(
            self.planes.control_api.patch, "Pod", self.settings.gateway_namespace, self.settings.identity, patch)

        def told(result: Any) -> None:
            self._telling = None
            if isinstance(result, Failure) and result.check(KubeApiError) and result.value.not_found:
                # not running as a pod of that name (POD_NAME): nobody to tell
                log.warn("cannot say on Pod {pod} which ports it could not open: no such Pod",
                         pod=self.settings.identity)
                self._told_unbound = ports
                return
            if isinstance(result, Failure):
                self._told_unbound = None
                log.warn("cannot say on Pod {pod} which ports it could not open: {e}",
                         pod=self.settings.identity, e=result.getErrorMessage())
                if not self.draining and not (self._tell_again is not None and self._tell_again.active()):
                    self._tell_again = self.reactor.callLater(self.settings.retry_delay, self._tell_unbound)
                return
            self._told_unbound = ports
            self._tell_unbound()  # the state may have changed meanwhile

        self._telling.addBoth(told)

    async def _close_listener(self, route: Route) -> None:
        try:
            await maybeDeferred(self.listeners.close, route)
        except Exception as e:  # noqa: BLE001 - a listener bug must not stop us
            log.warn("closing the listener of {route} failed: {e}", route=route.key, e=e)

    async def _forget(self, key: CRKey) -> bool:
        """The CR is gone: close its listeners; the leader deletes what it made."""
        await self._sync_listeners(key, {})
        self._set_allocations(key, {})
        self.decided.discard(key)
        for route in [r for r in self.bind_failures if (r.namespace, r.cr_name) == key]:
            del self.bind_failures[route]
        self._index_secret(key)
        if not self.leading:
            return True
        fence = self._fence(self.epoch)
        changes = deletion_changes(self._owned(key), self.placement)
        if not changes:
            return True
        result = await self._apply(changes, fence, key)
        if result.failures:
            return self._error(f"cannot clean up after Destination {'/'.join(key)}: {result.failures[0].message}")
        return True

    async def _sweep(self, epoch: int) -> None:
        """Delete managed objects whose CR no longer exists (missed deletions), as the
        caches show them: no requests unless there is something to delete."""
        watched = set(self.settings.watch_namespaces)
        orphans = []
        for kind, store in ((SERVICE, self.service_store), (ENDPOINT_SLICE, self.slice_store), (NETWORK_POLICY, self.policy_store)):
            for obj in store.values():
                cr = store.index_of(obj)
                if cr is None or cr in self.crs or (watched and cr[0] not in watched):
                    continue
                orphans.append(Change("delete", kind, obj["metadata"].get("namespace", ""), obj["metadata"]["name"]))
        # objects without a usable annotation, labelled with a uid no CR has
        live = {(o.get("metadata") or {}).get("uid") for o in self.crs.values()}
        for kind, store in ((SERVICE, self.service_store), (ENDPOINT_SLICE, self.slice_store), (NETWORK_POLICY, self.policy_store)):
            for obj in store.values():
                if store.index_of(obj) is None and (obj["metadata"].get("labels") or {}).get("mailgw.io/destination-uid") not in live:
                    orphans.append(Change("delete", kind, obj["metadata"].get("namespace", ""), obj["metadata"]["name"]))
        if orphans:
            log.info("removing {n} objects whose Destination is gone", n=len(orphans))
            await self._apply(orphans, self._fence(epoch))

    # --- what listeners ask (the data plane) ----------------------------------------------

    def _route_destination(self, route: Route) -> RouteDestination:
        return RouteDestination(route, self.lookup_route, self.exchange_route, self.can_exchange)

    def _cr_for(self, route: Route) -> DestinationCR | None:
        raw = self.crs.get((route.namespace, route.cr_name))
        if raw is None:
            return None
        try:
            return parse_cr(raw)
        except ValueError:
            return None

    def lookup_route(self, route: Route) -> "Deferred[Destination]":
        """The destination of ``route`` now (through the cache, in the data pool)."""
        cr = self._cr_for(route)
        if cr is None or cr.problem is not None:
            return fail(DestinationNotFound(f"Destination {route.namespace}/{route.cr_name} is not available"))
        return self.sources.lookup(cr.instance, cr.namespace, cr.destination_ref or "", route.tenant)

    def can_exchange(self, route: Route) -> bool:
        cr = self._cr_for(route)
        if cr is None:
            return False
        try:
            source = self.sources.source(cr.instance)
        except Exception:  # noqa: BLE001 - unknown instance: no exchange
            return False
        return bool(getattr(source, "exchanges", False))

    def exchange_route(
        self, route: Route, *, refresh_token: str | None = None, code: str | None = None
    ) -> "Deferred[FindResult]":
        cr = self._cr_for(route)
        if cr is None or cr.problem is not None:
            return fail(TokenExchangeFailed(f"Destination {route.namespace}/{route.cr_name} is not available"))
        try:
            source = self.sources.source(cr.instance)
        except Exception as e:  # noqa: BLE001
            return fail(e)
        return source.exchange(
            cr.namespace, cr.destination_ref or "", route.tenant, refresh_token=refresh_token, code=code
        )


__all__ = ["KubeController", "KubeSettings", "Planes"]
