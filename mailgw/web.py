"""The http listener: /healthz, /readyz, /metrics (and the send API when configured)."""

from __future__ import annotations

from prometheus_client.twisted import MetricsResource
from twisted.web import resource, server


class _Health(resource.Resource):
    isLeaf = True

    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/plain")
        return b"ok\n"


class _Ready(resource.Resource):
    """Ready unless the gateway is draining (SIGTERM received)."""

    isLeaf = True

    def __init__(self, gateway):
        super().__init__()
        self.gateway = gateway

    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/plain")
        if self.gateway.draining:
            request.setResponseCode(503)
            return b"draining\n"
        return b"ready\n"


def make_site(gateway) -> server.Site:
    root = resource.Resource()
    root.putChild(b"healthz", _Health())
    root.putChild(b"readyz", _Ready(gateway))
    root.putChild(b"metrics", MetricsResource())
    site = server.Site(root)
    site.displayTracebacks = False
    return site
