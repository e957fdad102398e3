"""Turning failures into short, secret-free explanations for the application and the log."""

from __future__ import annotations

from OpenSSL import SSL
from twisted.internet import defer, error
from twisted.python.failure import Failure

from .oauth import TokenError
from .protocol.actions import ProtocolError

try:  # service_identity is a hard dependency, but keep this module importable alone
    from service_identity import VerificationError
except ImportError:  # pragma: no cover
    VerificationError = ()  # type: ignore[assignment]


def _ssl_reason(exc: SSL.Error) -> str:
    # OpenSSL errors are lists of (library, function, reason) tuples.
    try:
        reasons = [entry[2] for entry in exc.args[0] if entry and entry[2]]
    except (IndexError, TypeError):
        reasons = []
    return ", ".join(reasons) or "TLS error"


def describe(failure: Failure | BaseException, address: str) -> tuple[str, bool]:
    """``(text, permanent)`` for a failure while reaching or talking to ``address``.

    Only the exception type and library-produced reason codes are used, so a secret that
    some library put into an exception message cannot leak through here.
    """
    exc = failure.value if isinstance(failure, Failure) else failure
    if isinstance(exc, ProtocolError):
        # Our machines' and the SOCKS layer's errors (also those that subclass Twisted's
        # timeout and connection errors) carry safe, specific messages.
        return str(exc), not isinstance(exc, (defer.TimeoutError, error.ConnectError, error.ConnectionLost))
    if isinstance(exc, TokenError):  # its message names host, grant and client, no secret
        return f"token service: {exc}", exc.error_code not in ("unreachable", "timeout", "http_error", "stopped")
    if isinstance(exc, error.ConnectionRefusedError):
        return f"connection refused by {address}", False
    if isinstance(exc, (error.TimeoutError, defer.TimeoutError, defer.CancelledError)):
        return f"timed out connecting to {address}", False
    if isinstance(exc, error.DNSLookupError):
        return f"cannot resolve the host name of {address}", False
    if isinstance(exc, error.NoRouteError):
        return f"no route to {address}", False
    if isinstance(exc, VerificationError):
        return f"the certificate of {address} does not match its host name", True
    if isinstance(exc, SSL.Error):
        return f"TLS handshake with {address} failed: {_ssl_reason(exc)}", True
    if isinstance(exc, (error.ConnectionDone, error.ConnectionLost)):
        return f"{address} closed the connection", False
    explain = getattr(exc, "safe_message", None)  # typed errors of our own layers
    if isinstance(explain, str):
        return explain, getattr(exc, "permanent", True)
    return f"{type(exc).__name__} while talking to {address}", False


class GatewayError(Exception):
    """An error of the gateway's own whose message is safe to show and log."""

    permanent = True

    def __init__(self, message: str, permanent: bool = True):
        super().__init__(message)
        self.safe_message = message
        self.permanent = permanent


class UnsupportedError(GatewayError):
    """The destination asks for something this gateway does not do."""
