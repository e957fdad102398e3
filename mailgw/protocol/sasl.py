"""SASL encodings used by the protocol machines (PLAIN, LOGIN, XOAUTH2, OAUTHBEARER)."""

from __future__ import annotations

import base64
import binascii


class SASLError(ValueError):
    """A SASL payload could not be decoded.  The message never contains the payload."""


def b64encode(data: bytes) -> bytes:
    return base64.b64encode(data)


def b64decode(data: bytes) -> bytes:
    """Strict base64 decoding; raises :class:`SASLError` without echoing the input."""
    try:
        return base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise SASLError("response is not valid base64") from None


def plain_initial_response(user: str, password: str, authzid: str = "") -> bytes:
    """The RFC 4616 PLAIN message, base64-encoded."""
    return b64encode(f"{authzid}\0{user}\0{password}".encode("utf-8"))


def xoauth2_initial_response(user: str, token: str) -> bytes:
    """The XOAUTH2 client response, base64-encoded."""
    return b64encode(f"user={user}\x01auth=Bearer {token}\x01\x01".encode("utf-8"))
