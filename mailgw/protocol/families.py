"""Which machines serve which protocol family: the one place the session machine asks."""

from __future__ import annotations

from ..destination import BASIC, NO_AUTH, OAUTH2_CLIENT_CREDENTIALS, Destination
from ..settings import Settings
from . import imap, pop3, smtp
from .appside import AppSide, Dialect
from .credentials import Credentials, Password
from .upstream import UpstreamMachine

_UPSTREAM = {"smtp": smtp.SMTPUpstream, "imap": imap.IMAPUpstream, "pop3": pop3.POP3Upstream}
_APP_SIDE = {"smtp": smtp.SMTPAppSide, "imap": imap.IMAPAppSide, "pop3": pop3.POP3AppSide}


def _family(name: str) -> str:
    if name not in _APP_SIDE:
        raise ValueError(f"protocol family {name!r} is not served")
    return name


def dialect(family: str) -> Dialect:
    """How ``family`` writes refusals and goodbyes (also before a destination is known)."""
    return _APP_SIDE[_family(family)].dialect


def is_lazy(destination: Destination) -> bool:
    """True when the application presents the secret the login needs (the lazy OAuth2
    types): the upstream machine stops before logging in and waits for it."""
    return destination.lazy and destination.auth


def needs_token(destination: Destination) -> bool:
    """True when the eager login needs a client-credentials token first."""
    return destination.auth and destination.authentication == OAUTH2_CLIENT_CREDENTIALS


def password(destination: Destination) -> Credentials | None:
    """The eager login's credentials when they need no token: the configured password
    (BasicAuthentication), or none at all."""
    if destination.auth and destination.authentication == BASIC:
        return Password(destination.user or "", destination.password or "")
    if not destination.auth or destination.authentication == NO_AUTH or is_lazy(destination):
        return None
    raise ValueError(f"authentication type {destination.authentication} needs a token")


def upstream_machine(destination: Destination, credentials: Credentials | None, settings: Settings) -> UpstreamMachine:
    """The machine that logs in to ``destination`` with ``credentials`` (or, for the lazy
    types, stops before the login: see :func:`is_lazy`)."""
    family = _family(destination.family)
    extra = {"ehlo_name": settings.hostname} if family == "smtp" else {}
    return _UPSTREAM[family](
        implicit_tls=destination.implicit_tls,
        starttls_enable=destination.starttls_enable,
        starttls_required=destination.starttls_required,
        credentials=credentials,
        max_line=settings.max_line,
        lazy=credentials is None and is_lazy(destination),
        **extra,
    )


def app_machine(destination: Destination, capabilities: tuple[str, ...], settings: Settings, lazy: bool = False) -> AppSide:
    """The machine that talks to the application until release; ``lazy`` when the
    application must authenticate with its refresh token or authorisation code."""
    cls = _APP_SIDE[_family(destination.family)]
    return cls(capabilities=capabilities, hostname=settings.hostname, max_line=settings.max_line, lazy=lazy)
