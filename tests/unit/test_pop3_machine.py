"""The POP3 machines, bytes in and actions out."""

import base64
import json

import pytest

from mailgw.protocol.actions import Close, LoginRefused, MisuseError, Release, SendToApp, StartTLS, UpstreamAwaitingLogin
from mailgw.protocol.actions import UpstreamReady
from mailgw.protocol.credentials import BearerToken, Password
from mailgw.protocol.pop3 import POP3AppSide, POP3Upstream
from support.wire import failure, feed_bytewise, sent, started, to_app

CAPA_PLAIN = b"+OK\r\nCAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\nSTLS\r\nUSER\r\nSASL\r\n.\r\n"
CAPA_TLS = b"+OK\r\nCAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\nUSER\r\nSASL PLAIN LOGIN\r\n.\r\n"
CAPA_AFTER = b"+OK\r\nCAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\n.\r\n"
AFTER = ("CAPA", "TOP", "UIDL", "RESP-CODES", "PIPELINING")


def upstream(**kw):
    return started(POP3Upstream, **kw)


def at_login(caps=CAPA_TLS, **kw):
    """A machine over implicit TLS that has just been told the capabilities."""
    m = upstream(implicit_tls=True, **kw)
    assert sent(m.receive(b"+OK Dovecot ready.\r\n")) == b"CAPA\r\n"
    return m, sent(m.receive(caps))


# -- upstream --------------------------------------------------------------------------


def test_stls_then_auth_plain_then_capa_again():
    m = upstream(credentials=Password("alice", "s3cret"))
    assert sent(m.receive(b"+OK Dovecot ready. <1896.697170952@dbc.mtview.ca.us>\r\n")) == b"CAPA\r\n"
    assert sent(m.receive(CAPA_PLAIN)) == b"STLS\r\n"
    assert m.receive(b"+OK Begin TLS negotiation now.\r\n") == [StartTLS()]
    assert sent(m.tls_established()) == b"CAPA\r\n"
    expected = b"AUTH PLAIN " + base64.b64encode(b"\0alice\0s3cret") + b"\r\n"
    assert sent(m.receive(CAPA_TLS)) == expected
    assert sent(m.receive(b"+OK Logged in.\r\n")) == b"CAPA\r\n"
    assert m.receive(CAPA_AFTER) == [UpstreamReady(AFTER)]


def test_auth_plain_continuation_gets_the_response_then():
    ir = base64.b64encode(b"\0alice\0pw")
    m, out = at_login(credentials=Password("alice", "pw"))
    assert out == b"AUTH PLAIN " + ir + b"\r\n"
    assert sent(m.receive(b"+ \r\n")) == ir + b"\r\n"
    assert "more authentication data" in failure(m.receive(b"+ \r\n")).reason


def test_user_pass_when_no_sasl_plain():
    m, out = at_login(caps=b"+OK\r\nUSER\r\nSASL CRAM-MD5\r\n.\r\n", credentials=Password("alice", "pa ss\"\\"))
    assert out == b"USER alice\r\n"
    assert sent(m.receive(b"+OK\r\n")) == b'PASS pa ss"\\\r\n'
    assert sent(m.receive(b"+OK Logged in.\r\n")) == b"CAPA\r\n"
    # A server whose CAPA is refused after login: keep what was said before.
    assert m.receive(b"-ERR no\r\n") == [UpstreamReady(("USER", "SASL CRAM-MD5"))]


def test_user_pass_8bit_is_utf8():
    m, out = at_login(caps=b"-ERR unknown command\r\n", credentials=Password("jürgen", "pässwörd"))
    assert out == "USER jürgen\r\n".encode()
    assert sent(m.receive(b"+OK\r\n")) == "PASS pässwörd\r\n".encode()


@pytest.mark.parametrize("user, password", [("alice", "pw\r\nDELE 1"), ("al\nice", "pw")])
def test_user_pass_with_line_break_fails_without_secret(user, password):
    m = upstream(implicit_tls=True, credentials=Password(user, password))
    m.receive(b"+OK hi\r\n")
    f = failure(m.receive(b"-ERR\r\n"))
    assert "line break" in f.reason and "DELE" not in f.reason


def test_server_without_capa_carries_on():
    m = upstream(credentials=Password("alice", "pw"))
    m.receive(b"+OK hi\r\n")
    assert sent(m.receive(b"-ERR Unknown command\r\n")) == b"USER alice\r\n"


def test_wrong_password_names_reply_not_secret():
    m, _ = at_login(caps=b"+OK\r\nUSER\r\n.\r\n", credentials=Password("alice", "hunter2"))
    m.receive(b"+OK\r\n")
    f = failure(m.receive(b"-ERR [AUTH] Authentication failed.\r\n"))
    assert f.permanent and f.reason == "upstream refused the credentials: -ERR [AUTH] Authentication failed."
    m, _ = at_login(credentials=Password("alice", "hunter2"))
    f = failure(m.receive(b"-ERR [AUTH] Authentication failed.\r\n"))
    assert "hunter2" not in f.reason and "[AUTH]" in f.reason
    m, _ = at_login(caps=b"+OK\r\nUSER\r\n.\r\n", credentials=Password("nobody", "x"))
    assert "user name" in failure(m.receive(b"-ERR no such user\r\n")).reason


def test_xoauth2_and_failure_dance():
    m, out = at_login(caps=b"+OK\r\nSASL PLAIN XOAUTH2 OAUTHBEARER\r\n.\r\n", credentials=BearerToken("alice", "s3cr3t-t0k"))
    assert out == b"AUTH XOAUTH2 " + base64.b64encode(b"user=alice\x01auth=Bearer s3cr3t-t0k\x01\x01") + b"\r\n"
    challenge = base64.b64encode(json.dumps({"status": "401", "schemes": "bearer"}).encode())
    assert sent(m.receive(b"+ " + challenge + b"\r\n")) == b"\r\n"
    f = failure(m.receive(b"-ERR [AUTH] Invalid credentials\r\n"))
    assert "Invalid credentials" in f.reason and "s3cr3t" not in f.reason


def test_oauthbearer_when_only_that_is_offered():
    m, out = at_login(caps=b"+OK\r\nSASL OAUTHBEARER\r\n.\r\n", credentials=BearerToken("alice", "tok"))
    assert out == b"AUTH OAUTHBEARER " + base64.b64encode(b"n,a=alice,\x01auth=Bearer tok\x01\x01") + b"\r\n"
    assert sent(m.receive(b"+ eyJzdGF0dXMiOiJpbnZhbGlkX3Rva2VuIn0=\r\n")) == b"AQ==\r\n"
    assert sent(m.receive(b"+OK\r\n")) == b"CAPA\r\n"


def test_bearer_without_mechanism():
    m = upstream(implicit_tls=True, credentials=BearerToken("alice", "tok"))
    m.receive(b"+OK hi\r\n")
    assert "no XOAUTH2 or OAUTHBEARER" in failure(m.receive(b"+OK\r\nSASL PLAIN\r\n.\r\n")).reason
    m = upstream(implicit_tls=True, credentials=BearerToken("alice", "tok"))
    m.receive(b"+OK hi\r\n")
    assert "offers none" in failure(m.receive(b"-ERR\r\n")).reason


def test_no_credentials_is_ready_after_capa():
    m = upstream(starttls_enable=False)
    m.receive(b"+OK hi\r\n")
    assert m.receive(b"+OK\r\nTOP\r\nSTLS\r\n..dotted\r\n.\r\n") == [UpstreamReady(("TOP", "STLS", ".dotted"))]


def test_greeting_refused_and_malformed():
    f = failure(upstream().receive(b"-ERR too many connections\r\n"))
    assert not f.permanent and "too many connections" in f.reason
    assert "malformed" in failure(upstream().receive(b"* OK hello\r\n")).reason
    assert "malformed" in failure(upstream().receive(b"+OKAY\r\n")).reason


def test_stls_refused_optional_carries_on_and_required_fails():
    m = upstream(credentials=Password("a", "b"))
    m.receive(b"+OK hi\r\n")
    m.receive(CAPA_PLAIN)
    assert sent(m.receive(b"-ERR TLS not available\r\n")) == b"USER a\r\n"
    m = upstream(starttls_required=True, credentials=Password("a", "b"))
    m.receive(b"+OK hi\r\n")
    m.receive(CAPA_PLAIN)
    assert "refused STLS" in failure(m.receive(b"-ERR TLS not available\r\n")).reason


def test_capabilities_after_tls_replace_plaintext_ones():
    m = upstream(credentials=Password("a", "b"))
    m.receive(b"+OK hi\r\n")
    m.receive(b"+OK\r\nSTLS\r\nSASL PLAIN\r\n.\r\n")
    m.receive(b"+OK go\r\n")
    assert sent(m.tls_established()) == b"CAPA\r\n"
    assert sent(m.receive(b"+OK\r\nUSER\r\n.\r\n")) == b"USER a\r\n"


def test_responses_split_byte_by_byte():
    m = upstream(credentials=Password("alice", "pw"))
    assert sent(feed_bytewise(m, b"+OK hi\r\n")) == b"CAPA\r\n"
    assert sent(feed_bytewise(m, CAPA_PLAIN)) == b"STLS\r\n"
    assert feed_bytewise(m, b"+OK go\r\n") == [StartTLS()]
    m.tls_established()
    assert sent(feed_bytewise(m, CAPA_TLS)).startswith(b"AUTH PLAIN ")
    assert sent(feed_bytewise(m, b"+OK in\r\n")) == b"CAPA\r\n"
    assert feed_bytewise(m, CAPA_AFTER) == [UpstreamReady(AFTER)]


def test_overlong_capa_list_fails():
    m = upstream()
    m.receive(b"+OK hi\r\n")
    assert "longer than" in failure(m.receive(b"+OK\r\n" + b"X\r\n" * 300)).reason


# -- application side ------------------------------------------------------------------


def app(**kw):
    kw.setdefault("capabilities", ("TOP", "UIDL", "STLS", "USER", "SASL PLAIN XOAUTH2", "RESP-CODES", "PIPELINING"))
    return POP3AppSide(**kw)


def test_greeting_and_capa():
    m = app()
    assert m.greeting() == b"+OK mailgw ready\r\n"
    assert to_app(m.receive(b"CAPA\r\n")) == (
        b"+OK Capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\nUSER\r\nSASL PLAIN\r\n.\r\n"
    )
    assert to_app(POP3AppSide().receive(b"capa\n")) == b"+OK Capability list follows\r\nUSER\r\nSASL PLAIN\r\n.\r\n"


def test_user_pass_apop_answered_locally_then_release():
    m = app()
    assert m.receive(b"USER alice\r\n") == [SendToApp(b"+OK\r\n")]
    assert m.receive(b"PASS any thing\r\n") == [SendToApp(b"+OK Logged in.\r\n")]
    assert m.receive(b"apop alice c4c9334bac560ecc979e58001b3e22fb\r\n") == [SendToApp(b"+OK Logged in.\r\n")]
    assert m.receive(b"STAT\r\n") == [Release(b"STAT\r\n")]
    with pytest.raises(MisuseError):
        m.receive(b"more")


def test_reference_flow_without_login():
    m = app()
    assert m.receive(b"list\r\n") == [Release(b"list\r\n")]
    m = app()
    assert m.receive(b"retr 1\r\nretr 2\r\nquit\r\n") == [Release(b"retr 1\r\nretr 2\r\nquit\r\n")]


@pytest.mark.parametrize("command", [b"LIST", b"STAT", b"RETR 1", b"UIDL", b"TOP 1 0", b"DELE 1", b"NOOP", b"RSET"])
def test_release_at_first_other_command(command):
    assert app().receive(command + b"\r\n") == [Release(command + b"\r\n")]


def test_pipelined_local_commands_then_release_in_order():
    m = app()
    actions = m.receive(b"USER a\r\nPASS b\r\nSTAT\r\nRETR 1\r\nQU")
    assert actions == [SendToApp(b"+OK\r\n"), SendToApp(b"+OK Logged in.\r\n"), Release(b"STAT\r\nRETR 1\r\nQU")]


def test_quit_stls_and_empty_line_locally():
    m = app()
    assert to_app(m.receive(b"STLS\r\n")).startswith(b"-ERR mailgw: STLS")
    assert to_app(m.receive(b"\r\n")).startswith(b"-ERR")
    actions = m.receive(b"QUIT\r\nLIST\r\n")
    assert actions == [SendToApp(b"+OK mailgw signing off\r\n"), Close("application quit")]
    assert m.receive(b"LIST\r\n") == []


# -- lazy OAuth2 types: the upstream waits for the application's token -----------------

CAPA_BEARER = b"+OK\r\nCAPA\r\nTOP\r\nUSER\r\nSASL PLAIN XOAUTH2 OAUTHBEARER\r\n.\r\n"
BEARER_CAPS = ("CAPA", "TOP", "USER", "SASL PLAIN XOAUTH2 OAUTHBEARER")
ERROR_CHALLENGE = base64.b64encode(json.dumps({"status": "401", "schemes": "bearer"}).encode())


def waiting_upstream():
    m = upstream(lazy=True)
    assert sent(m.receive(b"+OK Dovecot ready.\r\n")) == b"CAPA\r\n"
    assert sent(m.receive(CAPA_PLAIN)) == b"STLS\r\n"
    assert m.receive(b"+OK Begin TLS negotiation now.\r\n") == [StartTLS()]
    assert sent(m.tls_established()) == b"CAPA\r\n"
    assert feed_bytewise(m, CAPA_BEARER) == [UpstreamAwaitingLogin(BEARER_CAPS)]
    return m


def test_lazy_upstream_stops_after_stls_then_authenticates():
    m = waiting_upstream()
    ir = base64.b64encode(b"user=alice\x01auth=Bearer at-1\x01\x01")
    assert sent(m.authenticate(BearerToken("alice", "at-1"))) == b"AUTH XOAUTH2 " + ir + b"\r\n"
    assert sent(m.receive(b"+OK Logged in.\r\n")) == b"CAPA\r\n"
    assert m.receive(CAPA_AFTER) == [UpstreamReady(AFTER)]


def test_lazy_upstream_refusal_after_the_dance_is_not_fatal_and_can_be_retried():
    m = waiting_upstream()
    m.authenticate(BearerToken("alice", "at-bad"))
    assert sent(m.receive(b"+ " + ERROR_CHALLENGE + b"\r\n")) == b"\r\n"
    [refused] = m.receive(b"-ERR [AUTH] Authentication failed.\r\n")
    assert isinstance(refused, LoginRefused) and "[AUTH]" in refused.reason and "at-bad" not in refused.reason
    assert sent(m.authenticate(BearerToken("alice", "at-2"))).startswith(b"AUTH XOAUTH2 ")
    assert sent(m.receive(b"+OK\r\n")) == b"CAPA\r\n"
    assert m.receive(CAPA_AFTER) == [UpstreamReady(AFTER)]
    with pytest.raises(MisuseError):
        m.authenticate(BearerToken("alice", "again"))


def test_lazy_upstream_stray_line_while_waiting_fails():
    m = waiting_upstream()
    f = failure(m.receive(b"-ERR Disconnected for inactivity.\r\n"))
    assert not f.permanent and "Disconnected" in f.reason
