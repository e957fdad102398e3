"""The ``btp`` destination source: a destination service's "find destination" API.

Credentials (``clientid``, ``clientsecret``, ``url``, ``uri``) come from a Secret (the
service binding).  A lookup takes a client-credentials token from ``<url>/oauth/token``
— for a tenant lookup the tenant's subdomain replaces the first label of the host (or a
``{tenant}`` placeholder) — and calls ``GET <uri>/destination-configuration/v1/
destinations/<name>``.  The answer is ``{destinationConfiguration: {...}, authTokens:
[{type, value, expires_in, error}]}``.  For the lazy OAuth2 types the application's
refresh token or authorization code travels in ``X-refresh-token`` / ``X-code`` and the
returned ``authTokens`` carry the upstream access token (:meth:`BtpSource.exchange`).

HTTP runs through ``requests`` in a worker thread (``run``); the token call is a small
client of its own, replaceable through ``fetch_token``.  Neither secrets nor tokens
reach a log line or an exception message.
"""

from __future__ import annotations

import threading
import urllib.parse
from typing import Any, Callable, Mapping

import requests
from attrs import field, frozen
from twisted.internet.defer import Deferred
from zope.interface import implementer

from mailgw.destination import Destination
from mailgw.kube.client import KubeApi, KubeApiError
from mailgw.kube.model import DestinationNotFound, InvalidDestination, SourceUnavailable
from mailgw.kube.sources import (
    AuthToken,
    FindResult,
    IDestinationSource,
    ITokenExchange,
    TokenExchangeFailed,
    as_lookup_error,
    destination_from_json,
)
from mailgw.sources.secrets import secret_value

FIND_PATH = "/destination-configuration/v1/destinations/"
DEFAULT_TOKEN_LIFETIME = 300
MAX_ANSWER = 1024 * 1024


@frozen
class BtpCredentials:
    """A destination service binding."""

    clientid: str
    clientsecret: str = field(repr=False)
    url: str  # the XSUAA / token service base URL
    uri: str  # the destination service base URL


def credentials_from_secret(secret: Mapping[str, Any], origin: str) -> BtpCredentials:
    values = {}
    for key in ("clientid", "clientsecret", "url", "uri"):
        try:
            value = secret_value(secret, key)
        except ValueError as e:
            raise SourceUnavailable(f"{origin}: {e}") from None
        if not value:
            raise SourceUnavailable(f"{origin}: key {key!r} is missing")
        values[key] = value.strip()
    for key in ("url", "uri"):
        if not values[key].startswith(("https://", "http://")):
            raise SourceUnavailable(f"{origin}: key {key!r} is not an http(s) URL")
    return BtpCredentials(**values)


def secret_credentials(api: KubeApi, namespace: str, name: str) -> Callable[[], BtpCredentials]:
    """A blocking loader of the binding Secret ``namespace/name``."""
    origin = f"Secret {namespace}/{name}"

    def load() -> BtpCredentials:
        try:
            secret = api.get("Secret", namespace, name)
        except KubeApiError as e:
            raise SourceUnavailable(f"cannot read the destination service binding {origin}: {e}") from None
        if secret is None:
            raise SourceUnavailable(f"the destination service binding {origin} does not exist")
        return credentials_from_secret(secret, origin)

    return load


def tenant_url(url: str, tenant: str | None) -> str:
    """The token service URL for ``tenant``: ``{tenant}`` replaced, or the first label of
    the host replaced by the tenant subdomain (provider subdomain -> tenant subdomain)."""
    if tenant is None:
        return url
    if "{tenant}" in url:
        return url.replace("{tenant}", tenant)
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if "." not in host:
        return url  # an IP or a single-label host: nothing to substitute
    try:
        import ipaddress

        ipaddress.ip_address(host)
        return url
    except ValueError:
        pass
    new_host = tenant + host[host.index("."):]
    netloc = new_host + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


@frozen
class _Token:
    value: str = field(repr=False)
    expires_at: float


def fetch_client_credentials_token(
    session: requests.Session, token_url: str, creds: BtpCredentials, timeout: float
) -> tuple[str, int]:
    """POST ``grant_type=client_credentials``; returns (access token, lifetime seconds)."""
    try:
        resp = session.post(
            token_url,
            data={"grant_type": "client_credentials", "client_id": creds.clientid},
            auth=(creds.clientid, creds.clientsecret),
            headers={"Accept": "application/json"},
            timeout=timeout,
        )
    except requests.RequestException as e:
        raise SourceUnavailable(f"token service {_safe(token_url)} unreachable: {type(e).__name__}") from None
    if resp.status_code != 200:
        raise SourceUnavailable(
            f"token service {_safe(token_url)} refused the destination service credentials "
            f"(HTTP {resp.status_code}{_oauth_error(resp)})"
        )
    try:
        body = resp.json()
        token = body["access_token"]
        if not isinstance(token, str) or not token:
            raise ValueError
    except (ValueError, KeyError, TypeError):
        raise SourceUnavailable(f"token service {_safe(token_url)} sent no access_token") from None
    lifetime = body.get("expires_in")
    if isinstance(lifetime, str) and lifetime.isdigit():
        lifetime = int(lifetime)
    if not isinstance(lifetime, int) or isinstance(lifetime, bool) or lifetime <= 0:
        lifetime = DEFAULT_TOKEN_LIFETIME
    return token, lifetime


def _safe(url: str) -> str:
    """A URL without credentials or query (for messages)."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _oauth_error(resp: requests.Response) -> str:
    try:
        body = resp.json()
        error = body.get("error") if isinstance(body, Mapping) else None
        if isinstance(error, str) and len(error) < 80 and error.replace("_", "").isalnum():
            return f", {error}"
    except ValueError:
        pass
    return ""


@implementer(IDestinationSource, ITokenExchange)
class BtpSource:
    """Looks destinations up at a destination service instance."""

    def __init__(
        self,
        credentials: Callable[[], BtpCredentials],
        run: Callable[..., "Deferred[Any]"],
        clock: Any,
        timeout: float = 10.0,
        session_factory: Callable[[], requests.Session] = requests.Session,
        fetch_token: Callable[[requests.Session, str, BtpCredentials, float], tuple[str, int]] | None = None,
    ):
        """``credentials`` is a blocking loader (e.g. :func:`secret_credentials`); ``run``
        runs blocking callables in a thread and returns a Deferred; ``clock`` gives
        ``seconds()`` for token expiry."""
        self.credentials = credentials
        self.run = run
        self.clock = clock
        self.timeout = timeout
        self.fetch_token = fetch_token or fetch_client_credentials_token
        self._local = threading.local()
        self._session_factory = session_factory
        self._tokens: dict[tuple[str, str, str | None], _Token] = {}
        self._lock = threading.Lock()

    def lookup(self, namespace: str, name: str, tenant: str | None = None) -> "Deferred[Destination]":
        d = self.run(self._find, name, tenant, {})
        d.addErrback(as_lookup_error, f"looking up destination {name!r}")
        d.addCallback(lambda result: result.destination)
        return d

    def exchange(
        self, namespace: str, name: str, tenant: str | None = None, *,
        refresh_token: str | None = None, code: str | None = None,
    ) -> "Deferred[FindResult]":
        headers = {}
        if refresh_token is not None:
            headers["X-refresh-token"] = refresh_token
        if code is not None:
            headers["X-code"] = code
        d = self.run(self._find, name, tenant, headers)
        d.addErrback(as_lookup_error, f"looking up destination {name!r}")
        d.addCallback(self._check_tokens, name)
        return d

    @staticmethod
    def _check_tokens(result: FindResult, name: str) -> FindResult:
        if not result.auth_tokens:
            raise TokenExchangeFailed(f"destination service returned no token for destination {name!r}")
        first = result.auth_tokens[0]
        if first.error or not first.value:
            raise TokenExchangeFailed(
                f"destination service could not get a token for destination {name!r}: "
                f"{(first.error or 'empty token')[:200]}"
            )
        return result

    # --- worker thread ---------------------------------------------------------------

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = self._session_factory()
        return session

    def _token(self, creds: BtpCredentials, tenant: str | None, fresh: bool = False) -> str:
        token_url = tenant_url(creds.url, tenant).rstrip("/") + "/oauth/token"
        key = (token_url, creds.clientid, tenant)
        now = self.clock.seconds()
        with self._lock:
            cached = self._tokens.get(key)
        if cached is not None and cached.expires_at > now and not fresh:
            return cached.value
        value, lifetime = self.fetch_token(self._session(), token_url, creds, self.timeout)
        # renew a little before expiry
        with self._lock:
            self._tokens[key] = _Token(value, now + max(lifetime - min(60, lifetime // 10), 1))
        return value

    def _find(self, name: str, tenant: str | None, headers: Mapping[str, str]) -> FindResult:
        creds = self.credentials()
        url = creds.uri.rstrip("/") + FIND_PATH + urllib.parse.quote(name, safe="")
        where = f"destination service {_safe(creds.uri)}"
        for attempt in (0, 1):
            token = self._token(creds, tenant, fresh=attempt == 1)
            try:
                resp = self._session().get(
                    url,
                    headers={"Authorization": f"Bearer {token}", "Accept": "application/json", **headers},
                    timeout=self.timeout,
                )
            except requests.RequestException as e:
                raise SourceUnavailable(f"{where} unreachable: {type(e).__name__}") from None
            if resp.status_code == 401 and attempt == 0:
                continue  # the cached token may have been revoked: get a fresh one once
            break
        if resp.status_code == 404:
            raise DestinationNotFound(
                f"destination {name!r} not found at {where}" + (f" for tenant {tenant}" if tenant else "")
            )
        if resp.status_code != 200:
            raise SourceUnavailable(f"{where} answered HTTP {resp.status_code} for destination {name!r}")
        if len(resp.content) > MAX_ANSWER:
            raise InvalidDestination(f"{where}: the answer for destination {name!r} is too large")
        try:
            body = resp.json()
        except ValueError:
            raise InvalidDestination(f"{where}: the answer for destination {name!r} is not JSON") from None
        if not isinstance(body, Mapping) or not isinstance(body.get("destinationConfiguration"), Mapping):
            raise InvalidDestination(f"{where}: the answer for destination {name!r} has no destinationConfiguration")
        destination = destination_from_json(body["destinationConfiguration"], f"{where}, destination {name!r}")
        tokens = []
        for item in body.get("authTokens") or []:
            if not isinstance(item, Mapping):
                continue
            expires = item.get("expires_in")
            try:
                expires = int(expires) if expires is not None else None
            except (TypeError, ValueError):
                expires = None
            error = item.get("error")
            tokens.append(
                AuthToken(
                    type=str(item.get("type") or ""),
                    value=str(item.get("value") or ""),
                    expires_in=expires,
                    error=str(error) if error else None,
                )
            )
        return FindResult(destination, tuple(tokens))
