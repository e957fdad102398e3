"""The actions sans-IO machines hand back to the glue.

Machines never touch a socket: they take bytes and return a list of these values, and
the Twisted glue (``mailgw.session``) carries them out in order.
"""

from __future__ import annotations

from attrs import field, frozen


class ProtocolError(Exception):
    """The peer broke the protocol in a way the machine cannot recover from.

    The message is safe to show to the application and to log: machines never put
    credentials or AUTH payloads into it.
    """


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
    certificate) from a transient one (timeout, connection refused).
    """

    reason: str
    permanent: bool = True


@frozen
class Release:
    """Stop parsing: forward ``leftover`` (app bytes already received) and splice."""

    leftover: bytes = field(default=b"", repr=False)


@frozen
class Close:
    """Close the application connection after what was sent; ``reason`` is for the log."""

    reason: str
