"""OAuth2 access tokens: grants through requests-oauthlib, a cache, single flight.

- :class:`TokenClient` runs the three grants (client credentials, refresh token,
  authorisation code) with requests-oauthlib in a private thread pool -- never on the
  reactor thread -- and hands back Deferreds that fire with an :class:`AccessToken` or
  fail with a :class:`TokenError`.
- :class:`TokenCache` keeps tokens until shortly before they expire and lets concurrent
  callers for the same key share one in-flight request (SPEC section 3).
- :class:`TokenProvider` ties both to a :class:`~mailgw.destination.Destination`.

Secrets (client secrets, refresh tokens, authorisation codes, access tokens) never reach
an exception message, a ``repr`` or a log line.  Exceptions from requests and oauthlib
can carry request bodies or URLs, so they are never chained or logged: we build our own
:class:`TokenError` outside the ``except`` block, so it has no ``__context__`` either.
Text that comes from the token service (``error_description``, the HTTP reason) is
redacted of every credential the request carried, in the forms a service may echo them:
as sent, URL-encoded, base64, and the ``Authorization: Basic`` value (SPEC 9.6).

Bounds (SPEC 9.6): a token response over :data:`MAX_RESPONSE_BYTES` is refused (read in
chunks, never further than the cap); each request ends at its deadline however slowly the
service trickles bytes -- the reactor shuts the request's socket down, so the pool thread
stops too, and the request's concurrency slot is free at once.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import math
import re
import socket
import threading
import time
from typing import Any
from urllib.parse import quote, quote_plus, urlsplit

import requests
import urllib3
from attrs import define, field, frozen
from oauthlib.oauth2 import BackendApplicationClient, InsecureTransportError, WebApplicationClient
from requests.adapters import HTTPAdapter
from requests.auth import HTTPBasicAuth
from requests_oauthlib import OAuth2Session
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from twisted.application.service import MultiService
from twisted.internet.defer import CancelledError, Deferred, DeferredSemaphore, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from . import metrics
from .blocking import BlockingPool, PoolStopped
from .cache import SingleFlightCache
from .destination import OAUTH2_AUTHORIZATION_CODE, OAUTH2_REFRESH_TOKEN, Destination

log = Logger(namespace="mailgw.oauth")

#: Token service responses larger than this are refused (SPEC 9.6).
MAX_RESPONSE_BYTES = 1024 * 1024
#: Read size for token responses: also bounds what one read may decompress to.
_CHUNK = 16 * 1024

#: Lifetime assumed for a token whose response has no ``expires_in``.
DEFAULT_LIFETIME = 300.0
#: How long before expiry a cached token stops being handed out.
DEFAULT_MARGIN = 60.0

CLIENT_CREDENTIALS = "client_credentials"
REFRESH_TOKEN = "refresh_token"
AUTHORIZATION_CODE = "authorization_code"
CLIENT_AUTH_METHODS = ("basic", "body")

#: Error codes of our own (besides the token service's ``error`` values).
UNREACHABLE = "unreachable"
TIMEOUT = "timeout"
TLS_ERROR = "tls_error"
HTTP_ERROR = "http_error"
MALFORMED_RESPONSE = "malformed_response"
INSECURE_TRANSPORT = "insecure_transport"
INVALID_CONFIGURATION = "invalid_configuration"
STOPPED = "stopped"
INTERNAL_ERROR = "internal_error"
RESPONSE_TOO_LARGE = "response_too_large"

#: Our own error codes: anything else is the token service's OAuth2 ``error`` (a refusal).
OWN_ERROR_CODES = frozenset({
    UNREACHABLE, TIMEOUT, TLS_ERROR, HTTP_ERROR, MALFORMED_RESPONSE, INSECURE_TRANSPORT,
    INVALID_CONFIGURATION, STOPPED, INTERNAL_ERROR, RESPONSE_TOO_LARGE,
})


class TokenError(Exception):
    """A token could not be obtained.

    ``error_code`` is the token service's ``error`` (``invalid_grant``,
    ``invalid_client``, ...) or one of ours: ``unreachable``, ``timeout``, ``tls_error``,
    ``http_error`` (a non-2xx answer without an OAuth2 error), ``malformed_response``,
    ``insecure_transport``, ``invalid_configuration``, ``stopped``, ``internal_error``.
    The message names the token service host and the cause, never a secret.
    """

    def __init__(self, error_code: str, message: str, *, host: str | None = None, status: int | None = None):
        super().__init__(message)
        self.error_code = error_code
        self.message = message
        self.host = host
        self.status = status

    def __repr__(self) -> str:
        return f"TokenError({self.error_code!r}, {self.message!r})"


@frozen
class AccessToken:
    """An access token as the token service issued it.

    ``expires_in`` is the lifetime granted (``DEFAULT_LIFETIME`` when the service sent
    none); ``expires_at`` is the receiving reactor's time plus that lifetime.
    """

    access_token: str = field(repr=False)
    expires_at: float
    token_type: str = "Bearer"
    refresh_token: str | None = field(default=None, repr=False)
    expires_in: float = DEFAULT_LIFETIME
    scope: str | None = None


# ---------------------------------------------------------------------------------------
# helpers that keep secrets out of messages


def _host(url: str | None) -> str:
    """``host[:port]`` of a URL, without user info, path or query."""
    try:
        parts = urlsplit(url or "")
        host = parts.hostname or "?"
        port = parts.port
    except ValueError:
        return "?"
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{port}" if port else host


_ERROR_CODE_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_UNPRINTABLE_RE = re.compile(r"[^\x20-\x7e]")


def _b64_forms(data: bytes) -> set[str]:
    standard = base64.b64encode(data).decode("ascii")
    urlsafe = base64.urlsafe_b64encode(data).decode("ascii")
    return {standard, urlsafe, standard.rstrip("="), urlsafe.rstrip("=")}


def secret_forms(secrets: tuple[str, ...], client_id: str | None = None, client_secret: str | None = None) -> tuple[str, ...]:
    """Every form in which a token request carries ``secrets`` and a service may echo
    them: as they are, URL-encoded (path and form style), base64 (standard and URL-safe,
    with and without padding), and the value of ``Authorization: Basic`` for
    ``client_id:client_secret`` (raw, as requests sends it, and form-encoded, as RFC 6749
    asks).  Longest first, so a longer form is replaced before a part of it."""
    forms: set[str] = set()
    for secret in secrets:
        if not secret:
            continue
        forms |= {secret, quote(secret, safe=""), quote(secret), quote_plus(secret)}
        forms |= _b64_forms(secret.encode("utf-8"))
    if client_id is not None and client_secret:
        for pair in (f"{client_id}:{client_secret}", f"{quote_plus(client_id)}:{quote_plus(client_secret)}"):
            forms |= _b64_forms(pair.encode("utf-8"))
            try:
                forms |= _b64_forms(pair.encode("latin-1"))
            except UnicodeEncodeError:
                pass
    return tuple(sorted((f for f in forms if f), key=len, reverse=True))


def _redact(text: str, forms: tuple[str, ...]) -> str:
    """``text`` with every occurrence of every form replaced by ``***`` (ignoring case:
    percent-encodings come in either, and redacting too much is harmless)."""
    for form in forms:
        text = re.sub(re.escape(form), "***", text, flags=re.IGNORECASE)
    return text


def safe_description(value: Any, forms: tuple[str, ...]) -> str:
    """A text a service sent, fit for an error message: secrets in ``forms`` redacted,
    printable, at most 200 characters."""
    if not isinstance(value, str):
        return ""
    text = _UNPRINTABLE_RE.sub("?", _redact(value, forms)).strip()
    return text[:200] + ("..." if len(text) > 200 else "")


class _DropBelowWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


def _quiet_requests_oauthlib() -> None:
    # requests-oauthlib logs request bodies (client secret, refresh token, code) and the
    # token it obtained at DEBUG level on the stdlib logger; drop those records.
    logger = logging.getLogger("requests_oauthlib.oauth2_session")
    if not any(isinstance(f, _DropBelowWarning) for f in logger.filters):
        logger.addFilter(_DropBelowWarning())


# ---------------------------------------------------------------------------------------
# the blocking part (runs in the pool)


@frozen
class _Grant:
    grant_type: str
    token_url: str
    client_id: str
    client_secret: str = field(repr=False)
    client_auth: str = "basic"
    scope: str | None = None
    tenant: str | None = None
    refresh_token: str | None = field(default=None, repr=False)
    code: str | None = field(default=None, repr=False)
    redirect_uri: str | None = None

    @property
    def host(self) -> str:
        return _host(self.token_url)

    @property
    def secrets(self) -> tuple[str, ...]:
        return tuple(s for s in (self.client_secret, self.refresh_token, self.code) if s)

    @property
    def redacted_forms(self) -> tuple[str, ...]:
        """What to remove from any text the token service sends back."""
        return secret_forms(self.secrets, self.client_id, self.client_secret)

    def describe(self) -> str:
        text = f"{self.grant_type} grant for client {self.client_id!r}"
        return text + (f", tenant {self.tenant!r}" if self.tenant else "")


@frozen
class _Response:
    """A validated token response (before the reactor stamps ``expires_at``)."""

    access_token: str = field(repr=False)
    token_type: str
    expires_in: float
    refresh_token: str | None = field(repr=False)
    scope: str | None


class _Abandoned(Exception):
    """The caller gave up (timeout, stop) before the pool got to the request."""


def _parse_response(response: requests.Response, grant: _Grant) -> _Response:
    """Validate a token endpoint response or raise :class:`TokenError`."""
    host = grant.host
    status = response.status_code
    forms = grant.redacted_forms
    # Said in error texts, so like any text the service sends: redacted and bounded.
    content_type = safe_description((response.headers.get("Content-Type") or "").split(";")[0].strip().lower(), forms)[:80]
    obj: Any = None
    try:
        obj = json.loads(response.content)
    except (ValueError, RecursionError):
        obj = None
    where = f"token service {host}"
    if isinstance(obj, dict) and isinstance(obj.get("error"), str) and obj["error"]:
        code = obj["error"]
        if not _ERROR_CODE_RE.fullmatch(code) or _redact(code, forms) != code:
            code = "unknown_error"  # not an OAuth2 error code, or one that echoes a secret
        description = safe_description(obj.get("error_description"), forms)
        message = f"{where} refused the {grant.describe()}: {code}"
        if description:
            message += f" ({description})"
        raise TokenError(code, f"{message} [HTTP {status}]", host=host, status=status)
    if not 200 <= status < 300:
        reason = safe_description(response.reason, forms)
        raise TokenError(
            HTTP_ERROR, f"{where} answered HTTP {status} {reason}".rstrip() + f" to the {grant.describe()}", host=host, status=status
        )
    if obj is None:
        raise TokenError(
            MALFORMED_RESPONSE,
            f"{where} answered the {grant.describe()} with a body that is not JSON ({content_type or 'no content type'})",
            host=host,
            status=status,
        )
    if not isinstance(obj, dict):
        raise TokenError(MALFORMED_RESPONSE, f"{where} answered the {grant.describe()} with JSON that is not an object", host=host, status=status)

    def malformed(what: str) -> TokenError:
        return TokenError(MALFORMED_RESPONSE, f"{where} answered the {grant.describe()} {what}", host=host, status=status)

    access_token = obj.get("access_token")
    if not isinstance(access_token, str) or not access_token:
        raise malformed("without an access_token")
    if any(c.isspace() or ord(c) < 0x21 or ord(c) == 0x7F for c in access_token):
        raise malformed("with an access_token that contains invalid characters")
    token_type = obj.get("token_type", "Bearer")
    if token_type is None:
        token_type = "Bearer"
    if not isinstance(token_type, str) or not token_type:
        raise malformed("with an invalid token_type")
    if token_type.lower() == "bearer":
        token_type = "Bearer"
    raw_expires = obj.get("expires_in")
    if raw_expires is None:
        expires_in = DEFAULT_LIFETIME
    else:
        if isinstance(raw_expires, bool):
            raise malformed("with an invalid expires_in")
        try:
            expires_in = float(raw_expires)
        except (TypeError, ValueError, OverflowError):
            raise malformed("with an invalid expires_in") from None
        if not math.isfinite(expires_in):
            raise malformed("with an invalid expires_in")
        expires_in = max(0.0, expires_in)
    refresh = obj.get("refresh_token")
    if not isinstance(refresh, str) or not refresh:
        refresh = None
    scope = obj.get("scope")
    if isinstance(scope, list) and all(isinstance(s, str) for s in scope):
        scope = " ".join(scope)
    if not isinstance(scope, str) or not scope:
        scope = None
    return _Response(access_token, token_type, expires_in, refresh, scope)


class _ResponseTooLarge(requests.exceptions.RequestException):
    """The token service's response passed :data:`MAX_RESPONSE_BYTES`."""


class _DeadlinePassed(requests.exceptions.Timeout):
    """The request's deadline passed while the response was still arriving."""


class _SocketWatch:
    """The sockets of one token request, so the reactor thread can shut them down at
    the request's deadline: the pool thread blocked in a read then returns at once.

    Each socket is kept as a duplicate of its file descriptor: shutting the duplicate
    down ends the connection (TLS wraps the original, which then loses its descriptor),
    and closing it (:meth:`close`, when the request ends) leaves the original alone.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self.interrupted = False

    def register(self, sock: socket.socket) -> None:
        duplicate = sock.dup()
        with self._lock:
            if not self.interrupted:
                self._sockets.append(duplicate)
                return
        _shut(duplicate)  # the deadline passed while this socket was connecting
        duplicate.close()

    def interrupt(self) -> None:
        """Shut every socket of the request down (any thread)."""
        with self._lock:
            self.interrupted = True
            for sock in self._sockets:
                _shut(sock)

    def close(self) -> None:
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            sock.close()


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed by the peer or by us


def _watched_pools(watch: _SocketWatch) -> dict[str, type]:
    """urllib3 connection pools whose connections register their sockets with ``watch``
    as soon as TCP connects (before a TLS handshake that may trickle too).

    ``_new_conn`` is the method urllib3's HTTP and HTTPS connections both create their
    socket in (urllib3 1.x and 2.x alike); it is the one place to see the socket before
    TLS wraps it.
    """

    class WatchedHTTPConnection(HTTPConnection):
        def _new_conn(self) -> socket.socket:
            sock = super()._new_conn()
            watch.register(sock)
            return sock

    class WatchedHTTPSConnection(HTTPSConnection):
        def _new_conn(self) -> socket.socket:
            sock = super()._new_conn()
            watch.register(sock)
            return sock

    class WatchedHTTPConnectionPool(HTTPConnectionPool):
        ConnectionCls = WatchedHTTPConnection

    class WatchedHTTPSConnectionPool(HTTPSConnectionPool):
        ConnectionCls = WatchedHTTPSConnection

    return {"http": WatchedHTTPConnectionPool, "https": WatchedHTTPSConnectionPool}


class _BoundedAdapter(HTTPAdapter):
    """The transport of one token request: no retries, every socket watched (see
    :class:`_SocketWatch`), each read bounded by the time left until ``deadline`` (a
    ``time.monotonic()`` value), and the response body read in chunks up to
    ``max_bytes`` -- one byte more fails the request with :class:`_ResponseTooLarge`.
    requests-oauthlib then reads the body from the bounded copy as usual.
    """

    def __init__(self, watch: _SocketWatch, deadline: float, max_bytes: int = MAX_RESPONSE_BYTES):
        self._watch = watch
        self._deadline = deadline
        self._max_bytes = max_bytes
        super().__init__(max_retries=0)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _watched_pools(self._watch)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if not proxy.lower().startswith("socks"):  # SOCKS managers bring their own connections
            manager.pool_classes_by_scheme = _watched_pools(self._watch)
        return manager

    def _left(self) -> float:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise _DeadlinePassed("the token request's deadline passed")
        return left

    def send(self, request: requests.PreparedRequest, stream: bool = False, timeout: Any = None, **kwargs: Any) -> requests.Response:
        left = self._left()
        response = super().send(request, stream=True, timeout=(left, left), **kwargs)
        try:
            body = self._read_bounded(response)
        finally:
            response.close()
        headers = {k: v for k, v in response.raw.headers.items() if k.lower() not in ("content-encoding", "transfer-encoding", "content-length")}
        raw = urllib3.HTTPResponse(
            body=io.BytesIO(body), headers=headers, status=response.status_code, reason=response.reason,
            preload_content=False, decode_content=False,
        )
        return self.build_response(request, raw)

    def _read_bounded(self, response: requests.Response) -> bytes:
        chunks, size = [], 0
        while True:
            self._left()  # a trickle that beats each read's timeout still meets the deadline
            chunk = response.raw.read(_CHUNK, decode_content=True)
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > self._max_bytes:
                raise _ResponseTooLarge(f"response over {self._max_bytes} bytes")
            chunks.append(chunk)


def _request_blocking(grant: _Grant, budget: float, abandoned: threading.Event, watch: _SocketWatch) -> _Response:
    """Run one grant with requests-oauthlib within ``budget`` seconds from now.  Blocks:
    call it in a pool thread; the reactor interrupts it through ``watch``."""
    if abandoned.is_set():
        raise _Abandoned()
    deadline = time.monotonic() + budget
    parsed: list[_Response] = []

    def check(response: requests.Response) -> requests.Response:
        # Our validation runs before oauthlib's own parsing; a TokenError raised here
        # travels out of requests-oauthlib unchanged.
        parsed.append(_parse_response(response, grant))
        return response

    if grant.grant_type == CLIENT_CREDENTIALS:
        client = BackendApplicationClient(client_id=grant.client_id, scope=grant.scope)
    else:
        client = WebApplicationClient(client_id=grant.client_id, scope=grant.scope)
    in_body = grant.client_auth == "body"
    auth = None if in_body else HTTPBasicAuth(grant.client_id, grant.client_secret)
    error: TokenError | None = None
    where = f"token service {grant.host}"
    try:
        with OAuth2Session(client=client, redirect_uri=grant.redirect_uri) as session:
            adapter = _BoundedAdapter(watch, deadline)
            session.mount("https://", adapter)
            session.mount("http://", adapter)
            # A compressed body could expand far past what was read: ask for none.
            session.headers["Accept-Encoding"] = "identity"
            session.register_compliance_hook("access_token_response", check)
            session.register_compliance_hook("refresh_token_response", check)
            if grant.grant_type == REFRESH_TOKEN:
                extra = {"client_id": grant.client_id, "client_secret": grant.client_secret} if in_body else {}
                session.refresh_token(grant.token_url, refresh_token=grant.refresh_token, auth=auth, timeout=budget, **extra)
            else:
                session.fetch_token(
                    grant.token_url,
                    code=grant.code if grant.grant_type == AUTHORIZATION_CODE else None,
                    auth=auth,
                    include_client_id=in_body,
                    client_secret=grant.client_secret if in_body else None,
                    timeout=budget,
                )
    except TokenError as exc:
        error = TokenError(exc.error_code, exc.message, host=exc.host, status=exc.status)
    except _ResponseTooLarge:
        error = TokenError(
            RESPONSE_TOO_LARGE, f"{where} answered the {grant.describe()} with more than {MAX_RESPONSE_BYTES // 1024} KiB", host=grant.host
        )
    except requests.exceptions.Timeout:
        error = TokenError(TIMEOUT, f"{where} did not answer the {grant.describe()} within {budget:g}s", host=grant.host)
    except requests.exceptions.SSLError:
        error = TokenError(TLS_ERROR, f"TLS with {where} failed ({grant.describe()})", host=grant.host)
    except requests.exceptions.ConnectionError:
        error = TokenError(UNREACHABLE, f"{where} is unreachable ({grant.describe()})", host=grant.host)
    except requests.exceptions.RequestException as exc:
        error = TokenError(UNREACHABLE, f"request to {where} failed: {type(exc).__name__} ({grant.describe()})", host=grant.host)
    except InsecureTransportError:
        error = TokenError(INSECURE_TRANSPORT, f"{where}: token URL must use https ({grant.describe()})", host=grant.host)
    except Exception as exc:  # oauthlib's own parsing after ours (e.g. a scope Warning)
        if not parsed:
            error = TokenError(MALFORMED_RESPONSE, f"{where}: unusable answer to the {grant.describe()} ({type(exc).__name__})", host=grant.host)
    finally:
        watch.close()
    if abandoned.is_set():
        raise _Abandoned()  # interrupted at the deadline or by stop: the caller has moved on
    if error is not None:
        raise error  # raised here, outside the except blocks: no __context__ with secrets
    if not parsed:
        raise TokenError(MALFORMED_RESPONSE, f"{where}: no usable answer to the {grant.describe()}", host=grant.host)
    return parsed[-1]


# ---------------------------------------------------------------------------------------
# the client


@define
class _Call:
    grant: _Grant
    abandoned: threading.Event = field(factory=threading.Event)
    watch: _SocketWatch = field(factory=_SocketWatch)
    reason: str | None = None
    deferred: Deferred | None = None


class TokenClient(MultiService):
    """Obtains tokens from token services, off the reactor thread.

    ``deadline`` (gateway.yaml ``timeouts.token``) bounds a whole
    call, waiting for a slot included, however slowly the service trickles bytes: the
    Deferred then fails with ``timeout``, the slot is free for the next call, and the
    request's socket is shut down so its pool thread stops too.  At most
    ``max_concurrent`` (default ``pool_size``) requests run at once.  Responses over
    :data:`MAX_RESPONSE_BYTES` are refused (``response_too_large``).

    Every request counts in ``mailgw_token_requests_total{grant, outcome}`` (``ok``;
    ``refused``: the service answered with an OAuth2 error; ``timeout``; ``error``:
    anything else) and ``mailgw_token_request_seconds{grant}``.

    A twisted service: its :class:`~mailgw.blocking.BlockingPool` starts and stops with
    it (:meth:`start` / :meth:`stop` do the same for callers without a service tree).
    """

    def __init__(
        self,
        reactor: Any,
        pool_size: int = 4,
        deadline: float = 10.0,
        max_concurrent: int | None = None,
    ) -> None:
        super().__init__()
        self._reactor = reactor
        self.deadline = float(deadline)
        self.max_concurrent = max_concurrent or pool_size
        self._semaphore = DeferredSemaphore(self.max_concurrent)
        # A thread for every request admitted at once: a request that waits for a thread
        # inside the pool would spend its deadline there.
        self.pool = BlockingPool(reactor, "mailgw-oauth", max(pool_size, self.max_concurrent))
        self.pool.setServiceParent(self)
        self._call_objs: dict[int, _Call] = {}
        _quiet_requests_oauthlib()

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def started(self) -> bool:
        return self.pool.started

    def start(self) -> None:
        """Start the private thread pool."""
        if not self.running:
            self.startService()

    def stop(self) -> Deferred[None]:
        """Fail calls in flight with ``stopped`` and join the pool's threads (in a
        helper thread: the returned Deferred fires when it is done)."""
        if not self.running:
            return succeed(None)
        return self.stopService()

    def stopService(self) -> Deferred[None]:
        for call in list(self._call_objs.values()):
            self._abandon(call, STOPPED)
        return super().stopService()

    # -- grants ---------------------------------------------------------------------------

    def client_credentials(
        self,
        token_url: str,
        client_id: str,
        client_secret: str,
        scope: str | None = None,
        tenant: str | None = None,
        client_auth: str = "basic",
    ) -> Deferred[AccessToken]:
        """The client-credentials grant.  ``tenant`` is only used in messages."""
        return self._grant(CLIENT_CREDENTIALS, token_url, client_id, client_secret, client_auth, scope=scope, tenant=tenant)

    def exchange(
        self,
        grant_type: str,
        token_url: str,
        client_id: str,
        client_secret: str,
        secret: str,
        *,
        scope: str | None = None,
        tenant: str | None = None,
        client_auth: str = "basic",
        redirect_uri: str | None = None,
    ) -> Deferred[AccessToken]:
        """Exchange what an application presented: the refresh-token grant (``secret`` is
        the refresh token) or the authorisation-code grant (``secret`` is the code,
        ``redirect_uri`` the one it was issued for), with client authentication (Basic
        or in the body)."""
        what = {REFRESH_TOKEN: "refresh token", AUTHORIZATION_CODE: "authorization code"}.get(grant_type)
        if what is None:
            raise ValueError(f"exchange() takes the refresh_token or authorization_code grant, not {grant_type!r}")
        if not secret:
            return fail(TokenError(INVALID_CONFIGURATION, f"empty {what}", host=_host(token_url)))
        secrets = {"refresh_token": secret} if grant_type == REFRESH_TOKEN else {"code": secret, "redirect_uri": redirect_uri}
        return self._grant(grant_type, token_url, client_id, client_secret, client_auth, scope=scope, tenant=tenant, **secrets)

    # -- machinery ----------------------------------------------------------------------

    def _grant(self, grant_type: str, token_url: str, client_id: str, client_secret: str, client_auth: str, **kw: Any) -> Deferred[AccessToken]:
        if client_auth not in CLIENT_AUTH_METHODS:
            raise ValueError(f"client_auth must be one of {CLIENT_AUTH_METHODS}, not {client_auth!r}")
        host = _host(token_url)
        if not token_url or not client_id or client_secret is None:
            return fail(TokenError(INVALID_CONFIGURATION, f"token URL, client id and client secret are required ({host})", host=host))
        grant = _Grant(grant_type, token_url, client_id, client_secret, client_auth, **kw)
        if not self.pool.started:
            return fail(TokenError(STOPPED, f"token client is not running ({grant.describe()} at {host})", host=host))
        return self._run(grant)

    def _run(self, grant: _Grant) -> Deferred[AccessToken]:
        call = _Call(grant)
        started = self._reactor.seconds()

        def in_pool() -> Deferred[_Response]:
            if call.abandoned.is_set():  # stopped or timed out while it waited for a slot
                raise _Abandoned()
            left = self.deadline - (self._reactor.seconds() - started)
            return self.pool(_request_blocking, grant, max(0.001, left), call.abandoned, call.watch)

        log.debug("token request: {grant} at {host}", grant=grant.describe(), host=grant.host)
        d = self._semaphore.run(in_pool)
        call.deferred = d
        self._call_objs[id(call)] = call
        timer = self._reactor.callLater(self.deadline, self._abandon, call, TIMEOUT)

        def finish(result: Any) -> Any:
            self._call_objs.pop(id(call), None)
            if timer.active():
                timer.cancel()
            elapsed = self._reactor.seconds() - started
            if isinstance(result, Failure):
                call.abandoned.set()
                call.watch.interrupt()  # cancelled or failed: the thread need not go on
                error = self._error_for(call, result)
                if error is None:
                    return result  # cancelled by our caller: CancelledError, as usual (not counted)
                _count(grant, _outcome(error), elapsed)
                log.warn(
                    "token request failed: {error_code}: {reason} ({elapsed:.3f}s)",
                    error_code=error.error_code,
                    reason=error.message,
                    elapsed=elapsed,
                )
                return Failure(error)
            _count(grant, "ok", elapsed)
            log.info(
                "token obtained: {grant} at {host}, expires in {expires_in:g}s ({elapsed:.3f}s)",
                grant=grant.describe(),
                host=grant.host,
                expires_in=result.expires_in,
                elapsed=elapsed,
            )
            return AccessToken(
                access_token=result.access_token,
                expires_at=self._reactor.seconds() + result.expires_in,
                token_type=result.token_type,
                refresh_token=result.refresh_token,
                expires_in=result.expires_in,
                scope=result.scope,
            )

        d.addBoth(finish)
        return d

    def _error_for(self, call: _Call, failure: Failure) -> TokenError | None:
        grant = call.grant
        if failure.check(TokenError):
            return failure.value
        if failure.check(CancelledError, _Abandoned, PoolStopped):
            if failure.check(PoolStopped):
                call.reason = call.reason or STOPPED
            if call.reason == TIMEOUT:
                return TokenError(
                    TIMEOUT, f"token service {grant.host} did not answer the {grant.describe()} within {self.deadline:g}s", host=grant.host
                )
            if call.reason == STOPPED:
                return TokenError(STOPPED, f"token client stopped during the {grant.describe()} at {grant.host}", host=grant.host)
            return None
        # A bug of ours: never show the exception itself, it might hold a secret.
        log.error("token request: unexpected {type} ({grant})", type=failure.type.__name__, grant=grant.describe())
        return TokenError(INTERNAL_ERROR, f"internal error during the {grant.describe()} at {grant.host}", host=grant.host)

    def _abandon(self, call: _Call, reason: str) -> None:
        call.reason = reason
        call.abandoned.set()
        call.watch.interrupt()  # a thread blocked in a read returns now
        if call.deferred is not None and id(call) in self._call_objs:
            call.deferred.cancel()  # frees the slot: DeferredSemaphore.run releases on cancel


def _outcome(error: TokenError) -> str:
    if error.error_code == TIMEOUT:
        return "timeout"
    return "error" if error.error_code in OWN_ERROR_CODES else "refused"


def _count(grant: _Grant, outcome: str, elapsed: float) -> None:
    metrics.TOKEN_REQUESTS.labels(grant.grant_type, outcome).inc()
    metrics.TOKEN_REQUEST_SECONDS.labels(grant.grant_type).observe(elapsed)


# ---------------------------------------------------------------------------------------
# the cache


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def client_credentials_key(
    token_url: str, client_id: str, client_secret: str, tenant: str | None = None, scope: str | None = None
) -> tuple:
    """Cache key of a client-credentials token.  The client secret is part of it (as a
    SHA-256) so a destination with a wrong secret never gets another's cached token."""
    return (CLIENT_CREDENTIALS, token_url, client_id, _digest(client_secret), tenant, scope)


def exchange_key(token_url: str, client_id: str, client_secret: str, secret: str) -> tuple:
    """Cache key of a token exchanged for ``secret``: only SHA-256s of secrets are kept."""
    return ("exchange", token_url, client_id, _digest(client_secret), _digest(secret))


class TokenCache(SingleFlightCache):
    """Access tokens by key until ``margin`` seconds before expiry; single flight.

    A token is handed out until ``obtained + expires_in - m`` on ``clock``, where ``m``
    is ``margin`` or, for tokens shorter lived than twice the margin, half the lifetime
    (so a short-lived token is still shared, and no entry has a negative lifetime).
    Failures are delivered to every waiter and are not cached.
    """

    def __init__(self, clock: Any, margin: float = DEFAULT_MARGIN, max_entries: int = 10000, observe=None) -> None:
        self.margin = max(0.0, float(margin))
        super().__init__(clock, self._token_lifetime, max_entries=max_entries, observe=observe)

    def _token_lifetime(self, result: Any) -> float | None:
        if isinstance(result, Failure):
            return None
        lifetime = max(0.0, result.expires_in)
        return lifetime - min(self.margin, lifetime / 2)


# ---------------------------------------------------------------------------------------
# the facade


class TokenProvider:
    """Tokens for destinations: the client-credentials grant, or an exchange of the
    refresh token / authorisation code an application presents, through the cache.

    Each destination says how its client authenticates (``tokenServiceAuthentication``);
    ``client_auth`` is the connectivity proxy's client's."""

    def __init__(self, client: TokenClient, cache: TokenCache, client_auth: str = "basic") -> None:
        if client_auth not in CLIENT_AUTH_METHODS:
            raise ValueError(f"client_auth must be one of {CLIENT_AUTH_METHODS}, not {client_auth!r}")
        self.client = client
        self.cache = cache
        self.client_auth = client_auth

    def _url(self, destination: Destination, tenant: str | None) -> str | None:
        url = destination.with_tenant_token_url(tenant)
        if url is not None and "{tenant}" in url:
            return None  # a Common URL with a placeholder but no tenant to put in it
        return url

    def _missing(self, destination: Destination, tenant: str | None) -> Deferred[AccessToken]:
        url = destination.token_service_url or ""
        if "{tenant}" in url and not tenant:
            problem = "has a tokenServiceURL with {tenant} but the route has no tenant"
        else:
            problem = "has no tokenServiceURL, clientId or clientSecret"
        return fail(TokenError(INVALID_CONFIGURATION, f"destination {destination.name!r} {problem}", host=_host(url)))

    def client_credentials_key(self, destination: Destination, tenant: str | None = None) -> tuple:
        return client_credentials_key(
            self._url(destination, tenant) or "", destination.client_id or "", destination.client_secret or "", tenant, destination.scope
        )

    def for_client_credentials(self, destination: Destination, tenant: str | None = None) -> Deferred[AccessToken]:
        """A client-credentials token for ``destination`` (per tenant), cached."""
        url = self._url(destination, tenant)
        if not url or not destination.client_id or destination.client_secret is None:
            return self._missing(destination, tenant)
        key = client_credentials_key(url, destination.client_id, destination.client_secret, tenant, destination.scope)
        return self.cache.get(
            key,
            lambda: self.client.client_credentials(
                url, destination.client_id, destination.client_secret, destination.scope, tenant, destination.token_client_auth
            ),
        )

    def for_connectivity_proxy(self, proxy, tenant: str | None = None) -> Deferred[str]:
        """The JWT for the connectivity proxy's SOCKS5 method 0x80 (a client-credentials
        token of the connectivity service; ``{tenant}`` in its URL is the tenant's)."""
        url = proxy.token_service_url
        if "{tenant}" in url:
            if not tenant:
                return fail(TokenError(INVALID_CONFIGURATION, "connectivityProxy tokenServiceURL has {tenant} but the route has no tenant", host=_host(url)))
            url = url.replace("{tenant}", tenant)
        key = client_credentials_key(url, proxy.client_id, proxy.client_secret, tenant, None)
        d = self.cache.get(
            key, lambda: self.client.client_credentials(url, proxy.client_id, proxy.client_secret, None, tenant, self.client_auth)
        )
        return d.addCallback(lambda token: token.access_token)

    def exchange(self, destination: Destination, tenant: str | None, secret: str) -> Deferred[AccessToken]:
        """Exchange the application's secret: refresh-token or authorisation-code grant,
        chosen by ``destination.authentication``; cached by the secret's hash."""
        if destination.authentication not in (OAUTH2_REFRESH_TOKEN, OAUTH2_AUTHORIZATION_CODE):
            raise ValueError(f"destination {destination.name!r} does not exchange secrets ({destination.authentication})")
        url = self._url(destination, tenant)
        if not url or not destination.client_id or destination.client_secret is None:
            return self._missing(destination, tenant)
        if not secret:
            return fail(TokenError(INVALID_CONFIGURATION, "empty refresh token or authorization code", host=_host(url)))
        key = exchange_key(url, destination.client_id, destination.client_secret, secret)
        grant = REFRESH_TOKEN if destination.authentication == OAUTH2_REFRESH_TOKEN else AUTHORIZATION_CODE
        return self.cache.get(key, lambda: self.client.exchange(
            grant, url, destination.client_id, destination.client_secret, secret,
            scope=destination.scope if grant == REFRESH_TOKEN else None, tenant=tenant,
            client_auth=destination.token_client_auth,
        ))

    def invalidate(self, destination: Destination, tenant: str | None = None, secret: str | None = None) -> None:
        """Forget the cached token (the upstream refused it)."""
        url = self._url(destination, tenant) or ""
        if secret is None:
            self.cache.invalidate(self.client_credentials_key(destination, tenant))
        else:
            self.cache.invalidate(exchange_key(url, destination.client_id or "", destination.client_secret or "", secret))
