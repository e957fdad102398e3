"""The http listener: /healthz, /readyz, /metrics, /status (and the send API when configured)."""

from __future__ import annotations

from prometheus_client.twisted import MetricsResource
from twisted.web import resource, server

from .send.http import SendResource, limited_request_factory
from .status import StatusResource


class _Health(resource.Resource):
    isLeaf = True

    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/plain")
        return b"ok\n"


class _Ready(resource.Resource):
    """Ready unless the gateway is draining (SIGTERM received) or not yet serving; the
    503 body names every failing check (``not ready: draining``)."""

    isLeaf = True

    def __init__(self, gateway):
        super().__init__()
        self.gateway = gateway

    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        reasons = self.gateway.not_ready()
        if reasons:
            request.setResponseCode(503)
            return ("not ready: " + ", ".join(reasons) + "\n").encode("utf-8")
        return b"ready\n"


def make_site(gateway, send_address=None, status: StatusResource | None = None) -> server.Site:
    """Health, readiness, metrics, ``/status`` (``status``, else one without listeners)
    and, given ``send_address(name)`` (a Deferred of the ``(host, port)`` of the
    destination's SMTP listener, or ``None``), the send API at
    ``POST /v1/send/<destination>[/<recipient>]``."""
    root = resource.Resource()
    root.putChild(b"healthz", _Health())
    root.putChild(b"readyz", _Ready(gateway))
    root.putChild(b"metrics", MetricsResource())
    root.putChild(b"status", status or StatusResource(gateway))
    if send_address is not None:
        v1 = resource.Resource()
        v1.putChild(b"send", SendResource(send_address, audit=getattr(gateway, "audit", None)))
        root.putChild(b"v1", v1)
    site = server.Site(root)
    site.displayTracebacks = False
    # Bodies over the send API's limit are refused before they are read.
    site.requestFactory = limited_request_factory()
    return site
