"""What the SMTP, IMAP and POP3 application-side machines share (mailgw/protocol/appside.py):
the local login dialogue, the lazy OAuth2 flow, the bounds, the refusals.  One test per
behaviour, run for each protocol from a small table of how it writes commands and
replies.  What only one protocol does stays in its own test_*_machine.py.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

import pytest

from mailgw.protocol.actions import Close, ExchangeSecret, MisuseError, Release, SendToApp
from mailgw.protocol.imap import IMAPAppSide
from mailgw.protocol.pop3 import POP3AppSide
from mailgw.protocol.smtp import SMTPAppSide
from support.wire import feed_bytewise, to_app, xoauth2

CRLF = b"\r\n"
NO_TOKEN = b" carries no token: this destination needs %s XOAUTH2 or OAUTHBEARER with the refresh token or authorization code\r\n"

#: The replies of the shared dialogue, one row a reply, one column a protocol: SMTP,
#: IMAP (written without the tag) and POP3.
REPLIES = {
    "prompt": (b"334 ", b"+ ", b"+ "),  # a continuation, before its challenge
    "done": (b"235 2.7.0 Authentication successful\r\n", b"OK AUTHENTICATE completed\r\n", b"+OK Logged in.\r\n"),
    "no_mechanism": (b"501 5.5.4 Syntax: AUTH mechanism\r\n", b"BAD AUTHENTICATE needs a mechanism\r\n", b"+OK\r\nPLAIN\r\n.\r\n"),
    "cancelled": (
        b"501 5.7.0 Authentication cancelled\r\n", b"BAD AUTHENTICATE cancelled\r\n", b"-ERR Authentication cancelled\r\n",
    ),
    "need_auth": (  # a command before the lazy login
        b"530 5.7.0 Authentication required\r\n",
        b"BAD mailgw: authentication required: AUTHENTICATE XOAUTH2 or OAUTHBEARER first\r\n",
        b"-ERR [AUTH] Authentication required\r\n",
    ),
    "no_token": (b"504 5.5.4 mailgw: ", b"NO [CANNOT] mailgw: ", b"-ERR [AUTH] mailgw: "),  # a password login, lazy
    "refused": (b"535 5.7.8 mailgw: ", b"NO [AUTHENTICATIONFAILED] mailgw: ", b"-ERR [AUTH] mailgw: "),
    "unavailable": (b"454 4.7.0 mailgw: ", b"NO [UNAVAILABLE] mailgw: ", b"-ERR [SYS/TEMP] mailgw: "),
    "malformed": tuple(
        start + b"malformed authentication response: " for start in (b"501 5.5.2 mailgw: ", b"BAD mailgw: ", b"-ERR mailgw: ")
    ),
    "goodbye": (b"421 4.3.2 mailgw: ", b"* BYE mailgw: ", b"-ERR mailgw: "),
    "too_long": (b"500 5.5.6 mailgw: ", b"* BYE mailgw: ", b"-ERR mailgw: "),
    "refusal": (b"554 5.3.0 mailgw: ", b"* BYE mailgw: ", b"-ERR mailgw: "),
    "transient_refusal": (b"421 4.3.0 mailgw: ", b"* BYE mailgw: ", b"-ERR mailgw: "),
}


def replies(column: int) -> dict:
    return {name: row[column] for name, row in REPLIES.items()}


@dataclass(frozen=True)
class Protocol:
    """One protocol's side of the shared dialogue: how it writes commands, what the
    tests send and what they expect.  Commands and replies are written without the IMAP
    tag: :meth:`line` and :meth:`reply` add ``a<n> `` for IMAP."""

    name: str
    machine: type
    tagged: bool
    auth: bytes  # the SASL login command
    #: lazy: the upstream's capabilities before and after the login
    lazy_capabilities: tuple[str, ...]
    after_capabilities: tuple[str, ...]
    lazy_greeting: bytes
    advertise: list  # lazy: [(line, reply)] showing XOAUTH2 and OAUTHBEARER only
    pipelined: list  # commands an application pipelines after its AUTH (tagged from a2)
    logged_in: bytes  # the reply to the lazy login, with after_capabilities
    after_login: list  # [(line, actions)] once logged in
    need_auth_commands: list  # refused before the login (REPLIES["need_auth"])
    still_local: list  # [(line, reply)] still answered before the login (the last may close)
    password_logins: list  # [(command, what)]: refused, they carry no token
    # REPLIES, this protocol's column
    prompt: bytes
    done: bytes
    no_mechanism: bytes
    cancelled: bytes
    need_auth: bytes
    no_token: bytes
    refused: bytes  # auth_refused(): permanent ...
    unavailable: bytes  # ... and transient
    malformed: bytes
    goodbye: bytes
    too_long: bytes
    refusal: bytes
    transient_refusal: bytes

    def __str__(self) -> str:
        return self.name

    @property
    def continuation(self) -> bytes:
        return self.prompt + CRLF

    def tag(self, n: int) -> bytes:
        return b"a%d " % n if self.tagged else b""

    def line(self, n: int, command: bytes) -> bytes:
        return self.tag(n) + command + CRLF

    def reply(self, n: int, text: bytes) -> bytes:
        return self.tag(n) + text

    def login(self, n: int, mechanism: bytes = b"", response: bytes = b"") -> bytes:
        return self.line(n, b" ".join(part for part in (self.auth, mechanism, response) if part))

    def lazy_app(self) -> object:
        return self.machine(lazy=True, capabilities=self.lazy_capabilities)

    def app(self, **kw) -> object:
        return self.machine(**kw)


SMTP = Protocol(
    name="smtp", machine=SMTPAppSide, tagged=False, auth=b"AUTH",
    lazy_capabilities=("PIPELINING", "STARTTLS", "AUTH PLAIN XOAUTH2", "SIZE 1000"),
    after_capabilities=("SIZE 5",),
    lazy_greeting=b"220 mailgw ESMTP mailgw ready\r\n",
    advertise=[(b"EHLO client\r\n", b"250-mailgw\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250 AUTH XOAUTH2 OAUTHBEARER\r\n")],
    pipelined=[b"MAIL FROM:<a@b>", b"RCPT TO:<c@d>", b"DATA"],
    logged_in=b"235 2.7.0 Authentication successful\r\n",
    after_login=[
        (b"EHLO c\r\n", [SendToApp(b"250-mailgw\r\n250-SIZE 5\r\n250 AUTH XOAUTH2 OAUTHBEARER\r\n")]),
        (b"AUTH XOAUTH2 abc\r\n", [SendToApp(b"503 5.5.1 Already authenticated\r\n")]),
        (b"MAIL FROM:<a@b>\r\n", [Release(b"MAIL FROM:<a@b>\r\n")]),
    ],
    need_auth_commands=[b"MAIL FROM:<a@b>", b"RCPT TO:<a@b>", b"DATA", b"BDAT 10 LAST", b"VRFY x", b"XYZZY"],
    still_local=[(b"NOOP\r\nRSET\r\n", b"250 2.0.0 OK\r\n" * 2)],
    password_logins=[(b"AUTH PLAIN AGFsaWNlAHB3", b"this mechanism"), (b"AUTH LOGIN", b"this mechanism"),
                     (b"AUTH CRAM-MD5", b"this mechanism")],
    **replies(0),
)

IMAP_LAZY_CAPS = "IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ STARTTLS LOGINDISABLED"
IMAP_AFTER_CAPS = "IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE SORT THREAD=REFERENCES MOVE LITERAL+"
#: What the gateway lists after the login: the upstream's, less SASL-IR and AUTH=.
IMAP_LISTED = b"IMAP4rev1 LOGIN-REFERRALS ID ENABLE IDLE SORT THREAD=REFERENCES MOVE LITERAL+"

IMAP = Protocol(
    name="imap", machine=IMAPAppSide, tagged=True, auth=b"AUTHENTICATE",
    lazy_capabilities=tuple(IMAP_LAZY_CAPS.split()),
    after_capabilities=tuple(IMAP_AFTER_CAPS.split()),
    lazy_greeting=(
        b"* OK [CAPABILITY IMAP4rev1 LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ SASL-IR LOGINDISABLED AUTH=XOAUTH2 "
        b"AUTH=OAUTHBEARER] mailgw ready\r\n"
    ),
    advertise=[(
        b"a CAPABILITY\r\n",
        b"* CAPABILITY IMAP4rev1 LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ SASL-IR LOGINDISABLED AUTH=XOAUTH2 "
        b"AUTH=OAUTHBEARER\r\na OK CAPABILITY completed\r\n",
    )],
    pipelined=[b"SELECT INBOX", b"FETCH 1 BODY[]", b"LOGOUT"],
    logged_in=b"OK [CAPABILITY " + IMAP_LISTED + b"] AUTHENTICATE completed\r\n",
    after_login=[
        (b"b CAPABILITY\r\n", [SendToApp(b"* CAPABILITY " + IMAP_LISTED + b"\r\nb OK CAPABILITY completed\r\n")]),
        (b"c NOOP\r\n", [SendToApp(b"c OK NOOP completed\r\n")]),
        # After the login, LOGIN / AUTHENTICATE go to the upstream, which answers them.
        (b"d AUTHENTICATE XOAUTH2\r\n", [Release(b"d AUTHENTICATE XOAUTH2\r\n")]),
    ],
    need_auth_commands=[b"SELECT INBOX", b'LIST "" "*"', b"FETCH 1 BODY[]", b"ENABLE IDLE", b"XYZZY"],
    still_local=[(b"b NOOP\r\nc ID NIL\r\n", b"b OK NOOP completed\r\n* ID NIL\r\nc OK ID completed\r\n")],
    password_logins=[(b"LOGIN alice secret", b"LOGIN"), (b"AUTHENTICATE PLAIN AGFAYg==", b"this mechanism"),
                     (b"AUTHENTICATE LOGIN", b"this mechanism")],
    **replies(1),
)

POP3 = Protocol(
    name="pop3", machine=POP3AppSide, tagged=False, auth=b"AUTH",
    lazy_capabilities=("CAPA", "TOP", "UIDL", "STLS", "USER", "SASL PLAIN"),
    after_capabilities=("CAPA", "TOP", "UIDL", "RESP-CODES", "PIPELINING"),
    lazy_greeting=b"+OK mailgw ready\r\n",
    advertise=[
        (b"CAPA\r\n", b"+OK Capability list follows\r\nCAPA\r\nTOP\r\nUIDL\r\nSASL XOAUTH2 OAUTHBEARER\r\n.\r\n"),
        (b"AUTH\r\n", b"+OK\r\nXOAUTH2\r\nOAUTHBEARER\r\n.\r\n"),
    ],
    pipelined=[b"STAT", b"RETR 1", b"QUIT"],
    logged_in=b"+OK Logged in.\r\n",
    after_login=[
        (b"CAPA\r\n", [SendToApp(b"+OK Capability list follows\r\nCAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\n.\r\n")]),
        (b"USER x\r\n", [Release(b"USER x\r\n")]),  # the upstream answers that now
    ],
    need_auth_commands=[b"STAT", b"LIST", b"RETR 1", b"UIDL", b"NOOP", b"DELE 1", b"XYZZY"],
    still_local=[(b"QUIT\r\n", b"+OK mailgw signing off\r\n")],
    password_logins=[(b"USER alice", b"USER"), (b"PASS secret", b"PASS"), (b"APOP alice 0123", b"APOP"),
                     (b"AUTH PLAIN AGFAYg==", b"this mechanism"), (b"AUTH LOGIN", b"this mechanism")],
    **replies(2),
)

PROTOCOLS = [SMTP, IMAP, POP3]
each_protocol = pytest.mark.parametrize("p", PROTOCOLS, ids=str)


def per_protocol(attribute: str):
    """Parametrise over ``(p, item)`` for every item of every protocol's ``attribute``."""
    cases = [(p, item) for p in PROTOCOLS for item in getattr(p, attribute)]
    ids = [f"{p}-{i}" for p in PROTOCOLS for i in range(len(getattr(p, attribute)))]
    return pytest.mark.parametrize("p, item", cases, ids=ids)


def b64(text: bytes) -> bytes:
    return base64.b64encode(text)


#: (mechanism, response, why the gateway says it is malformed)
MALFORMED = [
    (b"XOAUTH2", b"not base64!", b"response is not valid base64"),
    (b"XOAUTH2", b"=", b"XOAUTH2: empty message"),
    (b"XOAUTH2", b64(b"user=alice\x01\x01"), b"XOAUTH2: missing auth"),
    (b"XOAUTH2", b64(b"auth=Bearer x\x01\x01"), b"XOAUTH2: missing user"),
    (b"XOAUTH2", b64(b"user=alice\x01auth=Basic x\x01\x01"), b"XOAUTH2: auth is not a Bearer credential"),
    (b"XOAUTH2", b64(b"user=alice\x01auth=Bearer \x01\x01"), b"XOAUTH2: empty bearer token"),
    (b"OAUTHBEARER", b"not base64!", b"response is not valid base64"),
    (b"OAUTHBEARER", b"=", b"OAUTHBEARER: empty message"),
    (b"OAUTHBEARER", b64(b"user=alice\x01\x01"), b"OAUTHBEARER: malformed GS2 header"),
    (b"OAUTHBEARER", b64(b"n,,\x01auth=Bearer\x01\x01"), b"OAUTHBEARER: auth is not a Bearer credential"),
    (b"OAUTHBEARER", b64(b"p=tls-unique,,\x01auth=Bearer x\x01\x01"), b"OAUTHBEARER: unsupported channel binding flag"),
]


# -- eager: the gateway answers the application's login itself ---------------------------


#: Login dialogues the gateway answers itself: the mechanism and initial response, then
#: for each challenge the application's response.  Whatever the application says logs
#: it in: the upstream login is the gateway's.
USERNAME, PASSWORD = b"VXNlcm5hbWU6", b"UGFzc3dvcmQ6"  # LOGIN's challenges
DIALOGUES = {
    "plain": (b"PLAIN AGFsaWNlAHB3", []),
    "plain, empty initial response": (b"PLAIN =", []),
    "plain after a prompt": (b"PLAIN", [(b"", b"AGFsaWNlAHB3")]),
    "login": (b"LOGIN", [(USERNAME, b"YWxpY2U="), (PASSWORD, b"cHc=")]),
    "login with the user name": (b"LOGIN YWxpY2U=", [(PASSWORD, b"cHc=")]),
    "cram-md5": (b"CRAM-MD5", [(b"", b"whatever")]),
    "xoauth2": (b"XOAUTH2 dXNlcj1h", []),
    # A response that looks like a command (or a literal) is still just the response.
    "a command as response": (b"PLAIN", [(b"", b"LIST")]),
    "a literal as response": (b"PLAIN", [(b"", b"b SELECT {5}")]),
}


@pytest.mark.parametrize("arguments, prompts", DIALOGUES.values(), ids=DIALOGUES)
@each_protocol
def test_login_dialogue_answered_locally(p, arguments, prompts):
    m = p.app()
    line = p.login(1, arguments)
    for challenge, response in prompts:
        assert to_app(m.receive(line)) == p.prompt + challenge + CRLF
        line = response + CRLF
    assert to_app(m.receive(line)) == p.reply(1, p.done)


@each_protocol
def test_commands_and_mechanisms_are_not_case_sensitive(p):
    m = p.app()
    assert to_app(m.receive(p.tag(1) + p.auth.lower() + b" xoauth2 dXNlcj1h\r\n")) == p.reply(1, p.done)


@each_protocol
def test_login_cancelled_or_without_mechanism(p):
    m = p.app()
    assert to_app(m.receive(p.login(1, b"PLAIN"))) == p.continuation
    assert to_app(m.receive(b"*\r\n")) == p.reply(1, p.cancelled)
    assert to_app(m.receive(p.login(2))) == p.reply(2, p.no_mechanism)


@each_protocol
def test_line_too_long_closes(p):
    m = p.app(max_line=100)
    actions = m.receive(p.line(1, b"NOOP " + b"x" * 200)[:-2])
    assert to_app(actions) == p.too_long + b"command line too long (limit 100 bytes)\r\n"
    assert actions[-1] == Close("application command line too long")
    assert m.receive(b"\r\nNOOP\r\n") == []


@each_protocol
def test_refusal_and_goodbye_are_one_printable_line(p):
    dialect = p.machine.dialect
    assert dialect.refusal("destination x: boom", permanent=True) == p.refusal + b"destination x: boom\r\n"
    assert dialect.refusal("slow", permanent=False) == p.transient_refusal + b"slow\r\n"
    assert dialect.refusal("bad\r\nINJECT") == p.refusal + b"bad??INJECT\r\n"
    assert dialect.reply("goodbye", text="idle timeout") == p.goodbye + b"idle timeout\r\n"
    assert dialect.reply("goodbye", text="drain\r\nRCPT TO:<x@y>") == p.goodbye + b"drain??RCPT TO:<x@y>\r\n"
    assert dialect.reply("goodbye", text="é\r\n") == p.goodbye + b"????\r\n"


# -- lazy OAuth2 types: the application presents its refresh token or code ---------------


@each_protocol
def test_lazy_greeting_and_capabilities_advertise_bearer_mechanisms_only(p):
    m = p.lazy_app()
    assert m.greeting() == p.lazy_greeting
    for line, reply in p.advertise:
        assert to_app(m.receive(line)) == reply


@each_protocol
def test_lazy_login_inline_exchanges_then_releases_pipelined_commands(p):
    m = p.lazy_app()
    *first, last = [p.line(n, command) for n, command in enumerate(p.pipelined, start=2)]
    [exchange] = m.receive(p.login(1, b"XOAUTH2", xoauth2("alice", "rt-secret")) + b"".join(first))
    assert exchange == ExchangeSecret("XOAUTH2", "alice", "rt-secret")
    assert "rt-secret" not in repr(exchange)
    assert m.receive(last) == []  # waits for the outcome
    assert m.auth_succeeded(p.after_capabilities) == [SendToApp(p.reply(1, p.logged_in)), Release(b"".join(first) + last)]
    with pytest.raises(MisuseError):
        m.receive(b"more")


@each_protocol
def test_lazy_login_after_continuation_split_bytewise_with_oauthbearer(p):
    m = p.lazy_app()
    assert to_app(feed_bytewise(m, p.login(1, b"OAUTHBEARER"))) == p.continuation
    response = base64.b64encode(b"n,a=bob,\x01host=x\x01port=25\x01auth=Bearer code-1\x01\x01") + CRLF
    assert feed_bytewise(m, response) == [ExchangeSecret("OAUTHBEARER", "bob", "code-1")]
    assert m.auth_succeeded(p.after_capabilities) == [SendToApp(p.reply(1, p.logged_in))]
    for line, actions in p.after_login:
        assert m.receive(line) == actions


@each_protocol
def test_lazy_refusals_keep_the_session_for_a_retry(p):
    m = p.lazy_app()
    m.receive(p.login(1, b"XOAUTH2", xoauth2("alice", "revoked")))
    assert to_app(m.auth_refused("token service: invalid_grant")) == (
        p.reply(1, p.refused + b"token service: invalid_grant\r\n")
    )
    m.receive(p.login(2, b"XOAUTH2", xoauth2("alice", "x")))
    assert to_app(m.auth_refused("unreachable", transient=True)) == p.reply(2, p.unavailable + b"unreachable\r\n")
    assert to_app(m.receive(p.line(3, p.need_auth_commands[0]))) == p.reply(3, p.need_auth)
    # Commands and mechanisms are not case-sensitive.
    retry = p.line(4, p.auth.lower() + b" xoauth2 " + xoauth2("alice", "good"))
    assert m.receive(retry) == [ExchangeSecret("XOAUTH2", "alice", "good")]
    assert to_app(m.auth_succeeded(p.after_capabilities)) == p.reply(4, p.logged_in)


@per_protocol("need_auth_commands")
def test_lazy_commands_before_the_login_are_refused(p, item):
    m = p.lazy_app()
    assert to_app(m.receive(p.line(1, item))) == p.reply(1, p.need_auth)
    for line, reply in p.still_local:
        assert to_app(m.receive(line)) == reply


@per_protocol("password_logins")
def test_lazy_password_logins_are_refused_clearly(p, item):
    command, what = item
    m = p.lazy_app()
    assert to_app(m.receive(p.line(1, command))) == p.reply(1, p.no_token + what + NO_TOKEN % p.auth)
    for line, reply in p.still_local:
        assert to_app(m.receive(line)) == reply


@pytest.mark.parametrize("mechanism, response, why", MALFORMED)
@each_protocol
def test_lazy_malformed_responses_are_refused_without_the_response(p, mechanism, response, why):
    m = p.lazy_app()
    assert to_app(m.receive(p.login(1, mechanism, response))) == p.reply(1, p.malformed + why + CRLF)
    assert to_app(m.receive(p.login(2, b"XOAUTH2"))) == p.continuation
    assert to_app(m.receive(b"*\r\n")) == p.reply(2, p.cancelled)
    for line, reply in p.still_local:
        assert to_app(m.receive(line)) == reply


@each_protocol
def test_lazy_flood_while_waiting_closes(p):
    m = p.lazy_app()
    m.receive(p.login(1, b"XOAUTH2", xoauth2("alice", "rt")))
    actions = m.receive(b"x" * 70000)
    assert actions == [
        SendToApp(p.goodbye + b"sent too much data during authentication\r\n"),
        Close("application sent too much data during authentication"),
    ]
    assert m.receive(b"more") == []
