"""The IMAP machines, bytes in and actions out."""

import base64
import json

import pytest

from mailgw.protocol.actions import Close, LoginRefused, MisuseError, Release, SendToApp, StartTLS, UpstreamAwaitingLogin
from mailgw.protocol.actions import UpstreamReady
from mailgw.protocol.credentials import BearerToken, Password
from mailgw.protocol.imap import IMAPAppSide, IMAPUpstream, login_command, quote
from support.wire import failure, feed_bytewise, sent, started, to_app

CAPS_PLAIN = b"IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ STARTTLS LOGINDISABLED"
CAPS_TLS = b"IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ AUTH=PLAIN"
POST_LOGIN = b"IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE SORT THREAD=REFERENCES MOVE LITERAL+"
POST_LOGIN_CAPS = tuple(POST_LOGIN.decode().split())


def upstream(**kw):
    return started(IMAPUpstream, **kw)


# -- upstream: greeting, CAPABILITY, STARTTLS ------------------------------------------


def test_starttls_then_authenticate_plain_with_sasl_ir():
    m = upstream(credentials=Password("alice", "s3cret"))
    assert sent(m.receive(b"* OK Dovecot ready.\r\n")) == b"g1 CAPABILITY\r\n"
    assert sent(m.receive(b"* CAPABILITY " + CAPS_PLAIN + b"\r\ng1 OK Pre-login capabilities listed.\r\n")) == (
        b"g2 STARTTLS\r\n"
    )
    assert m.receive(b"g2 OK Begin TLS negotiation now.\r\n") == [StartTLS()]
    assert sent(m.tls_established()) == b"g3 CAPABILITY\r\n"
    ir = base64.b64encode(b"\0alice\0s3cret")
    assert sent(m.receive(b"* CAPABILITY " + CAPS_TLS + b"\r\ng3 OK done\r\n")) == (
        b"g4 AUTHENTICATE PLAIN " + ir + b"\r\n"
    )
    actions = m.receive(b"g4 OK [CAPABILITY " + POST_LOGIN + b"] Logged in\r\n")
    assert actions == [UpstreamReady(POST_LOGIN_CAPS)]


def test_greeting_with_capability_skips_capability_command():
    m = upstream(implicit_tls=True, credentials=Password("alice", "pw"))
    out = sent(m.receive(b"* OK [CAPABILITY " + CAPS_TLS + b"] Dovecot ready.\r\n"))
    assert out == b"g1 AUTHENTICATE PLAIN " + base64.b64encode(b"\0alice\0pw") + b"\r\n"


def test_authenticate_plain_without_sasl_ir_waits_for_continuation():
    m = upstream(implicit_tls=True, credentials=Password("alice", "pw"))
    assert sent(m.receive(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] hi\r\n")) == b"g1 AUTHENTICATE PLAIN\r\n"
    assert sent(m.receive(b"+ \r\n")) == base64.b64encode(b"\0alice\0pw") + b"\r\n"
    # No capability in the tagged OK: ask for it.
    assert sent(m.receive(b"g1 OK Logged in\r\n")) == b"g2 CAPABILITY\r\n"
    assert m.receive(b"* CAPABILITY IMAP4rev1 IDLE\r\ng2 OK done\r\n") == [UpstreamReady(("IMAP4rev1", "IDLE"))]


def test_post_login_capability_from_untagged_response():
    m = upstream(implicit_tls=True, credentials=Password("alice", "pw"))
    m.receive(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR] hi\r\n")
    actions = m.receive(b"* CAPABILITY IMAP4rev1 MOVE\r\ng1 OK Logged in\r\n")
    assert actions == [UpstreamReady(("IMAP4rev1", "MOVE"))]


def test_continuation_after_plain_response_fails():
    m = upstream(implicit_tls=True, credentials=Password("alice", "pw"))
    m.receive(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR] hi\r\n")
    assert "more authentication data" in failure(m.receive(b"+ \r\n")).reason


def test_preauth_greeting_is_ready_without_login():
    m = upstream(implicit_tls=True, credentials=Password("alice", "pw"))
    assert m.receive(b"* PREAUTH [CAPABILITY IMAP4rev1 IDLE] logged in already\r\n") == [
        UpstreamReady(("IMAP4rev1", "IDLE"))
    ]


def test_preauth_in_plaintext_when_starttls_required_fails():
    m = upstream(starttls_required=True, credentials=Password("alice", "pw"))
    assert "PREAUTH" in failure(m.receive(b"* PREAUTH [CAPABILITY IMAP4rev1 STARTTLS] hi\r\n")).reason


def test_bye_greeting_fails_transiently():
    m = upstream()
    f = failure(m.receive(b"* BYE Too many connections\r\n"))
    assert not f.permanent and "Too many connections" in f.reason


@pytest.mark.parametrize("greeting", [b"hello\r\n", b"a1 OK hi\r\n", b"+ go\r\n", b"* NO hi\r\n"])
def test_malformed_greeting(greeting):
    assert "malformed" in failure(upstream().receive(greeting)).reason


def test_no_credentials_and_starttls_disabled():
    m = upstream(starttls_enable=False)
    assert m.receive(b"* OK [CAPABILITY IMAP4rev1 STARTTLS IDLE] hi\r\n") == [
        UpstreamReady(("IMAP4rev1", "STARTTLS", "IDLE"))
    ]


def test_starttls_not_offered_optional_carries_on():
    m = upstream(credentials=Password("a", "b"))
    assert sent(m.receive(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] hi\r\n")).startswith(b"g1 AUTHENTICATE PLAIN")


def test_starttls_refused_optional_carries_on_and_required_fails():
    m = upstream(credentials=Password("a", "b"))
    m.receive(b"* OK [CAPABILITY IMAP4rev1 STARTTLS] hi\r\n")
    assert sent(m.receive(b"g1 NO not now\r\n")) == b'g2 LOGIN "a" "b"\r\n'
    m = upstream(starttls_required=True, credentials=Password("a", "b"))
    m.receive(b"* OK [CAPABILITY IMAP4rev1 STARTTLS] hi\r\n")
    f = failure(m.receive(b"g1 BAD not now\r\n"))
    assert "refused STARTTLS" in f.reason and "BAD not now" in f.reason


def test_capabilities_asked_again_after_starttls_and_old_ones_forgotten():
    m = upstream(credentials=Password("a", "b"))
    # Plaintext offered AUTH=PLAIN, after TLS only LOGIN: the second list counts.
    m.receive(b"* OK [CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN SASL-IR] hi\r\n")
    m.receive(b"g1 OK go\r\n")
    assert sent(m.tls_established()) == b"g2 CAPABILITY\r\n"
    assert sent(m.receive(b"* CAPABILITY IMAP4rev1\r\ng2 OK\r\n")) == b'g3 LOGIN "a" "b"\r\n'


# -- upstream: LOGIN, quoting and literals ---------------------------------------------


def login_machine(password, user="alice", caps=b"IMAP4rev1"):
    m = upstream(implicit_tls=True, credentials=Password(user, password))
    return m, sent(m.receive(b"* OK [CAPABILITY " + caps + b"] hi\r\n"))


def test_login_quoted_with_specials():
    m, out = login_machine('p"a\\ss word')
    assert out == b'g1 LOGIN "alice" "p\\"a\\\\ss word"\r\n'
    assert m.receive(b"g1 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n") == [UpstreamReady(("IMAP4rev1", "IDLE"))]


def test_login_empty_password_is_quoted():
    assert login_machine("")[1] == b'g1 LOGIN "alice" ""\r\n'


def test_login_8bit_password_uses_synchronizing_literal():
    password = "pässwörd"
    raw = password.encode("utf-8")
    m, out = login_machine(password)
    assert out == b'g1 LOGIN "alice" {%d}\r\n' % len(raw)
    assert sent(m.receive(b"+ OK\r\n")) == raw + b"\r\n"
    assert m.receive(b"g1 OK [CAPABILITY IMAP4rev1] ok\r\n") == [UpstreamReady(("IMAP4rev1",))]


def test_login_crlf_in_both_uses_two_literals():
    m, out = login_machine("pw\r\nx", user="us\ner")
    assert out == b"g1 LOGIN {5}\r\n"
    assert sent(m.receive(b"+ Ready\r\n")) == b"us\ner {5}\r\n"
    assert sent(m.receive(b"+ Ready\r\n")) == b"pw\r\nx\r\n"
    assert "more authentication data" in failure(m.receive(b"+ again\r\n")).reason


def test_login_literal_plus_sends_everything_at_once():
    m, out = login_machine("pw\0x", caps=b"IMAP4rev1 LITERAL+")
    assert out == b'g1 LOGIN "alice" {4+}\r\npw\0x\r\n'


def test_login_literal_minus_only_for_small_literals():
    big = "é" * 3000  # 6000 bytes > 4096
    assert login_machine("é", caps=b"IMAP4rev1 LITERAL-")[1] == b'g1 LOGIN "alice" {2+}\r\n\xc3\xa9\r\n'
    assert login_machine(big, caps=b"IMAP4rev1 LITERAL-")[1] == b'g1 LOGIN "alice" {6000}\r\n'


def test_login_command_helper_and_quote():
    assert quote(b'a"b\\c') == b'"a\\"b\\\\c"'
    assert login_command(b"t", b"u", b"p", False, False) == [b't LOGIN "u" "p"\r\n']


def test_login_literal_refused_by_server():
    m, _ = login_machine("pässwörd")
    f = failure(m.receive(b"g1 BAD literal not allowed\r\n"))
    assert "BAD literal not allowed" in f.reason and "pässwörd" not in f.reason


def test_logindisabled_without_auth_plain_fails_clearly():
    m = upstream(starttls_enable=False, credentials=Password("a", "b"))
    f = failure(m.receive(b"* OK [CAPABILITY IMAP4rev1 LOGINDISABLED AUTH=CRAM-MD5] hi\r\n"))
    assert "disables LOGIN" in f.reason and "not encrypted" in f.reason


def test_logindisabled_with_auth_plain_authenticates():
    m = upstream(starttls_enable=False, credentials=Password("a", "b"))
    out = sent(m.receive(b"* OK [CAPABILITY IMAP4rev1 LOGINDISABLED AUTH=PLAIN] hi\r\n"))
    assert out == b"g1 AUTHENTICATE PLAIN\r\n"


def test_credentials_refused_names_reply_not_secret():
    m = upstream(implicit_tls=True, credentials=Password("alice", "hunter2"))
    m.receive(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR] hi\r\n")
    f = failure(m.receive(b"g1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n\x00"))
    assert f.permanent
    assert f.reason == "upstream refused the credentials: NO [AUTHENTICATIONFAILED] Authentication failed."
    assert "hunter2" not in f.reason and base64.b64encode(b"\0alice\0hunter2").decode() not in f.reason


def test_failure_text_is_sanitised():
    m = upstream(implicit_tls=True, credentials=Password("alice", "pw"))
    m.receive(b"* OK [CAPABILITY IMAP4rev1] hi\r\n")
    f = failure(m.receive(b"g1 NO bad\x1b[31m\xffuser\r\n"))
    assert f.reason.isprintable() and "\x1b" not in f.reason


def test_password_with_nul_and_auth_plain_fails_without_secret():
    m = upstream(implicit_tls=True, credentials=Password("alice", "a\0secret"))
    f = failure(m.receive(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] hi\r\n"))
    assert "NUL" in f.reason and "secret" not in f.reason


# -- upstream: bearer tokens -----------------------------------------------------------


ERROR_CHALLENGE = base64.b64encode(json.dumps({"status": "401", "schemes": "bearer"}).encode())


def test_xoauth2_with_sasl_ir_and_failure_dance():
    m = upstream(implicit_tls=True, credentials=BearerToken("alice", "s3cr3t-t0ken"))
    ir = base64.b64encode(b"user=alice\x01auth=Bearer s3cr3t-t0ken\x01\x01")
    out = sent(m.receive(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2 AUTH=OAUTHBEARER] hi\r\n"))
    assert out == b"g1 AUTHENTICATE XOAUTH2 " + ir + b"\r\n"
    assert sent(m.receive(b"+ " + ERROR_CHALLENGE + b"\r\n")) == b"\r\n"
    f = failure(m.receive(b"g1 NO [AUTHENTICATIONFAILED] Invalid credentials (Failure)\r\n"))
    assert "Invalid credentials" in f.reason and "status 401" in f.reason and "s3cr3t" not in f.reason


def test_xoauth2_without_sasl_ir_waits_for_continuation_then_succeeds():
    m = upstream(implicit_tls=True, credentials=BearerToken("alice", "tok"))
    assert sent(m.receive(b"* OK [CAPABILITY IMAP4rev1 AUTH=XOAUTH2] hi\r\n")) == b"g1 AUTHENTICATE XOAUTH2\r\n"
    assert sent(m.receive(b"+ \r\n")) == base64.b64encode(b"user=alice\x01auth=Bearer tok\x01\x01") + b"\r\n"
    assert m.receive(b"g1 OK [CAPABILITY IMAP4rev1 IDLE] ok\r\n") == [UpstreamReady(("IMAP4rev1", "IDLE"))]


def test_oauthbearer_when_only_that_is_offered():
    m = upstream(implicit_tls=True, credentials=BearerToken("alice", "tok"))
    out = sent(m.receive(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=OAUTHBEARER] hi\r\n"))
    assert out == b"g1 AUTHENTICATE OAUTHBEARER " + base64.b64encode(b"n,a=alice,\x01auth=Bearer tok\x01\x01") + b"\r\n"
    assert sent(m.receive(b"+ eyJzdGF0dXMiOiJpbnZhbGlkX3Rva2VuIn0=\r\n")) == b"AQ==\r\n"
    assert "status invalid_token" in failure(m.receive(b"g1 NO nope\r\n")).reason


def test_bearer_without_mechanism():
    m = upstream(implicit_tls=True, credentials=BearerToken("alice", "tok"))
    f = failure(m.receive(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] hi\r\n"))
    assert "no XOAUTH2 or OAUTHBEARER" in f.reason and "PLAIN" in f.reason


# -- upstream: reading -----------------------------------------------------------------


def test_responses_split_byte_by_byte():
    m = upstream(credentials=Password("alice", "pw"))
    script = [
        (b"* OK Dovecot ready.\r\n", b"g1 CAPABILITY\r\n"),
        (b"* CAPABILITY IMAP4rev1 STARTTLS\r\ng1 OK listed\r\n", b"g2 STARTTLS\r\n"),
    ]
    for data, expected in script:
        assert sent(feed_bytewise(m, data)) == expected
    assert feed_bytewise(m, b"g2 OK go\r\n") == [StartTLS()]
    m.tls_established()
    assert sent(feed_bytewise(m, b"* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\ng3 OK\r\n")) == b"g4 AUTHENTICATE PLAIN\r\n"
    assert sent(feed_bytewise(m, b"+ \r\n")) == base64.b64encode(b"\0alice\0pw") + b"\r\n"
    assert feed_bytewise(m, b"g4 OK [CAPABILITY IMAP4rev1 IDLE] in\r\n") == [UpstreamReady(("IMAP4rev1", "IDLE"))]


def test_literals_in_untagged_responses_are_skipped_even_split_byte_by_byte():
    m = upstream(implicit_tls=True, credentials=Password("alice", "pw"))
    m.receive(b"* OK [CAPABILITY IMAP4rev1] hi\r\n")
    # An untagged data response carrying literals (one looks like a tagged OK, one like
    # a literal announcement itself) before the tagged OK.
    data = b'* ID ("name" {14}\r\ng1 OK fake\r\n\r\n "x" {5}\r\n{99}\r)\r\ng1 OK [CAPABILITY IMAP4rev1 X] in\r\n'
    assert feed_bytewise(m, data) == [UpstreamReady(("IMAP4rev1", "X"))]


def test_status_responses_are_never_followed_by_literals():
    m = upstream(implicit_tls=True, credentials=Password("alice", "pw"))
    m.receive(b"* OK [CAPABILITY IMAP4rev1] hi\r\n")
    actions = m.receive(b"* OK weird text {5}\r\ng1 OK [CAPABILITY IMAP4rev1] in\r\n")
    assert actions == [UpstreamReady(("IMAP4rev1",))]


def test_huge_literal_in_response_fails():
    m = upstream(implicit_tls=True, credentials=Password("alice", "pw"), max_line=256)
    m.receive(b"* OK [CAPABILITY IMAP4rev1] hi\r\n")
    assert "longer than" in failure(m.receive(b"* 1 FETCH (BODY[] {99999999999999999999}\r\n")).reason
    m = upstream(implicit_tls=True, credentials=Password("alice", "pw"), max_line=256)
    m.receive(b"* OK [CAPABILITY IMAP4rev1] hi\r\n")
    assert "longer than" in failure(m.receive(b"* 1 FETCH (BODY[] {70000}\r\n")).reason


def test_unknown_tag_and_stray_continuation_fail():
    m = upstream()
    m.receive(b"* OK hi\r\n")
    assert "unknown tag" in failure(m.receive(b"zz OK\r\n")).reason
    m = upstream()
    m.receive(b"* OK hi\r\n")
    assert "continuation" in failure(m.receive(b"+ go on\r\n")).reason


def test_untagged_bye_during_login_fails():
    m = upstream(implicit_tls=True, credentials=Password("alice", "pw"))
    m.receive(b"* OK [CAPABILITY IMAP4rev1] hi\r\n")
    f = failure(m.receive(b"* BYE shutting down\r\n"))
    assert "shutting down" in f.reason and not f.permanent


# -- application side ------------------------------------------------------------------


def app(**kw):
    kw.setdefault(
        "capabilities",
        ("IMAP4rev1", "SASL-IR", "ID", "IDLE", "LITERAL+", "STARTTLS", "AUTH=PLAIN", "AUTH=XOAUTH2", "LOGINDISABLED", "MOVE"),
    )
    return IMAPAppSide(**kw)


CAPS_LINE = b"IMAP4rev1 ID IDLE LITERAL+ MOVE AUTH=PLAIN"


def test_greeting_and_capability():
    m = app()
    assert m.greeting() == b"* OK [CAPABILITY " + CAPS_LINE + b"] mailgw ready\r\n"
    assert to_app(m.receive(b"a1 CAPABILITY\r\n")) == b"* CAPABILITY " + CAPS_LINE + b"\r\na1 OK CAPABILITY completed\r\n"
    assert to_app(m.receive(b"a2 capability\n")).endswith(b"a2 OK CAPABILITY completed\r\n")


def test_greeting_without_upstream_capabilities():
    assert IMAPAppSide().greeting() == b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] mailgw ready\r\n"


@pytest.mark.parametrize(
    "command",
    [
        b"a LOGIN alice secret\r\n",
        b'a LOGIN "alice" "p\\"a\\\\ss word"\r\n',
        b"a login alice \"\"\r\n",
    ],
)
def test_login_answered_locally(command):
    assert app().receive(command) == [SendToApp(b"a OK LOGIN completed\r\n")]


def test_login_with_synchronizing_literals():
    m = app()
    assert m.receive(b"a LOGIN {5}\r\n") == [SendToApp(b"+ Ready for literal data\r\n")]
    assert m.receive(b"alice {8}\r\n") == [SendToApp(b"+ Ready for literal data\r\n")]
    assert m.receive(b"p\xc3\xa4ss\r\nx\r\n") == [SendToApp(b"a OK LOGIN completed\r\n")]
    assert m.receive(b"b SELECT INBOX\r\n") == [Release(b"b SELECT INBOX\r\n")]


def test_login_with_non_synchronizing_literals_and_pipelining():
    m = app()
    actions = m.receive(b'a LOGIN {5+}\r\nalice "pw"\r\nb LOGIN "u" {3+}\r\n{1}\r\nc SELECT INBOX\r\n')
    assert actions == [
        SendToApp(b"a OK LOGIN completed\r\n"),
        SendToApp(b"b OK LOGIN completed\r\n"),
        Release(b"c SELECT INBOX\r\n"),
    ]


def test_login_literal_split_byte_by_byte():
    m = app()
    data = b"a LOGIN {5}\r\nalice {9}\r\n{3}\r\nab\r\n\r\nb NOOP\r\nc LIST \"\" *\r\n"
    actions = []
    for i in range(len(data)):
        actions += m.receive(data[i : i + 1])
    assert actions == [
        SendToApp(b"+ Ready for literal data\r\n"),
        SendToApp(b"+ Ready for literal data\r\n"),
        SendToApp(b"a OK LOGIN completed\r\n"),
        SendToApp(b"b OK NOOP completed\r\n"),
        Release(b'c LIST "" *\r\n'),
    ]


def test_huge_literal_claim_closes():
    m = app(max_line=1000)
    actions = m.receive(b"a LOGIN {100000}\r\n")
    assert to_app(actions).startswith(b"* BYE mailgw: literal too large") and isinstance(actions[-1], Close)
    assert m.receive(b"x" * 100) == []
    m = app(max_line=1000)
    actions = m.receive(b"a LOGIN {" + b"9" * 500 + b"+}\r\n")
    assert isinstance(actions[-1], Close)


def test_many_literals_in_one_login_are_bounded():
    m = app(max_line=1000)
    actions = m.receive(b"a LOGIN {5+}\r\n")
    for _ in range(200):
        actions = m.receive(b"xxxxx {5+}\r\n")
        if actions:
            break
    assert isinstance(actions[-1], Close) and to_app(actions).startswith(b"* BYE mailgw: ")


def test_local_noop_id_logout_and_starttls():
    m = app()
    assert to_app(m.receive(b"a NOOP\r\n")) == b"a OK NOOP completed\r\n"
    assert to_app(m.receive(b'b ID ("name" "x")\r\n')) == b"* ID NIL\r\nb OK ID completed\r\n"
    assert to_app(m.receive(b"c STARTTLS\r\n")).startswith(b"c BAD")
    assert to_app(m.receive(b"\r\n")).startswith(b"* BAD")
    assert to_app(m.receive(b"d LOGIN\r\n")).startswith(b"d BAD")
    actions = m.receive(b"e LOGOUT\r\nf SELECT INBOX\r\n")
    assert to_app(actions) == b"* BYE mailgw logging out\r\ne OK LOGOUT completed\r\n"
    assert isinstance(actions[-1], Close)
    assert m.receive(b"g NOOP\r\n") == []


def test_id_after_login_goes_upstream():
    m = app()
    m.receive(b"a LOGIN u p\r\n")
    assert m.receive(b"b ID NIL\r\n") == [Release(b"b ID NIL\r\n")]


def test_pipelined_login_then_commands_release_in_order():
    m = app()
    actions = m.receive(b"a LOGIN u p\r\nb SELECT INBOX\r\nc FETCH 1 BODY[]\r\n")
    assert actions == [SendToApp(b"a OK LOGIN completed\r\n"), Release(b"b SELECT INBOX\r\nc FETCH 1 BODY[]\r\n")]
    with pytest.raises(MisuseError):
        m.receive(b"more")


@pytest.mark.parametrize("first", [b'2 LIST "" "*"\r\n', b"3 SELECT INBOX\r\n", b"5 FETCH 1 BODY[TEXT]\r\n"])
def test_reference_no_login_flow_releases_at_once(first):
    m = app()
    assert m.receive(first) == [Release(first)]


def test_reference_flow_pipelined_partial_line():
    m = app()
    assert m.receive(b'2 LIST "" "*"') == []
    assert m.receive(b"\r\n3 SELECT INBOX\r\n5 FE") == [Release(b'2 LIST "" "*"\r\n3 SELECT INBOX\r\n5 FE')]


def test_released_command_with_literal_goes_upstream_unread():
    m = app()
    # The upstream will answer the synchronizing literal with its own "+".
    assert m.receive(b"a APPEND INBOX {11}\r\n") == [Release(b"a APPEND INBOX {11}\r\n")]
    m = app()
    assert m.receive(b"a APPEND INBOX {3+}\r\nabc\r\n") == [Release(b"a APPEND INBOX {3+}\r\nabc\r\n")]


# -- lazy OAuth2 types: the upstream waits for the application's token -----------------

CAPS_BEARER = b"IMAP4rev1 SASL-IR LOGIN-REFERRALS ID IDLE LITERAL+ AUTH=PLAIN AUTH=XOAUTH2 AUTH=OAUTHBEARER"


def waiting_upstream():
    m = upstream(lazy=True)
    assert sent(m.receive(b"* OK [CAPABILITY " + CAPS_PLAIN + b"] ready\r\n")) == b"g1 STARTTLS\r\n"
    assert m.receive(b"g1 OK go\r\n") == [StartTLS()]
    assert sent(m.tls_established()) == b"g2 CAPABILITY\r\n"
    actions = m.receive(b"* CAPABILITY " + CAPS_BEARER + b"\r\ng2 OK done\r\n")
    assert actions == [UpstreamAwaitingLogin(tuple(CAPS_BEARER.decode().split()))]
    return m


def test_lazy_upstream_stops_after_starttls_then_authenticates_with_sasl_ir():
    m = waiting_upstream()
    ir = base64.b64encode(b"user=alice\x01auth=Bearer at-1\x01\x01")
    assert sent(m.authenticate(BearerToken("alice", "at-1"))) == b"g3 AUTHENTICATE XOAUTH2 " + ir + b"\r\n"
    assert m.receive(b"g3 OK [CAPABILITY " + POST_LOGIN + b"] Logged in\r\n") == [UpstreamReady(POST_LOGIN_CAPS)]


def test_lazy_upstream_refusal_after_the_dance_is_not_fatal_and_can_be_retried():
    m = waiting_upstream()
    m.authenticate(BearerToken("alice", "at-bad"))
    assert sent(m.receive(b"+ " + ERROR_CHALLENGE + b"\r\n")) == b"\r\n"
    [refused] = m.receive(b"g3 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")
    assert isinstance(refused, LoginRefused) and "status 401" in refused.reason and "at-bad" not in refused.reason
    # The next attempt does not inherit the first one's token status.
    assert sent(m.authenticate(BearerToken("alice", "at-2"))).startswith(b"g4 AUTHENTICATE XOAUTH2 ")
    [refused] = m.receive(b"g4 NO nope\r\n")
    assert "status" not in refused.reason
    m.authenticate(BearerToken("alice", "at-3"))
    actions = feed_bytewise(m, b"g5 OK Logged in\r\n")
    assert sent(actions) == b"g6 CAPABILITY\r\n"
    assert m.receive(b"* CAPABILITY " + POST_LOGIN + b"\r\ng6 OK done\r\n") == [UpstreamReady(POST_LOGIN_CAPS)]
    with pytest.raises(MisuseError):
        m.authenticate(BearerToken("alice", "again"))


def test_lazy_upstream_bye_or_stray_response_while_waiting_fails():
    m = waiting_upstream()
    f = failure(m.receive(b"* BYE Disconnected for inactivity.\r\n"))
    assert not f.permanent
    m = waiting_upstream()
    assert m.receive(b"* OK still here\r\n") == []
    failure(m.receive(b"g2 OK again\r\n"))


def test_lazy_upstream_with_preauth_is_ready_at_once():
    m = upstream(implicit_tls=True, lazy=True)
    assert m.receive(b"* PREAUTH [CAPABILITY IMAP4rev1 IDLE] hi\r\n") == [UpstreamReady(("IMAP4rev1", "IDLE"))]


def lazy_app(**kw):
    kw.setdefault("capabilities", tuple(CAPS_PLAIN.decode().split()))
    return IMAPAppSide(lazy=True, **kw)


def test_lazy_refused_command_with_literals():
    m = lazy_app()
    # A synchronizing literal is refused before the client sends it.
    assert to_app(m.receive(b"a1 APPEND INBOX {10}\r\n")).startswith(b"a1 BAD ")
    # A non-synchronizing one is read and discarded with the rest of the command.
    assert m.receive(b"a2 APPEND INBOX {10+}\r\n0123456789") == []
    assert to_app(m.receive(b"\r\na3 NOOP\r\n")) == (
        b"a2 BAD mailgw: authentication required: AUTHENTICATE XOAUTH2 or OAUTHBEARER first\r\na3 OK NOOP completed\r\n"
    )


@pytest.mark.parametrize("command", [b"a1 LOGIN {5}\r\n", b"a1 LOGIN alice {6+}\r\nsecret\r\n"])
def test_lazy_login_with_literals_is_refused_before_the_literal(command):
    m = lazy_app()
    assert to_app(m.receive(command)) == (
        b"a1 NO [CANNOT] mailgw: LOGIN carries no token: this destination needs AUTHENTICATE XOAUTH2 or OAUTHBEARER "
        b"with the refresh token or authorization code\r\n"
    )
    assert to_app(m.receive(b"a2 NOOP\r\n")) == b"a2 OK NOOP completed\r\n"
