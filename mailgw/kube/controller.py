"""The Kubernetes controller: watches, the resync timer, leader election, listeners.

Three watch loops (each in its own thread) keep the reactor informed: Destination CRs
(cluster-wide), the Services mailgw manages (cluster-wide, by label: allocations made by
the leader reach the other replicas this way) and the gateway's own pods (their ready
IPs go into the EndpointSlices).  Every event, and a timer every ``resync_interval``
seconds, queues the CRs concerned for reconciliation; a CR is never reconciled twice at
the same time, and one queued while in progress runs again afterwards.

Reconciling a CR, on the leader: look its destination(s) up, read what exists, compute a
plan (:func:`mailgw.kube.reconcile.reconcile`), open the listeners of its routes, apply
the plan, write the status and an Event.  On other replicas: open the listeners of the
routes whose Services the leader made.  API errors are logged, turned into the CR's
status where possible, and retried with a backoff; nothing here raises into the reactor.
All blocking API calls run in a private thread pool.

Wiring (twistd ``--kubernetes``)::

    api = KubeApi(load_api_client(), timeout=settings.api_timeout)
    service = KubeController.create(api, listener_manager, settings, reactor)
    service.setServiceParent(multi_service)
"""

from __future__ import annotations

import datetime
import os
import socket
from typing import Any, Callable, Mapping

from attrs import field, frozen
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, fail, maybeDeferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from mailgw.destination import Destination
from mailgw.kube import apply as applier
from mailgw.kube.client import Blocking, KubeApi, KubeApiError
from mailgw.kube.leader import LeaderElector
from mailgw.kube.listeners import IListenerManager, RouteDestination
from mailgw.kube.model import (
    MANAGED_BY,
    MANAGED_BY_LABEL,
    UID_LABEL,
    DestinationCR,
    DestinationNotFound,
    Route,
    parse_cr,
)
from mailgw.kube.reconcile import (
    ENDPOINT_SLICE,
    NETWORK_POLICY,
    SERVICE,
    Change,
    Existing,
    Gateway,
    GatewayPod,
    Plan,
    allocations_from_services,
    deletion_changes,
    failed_plan,
    reconcile,
    route_of_service,
    served_from_existing,
)
from mailgw.kube.sources import CachingSource, FindResult, SourceRegistry
from mailgw.kube.watch import Watcher

log = Logger(namespace="mailgw.kube.controller")

CRKey = tuple[str, str]


def _labels_converter(labels: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(dict(labels).items()))


@frozen
class KubeSettings:
    """Settings of Kubernetes mode (``kubernetes:`` in gateway.yaml, and the pod's env)."""

    gateway_namespace: str = "mailgw-system"
    #: labels of the gateway's pods (EndpointSlices and NetworkPolicies select them)
    pod_labels: tuple[tuple[str, str], ...] = field(
        default=(("app.kubernetes.io/name", "mailgw"),), converter=_labels_converter
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
    #: first retry of a failed reconcile; doubles up to ``resync_interval``
    retry_delay: float = 5.0
    #: destination source used when a CR names no ``destinationServiceInstanceName``
    default_instance: str | None = "secrets"
    #: destination service instances: (instance name, binding Secret name) pairs; the
    #: Secret (clientid, clientsecret, url, uri) lives in the gateway's namespace
    btp_instances: tuple[tuple[str, str], ...] = field(
        default=(), converter=lambda v: tuple(sorted(dict(v).items()))
    )
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
    def gateway(self) -> Gateway:
        return Gateway(self.gateway_namespace, dict(self.pod_labels), self.port_range)

    @property
    def pod_selector(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.pod_labels)


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def ready_pod(obj: Mapping[str, Any]) -> GatewayPod | None:
    """A gateway pod that should receive traffic: Ready, with an IP, not terminating."""
    meta = obj.get("metadata") or {}
    status = obj.get("status") or {}
    if meta.get("deletionTimestamp") or not status.get("podIP"):
        return None
    ready = any(
        isinstance(c, Mapping) and c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )
    return GatewayPod(meta.get("name", ""), status["podIP"]) if ready else None


class KubeController(Service):
    """Reconciles Destination CRs into Services and gateway listeners."""

    name = "kubernetes"

    def __init__(
        self,
        api: KubeApi,
        listeners: IListenerManager,
        sources: SourceRegistry,
        settings: KubeSettings,
        reactor: Any = None,
        blocking: Blocking | None = None,
        now: Callable[[], str] = utc_now,
    ):
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.api = api
        self.listeners = listeners
        self.sources = sources
        self.settings = settings
        self.reactor = reactor
        self.blocking = blocking or Blocking(reactor, maxthreads=settings.threads)
        self.now = now
        self.gateway = settings.gateway

        self.crs: dict[CRKey, dict[str, Any]] = {}
        self.uids: dict[CRKey, str] = {}
        self.owned_services: dict[tuple[str, str], dict[str, Any]] = {}
        self.pods: dict[str, GatewayPod] = {}
        self.allocations: dict[Route, int] = {}
        self.served: dict[CRKey, dict[Route, int]] = {}
        self.unusable_ports: set[int] = set()

        self.synced = {"crs": False, "services": False, "pods": False}
        self._dirty: set[CRKey] = set()
        self._running: dict[CRKey, Deferred[None]] = {}
        self._drain_call: Any = None
        self._retry_calls: dict[CRKey, Any] = {}
        self._failures: dict[CRKey, int] = {}
        self._stopping = False
        self.reconciles = 0  # for tests and metrics

        self.watchers: list[Watcher] = []
        self.elector: LeaderElector | None = None
        self._resync: LoopingCall | None = None
        self._always_leader = not settings.leader_election

    # --- construction helper -----------------------------------------------------------

    @classmethod
    def create(
        cls,
        api: KubeApi,
        listeners: IListenerManager,
        settings: KubeSettings,
        reactor: Any = None,
        extra_sources: Mapping[str, Any] | None = None,
        session_factory: Callable[[], Any] | None = None,
    ) -> "KubeController":
        """A controller with its destination sources: ``secrets``, one ``btp`` source per
        ``settings.btp_instances`` entry (binding Secret in the gateway's namespace), and
        ``extra_sources`` (name -> source, or name -> callable(blocking) -> source); each
        behind a cache of ``settings.cache_ttl`` seconds.  ``session_factory`` makes the
        ``requests`` sessions of the btp sources (tests point it at a fake service)."""
        from mailgw.sources.btp import BtpSource, secret_credentials
        from mailgw.sources.secrets import SecretsSource

        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        blocking = Blocking(reactor, maxthreads=settings.threads)
        raw: dict[str, Any] = {"secrets": SecretsSource(api, blocking)}
        for instance, secret_name in settings.btp_instances:
            kwargs = {"session_factory": session_factory} if session_factory is not None else {}
            raw[instance] = BtpSource(
                secret_credentials(api, settings.gateway_namespace, secret_name),
                blocking, reactor, timeout=settings.api_timeout, **kwargs,
            )
        for name, source in (extra_sources or {}).items():
            raw[name] = source(blocking) if callable(source) and not hasattr(source, "lookup") else source
        sources = SourceRegistry(
            {name: CachingSource(src, settings.cache_ttl, reactor) for name, src in raw.items()},
            default=settings.default_instance,
        )
        return cls(api, listeners, sources, settings, reactor, blocking)

    # --- lifecycle -------------------------------------------------------------------

    @property
    def is_leader(self) -> bool:
        return self._always_leader or (self.elector is not None and self.elector.is_leader)

    @property
    def ready(self) -> bool:
        """The initial lists are in (before that no reconcile runs)."""
        return all(self.synced.values())

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        self.blocking.start()
        s = self.settings
        api = self.api
        managed = f"{MANAGED_BY_LABEL}={MANAGED_BY}"
        self.watchers = [
            Watcher("destinations", api.list_destinations, lambda: api.watch_source("Destination"),
                    self._on_cr_list, self._on_cr_event, self.reactor, s.watch_timeout),
            Watcher("services", lambda: api.list(SERVICE, None, managed),
                    lambda: api.watch_source(SERVICE, None, managed),
                    self._on_service_list, self._on_service_event, self.reactor, s.watch_timeout),
            Watcher("pods", lambda: api.list("Pod", s.gateway_namespace, s.pod_selector),
                    lambda: api.watch_source("Pod", s.gateway_namespace, s.pod_selector),
                    self._on_pod_list, self._on_pod_event, self.reactor, s.watch_timeout),
        ]
        for w in self.watchers:
            w.start()
        if s.leader_election:
            self.elector = LeaderElector(
                api, self.blocking, self.reactor, s.gateway_namespace, s.lease_name, s.identity,
                s.lease_duration, s.renew_deadline, s.retry_period,
                on_started=self._started_leading, on_stopped=self._stopped_leading,
            )
            self.elector.start()
        self._resync = LoopingCall(self.resync)
        self._resync.clock = self.reactor
        self._resync.start(s.resync_interval, now=False)

    def stopService(self) -> "Deferred[None]":
        """Stop watching and reconciling and release leadership.  Listeners stay open:
        draining them is the gateway's shutdown, not the controller's."""
        super().stopService()
        self._stopping = True
        if self._resync is not None and self._resync.running:
            self._resync.stop()
        for call in list(self._retry_calls.values()) + [self._drain_call]:
            if call is not None and call.active():
                call.cancel()
        self._retry_calls.clear()
        steps: list[Deferred[Any]] = [w.stop() for w in self.watchers]
        if self.elector is not None:
            steps.append(self.elector.stop())
        steps.extend(self._running.values())
        d = DeferredList(steps, consumeErrors=True)
        d.addCallback(lambda _: self.blocking.stop())
        d.addCallback(lambda _: None)
        return d

    def _started_leading(self) -> None:
        self.enqueue_all()

    def _stopped_leading(self) -> None:
        pass  # followers keep their listeners; the new leader takes over the writes

    # --- watch callbacks (reactor thread) ----------------------------------------------

    def _remember(self, obj: Mapping[str, Any]) -> CRKey | None:
        meta = obj.get("metadata") or {}
        if not meta.get("namespace") or not meta.get("name"):
            return None
        key = (meta["namespace"], meta["name"])
        self.crs[key] = dict(obj)
        if meta.get("uid"):
            self.uids[key] = meta["uid"]
        return key

    def _on_cr_list(self, items: list[dict[str, Any]]) -> None:
        before = set(self.crs)
        self.crs.clear()
        for obj in items:
            self._remember(obj)
        self.synced["crs"] = True
        for key in before | set(self.crs):
            self.enqueue(key)
        self._kick()

    def _on_cr_event(self, kind: str, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        key = (meta.get("namespace", ""), meta.get("name", ""))
        if kind == "DELETED":
            if self.uids.get(key) in (None, meta.get("uid")):
                self.crs.pop(key, None)
                if meta.get("uid"):
                    self.uids[key] = meta["uid"]
        else:
            self._remember(obj)
        self.enqueue(key)

    def _on_service_list(self, items: list[dict[str, Any]]) -> None:
        self.owned_services = {
            (i["metadata"]["namespace"], i["metadata"]["name"]): i for i in items if i.get("metadata")
        }
        known = allocations_from_services(self.owned_services.values())
        # the leader's own in-memory allocations win over possibly older listings
        for route, port in known.items():
            self.allocations.setdefault(route, port)
        self.synced["services"] = True
        for route in known:
            self.enqueue((route.namespace, route.cr_name))
        self._kick()

    def _on_service_event(self, kind: str, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        key = (meta.get("namespace", ""), meta.get("name", ""))
        if kind == "DELETED":
            self.owned_services.pop(key, None)
        else:
            self.owned_services[key] = obj
        route = route_of_service(obj)
        if route is not None:
            if kind != "DELETED":
                port = allocations_from_services([obj]).get(route)
                if port is not None and not self.is_leader:
                    self.allocations[route] = port
            self.enqueue((route.namespace, route.cr_name))

    def _on_pod_list(self, items: list[dict[str, Any]]) -> None:
        pods = {}
        for obj in items:
            pod = ready_pod(obj)
            if pod is not None:
                pods[pod.name] = pod
        self._set_pods(pods)
        self.synced["pods"] = True
        self._kick()

    def _on_pod_event(self, kind: str, obj: dict[str, Any]) -> None:
        pods = dict(self.pods)
        name = (obj.get("metadata") or {}).get("name", "")
        pod = ready_pod(obj) if kind != "DELETED" else None
        if pod is None:
            pods.pop(name, None)
        else:
            pods[name] = pod
        self._set_pods(pods)

    def _set_pods(self, pods: dict[str, GatewayPod]) -> None:
        if pods != self.pods:
            self.pods = pods
            if self.is_leader:
                self.enqueue_all()

    # --- the queue ---------------------------------------------------------------------

    def enqueue(self, key: CRKey) -> None:
        if self._stopping:
            return
        self._dirty.add(key)
        self._kick()

    def enqueue_all(self) -> None:
        for key in set(self.crs) | set(self.served):
            self.enqueue(key)

    def _kick(self) -> None:
        if self._drain_call is None or not self._drain_call.active():
            self._drain_call = self.reactor.callLater(0, self._drain)

    def _drain(self) -> None:
        if self._stopping or not self.ready:
            return
        for key in sorted(self._dirty - set(self._running)):
            self._dirty.discard(key)
            d = Deferred.fromCoroutine(self._reconcile(key))
            self._running[key] = d
            d.addErrback(lambda f, key=key: log.failure("reconciling {key} failed", f, key="/".join(key)))
            d.addBoth(self._finished, key)

    def _finished(self, _: Any, key: CRKey) -> None:
        self._running.pop(key, None)
        if key in self._dirty:
            self._kick()

    def _retry_later(self, key: CRKey) -> None:
        n = self._failures.get(key, 0)
        self._failures[key] = n + 1
        delay = min(self.settings.retry_delay * (2**n), self.settings.resync_interval)
        old = self._retry_calls.pop(key, None)
        if old is not None and old.active():
            old.cancel()
        if not self._stopping:
            self._retry_calls[key] = self.reactor.callLater(delay, self.enqueue, key)

    def _succeeded(self, key: CRKey) -> None:
        self._failures.pop(key, None)
        call = self._retry_calls.pop(key, None)
        if call is not None and call.active():
            call.cancel()

    def resync(self) -> "Deferred[None]":
        """Queue every CR again, and (leader) remove objects whose CR is gone."""
        self.unusable_ports.clear()
        self.enqueue_all()
        if not (self.is_leader and self.ready):
            return succeed(None)
        d = Deferred.fromCoroutine(self._sweep())
        # the timer must survive anything the sweep runs into
        d.addErrback(lambda f: log.failure("resync sweep failed", f))
        return d

    # --- reconciling (reactor thread; blocking work in the pool) ---------------------------

    async def _reconcile(self, key: CRKey) -> None:
        self.reconciles += 1
        raw = self.crs.get(key)
        if raw is None:
            await self._forget(key)
            return
        try:
            cr = parse_cr(raw)
        except ValueError as e:
            log.warn("ignoring malformed Destination object {key}: {e}", key="/".join(key), e=e)
            return
        if self.is_leader:
            await self._reconcile_as_leader(cr)
        else:
            routes = served_from_existing(
                cr,
                Existing(services={
                    name: svc for (ns, name), svc in self.owned_services.items() if ns == cr.namespace
                }),
            )
            failed = await self._sync_listeners(cr.key, routes)
            if failed:
                self._retry_later(cr.key)

    async def _lookups(self, cr: DestinationCR) -> dict[str | None, Any]:
        if cr.problem is not None:
            return {}
        routes = cr.routes()
        results = await DeferredList(
            [self.sources.lookup(cr.instance, cr.namespace, cr.destination_ref or "", r.tenant) for r in routes],
            consumeErrors=True,
        )
        return {
            route.tenant: (value if ok else value.value)
            for route, (ok, value) in zip(routes, results)
        }

    async def _reconcile_as_leader(self, cr: DestinationCR) -> None:
        key = cr.key
        lookups = await self._lookups(cr)
        names = [r.service_name for r in cr.routes()]
        try:
            existing = await self.blocking(
                applier.read_existing, self.api, cr, names, self.gateway.namespace
            )
        except KubeApiError as e:
            log.warn("cannot read the objects of Destination {key}: {e}", key="/".join(key), e=str(e))
            self._retry_later(key)
            return
        if self.crs.get(key, {}).get("metadata", {}).get("uid") != cr.uid:
            self.enqueue(key)  # the CR changed or went while we read: start over
            return

        plan = self._plan(cr, lookups, existing)
        for _ in range(3):  # a port this pod cannot bind moves elsewhere
            failed_ports = await self._sync_listeners(key, plan.routes)
            if not failed_ports:
                break
            self.unusable_ports.update(failed_ports)
            plan = self._plan(cr, lookups, existing)

        result = await self.blocking(applier.apply_changes, self.api, plan.changes)
        for change, message in result.failures:
            log.warn("Destination {key}: {message}", key="/".join(key), message=message)
        if result.failures:
            plan = failed_plan(plan, cr, result.failures, self.now())
        # record this CR's allocations (others read them back from the Services)
        for route in [r for r in self.allocations if (r.namespace, r.cr_name) == key]:
            if route not in plan.routes:
                del self.allocations[route]
        self.allocations.update(plan.routes)

        ok = not result.failures
        if plan.status_patch is not None:
            try:
                updated = await self.blocking(
                    self.api.patch_destination_status, cr.namespace, cr.name, plan.status_patch
                )
                # remember the written status unless a newer version arrived meanwhile
                current = self.crs.get(key)
                if (
                    current is not None
                    and isinstance(updated, dict)
                    and (current.get("metadata") or {}).get("resourceVersion") == cr.resource_version
                ):
                    self.crs[key] = updated
            except KubeApiError as e:
                ok = False
                log.warn("cannot write the status of Destination {key}: {e}", key="/".join(key), e=str(e))
        if plan.event is not None:
            await self._record_event(cr, plan)
        if plan.problems:
            for route, problem in plan.problems.items():
                log.info(
                    "Destination {key}{tenant}: {reason}: {message}", key="/".join(key),
                    tenant=f" tenant {route.tenant}" if route is not None and route.tenant else "",
                    reason=problem.reason, message=problem.message,
                )
        if ok:
            self._succeeded(key)
        else:
            self._retry_later(key)

    def _plan(self, cr: DestinationCR, lookups: Mapping[str | None, Any], existing: Existing) -> Plan:
        pods = sorted(self.pods.values(), key=lambda p: p.name)
        return reconcile(
            cr, lookups, existing, self.allocations, pods, self.gateway, self.now(), self.unusable_ports
        )

    async def _sync_listeners(self, key: CRKey, routes: Mapping[Route, int]) -> set[int]:
        """Make this pod's listeners for ``key`` match ``routes``; the ports that failed."""
        current = self.served.setdefault(key, {})
        for route, port in list(current.items()):
            if routes.get(route) != port:
                del current[route]
                try:
                    await maybeDeferred(self.listeners.close, route)
                except Exception as e:  # noqa: BLE001 - a listener bug must not stop us
                    log.warn("closing the listener of {route} failed: {e}", route=route.key, e=e)
        failed: set[int] = set()
        for route, port in sorted(routes.items()):
            if current.get(route) == port:
                continue
            try:
                await maybeDeferred(self.listeners.open, route, port, self._route_destination(route))
            except Exception as e:  # noqa: BLE001
                log.warn("cannot listen on port {port} for {route}: {e}", port=port, route=route.key, e=e)
                failed.add(port)
            else:
                current[route] = port
        if not current:
            self.served.pop(key, None)
        return failed

    async def _forget(self, key: CRKey) -> None:
        """The CR is gone: close its listeners; the leader deletes what it made."""
        await self._sync_listeners(key, {})
        for route in [r for r in self.allocations if (r.namespace, r.cr_name) == key]:
            del self.allocations[route]
        uid = self.uids.get(key)
        if not self.is_leader or uid is None:
            return
        try:
            existing = await self.blocking(applier.read_owned_by_uid, self.api, key[0], uid, self.gateway.namespace)
            result = await self.blocking(applier.apply_changes, self.api, deletion_changes(existing, self.gateway))
        except KubeApiError as e:
            log.warn("cannot clean up after Destination {key}: {e}", key="/".join(key), e=str(e))
            self._retry_later(key)
            return
        if result.failures:
            self._retry_later(key)
            return
        if key not in self.crs:
            self.uids.pop(key, None)
        self._succeeded(key)

    async def _sweep(self) -> None:
        """Delete managed objects whose CR no longer exists (missed deletions)."""
        managed = f"{MANAGED_BY_LABEL}={MANAGED_BY}"

        def read() -> list[tuple[str, dict[str, Any]]]:
            found = []
            for kind, namespace in ((SERVICE, None), (ENDPOINT_SLICE, None), (NETWORK_POLICY, self.gateway.namespace)):
                items, _ = self.api.list(kind, namespace, managed)
                found.extend((kind, i) for i in items)
            return found

        try:
            found = await self.blocking(read)
        except KubeApiError as e:
            log.warn("resync sweep: {e}", e=str(e))
            return
        if not self.ready or not self.is_leader:
            return
        # computed after the read: a CR that appeared meanwhile is not swept
        live = {uid for key, uid in self.uids.items() if key in self.crs}
        orphans = [
            Change("delete", kind, obj["metadata"].get("namespace", ""), obj["metadata"]["name"])
            for kind, obj in found
            if (obj["metadata"].get("labels") or {}).get(UID_LABEL) not in live
        ]
        if orphans:
            log.info("removing {n} objects whose Destination is gone", n=len(orphans))
            await self.blocking(applier.apply_changes, self.api, orphans)

    async def _record_event(self, cr: DestinationCR, plan: Plan) -> None:
        event = plan.event
        assert event is not None
        stamp = self.now()
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{cr.name}.", "namespace": cr.namespace},
            "involvedObject": {
                "apiVersion": "destination.connectivity.api.sap/v1",
                "kind": "Destination",
                "name": cr.name,
                "namespace": cr.namespace,
                "uid": cr.uid,
                "resourceVersion": cr.resource_version,
            },
            "reason": event.reason,
            "message": event.message[:1024],
            "type": event.type,
            "source": {"component": "mailgw"},
            "reportingComponent": "mailgw",
            "reportingInstance": self.settings.identity,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        try:
            await self.blocking(self.api.create_event, cr.namespace, body)
        except KubeApiError as e:
            log.warn("cannot record an event on Destination {key}: {e}", key="/".join(cr.key), e=str(e))

    # --- what listeners ask ----------------------------------------------------------------

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
        """The destination of ``route`` now (through the cache)."""
        cr = self._cr_for(route)
        if cr is None or cr.problem is not None:
            return fail(DestinationNotFound(f"Destination {route.namespace}/{route.cr_name} is not available"))
        return self.sources.lookup(cr.instance, cr.namespace, cr.destination_ref or "", route.tenant)

    def can_exchange(self, route: Route) -> bool:
        from mailgw.kube.sources import ITokenExchange

        cr = self._cr_for(route)
        if cr is None:
            return False
        try:
            source = self.sources.source(cr.instance)
        except Exception:
            return False
        inner = getattr(source, "source", source)
        return ITokenExchange.providedBy(inner)

    def exchange_route(
        self, route: Route, *, refresh_token: str | None = None, code: str | None = None
    ) -> "Deferred[FindResult]":
        from mailgw.kube.sources import TokenExchangeFailed

        cr = self._cr_for(route)
        if cr is None or cr.problem is not None:
            return fail(TokenExchangeFailed(f"Destination {route.namespace}/{route.cr_name} is not available"))
        try:
            source = self.sources.source(cr.instance)
        except Exception as e:
            return fail(e)
        return source.exchange(
            cr.namespace, cr.destination_ref or "", route.tenant, refresh_token=refresh_token, code=code
        )


__all__ = ["KubeController", "KubeSettings"]
