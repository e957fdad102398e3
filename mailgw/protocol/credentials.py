"""What the upstream machines log in with.  Secrets never appear in repr."""

from __future__ import annotations

from attrs import field, frozen


@frozen
class Password:
    """A mailbox user and password (BasicAuthentication)."""

    user: str
    password: str = field(repr=False)


@frozen
class BearerToken:
    """A mailbox user and an OAuth2 access token (XOAUTH2 / OAUTHBEARER)."""

    user: str
    token: str = field(repr=False)


Credentials = Password | BearerToken
