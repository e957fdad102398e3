"""Prometheus metrics (served on the http listener's /metrics)."""

from prometheus_client import Counter, Gauge

SESSIONS_ACCEPTED = Counter("mailgw_sessions_accepted_total", "Application connections accepted", ["destination"])
SESSIONS_READY = Counter("mailgw_sessions_ready_total", "Sessions whose upstream login succeeded", ["destination"])
SESSIONS_REFUSED = Counter("mailgw_sessions_refused_total", "Sessions refused (upstream or limits)", ["destination"])
SESSIONS_ACTIVE = Gauge("mailgw_sessions_active", "Open sessions", ["destination"])
