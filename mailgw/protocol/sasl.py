"""SASL encodings used by the protocol machines (PLAIN, LOGIN, XOAUTH2, OAUTHBEARER).

Sans-IO and free of Twisted.  Two layers:

- ``encode_*`` / ``decode_*`` work on the raw (already base64-decoded) SASL message;
- ``*_initial_response`` and :func:`decode_initial_response` work on the base64 text
  that travels on the wire.

Decoders return a :class:`SASLCredentials` (the secret is not in its ``repr``) and raise
only :class:`SASLError`, whose message never contains any part of the payload.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any

from attrs import field, frozen


class SASLError(ValueError):
    """A SASL payload could not be decoded.  The message never contains the payload."""


#: Longest raw SASL message the decoders accept (JWT access tokens run to a few KiB).
MAX_MESSAGE = 64 * 1024

#: The LOGIN mechanism's challenges ("Username:", "Password:"), base64 as on the wire.
LOGIN_USER_CHALLENGE = b"VXNlcm5hbWU6"
LOGIN_PASSWORD_CHALLENGE = b"UGFzc3dvcmQ6"

MECHANISMS = ("PLAIN", "LOGIN", "XOAUTH2", "OAUTHBEARER")


@frozen
class SASLCredentials:
    """What a client presented: who, and the secret (password or bearer token).

    ``authzid`` is PLAIN's authorisation identity (``None`` when empty); ``host`` and
    ``port`` are the OAUTHBEARER fields of the same name when the client sent them.
    """

    mechanism: str
    user: str
    secret: str = field(repr=False)
    authzid: str | None = None
    host: str | None = None
    port: int | None = None


def b64encode(data: bytes) -> bytes:
    return base64.b64encode(data)


def b64decode(data: bytes) -> bytes:
    """Strict base64 decoding; raises :class:`SASLError` without echoing the input."""
    try:
        return base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise SASLError("response is not valid base64") from None


def _b64decode_response(data: bytes) -> bytes:
    """Like :func:`b64decode`, with RFC 4954's ``=`` meaning an empty response."""
    if not isinstance(data, (bytes, bytearray)):
        raise SASLError("response must be bytes")
    if len(data) > (MAX_MESSAGE * 4) // 3 + 8:
        raise SASLError("response is too long")
    if data.strip() == b"=":
        return b""
    return b64decode(bytes(data))


def _check_message(mechanism: str, message: bytes) -> bytes:
    if not isinstance(message, (bytes, bytearray)):
        raise SASLError(f"{mechanism}: message must be bytes")
    if len(message) > MAX_MESSAGE:
        raise SASLError(f"{mechanism}: message is too long")
    if not message:
        raise SASLError(f"{mechanism}: empty message")
    return bytes(message)


def _utf8(mechanism: str, what: str, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SASLError(f"{mechanism}: {what} is not valid UTF-8") from None


# Bearer tokens, refresh tokens and authorisation codes: visible characters, no spaces.
_TOKEN_RE = re.compile(r"[\x21-\x7e\u0080-\U0010ffff]+")


def _check_token(mechanism: str, token: str) -> str:
    if not token:
        raise SASLError(f"{mechanism}: empty bearer token")
    if not _TOKEN_RE.fullmatch(token):
        raise SASLError(f"{mechanism}: bearer token contains invalid characters")
    return token


def _bearer(mechanism: str, auth_value: str) -> str:
    scheme, sep, token = auth_value.partition(" ")
    if not sep or scheme.lower() != "bearer":
        raise SASLError(f"{mechanism}: auth is not a Bearer credential")
    return _check_token(mechanism, token.strip(" "))


# ---------------------------------------------------------------------------------------
# PLAIN (RFC 4616)


def encode_plain(user: str, password: str, authzid: str = "") -> bytes:
    """The raw RFC 4616 PLAIN message: ``[authzid] NUL authcid NUL passwd``."""
    if "\0" in user or "\0" in password or "\0" in authzid:
        raise SASLError("PLAIN: values must not contain NUL")
    return f"{authzid}\0{user}\0{password}".encode("utf-8")


def decode_plain(message: bytes) -> SASLCredentials:
    """Decode a raw PLAIN message."""
    message = _check_message("PLAIN", message)
    parts = message.split(b"\0")
    if len(parts) != 3:
        raise SASLError("PLAIN: message must have exactly three NUL-separated fields")
    authzid, user, password = (_utf8("PLAIN", name, part) for name, part in zip(("authzid", "user", "password"), parts))
    if not user:
        raise SASLError("PLAIN: empty user")
    if not password:
        raise SASLError("PLAIN: empty password")
    return SASLCredentials("PLAIN", user, password, authzid=authzid or None)


def plain_initial_response(user: str, password: str, authzid: str = "") -> bytes:
    """The RFC 4616 PLAIN message, base64-encoded."""
    return b64encode(encode_plain(user, password, authzid))


# ---------------------------------------------------------------------------------------
# LOGIN (draft-murchison-sasl-login): two challenges, user then password, each base64.


def encode_login(user: str, password: str) -> tuple[bytes, bytes]:
    """The two LOGIN responses, base64-encoded: (user, password)."""
    return b64encode(user.encode("utf-8")), b64encode(password.encode("utf-8"))


def decode_login_step(response: bytes, what: str = "value") -> str:
    """Decode one base64 LOGIN response (the user name or the password)."""
    raw = _b64decode_response(response)
    if not raw:
        raise SASLError(f"LOGIN: empty {what}")
    if len(raw) > MAX_MESSAGE:
        raise SASLError(f"LOGIN: {what} is too long")
    value = _utf8("LOGIN", what, raw)
    if "\0" in value:
        raise SASLError(f"LOGIN: {what} contains NUL")
    return value


def decode_login(user_response: bytes, password_response: bytes) -> SASLCredentials:
    """Decode both base64 LOGIN responses into credentials."""
    user = decode_login_step(user_response, "user")
    password = decode_login_step(password_response, "password")
    return SASLCredentials("LOGIN", user, password)


# ---------------------------------------------------------------------------------------
# XOAUTH2: user=<user>^Aauth=Bearer <token>^A^A


def _kvpairs(mechanism: str, text: str) -> dict[str, str]:
    """Parse ``key=value`` pairs separated by ^A (trailing ^As already stripped)."""
    pairs: dict[str, str] = {}
    for item in text.split("\x01"):
        key, sep, value = item.partition("=")
        if not sep or not key or not key.isascii() or not key.isalpha():
            raise SASLError(f"{mechanism}: malformed key/value pair")
        key = key.lower()
        if key in pairs:
            raise SASLError(f"{mechanism}: duplicate key")
        pairs[key] = value
    return pairs


def encode_xoauth2(user: str, token: str) -> bytes:
    """The raw XOAUTH2 message."""
    if "\x01" in user:
        raise SASLError("XOAUTH2: user must not contain ^A")
    _check_token("XOAUTH2", token)
    return f"user={user}\x01auth=Bearer {token}\x01\x01".encode("utf-8")


def decode_xoauth2(message: bytes) -> SASLCredentials:
    """Decode a raw XOAUTH2 message.  The secret is the bearer value."""
    message = _check_message("XOAUTH2", message)
    text = _utf8("XOAUTH2", "message", message)
    body = text.rstrip("\x01")
    if not body:
        raise SASLError("XOAUTH2: empty message")
    pairs = _kvpairs("XOAUTH2", body)
    user = pairs.get("user")
    if not user:
        raise SASLError("XOAUTH2: missing user")
    if "auth" not in pairs:
        raise SASLError("XOAUTH2: missing auth")
    return SASLCredentials("XOAUTH2", user, _bearer("XOAUTH2", pairs["auth"]))


def xoauth2_initial_response(user: str, token: str) -> bytes:
    """The XOAUTH2 client response, base64-encoded."""
    return b64encode(encode_xoauth2(user, token))


# ---------------------------------------------------------------------------------------
# OAUTHBEARER (RFC 7628): n,a=<saslname>,^Ahost=..^Aport=..^Aauth=Bearer <token>^A^A


def _escape_saslname(name: str) -> str:
    return name.replace("=", "=3D").replace(",", "=2C")


def _unescape_saslname(name: str) -> str:
    out = []
    i = 0
    while i < len(name):
        char = name[i]
        if char == "=":
            code = name[i + 1 : i + 3]
            if code == "2C":
                out.append(",")
            elif code == "3D":
                out.append("=")
            else:
                raise SASLError("OAUTHBEARER: bad escape in authorization identity")
            i += 3
        elif char == ",":
            raise SASLError("OAUTHBEARER: unescaped comma in authorization identity")
        else:
            out.append(char)
            i += 1
    return "".join(out)


def encode_oauthbearer(user: str | None, token: str, host: str | None = None, port: int | None = None) -> bytes:
    """The raw RFC 7628 OAUTHBEARER client message (no channel binding)."""
    if user and "\x01" in user:
        raise SASLError("OAUTHBEARER: user must not contain ^A")
    _check_token("OAUTHBEARER", token)
    gs2 = f"n,a={_escape_saslname(user)}," if user else "n,,"
    fields = ""
    if host is not None:
        if not host or any(c in host for c in "\x01\r\n"):
            raise SASLError("OAUTHBEARER: invalid host")
        fields += f"\x01host={host}"
    if port is not None:
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise SASLError("OAUTHBEARER: invalid port")
        fields += f"\x01port={port}"
    return f"{gs2}{fields}\x01auth=Bearer {token}\x01\x01".encode("utf-8")


def decode_oauthbearer(message: bytes) -> SASLCredentials:
    """Decode a raw OAUTHBEARER client message.

    ``user`` is the GS2 authorisation identity (``a=``), unescaped; it is the empty
    string when the client sent none.  Channel binding (``p=``) is refused.
    """
    message = _check_message("OAUTHBEARER", message)
    text = _utf8("OAUTHBEARER", "message", message)
    parts = text.split(",", 2)
    if len(parts) != 3:
        raise SASLError("OAUTHBEARER: malformed GS2 header")
    flag, authzid, rest = parts
    if flag not in ("n", "y"):
        raise SASLError("OAUTHBEARER: unsupported channel binding flag")
    if authzid:
        if not authzid.startswith("a="):
            raise SASLError("OAUTHBEARER: malformed authorization identity")
        user = _unescape_saslname(authzid[2:])
        if not user:
            raise SASLError("OAUTHBEARER: empty authorization identity")
    else:
        user = ""
    if not rest.startswith("\x01"):
        raise SASLError("OAUTHBEARER: missing separator after GS2 header")
    if not rest.endswith("\x01\x01"):
        raise SASLError("OAUTHBEARER: message must end with two ^A")
    body = rest[1:-2]
    if not body:
        raise SASLError("OAUTHBEARER: missing auth")
    pairs = _kvpairs("OAUTHBEARER", body)
    if "auth" not in pairs:
        raise SASLError("OAUTHBEARER: missing auth")
    for value in pairs.values():
        if any(c < " " and c not in "\t\r\n" for c in value) or "\x7f" in value:
            raise SASLError("OAUTHBEARER: control character in value")
    port: int | None = None
    if "port" in pairs:
        port_text = pairs["port"]
        if not port_text.isascii() or not port_text.isdigit() or len(port_text) > 5:
            raise SASLError("OAUTHBEARER: invalid port")
        port = int(port_text)
        if not 0 <= port < 65536:
            raise SASLError("OAUTHBEARER: invalid port")
    host = pairs.get("host") or None
    return SASLCredentials("OAUTHBEARER", user, _bearer("OAUTHBEARER", pairs["auth"]), host=host, port=port)


def oauthbearer_initial_response(user: str | None, token: str, host: str | None = None, port: int | None = None) -> bytes:
    """The OAUTHBEARER client response, base64-encoded."""
    return b64encode(encode_oauthbearer(user, token, host, port))


# ---------------------------------------------------------------------------------------
# Dispatch on the wire form


_DECODERS = {"PLAIN": decode_plain, "XOAUTH2": decode_xoauth2, "OAUTHBEARER": decode_oauthbearer}


def decode_initial_response(mechanism: str, response: bytes) -> SASLCredentials:
    """Decode a base64 (initial) response for PLAIN, XOAUTH2 or OAUTHBEARER.

    LOGIN takes two steps: use :func:`decode_login`.  ``=`` (RFC 4954's empty initial
    response) decodes to an empty message, which every mechanism here refuses.
    """
    decoder = _DECODERS.get(mechanism.upper()) if isinstance(mechanism, str) else None
    if decoder is None:
        raise SASLError("unsupported SASL mechanism")
    return decoder(_b64decode_response(response))


# ---------------------------------------------------------------------------------------
# The failure dance (XOAUTH2 and RFC 7628 section 3.2.2): the server answers a refused
# token with a base64 JSON challenge; the client must answer it with a dummy response
# (empty for XOAUTH2, ^A for OAUTHBEARER) and then gets the final failure reply.

#: Longest error challenge we decode.
MAX_ERROR_CHALLENGE = 8 * 1024


def error_challenge(mechanism: str, status: str | None = None, scope: str | None = None, schemes: str = "bearer") -> bytes:
    """The base64 JSON error challenge a server sends for a refused bearer token."""
    mech = mechanism.upper()
    if mech == "XOAUTH2":
        payload: dict[str, str] = {"status": status or "401", "schemes": schemes}
    elif mech == "OAUTHBEARER":
        payload = {"status": status or "invalid_token"}
    else:
        raise SASLError("error challenges exist only for XOAUTH2 and OAUTHBEARER")
    if scope:
        payload["scope"] = scope
    return b64encode(json.dumps(payload, separators=(",", ":")).encode("utf-8"))


def decode_error_challenge(challenge: bytes) -> dict[str, str]:
    """Decode a server's base64 JSON error challenge into a flat ``dict`` of strings.

    Only string keys with scalar values are kept (numbers and booleans as their JSON
    text); anything that is not a base64 JSON object raises :class:`SASLError`.
    """
    if not isinstance(challenge, (bytes, bytearray)):
        raise SASLError("challenge must be bytes")
    if len(challenge) > (MAX_ERROR_CHALLENGE * 4) // 3 + 8:
        raise SASLError("error challenge is too long")
    raw = b64decode(bytes(challenge))
    try:
        obj: Any = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise SASLError("error challenge is not JSON") from None
    if not isinstance(obj, dict):
        raise SASLError("error challenge is not a JSON object")
    out: dict[str, str] = {}
    for key, value in obj.items():
        if isinstance(value, bool):
            out[key] = "true" if value else "false"
        elif isinstance(value, str):
            out[key] = value
        elif isinstance(value, (int, float)):
            out[key] = json.dumps(value)
    return out


def error_challenge_reply(mechanism: str) -> bytes:
    """The client's answer to an error challenge, base64 as on the wire.

    XOAUTH2: an empty line (``b""``); OAUTHBEARER: ``^A`` (``b"AQ=="``).
    """
    mech = mechanism.upper()
    if mech == "XOAUTH2":
        return b""
    if mech == "OAUTHBEARER":
        return b64encode(b"\x01")
    raise SASLError("error challenges exist only for XOAUTH2 and OAUTHBEARER")


def is_error_challenge_reply(mechanism: str, response: bytes) -> bool:
    """True when ``response`` (a line, base64) is the client's dummy answer to an error
    challenge for ``mechanism``.  Never raises for bad input."""
    mech = mechanism.upper() if isinstance(mechanism, str) else ""
    if mech not in ("XOAUTH2", "OAUTHBEARER") or not isinstance(response, (bytes, bytearray)):
        return False
    stripped = bytes(response).strip()
    if stripped in (b"", b"="):
        return True  # empty: what XOAUTH2 clients send, and lenient for OAUTHBEARER
    try:
        raw = b64decode(stripped)
    except SASLError:
        return False
    return raw in (b"", b"\x01")
