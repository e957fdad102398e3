"""The sans-IO SOCKS5 client handshake, byte for byte."""

from __future__ import annotations

import base64
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailgw.protocol.actions import ProtocolError, SendUpstream
from mailgw.protocol.socks5 import MAX_REPLY, ConnectionNotAllowed, DomainNameTooLong, MalformedReply, NetworkUnreachable
from mailgw.protocol.socks5 import NoAcceptableMethod, SAPAuthRejected, SOCKS5Client, SOCKSAuthenticationError
from mailgw.protocol.socks5 import SOCKSConfigurationError, SOCKSConnected, SOCKSError, SOCKSReplyError, UnexpectedMethod
from mailgw.protocol.socks5 import UserPassRejected
from support.socks import reply_codes

HOST = "mail.corp.example"
PORT = 143
CONNECT_REQUEST = b"\x05\x01\x00\x03" + bytes([len(HOST)]) + HOST.encode() + b"\x00\x8f"
OK_IPV4 = b"\x05\x00\x00\x01\x0a\x00\x00\x07\x30\x39"  # 10.0.0.7:12345
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"
PASSWORD = "s3cret-pw"


def sent(actions):
    assert all(isinstance(a, SendUpstream) for a in actions), actions
    return b"".join(a.data for a in actions)


def at_connect(method="none", **kw):
    """A machine that has sent its CONNECT request (all authentication done)."""
    m = SOCKS5Client(HOST, PORT, method, **kw)
    m.start()
    if method == "none":
        assert sent(m.receive(b"\x05\x00")) == CONNECT_REQUEST
    elif method == "userpass":
        sent(m.receive(b"\x05\x02"))
        assert sent(m.receive(b"\x01\x00")) == CONNECT_REQUEST
    else:
        sent(m.receive(b"\x05\x80"))
        assert sent(m.receive(b"\x01\x00")) == CONNECT_REQUEST
    return m


# --------------------------------------------------------------------- methods


def test_method_none_byte_exact():
    m = SOCKS5Client(HOST, PORT)
    assert m.start() == b"\x05\x01\x00"
    assert sent(m.receive(b"\x05\x00")) == CONNECT_REQUEST
    [done] = m.receive(OK_IPV4)
    assert done == SOCKSConnected("10.0.0.7", 12345, b"")
    assert m.connected and m.leftover == b""
    assert (m.bound_host, m.bound_port) == ("10.0.0.7", 12345)


def test_method_userpass_byte_exact():
    m = SOCKS5Client(HOST, PORT, "userpass", username="alice", password=PASSWORD)
    assert m.start() == b"\x05\x01\x02"
    assert sent(m.receive(b"\x05\x02")) == b"\x01\x05alice\x09" + PASSWORD.encode()
    assert sent(m.receive(b"\x01\x00")) == CONNECT_REQUEST
    assert isinstance(m.receive(OK_IPV4)[0], SOCKSConnected)


def test_method_sap_byte_exact_with_location():
    m = SOCKS5Client(HOST, PORT, "sap", jwt=JWT, location_id="loc-1")
    assert m.start() == b"\x05\x01\x80"
    loc = base64.b64encode(b"loc-1")
    expected = (b"\x01" + struct.pack(">I", len(JWT)) + JWT.encode()
                + bytes([len(loc)]) + loc)
    assert sent(m.receive(b"\x05\x80")) == expected
    assert sent(m.receive(b"\x01\x00")) == CONNECT_REQUEST
    assert isinstance(m.receive(OK_IPV4)[0], SOCKSConnected)


def test_method_sap_without_location_sends_zero_length():
    m = SOCKS5Client(HOST, PORT, "sap", jwt="abc")
    m.start()
    assert sent(m.receive(b"\x05\x80")) == b"\x01\x00\x00\x00\x03abc\x00"


def test_location_id_is_base64_of_utf8():
    m = SOCKS5Client(HOST, PORT, "sap", jwt="t", location_id="Zürich")
    m.start()
    data = sent(m.receive(b"\x05\x80"))
    loc = data[1 + 4 + 1 + 1 :]
    assert base64.b64decode(loc).decode("utf-8") == "Zürich"
    assert data[6] == len(loc)


def test_ip_literal_target_still_sent_as_domain():
    m = SOCKS5Client("127.0.0.1", 25)
    m.start()
    assert sent(m.receive(b"\x05\x00")) == b"\x05\x01\x00\x03\x09127.0.0.1\x00\x19"


def test_idn_target_is_punycoded():
    m = SOCKS5Client("bücher.example", 25)
    m.start()
    assert b"xn--bcher-kva.example" in sent(m.receive(b"\x05\x00"))


# --------------------------------------------------------------------- CONNECT replies


@pytest.mark.parametrize(
    "reply, host, port",
    [
        (b"\x05\x00\x00\x01\x7f\x00\x00\x01\x00\x19", "127.0.0.1", 25),
        (b"\x05\x00\x00\x03\x0bproxy.local\x01\xbb", "proxy.local", 443),
        (b"\x05\x00\x00\x03\x00\x00\x00", "", 0),
        (b"\x05\x00\x00\x04" + b"\x20\x01\x0d\xb8" + b"\x00" * 11 + b"\x01" + b"\xff\xff",
         "2001:db8::1", 65535),
    ],
)
def test_bound_address_all_atyps(reply, host, port):
    m = at_connect()
    [done] = m.receive(reply + b"220 hi\r\n")
    assert (done.bound_host, done.bound_port) == (host, port)
    assert done.leftover == b"220 hi\r\n" == m.leftover


@pytest.mark.parametrize(
    "reply",
    [OK_IPV4, b"\x05\x00\x00\x03\x05abcde\x00\x01", b"\x05\x00\x00\x04" + b"\x00" * 18],
)
@pytest.mark.parametrize("method", ["none", "userpass", "sap"])
def test_every_reply_split_byte_by_byte(reply, method):
    kw = {"userpass": dict(username="u", password="p"), "sap": dict(jwt=JWT)}.get(method, {})
    m = SOCKS5Client(HOST, PORT, method, **kw)
    m.start()
    method_reply = {"none": b"\x05\x00", "userpass": b"\x05\x02", "sap": b"\x05\x80"}[method]
    script = [method_reply] + ([] if method == "none" else [b"\x01\x00"]) + [reply + b"X"]
    result = []
    for chunk in script:
        for i in range(len(chunk)):
            if m.connected:
                break
            out = m.receive(chunk[i : i + 1])
            if i < len(chunk) - 1 and chunk is not script[-1]:
                assert out == []
            result.extend(out)
        assert m.buffered <= MAX_REPLY
    assert isinstance(result[-1], SOCKSConnected)
    # The trailing byte arrived alone, after the reply: nothing left over.
    assert result[-1].leftover == b""
    assert m.leftover == b""


def test_trailing_bytes_after_connect_reply_are_leftover():
    m = at_connect()
    banner = b"* OK IMAP ready\r\n" * 500
    [done] = m.receive(OK_IPV4 + banner)
    assert done.leftover == banner == m.leftover
    assert m.buffered == 0
    assert "leftover" not in repr(done) or banner not in repr(done).encode()


def test_partial_reply_then_rest_with_leftover():
    m = at_connect()
    assert m.receive(OK_IPV4[:5]) == []
    [done] = m.receive(OK_IPV4[5:] + b"+OK")
    assert done.leftover == b"+OK"


REPLY_CODES = reply_codes(f"{HOST}:{PORT}")


@pytest.mark.parametrize("code, cls, text", REPLY_CODES)
def test_reply_codes_full_reply(code, cls, text):
    m = at_connect()
    with pytest.raises(cls) as exc:
        m.receive(b"\x05" + bytes([code]) + b"\x00\x01\x00\x00\x00\x00\x00\x00")
    assert isinstance(exc.value, SOCKSReplyError)
    assert isinstance(exc.value, ProtocolError)
    assert exc.value.code == code
    assert text.lower() in str(exc.value).lower()


@pytest.mark.parametrize("code, cls, text", REPLY_CODES)
def test_reply_codes_reported_after_two_bytes(code, cls, text):
    # A proxy that sends only VER REP and closes still yields the typed error.
    m = at_connect("sap", jwt=JWT)
    assert m.receive(b"\x05") == []
    with pytest.raises(cls):
        m.receive(bytes([code]))


def test_reply_error_messages_name_the_target_and_hint():
    m = at_connect()
    with pytest.raises(ConnectionNotAllowed, match="connectivity proxy: no access mapping"):
        m.receive(b"\x05\x02")
    m = at_connect()
    with pytest.raises(NetworkUnreachable, match="unknown location"):
        m.receive(b"\x05\x03")


# --------------------------------------------------------------------- auth failures


def test_no_acceptable_method():
    m = SOCKS5Client(HOST, PORT, "userpass", username="u", password="p")
    m.start()
    with pytest.raises(NoAcceptableMethod, match="none of the offered"):
        m.receive(b"\x05\xff")


@pytest.mark.parametrize("method, kw, picked", [
    ("none", {}, 0x02),
    ("userpass", dict(username="u", password="p"), 0x00),
    ("sap", dict(jwt=JWT), 0x00),
    ("sap", dict(jwt=JWT), 0x02),
    ("none", {}, 0x80),
    ("none", {}, 0x01),
])
def test_unexpected_method(method, kw, picked):
    m = SOCKS5Client(HOST, PORT, method, **kw)
    m.start()
    with pytest.raises(UnexpectedMethod, match=f"0x{picked:02x}"):
        m.receive(bytes([0x05, picked]))


def test_userpass_rejected_without_password_in_message():
    m = SOCKS5Client(HOST, PORT, "userpass", username="alice", password=PASSWORD)
    m.start()
    m.receive(b"\x05\x02")
    with pytest.raises(UserPassRejected) as exc:
        m.receive(b"\x01\x01")
    assert isinstance(exc.value, SOCKSAuthenticationError)
    assert "alice" in str(exc.value)
    assert PASSWORD not in str(exc.value)


def test_sap_rejected_without_jwt_in_message():
    m = SOCKS5Client(HOST, PORT, "sap", jwt=JWT, location_id="loc")
    m.start()
    m.receive(b"\x05\x80")
    with pytest.raises(SAPAuthRejected) as exc:
        m.receive(b"\x01\x05")
    assert JWT not in str(exc.value)
    assert "0x05" in str(exc.value)


# --------------------------------------------------------------------- malformed


@pytest.mark.parametrize("script", [
    [b"\x04\x00"],                                   # SOCKS4-ish version
    [b"H"],                                          # HTTP proxy answering
    [b"\x05\x00", b"\x04\x00"],                      # bad version in CONNECT reply
    [b"\x05\x00", b"\x05\x00\x01"],                  # reserved byte not zero
    [b"\x05\x00", b"\x05\x00\x00\x02"],              # unknown ATYP
    [b"\x05\x00\x05\x00"],                           # CONNECT reply before our request
])
def test_malformed_replies(script):
    m = SOCKS5Client(HOST, PORT)
    m.start()
    with pytest.raises(MalformedReply):
        for chunk in script:
            m.receive(chunk)


def test_wrong_auth_reply_version():
    m = SOCKS5Client(HOST, PORT, "userpass", username="u", password="p")
    m.start()
    m.receive(b"\x05\x02")
    with pytest.raises(MalformedReply, match="version byte 0x05"):
        m.receive(b"\x05\x00")


def test_bytes_after_auth_reply_before_request_are_malformed():
    m = SOCKS5Client(HOST, PORT, "sap", jwt=JWT)
    m.start()
    m.receive(b"\x05\x80")
    with pytest.raises(MalformedReply, match="unexpected"):
        m.receive(b"\x01\x00" + OK_IPV4)


def test_machine_refuses_use_after_failure_or_success():
    m = SOCKS5Client(HOST, PORT)
    with pytest.raises(RuntimeError):
        m.receive(b"\x05\x00")
    m.start()
    with pytest.raises(RuntimeError):
        m.start()
    with pytest.raises(NoAcceptableMethod):
        m.receive(b"\x05\xff")
    assert m.state == "failed" and m.buffered == 0
    with pytest.raises(RuntimeError):
        m.receive(b"x")
    m = at_connect()
    m.receive(OK_IPV4)
    with pytest.raises(RuntimeError):
        m.receive(b"x")


# --------------------------------------------------------------------- configuration


def test_domain_name_too_long():
    SOCKS5Client("a" * 255, 25)
    with pytest.raises(DomainNameTooLong, match="256 bytes"):
        SOCKS5Client("a" * 256, 25)
    assert issubclass(DomainNameTooLong, SOCKSError)


@pytest.mark.parametrize("kwargs", [
    dict(host="", port=25),
    dict(host="h", port=0),
    dict(host="h", port=65536),
    dict(host="h", port=25, method="gssapi"),
    dict(host="h", port=25, method="userpass", username="u"),
    dict(host="h", port=25, method="userpass", username="", password="p"),
    dict(host="h", port=25, method="userpass", username="u", password="p" * 256),
    dict(host="h", port=25, method="sap"),
    dict(host="h", port=25, method="sap", jwt="t", location_id="x" * 192),
])
def test_bad_configuration(kwargs):
    with pytest.raises(SOCKSConfigurationError) as exc:
        SOCKS5Client(**kwargs)
    assert "p" * 20 not in str(exc.value)


def test_secrets_not_in_repr():
    m = SOCKS5Client(HOST, PORT, "userpass", username="u", password=PASSWORD)
    assert PASSWORD not in repr(m)
    m = SOCKS5Client(HOST, PORT, "sap", jwt=JWT, location_id="loc")
    m.start()
    actions = m.receive(b"\x05\x80")
    assert JWT not in repr(m) and JWT not in repr(actions)


# --------------------------------------------------------------------- properties

MACHINES = st.sampled_from([
    dict(method="none"),
    dict(method="userpass", username="user", password=PASSWORD),
    dict(method="sap", jwt=JWT, location_id="loc"),
])

# Arbitrary bytes, but biased towards plausible replies so deep states are reached.
PLAUSIBLE = st.one_of(
    st.binary(max_size=600),
    st.sampled_from([b"\x05\x00", b"\x05\x02", b"\x05\x80", b"\x01\x00", b"\x01\x01",
                     OK_IPV4, b"\x05\x00\x00\x03", b"\x05\x00\x00\x04", b"\xff"]),
)


@settings(max_examples=400, deadline=None)
@given(kw=MACHINES, chunks=st.lists(PLAUSIBLE, max_size=12))
def test_arbitrary_proxy_bytes_only_raise_socks_errors_and_stay_bounded(kw, chunks):
    m = SOCKS5Client(HOST, PORT, **kw)
    m.start()
    for chunk in chunks:
        try:
            actions = m.receive(chunk)
        except SOCKSError as e:
            for secret in (PASSWORD, JWT):
                assert secret not in str(e)
            return
        assert m.buffered <= MAX_REPLY
        if any(isinstance(a, SOCKSConnected) for a in actions):
            assert m.buffered == 0
            return


@settings(max_examples=200, deadline=None)
@given(
    kw=MACHINES,
    tail=st.binary(max_size=64),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=8),
    atyp_reply=st.sampled_from([
        OK_IPV4, b"\x05\x00\x00\x03\x03abc\x00\x19", b"\x05\x00\x00\x04" + b"\x01" * 18,
    ]),
)
def test_any_split_of_a_valid_conversation_connects(kw, tail, cuts, atyp_reply):
    m = SOCKS5Client(HOST, PORT, **kw)
    m.start()
    first = {"none": b"\x05\x00", "userpass": b"\x05\x02", "sap": b"\x05\x80"}[kw["method"]]
    phases = [first] + ([] if kw["method"] == "none" else [b"\x01\x00"])
    for phase in phases:  # each phase arrives after our request, split anywhere
        points = sorted({c % (len(phase) + 1) for c in cuts})
        pieces = [phase[a:b] for a, b in zip([0] + points, points + [len(phase)])]
        out = [a for p in pieces for a in m.receive(p)]
        assert len(out) == 1 and isinstance(out[0], SendUpstream)
    final = atyp_reply + tail
    points = sorted({c % (len(final) + 1) for c in cuts})
    pieces = [final[a:b] for a, b in zip([0] + points, points + [len(final)])]
    got = []
    for piece in pieces:
        if m.connected:
            got.append(piece)
            continue
        for action in m.receive(piece):
            assert isinstance(action, SOCKSConnected)
            got.append(action.leftover)
    assert m.connected
    assert b"".join(got) == tail
