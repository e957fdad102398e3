"""Turning failures into short, secret-free refusals for the application and the log."""

from __future__ import annotations

from OpenSSL import SSL
from twisted.internet import defer, error
from twisted.python.failure import Failure

from .oauth import TokenError
from .protocol.actions import ProtocolError
from .protocol.refusal import Reason, Refusal
from .protocol.socks5 import SOCKSError

try:  # service_identity is a hard dependency, but keep this module importable alone
    from service_identity import VerificationError
except ImportError:  # pragma: no cover
    VerificationError = ()  # type: ignore[assignment]

#: OpenSSL reasons that name a certificate ("certificate verify failed", "self-signed
#: certificate", "unable to get local issuer certificate", "bad certificate" alerts) mean
#: the certificate, not the handshake, is the problem.
_CERTIFICATE = "certificate"


def _ssl_reason(exc: SSL.Error) -> str:
    # OpenSSL errors are lists of (library, function, reason) tuples.
    try:
        reasons = [entry[2] for entry in exc.args[0] if entry and entry[2]]
    except (IndexError, TypeError):
        reasons = []
    return ", ".join(reasons) or "TLS error"


class GatewayError(Exception):
    """An error of the gateway's own whose message is safe to show and log.

    ``reason`` is the class a session refused because of it counts under (a destination
    that cannot be looked up keeps the session from its upstream: ``connect``).
    """

    def __init__(self, message: str, permanent: bool = True, reason: Reason = Reason.CONNECT):
        super().__init__(message)
        self.safe_message = message
        self.permanent = permanent
        self.reason = reason


def describe(failure: Failure | BaseException, address: str) -> Refusal:
    """The refusal for a failure while reaching or talking to ``address``.

    Only the exception type and library-produced reason codes are used, so a secret that
    some library put into an exception message cannot leak through here.
    """
    exc = failure.value if isinstance(failure, Failure) else failure
    if isinstance(exc, SOCKSError):
        transient = isinstance(exc, (defer.TimeoutError, error.ConnectError, error.ConnectionLost))
        return Refusal(str(exc), Reason.PROXY, permanent=not transient)
    if isinstance(exc, ProtocolError):
        # Our machines' errors carry safe, specific messages.
        return Refusal(str(exc), Reason.PROTOCOL)
    if isinstance(exc, TokenError):  # its message names host, grant and client, no secret
        transient = exc.error_code in ("unreachable", "timeout", "http_error", "stopped")
        return Refusal(f"token service: {exc}", Reason.TOKEN, permanent=not transient)
    if isinstance(exc, error.ConnectionRefusedError):
        return Refusal(f"connection refused by {address}", Reason.CONNECT, permanent=False)
    if isinstance(exc, (error.TimeoutError, error.TCPTimedOutError, defer.TimeoutError, defer.CancelledError)):
        return Refusal(f"timed out connecting to {address}", Reason.TIMEOUT, permanent=False)
    if isinstance(exc, error.DNSLookupError):
        return Refusal(f"cannot resolve the host name of {address}", Reason.DNS, permanent=False)
    if isinstance(exc, error.NoRouteError):
        return Refusal(f"no route to {address}", Reason.CONNECT, permanent=False)
    if isinstance(exc, VerificationError):
        return Refusal(f"the certificate of {address} does not match its host name", Reason.CERTIFICATE)
    if isinstance(exc, SSL.Error):
        why = _ssl_reason(exc)
        reason = Reason.CERTIFICATE if _CERTIFICATE in why else Reason.TLS
        return Refusal(f"TLS handshake with {address} failed: {why}", reason)
    if isinstance(exc, (error.ConnectionDone, error.ConnectionLost)):
        return Refusal(f"{address} closed the connection", Reason.CONNECT, permanent=False)
    if isinstance(exc, GatewayError):
        return Refusal(exc.safe_message, exc.reason, exc.permanent)
    if isinstance(exc, error.ConnectError):
        # The rest of Twisted's connect failures (bind, EMFILE, an unknown host...):
        # their text is the operating system's reason, never anything of ours.
        return Refusal(f"cannot connect to {address}: {exc}", Reason.CONNECT, permanent=False)
    # A bug of ours or an exception nobody classified: the caller logs the traceback;
    # the application reads no internal name.
    return Refusal("internal error in the gateway", Reason.INTERNAL, permanent=False)
