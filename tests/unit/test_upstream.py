"""What the SMTP, IMAP and POP3 upstream machines share (mailgw/protocol/upstream.py):
STARTTLS and its injection guard, the bounds, unsolicited bytes once ready, misuse by
the glue, a lazy login the upstream cannot take.  One test per behaviour, run for each
protocol from a small table of server scripts; what only one protocol does stays in
its own test_*_machine.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import attrs
import pytest

from mailgw.protocol.actions import LoginRefused, MisuseError, SendUpstream, StartTLS, UpstreamFailed, UpstreamReady
from mailgw.protocol.credentials import BearerToken, Password
from mailgw.protocol.imap import IMAPUpstream
from mailgw.protocol.pop3 import POP3Upstream
from mailgw.protocol.refusal import Reason
from mailgw.protocol.smtp import SMTPUpstream
from mailgw.protocol.upstream import Step
from support.secretscan import Secret, assert_no_secrets
from support.wire import failure, feed_bytewise, sent, started

INJECTION = UpstreamFailed(
    "upstream sent data before the TLS handshake (possible STARTTLS injection)", permanent=True, kind=Reason.TLS
)


@dataclass(frozen=True)
class Upstream:
    """One protocol's server side of the shared steps."""

    name: str
    machine: type
    #: [(what the server says, what the machine sends)] from the greeting to STARTTLS
    to_starttls: list
    go_ahead: bytes  # the server's yes to STARTTLS
    after_tls: bytes  # what the machine sends once the handshake is done
    #: (in the go-ahead's read, in a later read): bytes no server may send before TLS
    injections: list
    starttls: str  # the command's name
    without_starttls: bytes  # a greeting and capabilities that offer PLAIN but no STARTTLS
    #: the reads after which a machine without credentials or STARTTLS is ready ...
    ready: list
    capabilities: tuple  # ... with these capabilities

    def __str__(self) -> str:
        return self.name


SMTP = Upstream(
    name="smtp", machine=SMTPUpstream, starttls="STARTTLS",
    to_starttls=[
        (b"220 mail.example.org ESMTP\r\n", b"EHLO mailgw\r\n"),
        (b"250-mail.example.org\r\n250-PIPELINING\r\n250-STARTTLS\r\n250 8BITMIME\r\n", b"STARTTLS\r\n"),
    ],
    go_ahead=b"220 go ahead\r\n", after_tls=b"EHLO mailgw\r\n",
    injections=[(b"250 injected\r\n", None), (b"2", None), (b"", b"250 injected\r\n"), (b"", b"x")],
    without_starttls=b"220 hi\r\n250-x\r\n250 AUTH PLAIN\r\n",
    ready=[b"220 hi\r\n", b"250-x\r\n250 SIZE 5\r\n"], capabilities=("SIZE 5",),
)
IMAP = Upstream(
    name="imap", machine=IMAPUpstream, starttls="STARTTLS",
    to_starttls=[(b"* OK [CAPABILITY IMAP4rev1 STARTTLS] hi\r\n", b"g1 STARTTLS\r\n")],
    go_ahead=b"g1 OK Begin TLS\r\n", after_tls=b"g2 CAPABILITY\r\n",
    injections=[
        (b"* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\n", None),  # the same read
        (b"*", None),  # even a partial line in the same read
        (b"", b"* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\n"),  # a later read before the handshake
        (b"", b"x"),
    ],
    without_starttls=b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] hi\r\n",
    ready=[b"* OK [CAPABILITY IMAP4rev1 IDLE] hi\r\n"], capabilities=("IMAP4rev1", "IDLE"),
)
POP3 = Upstream(
    name="pop3", machine=POP3Upstream, starttls="STLS",
    to_starttls=[(b"+OK hi\r\n", b"CAPA\r\n"), (b"+OK\r\nTOP\r\nSTLS\r\nUSER\r\nSASL PLAIN\r\n.\r\n", b"STLS\r\n")],
    go_ahead=b"+OK Begin TLS\r\n", after_tls=b"CAPA\r\n",
    injections=[(b"+OK injected\r\n", None), (b"+", None), (b"", b"+OK\r\n"), (b"", b".")],
    without_starttls=b"+OK hi\r\n+OK\r\nUSER\r\nSASL PLAIN\r\n.\r\n",
    ready=[b"+OK hi\r\n", b"+OK\r\nTOP\r\n.\r\n"], capabilities=("TOP",),
)

PROTOCOLS = [SMTP, IMAP, POP3]
each_protocol = pytest.mark.parametrize("p", PROTOCOLS, ids=str)


def at_starttls(p: Upstream, **kw):
    """A machine that has just asked for STARTTLS."""
    m = started(p.machine, credentials=Password("alice", "pw"), **kw)
    for server, sends in p.to_starttls:
        assert sent(m.receive(server)) == sends
    return m


def ready(p: Upstream, last_read_too: bytes = b""):
    """A machine without credentials or STARTTLS, just ready (``last_read_too`` comes in
    the read that made it so)."""
    m = started(p.machine, starttls_enable=False)
    *first, last = p.ready
    for server in first:
        assert all(isinstance(a, SendUpstream) for a in m.receive(server))
    assert m.receive(last + last_read_too) == [UpstreamReady(p.capabilities)]
    return m


@pytest.mark.parametrize("p, injection", [(p, i) for p in PROTOCOLS for i in p.injections],
                         ids=[f"{p}-{n}" for p in PROTOCOLS for n in range(len(p.injections))])
def test_bytes_before_the_tls_handshake_are_an_injection(p, injection):
    same_read, later = injection
    m = at_starttls(p)
    actions = m.receive(p.go_ahead + same_read)
    if later is None:
        assert actions == [StartTLS(), INJECTION]
    else:
        assert actions == [StartTLS()]
        assert m.receive(later) == [INJECTION]
    assert m.receive(b"more") == []


@each_protocol
def test_go_ahead_split_byte_by_byte_then_the_handshake(p):
    m = at_starttls(p)
    assert feed_bytewise(m, p.go_ahead) == [StartTLS()]
    assert sent(m.tls_established()) == p.after_tls  # what the server offers, asked again over TLS


@each_protocol
def test_starttls_required_but_not_offered(p):
    m = started(p.machine, starttls_required=True, credentials=Password("a", "b"))
    reason = f"upstream does not offer {p.starttls} and the destination requires it"
    assert failure(m.receive(p.without_starttls)) == UpstreamFailed(reason, permanent=True, kind=Reason.TLS)


@each_protocol
def test_unsolicited_bytes_once_ready_are_kept_in_order_and_bounded(p):
    m = ready(p, last_read_too=b"first line\r\nsecond")
    assert m.receive(b" line\r\n") == []
    assert m.take_pending() == b"first line\r\nsecond line\r\n"
    assert m.take_pending() == b""
    flood = UpstreamFailed("upstream sent too much unsolicited data", permanent=False, kind=Reason.PROTOCOL)
    assert m.receive(b"x" * 70000) == [flood]


@each_protocol
def test_a_line_over_the_limit_fails(p):
    m = started(p.machine, max_line=100)
    too_long = UpstreamFailed("upstream sent a line longer than 100 bytes", permanent=True, kind=Reason.PROTOCOL)
    assert m.receive(b"x" * 200) == [too_long]


@each_protocol
def test_data_before_start_or_before_the_implicit_handshake_fails(p):
    early = UpstreamFailed("upstream data before the session started", permanent=True, kind=Reason.PROTOCOL)
    assert p.machine(implicit_tls=False).receive(b"hi\r\n") == [early]
    m = p.machine(implicit_tls=True)
    assert m.start() == [StartTLS()]
    assert m.receive(b"hi\r\n") == [INJECTION]


@each_protocol
def test_glue_misuse_raises(p):
    with pytest.raises(MisuseError):
        started(p.machine).tls_established()  # no handshake was asked for
    with pytest.raises(MisuseError):
        started(p.machine).take_pending()  # not ready


@each_protocol
def test_lazy_login_the_upstream_cannot_take_fails_at_once(p):
    m = started(p.machine, starttls_enable=False, lazy=True)
    reason = "upstream offers no XOAUTH2 or OAUTHBEARER authentication (offers PLAIN)"
    assert failure(m.receive(p.without_starttls)) == UpstreamFailed(reason, permanent=True, kind=Reason.AUTH)


# -- secrets do not outlive the login ------------------------------------------------------

PASSWORD = "pw-7f3a9c2e41\u00e9"  # not ASCII: IMAP sends it as a literal
TOKEN = "at-5be01d9c77a4"
SECRETS = [Secret("password", PASSWORD, user="alice"), Secret("access token", TOKEN, user="alice")]


def held_text(obj, seen=None) -> str:
    """Every str and bytes a machine holds, however deep (its SASL plan, buffers...)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return ""
    seen.add(id(obj))
    if isinstance(obj, str):
        return obj
    if isinstance(obj, (bytes, bytearray)):
        return bytes(obj).decode("utf-8", "replace")
    if isinstance(obj, dict):
        obj = [*obj.keys(), *obj.values()]
    if isinstance(obj, (list, tuple, set)):
        return " ".join(held_text(item, seen) for item in obj)
    if attrs.has(type(obj)):
        return " ".join(held_text(getattr(obj, f.name), seen) for f in attrs.fields(type(obj)))
    if type(obj).__module__.startswith("mailgw.") and hasattr(obj, "__dict__"):
        return held_text(vars(obj), seen)
    return ""


def lazy_smtp_refused():
    m = started(SMTPUpstream, lazy=True)
    m.receive(b"220 hi\r\n")
    m.receive(b"250-x\r\n250 AUTH XOAUTH2\r\n")
    m.authenticate(BearerToken("alice", TOKEN))
    return m, m.receive(b"535 5.7.8 no\r\n")


LOGINS = {
    "smtp LOGIN ready": (SMTPUpstream, [b"220 hi\r\n", b"250-x\r\n250 AUTH LOGIN\r\n", b"334 VXNlcm5hbWU6\r\n",
                                        b"334 UGFzc3dvcmQ6\r\n", b"235 ok\r\n"]),
    "smtp PLAIN refused": (SMTPUpstream, [b"220 hi\r\n", b"250-x\r\n250 AUTH PLAIN\r\n", b"535 5.7.8 no\r\n"]),
    "pop3 PLAIN ready": (POP3Upstream, [b"+OK hi\r\n", b"+OK\r\nSASL PLAIN\r\n.\r\n", b"+OK\r\n", b"+OK\r\nTOP\r\n.\r\n"]),
    "pop3 USER refused": (POP3Upstream, [b"+OK hi\r\n", b"+OK\r\nUSER\r\n.\r\n", b"-ERR who?\r\n"]),
    "imap LOGIN literal refused": (IMAPUpstream, [b"* OK [CAPABILITY IMAP4rev1] hi\r\n", b"g1 NO no\r\n"]),
    "imap SASL-IR ready": (IMAPUpstream, [b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN] hi\r\n",
                                          b"g1 OK [CAPABILITY IMAP4rev1] in\r\n"]),
}


@pytest.mark.parametrize("login", [*LOGINS, "lazy smtp XOAUTH2 refused"])
def test_no_secret_outlives_the_login_attempt(login):
    if login in LOGINS:
        machine_class, server = LOGINS[login]
        m = started(machine_class, starttls_enable=False, credentials=Password("alice", PASSWORD))
        for line in server:
            last = m.receive(line)
    else:
        m, last = lazy_smtp_refused()
    assert isinstance(last[-1], (UpstreamReady, UpstreamFailed, LoginRefused)), last
    assert_no_secrets(held_text(m), SECRETS, f"the machine after {login}")


AWAITING_LOGIN = {  # (server lines to the lazy wait, a response nobody asked for)
    "smtp": (SMTPUpstream, [b"220 hi\r\n", b"250-x\r\n250 AUTH XOAUTH2\r\n"], b"250 hm\r\n"),
    "imap": (IMAPUpstream, [b"* OK [CAPABILITY IMAP4rev1 AUTH=XOAUTH2] hi\r\n"], b"g7 OK hm\r\n"),
    "pop3": (POP3Upstream, [b"+OK hi\r\n", b"+OK\r\nSASL XOAUTH2\r\n.\r\n"], b"+OK hm\r\n"),
}


@pytest.mark.parametrize("name", AWAITING_LOGIN)
def test_a_response_while_waiting_for_the_applications_token_fails_alike_in_every_protocol(name):
    machine_class, server, unasked = AWAITING_LOGIN[name]
    m = started(machine_class, starttls_enable=False, lazy=True)
    for line in server:
        m.receive(line)
    assert m.step is Step.AWAITING_LOGIN
    got = failure(m.receive(unasked))
    assert got.reason.startswith("upstream sent an unexpected response while waiting for the application to authenticate: ")
    assert got.reason.endswith("hm")
    assert (got.permanent, got.kind) == (False, Reason.PROTOCOL)
