"""The ``btp`` destination source: a destination service's "find destination" API.

Credentials (``clientid``, ``clientsecret``, ``url``, ``uri``) come from a service
binding, loaded by a callable the caller supplies (Kubernetes mode reads a Secret).  A
lookup takes a client-credentials token from ``<url>/oauth/token`` -- for a tenant lookup
the tenant's subdomain replaces the first label of the host (or a ``{tenant}``
placeholder) -- through the project's token client and token cache, and calls ``GET
<uri>/destination-configuration/v1/destinations/<name>``.  The answer is
``{destinationConfiguration: {...}, authTokens: [{type, value, expires_in, error}]}``.
For the lazy OAuth2 types the application's refresh token or authorization code travels
in ``X-refresh-token`` / ``X-code`` and the returned ``authTokens`` carry the upstream
access token (:meth:`BtpSource.exchange`).

The find request runs through ``requests`` in a worker pool (``run``), never on the
reactor thread.  The binding is read once per ``credentials_ttl`` seconds (or when
:meth:`BtpSource.forget_credentials` is called: its Secret changed), not at every lookup.
Neither secrets nor tokens reach a log line or an exception message.
"""

from __future__ import annotations

import ipaddress
import threading
import urllib.parse
from typing import Any, Callable, Mapping

import requests
from attrs import field, frozen
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from zope.interface import implementer

from mailgw.cache import SingleFlightCache
from mailgw.destination import Destination
from mailgw.oauth import TokenCache, TokenClient, TokenError, client_credentials_key, safe_description, secret_forms
from mailgw.sources.base import (
    AuthToken,
    DestinationNotFound,
    FindResult,
    IDestinationSource,
    ITokenExchange,
    InvalidDestination,
    SourceUnavailable,
    TokenExchangeFailed,
    as_lookup_error,
    destination_from_json,
)

FIND_PATH = "/destination-configuration/v1/destinations/"
#: Larger answers are refused (read no further than this).
MAX_ANSWER = 1024 * 1024


@frozen
class BtpCredentials:
    """A destination service binding."""

    clientid: str
    clientsecret: str = field(repr=False)
    url: str  # the XSUAA / token service base URL
    uri: str  # the destination service base URL


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
        return url  # a single-label host: nothing to substitute
    try:
        ipaddress.ip_address(host)
        return url
    except ValueError:
        pass
    new_host = tenant + host[host.index("."):]
    netloc = new_host + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _safe(url: str) -> str:
    """A URL without credentials or query (for messages)."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


@frozen
class _Answer:
    status: int
    body: bytes = field(repr=False)
    too_large: bool = False


@implementer(IDestinationSource, ITokenExchange)
class BtpSource:
    """Looks destinations up at a destination service instance."""

    def __init__(
        self,
        credentials: Callable[[], BtpCredentials],
        run: Callable[..., "Deferred[Any]"],
        tokens: TokenClient,
        token_cache: TokenCache,
        timeout: float = 10.0,
        *,
        clock: Any = None,
        credentials_ttl: float = 0.0,
    ):
        """``credentials`` is a blocking loader of the binding, whose answer is kept
        ``credentials_ttl`` seconds on ``clock`` (a failure is not kept); ``run`` runs
        blocking callables in a worker pool (a :class:`~mailgw.blocking.BlockingPool`)
        and is the default pool of :meth:`lookup`; ``tokens`` and ``token_cache`` are the
        gateway's token client and cache (the binding's client-credentials token is
        cached like any other)."""
        if clock is None:
            from twisted.internet import reactor as clock
        self.credentials = credentials
        self.run = run
        self.tokens = tokens
        self.token_cache = token_cache
        self.timeout = timeout
        # keyed by worker pool: a session's read never waits behind a reconcile's
        self._bindings = SingleFlightCache(
            clock, lambda result: None if isinstance(result, Failure) else credentials_ttl, max_entries=8
        )
        self._local = threading.local()

    def forget_credentials(self) -> None:
        """The binding changed: read it again at the next lookup."""
        self._bindings.clear()

    def lookup(
        self, namespace: str, name: str, tenant: str | None = None, *, run: Callable[..., Deferred] | None = None
    ) -> "Deferred[Destination]":
        d = Deferred.fromCoroutine(self._find(name, tenant, {}, run or self.run))
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
        d = Deferred.fromCoroutine(self._find(name, tenant, headers, self.run))
        d.addErrback(as_lookup_error, f"looking up destination {name!r}")
        d.addCallback(self._check_tokens, name, secret_forms(tuple(headers.values())))
        return d

    @staticmethod
    def _check_tokens(result: FindResult, name: str, forms: tuple[str, ...]) -> FindResult:
        """The first token must be usable; its error, when it has one, is the service's
        text: redacted (a service may echo the refresh token or code), printable, short."""
        if not result.auth_tokens:
            raise TokenExchangeFailed(f"destination service returned no token for destination {name!r}")
        first = result.auth_tokens[0]
        if first.error or not first.value:
            why = safe_description(first.error, forms) if first.error else "empty token"
            raise TokenExchangeFailed(f"destination service could not get a token for destination {name!r}: {why}")
        return result

    # --- reactor side --------------------------------------------------------------------

    async def _token(self, creds: BtpCredentials, token_url: str, tenant: str | None) -> str:
        key = client_credentials_key(token_url, creds.clientid, creds.clientsecret, tenant)
        try:
            token = await self.token_cache.get(
                key, lambda: self.tokens.client_credentials(token_url, creds.clientid, creds.clientsecret, None, tenant)
            )
        except TokenError as e:
            raise SourceUnavailable(f"destination service credentials: {e.message}") from None
        return token.access_token

    async def _find(
        self, name: str, tenant: str | None, headers: Mapping[str, str], run: Callable[..., Deferred]
    ) -> FindResult:
        creds = await self._bindings.get(run, lambda: run(self.credentials))
        token_url = tenant_url(creds.url, tenant).rstrip("/") + "/oauth/token"
        key = client_credentials_key(token_url, creds.clientid, creds.clientsecret, tenant)
        url = creds.uri.rstrip("/") + FIND_PATH + urllib.parse.quote(name, safe="")
        where = f"destination service {_safe(creds.uri)}"
        for attempt in (0, 1):
            token = await self._token(creds, token_url, tenant)
            answer = await run(self._get, url, token, headers, where)
            if answer.status == 401 and attempt == 0:
                # the cached token may have been revoked: get a fresh one, once
                self.token_cache.invalidate(key)
                continue
            break
        if answer.status == 404:
            raise DestinationNotFound(
                f"destination {name!r} not found at {where}" + (f" for tenant {tenant}" if tenant else "")
            )
        if answer.status != 200:
            raise SourceUnavailable(f"{where} answered HTTP {answer.status} for destination {name!r}")
        if answer.too_large:
            raise InvalidDestination(f"{where}: the answer for destination {name!r} is too large")
        return self._parse(answer.body, name, where)

    # --- worker thread -------------------------------------------------------------------

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        return session

    def _get(self, url: str, token: str, headers: Mapping[str, str], where: str) -> _Answer:
        try:
            with self._session().get(
                url,
                headers={"Authorization": f"Bearer {token}", "Accept": "application/json", **headers},
                timeout=self.timeout,
                stream=True,
            ) as resp:
                body = resp.raw.read(MAX_ANSWER + 1, decode_content=True)
                return _Answer(resp.status_code, body[:MAX_ANSWER], len(body) > MAX_ANSWER)
        except (requests.RequestException, OSError) as e:
            raise SourceUnavailable(f"{where} unreachable: {type(e).__name__}") from None

    @staticmethod
    def _parse(raw: bytes, name: str, where: str) -> FindResult:
        import json

        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
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
