"""What the sans-IO machines hand back to the glue, and the two kinds of error they raise.

Machines never touch a socket: they take bytes and events and return a list of these
values, and the Twisted glue (``mailgw.session``) carries them out in order.
"""

from __future__ import annotations

from attrs import field, frozen

from .refusal import Reason


class ProtocolError(Exception):
    """The *peer* broke its protocol in a way the machine cannot recover from.

    The message is safe to show to the application and to log: machines never put
    credentials or AUTH payloads into it.
    """


class MisuseError(Exception):
    """Our own glue called a machine in a way its state does not allow: a bug of the
    gateway, never the peer's fault (h11 calls this a LocalProtocolError).  The session
    logs it with its traceback and refuses only the session concerned, as an internal
    error."""


@frozen
class SendToApp:
    """Write ``data`` to the application."""

    data: bytes = field(repr=False)


@frozen
class SendUpstream:
    """Write ``data`` to the upstream server."""

    data: bytes = field(repr=False)


@frozen
class StartTLS:
    """Start the TLS handshake on the upstream connection now."""


@frozen
class UpstreamReady:
    """The upstream session is authenticated (or needs none) and waits for commands.

    ``capabilities`` is protocol specific: SMTP EHLO extension lines, IMAP capability
    atoms, POP3 CAPA lines (all as ``str``).
    """

    capabilities: tuple[str, ...] = ()


@frozen
class UpstreamFailed:
    """The upstream side cannot be used; ``reason`` says why (no secrets in it).

    ``permanent`` distinguishes a refusal that retrying will not fix (authentication,
    certificate) from a transient one (timeout, connection refused); ``kind`` is the
    class the refusal is counted under.
    """

    reason: str
    permanent: bool = True
    kind: Reason = Reason.PROTOCOL


@frozen
class UpstreamAwaitingLogin:
    """The upstream is connected, TLS is up and its capabilities are known; the login
    waits for the credentials the application will present (the lazy OAuth2 types).

    The glue greets the application now and later calls the upstream machine's
    ``authenticate(credentials)``, which ends in :class:`UpstreamReady` or
    :class:`LoginRefused`.  ``capabilities`` are the pre-login ones, in the same form
    as :class:`UpstreamReady`'s.
    """

    capabilities: tuple[str, ...] = ()


@frozen
class LoginRefused:
    """The upstream refused the credentials given to ``authenticate()``.

    Not fatal: the upstream session stays usable and ``authenticate()`` may be called
    again.  ``reason`` quotes the upstream's reply (never a secret).
    """

    reason: str


@frozen
class ExchangeSecret:
    """The application presented a refresh token or authorisation code (XOAUTH2 or
    OAUTHBEARER).

    The session exchanges ``secret`` for an access token, authenticates upstream as
    ``user`` (or the destination's ``mail.user`` when ``user`` is empty) and reports the
    outcome back to the application machine with ``auth_succeeded(capabilities)`` or
    ``auth_refused(reason, transient)``.  Until then that machine answers nothing.
    """

    mechanism: str
    user: str
    secret: str = field(repr=False)


@frozen
class Release:
    """Stop parsing: forward ``leftover`` (app bytes already received) and splice."""

    leftover: bytes = field(default=b"", repr=False)


@frozen
class Close:
    """Close the application connection after what was sent; ``reason`` is for the log."""

    reason: str
