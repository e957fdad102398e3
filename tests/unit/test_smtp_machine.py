"""The SMTP machines, bytes in and actions out."""

import base64

import pytest

from mailgw.protocol.actions import Close, LoginRefused, MisuseError, Release, SendToApp, StartTLS, UpstreamAwaitingLogin
from mailgw.protocol.actions import UpstreamFailed, UpstreamReady
from mailgw.protocol.credentials import BearerToken, Password
from mailgw.protocol.smtp import SMTPAppSide, SMTPUpstream
from support.wire import feed_bytewise, sent, started, to_app

EHLO_PLAIN = b"250-mail.example.org\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250-STARTTLS\r\n250 8BITMIME\r\n"
EHLO_TLS = b"250-mail.example.org\r\n250-PIPELINING\r\n250-AUTH PLAIN LOGIN\r\n250 8BITMIME\r\n"


def upstream(**kw):
    return started(SMTPUpstream, **kw)


# -- upstream side -------------------------------------------------------------------


def test_starttls_then_auth_plain():
    m = upstream(credentials=Password("alice", "s3cret"))
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
    m.receive(b"220 hi\r\n")
    assert sent(m.receive(b"250-x\r\n250 AUTH LOGIN\r\n")) == b"AUTH LOGIN\r\n"
    assert sent(m.receive(b"334 VXNlcm5hbWU6\r\n")) == base64.b64encode(b"alice") + b"\r\n"
    assert sent(m.receive(b"334 UGFzc3dvcmQ6\r\n")) == base64.b64encode(b"pw") + b"\r\n"
    assert isinstance(m.receive(b"235 ok\r\n")[0], UpstreamReady)


def test_no_auth_and_starttls_disabled():
    m = upstream(starttls_enable=False)
    m.receive(b"220 hi\r\n")
    assert m.receive(EHLO_PLAIN) == [UpstreamReady(("PIPELINING", "SIZE 1000", "STARTTLS", "8BITMIME"))]


def test_starttls_refused_optional_carries_on():
    m = upstream(credentials=Password("a", "b"))
    m.receive(b"220 hi\r\n")
    m.receive(b"250-x\r\n250-STARTTLS\r\n250 AUTH PLAIN\r\n")
    assert sent(m.receive(b"454 TLS not available\r\n")).startswith(b"AUTH PLAIN ")


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


def test_reply_split_byte_by_byte():
    m = upstream(starttls_enable=False, credentials=Password("a", "b"))
    assert sent(feed_bytewise(m, b"220 hi\r\n")) == b"EHLO mailgw\r\n"
    assert sent(feed_bytewise(m, EHLO_TLS)) == b"AUTH PLAIN " + base64.b64encode(b"\0a\0b") + b"\r\n"


# -- application side ----------------------------------------------------------------


def app(**kw):
    kw.setdefault("capabilities", ("PIPELINING", "STARTTLS", "AUTH PLAIN", "SIZE 1000"))
    return SMTPAppSide(**kw)


def test_greeting_and_ehlo_lists_upstream_extensions_minus_tls_and_auth():
    m = app()
    assert m.greeting().startswith(b"220 ")
    reply = to_app(m.receive(b"EHLO client\r\n"))
    assert reply == b"250-mailgw\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250 AUTH PLAIN LOGIN\r\n"
    assert to_app(m.receive(b"HELO client\r\n")) == b"250 mailgw\r\n"
    assert to_app(m.receive(b"EHLO\r\n")).startswith(b"501")


def test_release_at_first_other_command_with_pipelined_bytes():
    m = app()
    actions = m.receive(b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n")
    assert to_app(actions).startswith(b"250-mailgw")
    assert actions[-1] == Release(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n")
    with pytest.raises(MisuseError):
        m.receive(b"more")


def test_mail_from_without_ehlo_releases():
    assert app().receive(b"MAIL FROM:sender@example.org\r\n") == [Release(b"MAIL FROM:sender@example.org\r\n")]


def test_bare_lf_and_local_commands():
    m = app()
    assert to_app(m.receive(b"NOOP\n")) == b"250 2.0.0 OK\r\n"
    assert to_app(m.receive(b"STARTTLS\r\n")).startswith(b"502")
    assert m.receive(b"QUIT\r\n") == [SendToApp(b"221 2.0.0 mailgw closing connection\r\n"), Close("application quit")]


# -- lazy OAuth2 types: the upstream waits for the application's token ----------------

EHLO_BEARER = b"250-mail.example.org\r\n250-PIPELINING\r\n250-AUTH PLAIN XOAUTH2 OAUTHBEARER\r\n250 8BITMIME\r\n"
BEARER_EXTENSIONS = ("PIPELINING", "AUTH PLAIN XOAUTH2 OAUTHBEARER", "8BITMIME")


def waiting_upstream(**kw):
    m = upstream(lazy=True, **kw)
    assert sent(m.receive(b"220 mail.example.org ESMTP\r\n")) == b"EHLO mailgw\r\n"
    assert sent(m.receive(EHLO_PLAIN)) == b"STARTTLS\r\n"
    assert m.receive(b"220 go ahead\r\n") == [StartTLS()]
    assert sent(m.tls_established()) == b"EHLO mailgw\r\n"
    assert m.receive(EHLO_BEARER) == [UpstreamAwaitingLogin(BEARER_EXTENSIONS)]
    return m


def test_lazy_upstream_stops_after_tls_and_ehlo_then_authenticates():
    m = waiting_upstream()
    expected = b"AUTH XOAUTH2 " + base64.b64encode(b"user=alice\x01auth=Bearer at-1\x01\x01") + b"\r\n"
    assert sent(m.authenticate(BearerToken("alice", "at-1"))) == expected
    assert m.receive(b"235 2.7.0 ok\r\n") == [UpstreamReady(BEARER_EXTENSIONS)]


def test_lazy_upstream_refusal_is_not_fatal_and_can_be_retried():
    m = waiting_upstream()
    m.authenticate(BearerToken("alice", "at-bad"))
    assert sent(m.receive(b"334 eyJzdGF0dXMiOiI0MDEifQ==\r\n")) == b"\r\n"
    [refused] = m.receive(b"535 5.7.8 Authentication failed\r\n")
    assert isinstance(refused, LoginRefused) and "535" in refused.reason and "at-bad" not in refused.reason
    assert sent(m.authenticate(BearerToken("alice", "at-good"))).startswith(b"AUTH XOAUTH2 ")
    assert isinstance(m.receive(b"235 ok\r\n")[0], UpstreamReady)
    with pytest.raises(MisuseError):
        m.authenticate(BearerToken("alice", "again"))


def test_lazy_upstream_uses_oauthbearer_when_only_that_is_offered_split_bytewise():
    m = upstream(starttls_enable=False, lazy=True)
    m.receive(b"220 hi\r\n")
    assert feed_bytewise(m, b"250-x\r\n250 AUTH OAUTHBEARER\r\n") == [UpstreamAwaitingLogin(("AUTH OAUTHBEARER",))]
    assert sent(m.authenticate(BearerToken("alice", "tok"))).startswith(b"AUTH OAUTHBEARER ")


def test_lazy_upstream_unexpected_reply_while_waiting_fails():
    m = waiting_upstream()
    [failed] = m.receive(b"421 4.4.2 idle timeout\r\n")
    assert isinstance(failed, UpstreamFailed) and not failed.permanent and "421" in failed.reason
    with pytest.raises(MisuseError):
        m.authenticate(BearerToken("alice", "tok"))
    m = waiting_upstream()
    assert isinstance(m.receive(b"250 what\r\n")[0], UpstreamFailed)


def test_authenticate_needs_login_later_mode():
    m = upstream(starttls_enable=False)
    m.receive(b"220 hi\r\n")
    m.receive(EHLO_BEARER)
    with pytest.raises(MisuseError):
        m.authenticate(BearerToken("alice", "tok"))
    # Credentials given at once win over login_later.
    m = upstream(starttls_enable=False, credentials=Password("a", "b"), lazy=True)
    m.receive(b"220 hi\r\n")
    assert sent(m.receive(EHLO_BEARER)).startswith(b"AUTH PLAIN ")


def lazy_app(**kw):
    kw.setdefault("capabilities", ("PIPELINING", "STARTTLS", "AUTH PLAIN XOAUTH2", "SIZE 1000"))
    return SMTPAppSide(lazy=True, **kw)


def test_lazy_quit_before_auth_is_local():
    actions = lazy_app().receive(b"QUIT\r\n")
    assert to_app(actions).startswith(b"221 ") and isinstance(actions[-1], Close)
