"""Destinations and bindings kept in Kubernetes Secrets.

- :class:`SecretsSource` (the ``secrets`` source): the destination JSON in a Secret named
  after ``destinationRef.name`` in the Destination CR's namespace, key
  ``destination.json`` (SPEC section 5).  For a tenant lookup a key
  ``destination.<tenant>.json`` is preferred when present, so a shared CR can point
  tenants at different mailboxes; otherwise all tenants share ``destination.json``.
- :func:`binding_credentials`: the blocking loader of a destination service binding
  (``clientid``, ``clientsecret``, ``url``, ``uri``) for the ``btp`` source.

The controller watches Secrets of type Opaque (metadata only) and invalidates the cached
answers of a Secret when it changes, so a changed destination applies within seconds; a
destination Secret of another type is then refused (``required_type``), since nothing
would tell the cache that it changed.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any, Callable, Mapping

from twisted.internet.defer import Deferred
from zope.interface import implementer

from mailgw.destination import Destination
from mailgw.kube.client import KubeApi, KubeApiError
from mailgw.sources.base import (
    DestinationNotFound,
    IDestinationSource,
    InvalidDestination,
    SourceUnavailable,
    as_lookup_error,
    destination_from_json,
)
from mailgw.sources.btp import BtpCredentials

KEY = "destination.json"
MAX_SIZE = 256 * 1024


def secret_value(secret: Mapping[str, Any], key: str) -> str | None:
    """A Secret's value as text (``data`` is base64; ``stringData`` is accepted too)."""
    data = secret.get("data")
    if isinstance(data, Mapping) and key in data:
        raw = data[key]
        if not isinstance(raw, str):
            raise ValueError(f"key {key!r} is not a base64 string")
        try:
            decoded = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"key {key!r} is not valid base64") from None
        if len(decoded) > MAX_SIZE:
            raise ValueError(f"key {key!r} is larger than {MAX_SIZE} bytes")
        try:
            return decoded.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"key {key!r} is not UTF-8 text") from None
    string_data = secret.get("stringData")
    if isinstance(string_data, Mapping) and isinstance(string_data.get(key), str):
        return string_data[key]
    return None


@implementer(IDestinationSource)
class SecretsSource:
    """Reads destinations from Secrets through the Kubernetes API, in a worker pool."""

    def __init__(
        self, api: KubeApi, run: Callable[..., "Deferred[Any]"], key: str = KEY, *, required_type: str | None = None
    ):
        """``run(fn, *args)`` runs blocking ``fn`` in a worker pool (a
        :class:`~mailgw.blocking.BlockingPool`) and is the default of :meth:`lookup`.
        ``required_type``: the only Secret type accepted (the type the controller's
        Secret watch sees; a destination it cannot see change would stay cached)."""
        self.api = api
        self.run = run
        self.key = key
        self.required_type = required_type

    def lookup(
        self, namespace: str, name: str, tenant: str | None = None, *, run: Callable[..., Deferred] | None = None
    ) -> "Deferred[Destination]":
        d = (run or self.run)(self._read, namespace, name, tenant)
        d.addErrback(as_lookup_error, f"reading Secret {namespace}/{name}")
        return d

    def _read(self, namespace: str, name: str, tenant: str | None) -> Destination:
        origin = f"Secret {namespace}/{name}"
        try:
            secret = self.api.get("Secret", namespace, name)
        except KubeApiError as e:
            raise SourceUnavailable(f"cannot read {origin}: {e}") from None
        if secret is None:
            raise DestinationNotFound(f"{origin} holding destination {name!r} not found")
        kind = secret.get("type") or "Opaque"
        if self.required_type is not None and kind != self.required_type:
            raise InvalidDestination(
                f"{origin} has type {str(kind)[:100]!r}: a destination Secret must be of type "
                f"{self.required_type} (kubectl create secret generic), the type whose changes the gateway watches"
            )
        keys = [self.key]
        if tenant is not None and self.key.endswith(".json"):
            keys.insert(0, f"{self.key[:-5]}.{tenant}.json")
        text = None
        try:
            for key in keys:
                text = secret_value(secret, key)
                if text is not None:
                    break
        except ValueError as e:
            raise InvalidDestination(f"{origin}: {e}") from None
        if text is None:
            raise DestinationNotFound(f"{origin} has no key {self.key!r}")
        try:
            obj = json.loads(text)
        except ValueError as e:
            raise InvalidDestination(f"{origin}: key {self.key!r} is not valid JSON ({e.msg})") from None
        return destination_from_json(obj, origin)


def credentials_from_secret(secret: Mapping[str, Any], origin: str) -> BtpCredentials:
    """A destination service binding from a Secret's data."""
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


def binding_credentials(api: KubeApi, namespace: str, name: str) -> Callable[[], BtpCredentials]:
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
