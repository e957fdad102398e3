"""The http listener: /healthz, /readyz, /metrics, /status (and the send API when configured).

The send API (SPEC 9.1) is mounted only when ``http.send`` is configured: on the http
listener, or on a listener of its own (:func:`make_send_site`).  Probes, metrics and
/status never need its bearer token.
"""

from __future__ import annotations

from prometheus_client.twisted import MetricsResource
from twisted.web import resource, server

from .send.http import SendResource, limited_request_factory
from .status import StatusResource

#: Request bodies on a site without the send API: probes and metrics take none.
NO_SEND_BODY_LIMIT = 64 * 1024


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


def make_site(gateway, send: SendResource | None = None, status: StatusResource | None = None) -> server.Site:
    """Health, readiness, metrics, ``/status`` (``status``, else one without listeners)
    and, given ``send``, the send API at
    ``POST /v1/send/<destination>[/<recipient>]``."""
    root = resource.Resource()
    root.putChild(b"healthz", _Health())
    root.putChild(b"readyz", _Ready(gateway))
    root.putChild(b"metrics", MetricsResource())
    root.putChild(b"status", status or StatusResource(gateway))
    if send is not None:
        _mount_send(root, send)
    return _site(root, send)


def make_send_site(send: SendResource) -> server.Site:
    """The send API alone, for its own listener (``http.send.listen``)."""
    root = resource.Resource()
    _mount_send(root, send)
    return _site(root, send)


def _mount_send(root: resource.Resource, send: SendResource) -> None:
    v1 = resource.Resource()
    v1.putChild(b"send", send)
    root.putChild(b"v1", v1)


class _Site(server.Site):
    """A Site without Twisted's access log: its lines would carry the send API's
    recipients (they are in the path) into the gateway's log, and a line for every probe
    and scrape.  The audit log records send API requests (SPEC 9.3)."""

    def log(self, request):
        pass


def _site(root: resource.Resource, send: SendResource | None) -> server.Site:
    site = _Site(root)
    site.displayTracebacks = False
    # Bodies that would be refused are answered before they are read: the send API's
    # limit and tokens where it is mounted, a small limit where nothing takes a body.
    site.requestFactory = limited_request_factory(send, max_body_size=None if send else NO_SEND_BODY_LIMIT)
    return site
