"""OAuth2 through the gateway: a real Dovecot whose oauth2 passdb introspects the test
token service (tests/tokenservice.py).

Eager client credentials (SMTP, IMAP, POP3: the application never authenticates) and
the lazy types, where the application presents a refresh token or authorisation code
with XOAUTH2 / OAUTHBEARER and the gateway exchanges it (SMTP submission, IMAP, POP3,
plain with STARTTLS and implicit TLS).
"""

from __future__ import annotations

import base64
import imaplib
import poplib
import smtplib
import socket
import subprocess
import time
import uuid

import pytest
from support.clients import imap_without_login
from support.skips import require_or_skip

import realservers
from gatewayharness import LogCapture, start_gateway
import tokenservice
from support.destinations import mail
from support.reactor import wait_for

CLIENT_ID, CLIENT_SECRET = "mailgw-client", "cs-" + uuid.uuid4().hex
CC, RT, AC = "OAuth2ClientCredentials", "OAuth2RefreshToken", "OAuth2AuthorizationCode"


@pytest.fixture(scope="module")
def tokens():
    with tokenservice.running(clients={CLIENT_ID: CLIENT_SECRET}, cc_usernames={CLIENT_ID: "alice"}) as service:
        yield service


@pytest.fixture(autouse=True)
def normal_token_service(tokens):
    yield
    tokens.delay, tokens.refuse_all, tokens.expires_in = 0.0, False, 3600


@pytest.fixture(scope="module")
def oauth_dovecot(tmp_path_factory, certs, smtp_sink, tokens):
    workdir, relay = tmp_path_factory.mktemp("dovecot-oauth"), (smtp_sink.host, smtp_sink.port)
    with realservers.oauth_dovecot(workdir, certs, relay, tokens.introspection_url) as server:
        server.seed("alice", realservers.SEED_MESSAGE)
        yield server


def oauth_dest(name, authentication, protocol, port, certs, tokens, **extra):
    return mail(
        name, protocol, port, authentication=authentication, password=None, ca=certs.ca_pem,
        **{"tokenServiceURL": tokens.token_url, "clientId": CLIENT_ID, "clientSecret": CLIENT_SECRET,
           "tokenServiceURLType": "Dedicated", **extra},
    )


def cc_dest(name, protocol, port, certs, tokens, **extra):
    return oauth_dest(name, CC, protocol, port, certs, tokens, **extra)


@pytest.fixture(scope="module")
def gw(oauth_dovecot, certs, tokens, reactor, tmp_path_factory):
    """One gateway for the module: a listener per destination, ``gw.by_name[name]``."""
    dv = oauth_dovecot
    down = f"http://127.0.0.1:{realservers.free_port()}/oauth/token"
    destinations = [
        cc_dest("cc-imap", "imap4", dv.imap_port, certs, tokens, **{"mail.imap4.starttls.required": "true"}),
        cc_dest("cc-imaps", "imap4s", dv.imaps_port, certs, tokens),
        cc_dest("cc-pop3", "pop3", dv.pop3_port, certs, tokens, **{"mail.pop3.starttls.required": "true"}),
        cc_dest("cc-pop3s", "pop3s", dv.pop3s_port, certs, tokens),
        oauth_dest("rt-smtp", RT, "smtp", dv.submission_port, certs, tokens, **{"mail.smtp.starttls.required": "true"}),
        oauth_dest("rt-imap", RT, "imap4", dv.imap_port, certs, tokens, **{"mail.imap4.starttls.required": "true"}),
        oauth_dest("rt-imaps", RT, "imap4s", dv.imaps_port, certs, tokens),
        oauth_dest("rt-pop3", RT, "pop3", dv.pop3_port, certs, tokens, **{"mail.pop3.starttls.required": "true"}),
        oauth_dest("rt-pop3s", RT, "pop3s", dv.pop3s_port, certs, tokens),
        oauth_dest("ac-smtp", AC, "smtp", dv.submission_port, certs, tokens, **{"mail.smtp.starttls.required": "true"}),
        oauth_dest("ac-smtps", AC, "smtps", dv.submissions_port, certs, tokens),
        oauth_dest("ac-imaps", AC, "imap4s", dv.imaps_port, certs, tokens),
        oauth_dest("ac-pop3s", AC, "pop3s", dv.pop3s_port, certs, tokens),
        oauth_dest("rt-badclient-smtp", RT, "smtp", dv.submission_port, certs, tokens, clientSecret="wrong-" + uuid.uuid4().hex),
        oauth_dest("rt-down-smtp", RT, "smtp", dv.submission_port, certs, tokens, tokenServiceURL=down),
        oauth_dest("rt-down-imaps", RT, "imap4s", dv.imaps_port, certs, tokens, tokenServiceURL=down),
        oauth_dest("rt-down-pop3s", RT, "pop3s", dv.pop3s_port, certs, tokens, tokenServiceURL=down),
    ]
    running = start_gateway({"destinations": destinations}, tmp_path_factory.mktemp("gw-oauth"))
    yield running
    running.stop()


def new_refresh_token(tokens, user="alice"):
    token = "rt-" + uuid.uuid4().hex
    tokens.add_refresh_token(token, user)
    return token


def new_code(tokens, user="alice"):
    code = "code-" + uuid.uuid4().hex
    tokens.add_code(code, user)
    return code


def requests_for(tokens, secret) -> int:
    """Token requests that presented ``secret`` (a refresh token or code)."""
    with tokens._lock:
        return sum(1 for r in tokens.requests if secret in (r.form.get("refresh_token"), r.form.get("code")))


def xoauth2(secret, user="alice") -> bytes:
    return base64.b64encode(f"user={user}\x01auth=Bearer {secret}\x01\x01".encode())


def oauthbearer(secret, user="alice") -> bytes:
    return base64.b64encode(f"n,a={user},\x01auth=Bearer {secret}\x01\x01".encode())


# -- a raw client for each protocol ------------------------------------------------------


class Raw:
    """A line-oriented client on a raw socket; ``reply()`` reads one complete reply."""

    TAG = b"t1"

    def __init__(self, address, protocol):
        self.protocol = protocol
        self.sock = socket.create_connection(address, timeout=30)
        self.file = self.sock.makefile("rb")
        self.greeting = self.reply()
        self.received = self.greeting

    def close(self):
        self.file.close()
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def reply(self, multiline=False) -> bytes:
        lines = []
        while True:
            line = self.file.readline()
            assert line, f"connection closed after {b''.join(lines)!r}"
            lines.append(line)
            if self.protocol == "smtp" and line[3:4] != b"-":
                break
            if self.protocol == "imap" and (line.startswith((self.TAG + b" ", b"+")) or not self.__dict__.get("greeting")):
                break
            if self.protocol == "pop3" and (not multiline or line == b".\r\n" or line.startswith(b"-ERR")):
                break
        data = b"".join(lines)
        if hasattr(self, "received"):
            self.received += data
        return data

    def command(self, text: bytes, multiline=False) -> bytes:
        if self.protocol == "imap" and not text.startswith(b"+"):
            text = self.TAG + b" " + text
        self.sock.sendall(text.lstrip(b"+") + b"\r\n")
        return self.reply(multiline)

    def last(self, data: bytes) -> bytes:
        return data.splitlines()[-1]

    # protocol-neutral steps

    def auth(self, mechanism: str, response: bytes, inline=True) -> bytes:
        verb = b"AUTHENTICATE " if self.protocol == "imap" else b"AUTH "
        if inline:
            return self.last(self.command(verb + mechanism.encode() + b" " + response))
        challenge = self.command(verb + mechanism.encode())
        assert challenge.startswith((b"334", b"+")), challenge
        return self.last(self.command(b"+" + response))

    def use_mailbox(self) -> bytes:
        """A command that needs the upstream login; its reply."""
        if self.protocol == "smtp":
            return self.command(b"MAIL FROM:<alice@example.org>")
        if self.protocol == "imap":
            return self.last(self.command(b"SELECT INBOX"))
        return self.command(b"STAT")

    def noop(self) -> bytes:
        """A command the gateway answers itself before the login: its reply (POP3's
        first line)."""
        if self.protocol == "pop3":
            return self.command(b"CAPA", multiline=True).splitlines(keepends=True)[0]
        return self.last(self.command(b"NOOP")) + b"\r\n"


FAMILY = {"smtp": "smtp", "smtps": "smtp", "imap": "imap", "imaps": "imap", "pop3": "pop3", "pop3s": "pop3"}
OK = {"smtp": b"235 2.7.0", "imap": Raw.TAG + b" OK", "pop3": b"+OK"}
REFUSED = {"smtp": b"535 5.7.8", "imap": Raw.TAG + b" NO [AUTHENTICATIONFAILED]", "pop3": b"-ERR [AUTH]"}
TEMPORARY = {"smtp": b"454 4.7.0", "imap": Raw.TAG + b" NO [UNAVAILABLE]", "pop3": b"-ERR [SYS/TEMP]"}
MALFORMED = {"smtp": b"501 ", "imap": Raw.TAG + b" BAD ", "pop3": b"-ERR mailgw: malformed"}
NEEDS_AUTH = {"smtp": b"530 5.7.0", "imap": Raw.TAG + b" BAD ", "pop3": b"-ERR [AUTH] Authentication required"}
MAILBOX_OK = {"smtp": b"250", "imap": Raw.TAG + b" OK", "pop3": b"+OK"}
NOOP = {"smtp": b"250 2.0.0 OK\r\n", "imap": Raw.TAG + b" OK NOOP completed\r\n", "pop3": b"+OK Capability list follows\r\n"}


def raw(gw, name):
    family = FAMILY[name.split("-")[-1]]
    if family == "smtp":
        client = Raw(gw.by_name[name], "smtp")
        client.command(b"EHLO client.example.org")
        return client
    return Raw(gw.by_name[name], family)


# -- eager client credentials: IMAP and POP3 without any client authentication ------------


@pytest.mark.parametrize("name", ["cc-imap", "cc-imaps"])
def test_client_credentials_imap_without_login(gw, name):
    client = imap_without_login(gw.by_name[name])
    assert "STARTTLS" not in client.capabilities
    assert client.select("INBOX")[0] == "OK"
    number = client.search(None, "SUBJECT", '"seeded message"')[1][0].split()[0]
    assert b"Hello from the seeded INBOX." in client.fetch(number, "(BODY[TEXT])")[1][0][1]
    client.logout()


@pytest.mark.parametrize("name", ["cc-pop3", "cc-pop3s"])
def test_client_credentials_pop3_without_login(gw, name):
    client = poplib.POP3(*gw.by_name[name], timeout=30)
    assert client.stat()[0] >= 1
    assert b"Hello from the seeded INBOX." in b"\r\n".join(client.retr(1)[1])
    client.quit()


def test_client_credentials_smtp_and_cache(oauth_dovecot, certs, tokens, smtp_sink, gateway_factory):
    before = tokens.token_requests("client_credentials")
    with LogCapture() as logs:
        running = gateway_factory({"destinations": [
            cc_dest("cc-submission", "smtp", oauth_dovecot.submission_port, certs, tokens),
        ]})
        for _ in range(2):
            mark = uuid.uuid4().hex
            with smtplib.SMTP(*running.address(), timeout=30) as client:
                client.sendmail("alice@example.org", ["rcpt@example.org"], f"Subject: {mark}\r\n\r\nvia XOAUTH2\r\n")
            smtp_sink.wait_for(lambda m: mark.encode() in m.data, timeout=30)
    # Two sessions within the token's lifetime: one token request.
    assert tokens.token_requests("client_credentials") - before == 1
    text = logs.text()
    assert CLIENT_SECRET not in text
    for token in tokens.access_tokens:
        assert token not in text


def test_wrong_client_secret_is_refused_naming_the_token_service(oauth_dovecot, certs, tokens, gateway_factory):
    running = gateway_factory({"destinations": [
        cc_dest("cc-bad", "smtp", oauth_dovecot.submission_port, certs, tokens, clientSecret="wrong-" + uuid.uuid4().hex),
    ]})
    with socket.create_connection(running.address(), timeout=30) as sock:
        line = sock.makefile("rb").readline()
    assert line.startswith((b"554", b"421")) and b"destination cc-bad: token service" in line
    assert b"invalid_client" in line and b"wrong-" not in line


def test_token_service_down(oauth_dovecot, certs, tokens, gateway_factory):
    running = gateway_factory({"destinations": [
        cc_dest("cc-down", "smtp", oauth_dovecot.submission_port, certs, tokens,
                tokenServiceURL=f"http://127.0.0.1:{realservers.free_port()}/oauth/token"),
    ]})
    with socket.create_connection(running.address(), timeout=30) as sock:
        line = sock.makefile("rb").readline()
    assert line.startswith(b"421") and b"token service" in line


# -- lazy types: real clients ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["rt-imap", "rt-imaps"])
def test_imaplib_xoauth2_with_refresh_token(gw, tokens, name):
    rt = new_refresh_token(tokens)
    client = imaplib.IMAP4(*gw.by_name[name], timeout=30)
    for cap in ("AUTH=XOAUTH2", "AUTH=OAUTHBEARER", "SASL-IR"):
        assert cap in client.capabilities
    assert "AUTH=PLAIN" not in client.capabilities and "STARTTLS" not in client.capabilities
    typ, _ = client.authenticate("XOAUTH2", lambda _: f"user=alice\x01auth=Bearer {rt}\x01\x01".encode())
    assert typ == "OK"
    assert client.select("INBOX")[0] == "OK"
    number = client.search(None, "SUBJECT", '"seeded message"')[1][0].split()[0]
    assert b"Hello from the seeded INBOX." in client.fetch(number, "(BODY[TEXT])")[1][0][1]
    client.logout()


@pytest.mark.parametrize("name", ["ac-smtp", "ac-smtps"])
def test_smtplib_xoauth2_with_authorization_code(gw, tokens, smtp_sink, name):
    code = new_code(tokens)
    mark = uuid.uuid4().hex

    def answer(challenge=None):
        # The initial response; "" answers a JSON error challenge (REAL-PEERS.md).
        return f"user=alice\x01auth=Bearer {code}\x01\x01" if challenge is None else ""

    with smtplib.SMTP(*gw.by_name[name], timeout=30) as client:
        assert client.ehlo()[0] == 250
        assert client.esmtp_features["auth"].split() == ["XOAUTH2", "OAUTHBEARER"]
        assert "starttls" not in client.esmtp_features
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            client.sendmail("alice@example.org", ["rcpt@example.org"], "Subject: too early\r\n\r\nx\r\n")
        assert refused.value.smtp_code == 530
        code_, _ = client.auth("XOAUTH2", answer)
        assert code_ == 235
        client.sendmail("alice@example.org", ["rcpt@example.org"], f"Subject: {mark}\r\n\r\nvia an authorization code\r\n")
    smtp_sink.wait_for(lambda m: mark.encode() in m.data, timeout=30)


@pytest.mark.parametrize("name", ["rt-pop3", "rt-pop3s", "ac-pop3s"])
@pytest.mark.parametrize("mechanism, inline", [("XOAUTH2", True), ("XOAUTH2", False), ("OAUTHBEARER", True)])
def test_pop3_auth_on_a_raw_socket(gw, tokens, name, mechanism, inline):
    secret = new_code(tokens) if name.startswith("ac-") else new_refresh_token(tokens)
    with raw(gw, name) as client:
        capa = client.command(b"CAPA", multiline=True)
        assert b"SASL XOAUTH2 OAUTHBEARER\r\n" in capa and b"STLS" not in capa and b"\r\nUSER\r\n" not in capa
        assert client.command(b"STAT").startswith(NEEDS_AUTH["pop3"])
        assert client.command(b"USER alice").startswith(b"-ERR [AUTH]")
        response = (xoauth2 if mechanism == "XOAUTH2" else oauthbearer)(secret)
        assert client.auth(mechanism, response, inline=inline).startswith(b"+OK Logged in.")
        assert client.command(b"STAT").startswith(b"+OK")
        assert b"Hello from the seeded INBOX." in client.command(b"RETR 1", multiline=True)
        assert client.command(b"QUIT").startswith(b"+OK")


def test_reference_smtp_flow_without_ehlo(gw, tokens, smtp_sink):
    """The reference's telnet session: AUTH XOAUTH2 straight after the greeting."""
    rt, mark = new_refresh_token(tokens), uuid.uuid4().hex
    with Raw(gw.by_name["rt-smtp"], "smtp") as client:
        assert client.command(b"AUTH XOAUTH2 " + xoauth2(rt)).startswith(b"235 2.7.0")
        assert client.command(b"MAIL FROM:<sender@example.org>").startswith(b"250")
        assert client.command(b"RCPT TO:<receiver@example.org>").startswith(b"250")
        assert client.command(b"DATA").startswith(b"354")
        assert client.command(f"Subject: {mark}\r\n\r\nSome test data.\r\n.".encode()).startswith(b"250")
    smtp_sink.wait_for(lambda m: mark.encode() in m.data, timeout=30)


def test_poplib_with_an_auth_command(gw, tokens):
    client = poplib.POP3(*gw.by_name["ac-pop3s"], timeout=30)
    with pytest.raises(poplib.error_proto, match="Authentication required"):
        client.stat()
    client._shortcmd("AUTH XOAUTH2 " + xoauth2(new_code(tokens)).decode())
    assert client.stat()[0] >= 1
    client.quit()


def _curl_or_skip():
    require_or_skip("curl")


@pytest.mark.parametrize("name", ["rt-imap", "rt-pop3s"])
def test_curl_oauth2_bearer_with_refresh_token(gw, tokens, name):
    _curl_or_skip()
    rt = new_refresh_token(tokens)
    host, port = gw.by_name[name]
    url = f"imap://{host}:{port}/INBOX;UID=1/;SECTION=TEXT" if "imap" in name else f"pop3://{host}:{port}/1"
    result = subprocess.run(
        ["curl", "-sS", "-v", "--max-time", "30", "--user", "alice:", "--oauth2-bearer", rt, url],
        capture_output=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert b"Hello from the seeded INBOX." in result.stdout
    # curl 7.88 picks OAUTHBEARER when it is offered.
    assert b"OAUTHBEARER" in result.stderr


def test_imap_authenticate_inline_and_oauthbearer_raw(gw, tokens):
    rt = new_refresh_token(tokens)
    with raw(gw, "rt-imaps") as client:
        assert b"AUTH=XOAUTH2 AUTH=OAUTHBEARER" in client.greeting
        assert client.auth("OAUTHBEARER", oauthbearer(rt)).startswith(Raw.TAG + b" OK [CAPABILITY IMAP4rev1 ")
        reply = client.command(b"CAPABILITY")
        assert b"AUTH=" not in reply and b"IDLE" in reply
        assert client.last(client.command(b'LIST "" "*"')).startswith(Raw.TAG + b" OK")


# -- lazy types: refusals, retries, malformed input -----------------------------------------


@pytest.mark.parametrize("name", ["rt-smtp", "rt-imaps", "rt-pop3s"])
def test_revoked_refresh_token_then_retry_in_the_same_session(gw, tokens, name):
    family = FAMILY[name.split("-")[1]]
    revoked, good = new_refresh_token(tokens), new_refresh_token(tokens)
    tokens.revoke(revoked)
    with raw(gw, name) as client:
        assert client.use_mailbox().startswith(NEEDS_AUTH[family])
        refused = client.auth("XOAUTH2", xoauth2(revoked))
        assert refused.startswith(REFUSED[family]) and b"invalid_grant" in refused, refused
        assert client.noop() == NOOP[family]  # still open
        assert client.auth("XOAUTH2", xoauth2(good), inline=False).startswith(OK[family])
        assert client.use_mailbox().startswith(MAILBOX_OK[family])


@pytest.mark.parametrize("name", ["rt-smtp", "rt-imaps", "rt-pop3s"])
def test_upstream_refusal_of_the_access_token_invalidates_it(gw, tokens, name):
    family = FAMILY[name.split("-")[1]]
    rt = new_refresh_token(tokens)
    with raw(gw, name) as client:
        # Dovecot refuses a token whose owner (alice) is not the user presented.
        refused = client.auth("XOAUTH2", xoauth2(rt, user="mallory"))
        assert refused.startswith(REFUSED[family]) and b"upstream refused" in refused, refused
        assert client.auth("XOAUTH2", xoauth2(rt)).startswith(OK[family])
        assert client.use_mailbox().startswith(MAILBOX_OK[family])
    # The refused token was dropped from the cache: the retry exchanged again.
    assert requests_for(tokens, rt) == 2


@pytest.mark.parametrize("name", ["rt-smtp", "rt-imaps", "rt-pop3s"])
def test_malformed_payloads_get_a_protocol_error_and_the_session_stays(gw, tokens, name):
    family = FAMILY[name.split("-")[1]]
    before = tokens.token_requests()
    with raw(gw, name) as client:
        for mechanism, payload in [
            ("XOAUTH2", b"not base64!"),
            ("XOAUTH2", base64.b64encode(b"user=alice\x01\x01")),  # no auth
            ("XOAUTH2", base64.b64encode(b"user=alice\x01auth=Basic abc\x01\x01")),
            ("XOAUTH2", b"="),
            ("OAUTHBEARER", base64.b64encode(b"p=tls-unique,,\x01auth=Bearer x\x01\x01")),
        ]:
            reply = client.auth(mechanism, payload)
            assert reply.startswith(MALFORMED[family]) and b"malformed" in reply, reply
        if family != "pop3":
            assert client.auth("PLAIN", base64.b64encode(b"\0alice\0pw")).startswith(
                {"smtp": b"504", "imap": Raw.TAG + b" NO [CANNOT]"}[family])
        rt = new_refresh_token(tokens)
        assert client.auth("XOAUTH2", xoauth2(rt)).startswith(OK[family])
    assert tokens.token_requests() - before == 1


@pytest.mark.parametrize("name", ["rt-smtp", "rt-down-imaps"])
def test_imap_login_and_smtp_plain_are_refused_clearly(gw, name):
    family = FAMILY[name.split("-")[-1]]
    with raw(gw, name) as client:
        if family == "imap":
            reply = client.last(client.command(b"LOGIN alice secret"))
            assert reply.startswith(Raw.TAG + b" NO [CANNOT]") and b"XOAUTH2" in reply
        else:
            reply = client.auth("PLAIN", base64.b64encode(b"\0alice\0secret"))
            assert reply.startswith(b"504") and b"XOAUTH2" in reply
        assert client.noop() == NOOP[family]


def test_wrong_client_secret_for_an_exchange(gw, tokens):
    rt = new_refresh_token(tokens)
    with raw(gw, "rt-badclient-smtp") as client:
        reply = client.auth("XOAUTH2", xoauth2(rt))
        assert reply.startswith(b"535 5.7.8") and b"invalid_client" in reply and b"wrong-" not in reply
        assert client.command(b"NOOP").startswith(b"250")


@pytest.mark.parametrize("name", ["rt-down-smtp", "rt-down-imaps", "rt-down-pop3s"])
def test_token_service_down_is_a_temporary_failure(gw, tokens, name):
    family = FAMILY[name.split("-")[-1]]
    with raw(gw, name) as client:
        reply = client.auth("XOAUTH2", xoauth2(new_refresh_token(tokens)))
        assert reply.startswith(TEMPORARY[family]) and b"unreachable" in reply, reply
        assert client.noop() == NOOP[family]


def test_token_service_slow(oauth_dovecot, certs, tokens, gateway_factory):
    running = gateway_factory({
        "destinations": [oauth_dest("rt-slow", RT, "pop3s", oauth_dovecot.pop3s_port, certs, tokens)],
        "timeouts": {"token": 1},
    })
    rt = new_refresh_token(tokens)
    tokens.delay = 1.6
    with Raw(running.address(), "pop3") as client:
        started = time.monotonic()
        reply = client.auth("XOAUTH2", xoauth2(rt))
        assert reply.startswith(b"-ERR [SYS/TEMP]") and b"did not answer" in reply and b"within 1s" in reply, reply
        assert time.monotonic() - started < 1.5
        tokens.delay = 0
        assert client.auth("XOAUTH2", xoauth2(rt)).startswith(b"+OK Logged in.")
        assert client.command(b"STAT").startswith(b"+OK")
    # The abandoned request reaches the service's log when its delay ends; wait for it
    # so it does not count in a later test.
    wait_for(lambda: requests_for(tokens, rt) == 2, what="the abandoned request to reach the service")


def test_other_sessions_are_unaffected_by_a_refusal(gw, tokens):
    bad, good = new_refresh_token(tokens), new_refresh_token(tokens)
    tokens.revoke(bad)
    with raw(gw, "rt-imaps") as first, raw(gw, "rt-imaps") as second:
        assert first.auth("XOAUTH2", xoauth2(bad)).startswith(REFUSED["imap"])
        assert second.auth("XOAUTH2", xoauth2(good)).startswith(OK["imap"])
        assert second.use_mailbox().startswith(MAILBOX_OK["imap"])


# -- cache ---------------------------------------------------------------------------------


def test_two_sessions_with_one_refresh_token_make_one_request_until_it_expires(gw, tokens):
    tokens.expires_in = 4  # cached for half its life: 2 s
    rt = new_refresh_token(tokens)
    for name in ("rt-imaps", "rt-pop3s"):
        with raw(gw, name) as client:
            family = FAMILY[name.split("-")[1]]
            assert client.auth("XOAUTH2", xoauth2(rt)).startswith(OK[family])
            assert client.use_mailbox().startswith(MAILBOX_OK[family])
    assert requests_for(tokens, rt) == 1
    time.sleep(2.2)  # not a synchronisation: the cached token's half-life has to pass
    with raw(gw, "rt-smtp") as client:
        assert client.auth("XOAUTH2", xoauth2(rt)).startswith(OK["smtp"])
    assert requests_for(tokens, rt) == 2


# -- secrets ------------------------------------------------------------------------------


def test_no_secret_in_logs_or_in_what_the_application_receives(gw, tokens, smtp_sink):
    rt, code, revoked = new_refresh_token(tokens), new_code(tokens), new_refresh_token(tokens)
    tokens.revoke(revoked)
    issued_before = set(tokens.access_tokens)
    received = b""
    with LogCapture() as logs:
        for name, secret in [("rt-imaps", rt), ("ac-smtp", code), ("rt-pop3s", revoked), ("rt-badclient-smtp", rt),
                             ("rt-smtp", rt)]:
            family = FAMILY[name.split("-")[-1]]
            with raw(gw, name) as client:
                client.auth("XOAUTH2", xoauth2(secret))
                client.auth("XOAUTH2", xoauth2(secret, user="mallory"))  # refused upstream, or already in
                client.auth("OAUTHBEARER", oauthbearer(secret))
                if family == "smtp":
                    client.command(b"MAIL FROM:<alice@example.org>")
                received += client.received
        cc = imap_without_login(gw.by_name["cc-imaps"])
        assert cc.select("INBOX")[0] == "OK"
        cc.logout()
    text = logs.text()
    assert "session" in text
    new_tokens = set(tokens.access_tokens) - issued_before
    assert new_tokens
    secrets = [rt, code, revoked, CLIENT_SECRET, *new_tokens]
    for secret in secrets:
        for form in (secret, xoauth2(secret).decode(), oauthbearer(secret).decode()):
            assert form not in text, form
            assert form.encode() not in received, form
