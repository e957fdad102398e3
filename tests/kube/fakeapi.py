"""An in-process fake Kubernetes API server for the real ``kubernetes`` client.

It listens on 127.0.0.1 (a threaded ``http.server``) and implements what mailgw uses:
namespaced and cluster-wide list, get, create, replace, patch (merge, strategic as merge,
JSON patch) and delete of Services, EndpointSlices, NetworkPolicies, Secrets, Pods,
Events, Leases and Destination custom resources (with the ``status`` subresource and
validation against the CRD's openAPIV3Schema from ``k8s/crd.yaml``), label and
``metadata.name`` field selectors, and watch: ``?watch=true&resourceVersion=N
&allowWatchBookmarks=true&timeoutSeconds=T`` streams newline-delimited JSON events from a
history.  Deleting an object deletes its dependents (ownerReferences, same namespace).

A list or watch whose Accept header asks for ``as=PartialObjectMetadata(List)`` gets the
objects' metadata only, as the real API server answers client-go's metadata informers.

Test controls: :meth:`FakeKubeAPI.expire` compacts the history (old versions answer
``410 Gone``, open watches get an ERROR event with code 410), :meth:`bookmark` sends a
BOOKMARK to open watches, :meth:`close_watches` ends open streams, :meth:`fault` makes
chosen calls (optionally of one client, by User-Agent) fail with a status or stall.

Bookkeeping: :attr:`FakeKubeAPI.writes` records every write with the time it arrived and
the writer's User-Agent (who wrote what, and when), :meth:`FakeKubeAPI.tally` counts
requests per verb and resource (for the benchmark), leaving out watches and Lease calls
on request.
"""

from __future__ import annotations

import bisect
import collections
import copy
import datetime
import json
import os
import re
import select
import socket
import threading
import time
import urllib.parse
import uuid
from typing import Any

import yaml

from support.httpserver import HTTPService, JSONHandler

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CRD_PATH = os.path.join(ROOT, "k8s", "crd.yaml")

CR_GROUP = "destination.connectivity.api.sap"

#: (group, version, plural) -> kind
RESOURCES = {
    ("", "v1", "services"): "Service",
    ("", "v1", "secrets"): "Secret",
    ("", "v1", "pods"): "Pod",
    ("", "v1", "events"): "Event",
    ("", "v1", "configmaps"): "ConfigMap",
    ("discovery.k8s.io", "v1", "endpointslices"): "EndpointSlice",
    ("networking.k8s.io", "v1", "networkpolicies"): "NetworkPolicy",
    ("coordination.k8s.io", "v1", "leases"): "Lease",
    ("events.k8s.io", "v1", "events"): "Event",
    (CR_GROUP, "v1", "destinations"): "Destination",
}
WITH_STATUS = {(CR_GROUP, "v1", "destinations")}


def load_crd_schema(path: str = CRD_PATH) -> dict[str, Any]:
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    crd = next(d for d in docs if d.get("kind") == "CustomResourceDefinition")
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


_TYPES = {
    "object": dict,
    "array": list,
    "string": str,
    "boolean": bool,
    "integer": int,
    "number": (int, float),
}


def validate(schema: dict[str, Any], value: Any, path: str = "") -> list[str]:
    """A minimal structural OpenAPI v3 check: type, required, properties, items, enum,
    minimum/maximum, minLength/maxLength, pattern.  Applies ``default``s in place.
    Returns the list of problems (empty when valid)."""
    errors: list[str] = []
    where = path or "<root>"
    kind = schema.get("type")
    if kind:
        expected = _TYPES[kind]
        if isinstance(value, bool) and kind in ("integer", "number"):
            return [f"{where}: must be {kind}"]
        if not isinstance(value, expected):
            return [f"{where}: must be {kind}, not {type(value).__name__}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: must be one of {schema['enum']}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{where}: must be >= {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(f"{where}: must be <= {schema['maximum']}")
    if isinstance(value, str):
        if "minLength" in schema and len(value) < schema["minLength"]:
            errors.append(f"{where}: shorter than {schema['minLength']}")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errors.append(f"{where}: longer than {schema['maxLength']}")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{where}: does not match {schema['pattern']}")
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                errors.append(f"{where}: {key} is required")
        props = schema.get("properties", {})
        for key, sub in props.items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
        for key, item in value.items():
            if key in props:
                errors.extend(validate(props[key], item, f"{path}.{key}" if path else key))
            elif props and not schema.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in schema:
                # structural schemas prune unknown fields; report them so tests notice
                errors.append(f"{where}: unknown field {key!r}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors.extend(validate(schema["items"], item, f"{where}[{i}]"))
    return errors


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _pointer(path: str) -> list[str]:
    return [p.replace("~1", "/").replace("~0", "~") for p in path.split("/")[1:]]


def json_patch(target: Any, ops: list[dict[str, Any]]) -> Any:
    """RFC 6902 JSON patch (add, replace, remove, test)."""
    doc = copy.deepcopy(target)
    for op in ops:
        parts = _pointer(op["path"])
        parent = doc
        for part in parts[:-1]:
            parent = parent[int(part)] if isinstance(parent, list) else parent.setdefault(part, {})
        last = parts[-1] if parts else None
        kind = op["op"]
        if kind in ("add", "replace"):
            if isinstance(parent, list):
                if last == "-":
                    parent.append(op["value"])
                elif kind == "add":
                    parent.insert(int(last), op["value"])
                else:
                    parent[int(last)] = op["value"]
            else:
                if kind == "replace" and last not in parent:
                    raise KeyError(op["path"])
                parent[last] = op["value"]
        elif kind == "remove":
            if isinstance(parent, list):
                del parent[int(last)]
            else:
                del parent[last]
        elif kind == "test":
            value = parent[int(last)] if isinstance(parent, list) else parent.get(last)
            if value != op["value"]:
                raise ValueError(f"test failed at {op['path']}")
        else:
            raise ValueError(f"unsupported op {kind}")
    return doc


def match_labels(selector: str | None, labels: dict[str, str]) -> bool:
    if not selector:
        return True
    for term in selector.split(","):
        term = term.strip()
        if not term:
            continue
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "==" in term or "=" in term:
            key, value = re.split("==?", term, maxsplit=1)
            if labels.get(key.strip()) != value.strip():
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


def match_fields(selector: str | None, obj: dict[str, Any]) -> bool:
    if not selector:
        return True
    for term in selector.split(","):
        key, _, value = term.partition("=")
        if key == "metadata.name" and obj["metadata"].get("name") != value:
            return False
        if key == "metadata.namespace" and obj["metadata"].get("namespace") != value:
            return False
        if key == "type" and obj.get("type", "Opaque") != value:  # Secrets
            return False
    return True


def metadata_only(obj: dict[str, Any]) -> dict[str, Any]:
    """An object as a PartialObjectMetadata (what metadata informers receive)."""
    return {"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata", "metadata": copy.deepcopy(obj["metadata"])}


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str):
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message

    def status(self) -> dict[str, Any]:
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }


class Fault:
    """Make calls matching ``method``, the ``path`` regex and (when given) a User-Agent
    containing ``agent`` fail or stall ``times`` times."""

    def __init__(self, method: str | None, path: str, status: int | None, delay: float, times: int | None,
                 agent: str | None = None):
        self.method, self.path, self.status, self.delay, self.times = method, re.compile(path), status, delay, times
        self.agent = agent
        self.hits = 0
        self.answered = 0  # hits whose delay is over (answered, or failed as told)

    def matches(self, method: str, path: str, agent: str = "") -> bool:
        if self.times is not None and self.hits >= self.times:
            return False
        if self.agent is not None and self.agent not in agent:
            return False
        return (self.method is None or self.method == method) and bool(self.path.search(path))


#: A write as the fake saw it.
Write = collections.namedtuple("Write", "time method path agent")

_VERBS = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}


class FakeKubeAPI(HTTPService):
    """The fake API server.  Use as a context manager or call start()/stop()."""

    thread_name = "fake-kube-api"

    def __init__(self, crd_schema: dict[str, Any] | None = None):
        self.Handler = _Handler
        self.schema = crd_schema if crd_schema is not None else load_crd_schema()
        self.cond = threading.Condition(threading.RLock())
        self.rv = 100
        self.objects: dict[tuple[tuple[str, str, str], str, str], dict[str, Any]] = {}
        self.history: list[tuple[int, tuple[str, str, str], str, dict[str, Any]]] = []
        self._history_rvs: list[int] = []  # the versions of ``history``, for bisect
        self.compacted = 0
        self.epoch = 0  # bumped by expire(): open watches answer 410
        self.bookmarks = 0
        self.closes = 0
        self.expire_with_http_status = False
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str]] = []
        #: (method, path, User-Agent) of every request: tells who wrote what
        self.agents: list[tuple[str, str, str]] = []
        #: every write (POST, PUT, PATCH, DELETE): arrival time (monotonic), writer
        self.writes: list[Write] = []
        #: (verb, resource) -> requests, watches counted as "watch"
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()
        self.open_watches = 0
        self._stopping = False

    # --- lifecycle --------------------------------------------------------------

    def stop(self) -> None:
        with self.cond:
            self._stopping = True
            self.cond.notify_all()
        super().stop()

    def configuration(self):
        """A ``kubernetes.client.Configuration`` for this server."""
        from kubernetes import client

        config = client.Configuration()
        config.host = self.url
        config.retries = False
        return config

    # --- test controls ----------------------------------------------------------

    def fault(self, path: str, *, method: str | None = None, status: int | None = 500,
              delay: float = 0.0, times: int | None = 1, agent: str | None = None) -> Fault:
        f = Fault(method, path, status, delay, times, agent)
        with self.cond:
            self.faults.append(f)
        return f

    def clear_faults(self) -> None:
        with self.cond:
            self.faults.clear()

    def expire(self) -> None:
        """Forget the history: watching from an old version answers 410 Gone, and every
        open watch stream gets an ERROR event with code 410."""
        with self.cond:
            self.compacted = self.rv
            self.history.clear()
            self._history_rvs.clear()
            self.epoch += 1
            self.cond.notify_all()

    def bookmark(self) -> None:
        with self.cond:
            self.bookmarks += 1
            self.cond.notify_all()

    def close_watches(self) -> None:
        with self.cond:
            self.closes += 1
            self.cond.notify_all()

    def count(self, method: str, path_regex: str) -> int:
        with self.cond:
            return sum(1 for m, p in self.requests if m == method and re.search(path_regex, p))

    def tally(self, *, leases: bool = False, watches: bool = False) -> collections.Counter:
        """Requests so far per (verb, resource); Lease calls and watches only on request."""
        with self.cond:
            return collections.Counter({
                k: n for k, n in self.counts.items()
                if (leases or k[1] != "leases") and (watches or k[0] != "watch")
            })

    def writes_by(self, agent: str, since: float = 0.0) -> list[Write]:
        """Writes whose User-Agent contains ``agent``, arrived at or after ``since``
        (``time.monotonic()``), Lease calls left out."""
        with self.cond:
            return [w for w in self.writes if agent in w.agent and w.time >= since and "/leases" not in w.path]

    # --- direct access for tests (same semantics as the HTTP API) -------------------

    @staticmethod
    def resource(plural: str) -> tuple[str, str, str]:
        matches = [r for r in RESOURCES if r[2] == plural]
        assert len(matches) == 1 or plural == "events", plural
        return matches[0]

    def create(self, plural: str, namespace: str, obj: dict[str, Any]) -> dict[str, Any]:
        with self.cond:
            return copy.deepcopy(self._create(self.resource(plural), namespace, copy.deepcopy(obj)))

    def get(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        with self.cond:
            obj = self.objects.get((self.resource(plural), namespace, name))
            return copy.deepcopy(obj) if obj is not None else None

    def list(self, plural: str, namespace: str | None = None, labels: str | None = None) -> list[dict[str, Any]]:
        with self.cond:
            res = self.resource(plural)
            return [
                copy.deepcopy(o)
                for (r, ns, _), o in sorted(self.objects.items())
                if r == res and (namespace is None or ns == namespace)
                and match_labels(labels, o["metadata"].get("labels") or {})
            ]

    def update(self, plural: str, namespace: str, name: str, patch: dict[str, Any],
               subresource: str | None = None) -> dict[str, Any]:
        with self.cond:
            return copy.deepcopy(self._patch(self.resource(plural), namespace, name, subresource,
                                              "application/merge-patch+json", patch))

    def delete(self, plural: str, namespace: str, name: str) -> None:
        with self.cond:
            self._delete(self.resource(plural), namespace, name)

    # --- the store ----------------------------------------------------------------

    def _bump(self) -> str:
        self.rv += 1
        return str(self.rv)

    def _record(self, res: tuple[str, str, str], kind: str, obj: dict[str, Any]) -> None:
        self.history.append((self.rv, res, kind, copy.deepcopy(obj)))
        self._history_rvs.append(self.rv)
        self.cond.notify_all()

    def _since(self, rv: int) -> list[tuple[int, tuple[str, str, str], str, dict[str, Any]]]:
        """History entries after version ``rv`` (without scanning all of it)."""
        return self.history[bisect.bisect_right(self._history_rvs, rv):]

    def _check_cr(self, res: tuple[str, str, str], obj: dict[str, Any]) -> None:
        if res[0] != CR_GROUP:
            return
        errors = validate(self.schema, obj)
        if errors:
            raise ApiError(422, "Invalid", f"Destination.{CR_GROUP} is invalid: " + "; ".join(errors))

    def _create(self, res: tuple[str, str, str], namespace: str, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj.setdefault("metadata", {})
        if not meta.get("name"):
            if meta.get("generateName"):
                meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
            else:
                raise ApiError(422, "Invalid", "metadata.name: Required value")
        if meta.get("namespace") not in (None, namespace):
            raise ApiError(400, "BadRequest", "the namespace of the object does not match the request")
        meta["namespace"] = namespace
        key = (res, namespace, meta["name"])
        if key in self.objects:
            raise ApiError(409, "AlreadyExists", f'{res[2]} "{meta["name"]}" already exists')
        group, version, _ = res
        obj["apiVersion"] = f"{group}/{version}" if group else version
        obj["kind"] = RESOURCES[res]
        self._check_cr(res, obj)
        if res in WITH_STATUS:
            obj.pop("status", None)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        meta["generation"] = 1
        meta["resourceVersion"] = self._bump()
        self.objects[key] = obj
        self._record(res, "ADDED", obj)
        return obj

    def _existing(self, res: tuple[str, str, str], namespace: str, name: str) -> dict[str, Any]:
        obj = self.objects.get((res, namespace, name))
        if obj is None:
            raise ApiError(404, "NotFound", f'{res[2]} "{name}" not found')
        return obj

    def _store(self, res: tuple[str, str, str], old: dict[str, Any], new: dict[str, Any],
               subresource: str | None) -> dict[str, Any]:
        meta = new.setdefault("metadata", {})
        for key in ("name", "namespace", "uid", "creationTimestamp"):
            meta[key] = old["metadata"][key]
        new["apiVersion"], new["kind"] = old["apiVersion"], old["kind"]
        if res in WITH_STATUS:
            if subresource == "status":
                kept = copy.deepcopy(old)
                kept["status"] = new.get("status")
                if kept["status"] is None:
                    kept.pop("status")
                new = kept
            else:
                if "status" in old:
                    new["status"] = copy.deepcopy(old["status"])
                else:
                    new.pop("status", None)
        self._check_cr(res, new)
        generation = old["metadata"].get("generation", 1)
        if new.get("spec") != old.get("spec"):
            generation += 1
        new["metadata"]["generation"] = generation
        stripped_new = {k: v for k, v in new.items() if k != "metadata"}
        stripped_old = {k: v for k, v in old.items() if k != "metadata"}
        new_meta = {k: v for k, v in new["metadata"].items() if k != "resourceVersion"}
        old_meta = {k: v for k, v in old["metadata"].items() if k != "resourceVersion"}
        if stripped_new == stripped_old and new_meta == old_meta:
            return old  # a no-op write does not bump the version (as the API server)
        new["metadata"]["resourceVersion"] = self._bump()
        self.objects[(res, old["metadata"]["namespace"], old["metadata"]["name"])] = new
        self._record(res, "MODIFIED", new)
        return new

    def _replace(self, res, namespace, name, subresource, body):
        old = self._existing(res, namespace, name)
        given = (body.get("metadata") or {}).get("resourceVersion")
        if given and given != old["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict", "the object has been modified; please apply your changes to the latest version and try again")
        return self._store(res, old, copy.deepcopy(body), subresource)

    def _patch(self, res, namespace, name, subresource, content_type, body):
        old = self._existing(res, namespace, name)
        if "json-patch" in content_type:
            try:
                new = json_patch(old, body)
            except (KeyError, IndexError, ValueError, TypeError) as e:
                raise ApiError(422, "Invalid", f"json patch failed: {e}") from None
        else:
            if not isinstance(body, dict):
                raise ApiError(400, "BadRequest", "merge patch body must be an object")
            new = merge_patch(old, body)
        given = (new.get("metadata") or {}).get("resourceVersion")
        if given and given != old["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict", "the object has been modified")
        return self._store(res, old, new, subresource)

    def _delete(self, res, namespace, name) -> dict[str, Any]:
        obj = self.objects.pop((res, namespace, name), None)
        if obj is None:
            raise ApiError(404, "NotFound", f'{res[2]} "{name}" not found')
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = self._bump()
        self._record(res, "DELETED", obj)
        # garbage collection: dependents in the same namespace go too
        uid = obj["metadata"].get("uid")
        dependents = [
            key
            for key, o in self.objects.items()
            if key[1] == namespace
            and any(ref.get("uid") == uid for ref in (o["metadata"].get("ownerReferences") or []))
        ]
        for dep_res, dep_ns, dep_name in dependents:
            if (dep_res, dep_ns, dep_name) in self.objects:
                self._delete(dep_res, dep_ns, dep_name)
        return obj

    def _list(self, res, namespace, labels, fields) -> dict[str, Any]:
        items = [
            copy.deepcopy(o)
            for (r, ns, _), o in sorted(self.objects.items())
            if r == res and (namespace is None or ns == namespace)
            and match_labels(labels, o["metadata"].get("labels") or {})
            and match_fields(fields, o)
        ]
        group, version, _ = res
        return {
            "kind": RESOURCES[res] + "List",
            "apiVersion": f"{group}/{version}" if group else version,
            "metadata": {"resourceVersion": str(self.rv)},
            "items": items,
        }


_PATH = re.compile(
    r"^/(?:api/(?P<cv>v1)|apis/(?P<group>[^/]+)/(?P<version>[^/]+))"
    r"(?:/namespaces/(?P<ns>[^/]+))?/(?P<plural>[^/]+)(?:/(?P<name>[^/]+))?(?:/(?P<sub>status))?$"
)


class _Handler(JSONHandler):
    service: FakeKubeAPI

    def _body(self) -> Any:
        raw = self.body_bytes()
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise ApiError(400, "BadRequest", "request body is not JSON") from None

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        fake = self.service
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        try:
            body = self._body()
            agent = self.headers.get("User-Agent", "")
            m = _PATH.match(url.path)
            with fake.cond:
                fake.requests.append((method, self.path))
                fake.agents.append((method, self.path, agent))
                if method in _VERBS:
                    fake.writes.append(Write(time.monotonic(), method, self.path, agent))
                if m:
                    if method == "GET":
                        verb = "watch" if query.get("watch") in ("true", "1") else ("get" if m.group("name") else "list")
                    else:
                        verb = _VERBS.get(method, method.lower())
                    fake.counts[(verb, m.group("plural"))] += 1
                fault = next((f for f in fake.faults if f.matches(method, self.path, agent)), None)
                if fault is not None:
                    fault.hits += 1
            if fault is not None:
                if fault.delay:
                    time.sleep(fault.delay)
                with fake.cond:
                    fault.answered += 1
                if fault.status:
                    raise ApiError(fault.status, "InternalError", f"injected failure ({fault.status})")
            if not m:
                raise ApiError(404, "NotFound", f"no route for {url.path}")
            group = m.group("group") or ""
            version = m.group("cv") or m.group("version")
            res = (group, version, m.group("plural"))
            if res not in RESOURCES:
                raise ApiError(404, "NotFound", f"the server could not find the requested resource {url.path}")
            ns, name, sub = m.group("ns"), m.group("name"), m.group("sub")
            if sub and res not in WITH_STATUS:
                raise ApiError(404, "NotFound", "no such subresource")
            if method == "GET" and name is None and query.get("watch") in ("true", "1"):
                self._watch(res, ns, query)
                return
            with fake.cond:
                if method == "GET":
                    if name is None:
                        result = fake._list(res, ns, query.get("labelSelector"), query.get("fieldSelector"))
                        if "as=PartialObjectMetadataList" in self.headers.get("Accept", ""):
                            result = dict(result, kind="PartialObjectMetadataList", apiVersion="meta.k8s.io/v1",
                                          items=[metadata_only(i) for i in result["items"]])
                    else:
                        result = fake._existing(res, ns, name)
                    self.send_json(200, result)
                elif method == "POST" and name is None and ns:
                    if not isinstance(body, dict):
                        raise ApiError(400, "BadRequest", "body must be an object")
                    self.send_json(201, fake._create(res, ns, body))
                elif method == "PUT" and name and ns:
                    self.send_json(200, fake._replace(res, ns, name, sub, body or {}))
                elif method == "PATCH" and name and ns:
                    ctype = self.headers.get("Content-Type", "application/merge-patch+json")
                    self.send_json(200, fake._patch(res, ns, name, sub, ctype, body))
                elif method == "DELETE" and name and ns:
                    self.send_json(200, fake._delete(res, ns, name))
                else:
                    raise ApiError(405, "MethodNotAllowed", f"{method} not supported here")
        except ApiError as e:
            try:
                self.send_json(e.code, e.status())
            except OSError:  # the client gave up (a timeout test)
                self.close_connection = True
        except OSError:
            self.close_connection = True

    # --- watch --------------------------------------------------------------------

    def _chunk(self, event: dict[str, Any]) -> None:
        data = json.dumps(event).encode() + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _client_gone(self) -> bool:
        """Has the client closed the connection?  (A watch stream only writes when
        something happens, so it would not notice otherwise.)"""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            if readable:
                return self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True
        return False

    def _watch(self, res, ns, query) -> None:
        fake = self.service
        labels = query.get("labelSelector")
        fields = query.get("fieldSelector")
        bookmarks = query.get("allowWatchBookmarks") in ("true", "1")
        partial = "as=PartialObjectMetadata" in self.headers.get("Accept", "")
        timeout = float(query.get("timeoutSeconds") or 1800)
        deadline = time.monotonic() + timeout
        group, version, _ = res
        api_version = f"{group}/{version}" if group else version

        def matches(obj: dict[str, Any]) -> bool:
            return (ns is None or obj["metadata"].get("namespace") == ns) and match_labels(
                labels, obj["metadata"].get("labels") or {}) and match_fields(fields, obj)

        with fake.cond:
            start = query.get("resourceVersion")
            initial: list[dict[str, Any]] = []
            if start in (None, "", "0"):
                since = fake.rv
                initial = [
                    {"type": "ADDED", "object": metadata_only(o) if partial else copy.deepcopy(o)}
                    for (r, _, _), o in sorted(fake.objects.items())
                    if r == res and matches(o)
                ]
            else:
                since = int(start)
                if since < fake.compacted:
                    gone = ApiError(410, "Expired", f"too old resource version: {since} ({fake.compacted})")
                    if fake.expire_with_http_status:
                        self.send_json(410, gone.status())
                        return
                    initial = [{"type": "ERROR", "object": gone.status()}]
            epoch, marks, closes = fake.epoch, fake.bookmarks, fake.closes
            fake.open_watches += 1
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for event in initial:
                self._chunk(event)
                if event["type"] == "ERROR":
                    return
            while True:
                with fake.cond:
                    while True:
                        if fake._stopping or fake.closes != closes:
                            return
                        if fake.epoch != epoch:
                            gone = ApiError(410, "Expired", "The resourceVersion for the provided watch is too old.")
                            pending = [{"type": "ERROR", "object": gone.status()}]
                            break
                        pending = [
                            {"type": kind, "object": metadata_only(obj) if partial else copy.deepcopy(obj)}
                            for rv, r, kind, obj in fake._since(since)
                            if r == res and matches(obj)
                        ]
                        since = max(since, fake.rv)
                        if bookmarks and fake.bookmarks != marks:
                            marks = fake.bookmarks
                            pending.append({
                                "type": "BOOKMARK",
                                "object": {"kind": RESOURCES[res], "apiVersion": api_version,
                                           "metadata": {"resourceVersion": str(fake.rv)}},
                            })
                        if pending:
                            break
                        remaining = deadline - time.monotonic()
                        if remaining <= 0 or self._client_gone():
                            return
                        fake.cond.wait(min(remaining, 0.1))
                for event in pending:
                    self._chunk(event)
                    if event["type"] == "ERROR":
                        return
        except (BrokenPipeError, ConnectionResetError, OSError):
            self.close_connection = True
            return
        finally:
            with fake.cond:
                fake.open_watches -= 1
            try:
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
            except OSError:
                self.close_connection = True
