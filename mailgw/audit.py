"""The audit log (SPEC 9.3): one JSON object per line per ended session and per send API
request, to a file or to standard output, written without blocking the reactor.

What may be written is fixed by two record types whose fields are exactly SPEC 9.3's:
:class:`SessionAudit` and :class:`SendAudit`.  :meth:`AuditLog.write` takes nothing
else, and every field is typed and checked when the record is made, so credentials,
tokens, AUTH payloads, recipient addresses and message content have nowhere to go: a
recipient list can only arrive as a count, a status only as an integer.

Writing: the reactor thread serialises the record (microseconds) and appends the line to
a bounded in-memory queue; a writer thread of the :class:`AuditLog` service writes and
flushes batches.  A slow or stuck disk therefore never holds up a session.  When the
queue is full the record is dropped -- never waited for, never queued without bound --
and counted (``AuditLog.dropped``, ``mailgw_audit_dropped_total``, a warning in the
log at most once a minute, the ``audit`` section of ``/status``).
"""

from __future__ import annotations

import json
import sys
import threading
from collections import deque
from typing import IO, Any

from attrs import field, fields, frozen, validators
from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger

from . import metrics
from .logs import isoformat

__all__ = ["AuditLog", "AuditOpenError", "SendAudit", "SessionAudit"]

log = Logger(namespace="mailgw.audit")

#: Records waiting for the writer at most (a line is a few hundred bytes: ~5 MB).
DEFAULT_MAX_QUEUE = 10000
#: Free-text fields are names and addresses, never long: anything longer is cut.
_MAX_TEXT = 255
#: At most one "records dropped" warning per this many seconds.
_DROP_WARNING_INTERVAL = 60.0
#: stopService waits this long for the writer to write what is queued.
_STOP_GRACE = 5.0


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value[:_MAX_TEXT]


def _optional_text(value: Any) -> str | None:
    return None if value is None else _text(value)


def _count(value: Any) -> int:
    # bool is an int subclass; a flag where a count belongs is a bug at the call site.
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TypeError(f"expected a count (an int >= 0), got {value!r}")
    return value


def _seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise TypeError(f"expected seconds (a number >= 0), got {value!r}")
    return float(value)


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected a bool, got {type(value).__name__}")
    return value


def _http_status(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 100 <= value <= 599:
        raise TypeError(f"expected an HTTP status code, got {value!r}")
    return value


def _refusal_reason(instance, attribute, value) -> None:
    if value is None:
        if instance.outcome == "refused":
            raise ValueError("a refused session needs a reason")
        return
    if value not in metrics.REFUSAL_REASONS:
        raise ValueError(f"reason must be one of {metrics.REFUSAL_REASONS}, not {value!r}")
    if instance.outcome != "refused":
        raise ValueError(f"reason is for refusals only, not outcome {instance.outcome!r}")


@frozen(kw_only=True)
class SessionAudit:
    """One ended session (SPEC 9.3).

    ``time`` is when the session ended (seconds since the epoch, e.g.
    ``reactor.seconds()``); ``destination`` is the route's destination (the same value as
    the metrics' ``destination`` label); ``client`` is the application's
    ``address:port``; ``upstream`` the upstream's ``host:port`` (``None`` when no
    destination was found); ``authentication`` the destination's authentication type;
    ``outcome`` relayed | refused | closed; ``reason`` the refusal's class (one of
    :data:`mailgw.metrics.REFUSAL_REASONS`, only for refusals); ``released`` whether the
    session reached the relay; the byte counts are what the relay moved after release;
    ``seconds`` accept to close; ``tls`` the upstream TLS version (``"TLSv1.3"``) or
    ``None``.
    """

    time: float = field(converter=_seconds)
    sid: str = field(converter=_text)
    destination: str = field(converter=_text)
    tenant: str | None = field(converter=_optional_text)
    client: str = field(converter=_text)
    upstream: str | None = field(converter=_optional_text)
    authentication: str | None = field(converter=_optional_text)
    outcome: str = field(validator=validators.in_(metrics.OUTCOMES))
    reason: str | None = field(default=None, validator=_refusal_reason)
    released: bool = field(converter=_flag)
    bytes_to_upstream: int = field(converter=_count)
    bytes_to_app: int = field(converter=_count)
    seconds: float = field(converter=_seconds)
    tls: str | None = field(converter=_optional_text)

    def to_json(self) -> dict[str, Any]:
        """The JSON object of SPEC 9.3, keys in the order of the SPEC."""
        record = {a.name: getattr(self, a.name) for a in fields(type(self))}
        record["time"] = isoformat(self.time)
        return record


@frozen(kw_only=True)
class SendAudit:
    """One send API request (SPEC 9.3).

    ``from_`` (written as ``from``) is the From address the request gave, or ``None``
    when it gave none: From then defaults to the primary recipient, and recipient
    addresses never reach the audit log.  ``recipients`` is how many distinct recipient
    addresses the request named, ``bytes`` the size of the request body, ``status`` the
    HTTP status answered (499: the client went away before the answer).
    """

    time: float = field(converter=_seconds)
    destination: str = field(converter=_text)
    from_: str | None = field(converter=_optional_text)
    recipients: int = field(converter=_count)
    bytes: int = field(converter=_count)
    status: int = field(converter=_http_status)

    def to_json(self) -> dict[str, Any]:
        """The JSON object of SPEC 9.3 (``from_`` becomes ``from``)."""
        return {
            "time": isoformat(self.time),
            "destination": self.destination,
            "from": self.from_,
            "recipients": self.recipients,
            "bytes": self.bytes,
            "status": self.status,
        }


class AuditOpenError(OSError):
    """The audit file cannot be opened; the message names the file and the cause."""


def _open(path: str) -> IO[str]:
    try:
        # Line buffering is not needed: the writer flushes after every batch.
        return open(path, "a", encoding="utf-8")
    except OSError as e:
        raise AuditOpenError(f"audit: cannot open {path}: {e.strerror}") from None


class AuditLog(Service):
    """Writes :class:`SessionAudit` and :class:`SendAudit` records, one JSON line each.

    ``path`` is a file (appended to, created when absent) or ``"-"`` for standard
    output; ``stream`` replaces either (tests).  The file is opened when the object is
    made, so a path that cannot be written stops start-up with one clear line
    (:class:`AuditOpenError`).  Standard output is the one of the moment the log is
    made: twistd later replaces ``sys.stdout`` with a logger, and audit lines must not
    turn into log events.

    :meth:`write` is for the reactor thread and never blocks on I/O.  Lines written
    before the service starts wait in the queue; on stop the writer writes what is
    queued (for up to a few seconds) and closes the file.
    """

    name = "audit"

    def __init__(
        self,
        path: str,
        *,
        stream: IO[str] | None = None,
        reactor: Any = None,
        max_queue: int = DEFAULT_MAX_QUEUE,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor  # noqa: F811 - the global reactor by default
        if max_queue < 1:
            raise ValueError("max_queue must be at least 1")
        self.path = path
        self.reactor = reactor
        self.max_queue = max_queue
        if stream is not None:
            self._stream, self._owns_stream = stream, False
        elif path == "-":
            self._stream, self._owns_stream = sys.stdout, False
        else:
            self._stream, self._owns_stream = _open(path), True
        self._queue: deque[str] = deque()
        self._lock = threading.Condition()
        self._stopping = False
        self._reopen = False  # the writer opens the file again before its next batch
        self._thread: threading.Thread | None = None
        self._stopped: defer.Deferred | None = None
        #: records written, dropped (queue full or the write failed), since start
        self.written = 0
        self.dropped = 0
        self._last_drop_warning: float | None = None
        self._failing = False  # the last write failed (logged once until one succeeds)

    # -- the reactor's side ----------------------------------------------------------

    def write(self, record: SessionAudit | SendAudit) -> bool:
        """Queue ``record``; False (and counted) when the queue is full.  Never blocks
        on the disk: the lock is held only to append or to take a batch."""
        if not isinstance(record, (SessionAudit, SendAudit)):
            raise TypeError(f"the audit log takes SessionAudit and SendAudit records, not {type(record).__name__}")
        line = json.dumps(record.to_json(), ensure_ascii=False, separators=(",", ":")) + "\n"
        with self._lock:
            if len(self._queue) >= self.max_queue:
                accepted = False
            else:
                self._queue.append(line)
                self._lock.notify()
                accepted = True
        if not accepted:
            self._dropped(1, "the writer is behind (queue full)")
        return accepted

    def reopen(self) -> None:
        """Open the file again (SIGHUP: logrotate has moved it away); lines queued
        meanwhile go to the new file.  Standard output and given streams stay."""
        if not self._owns_stream:
            return
        with self._lock:
            self._reopen = True
            self._lock.notify()

    @property
    def queued(self) -> int:
        """Lines waiting for the writer."""
        with self._lock:
            return len(self._queue)

    def status(self) -> dict[str, Any]:
        """The ``audit`` section of ``/status``."""
        return {
            "path": self.path, "queued": self.queued, "written": self.written, "dropped": self.dropped,
            "failing": self._failing,
        }

    def _dropped(self, count: int, why: str) -> None:
        self.dropped += count
        metrics.AUDIT_DROPPED.inc(count)
        now = self.reactor.seconds()
        if self._last_drop_warning is None or now - self._last_drop_warning >= _DROP_WARNING_INTERVAL:
            self._last_drop_warning = now
            log.warn(
                "audit log {path}: {count} record(s) dropped so far: {why}", path=self.path, count=self.dropped, why=why,
            )

    # -- life cycle ------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if self._owns_stream and self._stream.closed:  # started again after a stop
            self._stream = _open(self.path)
        with self._lock:
            self._stopping = False
        self._stopped = defer.Deferred()
        self._thread = threading.Thread(target=self._run, name="mailgw-audit", daemon=True)
        self._thread.start()

    def stopService(self) -> defer.Deferred:
        super().stopService()
        stopped, self._stopped = self._stopped, None
        if stopped is None:
            return defer.succeed(None)
        with self._lock:
            self._stopping = True
            self._lock.notify()
        # A stuck disk must not hold up shutdown: give the writer a grace period.  A
        # daemon thread still writing then dies with the process.
        waiting = defer.Deferred()
        stopped.chainDeferred(waiting)
        waiting.addTimeout(_STOP_GRACE, self.reactor, onTimeoutCancel=self._gave_up)
        return waiting

    def _gave_up(self, result, timeout):
        log.warn("audit log {path}: writer still busy after {timeout:.0f}s at shutdown", path=self.path, timeout=timeout)
        return None

    # -- the writer thread -----------------------------------------------------------

    def _run(self) -> None:
        done = self._stopped
        while True:
            with self._lock:
                while not self._queue and not self._stopping and not self._reopen:
                    self._lock.wait()
                batch = list(self._queue)
                self._queue.clear()
                stopping, reopen, self._reopen = self._stopping, self._reopen, False
            if reopen:
                self._reopen_stream()
            if batch:
                self._write_batch(batch)
            if stopping and not batch:
                break
        if self._owns_stream:
            try:
                self._stream.close()
            except OSError:
                pass
        if done is not None:
            self.reactor.callFromThread(done.callback, None)

    def _reopen_stream(self) -> None:
        try:
            fresh = _open(self.path)
        except AuditOpenError as e:
            self.reactor.callFromThread(log.error, "{error}; writing on to the file already open", error=str(e))
            return
        old, self._stream = self._stream, fresh
        try:
            old.close()
        except OSError:
            pass

    def _write_batch(self, batch: list[str]) -> None:
        try:
            self._stream.write("".join(batch))
            self._stream.flush()
        except (OSError, ValueError) as e:  # ValueError: the stream was closed
            cause = getattr(e, "strerror", None) or str(e)
            self.reactor.callFromThread(self._write_failed, len(batch), cause)
        else:
            self.reactor.callFromThread(self._write_ok, len(batch))

    def _write_ok(self, count: int) -> None:
        self.written += count
        if self._failing:
            self._failing = False
            log.info("audit log {path}: writing again", path=self.path)

    def _write_failed(self, count: int, cause: str) -> None:
        if not self._failing:
            self._failing = True
            log.error("audit log {path}: write failed: {cause}", path=self.path, cause=cause)
        self._dropped(count, f"write failed: {cause}")


def from_config(config, reactor: Any = None, **kwargs: Any) -> AuditLog | None:
    """The :class:`AuditLog` for ``config.audit`` (``None`` when not configured)."""
    if config.audit is None:
        return None
    return AuditLog(config.audit.path, reactor=reactor, **kwargs)

