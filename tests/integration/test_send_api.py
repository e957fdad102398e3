"""The send API (SPEC section 8) against real servers: aiosmtpd started here, Postfix with
SASL via Dovecot (shared fixtures), and the HTTP endpoint driven by curl through a real
gateway listener."""

from __future__ import annotations

import email
import email.policy
import ssl
import subprocess
import threading
import time
import uuid

import pytest

import realservers
from support.clients import curl_post, http_head_only
from gatewayharness import LogCapture, in_reactor

from mailgw.send import EmailConnection, MessageError, SendConfig, SendError, SendTimeout

PASSWORD = "pl41n-s3cret-not-for-logs"


def marker() -> str:
    return uuid.uuid4().hex


def parsed(data: bytes):
    return email.message_from_bytes(data, policy=email.policy.default)


# -- a configurable aiosmtpd server -------------------------------------------------------


class Aio:
    """aiosmtpd on 127.0.0.1 with the knobs these tests need.

    ``users`` enables AUTH (PLAIN and LOGIN unless ``mechanisms_excluded``) on plain
    connections; ``refuse`` is a set of recipients answered ``550``; ``implicit`` and
    ``starttls`` take a server ``SSLContext``.
    """

    def __init__(self, *, users=None, mechanisms_excluded=(), refuse=(), implicit=None,
                 starttls=None):
        self.users = users
        self.refuse = set(refuse)
        self.messages = []
        self.attempts = []  # not "auth_*": aiosmtpd would take it for a mechanism
        self._lock = threading.Condition()
        self.port = realservers.free_port()
        realservers.import_or_skip("aiosmtpd")
        from aiosmtpd.controller import Controller

        class TolerantController(Controller):
            # The readiness poke cannot present a client certificate; a TLS error still
            # proves the server is up.
            def _trigger_server(self):
                try:
                    super()._trigger_server()
                except (ssl.SSLError, ConnectionError):
                    pass

        kwargs = dict(hostname=realservers.HOST, port=self.port, server_hostname="localhost",
                      decode_data=False)
        if users is not None:
            kwargs.update(authenticator=self._authenticate, auth_require_tls=False,
                          auth_required=True, auth_exclude_mechanism=list(mechanisms_excluded))
        if implicit is not None:
            kwargs["ssl_context"] = implicit
        if starttls is not None:
            kwargs["tls_context"] = starttls
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.controller = TolerantController(self, **kwargs)

    def _authenticate(self, server, session, envelope, mechanism, auth_data):
        from aiosmtpd.smtp import AuthResult, LoginPassword

        ok = (isinstance(auth_data, LoginPassword)
              and self.users.get(auth_data.login.decode()) == auth_data.password.decode())
        with self._lock:
            self.attempts.append((mechanism, ok))
        if ok:
            return AuthResult(success=True)
        return AuthResult(success=False, handled=False)

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address in self.refuse:
            return "550 5.1.1 <%s>: no such user here" % address
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        with self._lock:
            self.messages.append((envelope.mail_from, list(envelope.rcpt_tos),
                                  bytes(envelope.original_content)))
            self._lock.notify_all()
        return "250 2.0.0 Ok: queued as TEST%d" % len(self.messages)

    def __enter__(self):
        self.controller.start()
        return self

    def __exit__(self, *exc):
        self.controller.stop()

    def config(self, **kwargs) -> SendConfig:
        return SendConfig(hostname="localhost", port=self.port, **kwargs)


def server_context(certs, cert=None, key=None, require_client_cert=False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(cert or certs.server_cert), str(key or certs.server_key))
    if require_client_cert:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(str(certs.ca_pem))
    return ctx


def simple_mail(config, mark, **fields) -> EmailConnection:
    conn = EmailConnection("rcpt@example.org", config)
    conn.set_from_address("app@example.org")
    conn.set_subject(mark)
    conn.set_content(f"body {mark}\n")
    for name, value in fields.items():
        setattr(conn, name, value)
    return conn


# -- the Python API against aiosmtpd ------------------------------------------------------


def test_plain_send_returns_final_reply_and_bcc_only_in_envelope():
    with Aio() as server:
        conn = simple_mail(server.config(), "plain", to=["to@example.org"],
                           cc=["cc@example.org"], bcc=["hidden@example.org"])
        conn.add_attachment(bytes(range(256)) * 40, "blob.bin")
        reply = conn.send()
        assert reply == "250 2.0.0 Ok: queued as TEST1"
        [(mail_from, rcpts, data)] = server.messages
    assert mail_from == "app@example.org"
    assert rcpts == ["rcpt@example.org", "to@example.org", "cc@example.org",
                     "hidden@example.org"]
    msg = parsed(data)
    assert msg["Bcc"] is None and b"hidden@example.org" not in data
    assert msg["To"] == "rcpt@example.org, to@example.org"
    assert list(msg.iter_parts())[-1].get_payload(decode=True) == bytes(range(256)) * 40


def test_auth_plain_success():
    with Aio(users={"alice": PASSWORD}) as server:
        reply = simple_mail(server.config(userid="alice", password=PASSWORD), "auth").send()
        assert reply.startswith("250 ")
        assert server.attempts == [("PLAIN", True)]


def test_auth_plain_failure_is_535_and_never_shows_the_password():
    with Aio(users={"alice": "other"}) as server, LogCapture() as logs:
        config = server.config(userid="alice", password=PASSWORD)
        with pytest.raises(SendError) as info:
            simple_mail(config, "bad-auth").send()
    assert info.value.code == 535
    assert "authentication failed" in str(info.value)
    for text in (str(info.value), repr(info.value), repr(config), logs.text()):
        assert PASSWORD not in text
    assert server.messages == []


def test_server_without_plain_is_a_clear_error():
    with Aio(users={"alice": PASSWORD}, mechanisms_excluded=["PLAIN"]) as server:
        with pytest.raises(SendError, match=r"does not offer AUTH PLAIN \(offers: LOGIN\)"):
            simple_mail(server.config(userid="alice", password=PASSWORD), "login-only").send()
        assert server.attempts == []


def test_no_auth_offered_at_all_is_a_clear_error():
    with Aio() as server:
        with pytest.raises(SendError, match=r"does not offer AUTH PLAIN \(offers: none\)"):
            simple_mail(server.config(userid="alice", password=PASSWORD), "no-auth").send()


def test_refused_recipient_raises_with_code_and_sends_nothing():
    with Aio(refuse={"nobody@example.org"}) as server:
        conn = simple_mail(server.config(), "refused", cc=["nobody@example.org"])
        with pytest.raises(SendError) as info:
            conn.send()
        assert info.value.code == 550
        assert "recipient nobody@example.org refused: 550" in str(info.value)
        assert server.messages == []


def test_implicit_tls_with_trust_pem(certs):
    with Aio(implicit=server_context(certs)) as server:
        config = server.config(tls=True, trust_pem=str(certs.ca_pem))
        assert simple_mail(config, "smtps").send().startswith("250 ")
        assert len(server.messages) == 1


def test_implicit_tls_untrusted_by_default_system_store(certs):
    with Aio(implicit=server_context(certs)) as server:
        with pytest.raises(SendError, match="certificate verification failed"):
            simple_mail(server.config(tls=True), "system-store").send()


def test_client_certificate_demanded_by_server(certs):
    ctx = server_context(certs, require_client_cert=True)
    with Aio(implicit=ctx) as server:
        config = server.config(tls=True, trust_pem=str(certs.ca_pem),
                               client_cert_pem=str(certs.client_pem))
        assert simple_mail(config, "mtls").send().startswith("250 ")
        without = server.config(tls=True, trust_pem=str(certs.ca_pem))
        with pytest.raises(SendError, match="client certificate"):
            simple_mail(without, "mtls-missing").send()
        assert len(server.messages) == 1


def test_disabled_verification_accepts_untrusted_certificate(certs):
    ctx = server_context(certs, certs.untrusted_cert, certs.untrusted_key)
    with Aio(implicit=ctx) as server, LogCapture() as logs:
        with pytest.raises(SendError, match="certificate verification failed"):
            simple_mail(server.config(tls=True, trust_pem=str(certs.ca_pem)), "u1").send()
        config = server.config(tls=True, trust_pem=str(certs.ca_pem), verify=False)
        assert simple_mail(config, "u2").send().startswith("250 ")
    assert "certificate verification disabled" in logs.text()


def test_host_name_verification_on_by_default(certs):
    ctx = server_context(certs, certs.wrong_name_cert, certs.wrong_name_key)
    with Aio(implicit=ctx) as server:
        with pytest.raises(SendError, match="certificate verification failed.*[Hh]ostname"):
            simple_mail(server.config(tls=True, trust_pem=str(certs.ca_pem)), "name").send()
        assert server.messages == []


def test_starttls_then_auth(certs):
    with Aio(users={"alice": PASSWORD}, starttls=server_context(certs)) as server:
        config = server.config(starttls=True, trust_pem=str(certs.ca_pem), userid="alice",
                               password=PASSWORD)
        assert simple_mail(config, "starttls").send().startswith("250 ")
        assert server.attempts == [("PLAIN", True)]


def test_starttls_not_offered_is_an_error():
    with Aio() as server:
        with pytest.raises(SendError, match="does not offer STARTTLS"):
            simple_mail(server.config(starttls=True), "no-starttls").send()


@pytest.mark.parametrize("tls", [False, True])
def test_silent_server_hits_the_read_timeout(tls):
    with realservers.SilentServer() as silent:
        config = SendConfig(hostname="127.0.0.1", port=silent.port, tls=tls, read_timeout=0.5)
        started = time.monotonic()
        with pytest.raises(SendTimeout, match=r"no reply within 0.5 s .*\(read timeout\)"):
            simple_mail(config, "silent").send()
        assert time.monotonic() - started < 3


def test_closed_port_is_a_clear_error():
    with realservers.ClosedPort() as closed:
        with pytest.raises(SendError, match="cannot connect"):
            simple_mail(SendConfig(hostname="127.0.0.1", port=closed.port), "closed").send()


def test_mailto_overrides_primary_recipient():
    with Aio() as server:
        conn = simple_mail(server.config(mailto="override@example.org"), "mailto")
        conn.send()
        [(_, rcpts, data)] = server.messages
    assert rcpts == ["override@example.org"]
    assert parsed(data)["To"] == "override@example.org"


def test_send_deferred_from_the_reactor(reactor):
    with Aio(refuse={"nobody@example.org"}) as server:
        conn = simple_mail(server.config(), "deferred")
        assert in_reactor(conn.send_deferred).startswith("250 ")
        assert len(server.messages) == 1
        with pytest.raises(MessageError, match="^Cc: "):
            in_reactor(simple_mail(server.config(), "x", cc=["Bad <b@x.org>"]).send_deferred)
        with pytest.raises(SendError) as info:
            in_reactor(simple_mail(server.config(), "x", bcc=["nobody@example.org"]).send_deferred)
    assert info.value.code == 550


# -- the Python API against Postfix (SASL via Dovecot) ------------------------------------


def test_postfix_submission_starttls_auth_plain(postfix, certs, smtp_sink):
    mark = marker()
    config = SendConfig(hostname="localhost", port=postfix.submission_port, starttls=True,
                        trust_pem=str(certs.ca_pem), userid="alice", password="secret")
    reply = simple_mail(config, mark, bcc=["hidden@example.org"]).send()
    assert reply.startswith("250 2.0.0 Ok: queued as ")
    got = smtp_sink.wait_for(lambda m: mark.encode() in m.data, timeout=30)
    assert sorted(got.rcpt_tos) == ["hidden@example.org", "rcpt@example.org"]
    assert b"hidden@example.org" not in got.data


def test_postfix_smtps_wrong_password(postfix, certs):
    config = SendConfig(hostname="localhost", port=postfix.smtps_port, tls=True,
                        trust_pem=str(certs.ca_pem), userid="alice", password=PASSWORD)
    with pytest.raises(SendError) as info:
        simple_mail(config, marker()).send()
    assert info.value.code == 535 and PASSWORD not in str(info.value)


def test_postfix_refuses_relay_without_auth(postfix, certs):
    config = SendConfig(hostname="localhost", port=postfix.smtps_port, tls=True,
                        trust_pem=str(certs.ca_pem))
    with pytest.raises(SendError) as info:
        simple_mail(config, marker()).send()
    assert info.value.code == 554 and "rcpt@example.org refused" in str(info.value)


def test_postfix_plain_port_offers_no_auth(postfix):
    config = SendConfig(hostname="127.0.0.1", port=postfix.plain_port, userid="alice",
                        password="secret")
    with pytest.raises(SendError, match=r"does not offer AUTH PLAIN \(offers: none\)"):
        simple_mail(config, marker()).send()


# -- HTTP: curl -> SendResource -> gateway listener -> Postfix ----------------------------


@pytest.fixture(scope="module")
def office_gateway(postfix, certs, reactor, tmp_path_factory):
    """A real gateway whose listener sends through Postfix submission as alice."""
    import gatewayharness

    destination = {
        "Name": "office", "Type": "MAIL", "ProxyType": "Internet",
        "Authentication": "BasicAuthentication", "mail.transport.protocol": "smtp",
        "mail.smtp.host": "localhost", "mail.smtp.port": str(postfix.submission_port),
        "mail.user": "alice", "mail.password": "secret",
        "TrustStoreLocation": str(certs.ca_pem),
    }
    running = gatewayharness.start_gateway({"destinations": [destination]},
                                           tmp_path_factory.mktemp("send-gw"))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def refusing_server():
    with Aio(refuse={"nobody@example.org"}) as server:
        yield server


class Site:
    """A twisted.web Site with the send resource on a free loopback port."""

    def __init__(self, resolve, max_body_size=None, limited=True, tokens=None):
        from twisted.internet import reactor
        from twisted.web.resource import Resource
        from twisted.web.server import Site as WebSite

        from mailgw.send.http import SendResource, limited_request_factory

        kwargs = {} if max_body_size is None else {"max_body_size": max_body_size}
        if tokens is not None:
            kwargs["tokens"] = tokens
        root, v1 = Resource(), Resource()
        root.putChild(b"v1", v1)
        send = SendResource(resolve, **kwargs)
        v1.putChild(b"send", send)
        site = WebSite(root)
        if limited:
            site.requestFactory = limited_request_factory(send)
        self.port = in_reactor(lambda: reactor.listenTCP(0, site, interface="127.0.0.1"))
        self.base = f"http://127.0.0.1:{self.port.getHost().port}/v1/send"

    def close(self):
        in_reactor(self.port.stopListening)


@pytest.fixture(scope="module")
def site(office_gateway, refusing_server, reactor):
    def resolve(name):
        if name == "office":
            return office_gateway.address(0)  # the gateway's SMTP listener: no credentials
        if name == "refusing":
            return refusing_server.config()
        return None

    s = Site(resolve)
    yield s
    s.close()


def test_http_send_through_gateway_destination(site, smtp_sink):
    mark = marker()
    status, text = curl_post(
        f"{site.base}/office/rcpt@example.org", f"Grüße {mark}\n".encode("utf-8"),
        [f"Subject: {mark} ✓", "From: app@example.org", "To: to@example.org",
         "Bcc: hidden@example.org", "X-Tag: one", "X-Tag: two",
         "Content-Type: text/plain; charset=UTF-8"])
    assert status == 200, text
    assert text.startswith("250 ")
    got = smtp_sink.wait_for(lambda m: mark.encode() in m.data, timeout=30)
    assert sorted(got.rcpt_tos) == ["hidden@example.org", "rcpt@example.org", "to@example.org"]
    msg = parsed(got.data)
    assert msg["Subject"] == f"{mark} ✓"
    assert msg["From"] == "app@example.org"
    assert msg.get_all("X-Tag") == ["one", "two"]
    assert msg["Bcc"] is None and msg["User-Agent"] is None and msg["Host"] is None
    assert msg.get_content().replace("\r\n", "\n") == f"Grüße {mark}\n"


def test_http_recipient_from_to_header_and_binary_body(site, smtp_sink):
    mark = marker()
    blob = bytes(range(256)) + mark.encode()
    status, text = curl_post(f"{site.base}/office", blob,
                             ["To: first@example.org", f"Subject: {mark}",
                              "Content-Type: application/octet-stream"])
    assert status == 200, text
    got = smtp_sink.wait_for(lambda m: mark.encode() in m.data, timeout=30)
    msg = parsed(got.data)
    assert got.mail_from == "first@example.org"  # From defaults to the primary recipient
    assert msg.get_payload(decode=True) == blob


def test_http_bad_requests_name_the_header(site):
    status, text = curl_post(f"{site.base}/office/rcpt@example.org", b"x",
                             ["To: Carol <carol@example.org>"])
    assert status == 400 and text.startswith("bad request: To: ") and "display names" in text
    status, text = curl_post(f"{site.base}/office", b"x")
    assert status == 400 and "To: no recipient" in text
    status, text = curl_post(f"{site.base}/office/a@b.example", b"\xff",
                             ["Content-Type: text/plain; charset=UTF-8"])
    assert status == 400 and "Content-Type" in text


def test_http_unknown_destination_and_wrong_method(site):
    status, text = curl_post(f"{site.base}/nowhere/rcpt@example.org", b"x")
    assert status == 404 and "unknown destination 'nowhere'" in text
    done = subprocess.run(["curl", "-sS", "-i", f"{site.base}/office/rcpt@example.org"],
                          capture_output=True, timeout=30)
    assert done.stdout.startswith(b"HTTP/1.1 405 ")
    assert b"\r\nAllow: POST\r\n" in done.stdout


def test_http_refusal_is_502_with_the_code(site):
    status, text = curl_post(f"{site.base}/refusing/nobody@example.org", b"x")
    assert status == 502
    assert "recipient nobody@example.org refused: 550" in text


@pytest.mark.parametrize("limited", [True, False])
def test_http_request_size_limit(reactor, limited):
    calls = []
    s = Site(lambda name: calls.append(name), max_body_size=1000, limited=limited)
    try:
        status, text = curl_post(f"{s.base}/office/rcpt@example.org", b"x" * 5000)
        assert status == 413 and "over the limit of 1000 bytes" in text
        # Chunked: no Content-Length, refused while reading.
        status, text = curl_post(f"{s.base}/office/rcpt@example.org", b"y" * 5000,
                                 ["Transfer-Encoding: chunked"])
        assert status == 413
        # Large enough for curl to ask "Expect: 100-continue": refused before the body.
        status, text = curl_post(f"{s.base}/office/rcpt@example.org", b"z" * (2 * 1024 * 1024))
        assert status == 413
        assert calls == []  # refused before anything was resolved or sent
    finally:
        s.close()


def test_http_without_a_token_is_answered_before_the_body(reactor):
    """A caller without a valid token cannot make the gateway read (and store) a body:
    401/403 come as soon as the headers are in, even for a body over the limit."""
    from mailgw.send.http import BearerTokens

    calls = []
    s = Site(lambda name: calls.append(name), max_body_size=1000, tokens=BearerTokens(["sesame"]))
    port = s.port.getHost().port
    try:
        head = (b"POST /v1/send/office/rcpt@example.org HTTP/1.1\r\nHost: x\r\n"
                b"Content-Length: 50000000\r\n")
        answer = http_head_only(port, head + b"\r\n")
        assert answer.startswith(b"HTTP/1.1 401 "), answer
        assert b"\r\nWWW-Authenticate: Bearer" in answer, answer
        answer = http_head_only(port, head + b"Authorization: Bearer wrong\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 403 "), answer
        chunked = (b"POST /v1/send/office HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        assert http_head_only(port, chunked).startswith(b"HTTP/1.1 401 ")
        # With the token, the size limit still answers before the body.
        answer = http_head_only(port, head + b"Authorization: Bearer sesame\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 413 ") and b"over the limit of 1000 bytes" in answer, answer
        assert calls == []
    finally:
        s.close()
