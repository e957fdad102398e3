"""Log formats (SPEC 9.4): ``logging: {format: text | json}`` in gateway.yaml.

``text`` is twistd's own observer.  ``json`` writes one JSON object per line::

    {"time": "2026-05-09T07:35:25.123Z", "level": "info", "namespace": "mailgw.session",
     "sid": "s17", "message": "session s17 released"}

``sid`` is there when the event has a ``sid`` field (every session event has:
``log.info("session {sid} released", sid=...)``); a failure adds ``traceback``.  Only
these fields are written -- not every field of the event -- so a value a developer
passes for formatting never reaches the file unformatted.

How twistd uses it, with public APIs only: twistd calls the plugin's ``makeService``
(where gateway.yaml is read) *before* it sets up logging, then makes the application,
adds the service to it and starts its ``AppLogger``, which logs to the application's
``ILogObserver`` component when there is one (the same hook a ``.tac`` file uses), and
to ``--logger``'s observer when that option is given.  So the plugin makes the observer
(:func:`twistd_observer`) and the gateway's top service, when twistd makes it the child
of the application, sets it as that component (:func:`offer_observer`).  Events logged
before that (while the configuration is read) are buffered by twisted.logger and
replayed to the observer, so they come out as JSON too.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime, timezone
from typing import IO, Any, Mapping

from twisted.logger import ILogObserver, formatEvent
from twisted.python.components import Componentized
from twisted.python.logfile import LogFile
from zope.interface import implementer

__all__ = ["JsonLogObserver", "event_record", "isoformat", "offer_observer", "twistd_observer"]


def isoformat(seconds: float) -> str:
    """``2026-05-09T07:35:25.123Z``: UTC, milliseconds (logs, audit log, /status)."""
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def event_record(event: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON object for one twisted.logger event."""
    level = event.get("log_level")
    record: dict[str, Any] = {
        "time": isoformat(event.get("log_time") or time.time()),
        "level": getattr(level, "name", "info"),
        "namespace": event.get("log_namespace") or "",
    }
    sid = event.get("sid")
    if isinstance(sid, str):
        record["sid"] = sid
    record["message"] = formatEvent(event)
    failure = event.get("log_failure")
    if failure is not None:
        try:
            record["traceback"] = failure.getTraceback()
        except Exception:  # a broken failure object must not lose the line
            record["traceback"] = f"(traceback unavailable: {type(failure).__name__})"
        if not record["message"]:
            record["message"] = f"{getattr(failure.type, '__name__', 'error')}"
    return record


@implementer(ILogObserver)
class JsonLogObserver:
    """An ``ILogObserver`` writing :func:`event_record` objects, one per line, to ``out``.

    ``out`` is kept as given: under twistd, ``sys.stdout`` is replaced by a logger once
    logging starts, so the observer must hold the real one from before.
    """

    def __init__(self, out: IO[str]):
        self._out = out

    def __call__(self, event: Mapping[str, Any]) -> None:
        try:
            line = json.dumps(event_record(event), ensure_ascii=False, default=str)
        except Exception as e:  # never lose a line to one odd event
            line = json.dumps({
                "time": isoformat(time.time()), "level": "error", "namespace": "mailgw.logs",
                "message": f"unloggable event: {type(e).__name__}",
            })
        self._out.write(line + "\n")
        self._out.flush()


def twistd_observer(log_format: str, server_options: Mapping[str, Any] | None) -> JsonLogObserver | None:
    """The observer twistd should log to for ``log_format``, or ``None`` for twistd's own.

    ``server_options`` are twistd's options (the plugin's ``options.parent``): the JSON
    lines go where twistd's text would have gone -- standard output with ``-n`` or
    ``--logfile -``, else the ``--logfile`` (default ``twistd.log``).  ``--logger`` and
    ``--syslog`` are the operator's explicit choice and are left alone.
    """
    if log_format != "json":
        return None
    options = server_options or {}
    if options.get("logger") or options.get("syslog"):
        return None
    logfile = options.get("logfile") or ""
    nodaemon = options.get("nodaemon", False)
    if logfile == "-":
        if not nodaemon:
            return None  # twistd refuses this itself ("Daemons cannot log to stdout")
        return JsonLogObserver(sys.stdout)
    if not logfile and nodaemon:
        return JsonLogObserver(sys.stdout)
    return JsonLogObserver(LogFile.fromFullPath(logfile or "twistd.log"))


def offer_observer(parent: Any, observer: Any) -> None:
    """Make ``observer`` the ``ILogObserver`` component of twistd's application
    ``parent`` (what twistd's AppLogger logs to), unless it already has one."""
    if isinstance(parent, Componentized) and parent.getComponent(ILogObserver, None) is None:
        parent.setComponent(ILogObserver, observer)
