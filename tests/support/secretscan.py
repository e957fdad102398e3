"""Look for secrets in whatever the gateway writes: logs, the audit log, /status, /metrics.

A secret can leak in more shapes than its plain text: base64 (SASL LOGIN, a base64
blob that contains it at any offset), inside a SASL PLAIN, XOAUTH2 or OAUTHBEARER
response, in an HTTP Basic header, URL-encoded, JSON- or repr-escaped.  ``forms()``
lists every shape for one secret; :func:`find_secrets` searches text or bytes for all
of them; :func:`assert_no_secrets` fails naming the secret's label, the shape and
where -- never the secret itself, so the failure message is safe to print in CI.

    from support.secretscan import Secret, assert_no_secrets

    secrets = [Secret("alice's password", password, user="alice"),
               Secret("client secret", CLIENT_SECRET, user=CLIENT_ID)]
    assert_no_secrets(log_text, secrets, where="the log")

Secrets shorter than :data:`MIN_LENGTH` characters are refused: "secret" would be found
in every line that says "client secret", so tests use distinctive values
(``"pw-" + uuid.uuid4().hex``).
"""

from __future__ import annotations

import base64
import json
import urllib.parse
from typing import Iterable, NamedTuple

__all__ = ["MIN_LENGTH", "Secret", "assert_no_secrets", "find_secrets", "forms"]

#: Shorter secrets give false alarms (and base64 fragments of them match anything).
MIN_LENGTH = 8


class Secret(NamedTuple):
    """``label`` names it in failure messages; ``user`` builds the SASL forms."""

    label: str
    value: str
    user: str | None = None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def base64_fragments(data: bytes) -> list[str]:
    """The parts of any base64 text that must appear when ``data`` is encoded at any
    offset inside a longer value: for each of the three alignments, the characters that
    depend on ``data`` alone."""
    fragments = []
    for pad in range(3):
        encoded = _b64(b"\0" * pad + data)
        # A base64 character holds 6 bits: the first ceil(8 * pad / 6) mix in the
        # bytes before the secret, the ones past 8 * (pad + len) / 6 those after it.
        start = -(-pad * 4 // 3)
        end = 4 * (pad + len(data)) // 3
        fragment = encoded[start:end]
        if len(fragment) >= 8:
            fragments.append(fragment)
    return fragments


def forms(secret: Secret) -> dict[str, str]:
    """Every shape of ``secret`` worth searching for: shape name -> text."""
    value = secret.value
    raw = value.encode("utf-8")
    shapes = {
        "plain": value,
        "base64": _b64(raw),
        "base64url": base64.urlsafe_b64encode(raw).decode("ascii"),
        "url-encoded": urllib.parse.quote(value, safe=""),
        "form-encoded": urllib.parse.quote_plus(value),
        "json-escaped": json.dumps(value)[1:-1],
        "repr-escaped": repr(value)[1:-1],
        "hex": raw.hex(),
    }
    for index, fragment in enumerate(base64_fragments(raw)):
        shapes[f"base64 inside a longer value ({index})"] = fragment
    user = secret.user or ""
    sasl = {
        "SASL PLAIN": f"\0{user}\0{value}",
        "SASL PLAIN with authzid": f"{user}\0{user}\0{value}",
        "SASL XOAUTH2": f"user={user}\x01auth=Bearer {value}\x01\x01",
        "SASL OAUTHBEARER": f"n,a={user},\x01auth=Bearer {value}\x01\x01",
        "SASL OAUTHBEARER without authzid": f"n,,\x01auth=Bearer {value}\x01\x01",
        "HTTP Basic": f"{user}:{value}",
        # requests-oauthlib form-encodes the client's credentials before Basic (RFC 6749 2.3.1)
        "HTTP Basic, form-encoded": f"{urllib.parse.quote_plus(user)}:{urllib.parse.quote_plus(value)}",
    }
    for name, text in sasl.items():
        shapes[f"{name} (base64)"] = _b64(text.encode("utf-8"))
    shapes["Bearer header"] = f"Bearer {value}"
    return {name: text for name, text in shapes.items() if text}


def find_secrets(haystack: str | bytes, secrets: Iterable[Secret], ignore_case: bool = False) -> list[tuple[str, str]]:
    """``(label, shape)`` for every shape of every secret found in ``haystack``; with
    ``ignore_case``, in any case (an echo may change the case of percent-escapes)."""
    if isinstance(haystack, bytes):
        haystack = haystack.decode("utf-8", "replace")
    if ignore_case:
        haystack = haystack.lower()
    found = []
    for secret in secrets:
        if len(secret.value) < MIN_LENGTH:
            raise ValueError(f"secret {secret.label!r} is shorter than {MIN_LENGTH} characters: use a distinctive one")
        for shape, text in forms(secret).items():
            if (text.lower() if ignore_case else text) in haystack:
                found.append((secret.label, shape))
    return found


def assert_no_secrets(haystack: str | bytes, secrets: Iterable[Secret], where: str = "the output",
                      ignore_case: bool = False) -> None:
    """Fail naming each secret (by label) and shape found in ``haystack``."""
    secrets = list(secrets)
    assert secrets, "no secrets to look for"
    found = find_secrets(haystack, secrets, ignore_case)
    assert not found, f"secrets found in {where}: " + ", ".join(f"{label} as {shape}" for label, shape in found)
