"""Prometheus metrics, served on the http listener's /metrics.

Names and labels are part of the contract (SPEC 9.2); docs/operations.md says what each
one means and what to do when it moves.  Everything is declared here, once, so that a
dashboard or an alert can be checked against this module.
"""

from prometheus_client import Counter, Gauge, Histogram

from . import __version__
from .protocol.refusal import Reason
from .protocol.session import Outcome

#: ``mailgw_sessions_refused_total{reason}``: the one reason a refusal counts under
#: (SPEC 9.2).  The audit log's ``reason`` field takes the same values.
REFUSAL_REASONS = tuple(reason.value for reason in Reason)
#: ``mailgw_session_duration_seconds{outcome}`` and the audit log's ``outcome``.
OUTCOMES = tuple(outcome.value for outcome in Outcome)

#: Upstream phases and token requests: milliseconds to tens of seconds.
_FAST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
#: Whole sessions: a second to a day (IMAP IDLE sessions last hours).
_SESSION_BUCKETS = (0.01, 0.1, 1, 5, 15, 60, 300, 900, 1800, 3600, 7200, 14400, 43200, 86400)

SESSIONS_ACCEPTED = Counter("mailgw_sessions_accepted_total", "Application connections accepted", ["destination"])
SESSIONS_ACTIVE = Gauge("mailgw_sessions_active", "Open sessions", ["destination"])
SESSIONS_REFUSED = Counter(
    "mailgw_sessions_refused_total",
    "Sessions refused, by the one reason each refusal counts under",
    ["destination", "reason"],
)
SESSION_DURATION = Histogram(
    "mailgw_session_duration_seconds", "Session lifetime, accept to close", ["destination", "outcome"],
    buckets=_SESSION_BUCKETS,
)
RELAY_BYTES = Counter("mailgw_relay_bytes_total", "Bytes relayed after release", ["destination", "direction"])
UPSTREAM_SECONDS = Histogram(
    "mailgw_upstream_seconds", "Time spent reaching the upstream, by phase", ["destination", "phase"],
    buckets=_FAST_BUCKETS,
)
TOKEN_REQUESTS = Counter("mailgw_token_requests_total", "Requests to token services", ["grant", "outcome"])
TOKEN_REQUEST_SECONDS = Histogram(
    "mailgw_token_request_seconds", "Duration of token service requests", ["grant"], buckets=_FAST_BUCKETS
)
TOKEN_CACHE = Counter("mailgw_token_cache_total", "Token cache look-ups", ["result"])
POOL_CONNECTIONS = Gauge("mailgw_pool_connections", "Warm upstream connections", ["destination", "state"])
SEND_REQUESTS = Counter("mailgw_send_requests_total", "Send API requests, by HTTP status", ["status"])
KUBE_RECONCILES = Counter("mailgw_kube_reconciles_total", "Destination reconciles", ["result"])
KUBE_RECONCILE_SECONDS = Histogram("mailgw_kube_reconcile_seconds", "Duration of one reconcile", buckets=_FAST_BUCKETS)
KUBE_QUEUE_DEPTH = Gauge("mailgw_kube_queue_depth", "Destinations waiting to be reconciled")
KUBE_LEADER = Gauge("mailgw_kube_leader", "1 while this replica holds the leader Lease")
KUBE_WATCH_RESTARTS = Counter("mailgw_kube_watch_restarts_total", "Watches started again", ["resource"])
KUBE_API_REQUESTS = Counter(
    "mailgw_kube_api_requests_total", "Requests to the Kubernetes API server", ["verb", "resource", "code"]
)
BUILD_INFO = Gauge("mailgw_build_info", "Always 1; the version is the label", ["version"])
BUILD_INFO.labels(__version__).set(1)

# Not in SPEC 9.2: the audit log's own health (docs/operations.md).
AUDIT_DROPPED = Counter(
    "mailgw_audit_dropped_total", "Audit records not written: the writer fell behind or the file failed"
)


class DestinationMetrics:
    """The labelled children of one destination's session metrics, each looked up once:
    ``labels()`` is a dictionary look-up under a lock, and a session used a dozen."""

    def __init__(self, destination: str):
        self.destination = destination
        self.accepted = SESSIONS_ACCEPTED.labels(destination)
        self.active = SESSIONS_ACTIVE.labels(destination)
        self._children: dict = {}

    def _child(self, metric, label: str):
        child = self._children.get((metric, label))
        if child is None:
            child = self._children[metric, label] = metric.labels(self.destination, label)
        return child

    def relay_bytes(self, direction: str):
        return self._child(RELAY_BYTES, direction)

    def refused(self, reason: str):
        return self._child(SESSIONS_REFUSED, reason)

    def duration(self, outcome: str):
        return self._child(SESSION_DURATION, outcome)

    def upstream(self, phase: str):
        return self._child(UPSTREAM_SECONDS, phase)
