"""SASL encodings: round trips, RFC examples, malformed input, the failure dance."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailgw.protocol import sasl
from mailgw.protocol.sasl import SASLCredentials, SASLError

SECRET = "s3cr3t-T0ken.value~xyz"


def b64(raw: bytes) -> bytes:
    return base64.b64encode(raw)


# --- PLAIN ------------------------------------------------------------------------------


def test_plain_round_trip():
    creds = sasl.decode_plain(sasl.encode_plain("alice@example.org", "pa ss\u00e9"))
    assert creds == SASLCredentials("PLAIN", "alice@example.org", "pa ss\u00e9")
    assert creds.authzid is None


def test_plain_with_authzid_and_existing_wire_helper():
    wire = sasl.plain_initial_response("tim", "tanstaaftanstaaf", authzid="Ursel")
    assert wire == b64(b"Ursel\0tim\0tanstaaftanstaaf")
    creds = sasl.decode_initial_response("plain", wire)
    assert (creds.authzid, creds.user, creds.secret) == ("Ursel", "tim", "tanstaaftanstaaf")


@pytest.mark.parametrize(
    "raw",
    [b"", b"\0user", b"user\0pass", b"\0\0pass", b"\0user\0", b"a\0b\0c\0d", b"\0us\xffer\0pw"],
)
def test_plain_malformed(raw):
    with pytest.raises(SASLError):
        sasl.decode_plain(raw)


def test_plain_encode_refuses_nul():
    with pytest.raises(SASLError):
        sasl.encode_plain("a\0b", "pw")


# --- LOGIN ------------------------------------------------------------------------------


def test_login_round_trip_and_challenges():
    assert base64.b64decode(sasl.LOGIN_USER_CHALLENGE) == b"Username:"
    assert base64.b64decode(sasl.LOGIN_PASSWORD_CHALLENGE) == b"Password:"
    user_line, password_line = sasl.encode_login("bob", SECRET)
    creds = sasl.decode_login(user_line, password_line)
    assert (creds.mechanism, creds.user, creds.secret) == ("LOGIN", "bob", SECRET)


@pytest.mark.parametrize("line", [b"", b"=", b"!!!", b64(b"\xff\xfe"), b64(b"a\0b")])
def test_login_malformed(line):
    with pytest.raises(SASLError):
        sasl.decode_login_step(line)


# --- XOAUTH2 ----------------------------------------------------------------------------


def test_xoauth2_round_trip_matches_google_format():
    raw = sasl.encode_xoauth2("someuser@example.com", "ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg")
    assert raw == b"user=someuser@example.com\x01auth=Bearer ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg\x01\x01"
    assert sasl.xoauth2_initial_response("someuser@example.com", "ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg") == b64(raw)
    creds = sasl.decode_xoauth2(raw)
    assert creds.user == "someuser@example.com"
    assert creds.secret == "ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg"


def test_xoauth2_lenient_on_order_case_and_terminator():
    creds = sasl.decode_xoauth2(b"auth=bearer tok\x01user=u")
    assert (creds.user, creds.secret) == ("u", "tok")


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x01\x01",
        b"user=u\x01\x01",
        b"auth=Bearer t\x01\x01",
        b"user=\x01auth=Bearer t\x01\x01",
        b"user=u\x01auth=Basic t\x01\x01",
        b"user=u\x01auth=Bearer \x01\x01",
        b"user=u\x01auth=Bearer a b\x01\x01",
        b"user=u\x01user=v\x01auth=Bearer t\x01\x01",
        b"user=u\x01garbage\x01auth=Bearer t\x01\x01",
        b"user=u\xff\x01auth=Bearer t\x01\x01",
    ],
)
def test_xoauth2_malformed(raw):
    with pytest.raises(SASLError):
        sasl.decode_xoauth2(raw)


# --- OAUTHBEARER ------------------------------------------------------------------------


def test_oauthbearer_rfc7628_example():
    raw = (
        b"n,a=user@example.com,\x01host=server.example.com\x01port=143\x01"
        b"auth=Bearer vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==\x01\x01"
    )
    creds = sasl.decode_oauthbearer(raw)
    assert creds.user == "user@example.com"
    assert creds.host == "server.example.com"
    assert creds.port == 143
    assert creds.secret == "vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg=="
    assert sasl.encode_oauthbearer("user@example.com", creds.secret, "server.example.com", 143) == raw


def test_oauthbearer_escaping_round_trip():
    user = "we,ird=name"
    raw = sasl.encode_oauthbearer(user, "tok")
    assert raw.startswith(b"n,a=we=2Cird=3Dname,\x01auth=Bearer tok")
    assert sasl.decode_oauthbearer(raw).user == user
    wire = sasl.oauthbearer_initial_response(user, "tok")
    assert sasl.decode_initial_response("OAUTHBEARER", wire).user == user


def test_oauthbearer_without_authzid():
    creds = sasl.decode_oauthbearer(b"n,,\x01auth=Bearer tok\x01\x01")
    assert (creds.user, creds.secret, creds.host, creds.port) == ("", "tok", None, None)
    assert sasl.encode_oauthbearer(None, "tok") == b"n,,\x01auth=Bearer tok\x01\x01"


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"n,a=u,auth=Bearer t\x01\x01",  # no ^A after the GS2 header
        b"p=tls-unique,a=u,\x01auth=Bearer t\x01\x01",  # channel binding
        b"n,a=u=2,\x01auth=Bearer t\x01\x01",  # truncated escape
        b"n,a=u=41,\x01auth=Bearer t\x01\x01",  # unknown escape
        b"n,b=u,\x01auth=Bearer t\x01\x01",
        b"n,a=,\x01auth=Bearer t\x01\x01",
        b"n,a=u,\x01auth=Bearer t\x01",  # one ^A at the end
        b"n,a=u,\x01host=h\x01\x01",  # no auth
        b"n,a=u,\x01port=99999\x01auth=Bearer t\x01\x01",
        b"n,a=u,\x01port=x\x01auth=Bearer t\x01\x01",
        b"n,a=u,\x01auth=Bearer\x01\x01",
        b"n,a=u,\x01auth=Bearer t\x01auth=Bearer t\x01\x01",
        b"n,a=u,\x01host=a\x02b\x01auth=Bearer t\x01\x01",
        b"n,a=u",
    ],
)
def test_oauthbearer_malformed(raw):
    with pytest.raises(SASLError):
        sasl.decode_oauthbearer(raw)


# --- dispatch and safety ------------------------------------------------------------------


def test_decode_initial_response_errors():
    with pytest.raises(SASLError):
        sasl.decode_initial_response("CRAM-MD5", b64(b"x"))
    with pytest.raises(SASLError):
        sasl.decode_initial_response("PLAIN", b"=")
    with pytest.raises(SASLError):
        sasl.decode_initial_response("XOAUTH2", b"not base64!")
    with pytest.raises(SASLError):
        sasl.decode_initial_response("XOAUTH2", b"A" * (sasl.MAX_MESSAGE * 2))


def test_secret_not_in_repr_or_error():
    creds = sasl.decode_xoauth2(sasl.encode_xoauth2("u", SECRET))
    assert SECRET not in repr(creds)
    with pytest.raises(SASLError) as info:
        sasl.decode_xoauth2(f"user=u\x01auth=Basic {SECRET}\x01\x01".encode())
    assert SECRET not in str(info.value)
    with pytest.raises(SASLError) as info:
        sasl.decode_plain(f"\0{SECRET}".encode())
    assert SECRET not in str(info.value)


def test_encoders_refuse_separators():
    with pytest.raises(SASLError):
        sasl.encode_xoauth2("a\x01b", "t")
    with pytest.raises(SASLError):
        sasl.encode_xoauth2("a", "t t")
    with pytest.raises(SASLError):
        sasl.encode_oauthbearer("a", "t", port=70000)


# --- failure dance ------------------------------------------------------------------------


def test_error_challenge_xoauth2():
    challenge = sasl.error_challenge("XOAUTH2", scope="https://mail.google.com/")
    decoded = sasl.decode_error_challenge(challenge)
    assert decoded == {"status": "401", "schemes": "bearer", "scope": "https://mail.google.com/"}
    assert sasl.error_challenge_reply("XOAUTH2") == b""
    assert sasl.is_error_challenge_reply("XOAUTH2", b"")


def test_error_challenge_oauthbearer():
    raw = b'{"status":"invalid_token","scope":"example_scope","openid-configuration":"https://example.com/.well-known/openid-configuration"}'
    decoded = sasl.decode_error_challenge(b64(raw))
    assert decoded["status"] == "invalid_token"
    assert decoded["openid-configuration"].startswith("https://")
    assert sasl.error_challenge_reply("OAUTHBEARER") == b"AQ=="
    assert sasl.is_error_challenge_reply("OAUTHBEARER", b"AQ==\r\n")
    assert not sasl.is_error_challenge_reply("OAUTHBEARER", b64(b"n,,\x01auth=Bearer t\x01\x01"))
    assert sasl.decode_error_challenge(sasl.error_challenge("oauthbearer")) == {"status": "invalid_token"}


def test_error_challenge_flattens_and_refuses_non_objects():
    decoded = sasl.decode_error_challenge(b64(json.dumps({"status": 401, "ok": False, "nested": {"a": 1}}).encode()))
    assert decoded == {"status": "401", "ok": "false"}
    for bad in [b64(b"[1,2]"), b64(b"not json"), b"!!", b64(b"[" * 5000 + b"]" * 5000), b64(b"\xff"), b"A" * 20000]:
        with pytest.raises(SASLError):
            sasl.decode_error_challenge(bad)


# --- hypothesis: arbitrary bytes raise only SASLError -------------------------------------

_RAW_DECODERS = [sasl.decode_plain, sasl.decode_xoauth2, sasl.decode_oauthbearer]

_structured = st.one_of(
    st.binary(max_size=300),
    st.builds(
        lambda a, b, c: a + b"\x01" + b + b"\x01" + c,
        st.binary(max_size=40),
        st.sampled_from([b"auth=Bearer ", b"auth=bearer", b"user=", b"port=", b"host=", b"n,a=", b"y,,", b"=2C", b"=3"]),
        st.binary(max_size=40),
    ),
    st.text(max_size=100).map(lambda t: t.encode("utf-8", "surrogatepass")),
)


@settings(max_examples=300, deadline=None)
@given(_structured)
def test_raw_decoders_raise_only_saslerror(data):
    for decoder in _RAW_DECODERS:
        try:
            creds = decoder(data)
        except SASLError:
            continue
        assert isinstance(creds, SASLCredentials)
        assert isinstance(creds.user, str) and isinstance(creds.secret, str)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=200), _structured.map(base64.b64encode)), st.sampled_from(["PLAIN", "XOAUTH2", "OAUTHBEARER", "LOGIN", "x"]))
def test_wire_decoders_raise_only_saslerror(data, mechanism):
    for call in (
        lambda: sasl.decode_initial_response(mechanism, data),
        lambda: sasl.decode_login(data, data),
        lambda: sasl.decode_error_challenge(data),
    ):
        try:
            call()
        except SASLError:
            pass
    assert sasl.is_error_challenge_reply(mechanism, data) in (True, False)


@settings(max_examples=200, deadline=None)
@given(
    st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x01"), min_size=1, max_size=40),
    st.from_regex(r"[A-Za-z0-9._~+/=-]{1,60}", fullmatch=True),
)
def test_oauth_round_trips(user, token):
    assert sasl.decode_xoauth2(sasl.encode_xoauth2(user, token)).user == user
    assert sasl.decode_oauthbearer(sasl.encode_oauthbearer(user, token)).secret == token
    creds = sasl.decode_oauthbearer(sasl.encode_oauthbearer(user, token, "h.example", 993))
    assert (creds.user, creds.host, creds.port) == (user, "h.example", 993)
