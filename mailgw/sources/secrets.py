"""The ``secrets`` destination source: the destination JSON in a Kubernetes Secret.

The Secret is named after ``destinationRef.name`` and lives in the Destination CR's
namespace; its key ``destination.json`` holds the destination object (SPEC section 5).
For a tenant lookup a key ``destination.<tenant>.json`` is preferred when present, so a
shared CR can point tenants at different mailboxes; otherwise all tenants share
``destination.json``.
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
from mailgw.kube.model import DestinationNotFound, InvalidDestination, SourceUnavailable
from mailgw.kube.sources import IDestinationSource, as_lookup_error, destination_from_json

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
    """Reads destinations from Secrets through the Kubernetes API (off the reactor)."""

    def __init__(self, api: KubeApi, run: Callable[..., "Deferred[Any]"], key: str = KEY):
        """``run(fn, *args)`` runs blocking ``fn`` in a thread, returning a Deferred
        (a :class:`mailgw.kube.client.Blocking`)."""
        self.api = api
        self.run = run
        self.key = key

    def lookup(self, namespace: str, name: str, tenant: str | None = None) -> "Deferred[Destination]":
        d = self.run(self._read, namespace, name, tenant)
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
