"""Blocking access to the Kubernetes API through the ``kubernetes`` client.

:class:`KubeApi` methods take and return plain JSON objects (dicts as the API server sends
them, camelCase keys) and raise only :class:`KubeApiError`; they block, so callers run
them in a :class:`~mailgw.blocking.BlockingPool` (never on the reactor thread).  Every
call carries a timeout and is counted in ``mailgw_kube_api_requests_total``.

Each *plane* of Kubernetes mode (session lookups, the leader election, the reconciles)
gets a :meth:`KubeApi.clone` of its own: its own connection pool, and a budget each of
its calls keeps to in all, so a slow call of one plane never holds a connection another
one waits for, and a write ends when the leadership it began under may.
"""

from __future__ import annotations

import copy
import json
from typing import Any, Callable, Mapping, TypeVar

import urllib3
from kubernetes import client as k8s

from mailgw import __version__, metrics
from mailgw.kube.model import GROUP, PLURAL, VERSION

T = TypeVar("T")

MERGE_PATCH = "application/merge-patch+json"
#: What a metadata-only list or watch asks for (as client-go's metadata informers do):
#: the objects' metadata without their data (Secrets, here).
METADATA_LIST = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1,application/json"
METADATA_WATCH = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1,application/json"


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


def count_request(verb: str, resource: str, code: int | str | None) -> None:
    metrics.KUBE_API_REQUESTS.labels(verb, resource, str(code) if code is not None else "error").inc()


#: kind -> (api attribute, namespaced suffix, all-namespaces suffix, resource)
_KINDS = {
    "Service": ("core", "namespaced_service", "service_for_all_namespaces", "services"),
    "EndpointSlice": ("discovery", "namespaced_endpoint_slice", "endpoint_slice_for_all_namespaces", "endpointslices"),
    "NetworkPolicy": ("networking", "namespaced_network_policy", "network_policy_for_all_namespaces", "networkpolicies"),
    "Secret": ("core", "namespaced_secret", "secret_for_all_namespaces", "secrets"),
    "Pod": ("core", "namespaced_pod", "pod_for_all_namespaces", "pods"),
    "Lease": ("coordination", "namespaced_lease", "lease_for_all_namespaces", "leases"),
    "Event": ("core", "namespaced_event", "event_for_all_namespaces", "events"),
}


def resource_of(kind: str) -> str:
    return PLURAL if kind == "Destination" else _KINDS[kind][3]


class KubeApi:
    """Blocking calls; JSON objects in and out; only :class:`KubeApiError` raised."""

    def __init__(self, api_client: k8s.ApiClient, timeout: float = 10.0, connect_timeout: float = 5.0):
        self.api_client = api_client
        self.core = k8s.CoreV1Api(api_client)
        self.discovery = k8s.DiscoveryV1Api(api_client)
        self.networking = k8s.NetworkingV1Api(api_client)
        self.coordination = k8s.CoordinationV1Api(api_client)
        self.custom = k8s.CustomObjectsApi(api_client)
        #: seconds an answer may take
        self.timeout_seconds = timeout
        #: each call's ``_request_timeout``: (connect, read) seconds, or a clone's total
        self.timeout: float | tuple[float, float] = (connect_timeout, timeout)

    def clone(self, budget: float) -> "KubeApi":
        """The same server and identity over a connection pool of its own, whose calls
        take at most ``budget`` seconds each, connect and answer together, and are never
        retried behind the caller's back: urllib3's default (the client leaves
        ``retries`` unset) retries a failed connect for every verb and a failed read for
        DELETE and PUT, each attempt with the whole timeout again."""
        configuration = copy.copy(self.api_client.configuration)
        configuration.retries = False
        fresh = k8s.ApiClient(configuration)
        fresh.user_agent = self.api_client.user_agent
        plane = KubeApi(fresh, timeout=budget)
        plane.timeout = float(budget)
        return plane

    # --- plumbing -------------------------------------------------------------------

    def _call(self, verb: str, kind: str, what: str, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` (an API method called with ``_preload_content=False``), count it,
        and return the decoded JSON answer."""
        resource = resource_of(kind)
        try:
            resp = fn()
        except k8s.ApiException as e:
            count_request(verb, resource, e.status or None)
            message, reason = describe_api_exception(e)
            raise KubeApiError(f"{what}: {e.status} {reason or ''} {message}".strip(), e.status, reason) from None
        except (urllib3.exceptions.HTTPError, OSError, ValueError) as e:
            count_request(verb, resource, None)
            raise KubeApiError(f"{what}: {type(e).__name__}: {str(e)[:200]}") from None
        count_request(verb, resource, getattr(resp, "status", 200))
        try:
            return json.loads(resp.data)
        except ValueError:
            raise KubeApiError(f"{what}: the answer is not JSON") from None
        finally:
            resp.release_conn()

    def _method(self, kind: str, verb: str, scope: str = "namespaced") -> Callable[..., Any]:
        api_name, namespaced, all_ns, _ = _KINDS[kind]
        suffix = namespaced if scope == "namespaced" else all_ns
        return getattr(getattr(self, api_name), f"{verb}_{suffix}")

    # --- generic, by kind ---------------------------------------------------------

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        try:
            return self._call("get", kind, f"get {kind} {namespace}/{name}", lambda: self._method(kind, "read")(
                name, namespace, _preload_content=False, _request_timeout=self.timeout))
        except KubeApiError as e:
            if e.not_found:
                return None
            raise

    def list(
        self, kind: str, namespace: str | None = None, label_selector: str | None = None,
        field_selector: str | None = None, metadata_only: bool = False,
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Items and the list's resourceVersion (all namespaces when ``namespace`` is None)."""
        fn, kwargs = self._lister(kind, namespace)
        kwargs.update(self._list_kwargs(label_selector, field_selector, metadata_only, METADATA_LIST))
        return _items(self._call("list", kind, f"list {kind} in {namespace or 'all namespaces'}", lambda: fn(
            **kwargs, _preload_content=False, _request_timeout=self.timeout)))

    def _lister(self, kind: str, namespace: str | None) -> tuple[Callable[..., Any], dict[str, Any]]:
        """The API method listing ``kind`` in ``namespace`` (None: all namespaces) and the
        keyword arguments that say what it lists: the same for a list and a watch."""
        if kind == "Destination":
            what = dict(group=GROUP, version=VERSION, plural=PLURAL)
            if namespace is None:
                return self.custom.list_cluster_custom_object, what
            return self.custom.list_namespaced_custom_object, dict(what, namespace=namespace)
        if namespace is None:
            return self._method(kind, "list", "all"), {}
        return self._method(kind, "list"), {"namespace": namespace}

    @staticmethod
    def _list_kwargs(label_selector: str | None, field_selector: str | None, metadata_only: bool, accept: str) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        if label_selector:
            kwargs["label_selector"] = label_selector
        if field_selector:
            kwargs["field_selector"] = field_selector
        if metadata_only:
            kwargs["_headers"] = {"Accept": accept}
        return kwargs

    def create(self, kind: str, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return self._call(
            "create", kind, f"create {kind} {namespace}/{(body.get('metadata') or {}).get('name')}",
            lambda: self._method(kind, "create")(
                namespace, dict(body), _preload_content=False, _request_timeout=self.timeout),
        )

    def patch(self, kind: str, namespace: str, name: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        """JSON merge patch (RFC 7386)."""
        return self._call(
            "patch", kind, f"patch {kind} {namespace}/{name}",
            lambda: self._method(kind, "patch")(
                name, namespace, dict(patch), _content_type=MERGE_PATCH,
                _preload_content=False, _request_timeout=self.timeout),
        )

    def replace(self, kind: str, namespace: str, name: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """PUT; fails with 409 when ``body``'s resourceVersion is not the current one."""
        return self._call(
            "update", kind, f"replace {kind} {namespace}/{name}",
            lambda: self._method(kind, "replace")(
                name, namespace, dict(body), _preload_content=False, _request_timeout=self.timeout),
        )

    def delete(self, kind: str, namespace: str, name: str) -> bool:
        """Delete; False when it did not exist."""
        try:
            self._call("delete", kind, f"delete {kind} {namespace}/{name}", lambda: self._method(kind, "delete")(
                name, namespace, _preload_content=False, _request_timeout=self.timeout))
            return True
        except KubeApiError as e:
            if e.not_found:
                return False
            raise

    # --- Destination custom resources -----------------------------------------------

    def patch_destination_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> dict[str, Any]:
        """Merge-patch the status subresource."""
        return self._call(
            "patch", "Destination", f"patch status of Destination {namespace}/{name}",
            lambda: self.custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, PLURAL, name, {"status": dict(status)},
                _content_type=MERGE_PATCH, _preload_content=False, _request_timeout=self.timeout),
        )

    # --- what the watch loop calls ----------------------------------------------------

    def watch_source(
        self, kind: str, namespace: str | None = None, label_selector: str | None = None,
        field_selector: str | None = None, metadata_only: bool = False,
    ) -> tuple[Callable[..., Any], dict[str, Any]]:
        """``(list function, kwargs)`` for :class:`kubernetes.watch.Watch.stream`."""
        fn, kwargs = self._lister(kind, namespace)
        kwargs.update(self._list_kwargs(label_selector, field_selector, metadata_only, METADATA_WATCH))
        return fn, kwargs


def _items(result: Any) -> tuple[list[dict[str, Any]], str | None]:
    if not isinstance(result, Mapping):
        raise KubeApiError("list: the answer is not a JSON object")
    items = result.get("items") or []
    meta = result.get("metadata") or {}
    rv = meta.get("resourceVersion") if isinstance(meta, Mapping) else None
    return [i for i in items if isinstance(i, dict)], (str(rv) if rv is not None else None)


def user_agent(identity: str) -> str:
    """Who writes: the API server's audit log and the tests' fake tell replicas apart."""
    return f"mailgw/{__version__} ({identity})"


def load_api_client(kubeconfig: str | None = None, context: str | None = None, identity: str | None = None) -> k8s.ApiClient:
    """In-cluster configuration when running in a pod, else a kubeconfig (local runs)."""
    from kubernetes import config

    configuration = k8s.Configuration()
    loaded = False
    if kubeconfig is None:
        try:
            config.load_incluster_config(client_configuration=configuration)
            loaded = True
        except config.ConfigException:
            pass
    if not loaded:
        config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=configuration)
    # the watches hold connections for minutes; the planes must not wait for a free one
    configuration.connection_pool_maxsize = 16
    # every caller decides itself whether to try again (the watch loop, the work queue)
    configuration.retries = False
    api_client = k8s.ApiClient(configuration)
    if identity:
        api_client.user_agent = user_agent(identity)
    return api_client
