"""List-then-watch loop for one kind of object, in a thread of its own.

The loop lists, hands the full list to the reactor, then watches from the list's
resourceVersion with bookmarks and a server-side timeout.  When a stream ends (the
timeout, a dropped connection) it watches again from the last version it saw (events and
BOOKMARKs update it); ``410 Gone`` — as an HTTP status or as an ERROR event in the stream
— means that version is too old, so it lists again.  Other errors back off and retry.

It runs in its own thread, not the reactor's pool (that pool is joined at shutdown and
resolves host names), and talks to the reactor only through ``callFromThread``.
:meth:`Watcher.stop` interrupts a blocked stream at once (``Watch.stop()`` shuts the
socket down) and fires a Deferred when the thread is gone.
"""

from __future__ import annotations

import socket
import threading
from typing import Any, Callable, Mapping

from kubernetes import client as k8s
from kubernetes import watch as k8s_watch
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from mailgw import metrics
from mailgw.kube.client import KubeApiError, count_request

log = Logger(namespace="mailgw.kube.watch")

ListFn = Callable[[], "tuple[list[dict[str, Any]], str | None]"]
WatchSource = Callable[[], "tuple[Callable[..., Any], dict[str, Any]]"]


class _Gone(Exception):
    """The version we watch from is too old: list again."""


def _shutdown(resp: Any) -> None:
    """Unblock a thread reading ``resp`` (as ``Watch.stop`` does for its own response)."""
    try:
        conn = getattr(resp, "connection", None)
        sock = getattr(conn, "sock", None) if conn is not None else None
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class Watcher:
    """Keeps the reactor informed about one kind of object.

    ``on_list(items)`` is called (in the reactor thread) with the complete set after every
    (re-)list, ``on_event(type, obj)`` for every ADDED / MODIFIED / DELETED event; objects
    are JSON dicts.  ``name`` is the resource watched (``services``, ...): it labels the
    metrics (every watch after the first counts as a restart).
    """

    def __init__(
        self,
        name: str,
        list_fn: ListFn,
        watch_source: WatchSource,
        on_list: Callable[[list[dict[str, Any]]], None],
        on_event: Callable[[str, dict[str, Any]], None],
        reactor: Any,
        timeout_seconds: int = 300,
        connect_timeout: float = 5.0,
        min_backoff: float = 0.5,
        max_backoff: float = 30.0,
    ):
        self.name = name
        self.list_fn = list_fn
        self.watch_source = watch_source
        self.on_list = on_list
        self.on_event = on_event
        self.reactor = reactor
        self.timeout_seconds = int(timeout_seconds)
        self.connect_timeout = connect_timeout
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.resource_version: str | None = None
        # counters, for tests and metrics
        self.lists = 0
        self.watches = 0
        self.bookmarks = 0
        self.gone = 0
        self.errors = 0
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._watch: k8s_watch.Watch | None = None
        self._resp: Any = None
        self._thread: threading.Thread | None = None
        self._exited: Deferred[None] = Deferred()

    # --- reactor side ------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"mailgw-watch-{self.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> "Deferred[None]":
        """Stop the loop; the Deferred fires when the thread has exited (or after
        ``timeout`` seconds, should a list call still be waiting for its answer)."""
        self._stopping.set()
        with self._lock:
            w, resp = self._watch, self._resp
        if w is not None:
            w.stop()
        if resp is not None:
            _shutdown(resp)
        result: Deferred[None] = Deferred()
        if self._thread is None:
            result.callback(None)
            return result
        timer = self.reactor.callLater(timeout, lambda: result.called or result.callback(None))

        def exited(_: Any) -> None:
            if timer.active():
                timer.cancel()
            if not result.called:
                result.callback(None)

        self._exited.addBoth(exited)
        return result

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # --- thread side ---------------------------------------------------------------------

    def _deliver(self, fn: Callable[..., Any], *args: Any) -> None:
        if not self._stopping.is_set():
            self.reactor.callFromThread(fn, *args)

    def _log(self, level: str, fmt: str, **fields: Any) -> None:
        self.reactor.callFromThread(getattr(log, level), fmt, watch=self.name, **fields)

    def _run(self) -> None:
        delay = self.min_backoff
        try:
            while not self._stopping.is_set():
                try:
                    if self.resource_version is None:
                        items, rv = self.list_fn()
                        self.lists += 1
                        self.resource_version = rv
                        self._deliver(self.on_list, items)
                    self._watch_once()
                    delay = self.min_backoff
                except _Gone:
                    self.gone += 1
                    self.resource_version = None
                    self._log("info", "watch {watch}: resource version expired, listing again")
                except Exception as e:  # noqa: BLE001 - the loop must survive anything
                    if self._stopping.is_set():
                        break
                    self.errors += 1
                    what = str(e) if isinstance(e, KubeApiError) else f"{type(e).__name__}: {str(e)[:200]}"
                    self._log("warn", "watch {watch} failed, retrying in {delay}s: {error}", delay=delay, error=what)
                    self._stopping.wait(delay)
                    delay = min(delay * 2, self.max_backoff)
        finally:
            self.reactor.callFromThread(self._exited.callback, None)

    def _watch_once(self) -> None:
        func, kwargs = self.watch_source()
        w = k8s_watch.Watch(return_type="object")

        def opener(*args: Any, **kw: Any) -> Any:
            resp = func(*args, **kw)
            count_request("watch", self.name, getattr(resp, "status", 200))
            with self._lock:
                self._resp = resp
                stopping = self._stopping.is_set()
            if stopping:
                _shutdown(resp)
            return resp

        with self._lock:
            if self._stopping.is_set():
                return
            self._watch = w
        if self.watches or self.lists > 1:
            metrics.KUBE_WATCH_RESTARTS.labels(self.name).inc()
        self.watches += 1
        try:
            stream = w.stream(
                opener,
                resource_version=self.resource_version,
                allow_watch_bookmarks=True,
                timeout_seconds=self.timeout_seconds,
                _request_timeout=(self.connect_timeout, self.timeout_seconds + 30),
                **kwargs,
            )
            for event in stream:
                if self._stopping.is_set():
                    break
                self._handle(event)
        except k8s.ApiException as e:
            count_request("watch", self.name, e.status or None)
            if e.status == 410:
                raise _Gone() from None
            raise
        finally:
            with self._lock:
                self._watch = None
                self._resp = None

    def _handle(self, event: Mapping[str, Any]) -> None:
        kind = event.get("type")
        obj = event.get("raw_object")
        if not isinstance(obj, dict):
            return
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise _Gone()
            raise KubeApiError(f"watch error event: {obj.get('code')} {obj.get('message')}", obj.get("code"))
        meta = obj.get("metadata")
        rv = meta.get("resourceVersion") if isinstance(meta, Mapping) else None
        if rv:
            self.resource_version = str(rv)
        if kind == "BOOKMARK":
            self.bookmarks += 1
            return
        if kind in ("ADDED", "MODIFIED", "DELETED"):
            self._deliver(self.on_event, kind, obj)
