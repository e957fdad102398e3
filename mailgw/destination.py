"""Destinations: the parsed, validated form of a destination service's MAIL destination.

A destination arrives as a JSON object of string keys and string values (SPEC section 1).
:func:`parse_destination` turns it into a frozen :class:`Destination` or raises
:class:`DestinationError` naming the destination and the offending key.  Secret-bearing
fields are excluded from ``repr`` so a destination can be logged safely.
"""

from __future__ import annotations

from typing import Any, Mapping

from attrs import field, frozen

def host_port(host: str, port: object) -> str:
    """``host:port``, an IPv6 address in brackets (``[2001:db8::1]:993``) so that the
    port stays apart from the address: in logs, the audit log and ``/status``."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


#: Canonical protocol name -> (protocol family, implicit TLS, default port).
PROTOCOLS: dict[str, tuple[str, bool, int]] = {
    "smtp": ("smtp", False, 587),
    "smtps": ("smtp", True, 465),
    "imap4": ("imap", False, 143),
    "imap4s": ("imap", True, 993),
    "pop3": ("pop3", False, 110),
    "pop3s": ("pop3", True, 995),
}

#: Accepted spellings that are not canonical.
PROTOCOL_ALIASES = {"imap": "imap4", "imaps": "imap4s"}

PROXY_TYPES = ("Internet", "OnPremise")

NO_AUTH = "NoAuthentication"
BASIC = "BasicAuthentication"
OAUTH2_CLIENT_CREDENTIALS = "OAuth2ClientCredentials"
OAUTH2_REFRESH_TOKEN = "OAuth2RefreshToken"
OAUTH2_AUTHORIZATION_CODE = "OAuth2AuthorizationCode"
AUTHENTICATION_TYPES = (
    NO_AUTH,
    BASIC,
    OAUTH2_CLIENT_CREDENTIALS,
    OAUTH2_REFRESH_TOKEN,
    OAUTH2_AUTHORIZATION_CODE,
)
OAUTH2_TYPES = (OAUTH2_CLIENT_CREDENTIALS, OAUTH2_REFRESH_TOKEN, OAUTH2_AUTHORIZATION_CODE)
#: Authentication types where the application presents a secret the gateway exchanges.
LAZY_TYPES = (OAUTH2_REFRESH_TOKEN, OAUTH2_AUTHORIZATION_CODE)

TOKEN_URL_TYPES = ("Dedicated", "Common")

#: Most warm upstream connections one destination may keep (SPEC 9.7).
MAX_POOL_SIZE = 100


class DestinationError(ValueError):
    """A destination is invalid.  The message names the destination and the key."""

    def __init__(self, destination: str, key: str | None, problem: str):
        self.destination = destination
        self.key = key
        self.problem = problem
        where = f"destination {destination!r}"
        if key:
            where += f", key {key!r}"
        super().__init__(f"{where}: {problem}")


@frozen
class Destination:
    """One MAIL destination, validated.  Values here are typed; secrets are not in repr."""

    name: str
    protocol: str  # canonical: smtp smtps imap4 imap4s pop3 pop3s
    host: str
    port: int
    proxy_type: str = "Internet"
    authentication: str = NO_AUTH
    auth: bool = True  # mail.<p>.auth
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token_service_url: str | None = None
    token_service_url_type: str = "Dedicated"
    client_id: str | None = None
    client_secret: str | None = field(default=None, repr=False)
    scope: str | None = None
    token_client_auth: str = "basic"  # tokenServiceAuthentication: basic | body
    location_id: str | None = None
    starttls_enable: bool = True
    starttls_required: bool = False
    trust_store: str | None = None
    key_store: str | None = None
    trust_all: bool = False
    pool_size: int = 0  # mailgw.pool.size: warm upstream connections kept (SPEC 9.7)
    pool_max_idle: float = 60.0  # mailgw.pool.maxIdle: seconds a warm connection may wait

    @property
    def family(self) -> str:
        """``smtp``, ``imap`` or ``pop3``."""
        return PROTOCOLS[self.protocol][0]

    @property
    def implicit_tls(self) -> bool:
        return PROTOCOLS[self.protocol][1]

    @property
    def on_premise(self) -> bool:
        return self.proxy_type == "OnPremise"

    @property
    def lazy(self) -> bool:
        """True when the application presents the secret (refresh token or code)."""
        return self.authentication in LAZY_TYPES

    @property
    def address(self) -> str:
        return host_port(self.host, self.port)

    def with_tenant_token_url(self, tenant: str | None) -> str | None:
        """The token service URL for ``tenant`` (SPEC: ``tokenServiceURLType``)."""
        url = self.token_service_url
        if url is None or tenant is None or self.token_service_url_type != "Common":
            return url
        if "{tenant}" in url:
            return url.replace("{tenant}", tenant)
        scheme, sep, rest = url.partition("://")
        if not sep:
            return f"{tenant}.{url}"
        return f"{scheme}://{tenant}.{rest}"


def _bool(name: str, key: str, value: Any, default: bool) -> bool:
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise DestinationError(name, key, f'must be "true" or "false", not {value!r}')


def _number(name: str, key: str, value: str | None, default, kind, maximum):
    if value is None:
        return default
    try:
        number = kind(value)
    except ValueError:
        raise DestinationError(name, key, f"must be a number, not {value!r}") from None
    if not 0 <= number <= maximum:
        raise DestinationError(name, key, f"must be between 0 and {maximum}, not {value}")
    return number


def parse_destination(obj: Mapping[str, Any], origin: str | None = None) -> Destination:
    """Validate a destination JSON object and return a :class:`Destination`.

    ``origin`` (a file name, a Secret) is only used in error messages.
    """
    if not isinstance(obj, Mapping):
        raise DestinationError(origin or "?", None, f"must be a JSON object, not {type(obj).__name__}")
    raw_name = obj.get("Name")
    if not isinstance(raw_name, str) or not raw_name.strip():
        raise DestinationError(origin or "?", "Name", "is missing or empty")
    keys = _Keys(obj, raw_name.strip())
    if keys.text("Type", required=True) != "MAIL":
        raise DestinationError(keys.name, "Type", f"must be MAIL, not {keys.text('Type')!r}")
    proxy_type = keys.choice("ProxyType", PROXY_TYPES, "Internet")
    authentication = keys.choice("Authentication", AUTHENTICATION_TYPES, NO_AUTH)
    server = keys.server()
    login = keys.login(authentication, server["auth"])
    return Destination(
        name=keys.name, proxy_type=proxy_type, authentication=authentication,
        **server, **login, **keys.token_service(authentication, login["user"]),
        location_id=keys.text("CloudConnectorLocationId"),
        trust_store=keys.text("TrustStoreLocation"),
        key_store=keys.text("KeyStoreLocation"),
        trust_all=_bool(keys.name, "TrustAll", obj.get("TrustAll"), False),
        **keys.pool(authentication, server["auth"]),
    )


class _Keys:
    """Reads and checks the keys of one destination object, a group at a time; every
    error names the destination and the key."""

    def __init__(self, obj: Mapping[str, Any], name: str):
        self.obj = obj
        self.name = name
        self.protocol = ""
        self._spellings: list[str] = []

    def text(self, key: str, required: bool = False) -> str | None:
        value = self.obj.get(key)
        if value is None:
            if required:
                raise DestinationError(self.name, key, "is missing")
            return None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise DestinationError(self.name, key, f"must be a string, not {type(value).__name__}")
        value = value.strip()
        if required and not value:
            raise DestinationError(self.name, key, "is empty")
        return value or None

    def choice(self, key: str, allowed: tuple[str, ...], default: str) -> str:
        value = self.text(key) or default
        if value not in allowed:
            raise DestinationError(self.name, key, f"must be one of {', '.join(allowed)}, not {value!r}")
        return value

    def _protocol_key(self, suffix: str) -> tuple[str, str | None]:
        """``mail.<p>.<suffix>`` in whichever spelling of the protocol it was given."""
        for spelling in self._spellings:
            key = f"mail.{spelling}.{suffix}"
            if key in self.obj:
                return key, self.text(key)
        return f"mail.{self.protocol}.{suffix}", None

    def server(self) -> dict[str, Any]:
        """The protocol, the mail server's address, and how to log in and use TLS there."""
        given = self.text("mail.transport.protocol", required=True)
        protocol = PROTOCOL_ALIASES.get(given.lower(), given.lower())
        if protocol not in PROTOCOLS:
            raise DestinationError(
                self.name, "mail.transport.protocol", f"must be one of {', '.join(PROTOCOLS)}, not {given!r}"
            )
        self.protocol = protocol
        # Keys may use the alias spelling (mail.imaps.host for imap4s); accept both.
        self._spellings = [protocol] + [alias for alias, canon in PROTOCOL_ALIASES.items() if canon == protocol]
        if given.lower() not in self._spellings:
            self._spellings.append(given.lower())

        host_key, host = self._protocol_key("host")
        if not host:
            raise DestinationError(self.name, host_key, "is missing")
        if any(c.isspace() for c in host) or "/" in host:
            raise DestinationError(self.name, host_key, f"is not a host name: {host!r}")
        port_key, port_text = self._protocol_key("port")
        if port_text is None:
            port = PROTOCOLS[protocol][2]
        else:
            try:
                port = int(port_text)
            except ValueError:
                raise DestinationError(self.name, port_key, f"must be a port number, not {port_text!r}") from None
            if not 0 < port < 65536:
                raise DestinationError(self.name, port_key, f"must be between 1 and 65535, not {port}")

        auth_key, auth_text = self._protocol_key("auth")
        enable_key, enable_text = self._protocol_key("starttls.enable")
        required_key, required_text = self._protocol_key("starttls.required")
        starttls_enable = _bool(self.name, enable_key, enable_text, True)
        starttls_required = _bool(self.name, required_key, required_text, False)
        if starttls_required and not starttls_enable:
            raise DestinationError(self.name, required_key, f"is true but {enable_key} is false")
        return {
            "protocol": protocol, "host": host, "port": port, "auth": _bool(self.name, auth_key, auth_text, True),
            "starttls_enable": starttls_enable, "starttls_required": starttls_required,
        }

    def login(self, authentication: str, auth: bool) -> dict[str, Any]:
        """The mailbox user and password."""
        user, password = self.text("mail.user"), self.text("mail.password")
        if authentication == BASIC and auth:
            if not user:
                raise DestinationError(self.name, "mail.user", "is required for BasicAuthentication")
            if password is None:
                raise DestinationError(self.name, "mail.password", "is required for BasicAuthentication")
        return {"user": user, "password": password}

    def token_service(self, authentication: str, user: str | None) -> dict[str, Any]:
        """Where and how the OAuth2 types get their tokens."""
        url = self.text("tokenServiceURL")
        url_type = self.text("tokenServiceURLType") or "Dedicated"
        if url_type not in TOKEN_URL_TYPES:
            raise DestinationError(self.name, "tokenServiceURLType", f"must be Dedicated or Common, not {url_type!r}")
        client_id, client_secret = self.text("clientId"), self.text("clientSecret")
        if authentication in OAUTH2_TYPES:
            if not url:
                raise DestinationError(self.name, "tokenServiceURL", f"is required for {authentication}")
            if not url.startswith(("https://", "http://")):
                raise DestinationError(self.name, "tokenServiceURL", "must be an http(s) URL")
            if not client_id:
                raise DestinationError(self.name, "clientId", f"is required for {authentication}")
            if client_secret is None:
                raise DestinationError(self.name, "clientSecret", f"is required for {authentication}")
            if authentication == OAUTH2_CLIENT_CREDENTIALS and not user:
                raise DestinationError(self.name, "mail.user", "is required for OAuth2ClientCredentials")
        client_auth = (self.text("tokenServiceAuthentication") or "basic").lower()
        if client_auth not in ("basic", "body"):
            raise DestinationError(self.name, "tokenServiceAuthentication", f"must be basic or body, not {client_auth!r}")
        return {
            "token_service_url": url, "token_service_url_type": url_type, "client_id": client_id,
            "client_secret": client_secret, "scope": self.text("scope"), "token_client_auth": client_auth,
        }

    def pool(self, authentication: str, auth: bool) -> dict[str, Any]:
        """The warm upstream pool (SPEC 9.7)."""
        size = _number(self.name, "mailgw.pool.size", self.text("mailgw.pool.size"), 0, int, MAX_POOL_SIZE)
        max_idle = _number(self.name, "mailgw.pool.maxIdle", self.text("mailgw.pool.maxIdle"), 60.0, float, 86400)
        if size and authentication in LAZY_TYPES and auth:
            raise DestinationError(
                self.name, "mailgw.pool.size",
                f"a warm pool logs in ahead of time, which {authentication} cannot (the application brings the secret)",
            )
        if max_idle <= 0:
            raise DestinationError(self.name, "mailgw.pool.maxIdle", "must be more than 0 seconds")
        return {"pool_size": size, "pool_max_idle": max_idle}

