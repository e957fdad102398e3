"""The send API over HTTP: ``POST /v1/send/<destination>[/<recipient>]`` (SPEC section 8).

The request headers Subject, From, To, Cc, Bcc, Content-Type and MIME-Version become the
mail's fields; any other header (except HTTP's own, see :data:`HTTP_HEADERS`) is copied
into the mail, one header line per value.  The request body is the mail body: for a
``text/*`` Content-Type it is decoded with the charset (so the mail carries readable
quoted-printable text), otherwise it is sent as a binary part, or as it is in the
MIME-Version pass-through case.  The response body is the SMTP server's final reply.

Status codes: 200 sent; 400 malformed request (the message names the header);
401 no bearer token (when tokens are configured); 403 wrong bearer token; 404 unknown
destination; 405 not POST; 413 body over the size limit; 502 the mail was not sent
(refused by the server, or it could not be reached).  Every answer counts in
``mailgw_send_requests_total{status}``.

Access (SPEC 9.1): given :class:`BearerTokens`, every request needs
``Authorization: Bearer <token>``; tokens are kept as SHA-256 digests and compared in
constant time, and never appear in a log line or a reply.

Mounting, for whoever builds the http listener's resource tree::

    v1 = Resource(); root.putChild(b"v1", v1)
    send = SendResource(resolve, tokens=BearerTokens(["..."]))
    v1.putChild(b"send", send)
    site = Site(root)
    site.requestFactory = limited_request_factory(send)  # answer early what would be refused

``resolve(name)`` returns the :class:`~mailgw.send.SendConfig` for a destination (or
``(host, port)`` of the gateway's SMTP listener for it, or ``None`` when unknown), or a
Deferred of one of these.  Sending runs off the reactor thread (the gateway's
``mailgw-send`` pool): the reactor never blocks.
"""

from __future__ import annotations

import hashlib
import hmac
import io
from typing import Any, Callable, Iterable
from urllib.parse import urlsplit

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python import failure
from twisted.web import http, server
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from .. import metrics
from ..audit import SendAudit
from .connection import SendConfig, SendError, send_message_deferred
from .message import MessageError, SendRequest, check_address, parse_content_type

__all__ = [
    "BearerTokens",
    "DEFAULT_MAX_BODY_SIZE",
    "HTTP_HEADERS",
    "LimitedRequest",
    "SendResource",
    "limited_request_factory",
    "parse_send_request",
]

log = Logger(namespace="mailgw.send.http")

DEFAULT_MAX_BODY_SIZE = 10 * 1024 * 1024

#: Request headers that belong to HTTP (or to the client program), never to the mail.
HTTP_HEADERS = frozenset(
    name.lower()
    for name in (
        "Accept", "Accept-Charset", "Accept-Encoding", "Accept-Language",
        "Authorization", "Cache-Control", "Connection", "Content-Encoding",
        "Content-Length", "Cookie", "Expect", "Forwarded", "Host", "If-Match",
        "If-Modified-Since", "If-None-Match", "If-Range", "If-Unmodified-Since",
        "Keep-Alive", "Origin", "Pragma", "Proxy-Authorization", "Proxy-Connection",
        "Range", "Referer", "TE", "Trailer", "Transfer-Encoding", "Upgrade",
        "User-Agent", "Via", "X-Forwarded-For", "X-Forwarded-Host",
        "X-Forwarded-Proto", "X-Real-IP",
    )
)

#: What ``curl -d`` sends when told nothing else: treated as an unset Content-Type.
_FORM = "application/x-www-form-urlencoded"

_SINGLE = ("Subject", "From", "MIME-Version")


def _decode(name: str, value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise MessageError(name, "header value is not UTF-8") from None


def parse_send_request(recipient: str | None, headers, body: bytes) -> SendRequest:
    """A :class:`SendRequest` from the path's recipient, HTTP headers and the body.

    ``headers`` is an iterable of ``(name, [values])`` with names and values as bytes
    (``Headers.getAllRawHeaders()``).  Raises :class:`MessageError` naming the header.
    """
    fields: dict[str, list[str]] = {}
    extra: list[tuple[str, str]] = []
    for raw_name, raw_values in headers:
        try:
            name = raw_name.decode("ascii")
        except UnicodeDecodeError:
            raise MessageError(repr(raw_name)[:40], "not a valid header name") from None
        lname = name.lower()
        if lname in HTTP_HEADERS:
            continue
        values = [_decode(name, v) for v in raw_values]
        if lname in ("subject", "from", "to", "cc", "bcc", "content-type",
                     "mime-version"):
            fields.setdefault(lname, []).extend(values)
        else:
            extra.extend((name, v) for v in values)

    for name in _SINGLE:
        if len(fields.get(name.lower(), [])) > 1:
            raise MessageError(name, "give this header once")

    def one(name):
        values = fields.get(name)
        return values[0] if values else None

    to = [v.strip() for v in fields.get("to", [])]
    if recipient is None:
        if not to:
            raise MessageError(
                "To", "no recipient: give one in the path (/v1/send/<destination>/"
                "<recipient>) or in a To header")
        recipient, to = to[0], to[1:]

    # The first value is used when Content-Type is given more than once (reference).
    content_type = one("content-type")
    if content_type is not None and content_type.split(";")[0].strip().lower() == _FORM:
        content_type = None
    mime_version = one("mime-version")
    passthrough = (
        mime_version is not None
        and content_type is not None
        and content_type.strip().lower().startswith("multipart/mixed")
    )
    payload: str | bytes = body
    if not passthrough:
        maintype, _, params = parse_content_type(content_type)
        if maintype == "text":
            charset = params.get("charset") or "us-ascii"
            try:
                payload = body.decode(charset)
            except LookupError:
                raise MessageError("Content-Type", f"unknown charset {charset!r}") from None
            except UnicodeDecodeError:
                raise MessageError(
                    "Content-Type", f"the body is not valid {charset!r} text") from None
    return SendRequest(
        primary_recipient=recipient,
        body=payload,
        from_address=one("from"),
        subject=one("subject"),
        to=to,
        cc=fields.get("cc", []),
        bcc=fields.get("bcc", []),
        content_type=content_type,
        mime_version=mime_version,
        headers=extra,
    )


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


class BearerTokens:
    """The tokens that may use the send API (``http.send.tokens``).

    Only SHA-256 digests are kept, so neither a repr nor a memory dump of this object
    shows a token, and comparing digests in constant time does not reveal a token's
    length either.  No tokens: every request is allowed (the gateway allows that only
    on loopback).
    """

    def __init__(self, tokens: Iterable[str] = ()):
        self._digests = tuple(_digest(token.encode("utf-8")) for token in tokens)

    def __bool__(self) -> bool:
        return bool(self._digests)

    def __repr__(self) -> str:
        return f"<BearerTokens ({len(self._digests)})>"

    def check(self, authorization: bytes | None) -> int | None:
        """``None`` when a request with this ``Authorization`` header may pass; 401
        when it carries no bearer token, 403 when the token is not one of ours."""
        if not self._digests:
            return None
        scheme, _, credentials = (authorization or b"").strip().partition(b" ")
        credentials = credentials.strip()
        if scheme.lower() != b"bearer" or not credentials:
            return 401
        presented = _digest(credentials)
        match = False
        for expected in self._digests:  # no early exit: every token costs the same
            match |= hmac.compare_digest(presented, expected)
        return None if match else 403


# -- the audit line of a request (SPEC 9.3) ---------------------------------------------


def recipient_count(addresses) -> int:
    """How many distinct addresses (case-insensitively) are in ``addresses``."""
    return len({a.strip().lower() for a in addresses if a and a.strip()})


def body_size(request: Any) -> int:
    """The size of a twisted.web request's body (read it before the request finishes:
    Twisted drops the body then)."""
    content = getattr(request, "content", None)
    if content is None:
        return 0
    position = content.tell()
    try:
        return content.seek(0, 2)
    finally:
        content.seek(position)


def send_audit_for(path: list, headers: Any, status: int, when: float, size: int) -> SendAudit:
    """The :class:`SendAudit` of a finished send API request: ``path`` is its
    ``[destination, recipient?]`` (bytes), ``headers`` its request headers, ``status``
    its answer (499 when the client went away first), ``size`` the body bytes read."""
    def texts(values) -> list[str]:
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in values or ()]

    path = texts(path)
    named = path[1:2] + [v for h in (b"to", b"cc", b"bcc") for v in texts(headers.getRawHeaders(h))]
    sender = None
    given = texts(headers.getRawHeaders(b"from"))
    if len(given) == 1:
        try:
            sender = check_address("From", given[0])
        except MessageError:
            pass  # not an address: nothing of it is written
    return SendAudit(
        time=when, destination=path[0] if path else "", from_=sender, recipients=recipient_count(named),
        bytes=size, status=status,
    )


class SendResource(Resource):
    """``POST /v1/send/<destination>[/<recipient>]``; mount it at ``/v1/send``.

    ``resolve(destination_name)`` gives a :class:`SendConfig`, a ``(host, port)`` of
    the gateway's SMTP listener for that destination, ``None`` for an unknown name, or
    a Deferred of one of these.  ``send(request, config)`` returns a Deferred of the
    final reply (default: :func:`~mailgw.send.send_message_deferred` in ``pool``, or in
    the reactor's thread pool).  ``tokens``: the :class:`BearerTokens` every request
    must present (none: no check).  ``audit`` (a :class:`~mailgw.audit.AuditLog`) gets
    one line per request, whatever its answer.
    """

    isLeaf = True

    def __init__(self, resolve: Callable, *, max_body_size: int = DEFAULT_MAX_BODY_SIZE,
                 send: Callable | None = None, reactor=None, pool=None,
                 tokens: BearerTokens | None = None, audit=None):
        super().__init__()
        self._resolve = resolve
        self._audit = audit
        self.max_body_size = max_body_size
        self._reactor = reactor
        self.tokens = tokens if tokens is not None else BearerTokens()
        self._send = send or (lambda req, cfg: send_message_deferred(req, cfg, reactor, pool))

    def render(self, request):
        if self._audit is not None:  # SPEC 9.3: every request, once answered (or abandoned)
            request.notifyFinish().addBoth(self._audited, request, body_size(request))
        # Access next: a caller without the token learns nothing else about the API.
        refusal = self.tokens.check(request.getHeader(b"authorization"))
        if refusal is not None:
            text, headers = self.refusal(refusal)
            for name, value in headers.items():
                request.setHeader(name, value)
            return _respond(request, refusal, text)
        if request.method != b"POST":
            request.setHeader(b"allow", b"POST")
            return _respond(request, 405, "use POST /v1/send/<destination>[/<recipient>]")
        return self.render_POST(request)

    def refusal(self, code: int) -> tuple[str, dict[bytes, bytes]]:
        """The text and extra headers of a 401, 403 or 413 answer (the same whether
        :class:`LimitedRequest` answers before the body or this resource after it)."""
        if code == 401:
            return ("unauthorized: send the header Authorization: Bearer <token>",
                    {b"WWW-Authenticate": b'Bearer realm="mailgw send API"'})
        if code == 403:
            return "forbidden: the bearer token is not valid", {}
        return _too_large(self.max_body_size), {}

    def refused_early(self, path: list, headers: Any, code: int) -> None:
        """Count and audit a request :class:`LimitedRequest` answered before its body."""
        metrics.SEND_REQUESTS.labels(str(code)).inc()
        if self._audit is not None:
            self._audit.write(send_audit_for(path, headers, code, self._audit.reactor.seconds(), 0))

    def render_POST(self, request):
        if len(request.postpath) == 2 and request.postpath[1] == b"":
            request.postpath = request.postpath[:1]
        if not 1 <= len(request.postpath) <= 2 or request.postpath[0] == b"":
            return _respond(request, 404, "use POST /v1/send/<destination>[/<recipient>]")
        try:
            segments = [s.decode("utf-8") for s in request.postpath]
        except UnicodeDecodeError:
            return _respond(request, 400, "the path is not UTF-8")
        destination = segments[0]
        recipient = segments[1] if len(segments) == 2 and segments[1] else None

        length = request.getHeader(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_size:
            return _respond(request, 413, self.refusal(413)[0])
        request.content.seek(0)
        body = request.content.read(self.max_body_size + 1)
        if len(body) > self.max_body_size:
            return _respond(request, 413, self.refusal(413)[0])

        try:
            mail = parse_send_request(
                recipient, request.requestHeaders.getAllRawHeaders(), body)
        except MessageError as e:
            return _respond(request, 400, f"bad request: {e}")

        finished = []
        request.notifyFinish().addBoth(finished.append)
        d = defer.maybeDeferred(self._resolve, destination)
        d.addCallback(self._config, destination)
        d.addCallback(lambda config: self._send(mail, config))
        d.addCallbacks(lambda reply: (200, reply), self._failure,
                       errbackArgs=(destination,))

        def done(result):
            if not finished:  # the client may have gone away meanwhile
                _finish(request, *result)

        d.addCallback(done)
        d.addErrback(lambda f: log.failure("send API response failed", f))
        return NOT_DONE_YET

    def _audited(self, result, request, size: int) -> None:
        answered = not isinstance(result, failure.Failure)
        status = request.code if answered else 499
        self._audit.write(send_audit_for(request.postpath, request.requestHeaders, status,
                                         self._audit.reactor.seconds(), size))

    @staticmethod
    def _config(resolved, destination: str) -> SendConfig:
        if resolved is None:
            raise _UnknownDestination(destination)
        if isinstance(resolved, SendConfig):
            return resolved
        host, port = resolved
        return SendConfig.via_gateway(destination, host, port)

    @staticmethod
    def _failure(failure, destination: str):
        if failure.check(_UnknownDestination):
            return 404, f"unknown destination {destination!r}"
        if failure.check(MessageError):
            return 400, f"bad request: {failure.value}"
        if failure.check(SendError):
            log.info("send via {destination} failed: {error}",
                     destination=destination, error=str(failure.value))
            return 502, f"not sent: {failure.value}"
        log.failure("send via {destination} failed unexpectedly", failure,
                    destination=destination)
        return 500, "internal error"


def _too_large(limit: int) -> str:
    return f"request body over the limit of {limit} bytes"


class _UnknownDestination(LookupError):
    pass


def _respond(request, code: int, text: str) -> bytes:
    """Set the status and headers; the body to return from ``render``."""
    metrics.SEND_REQUESTS.labels(str(code)).inc()
    body = (text.rstrip("\n") + "\n").encode("utf-8")
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    request.setHeader(b"content-length", str(len(body)).encode("ascii"))
    return body


def _finish(request, code: int, text: str) -> None:
    """Answer a request whose ``render`` returned NOT_DONE_YET."""
    body = _respond(request, code, text)
    request.write(body)
    request.finish()


class LimitedRequest(server.Request):
    """A request answered before its body when the body would be refused anyway.

    Twisted reads the whole body before a resource sees the request.  This class
    answers as soon as the headers are in (before ``100 Continue``): 401 or 403 for a
    send API request with a body but without a valid bearer token (so a caller without
    a token cannot make the gateway store megabytes), 413 when Content-Length announces
    more than ``max_body_size``; and 413 as soon as received bytes pass the limit
    (chunked bodies).  It then discards the rest and closes the connection after a
    short linger, so the client can read the answer.  ``send`` (the site's
    :class:`SendResource`, if any) gives the texts and counts and audits the answers.
    """

    max_body_size = DEFAULT_MAX_BODY_SIZE
    send: SendResource | None = None
    #: Seconds to keep discarding the client's upload after answering.
    linger = 2.0

    _received = 0
    _refused = False

    def gotLength(self, length):
        code = self._refusal_before_body(length)
        if code is not None:
            self.content = io.BytesIO()
            self._refuse(code)
            return
        super().gotLength(length)

    def handleContentChunk(self, data):
        if self._refused:
            return
        self._received += len(data)
        if self._received > self.max_body_size:
            self.content = io.BytesIO()
            self._refuse(413)
            return
        super().handleContentChunk(data)

    def requestReceived(self, command, path, version):
        if self._refused:
            self.channel.loseConnection()
            return
        super().requestReceived(command, path, version)

    def _send_path(self) -> list | None:
        """``[destination, recipient?]`` of a send API request; None for another path.
        The request line is all Twisted has parsed when the headers are in."""
        if self.send is None:
            return None
        target = urlsplit(self.channel._path).path
        if not target.startswith(SEND_PREFIX):
            return None
        return [segment for segment in target[len(SEND_PREFIX):].split(b"/")[:2] if segment]

    def _refusal_before_body(self, length) -> int | None:
        if length != 0 and self._send_path() is not None:  # None: chunked, a body follows
            code = self.send.tokens.check(self.getHeader(b"authorization"))
            if code is not None:
                return code
        if length is not None and length > self.max_body_size:
            return 413
        return None

    def _refuse(self, code: int) -> None:
        self._refused = True
        path = self._send_path()
        if path is not None:
            text, headers = self.send.refusal(code)
            self.send.refused_early(path, self.requestHeaders, code)
        else:
            text, headers = _too_large(self.max_body_size), {}
        # No "100 Continue" after the answer: the client must not send the body.
        self.requestHeaders.removeHeader(b"expect")
        body = (text + "\n").encode("utf-8")
        head = [b"HTTP/1.1 %d %s" % (code, http.RESPONSES[code]),
                b"Content-Type: text/plain; charset=utf-8",
                b"Content-Length: %d" % len(body),
                b"Connection: close"]
        head += [name + b": " + value for name, value in headers.items()]
        self.channel.transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        self.channel.persistent = False
        from twisted.internet import reactor

        reactor.callLater(self.linger, self.channel.loseConnection)


#: Where the send API is mounted (:func:`mailgw.web.make_site`).
SEND_PREFIX = b"/v1/send/"


def limited_request_factory(send: SendResource | None = None, *, max_body_size: int | None = None):
    """A ``Site.requestFactory`` answering early the requests whose body would be
    refused (see :class:`LimitedRequest`): with the site's ``send`` resource, its body
    limit and bearer tokens; without (a site taking no bodies), ``max_body_size``."""
    limit = max_body_size if max_body_size is not None else (send.max_body_size if send else DEFAULT_MAX_BODY_SIZE)
    return type("LimitedRequest", (LimitedRequest,), {"max_body_size": limit, "send": send})
