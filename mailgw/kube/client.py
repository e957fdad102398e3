"""Blocking access to the Kubernetes API through the ``kubernetes`` client, and the thread
pool that keeps it off the reactor.

:class:`KubeApi` methods take and return plain JSON objects (dicts as the API server sends
them, camelCase keys) and raise only :class:`KubeApiError`; they block, so they are called
through :class:`Blocking`, which runs them in a private thread pool and hands the result
back as a Deferred.  Every call carries a timeout.
"""

from __future__ import annotations

import json
import threading
from typing import Any, Callable, Mapping, TypeVar

import urllib3
from kubernetes import client as k8s
from twisted.internet import threads
from twisted.internet.defer import Deferred, fail
from twisted.python.threadpool import ThreadPool

from mailgw.kube.model import GROUP, PLURAL, VERSION

T = TypeVar("T")

MERGE_PATCH = "application/merge-patch+json"


class KubeApiError(Exception):
    """An API call failed.  ``status`` is the HTTP status, or None when there was no
    answer (connection refused, timeout).  The message is safe to log."""

    def __init__(self, message: str, status: int | None = None, reason: str | None = None):
        super().__init__(message)
        self.status = status
        self.reason = reason

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def conflict(self) -> bool:
        return self.status == 409


def describe_api_exception(e: k8s.ApiException) -> tuple[str, str | None]:
    """Message and reason of an ApiException, from its Status body when there is one."""
    reason = None
    message = str(e.reason or "")
    body = getattr(e, "body", None)
    if body:
        try:
            status = json.loads(body)
            if isinstance(status, Mapping):
                message = str(status.get("message") or message)[:300]
                reason = status.get("reason")
        except (ValueError, TypeError):
            pass
    return message, reason


def _wrap(what: str, fn: Callable[[], T]) -> T:
    try:
        return fn()
    except k8s.ApiException as e:
        message, reason = describe_api_exception(e)
        raise KubeApiError(f"{what}: {e.status} {reason or ''} {message}".strip(), e.status, reason) from None
    except (urllib3.exceptions.HTTPError, OSError, ValueError) as e:
        raise KubeApiError(f"{what}: {type(e).__name__}: {str(e)[:200]}") from None


def _json(resp: Any) -> Any:
    try:
        return json.loads(resp.data)
    finally:
        resp.release_conn()


#: kind -> (api attribute, create, patch, delete, read, list namespaced, list all)
_KINDS = {
    "Service": ("core", "namespaced_service", "service_for_all_namespaces"),
    "EndpointSlice": ("discovery", "namespaced_endpoint_slice", "endpoint_slice_for_all_namespaces"),
    "NetworkPolicy": ("networking", "namespaced_network_policy", "network_policy_for_all_namespaces"),
    "Secret": ("core", "namespaced_secret", "secret_for_all_namespaces"),
    "Pod": ("core", "namespaced_pod", "pod_for_all_namespaces"),
    "Lease": ("coordination", "namespaced_lease", "lease_for_all_namespaces"),
}


class KubeApi:
    """Blocking calls; JSON objects in and out; only :class:`KubeApiError` raised."""

    def __init__(self, api_client: k8s.ApiClient, timeout: float = 10.0, connect_timeout: float = 5.0):
        self.api_client = api_client
        self.core = k8s.CoreV1Api(api_client)
        self.discovery = k8s.DiscoveryV1Api(api_client)
        self.networking = k8s.NetworkingV1Api(api_client)
        self.coordination = k8s.CoordinationV1Api(api_client)
        self.custom = k8s.CustomObjectsApi(api_client)
        self.timeout = (connect_timeout, timeout)

    # --- generic, by kind ---------------------------------------------------------

    def _method(self, kind: str, verb: str, scope: str = "namespaced") -> Callable[..., Any]:
        api_name, namespaced, all_ns = _KINDS[kind]
        suffix = namespaced if scope == "namespaced" else all_ns
        return getattr(getattr(self, api_name), f"{verb}_{suffix}")

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        try:
            return _wrap(
                f"get {kind} {namespace}/{name}",
                lambda: _json(self._method(kind, "read")(
                    name, namespace, _preload_content=False, _request_timeout=self.timeout)),
            )
        except KubeApiError as e:
            if e.not_found:
                return None
            raise

    def list(
        self, kind: str, namespace: str | None = None, label_selector: str | None = None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Items and the list's resourceVersion (all namespaces when ``namespace`` is None)."""
        kwargs: dict[str, Any] = dict(_preload_content=False, _request_timeout=self.timeout)
        if label_selector:
            kwargs["label_selector"] = label_selector
        where = namespace or "all namespaces"
        if namespace is None:
            result = _wrap(f"list {kind} in {where}", lambda: _json(self._method(kind, "list", "all")(**kwargs)))
        else:
            result = _wrap(
                f"list {kind} in {where}", lambda: _json(self._method(kind, "list")(namespace, **kwargs))
            )
        return _items(result)

    def create(self, kind: str, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return _wrap(
            f"create {kind} {namespace}/{(body.get('metadata') or {}).get('name')}",
            lambda: _json(self._method(kind, "create")(
                namespace, dict(body), _preload_content=False, _request_timeout=self.timeout)),
        )

    def patch(self, kind: str, namespace: str, name: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        """JSON merge patch (RFC 7386)."""
        return _wrap(
            f"patch {kind} {namespace}/{name}",
            lambda: _json(self._method(kind, "patch")(
                name, namespace, dict(patch), _content_type=MERGE_PATCH,
                _preload_content=False, _request_timeout=self.timeout)),
        )

    def replace(self, kind: str, namespace: str, name: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """PUT; fails with 409 when ``body``'s resourceVersion is not the current one."""
        return _wrap(
            f"replace {kind} {namespace}/{name}",
            lambda: _json(self._method(kind, "replace")(
                name, namespace, dict(body), _preload_content=False, _request_timeout=self.timeout)),
        )

    def delete(self, kind: str, namespace: str, name: str) -> bool:
        """Delete; False when it did not exist."""
        try:
            _wrap(
                f"delete {kind} {namespace}/{name}",
                lambda: _json(self._method(kind, "delete")(
                    name, namespace, _preload_content=False, _request_timeout=self.timeout)),
            )
            return True
        except KubeApiError as e:
            if e.not_found:
                return False
            raise

    # --- Destination custom resources -----------------------------------------------

    def list_destinations(self) -> tuple[list[dict[str, Any]], str | None]:
        result = _wrap(
            "list Destinations",
            lambda: _json(self.custom.list_cluster_custom_object(
                GROUP, VERSION, PLURAL, _preload_content=False, _request_timeout=self.timeout)),
        )
        return _items(result)

    def get_destination(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return _wrap(
                f"get Destination {namespace}/{name}",
                lambda: _json(self.custom.get_namespaced_custom_object(
                    GROUP, VERSION, namespace, PLURAL, name,
                    _preload_content=False, _request_timeout=self.timeout)),
            )
        except KubeApiError as e:
            if e.not_found:
                return None
            raise

    def patch_destination_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> dict[str, Any]:
        """Merge-patch the status subresource."""
        return _wrap(
            f"patch status of Destination {namespace}/{name}",
            lambda: _json(self.custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, PLURAL, name, {"status": dict(status)},
                _content_type=MERGE_PATCH, _preload_content=False, _request_timeout=self.timeout)),
        )

    # --- events -----------------------------------------------------------------------

    def create_event(self, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return _wrap(
            f"create Event in {namespace}",
            lambda: _json(self.core.create_namespaced_event(
                namespace, dict(body), _preload_content=False, _request_timeout=self.timeout)),
        )

    # --- what the watch loop calls ----------------------------------------------------

    def watch_source(self, kind: str, namespace: str | None = None, label_selector: str | None = None):
        """``(list function, kwargs)`` for :class:`kubernetes.watch.Watch.stream`."""
        kwargs: dict[str, Any] = {}
        if label_selector:
            kwargs["label_selector"] = label_selector
        if kind == "Destination":
            return self.custom.list_cluster_custom_object, dict(group=GROUP, version=VERSION, plural=PLURAL)
        if namespace is None:
            return self._method(kind, "list", "all"), kwargs
        return self._method(kind, "list"), dict(kwargs, namespace=namespace)


def _items(result: Any) -> tuple[list[dict[str, Any]], str | None]:
    if not isinstance(result, Mapping):
        raise KubeApiError("list: the answer is not a JSON object")
    items = result.get("items") or []
    meta = result.get("metadata") or {}
    rv = meta.get("resourceVersion") if isinstance(meta, Mapping) else None
    return [i for i in items if isinstance(i, dict)], (str(rv) if rv is not None else None)


class Blocking:
    """Runs blocking callables in a private thread pool; results come back as Deferreds.

    The pool is the controller's own: the reactor's pool also resolves host names and is
    joined at shutdown, so slow API calls must not sit in it.
    """

    def __init__(self, reactor: Any, name: str = "mailgw-kube", maxthreads: int = 4):
        self.reactor = reactor
        self.pool = ThreadPool(minthreads=0, maxthreads=maxthreads, name=name)
        self.started = False

    def start(self) -> None:
        if not self.started:
            self.pool.start()
            self.started = True

    def stop(self) -> "Deferred[None]":
        """Stop the pool without blocking the reactor: joining the workers waits for
        calls in progress (each bounded by its timeout), so it happens in a helper thread."""
        done: Deferred[None] = Deferred()
        if not self.started:
            done.callback(None)
            return done
        self.started = False

        def join() -> None:
            self.pool.stop()
            self.reactor.callFromThread(done.callback, None)

        threading.Thread(target=join, name="mailgw-kube-pool-stop", daemon=True).start()
        return done

    def __call__(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> "Deferred[T]":
        if not self.started:
            # a stopped pool would queue the call forever: fail at once instead
            return fail(KubeApiError("the Kubernetes client is not running (starting up or shut down)"))
        return threads.deferToThreadPool(self.reactor, self.pool, fn, *args, **kwargs)


def load_api_client(kubeconfig: str | None = None, context: str | None = None) -> k8s.ApiClient:
    """In-cluster configuration when running in a pod, else a kubeconfig (local runs)."""
    from kubernetes import config

    configuration = k8s.Configuration()
    if kubeconfig is None:
        try:
            config.load_incluster_config(client_configuration=configuration)
            return k8s.ApiClient(configuration)
        except config.ConfigException:
            pass
    config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=configuration)
    return k8s.ApiClient(configuration)
