"""Hostile-input properties of every sans-IO machine, shared by the CI property tests
(tests/unit/test_machine_properties.py) and the long fuzzing run (``python3 -m tests.fuzz``).

Each property drives two identical machines in lockstep: one gets every segment of
input whole, the other gets it split at arbitrary points.  Segments end where the glue
would step in (a TLS handshake, a token to log in with, an exchange's outcome).  The
properties:

- nothing but the machine's own protocol errors escapes (the upstream and application
  machines turn them into actions; SOCKS5 raises its ``SOCKSError``);
- the buffers stay bounded after every call;
- both machines return the same actions: how TCP splits bytes never matters;
- what the machines write is whole CRLF-terminated lines.
"""

from __future__ import annotations

import base64
import json

from hypothesis import strategies as st

from mailgw.protocol import sasl
from mailgw.protocol.actions import Close, ExchangeSecret, LoginRefused, Release, SendToApp, SendUpstream, StartTLS
from mailgw.protocol.actions import UpstreamAwaitingLogin, UpstreamFailed, UpstreamReady
from mailgw.protocol.appside import MAX_WAITING
from mailgw.protocol.credentials import BearerToken, Password
from mailgw.protocol.imap import IMAPAppSide, IMAPUpstream
from mailgw.protocol.pop3 import POP3AppSide, POP3Upstream
from mailgw.protocol.smtp import SMTPAppSide, SMTPUpstream
from mailgw.protocol.socks5 import SOCKS5Client, SOCKSError
from mailgw.protocol.upstream import Step

MAX_LINE = 256
FAMILIES = ("smtp", "imap", "pop3")
UPSTREAM = {"smtp": SMTPUpstream, "imap": IMAPUpstream, "pop3": POP3Upstream}
APP_SIDE = {"smtp": SMTPAppSide, "imap": IMAPAppSide, "pop3": POP3AppSide}

ERROR_CHALLENGE = base64.b64encode(json.dumps({"status": "401"}).encode())
XOAUTH2 = sasl.xoauth2_initial_response("alice", "refresh-secret")
PLAIN = sasl.plain_initial_response("alice", "pw")

#: Plausible server output per protocol; ``TAG`` becomes the IMAP machine's tag.
SERVER_LINES = {
    "smtp": [
        b"220 mail.example.org ESMTP\r\n", b"250-mail.example.org\r\n250-STARTTLS\r\n250 AUTH PLAIN LOGIN XOAUTH2\r\n",
        b"250-x\r\n250 AUTH OAUTHBEARER\r\n", b"250 x\r\n", b"220 go ahead\r\n", b"235 2.7.0 ok\r\n",
        b"334 VXNlcm5hbWU6\r\n", b"334 " + ERROR_CHALLENGE + b"\r\n", b"334 \r\n", b"535 5.7.8 no\r\n",
        b"421 4.4.2 bye\r\n", b"554 no\r\n", b"250-", b"999 x\r\n",
    ],
    "imap": [
        b"* OK ready\r\n", b"* OK [CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN SASL-IR] hi\r\n", b"* PREAUTH hi\r\n",
        b"* CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN AUTH=XOAUTH2 AUTH=OAUTHBEARER LITERAL+ STARTTLS\r\n",
        b"* CAPABILITY IMAP4rev1 LOGINDISABLED LITERAL- STARTTLS\r\n", b"* 2 FETCH (BODY[] {12}\r\nTAG OK\r\n{3}\r\n)\r\n",
        b"+ \r\n", b"+ " + ERROR_CHALLENGE + b"\r\n", b"TAG OK done\r\n", b"TAG OK [CAPABILITY IMAP4rev1 IDLE] done\r\n",
        b"TAG NO no\r\n", b"TAG BAD no\r\n", b"* BYE bye\r\n", b"* 1 EXISTS\r\n", b"{99999999999}\r\n",
    ],
    "pop3": [
        b"+OK hi\r\n", b"+OK\r\nSTLS\r\nSASL PLAIN XOAUTH2\r\nUSER\r\n.\r\n", b"+OK\r\nUSER\r\nSASL OAUTHBEARER\r\n.\r\n",
        b"+OK\r\nTOP\r\n.\r\n", b"+OK\r\n", b"-ERR no\r\n", b"+ \r\n", b"+ " + ERROR_CHALLENGE + b"\r\n", b"..x\r\n", b".\r\n",
    ],
}

#: Plausible application input per protocol (before release).
CLIENT_LINES = {
    "smtp": [
        b"EHLO app\r\n", b"HELO app\r\n", b"AUTH PLAIN " + PLAIN + b"\r\n", b"AUTH LOGIN\r\n", b"AUTH XOAUTH2\r\n",
        b"AUTH XOAUTH2 " + XOAUTH2 + b"\r\n", XOAUTH2 + b"\r\n", b"*\r\n", b"NOOP\r\n", b"RSET\r\n", b"STARTTLS\r\n",
        b"QUIT\r\n", b"MAIL FROM:<a@b>\r\n", b"x" * 300,
    ],
    "imap": [
        b"a LOGIN {5}\r\n", b"a LOGIN u {3+}\r\n", b"a LOGIN u p\r\n", b"{200}\r\n", b"{2+}\r\n", b"a AUTHENTICATE PLAIN\r\n",
        b"a AUTHENTICATE PLAIN " + PLAIN + b"\r\n", b"a AUTHENTICATE XOAUTH2 " + XOAUTH2 + b"\r\n", b"a AUTHENTICATE XOAUTH2\r\n",
        XOAUTH2 + b"\r\n", b"*\r\n", b"a CAPABILITY\r\n", b"a NOOP\r\n", b"a ID NIL\r\n", b"a SELECT INBOX\r\n", b"\r\n",
        b"a LOGOUT\r\n", b"x" * 300,
    ],
    "pop3": [
        b"CAPA\r\n", b"USER u\r\n", b"PASS p\r\n", b"APOP u d\r\n", b"AUTH\r\n", b"AUTH PLAIN\r\n", b"AUTH PLAIN " + PLAIN + b"\r\n",
        b"AUTH XOAUTH2 " + XOAUTH2 + b"\r\n", b"AUTH XOAUTH2\r\n", XOAUTH2 + b"\r\n", b"*\r\n", b"STLS\r\n", b"LIST\r\n",
        b"QUIT\r\n", b"\r\n", b"x" * 300,
    ],
}

CREDENTIALS = st.sampled_from([None, Password("a", "p\xe4ss\"\\"), Password("a", "p\nq\0"), BearerToken("a", "tok")])


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` split at ``cuts`` (positions taken modulo its length)."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0] + points, points + [len(data)])]


def segments(lines: list[bytes]):
    """Segments of input: plausible lines joined, with arbitrary bytes mixed in."""
    line = st.one_of(*[st.sampled_from(lines)] * 3, st.binary(max_size=60))
    return st.lists(st.lists(line, min_size=1, max_size=4).map(b"".join), max_size=12)


CUTS = st.lists(st.lists(st.integers(min_value=0), max_size=6), max_size=12)


# -- upstream machines -----------------------------------------------------------------------


def _upstream_glue(machine, actions: list) -> list:
    """What the session does between segments: finish a handshake, log in when asked."""
    if machine.step is Step.TLS_HANDSHAKE and any(isinstance(a, StartTLS) for a in actions):
        return machine.tls_established()
    if machine.step is Step.AWAITING_LOGIN and actions and isinstance(actions[-1], (UpstreamAwaitingLogin, LoginRefused)):
        return machine.authenticate(BearerToken("alice", "access-secret"))
    return []


def _check_upstream_actions(machine, actions: list) -> None:
    for action in actions:
        assert isinstance(action, (SendUpstream, StartTLS, UpstreamReady, UpstreamFailed, UpstreamAwaitingLogin, LoginRefused))
        if isinstance(action, SendUpstream):
            assert action.data.endswith(b"\r\n"), action.data
    if any(isinstance(a, UpstreamFailed) for a in actions):
        assert isinstance(actions[-1], UpstreamFailed)
    if machine.step is not Step.FAILED:
        assert machine.buffered <= MAX_LINE + 2 + machine.PENDING_LIMIT


def upstream_property(family: str, options: dict, data: list[bytes], cuts: list[list[int]]) -> None:
    """Server bytes, whole and split, give the same actions; nothing foreign escapes."""
    whole = UPSTREAM[family](max_line=MAX_LINE, **options)
    split = UPSTREAM[family](max_line=MAX_LINE, **options)
    a, b = whole.start(), split.start()
    assert a == b
    a += _upstream_glue(whole, a) if options.get("implicit_tls") else []
    b += _upstream_glue(split, b) if options.get("implicit_tls") else []
    for index, segment in enumerate(data):
        if whole.step is Step.FAILED:
            return
        tag = getattr(whole, "_tag", b"g1")
        segment = segment.replace(b"TAG", tag)
        a = whole.receive(segment)
        b = [action for piece in pieces(segment, cuts[index] if index < len(cuts) else []) for action in split.receive(piece)]
        assert a == b
        _check_upstream_actions(whole, a)
        a, b = _upstream_glue(whole, a), _upstream_glue(split, b)
        assert a == b
        _check_upstream_actions(whole, a)
    assert whole.receive_eof() == split.receive_eof()


def upstream_options():
    return st.fixed_dictionaries({
        "implicit_tls": st.booleans(),
        "starttls_enable": st.booleans(),
        "starttls_required": st.booleans(),
        "credentials": CREDENTIALS,
        "lazy": st.booleans(),
    })


# -- application-side machines ---------------------------------------------------------------


def _app_glue(machine, actions: list, outcome: str) -> list:
    """The session's answer to an ExchangeSecret at the end of a segment."""
    if actions and isinstance(actions[-1], ExchangeSecret):
        if outcome == "ok":
            return machine.auth_succeeded(("IDLE", "PIPELINING"))
        return machine.auth_refused("upstream refused the credentials", transient=outcome == "later")
    return []


def _check_app_actions(machine, actions: list, received: bytes) -> bool:
    """Checks one call's actions; True when the dialogue is over (released or closed)."""
    for action in actions:
        assert isinstance(action, (SendToApp, ExchangeSecret, Release, Close))
        if isinstance(action, SendToApp):
            assert action.data.endswith(b"\r\n") and b"\n" not in action.data.replace(b"\r\n", b""), action.data
        if isinstance(action, Release):
            # The leftover is what the application sent last: nothing lost or reordered.
            assert received.replace(b"\r\n", b"\n").endswith(action.leftover.replace(b"\r\n", b"\n"))
    assert machine.buffered <= max(MAX_LINE + 2, MAX_WAITING)
    return any(isinstance(a, (Release, Close)) for a in actions)


def _feed_split(machine, chunks: list[bytes]) -> list:
    """Feed ``chunks`` one by one as the glue would: after a release the rest goes to
    the upstream with the leftover, after a close nowhere."""
    actions: list = []
    for index, chunk in enumerate(chunks):
        actions += machine.receive(chunk)
        if actions and isinstance(actions[-1], Release):
            rest = b"".join(chunks[index + 1:])
            return actions[:-1] + [Release(actions[-1].leftover + rest)]
        if actions and isinstance(actions[-1], Close):
            return actions
    return actions


def app_property(family: str, lazy: bool, data: list[bytes], cuts: list[list[int]], outcomes: list[str]) -> None:
    """Application bytes, whole and split, give the same actions; nothing escapes."""
    whole = APP_SIDE[family](capabilities=("PIPELINING", "STARTTLS", "AUTH PLAIN"), max_line=MAX_LINE, lazy=lazy)
    split = APP_SIDE[family](capabilities=("PIPELINING", "STARTTLS", "AUTH PLAIN"), max_line=MAX_LINE, lazy=lazy)
    received = b""
    for index, segment in enumerate(data):
        received += segment
        a = whole.receive(segment)
        b = _feed_split(split, pieces(segment, cuts[index] if index < len(cuts) else []))
        assert a == b
        if _check_app_actions(whole, a, received):
            return
        outcome = outcomes[index % len(outcomes)] if outcomes else "ok"
        a, b = _app_glue(whole, a, outcome), _app_glue(split, b, outcome)
        assert a == b
        if _check_app_actions(whole, a, received):
            return


# -- SOCKS5 ------------------------------------------------------------------------------------

SOCKS_METHODS = st.sampled_from([
    {"method": "none"},
    {"method": "userpass", "username": "user", "password": "proxy-secret"},
    {"method": "sap", "jwt": "jwt.secret.token", "location_id": "loc"},
])
PROXY_BYTES = st.lists(st.one_of(
    st.binary(max_size=300),
    st.sampled_from([b"\x05\x00", b"\x05\x02", b"\x05\x80", b"\x01\x00", b"\x01\x01", b"\x05\x00\x00\x01" + b"\x7f\x00\x00\x01\x00\x19",
                     b"\x05\x00\x00\x03\x03abc\x00\x19", b"\x05\x00\x00\x04" + b"\x01" * 18, b"\x05\x05\x00\x01", b"\xff"]),
), max_size=8)


def socks_property(options: dict, data: list[bytes], cuts: list[list[int]]) -> None:
    """Proxy bytes, whole or split: only SOCKSError escapes, naming no secret, and the
    buffer stays bounded.  (Unlike the mail machines, the SOCKS5 machine refuses bytes
    a proxy sends before our next request, so where a split falls can legitimately
    change the outcome; every split of a *valid* conversation connecting the same way is
    tests/unit/test_socks5_machine.py's property.)"""
    for chunk_lists in ([[segment] for segment in data], [pieces(s, cuts[i] if i < len(cuts) else []) for i, s in enumerate(data)]):
        machine = SOCKS5Client("mail.example.org", 25, **options)
        machine.start()
        try:
            for chunk in (chunk for chunks in chunk_lists for chunk in chunks):
                if machine.connected:
                    break
                machine.receive(chunk)
                assert machine.buffered <= 1024
        except SOCKSError as e:
            for secret in ("proxy-secret", "jwt.secret.token"):
                assert secret not in str(e)


# -- SASL decoders -------------------------------------------------------------------------------


def sasl_property(mechanism: str, response: bytes) -> None:
    """A SASL response decodes or raises SASLError, whose text never holds the payload."""
    try:
        decoded = sasl.decode_initial_response(mechanism, response)
    except sasl.SASLError as e:
        # (a short payload may happen to spell a word of the message, like "AUTH")
        payload = response.strip().decode("latin-1")
        assert len(payload) < 16 or payload not in str(e)
        return
    assert decoded.secret not in repr(decoded)
