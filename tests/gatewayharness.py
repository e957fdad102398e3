"""Run the real gateway in-process for integration tests driven by blocking clients.

The global reactor runs once per test session in a daemon thread; tests start gateways
through :func:`start_gateway` (listeners on port 0) and talk to them with smtplib,
imaplib, poplib, curl or raw sockets from the test's own thread.  :class:`LogCapture`
records every log event the gateway emits, formatted, for the no-secrets checks.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.logger import formatEvent, globalLogPublisher

from mailgw.config import parse_config
from mailgw.service import make_service
from support.reactor import in_reactor

__all__ = ["in_reactor", "LogCapture", "start_gateway"]  # in_reactor: re-exported for the tests


class RunningGateway:
    """A started gateway; ``address(i)`` is where listener ``i`` accepts, ``by_name`` where
    the first listener of each destination does."""

    def __init__(self, service, addresses, destinations=()):
        self.service = service
        self.addresses = addresses
        self.by_name: dict[str, tuple[str, int]] = {}
        for name, address in zip(destinations, addresses):
            self.by_name.setdefault(name, address)

    @property
    def gateway(self):
        return self.service.gateway

    def address(self, index: int = 0) -> tuple[str, int]:
        return self.addresses[index]

    def stop(self) -> None:
        in_reactor(self.service.stopService)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.stop()


def destination_listeners(destinations: list[dict[str, Any]]) -> list[dict[str, str]]:
    """One loopback listener on a free port for each destination, in order."""
    return [{"destination": d["Name"], "listen": "tcp:0:interface=127.0.0.1"} for d in destinations]


def start_gateway(doc: dict[str, Any], base: Path | None = None, **service_kwargs) -> RunningGateway:
    """Validate ``doc`` like a gateway.yaml, start it, and wait until it listens.

    Without ``listeners`` every destination gets one (see :func:`destination_listeners`).
    """
    doc = dict(doc)
    doc.setdefault("listeners", destination_listeners(doc.get("destinations", [])))
    config = parse_config(doc, "test-gateway.yaml", base)

    def start():
        service = make_service(config, reactor, **service_kwargs)
        service.startService()
        return service.listening_ports().addCallback(lambda ports: (service, ports))

    service, ports = in_reactor(start)
    addresses = [(p.getHost().host, p.getHost().port) for p in ports]
    return RunningGateway(service, addresses, [listener["destination"] for listener in doc["listeners"]])


class LogCapture:
    """Every log event while active, formatted, plus any failure's traceback text."""

    def __init__(self):
        self.events: list[dict] = []
        self._lock = threading.Lock()

    def __call__(self, event: dict) -> None:
        with self._lock:
            self.events.append(event)

    def __enter__(self):
        globalLogPublisher.addObserver(self)
        return self

    def __exit__(self, *exc_info):
        globalLogPublisher.removeObserver(self)

    def text(self) -> str:
        with self._lock:
            events = list(self.events)
        parts = []
        for event in events:
            parts.append(formatEvent(event) or "")
            # Every field, as a careless observer (JSON log files) would write it.
            parts.append(repr({k: v for k, v in event.items() if k != "log_logger"}))
            failure = event.get("log_failure")
            if failure is not None:
                parts.append(failure.getTraceback())
        return "\n".join(parts)
