"""What every destination source shares: the interfaces, the typed lookup failures, the
values a destination service returns, and the JSON checks.

A source answers ``lookup(namespace, name, tenant=None)`` with a Deferred firing with a
:class:`~mailgw.destination.Destination`, or failing with a
:class:`DestinationLookupError` subclass.  ``namespace`` scopes the name (the Kubernetes
namespace of the resource that refers to it; sources that have no such scope ignore it).

This module sits below :mod:`mailgw.kube` and knows nothing of it: Kubernetes mode maps
each failure class to the status reason of the custom resource that uses it.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from attrs import field, frozen
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from mailgw.destination import PROXY_TYPES, Destination, DestinationError, parse_destination

log = Logger(namespace="mailgw.sources")


# --- typed lookup failures ------------------------------------------------------------


class DestinationLookupError(Exception):
    """A destination lookup failed; ``message`` is safe to show (no secrets).

    ``definitive`` failures (the destination does not exist, is of the wrong type, ...)
    may be cached and remove what was made for the destination; transient ones (the
    source cannot be reached) are not cached and leave what exists alone, so an outage
    of a destination service does not take Services away.
    """

    definitive = False

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class DestinationNotFound(DestinationLookupError):
    definitive = True


class TypeNotSupported(DestinationLookupError):
    definitive = True


class ProxyTypeNotSupported(DestinationLookupError):
    definitive = True


class InvalidDestination(DestinationLookupError):
    definitive = True


class InstanceNotFound(DestinationLookupError):
    """No source of that name is configured."""

    definitive = True


class SourceUnavailable(DestinationLookupError):
    """The source could not be asked (network, API error, timeout): try again later."""


class TokenExchangeFailed(DestinationLookupError):
    """The destination service could not turn the presented secret into a token.  The
    message carries the service's error text, never the secret."""


def as_lookup_error(failure: Failure, what: str) -> None:
    """Errback for sources: anything that is not already a DestinationLookupError (the
    worker pool shut down, a bug) becomes a transient :class:`SourceUnavailable` whose
    message names only the exception type (its text might hold a secret)."""
    if failure.check(DestinationLookupError):
        failure.raiseException()
    log.failure("{what} failed unexpectedly", failure, what=what)
    raise SourceUnavailable(f"{what} failed: {failure.type.__name__}")


# --- interfaces -----------------------------------------------------------------------


class IDestinationSource(Interface):
    """Where destinations come from."""

    def lookup(namespace: str, name: str, tenant: str | None = None) -> "Deferred[Destination]":
        """The destination ``name`` as seen from ``namespace`` (and ``tenant``); fails
        with a DestinationLookupError subclass."""


@frozen
class AuthToken:
    """A token the destination service returned with a destination (``authTokens``)."""

    type: str
    value: str = field(repr=False)
    expires_in: int | None = None
    error: str | None = None


@frozen
class FindResult:
    """A destination and the tokens that came with it."""

    destination: Destination
    auth_tokens: tuple[AuthToken, ...] = ()


class ITokenExchange(Interface):
    """A source that exchanges the application's secret for an upstream token (the
    destination service, for OAuth2RefreshToken / OAuth2AuthorizationCode)."""

    def exchange(
        namespace: str, name: str, tenant: str | None = None, *,
        refresh_token: str | None = None, code: str | None = None,
    ) -> "Deferred[FindResult]":
        """Find the destination presenting ``refresh_token`` (``X-refresh-token``) or
        ``code`` (``X-code``); the result's ``auth_tokens`` hold the upstream token."""


def destination_from_json(obj: Any, origin: str) -> Destination:
    """Check and parse a destination JSON object into the typed lookup errors."""
    if not isinstance(obj, Mapping):
        raise InvalidDestination(f"{origin}: the destination is not a JSON object")
    kind = obj.get("Type")
    if kind != "MAIL":
        raise TypeNotSupported(
            f"{origin}: destination {obj.get('Name')!r} has type {kind!r}; only MAIL is supported"
        )
    proxy_type = obj.get("ProxyType") or "Internet"
    if proxy_type not in PROXY_TYPES:
        raise ProxyTypeNotSupported(
            f"{origin}: destination {obj.get('Name')!r} has ProxyType {proxy_type!r}; "
            f"supported: {', '.join(PROXY_TYPES)}"
        )
    try:
        return parse_destination(obj, origin=origin)
    except DestinationError as e:
        raise InvalidDestination(str(e)) from None


@implementer(IDestinationSource)
class MappingSource:
    """Destinations from a mapping ``(namespace, name) -> Destination`` (or a callable
    returning one), for tests and demos.  A value that is an exception is raised."""

    def __init__(self, destinations: Mapping[tuple[str, str], Any] | Callable[[], Mapping]):
        self._destinations = destinations

    def lookup(self, namespace: str, name: str, tenant: str | None = None, **_: Any) -> "Deferred[Destination]":
        table = self._destinations() if callable(self._destinations) else self._destinations
        found = table.get((namespace, name))
        if found is None:
            return fail(DestinationNotFound(f"destination {name!r} not found"))
        if isinstance(found, BaseException):
            return fail(found)
        return succeed(found)
