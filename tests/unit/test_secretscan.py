"""The secret scan helper (tests/support/secretscan.py) finds every shape it promises."""

from __future__ import annotations

import base64
import json
import urllib.parse

import pytest
from support.secretscan import Secret, assert_no_secrets, find_secrets, forms

SECRET = Secret("the password", 'p"a\\ss wörd-7f3a', user="alice")


@pytest.mark.parametrize("prefix", [b"", b"x", b"xy", b"\0alice\0"])
@pytest.mark.parametrize("suffix", [b"", b"z", b"zz"])
def test_base64_at_any_offset_is_found(prefix, suffix):
    blob = base64.b64encode(prefix + SECRET.value.encode() + suffix).decode()
    assert find_secrets(f"AUTH PLAIN {blob}\r\n", [SECRET])


@pytest.mark.parametrize(
    "text",
    [
        SECRET.value,
        json.dumps({"password": SECRET.value}),
        repr({"password": SECRET.value}),
        urllib.parse.urlencode({"password": SECRET.value}),
        base64.b64encode(f"user=alice\x01auth=Bearer {SECRET.value}\x01\x01".encode()).decode(),
        base64.b64encode(f"n,a=alice,\x01auth=Bearer {SECRET.value}\x01\x01".encode()).decode(),
        "Authorization: Basic " + base64.b64encode(f"alice:{SECRET.value}".encode()).decode(),
    ],
)
def test_each_shape_is_found(text):
    with pytest.raises(AssertionError) as failed:
        assert_no_secrets(text, [SECRET], "the log")
    assert "the password as" in str(failed.value) and SECRET.value not in str(failed.value)


def test_innocent_text_passes_and_short_secrets_are_refused():
    assert_no_secrets("session s1 accepted from 127.0.0.1:5000 for office; client secret rejected", [SECRET])
    with pytest.raises(ValueError):
        find_secrets("anything", [Secret("short", "secret")])
    assert len(forms(SECRET)) > 15
