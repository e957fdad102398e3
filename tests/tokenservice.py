"""A small in-process OAuth2 token service for tests.

    with TokenService(clients={"gw": "gw-secret"}) as svc:
        svc.add_refresh_token("rt-1", "alice")
        url = svc.token_url            # http://127.0.0.1:<port>/oauth/token
        ...
        assert svc.token_requests() == 1

Threaded (``ThreadingHTTPServer`` on 127.0.0.1, a free port).  Endpoints:

- ``POST .../oauth/token`` (any path ending in ``/token``): grants ``client_credentials``,
  ``refresh_token`` and ``authorization_code``; the client authenticates with HTTP Basic
  or ``client_id``/``client_secret`` in the body (both at once is ``invalid_request``).
  A path ``/t/<tenant>/oauth/token`` or a Host header ``<tenant>.<anything>`` names a
  tenant; when :attr:`tenants` is set, other tenants are refused.
- ``POST /introspect`` (form ``token=...``; also ``GET ?token=`` and a Bearer header):
  ``{"active": true, "username": ...}`` for a live issued access token, else
  ``{"active": false}`` -- what Dovecot's oauth2 passdb uses with
  ``introspection_mode = post``.

Switches (plain attributes, changeable while running): :attr:`refuse_all`
(``invalid_grant`` for everything), :attr:`delay` (seconds before answering),
:attr:`fail_status` (answer that HTTP status with an HTML body), :attr:`garbage` (answer
200 with these bytes), :attr:`omit_access_token`, :attr:`expires_in` (``None``: absent),
:attr:`rotate_refresh_tokens`.

Hostile switches for the token endpoint (SPEC 9.6): :attr:`huge_body` (answer 200 with
that many bytes, streamed until done or the client goes away), :attr:`trickle` (send the
headers, then one body byte every that many seconds, forever), :attr:`echo_credentials`
(refuse with an ``error_description`` that repeats the request's Authorization header
and form body).  :attr:`client_gone` is set when a client closed the connection while a
hostile answer was being written; :attr:`body_bytes_sent` counts what was written.

:func:`running` is a TokenService for a module-scoped fixture of tests that run the
gateway's token client against it (it speaks http: ``OAUTHLIB_INSECURE_TRANSPORT=1``
while it runs).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import ipaddress
import json
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, unquote, urlsplit

import pytest


class LogEntry(NamedTuple):
    """One token-endpoint request: what tests usually count."""

    path: str
    grant_type: str | None
    client_id: str | None
    time: float


class RequestRecord(NamedTuple):
    """Everything recorded about one request (secrets included: this is a test)."""

    path: str
    grant_type: str | None
    client_id: str | None
    time: float
    auth_method: str | None  # "basic", "body" or None
    form: dict[str, str]
    tenant: str | None
    host: str | None


class IssuedToken(NamedTuple):
    username: str
    client_id: str
    scope: str | None
    grant_type: str
    expires_at: float


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # a delayed handler must not hold up stop()
    allow_reuse_address = True


class TokenService:
    """The token service; a context manager that starts and stops it."""

    def __init__(
        self,
        clients: dict[str, str] | None = None,
        *,
        expires_in: int | float | None = 3600,
        cc_usernames: dict[str, str] | None = None,
        tenants: set[str] | None = None,
    ) -> None:
        self.clients: dict[str, str] = dict(clients or {"client": "client-secret"})
        #: client id -> username of its client-credentials tokens (default: client id).
        self.cc_usernames: dict[str, str] = dict(cc_usernames or {})
        self.tenants = tenants
        self.expires_in = expires_in
        self.refuse_all = False
        self.delay = 0.0
        self.fail_status: int | None = None
        self.garbage: bytes | None = None
        self.omit_access_token = False
        self.rotate_refresh_tokens = False
        self.huge_body: int | None = None
        self.trickle: float | None = None
        self.echo_credentials = False
        self.client_gone = threading.Event()
        self.body_bytes_sent = 0
        #: Lifetime of issued tokens for introspection when ``expires_in`` is None.
        self.default_lifetime = 3600.0
        self.refresh_tokens: dict[str, str] = {}
        self.codes: dict[str, tuple[str, str | None]] = {}
        self.access_tokens: dict[str, IssuedToken] = {}
        self.requests: list[RequestRecord] = []
        self.introspections: list[tuple[str, bool, float]] = []
        #: Token requests being handled now, and the most seen at once.
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- configuration --------------------------------------------------------------

    def add_client(self, client_id: str, secret: str) -> None:
        with self._lock:
            self.clients[client_id] = secret

    def add_refresh_token(self, token: str, username: str) -> None:
        with self._lock:
            self.refresh_tokens[token] = username

    def add_code(self, code: str, username: str, redirect_uri: str | None = None) -> None:
        """A single-use authorisation code; ``redirect_uri``, when given, must match."""
        with self._lock:
            self.codes[code] = (username, redirect_uri)

    def revoke(self, refresh_token: str) -> None:
        with self._lock:
            self.refresh_tokens.pop(refresh_token, None)

    def revoke_access_token(self, token: str) -> None:
        with self._lock:
            self.access_tokens.pop(token, None)

    def reset(self) -> None:
        """Switches back to normal and the request log emptied."""
        with self._lock:
            self.refuse_all = False
            self.delay = 0.0
            self.fail_status = None
            self.garbage = None
            self.omit_access_token = False
            self.huge_body = None
            self.trickle = None
            self.echo_credentials = False
            self.client_gone.clear()
            self.body_bytes_sent = 0
            self.requests.clear()
            self.introspections.clear()
            self.max_active = self.active

    # -- observation ------------------------------------------------------------------

    @property
    def log(self) -> list[LogEntry]:
        """Token-endpoint requests as (path, grant_type, client_id, time)."""
        with self._lock:
            return [LogEntry(r.path, r.grant_type, r.client_id, r.time) for r in self.requests]

    def token_requests(self, grant_type: str | None = None) -> int:
        with self._lock:
            return sum(1 for r in self.requests if grant_type is None or r.grant_type == grant_type)

    def username_for(self, access_token: str) -> str | None:
        with self._lock:
            issued = self.access_tokens.get(access_token)
        return issued.username if issued else None

    # -- addresses --------------------------------------------------------------------

    @property
    def port(self) -> int:
        assert self._server is not None, "TokenService is not running"
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def token_url(self) -> str:
        return f"{self.base_url}/oauth/token"

    @property
    def tenant_token_url(self) -> str:
        """A Common-style URL with a ``{tenant}`` placeholder in the path."""
        return f"{self.base_url}/t/{{tenant}}/oauth/token"

    @property
    def introspection_url(self) -> str:
        return f"{self.base_url}/introspect"

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> "TokenService":
        service = self

        class Handler(_Handler):
            svc = service

        self._stopping.clear()
        self._server = _Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="tokenservice", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:  # idempotent, also when called from two threads
            server, self._server = self._server, None
            thread, self._thread = self._thread, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(5)

    def __enter__(self) -> "TokenService":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- the token logic (called from handler threads) -------------------------------------

    def _issue(self, username: str, client_id: str, scope: str | None, grant: str, refresh: str | None) -> dict:
        token = "at-" + secrets.token_urlsafe(18)
        lifetime = self.expires_in if self.expires_in is not None else self.default_lifetime
        self.access_tokens[token] = IssuedToken(username, client_id, scope, grant, time.time() + lifetime)
        body: dict[str, Any] = {"token_type": "bearer"}
        if not self.omit_access_token:
            body["access_token"] = token
        if self.expires_in is not None:
            body["expires_in"] = self.expires_in
        if scope:
            body["scope"] = scope
        if refresh:
            body["refresh_token"] = refresh
        return body

    def _token(self, form: dict[str, str], client_id: str) -> tuple[int, dict]:
        grant = form.get("grant_type")
        scope = form.get("scope") or None
        if self.refuse_all:
            return 400, {"error": "invalid_grant", "error_description": "refused by test switch"}
        if grant == "client_credentials":
            username = self.cc_usernames.get(client_id, client_id)
            return 200, self._issue(username, client_id, scope, grant, None)
        if grant == "refresh_token":
            presented = form.get("refresh_token", "")
            username = self.refresh_tokens.get(presented)
            if username is None:
                return 400, {"error": "invalid_grant", "error_description": "unknown or revoked refresh token"}
            refresh = None
            if self.rotate_refresh_tokens:
                del self.refresh_tokens[presented]
                refresh = "rt-" + secrets.token_urlsafe(12)
                self.refresh_tokens[refresh] = username
            return 200, self._issue(username, client_id, scope, grant, refresh)
        if grant == "authorization_code":
            entry = self.codes.pop(form.get("code", ""), None)  # single use
            if entry is None:
                return 400, {"error": "invalid_grant", "error_description": "unknown or used code"}
            username, redirect_uri = entry
            if redirect_uri is not None and form.get("redirect_uri") != redirect_uri:
                return 400, {"error": "invalid_grant", "error_description": "redirect_uri mismatch"}
            refresh = "rt-" + secrets.token_urlsafe(12)
            self.refresh_tokens[refresh] = username
            return 200, self._issue(username, client_id, scope, grant, refresh)
        return 400, {"error": "unsupported_grant_type"}

    def _introspect(self, token: str) -> dict:
        issued = self.access_tokens.get(token)
        if issued is None or issued.expires_at <= time.time():
            return {"active": False}
        body: dict[str, Any] = {
            "active": True,
            "username": issued.username,
            "sub": issued.username,
            "client_id": issued.client_id,
            "token_type": "Bearer",
            "exp": int(issued.expires_at),
        }
        if "@" in issued.username:
            body["email"] = issued.username
        if issued.scope:
            body["scope"] = issued.scope
        return body


def _tenant_from(path: str, host: str | None) -> str | None:
    parts = path.split("/")
    if len(parts) > 2 and parts[1] == "t" and parts[2]:
        return parts[2]
    if host:
        name = host.rsplit(":", 1)[0] if not host.startswith("[") else host
        try:
            ipaddress.ip_address(name.strip("[]"))
            return None
        except ValueError:
            pass
        label, dot, _ = name.partition(".")
        if dot and label:
            return label
    return None


def _json_reply(status: int, obj: dict, headers: dict | None = None) -> tuple:
    return status, json.dumps(obj).encode(), "application/json", headers


class _Handler(BaseHTTPRequestHandler):
    svc: TokenService
    protocol_version = "HTTP/1.1"
    server_version = "TestTokenService/1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _send(self, status: int, body: bytes, content_type: str = "application/json", headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: dict, headers: dict | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers=headers)

    def _form(self) -> dict[str, str]:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        self.raw_body = raw.decode("utf-8", "replace")
        return dict(parse_qsl(self.raw_body, keep_blank_values=True))

    def _hostile(self) -> bool:
        """Answer as one of the hostile switches says; False when none is on."""
        svc = self.svc
        if svc.echo_credentials:
            echo = f"client authentication failed: Authorization: {self.headers.get('Authorization')}; body: {self.raw_body}"
            self._json(401, {"error": "invalid_client", "error_description": echo})
            return True
        if svc.huge_body is None and svc.trickle is None:
            return False
        self.close_connection = True
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            if svc.trickle is not None:
                self.send_header("Content-Length", "1000000")
            self.end_headers()
            self.wfile.flush()
            if svc.trickle is not None:
                while not svc._stopping.is_set():
                    self.wfile.write(b" ")
                    self.wfile.flush()
                    svc.body_bytes_sent += 1
                    svc._stopping.wait(svc.trickle)
            else:
                chunk = b'{"padding": "' + b"x" * 65536
                left = svc.huge_body
                while left > 0 and not svc._stopping.is_set():
                    piece = chunk[:left]
                    self.wfile.write(piece)
                    svc.body_bytes_sent += len(piece)
                    left -= len(piece)
        except OSError:  # BrokenPipeError, ConnectionResetError: the client went away
            svc.client_gone.set()
        return True

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path.rstrip("/") == "/introspect":
            self._handle_introspect(dict(parse_qsl(url.query)))
        else:
            self._json(404, {"error": "not_found"})

    def do_POST(self) -> None:
        url = urlsplit(self.path)
        form = self._form()
        svc = self.svc
        with svc._lock:
            svc.active += 1
            svc.max_active = max(svc.max_active, svc.active)
        try:
            if svc.delay:
                svc._stopping.wait(svc.delay)
            if url.path.rstrip("/") == "/introspect":
                self._handle_introspect(form)
            elif url.path.rstrip("/").endswith("/token"):
                self._handle_token(url.path, form)
            else:
                self._json(404, {"error": "not_found"})
        finally:
            with svc._lock:
                svc.active -= 1

    def _client_auth(self, form: dict[str, str]) -> tuple[str | None, str | None, str | None]:
        """(method, client id, secret) from Basic or the body; method None if absent."""
        header = self.headers.get("Authorization", "")
        in_body = "client_secret" in form
        if header.lower().startswith("basic "):
            if in_body:
                return "both", None, None
            try:
                decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                return "basic", None, None
            client_id, _, secret = decoded.partition(":")
            return "basic", unquote(client_id), unquote(secret)
        if in_body:
            return "body", form.get("client_id"), form.get("client_secret")
        return None, form.get("client_id"), None

    def _handle_token(self, path: str, form: dict[str, str]) -> None:
        svc = self.svc
        method, client_id, secret = self._client_auth(form)
        host = self.headers.get("Host")
        tenant = _tenant_from(path, host)
        with svc._lock:
            svc.requests.append(
                RequestRecord(path, form.get("grant_type"), client_id, time.time(), method, dict(form), tenant, host)
            )
        if self._hostile():
            return
        with svc._lock:
            reply = self._token_reply(svc, method, client_id, secret, tenant, form)
        self._send(*reply)

    @staticmethod
    def _token_reply(svc: TokenService, method, client_id, secret, tenant, form) -> tuple:
        """(status, body, content type, headers) for a token request; under the lock."""
        if svc.fail_status is not None:
            return svc.fail_status, b"<html><body><h1>Internal Server Error</h1></body></html>", "text/html", None
        if svc.garbage is not None:
            return 200, svc.garbage, "text/html", None
        if svc.tenants is not None and tenant not in svc.tenants:
            return _json_reply(400, {"error": "invalid_request", "error_description": "unknown tenant"})
        if method == "both":
            return _json_reply(400, {"error": "invalid_request", "error_description": "two client authentications"})
        if client_id is None or secret is None or svc.clients.get(client_id) != secret:
            headers = {"WWW-Authenticate": 'Basic realm="token"'} if method == "basic" else None
            return _json_reply(401, {"error": "invalid_client", "error_description": "client authentication failed"}, headers)
        return _json_reply(*svc._token(form, client_id))

    def _handle_introspect(self, form: dict[str, str]) -> None:
        token = form.get("token")
        header = self.headers.get("Authorization", "")
        if not token and header.lower().startswith("bearer "):
            token = header[7:].strip()
        svc = self.svc
        with svc._lock:
            body = svc._introspect(token or "")
            svc.introspections.append((token or "", body["active"], time.time()))
        self._json(200, body)


if __name__ == "__main__":  # a manual try: python3 tests/tokenservice.py
    with TokenService() as svc:
        svc.add_refresh_token("rt", "alice")
        print("token URL:", svc.token_url, " client: client / client-secret, refresh token: rt")
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


@contextlib.contextmanager
def running(**kwargs: Any):
    """A running :class:`TokenService` (``kwargs`` as for it), with
    ``OAUTHLIB_INSECURE_TRANSPORT=1`` in the environment until it stops: the library
    refuses http:// token URLs otherwise, and only tests may allow them."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OAUTHLIB_INSECURE_TRANSPORT", "1")
        with TokenService(**kwargs) as service:
            yield service
