"""Which machines serve which protocol family; the one place the session asks."""

from __future__ import annotations

from ..destination import Destination
from . import imap, pop3, smtp
from .credentials import Credentials

_UPSTREAM = {"smtp": smtp.SMTPUpstream, "imap": imap.IMAPUpstream, "pop3": pop3.POP3Upstream}
_APP_SIDE = {"smtp": smtp.SMTPAppSide, "imap": imap.IMAPAppSide, "pop3": pop3.POP3AppSide}
#: Settings only one family's upstream machine takes.
_UPSTREAM_EXTRA = {"smtp": lambda settings: {"ehlo_name": settings.hostname}}


def _family(name: str) -> str:
    if name not in _APP_SIDE:
        raise ValueError(f"protocol family {name!r} is not served")
    return name


def login_later(destination: Destination) -> bool:
    """True when the application presents the secret the login needs (the lazy OAuth2
    types): the upstream machine stops before logging in."""
    return destination.lazy and destination.auth


def upstream_machine(destination: Destination, credentials: Credentials | None, settings):
    """The machine that logs in to ``destination`` with ``credentials`` (or, for the lazy
    types, stops before the login: see :func:`login_later`)."""
    family = _family(destination.family)
    return _UPSTREAM[family](
        implicit_tls=destination.implicit_tls,
        starttls_enable=destination.starttls_enable,
        starttls_required=destination.starttls_required,
        credentials=credentials,
        max_line=settings.max_line,
        login_later=credentials is None and login_later(destination),
        **_UPSTREAM_EXTRA.get(family, lambda s: {})(settings),
    )


def app_machine(destination: Destination, capabilities: tuple[str, ...], settings, lazy: bool = False):
    """The machine that talks to the application until release; ``lazy`` when the
    application must authenticate with its refresh token or authorisation code."""
    cls = _APP_SIDE[_family(destination.family)]
    return cls(capabilities=capabilities, hostname=settings.hostname, max_line=settings.max_line, lazy=lazy)


def refusal(family: str, text: str, permanent: bool) -> bytes:
    return _APP_SIDE[_family(family)].refusal(text, permanent)


def goodbye(family: str, text: str) -> bytes:
    return _APP_SIDE[_family(family)].goodbye(text)
