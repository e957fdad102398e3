"""The SMTP machines, bytes in and actions out."""

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailgw.protocol.actions import (
    Close,
    ProtocolError,
    Release,
    SendToApp,
    SendUpstream,
    StartTLS,
    UpstreamFailed,
    UpstreamReady,
)
from mailgw.protocol.credentials import BearerToken, Password
from mailgw.protocol.smtp import SMTPAppSide, SMTPUpstream

EHLO_PLAIN = b"250-mail.example.org\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250-STARTTLS\r\n250 8BITMIME\r\n"
EHLO_TLS = b"250-mail.example.org\r\n250-PIPELINING\r\n250-AUTH PLAIN LOGIN\r\n250 8BITMIME\r\n"


def sent(actions):
    return b"".join(a.data for a in actions if isinstance(a, SendUpstream))


def upstream(**kw):
    kw.setdefault("implicit_tls", False)
    return SMTPUpstream(**kw)


# -- upstream side -------------------------------------------------------------------


def test_starttls_then_auth_plain():
    m = upstream(credentials=Password("alice", "s3cret"))
    assert m.start() == []
    assert sent(m.receive(b"220 mail.example.org ESMTP\r\n")) == b"EHLO mailgw\r\n"
    assert sent(m.receive(EHLO_PLAIN)) == b"STARTTLS\r\n"
    assert m.receive(b"220 go ahead\r\n") == [StartTLS()]
    assert sent(m.tls_established()) == b"EHLO mailgw\r\n"
    expected = b"AUTH PLAIN " + base64.b64encode(b"\0alice\0s3cret") + b"\r\n"
    assert sent(m.receive(EHLO_TLS)) == expected
    actions = m.receive(b"235 2.7.0 ok\r\n")
    assert actions == [UpstreamReady(("PIPELINING", "AUTH PLAIN LOGIN", "8BITMIME"))]


def test_auth_login_when_plain_not_offered():
    m = upstream(implicit_tls=True, credentials=Password("alice", "pw"))
    assert m.start() == [StartTLS()]
    assert m.tls_established() == []
    m.receive(b"220 hi\r\n")
    assert sent(m.receive(b"250-x\r\n250 AUTH LOGIN\r\n")) == b"AUTH LOGIN\r\n"
    assert sent(m.receive(b"334 VXNlcm5hbWU6\r\n")) == base64.b64encode(b"alice") + b"\r\n"
    assert sent(m.receive(b"334 UGFzc3dvcmQ6\r\n")) == base64.b64encode(b"pw") + b"\r\n"
    assert isinstance(m.receive(b"235 ok\r\n")[0], UpstreamReady)


def test_no_auth_and_starttls_disabled():
    m = upstream(starttls_enable=False)
    m.start()
    m.receive(b"220 hi\r\n")
    assert m.receive(EHLO_PLAIN) == [UpstreamReady(("PIPELINING", "SIZE 1000", "STARTTLS", "8BITMIME"))]


def test_starttls_required_but_not_offered():
    m = upstream(starttls_required=True)
    m.receive(b"220 hi\r\n")
    [failed] = m.receive(b"250-x\r\n250 AUTH PLAIN\r\n")
    assert isinstance(failed, UpstreamFailed) and "STARTTLS" in failed.reason


def test_starttls_refused_optional_carries_on():
    m = upstream(credentials=Password("a", "b"))
    m.receive(b"220 hi\r\n")
    m.receive(b"250-x\r\n250-STARTTLS\r\n250 AUTH PLAIN\r\n")
    assert sent(m.receive(b"454 TLS not available\r\n")).startswith(b"AUTH PLAIN ")


@pytest.mark.parametrize("split", [False, True])
def test_starttls_injection_aborts(split):
    m = upstream()
    m.receive(b"220 hi\r\n")
    m.receive(EHLO_PLAIN)
    if split:
        assert m.receive(b"220 go ahead\r\n") == [StartTLS()]
        [failed] = m.receive(b"250 injected\r\n")
    else:
        [failed] = m.receive(b"220 go ahead\r\n250 injected\r\n")
    assert isinstance(failed, UpstreamFailed) and "injection" in failed.reason


def test_auth_refused_names_reply_not_secret():
    m = upstream(starttls_enable=False, credentials=Password("alice", "hunter2"))
    m.receive(b"220 hi\r\n")
    m.receive(EHLO_TLS)
    [failed] = m.receive(b"535 5.7.8 Authentication credentials invalid\r\n")
    assert failed.permanent and "535" in failed.reason and "hunter2" not in failed.reason


def test_no_mechanism():
    m = upstream(starttls_enable=False, credentials=Password("a", "b"))
    m.receive(b"220 hi\r\n")
    [failed] = m.receive(b"250-x\r\n250 AUTH CRAM-MD5\r\n")
    assert "no PLAIN or LOGIN" in failed.reason and "CRAM-MD5" in failed.reason


def test_xoauth2_failure_dance():
    m = upstream(starttls_enable=False, credentials=BearerToken("alice", "tok"))
    m.receive(b"220 hi\r\n")
    assert sent(m.receive(b"250-x\r\n250 AUTH XOAUTH2 OAUTHBEARER\r\n")).startswith(b"AUTH XOAUTH2 ")
    assert sent(m.receive(b"334 eyJzdGF0dXMiOiI0MDEifQ==\r\n")) == b"\r\n"
    assert isinstance(m.receive(b"535 5.7.8 nope\r\n")[0], UpstreamFailed)


def test_bad_greeting_and_malformed_reply():
    m = upstream()
    [failed] = m.receive(b"554 go away\r\n")
    assert failed.permanent and "554" in failed.reason
    m = upstream()
    [failed] = m.receive(b"hello there\r\n")
    assert "malformed" in failed.reason
    m = upstream()
    assert not m.receive(b"421 busy\r\n")[0].permanent


def test_ehlo_refused_falls_back_to_helo_without_auth():
    m = upstream(starttls_enable=False)
    m.receive(b"220 hi\r\n")
    assert sent(m.receive(b"502 no\r\n")) == b"HELO mailgw\r\n"
    assert m.receive(b"250 ok\r\n") == [UpstreamReady(())]


def test_unsolicited_bytes_after_ready_are_kept():
    m = upstream(starttls_enable=False)
    m.receive(b"220 hi\r\n")
    m.receive(b"250 x\r\n")
    assert m.receive(b"421 shutting down\r\n") == []
    assert m.take_pending() == b"421 shutting down\r\n"


def test_reply_split_byte_by_byte():
    m = upstream(starttls_enable=False, credentials=Password("a", "b"))
    actions = []
    for byte in b"220 hi\r\n":
        actions += m.receive(bytes([byte]))
    assert sent(actions) == b"EHLO mailgw\r\n"
    for byte in EHLO_TLS:
        actions = m.receive(bytes([byte]))
    assert sent(actions).startswith(b"AUTH PLAIN")


# -- application side ----------------------------------------------------------------


def app(**kw):
    kw.setdefault("capabilities", ("PIPELINING", "STARTTLS", "AUTH PLAIN", "SIZE 1000"))
    return SMTPAppSide(**kw)


def to_app(actions):
    return b"".join(a.data for a in actions if isinstance(a, SendToApp))


def test_greeting_and_ehlo_lists_upstream_extensions_minus_tls_and_auth():
    m = app()
    assert m.greeting().startswith(b"220 ")
    reply = to_app(m.receive(b"EHLO client\r\n"))
    assert reply == b"250-mailgw\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250 AUTH PLAIN LOGIN\r\n"
    assert to_app(m.receive(b"HELO client\r\n")) == b"250 mailgw\r\n"
    assert to_app(m.receive(b"EHLO\r\n")).startswith(b"501")


@pytest.mark.parametrize(
    "dialogue",
    [
        [(b"AUTH PLAIN AGFsaWNlAHB3\r\n", b"235")],
        [(b"AUTH PLAIN\r\n", b"334 "), (b"AGFsaWNlAHB3\r\n", b"235")],
        [(b"AUTH LOGIN\r\n", b"334 VXNlcm5hbWU6"), (b"YWxpY2U=\r\n", b"334 UGFzc3dvcmQ6"), (b"cHc=\r\n", b"235")],
        [(b"auth login YWxpY2U=\r\n", b"334 UGFzc3dvcmQ6"), (b"cHc=\r\n", b"235")],
        [(b"AUTH CRAM-MD5\r\n", b"334 "), (b"whatever\r\n", b"235")],
        [(b"AUTH XOAUTH2 abc\r\n", b"235")],
        [(b"AUTH PLAIN\r\n", b"334 "), (b"*\r\n", b"501")],
    ],
)
def test_auth_answered_locally(dialogue):
    m = app()
    for line, reply in dialogue:
        assert to_app(m.receive(line)).startswith(reply)


def test_release_at_first_other_command_with_pipelined_bytes():
    m = app()
    actions = m.receive(b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n")
    assert to_app(actions).startswith(b"250-mailgw")
    assert actions[-1] == Release(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n")
    with pytest.raises(ProtocolError):
        m.receive(b"more")


def test_mail_from_without_ehlo_releases():
    assert app().receive(b"MAIL FROM:sender@example.org\r\n") == [Release(b"MAIL FROM:sender@example.org\r\n")]


def test_bare_lf_and_local_commands():
    m = app()
    assert to_app(m.receive(b"NOOP\n")) == b"250 2.0.0 OK\r\n"
    assert to_app(m.receive(b"STARTTLS\r\n")).startswith(b"502")
    assert m.receive(b"QUIT\r\n") == [Release(b"QUIT\r\n")]


def test_line_too_long_is_refused_and_closed():
    m = app(max_line=100)
    actions = m.receive(b"EHLO " + b"x" * 200)
    assert to_app(actions).startswith(b"500 5.5.6") and isinstance(actions[-1], Close)


def test_refusal_texts():
    assert SMTPAppSide.refusal("destination x: boom", permanent=True).startswith(b"554 5.3.0 mailgw: destination x")
    assert SMTPAppSide.refusal("slow", permanent=False).startswith(b"421 ")
    assert SMTPAppSide.refusal("bad\r\nINJECT", permanent=True).count(b"\r\n") == 1


# -- properties ----------------------------------------------------------------------

chunks = st.lists(st.binary(max_size=300), max_size=30)


@settings(max_examples=300, deadline=None)
@given(chunks)
def test_app_side_never_raises_foreign_errors_and_stays_bounded(data):
    m = app(max_line=256)
    for chunk in data:
        try:
            actions = m.receive(chunk)
        except ProtocolError:
            return
        if any(isinstance(a, (Release, Close)) for a in actions):
            return
        assert len(m._lines) <= 256 + 2


@settings(max_examples=300, deadline=None)
@given(chunks, st.booleans())
def test_upstream_never_raises_foreign_errors_and_stays_bounded(data, tls):
    m = upstream(implicit_tls=tls, credentials=Password("a", "b"), max_line=256)
    m.start()
    if tls:
        m.tls_established()
    for chunk in data:
        actions = m.receive(chunk)  # ProtocolErrors become UpstreamFailed inside
        if any(isinstance(a, UpstreamFailed) for a in actions):
            return
        assert len(m._replies.lines) <= 256 + 2
