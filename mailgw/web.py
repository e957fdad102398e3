"""The http listener: /healthz, /readyz, /metrics (and the send API when configured)."""

from __future__ import annotations

from prometheus_client.twisted import MetricsResource
from twisted.web import resource, server

from .send.http import SendResource, limited_request_factory


class _Health(resource.Resource):
    isLeaf = True

    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/plain")
        return b"ok\n"


class _Ready(resource.Resource):
    """Ready unless the gateway is draining (SIGTERM received) or not yet serving."""

    isLeaf = True

    def __init__(self, gateway):
        super().__init__()
        self.gateway = gateway

    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/plain")
        if self.gateway.draining:
            request.setResponseCode(503)
            return b"draining\n"
        if not self.gateway.ready:
            request.setResponseCode(503)
            return b"starting\n"
        return b"ready\n"


def make_site(gateway, send_address=None) -> server.Site:
    """Health, readiness, metrics and, given ``send_address(name)`` (a Deferred of the
    ``(host, port)`` of the destination's SMTP listener, or ``None``), the send API at
    ``POST /v1/send/<destination>[/<recipient>]``."""
    root = resource.Resource()
    root.putChild(b"healthz", _Health())
    root.putChild(b"readyz", _Ready(gateway))
    root.putChild(b"metrics", MetricsResource())
    if send_address is not None:
        v1 = resource.Resource()
        v1.putChild(b"send", SendResource(send_address))
        root.putChild(b"v1", v1)
    site = server.Site(root)
    site.displayTracebacks = False
    # Bodies over the send API's limit are refused before they are read.
    site.requestFactory = limited_request_factory()
    return site
