"""BTP destinations of Type MAIL for the tests, in their JSON form (what a destination
file, a Secret or the destination service holds).

    from support.destinations import mail, plain

    mail("imaps", "imap4s", dovecot.imaps_port, ca=certs.ca_pem)         # alice, BasicAuthentication
    plain("sink", "smtp", smtp_sink.port)                                 # NoAuthentication, no STARTTLS
    mail("x", "smtp", 25, **{"mail.smtp.starttls.required": "true", "mail.user": None})

A property given as ``None`` is left out.  ``parse_destination`` turns one into the
gateway's :class:`~mailgw.destination.Destination`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: realservers.DEFAULT_USERS["alice"]: the user the real servers know.
ALICE_PASSWORD = "secret"


def mail(
    name: str,
    protocol: str,
    port: int | str | None = None,
    *,
    host: str = "localhost",
    authentication: str = "BasicAuthentication",
    user: str | None = "alice",
    password: str | None = ALICE_PASSWORD,
    ca: str | Path | None = None,
    **properties: Any,
) -> dict[str, str]:
    """A MAIL destination for ``protocol`` (``smtp``, ``smtps``, ``imap4``, ``imap4s``,
    ``pop3``, ``pop3s``) at ``host:port``; ``ca``: the TrustStoreLocation."""
    values = {
        "Name": name, "Type": "MAIL", "ProxyType": "Internet", "Authentication": authentication,
        "mail.transport.protocol": protocol, f"mail.{protocol}.host": host,
        f"mail.{protocol}.port": None if port is None else str(port),
        "mail.user": user, "mail.password": password, "TrustStoreLocation": None if ca is None else str(ca),
        **properties,
    }
    return {key: value for key, value in values.items() if value is not None}


def plain(name: str, protocol: str = "smtp", port: int | str = 25, *, host: str = "127.0.0.1", **properties: Any) -> dict:
    """A destination without authentication and without STARTTLS (a sink, a test peer)."""
    properties.setdefault(f"mail.{protocol}.starttls.enable", "false")
    return mail(
        name, protocol, port, host=host, authentication="NoAuthentication", user=None, password=None, **properties
    )
