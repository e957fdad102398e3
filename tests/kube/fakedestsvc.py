"""A fake destination service (find-destination API, client-credentials protected) and
its token service, on 127.0.0.1.

Tenancy is by host name, as with the real service: the first label of the Host header
is the subaccount's subdomain.  Clients reach it as an HTTP proxy (``HTTP_PROXY`` set to
:attr:`FakeDestinationService.url`, which ``requests`` honours): they ask for
``http://provider.auth.test/...`` without DNS, and the Host header keeps the name.
"""

from __future__ import annotations

import base64
import hashlib
import threading
import urllib.parse
from typing import Any

from support.httpserver import HTTPService, JSONHandler


class FakeDestinationService(HTTPService):
    thread_name = "fake-destination-service"

    def __init__(self, clientid: str = "dest-client", clientsecret: str = "dest-secret"):
        self.Handler = _Handler
        self.clientid = clientid
        self.clientsecret = clientsecret
        #: (subdomain, name) -> destination configuration
        self.destinations: dict[tuple[str, str], dict[str, Any]] = {}
        self.tokens: dict[str, str] = {}  # token -> subdomain
        self.token_requests: list[str] = []  # subdomains
        self.find_requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def revoke_tokens(self) -> None:
        with self.lock:
            self.tokens.clear()


class _Handler(JSONHandler):
    service: FakeDestinationService

    def _subdomain(self) -> str:
        return (self.headers.get("Host") or "").split(".")[0]

    @property
    def _path(self) -> str:
        """The request path (a proxy request names the whole URL)."""
        return urllib.parse.urlsplit(self.path).path if "://" in self.path else self.path

    def do_POST(self) -> None:
        svc = self.service
        form = dict(urllib.parse.parse_qsl(self.body_bytes().decode()))
        if self._path != "/oauth/token":
            return self.send_json(404, {"error": "not_found"})
        auth = self.headers.get("Authorization", "")
        expected = "Basic " + base64.b64encode(f"{svc.clientid}:{svc.clientsecret}".encode()).decode()
        if auth != expected:
            return self.send_json(401, {"error": "invalid_client", "error_description": "Bad credentials"})
        if form.get("grant_type") != "client_credentials":
            return self.send_json(400, {"error": "unsupported_grant_type"})
        sub = self._subdomain()
        with svc.lock:
            token = f"tok-{sub}-{len(svc.token_requests)}"
            svc.tokens[token] = sub
            svc.token_requests.append(sub)
        self.send_json(200, {"access_token": token, "token_type": "bearer", "expires_in": 3600})

    def do_GET(self) -> None:
        svc = self.service
        prefix = "/destination-configuration/v1/destinations/"
        if not self._path.startswith(prefix):
            return self.send_json(404, {"ErrorMessage": "no such API"})
        auth = self.headers.get("Authorization", "")
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else ""
        with svc.lock:
            sub = svc.tokens.get(token)
        if sub is None:
            return self.send_json(401, {"ErrorMessage": "Unauthorized"})
        name = urllib.parse.unquote(self._path[len(prefix):])
        refresh = self.headers.get("X-refresh-token")
        code = self.headers.get("X-code")
        with svc.lock:
            svc.find_requests.append({"subdomain": sub, "name": name, "refresh": refresh is not None,
                                      "code": code is not None})
            config = svc.destinations.get((sub, name))
        if config is None:
            return self.send_json(404, {"ErrorMessage": "Configuration with the specified name was not found"})
        body: dict[str, Any] = {"owner": {"SubaccountId": sub}, "destinationConfiguration": config}
        secret = refresh or code
        if secret is not None:
            if secret.startswith("bad"):
                body["authTokens"] = [{"type": "", "value": "", "error": "Retrieval of OAuth token failed: invalid_grant"}]
            else:
                digest = hashlib.sha256(secret.encode()).hexdigest()[:12]
                body["authTokens"] = [{"type": "Bearer", "value": f"access-{digest}", "expires_in": "3600",
                                       "http_header": {"key": "Authorization", "value": f"Bearer access-{digest}"}}]
        self.send_json(200, body)
