"""The POP3 machines, bytes in and actions out."""

import base64
import json

import pytest

from mailgw.protocol.actions import (
    Close,
    ExchangeSecret,
    LoginRefused,
    MisuseError,
    Release,
    SendToApp,
    SendUpstream,
    StartTLS,
    UpstreamAwaitingLogin,
    UpstreamFailed,
    UpstreamReady,
)
from mailgw.protocol.credentials import BearerToken, Password
from mailgw.protocol.pop3 import POP3AppSide, POP3Upstream

CAPA_PLAIN = b"+OK\r\nCAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\nSTLS\r\nUSER\r\nSASL\r\n.\r\n"
CAPA_TLS = b"+OK\r\nCAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\nUSER\r\nSASL PLAIN LOGIN\r\n.\r\n"
CAPA_AFTER = b"+OK\r\nCAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\n.\r\n"
AFTER = ("CAPA", "TOP", "UIDL", "RESP-CODES", "PIPELINING")


def sent(actions):
    assert all(isinstance(a, SendUpstream) for a in actions), actions
    return b"".join(a.data for a in actions)


def failure(actions):
    """The failure a call ended in (what came before it is moot: the session closes)."""
    assert isinstance(actions[-1], UpstreamFailed) and not any(isinstance(a, UpstreamFailed) for a in actions[:-1]), actions
    return actions[-1]


def upstream(**kw):
    kw.setdefault("implicit_tls", False)
    m = POP3Upstream(**kw)
    assert m.start() == ([StartTLS()] if kw["implicit_tls"] else [])
    if kw["implicit_tls"]:
        assert m.tls_established() == []
    return m


def feed_bytewise(m, data):
    actions = []
    for i in range(len(data)):
        actions += m.receive(data[i : i + 1])
    return actions


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


def test_stls_required_but_not_offered():
    m = upstream(starttls_required=True, credentials=Password("a", "b"))
    m.receive(b"+OK hi\r\n")
    f = failure(m.receive(CAPA_TLS))
    assert "STLS" in f.reason and "requires" in f.reason


def test_stls_refused_optional_carries_on_and_required_fails():
    m = upstream(credentials=Password("a", "b"))
    m.receive(b"+OK hi\r\n")
    m.receive(CAPA_PLAIN)
    assert sent(m.receive(b"-ERR TLS not available\r\n")) == b"USER a\r\n"
    m = upstream(starttls_required=True, credentials=Password("a", "b"))
    m.receive(b"+OK hi\r\n")
    m.receive(CAPA_PLAIN)
    assert "refused STLS" in failure(m.receive(b"-ERR TLS not available\r\n")).reason


@pytest.mark.parametrize("after_ok, later", [(b"+OK injected\r\n", None), (b"+", None), (b"", b"+OK\r\n"), (b"", b".")])
def test_stls_injection_aborts(after_ok, later):
    m = upstream(credentials=Password("a", "b"))
    m.receive(b"+OK hi\r\n")
    m.receive(CAPA_PLAIN)
    actions = m.receive(b"+OK Begin TLS\r\n" + after_ok)
    if later is None:
        assert "injection" in failure(actions).reason
        return
    assert actions == [StartTLS()]
    assert "injection" in failure(m.receive(later)).reason
    assert m.receive(b"+OK") == []


def test_capabilities_after_tls_replace_plaintext_ones():
    m = upstream(credentials=Password("a", "b"))
    m.receive(b"+OK hi\r\n")
    m.receive(b"+OK\r\nSTLS\r\nSASL PLAIN\r\n.\r\n")
    m.receive(b"+OK go\r\n")
    assert sent(m.tls_established()) == b"CAPA\r\n"
    assert sent(m.receive(b"+OK\r\nUSER\r\n.\r\n")) == b"USER a\r\n"


def test_tls_established_in_wrong_state_raises_protocol_error():
    with pytest.raises(MisuseError):
        upstream().tls_established()


def test_responses_split_byte_by_byte():
    m = upstream(credentials=Password("alice", "pw"))
    assert sent(feed_bytewise(m, b"+OK hi\r\n")) == b"CAPA\r\n"
    assert sent(feed_bytewise(m, CAPA_PLAIN)) == b"STLS\r\n"
    assert feed_bytewise(m, b"+OK go\r\n") == [StartTLS()]
    m.tls_established()
    assert sent(feed_bytewise(m, CAPA_TLS)).startswith(b"AUTH PLAIN ")
    assert sent(feed_bytewise(m, b"+OK in\r\n")) == b"CAPA\r\n"
    assert feed_bytewise(m, CAPA_AFTER) == [UpstreamReady(AFTER)]


def test_overlong_lines_and_capa_lists_fail():
    m = upstream(max_line=100)
    assert "longer than 100" in failure(m.receive(b"+OK " + b"x" * 200)).reason
    m = upstream()
    m.receive(b"+OK hi\r\n")
    assert "longer than" in failure(m.receive(b"+OK\r\n" + b"X\r\n" * 300)).reason


def test_unsolicited_bytes_after_ready_are_kept_in_order():
    m = upstream(starttls_enable=False)
    m.receive(b"+OK hi\r\n")
    assert m.receive(b"+OK\r\nTOP\r\n.\r\n-ERR bye\r") == [UpstreamReady(("TOP",))]
    assert m.receive(b"\n") == []
    assert m.take_pending() == b"-ERR bye\r\n"
    assert not failure(m.receive(b"x" * 70000)).permanent


def test_data_before_start_or_before_implicit_handshake_fails():
    assert isinstance(POP3Upstream(implicit_tls=False).receive(b"+OK\r\n")[0], UpstreamFailed)
    m = POP3Upstream(implicit_tls=True)
    m.start()
    assert "injection" in failure(m.receive(b"+OK\r\n")).reason


# -- application side ------------------------------------------------------------------


def app(**kw):
    kw.setdefault("capabilities", ("TOP", "UIDL", "STLS", "USER", "SASL PLAIN XOAUTH2", "RESP-CODES", "PIPELINING"))
    return POP3AppSide(**kw)


def to_app(actions):
    return b"".join(a.data for a in actions if isinstance(a, SendToApp))


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


@pytest.mark.parametrize(
    "dialogue",
    [
        [(b"AUTH\r\n", b"+OK\r\nPLAIN\r\n.\r\n")],
        [(b"AUTH PLAIN AGFsaWNlAHB3\r\n", b"+OK Logged in.\r\n")],
        [(b"AUTH PLAIN\r\n", b"+ \r\n"), (b"AGFsaWNlAHB3\r\n", b"+OK Logged in.\r\n")],
        [(b"auth xoauth2 dXNlcj1h\r\n", b"+OK Logged in.\r\n")],
        [(b"AUTH PLAIN =\r\n", b"+OK Logged in.\r\n")],
        [(b"AUTH LOGIN\r\n", b"+ VXNlcm5hbWU6\r\n"), (b"YQ==\r\n", b"+ UGFzc3dvcmQ6\r\n"), (b"cA==\r\n", b"+OK Logged in.\r\n")],
        [(b"AUTH PLAIN\r\n", b"+ \r\n"), (b"*\r\n", b"-ERR Authentication cancelled\r\n")],
    ],
)
def test_auth_answered_locally(dialogue):
    m = app()
    for line, reply in dialogue:
        assert to_app(m.receive(line)) == reply


def test_auth_response_line_is_not_a_command():
    m = app()
    m.receive(b"AUTH PLAIN\r\n")
    assert m.receive(b"LIST\r\n") == [SendToApp(b"+OK Logged in.\r\n")]


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


def test_line_too_long_closes():
    m = app(max_line=100)
    actions = m.receive(b"USER " + b"x" * 200)
    assert to_app(actions) == b"-ERR mailgw: command line too long (limit 100 bytes)\r\n"
    assert isinstance(actions[-1], Close)


def test_refusal_and_goodbye():
    assert POP3AppSide.dialect.refusal("destination x: boom", permanent=True) == b"-ERR mailgw: destination x: boom\r\n"
    assert POP3AppSide.dialect.refusal("slow", permanent=False) == b"-ERR mailgw: slow\r\n"
    assert POP3AppSide.dialect.refusal("bad\r\nINJECT").count(b"\r\n") == 1
    assert POP3AppSide.dialect.reply("goodbye", text="idle timeout") == b"-ERR mailgw: idle timeout\r\n"


# -- properties ------------------------------------------------------------------------

MAX = 256


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


def test_lazy_upstream_without_bearer_mechanism_fails_at_once():
    m = upstream(implicit_tls=True, lazy=True)
    m.receive(b"+OK hi\r\n")
    f = failure(m.receive(CAPA_TLS))
    assert "no XOAUTH2 or OAUTHBEARER" in f.reason and "PLAIN" in f.reason


def test_lazy_upstream_stray_line_while_waiting_fails():
    m = waiting_upstream()
    f = failure(m.receive(b"-ERR Disconnected for inactivity.\r\n"))
    assert not f.permanent and "Disconnected" in f.reason


def lazy_app(**kw):
    kw.setdefault("capabilities", ("CAPA", "TOP", "UIDL", "STLS", "USER", "SASL PLAIN"))
    return POP3AppSide(lazy=True, **kw)


def xo(user, secret):
    return base64.b64encode(f"user={user}\x01auth=Bearer {secret}\x01\x01".encode())


def test_lazy_capa_and_auth_list_advertise_bearer_mechanisms():
    m = lazy_app()
    assert to_app(m.receive(b"CAPA\r\n")) == b"+OK Capability list follows\r\nCAPA\r\nTOP\r\nUIDL\r\nSASL XOAUTH2 OAUTHBEARER\r\n.\r\n"
    assert to_app(m.receive(b"AUTH\r\n")) == b"+OK\r\nXOAUTH2\r\nOAUTHBEARER\r\n.\r\n"


def test_lazy_auth_inline_then_release_of_pipelined_commands():
    m = lazy_app()
    [exchange] = m.receive(b"AUTH XOAUTH2 " + xo("alice", "rt-1") + b"\r\nSTAT\r\n")
    assert exchange == ExchangeSecret("XOAUTH2", "alice", "rt-1") and "rt-1" not in repr(exchange)
    assert m.receive(b"RETR 1\r\n") == []
    actions = m.auth_succeeded(AFTER)
    assert to_app(actions) == b"+OK Logged in.\r\n"
    assert actions[-1] == Release(b"STAT\r\nRETR 1\r\n")


def test_lazy_auth_with_continuation_split_bytewise():
    m = lazy_app()
    assert to_app(feed_bytewise(m, b"AUTH OAUTHBEARER\r\n")) == b"+ \r\n"
    response = base64.b64encode(b"n,a=bob,\x01auth=Bearer code-9\x01\x01") + b"\r\n"
    assert feed_bytewise(m, response) == [ExchangeSecret("OAUTHBEARER", "bob", "code-9")]
    assert to_app(m.auth_succeeded(AFTER)) == b"+OK Logged in.\r\n"
    assert b"PIPELINING" in to_app(m.receive(b"CAPA\r\n"))
    assert m.receive(b"USER x\r\n") == [Release(b"USER x\r\n")]  # the upstream answers that now


def test_lazy_refusals_keep_the_session_for_a_retry():
    m = lazy_app()
    m.receive(b"AUTH XOAUTH2 " + xo("alice", "revoked") + b"\r\n")
    assert to_app(m.auth_refused("token service: invalid_grant")) == b"-ERR [AUTH] mailgw: token service: invalid_grant\r\n"
    m.receive(b"AUTH XOAUTH2 " + xo("alice", "x") + b"\r\n")
    assert to_app(m.auth_refused("unreachable", transient=True)) == b"-ERR [SYS/TEMP] mailgw: unreachable\r\n"
    assert m.receive(b"AUTH XOAUTH2 " + xo("alice", "good") + b"\r\n") == [ExchangeSecret("XOAUTH2", "alice", "good")]
    assert to_app(m.auth_succeeded(())) == b"+OK Logged in.\r\n"


@pytest.mark.parametrize("command", [b"STAT", b"LIST", b"RETR 1", b"UIDL", b"NOOP", b"DELE 1", b"XYZZY"])
def test_lazy_commands_before_authentication_are_refused(command):
    m = lazy_app()
    assert to_app(m.receive(command + b"\r\n")) == b"-ERR [AUTH] Authentication required\r\n"
    assert to_app(m.receive(b"QUIT\r\n")) == b"+OK mailgw signing off\r\n"


@pytest.mark.parametrize("command", [b"USER alice", b"PASS secret", b"APOP alice 0123", b"AUTH PLAIN AGFAYg==", b"AUTH LOGIN"])
def test_lazy_password_logins_are_refused_clearly(command):
    reply = to_app(lazy_app().receive(command + b"\r\n"))
    assert reply.startswith(b"-ERR [AUTH] mailgw: ") and b"carries no token" in reply and b"secret" not in reply


@pytest.mark.parametrize(
    "payload",
    [b"not base64!", base64.b64encode(b"user=alice\x01\x01"), base64.b64encode(b"user=alice\x01auth=Bearer \x01\x01"), b"="],
)
def test_lazy_malformed_payloads_get_err_without_the_payload(payload):
    m = lazy_app()
    reply = to_app(m.receive(b"AUTH XOAUTH2 " + payload + b"\r\n"))
    assert reply.startswith(b"-ERR mailgw: malformed authentication response") and payload not in reply
    assert to_app(m.receive(b"AUTH XOAUTH2\r\n*\r\n")) == b"+ \r\n-ERR Authentication cancelled\r\n"


def test_lazy_flood_while_waiting_closes():
    m = lazy_app()
    m.receive(b"AUTH XOAUTH2 " + xo("alice", "rt") + b"\r\n")
    actions = m.receive(b"x" * 70000)
    assert to_app(actions).startswith(b"-ERR") and isinstance(actions[-1], Close)


