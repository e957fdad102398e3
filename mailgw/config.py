"""gateway.yaml: the standalone gateway's configuration file (SPEC section 2).

:func:`load_config` reads YAML or JSON, resolves secret references (``{"env": NAME}``,
``{"file": path}``), validates every destination and listener and returns a frozen
:class:`GatewayConfig`.  Every problem is a :class:`ConfigError` whose one-line message
names the file, the destination and the key.
"""

from __future__ import annotations

import json
import math
import os
import re
import typing
from pathlib import Path
from typing import Any, Mapping

import yaml
from attrs import field, frozen

from .destination import Destination, DestinationError, parse_destination
from .endpoints.tls import TLSConfigError, check_tls_files
from .files import UnreadableFile, read_capped
from .protocol.socks5 import SOCKSConfigurationError, userpass_request
from .settings import Settings

#: Configuration files (gateway.yaml, a destinations directory's *.json) larger than
#: this are refused: nothing legitimate comes close, and reading must stay bounded.
MAX_CONFIG_BYTES = 4 * 1024 * 1024
#: Secret files (``{file: path}``) larger than this are refused.
MAX_SECRET_BYTES = 64 * 1024


class ConfigError(ValueError):
    """The configuration cannot be used; the message says where and why."""


def _read(path: Path | str, limit: int, what: str) -> bytes:
    try:
        return read_capped(path, limit, what)
    except UnreadableFile as e:
        raise ConfigError(str(e)) from None


def _text(data: bytes, path: Path, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: {what} is not UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})") from None


@frozen
class ListenerConfig:
    destination: str
    listen: str  # a Twisted server endpoint string
    tenant: str | None = None


@frozen
class ProxyConfig:
    """The SOCKS5 connectivity proxy used by OnPremise destinations."""

    host: str
    port: int
    authentication: str = "none"  # none | userpass | sap
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    token_service_url: str | None = None  # sap: where the proxy's JWT comes from
    client_id: str | None = None
    client_secret: str | None = field(default=None, repr=False)


@frozen
class SendApiConfig:
    """``http.send``: the send API (SPEC 9.1).  ``listen`` None: on the http listener."""

    listen: str | None = None
    tokens: tuple[str, ...] = field(default=(), repr=False)  # bearer tokens, resolved


@frozen
class HttpConfig:
    listen: str
    send: SendApiConfig | None = None  # None: no send API at all


@frozen
class AuditConfig:
    """``audit``: one JSON line per ended session and send API request (SPEC 9.3)."""

    path: str  # "-" is standard output


@frozen
class LoggingConfig:
    """``logging`` (SPEC 9.4)."""

    format: str = "text"  # text | json
    #: ``debug`` adds a line for every step of every session (connect, greet, release,
    #: close); the default ``info`` keeps sessions to warnings and the audit log
    level: str = "info"


@frozen
class GatewayConfig:
    destinations: dict[str, Destination]
    listeners: tuple[ListenerConfig, ...]
    connectivity_proxy: ProxyConfig | None = None
    http: HttpConfig | None = None
    settings: Settings = Settings()
    audit: AuditConfig | None = None
    logging: LoggingConfig = LoggingConfig()
    origin: str = "<config>"
    #: the ``kubernetes:`` section, validated by Kubernetes mode (mailgw.kube.config)
    kubernetes: Mapping[str, Any] | None = None


def _setting_attribute(section: str, key: str) -> str | None:
    """The Settings attribute of ``timeouts.<key>`` / ``limits.<key>`` in gateway.yaml:
    the camel-case key in snake case, with ``_timeout`` for the timeouts (``relayIdle``
    is ``relay_idle_timeout``, ``maxSessionsPerClient`` is ``max_sessions_per_client``);
    None for a key that names no number of that section."""
    if not re.fullmatch(r"[a-z][A-Za-z]*", key):
        return None
    name = re.sub(r"(?=[A-Z])", "_", key).lower() + ("_timeout" if section == "timeouts" else "")
    wanted = float if section == "timeouts" else int
    return name if _SETTING_TYPES.get(name) is wanted else None


#: Settings' numbers by attribute name, from its annotations.
_SETTING_TYPES = typing.get_type_hints(Settings)


def positive(value: Any, where: str, *, whole: bool = False) -> float | int:
    """``value`` when it is a finite positive number (a whole one for counts), else a
    ConfigError naming ``where``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{where}: must be a positive number")
    if whole:
        if value != int(value):
            raise ConfigError(f"{where}: must be a whole number")
        return int(value)
    return float(value)


def resolve_secret(value: Any, where: str, base: Path) -> Any:
    """Replace ``{"env": NAME}`` and ``{"file": path}`` with the secret they point at."""
    if not (isinstance(value, Mapping) and len(value) == 1 and next(iter(value)) in ("env", "file")):
        return value
    kind, ref = next(iter(value.items()))
    if not isinstance(ref, str) or not ref:
        raise ConfigError(f"{where}: {kind} reference must be a non-empty string")
    if kind == "env":
        if ref not in os.environ:
            raise ConfigError(f"{where}: environment variable {ref} is not set")
        return os.environ[ref]
    path = base / ref
    try:
        return _text(_read(path, MAX_SECRET_BYTES, "secret file"), path, "secret file").rstrip("\r\n")
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _load_document(path: Path) -> Any:
    text = _text(_read(path, MAX_CONFIG_BYTES, "configuration file"), path, "configuration file")
    try:
        if path.suffix == ".json":
            return json.loads(text)
        return yaml.safe_load(text)  # YAML is a superset of JSON
    except RecursionError:
        # Both parsers recurse per nesting level; a few thousand "[" are enough.
        raise ConfigError(f"{path}: nested too deeply") from None
    except (ValueError, yaml.YAMLError) as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}:{where} not valid YAML/JSON: {problem}") from None


def _destination(raw: Any, origin: str, base: Path) -> Destination:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{origin}: a destination must be a mapping, not {type(raw).__name__}")
    name = raw.get("Name", "?")
    resolved = {key: resolve_secret(value, f"{origin}: destination {name!r}, key {key!r}", base) for key, value in raw.items()}
    try:
        destination = parse_destination(resolved, origin)
        check_tls_files(destination)
    except (DestinationError, TLSConfigError) as e:
        raise ConfigError(f"{origin}: {e}") from None
    return destination


def _destinations(raw: Any, origin: str, base: Path) -> dict[str, Destination]:
    items: list[tuple[Any, str]] = []
    if isinstance(raw, str):  # a directory of *.json files
        directory = base / raw
        if not directory.is_dir():
            raise ConfigError(f"{origin}: destinations: {directory} is not a directory")
        for path in sorted(directory.glob("*.json")):
            items.append((_load_document(path), str(path)))
    elif isinstance(raw, list):
        items = [(item, origin) for item in raw]
    else:
        raise ConfigError(f"{origin}: destinations must be a list or a directory name")
    result: dict[str, Destination] = {}
    for item, item_origin in items:
        destination = _destination(item, item_origin, base)
        if destination.name in result:
            raise ConfigError(f"{item_origin}: destination {destination.name!r} is defined twice")
        result[destination.name] = destination
    return result


def _listeners(raw: Any, origin: str, destinations: Mapping[str, Destination]) -> tuple[ListenerConfig, ...]:
    if raw is None:
        raw = []
    if not isinstance(raw, list):
        raise ConfigError(f"{origin}: listeners must be a list")
    result = []
    for index, item in enumerate(raw):
        where = f"{origin}: listeners[{index}]"
        if not isinstance(item, Mapping):
            raise ConfigError(f"{where}: must be a mapping with destination and listen")
        unknown = set(item) - {"destination", "listen", "tenant"}
        if unknown:
            raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r}")
        name, listen, tenant = item.get("destination"), item.get("listen"), item.get("tenant")
        if not isinstance(name, str) or name not in destinations:
            raise ConfigError(f"{where}, key 'destination': no destination named {name!r}")
        if not isinstance(listen, str) or not listen:
            raise ConfigError(f"{where}, key 'listen': must be a Twisted endpoint string like tcp:2525:interface=127.0.0.1")
        if tenant is not None and not isinstance(tenant, str):
            raise ConfigError(f"{where}, key 'tenant': must be a string")
        result.append(ListenerConfig(destination=name, listen=listen, tenant=tenant))
    return tuple(result)


def _proxy(raw: Any, origin: str, base: Path) -> ProxyConfig | None:
    if raw is None:
        return None
    where = f"{origin}: connectivityProxy"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: must be a mapping")
    values = {key: resolve_secret(value, f"{where}, key {key!r}", base) for key, value in raw.items()}
    known = {"host", "port", "authentication", "username", "password", "tokenServiceURL", "clientId", "clientSecret"}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    host, port = values.get("host"), values.get("port")
    if not isinstance(host, str) or not host:
        raise ConfigError(f"{where}, key 'host': is missing")
    try:
        port = int(port)
        if not 0 < port < 65536:
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(f"{where}, key 'port': must be a port number") from None
    auth = values.get("authentication", "none")
    if auth not in ("none", "userpass", "sap"):
        raise ConfigError(f"{where}, key 'authentication': must be none, userpass or sap, not {auth!r}")
    needed = {"none": (), "userpass": ("username", "password"), "sap": ("tokenServiceURL", "clientId", "clientSecret")}[auth]
    for key in needed:
        if not values.get(key):
            raise ConfigError(f"{where}, key {key!r}: is required for authentication {auth}")
    # What the first OnPremise session would otherwise find out.
    if auth == "userpass":
        try:
            userpass_request(str(values["username"]), str(values["password"]))
        except SOCKSConfigurationError as e:
            raise ConfigError(f"{where}: {e}") from None
    if auth == "sap" and not str(values["tokenServiceURL"]).startswith(("https://", "http://")):
        raise ConfigError(f"{where}, key 'tokenServiceURL': must be an http(s) URL")
    return ProxyConfig(
        host=host, port=port, authentication=auth,
        username=values.get("username"), password=values.get("password"),
        token_service_url=values.get("tokenServiceURL"), client_id=values.get("clientId"),
        client_secret=values.get("clientSecret"),
    )


def _settings(doc: Mapping[str, Any], origin: str) -> Settings:
    changes: dict[str, Any] = {}
    for section in ("timeouts", "limits"):
        raw = doc.get(section) or {}
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{origin}: {section} must be a mapping")
        for key, value in raw.items():
            attribute = _setting_attribute(section, key) if isinstance(key, str) else None
            if attribute is None:
                raise ConfigError(f"{origin}: {section}: unknown key {key!r}")
            changes[attribute] = positive(value, f"{origin}: {section}, key {key!r}", whole=section == "limits")
    hostname = doc.get("hostname")
    if hostname is not None:
        if not isinstance(hostname, str) or not hostname.isascii() or not hostname:
            raise ConfigError(f"{origin}: hostname must be an ASCII host name")
        changes["hostname"] = hostname
    return Settings(**changes)


def _http(raw: Any, origin: str, base: Path) -> HttpConfig | None:
    if raw is None:
        return None
    where = f"{origin}: http"
    if not isinstance(raw, Mapping) or not isinstance(raw.get("listen"), str) or not raw["listen"]:
        raise ConfigError(f"{where}: must be a mapping with a listen endpoint string")
    unknown = set(raw) - {"listen", "send"}
    if unknown:
        raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    send = raw.get("send")
    if send is None:
        return HttpConfig(listen=raw["listen"])
    where += ", key 'send'"
    if not isinstance(send, Mapping):
        raise ConfigError(f"{where}: must be a mapping (listen, tokens)")
    unknown = set(send) - {"listen", "tokens"}
    if unknown:
        raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    listen = send.get("listen")
    if listen is not None and (not isinstance(listen, str) or not listen):
        raise ConfigError(f"{where}, key 'listen': must be a Twisted endpoint string")
    raw_tokens = send.get("tokens") or []
    if not isinstance(raw_tokens, list):
        raise ConfigError(f"{where}, key 'tokens': must be a list of secret references")
    tokens = []
    for index, item in enumerate(raw_tokens):
        token = resolve_secret(item, f"{where}, tokens[{index}]", base)
        if not isinstance(token, str) or not token.strip():
            raise ConfigError(f"{where}, tokens[{index}]: must be a non-empty string or a secret reference")
        tokens.append(token.strip())
    return HttpConfig(listen=raw["listen"], send=SendApiConfig(listen=listen, tokens=tuple(tokens)))


def _audit(raw: Any, origin: str, base: Path) -> AuditConfig | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping) or set(raw) != {"path"} or not isinstance(raw["path"], str) or not raw["path"]:
        raise ConfigError(f"{origin}: audit: must be a mapping with one key, path (a file, or - for standard output)")
    path = raw["path"]
    return AuditConfig(path=path if path == "-" else str(base / path))


def _logging(raw: Any, origin: str) -> LoggingConfig:
    if raw is None:
        return LoggingConfig()
    if not isinstance(raw, Mapping) or set(raw) - {"format", "level"}:
        raise ConfigError(f"{origin}: logging: must be a mapping with the keys format and level")
    log_format, level = raw.get("format", "text"), raw.get("level", "info")
    if log_format not in ("text", "json"):
        raise ConfigError(f"{origin}: logging, key 'format': must be text or json, not {log_format!r}")
    if level not in ("info", "debug"):
        raise ConfigError(f"{origin}: logging, key 'level': must be info or debug, not {level!r}")
    return LoggingConfig(format=log_format, level=level)


_TOP_LEVEL = {
    "destinations", "listeners", "connectivityProxy", "http", "timeouts", "limits", "hostname", "kubernetes",
    "audit", "logging",
}


def parse_config(doc: Any, origin: str = "<config>", base: Path | None = None) -> GatewayConfig:
    """Validate an already-parsed configuration document."""
    base = base or Path.cwd()
    if not isinstance(doc, Mapping):
        raise ConfigError(f"{origin}: must be a mapping with destinations and listeners")
    unknown = set(doc) - _TOP_LEVEL
    if unknown:
        raise ConfigError(f"{origin}: unknown key {sorted(unknown)[0]!r}")
    destinations = _destinations(doc.get("destinations", []), origin, base)
    listeners = _listeners(doc.get("listeners"), origin, destinations)
    proxy = _proxy(doc.get("connectivityProxy"), origin, base)
    for destination in destinations.values():
        if destination.on_premise and proxy is None:
            raise ConfigError(
                f"{origin}: destination {destination.name!r}, key 'ProxyType': is OnPremise but no connectivityProxy is configured"
            )
    return GatewayConfig(
        destinations=destinations, listeners=listeners, connectivity_proxy=proxy,
        http=_http(doc.get("http"), origin, base), settings=_settings(doc, origin),
        audit=_audit(doc.get("audit"), origin, base), logging=_logging(doc.get("logging"), origin),
        origin=origin, kubernetes=doc.get("kubernetes"),
    )


def load_config(path: str | os.PathLike) -> GatewayConfig:
    """Read and validate ``path`` (YAML or JSON)."""
    path = Path(path)
    return parse_config(_load_document(path), str(path), path.parent)
