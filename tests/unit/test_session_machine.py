"""The session machine: every session decision, with no socket, reactor or clock."""

from __future__ import annotations

import base64

import pytest

from mailgw.destination import parse_destination
from mailgw.protocol import sasl
from mailgw.protocol.actions import MisuseError, SendToApp, SendUpstream, StartTLS
from mailgw.protocol.refusal import Reason, Refusal
from mailgw.protocol.session import (
    DIALOGUE,
    IDLE,
    LOGIN,
    MAX_TOKEN_LOGINS,
    TLS,
    CloseApp,
    Connect,
    Exchange,
    FetchToken,
    ForgetToken,
    LookUp,
    Milestone,
    Outcome,
    Phase,
    Refused,
    SessionMachine,
    StartRelay,
    StartTimer,
    StopTimer,
)
from mailgw.settings import Route, Settings

SETTINGS = Settings(max_line=200, login_timeout=30, idle_timeout=300, dialogue_timeout=120, tls_timeout=10)


def destination(protocol="smtp", authentication="BasicAuthentication", **extra):
    values = {
        "Name": "office", "Type": "MAIL", "Authentication": authentication,
        "mail.transport.protocol": protocol, f"mail.{protocol}.host": "mail.example.org",
        "mail.user": "app@example.org", "mail.password": "pa55-secret",
        "tokenServiceURL": "https://token.example.org/oauth/token", "clientId": "gw", "clientSecret": "client-secret",
        **extra,
    }
    return parse_destination({key: value for key, value in values.items() if value is not None})


def of(actions, kind):
    return [a for a in actions if isinstance(a, kind)]


def to_app(actions) -> bytes:
    return b"".join(a.data for a in of(actions, SendToApp))


def upstream_bytes(actions) -> bytes:
    return b"".join(a.data for a in of(actions, SendUpstream))


def started(dest):
    """A machine that looked up ``dest`` and asked to connect."""
    m = SessionMachine(Route("office"), SETTINGS, dest.family)
    assert m.accepted() == [StartTimer(LOGIN, 30), LookUp()]
    actions = m.destination_found(dest)
    if of(actions, FetchToken):
        actions = m.token_found("access-token-secret")
    assert of(actions, Connect) == [Connect(dest)]
    return m


SMTP_EHLO_STARTTLS = b"250-mail.example.org\r\n250-PIPELINING\r\n250 STARTTLS\r\n"
SMTP_EHLO_AUTH = b"250-mail.example.org\r\n250-PIPELINING\r\n250 AUTH PLAIN LOGIN XOAUTH2\r\n"


def smtp_greeted(dest=None):
    """An eager SMTP session through STARTTLS and AUTH PLAIN, up to the greeting."""
    m = started(dest or destination())
    assert m.upstream_connected() == [Milestone("connected")]
    assert upstream_bytes(m.upstream_data(b"220 mail.example.org ESMTP\r\n")) == b"EHLO mailgw\r\n"
    assert upstream_bytes(m.upstream_data(SMTP_EHLO_STARTTLS)) == b"STARTTLS\r\n"
    assert m.upstream_data(b"220 go ahead\r\n") == [StartTimer(TLS, 10), StartTLS()]
    actions = m.upstream_tls_done()
    assert actions[:2] == [StopTimer(TLS), Milestone("tls")] and upstream_bytes(actions) == b"EHLO mailgw\r\n"
    assert upstream_bytes(m.upstream_data(SMTP_EHLO_AUTH)).startswith(b"AUTH ")
    return m, m.upstream_data(b"235 2.7.0 ok\r\n")


# -- eager ---------------------------------------------------------------------------------


def test_eager_smtp_with_starttls_greets_after_login_then_releases_in_order():
    m, actions = smtp_greeted()
    # (only milestones the glue measures or reports: no "greeted" nobody read)
    assert [StopTimer(LOGIN), Milestone("login")] == [a for a in actions if isinstance(a, (StopTimer, Milestone))]
    assert to_app(actions).startswith(b"220 mailgw ESMTP")
    assert StartTimer(IDLE, 300) in actions and StartTimer(DIALOGUE, 120) in actions
    assert m.phase is Phase.DIALOGUE
    ehlo = to_app(m.app_data(b"EHLO app\r\n"))
    assert b"PIPELINING" in ehlo and b"STARTTLS" not in ehlo and b"AUTH PLAIN LOGIN" in ehlo
    assert to_app(m.app_data(b"AUTH PLAIN " + sasl.plain_initial_response("x", "y") + b"\r\n")).startswith(b"235")
    # Upstream bytes that arrive before release reach the application first.
    assert m.upstream_data(b"250 unsolicited\r\n") == []
    actions = m.app_data(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\n")
    assert actions[-1] == StartRelay(to_app=b"250 unsolicited\r\n", to_upstream=b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\n")
    assert {StopTimer(IDLE), StopTimer(DIALOGUE)} <= set(actions) and not of(actions, Milestone)
    assert m.phase is Phase.RELAYING and m.outcome is Outcome.RELAYED


def test_application_bytes_before_the_greeting_are_kept_in_order():
    m = started(destination())
    m.upstream_connected()
    assert m.app_data(b"EHLO early\r\nMAIL FROM:<a@") == []
    m.upstream_data(b"220 hi\r\n")
    m.upstream_data(SMTP_EHLO_STARTTLS)
    m.upstream_data(b"220 go\r\n")
    m.upstream_tls_done()
    m.upstream_data(SMTP_EHLO_AUTH)
    actions = m.upstream_data(b"235 ok\r\n")
    assert to_app(actions).split(b"\r\n")[1].startswith(b"250-mailgw")  # the greeting, then EHLO's answer
    assert m.app_data(b"example.org>\r\n")[-1] == StartRelay(b"", b"MAIL FROM:<a@example.org>\r\n")


def test_client_credentials_token_then_refused_login_forgets_the_token():
    m = started(destination(authentication="OAuth2ClientCredentials"))
    m.upstream_connected()
    m.upstream_data(b"220 hi\r\n")
    m.upstream_data(SMTP_EHLO_STARTTLS)
    m.upstream_data(b"220 go\r\n")
    xoauth2 = upstream_bytes(m.upstream_tls_done() + m.upstream_data(SMTP_EHLO_AUTH))
    assert b"AUTH XOAUTH2 " + sasl.xoauth2_initial_response("app@example.org", "access-token-secret") in xoauth2
    assert upstream_bytes(m.upstream_data(b"334 eyJzdGF0dXMiOiI0MDEifQ==\r\n")) == b"\r\n"  # the error dance
    actions = m.upstream_data(b"535 5.7.8 Authentication failed\r\n")
    assert ForgetToken(None) in actions
    [refused] = of(actions, Refused)
    assert refused.refusal.reason is Reason.AUTH and refused.refusal.permanent
    assert "token status 401" in refused.refusal.text
    assert to_app(actions).startswith(b"554 5.3.0 mailgw: destination office: upstream refused the credentials")
    assert actions[-1] == CloseApp() and m.outcome is Outcome.REFUSED


# -- refusals: once, under one reason ------------------------------------------------------


def refusal_of(actions) -> Refusal:
    [refused] = of(actions, Refused)
    return refused.refusal


@pytest.mark.parametrize("event, reason, permanent, text", [
    (lambda m: m.failed(Refusal("connection refused by mail.example.org:587", Reason.CONNECT, False)), Reason.CONNECT, False, "connection refused"),
    (lambda m: m.upstream_lost(Refusal("the certificate of mail.example.org:587 does not match its host name", Reason.CERTIFICATE)),
     Reason.CERTIFICATE, True, "does not match its host name"),
    (lambda m: m.upstream_lost(), Reason.CONNECT, False, "upstream closed the connection during the login (greeting)"),
    (lambda m: m.timer(LOGIN), Reason.TIMEOUT, False, "did not complete the login within 30s"),
    (lambda m: m.upstream_data(b"554 go away\r\n"), Reason.CONNECT, True, "upstream greeting refused: 554 go away"),
    (lambda m: m.upstream_data(b"220 hi\r\n") + m.upstream_data(SMTP_EHLO_STARTTLS) + m.upstream_data(b"220 go\r\n250 injected\r\n"),
     Reason.TLS, True, "STARTTLS injection"),
    (lambda m: m.upstream_data(b"garbage\r\n"), Reason.PROTOCOL, True, "malformed SMTP reply"),
    (lambda m: m.shutdown("the gateway is shutting down"), Reason.SHUTDOWN, False, "the gateway is shutting down"),
    (lambda m: m.app_data(b"x" * 201), Reason.PROTOCOL, True, "too much data before the greeting"),
])
def test_every_refusal_names_the_destination_and_counts_once(event, reason, permanent, text):
    m = started(destination())
    m.upstream_connected()
    actions = event(m)
    refusal = refusal_of(actions)
    assert (refusal.reason, refusal.permanent) == (reason, permanent)
    assert refusal.text.startswith("destination office: ") and text in refusal.text
    assert to_app(actions).startswith(b"554 " if permanent else b"421 ") and actions[-1] == CloseApp()
    # Whatever happens next, nothing more is written or counted.
    later = (
        m.app_data(b"x" * 500) + m.upstream_data(b"220 hi\r\n") + m.upstream_lost()
        + m.timer(LOGIN) + m.timer(TLS) + m.failed(Refusal("again", Reason.INTERNAL)) + m.shutdown("drain")
    )
    assert not of(later, Refused) and not to_app(later) and not of(later, CloseApp)
    assert m.outcome is Outcome.REFUSED and m.refusal == refusal


def test_starttls_required_but_not_offered_is_a_tls_refusal():
    m = started(destination(**{"mail.smtp.starttls.required": "true"}))
    m.upstream_connected()
    m.upstream_data(b"220 hi\r\n")
    refusal = refusal_of(m.upstream_data(b"250-x\r\n250 AUTH PLAIN\r\n"))
    assert refusal.reason is Reason.TLS and "does not offer STARTTLS" in refusal.text


def test_tls_handshake_timeout_refuses():
    m = started(destination())
    m.upstream_connected()
    m.upstream_data(b"220 hi\r\n")
    m.upstream_data(SMTP_EHLO_STARTTLS)
    m.upstream_data(b"220 go\r\n")
    refusal = refusal_of(m.timer(TLS))
    assert refusal.reason is Reason.TIMEOUT and "TLS handshake with mail.example.org:587 timed out" in refusal.text


def test_limit_refusal_before_lookup():
    m = SessionMachine(Route("office"), SETTINGS, "imap")
    actions = m.failed(Refusal("too many sessions from 10.0.0.1, try again later", Reason.LIMIT, False))
    assert to_app(actions) == b"* BYE mailgw: destination office: too many sessions from 10.0.0.1, try again later\r\n"
    assert refusal_of(actions).reason is Reason.LIMIT
    assert m.destination_found(destination("imap4")) == []  # a late look-up changes nothing


# -- after the greeting: goodbyes, not refusals ------------------------------------------------


def test_dialogue_deadline_holds_however_the_application_trickles():
    m, _ = smtp_greeted()
    for _ in range(50):
        assert StartTimer(IDLE, 300) in m.app_data(b"N")  # each byte resets the idle timer...
    actions = m.timer(DIALOGUE)  # ...but not the dialogue deadline
    assert to_app(actions) == b"421 4.3.2 mailgw: the login dialogue took longer than 120s\r\n"
    assert actions[-1] == CloseApp() and not of(actions, Refused) and m.outcome is Outcome.CLOSED
    assert upstream_bytes(actions) == b"QUIT\r\n"


@pytest.mark.parametrize("event, text, to_server", [
    (lambda m: m.timer(IDLE), b"idle timeout", b"QUIT\r\n"),
    (lambda m: m.upstream_lost(), b"the upstream server closed the connection", b""),
    (lambda m: m.shutdown("the gateway is shutting down"), b"the gateway is shutting down", b"QUIT\r\n"),
])
def test_endings_after_the_greeting_say_goodbye(event, text, to_server):
    """To the application, and with QUIT to the logged-in server while it is there."""
    m, _ = smtp_greeted()
    actions = event(m)
    assert to_app(actions) == b"421 4.3.2 mailgw: " + text + b"\r\n" and actions[-1] == CloseApp()
    assert upstream_bytes(actions) == to_server
    assert m.outcome is Outcome.CLOSED and not of(actions, Refused)


def test_after_release_the_gateway_adds_nothing_to_the_upstream_stream():
    m, _ = smtp_greeted()
    assert of(m.app_data(b"MAIL FROM:<a@example.org>\r\n"), StartRelay)
    for event in (lambda: m.timer(IDLE), lambda: m.shutdown("the gateway is shutting down")):
        assert upstream_bytes(event()) == b""


def test_application_quit_closes_without_goodbye():
    m = started(destination("pop3", authentication="NoAuthentication"))
    m.upstream_connected()
    m.upstream_data(b"+OK hi\r\n")
    m.upstream_data(b"-ERR no CAPA\r\n")
    actions = m.app_data(b"QUIT\r\n")
    assert to_app(actions) == b"+OK mailgw signing off\r\n" and actions[-1] == CloseApp()
    assert upstream_bytes(actions) == b"QUIT\r\n"  # the server sees the session end


def test_smtp_quit_before_release_is_answered_here_and_the_upstream_hears_its_own():
    """No relay is built for a session that relayed nothing (a probe's connect, EHLO,
    QUIT): the gateway answers 221 and says QUIT to the logged-in server itself."""
    m, _ = smtp_greeted()
    m.app_data(b"EHLO app\r\n")
    actions = m.app_data(b"QUIT\r\n")
    assert to_app(actions) == b"221 2.0.0 mailgw closing connection\r\n"
    assert upstream_bytes(actions) == b"QUIT\r\n" and actions[-1] == CloseApp()
    assert not of(actions, StartRelay) and m.outcome is Outcome.CLOSED


def test_imap_logout_before_release_logs_the_upstream_out():
    m = started(destination("imap4", **{"mail.imap4.starttls.enable": "false"}))
    m.upstream_connected()
    m.upstream_data(b"* OK ready\r\n")
    m.upstream_data(b"* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\ng1 OK done\r\n")
    m.upstream_data(b"g2 OK [CAPABILITY IMAP4rev1] logged in\r\n")
    actions = m.app_data(b"a1 LOGOUT\r\n")
    assert to_app(actions).endswith(b"a1 OK LOGOUT completed\r\n")
    assert upstream_bytes(actions) == b"g3 LOGOUT\r\n" and actions[-1] == CloseApp()


# -- lazy: the application presents its secret -------------------------------------------------

IMAP_CAPS = b"* CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2 AUTH=OAUTHBEARER\r\n"


def imap_lazy():
    m = started(destination("imap4", authentication="OAuth2RefreshToken", **{"mail.imap4.starttls.enable": "false"}))
    m.upstream_connected()
    assert upstream_bytes(m.upstream_data(b"* OK ready\r\n")) == b"g1 CAPABILITY\r\n"
    actions = m.upstream_data(IMAP_CAPS + b"g1 OK done\r\n")
    assert StopTimer(LOGIN) in actions and b"AUTH=XOAUTH2" in to_app(actions)
    return m


def xoauth2(secret: str, user: str = "alice@example.org") -> bytes:
    return sasl.xoauth2_initial_response(user, secret)


def test_lazy_flow_exchanges_retries_and_releases():
    m = imap_lazy()
    assert to_app(m.app_data(b"a1 SELECT INBOX\r\n")).startswith(b"a1 BAD mailgw: authentication required")
    assert m.app_data(b"a2 AUTHENTICATE XOAUTH2 " + xoauth2("refresh-1") + b"\r\n")[-1] == Exchange("refresh-1")
    # The upstream refuses the token: forget it, tell the application, stay open.
    login = m.exchanged("access-1")
    assert login[0] == StartTimer(LOGIN, 30)
    assert upstream_bytes(login) == b"g2 AUTHENTICATE XOAUTH2 " + xoauth2("access-1") + b"\r\n"
    assert upstream_bytes(m.upstream_data(b"+ eyJzdGF0dXMiOiI0MDEifQ==\r\n")) == b"\r\n"
    actions = m.upstream_data(b"g2 NO [AUTHENTICATIONFAILED] no\r\n")
    assert ForgetToken("refresh-1") in actions and StopTimer(LOGIN) in actions
    assert to_app(actions).startswith(b"a2 NO [AUTHENTICATIONFAILED] mailgw: upstream refused the credentials")
    assert m.phase is Phase.DIALOGUE and not of(actions, Refused)
    # A second try is accepted.
    assert m.app_data(b"a3 AUTHENTICATE XOAUTH2\r\n") == [StartTimer(IDLE, 300), SendToApp(b"+ \r\n")]
    assert m.app_data(xoauth2("refresh-2") + b"\r\n")[-1] == Exchange("refresh-2")
    m.exchanged("access-2")
    actions = m.upstream_data(b"* CAPABILITY IMAP4rev1 IDLE\r\ng3 OK done\r\n")
    assert to_app(actions) == b"a3 OK [CAPABILITY IMAP4rev1 IDLE] AUTHENTICATE completed\r\n"
    assert Milestone("login") in actions
    assert m.app_data(b"a4 SELECT INBOX\r\n")[-1] == StartRelay(b"", b"a4 SELECT INBOX\r\n")


@pytest.mark.parametrize("permanent, code", [(True, b"[AUTHENTICATIONFAILED]"), (False, b"[UNAVAILABLE]")])
def test_refused_exchange_keeps_the_session_open(permanent, code):
    m = imap_lazy()
    m.app_data(b"a1 AUTHENTICATE XOAUTH2 " + xoauth2("bad-refresh") + b"\r\n")
    actions = m.exchange_failed(Refusal("token service: invalid_grant", Reason.TOKEN, permanent))
    assert to_app(actions) == b"a1 NO " + code + b" mailgw: token service: invalid_grant\r\n"
    assert m.phase is Phase.DIALOGUE and m.exchanged("late-token") == []  # a stale answer is ignored


def test_token_logins_are_capped_per_session():
    # Each attempt costs a token-service request: an application retrying in a loop
    # is stopped, with a goodbye that says why, instead of running until the deadline.
    m = imap_lazy()
    for attempt in range(1, MAX_TOKEN_LOGINS + 1):
        assert of(m.app_data(b"a%d AUTHENTICATE XOAUTH2 " % attempt + xoauth2(f"bad-{attempt}") + b"\r\n"), Exchange)
        m.exchange_failed(Refusal("token service: invalid_grant", Reason.TOKEN))
    actions = m.app_data(b"a9 AUTHENTICATE XOAUTH2 " + xoauth2("bad-9") + b"\r\n")
    assert not of(actions, Exchange) and CloseApp() in actions
    assert to_app(actions) == b"* BYE mailgw: too many login attempts in one session (3); connect again to retry\r\n"
    assert m.phase is Phase.CLOSING


def test_lazy_without_a_user_is_refused_locally():
    m = started(destination("imap4", authentication="OAuth2RefreshToken", **{"mail.user": None, "mail.imap4.starttls.enable": "false"}))
    m.upstream_connected()
    m.upstream_data(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] ready\r\n")
    oauthbearer = base64.b64encode(sasl.encode_oauthbearer(None, "refresh-1"))
    actions = m.app_data(b"a1 AUTHENTICATE OAUTHBEARER " + oauthbearer + b"\r\n")
    assert not of(actions, Exchange) and b"a1 NO [AUTHENTICATIONFAILED] mailgw: no user" in to_app(actions)


# -- secrets and misuse --------------------------------------------------------------------


def test_no_secret_in_any_action_repr():
    m = imap_lazy()
    actions = m.app_data(b"a1 AUTHENTICATE XOAUTH2 " + xoauth2("refresh-secret") + b"\r\n")
    actions += m.exchanged("access-secret")
    m2, greeted = smtp_greeted(destination(authentication="OAuth2ClientCredentials"))
    text = repr(actions) + repr(greeted) + repr(m2.destination)
    for secret in ("refresh-secret", "access-secret", "access-token-secret", "pa55-secret", "client-secret"):
        assert secret not in text


def test_glue_misuse_is_a_misuse_error_not_a_protocol_error():
    m = SessionMachine(Route("office"), SETTINGS)
    with pytest.raises(MisuseError):
        m.upstream_connected()
    m.accepted()
    with pytest.raises(MisuseError):
        m.accepted()
