"""SMTP and SMTPS through the gateway against real Postfix (SASL via Dovecot) and aiosmtpd."""

from __future__ import annotations

import base64
import email
import smtplib
import socket
import ssl
import subprocess
import threading
import uuid

import pytest
from support.clients import smtp_reply
from support.reactor import wait_for
from support.skips import require_or_skip

import realservers
from support.destinations import mail
from gatewayharness import LogCapture

ALICE_PASSWORD = "secret"  # realservers.DEFAULT_USERS


def dest(name, protocol, port, certs, **extra):
    return mail(name, protocol, port, ca=certs.ca_pem, **extra)


def marker():
    return uuid.uuid4().hex


def message(mark, body=b"hello through mailgw\r\n"):
    return f"From: app@example.org\r\nTo: rcpt@example.org\r\nSubject: {mark}\r\n\r\n".encode() + body


def wait_delivered(sink, mark, timeout=30):
    return sink.wait_for(lambda m: mark.encode() in m.data, timeout=timeout)


@pytest.fixture(scope="module")
def gw(postfix, certs, smtp_sink, reactor, tmp_path_factory):
    """One gateway with a listener per destination, shared by the module's tests."""
    import gatewayharness

    destinations = [
        dest("submission", "smtp", postfix.submission_port, certs, **{"mail.smtp.starttls.required": "true"}),
        dest("smtps", "smtps", postfix.smtps_port, certs),
        dest("plain-noauth", "smtp", postfix.plain_port, certs, Authentication="NoAuthentication",
             **{"mail.user": None, "mail.password": None, "mail.smtp.starttls.enable": "false"}),
        dest("wrong-password", "smtp", postfix.submission_port, certs, **{"mail.password": "not-the-password"}),
        dest("untrusted", "smtps", postfix.smtps_port, certs, TrustStoreLocation=str(certs.untrusted_ca_pem)),
        dest("closed", "smtp", realservers.free_port(), certs),
    ]
    running = gatewayharness.start_gateway({"destinations": destinations}, tmp_path_factory.mktemp("gw"))
    yield running
    running.stop()


def smtp_to(gw, name, timeout=30):
    host, port = gw.by_name[name]
    return smtplib.SMTP(host, port, timeout=timeout)


@pytest.mark.parametrize("name", ["submission", "smtps", "plain-noauth"])
def test_smtplib_without_login(gw, smtp_sink, name):
    mark = marker()
    with smtp_to(gw, name) as client:
        code, ehlo = client.ehlo()
        assert code == 250 and b"STARTTLS" not in ehlo and b"AUTH PLAIN LOGIN" in ehlo
        client.sendmail("alice@example.org", ["rcpt@example.org"], message(mark))
    got = wait_delivered(smtp_sink, mark)
    assert got.rcpt_tos == ["rcpt@example.org"]


def test_smtplib_with_login_is_answered_locally(gw, smtp_sink):
    mark = marker()
    with smtp_to(gw, "submission") as client:
        client.login("anything", "the application's password is discarded")
        client.sendmail("alice@example.org", ["rcpt@example.org"], message(mark))
    wait_delivered(smtp_sink, mark)


def test_quit_before_release_ends_the_upstream_session_with_quit(gw, postfix):
    """A probe (connect, EHLO, QUIT) is answered by the gateway, which ends its logged-in
    session at Postfix with QUIT: Postfix logs quit=1, not a lost connection."""
    seen = postfix.maillog.read_text(errors="replace").count("disconnect from")
    with smtp_to(gw, "submission") as client:
        assert client.ehlo()[0] == 250
        assert client.quit()[0] == 221

    def next_disconnect():
        lines = [l for l in postfix.maillog.read_text(errors="replace").splitlines() if "disconnect from" in l]
        return lines[seen] if len(lines) > seen else None

    line = wait_for(next_disconnect, timeout=15, what="Postfix to log the session's end")
    assert "quit=1" in line and "auth=1" in line, line


def test_raw_session_without_ehlo(gw, smtp_sink):
    """The reference's telnet flow: MAIL FROM straight after the greeting."""
    mark = marker()
    with socket.create_connection(gw.by_name["smtps"], timeout=30) as sock:
        f = sock.makefile("rb")
        assert smtp_reply(f)[0] == 220
        for command, expected in [
            (b"MAIL FROM:sender@example.org\r\n", 250),
            (b"RCPT TO:receiver@example.org\r\n", 250),
            (b"DATA\r\n", 354),
            (f"Subject: {mark}\r\n\r\nSome test data.\r\n.\r\n".encode(), 250),
            (b"QUIT\r\n", 221),
        ]:
            sock.sendall(command)
            assert smtp_reply(f)[0] == expected
    wait_delivered(smtp_sink, mark)


def test_pipelined_commands(gw, smtp_sink):
    mark = marker()
    with socket.create_connection(gw.by_name["submission"], timeout=30) as sock:
        f = sock.makefile("rb")
        assert smtp_reply(f)[0] == 220
        # Everything in one write: the local EHLO answer must come first, then the
        # upstream's replies in order.
        sock.sendall(
            b"EHLO client\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
        )
        codes = [smtp_reply(f)[0] for _ in range(4)]
        assert codes == [250, 250, 250, 354]
        sock.sendall(f"Subject: {mark}\r\n\r\npipelined\r\n.\r\nQUIT\r\n".encode())
        assert [smtp_reply(f)[0] for _ in range(2)] == [250, 221]
    wait_delivered(smtp_sink, mark)


def test_swaks_without_auth(gw, smtp_sink):
    require_or_skip("swaks")
    mark = marker()
    host, port = gw.by_name["plain-noauth"]
    result = subprocess.run(
        ["swaks", "--server", f"{host}:{port}", "--to", "rcpt@example.org", "--from", "app@example.org",
         "--header", f"Subject: {mark}", "--timeout", "30"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    wait_delivered(smtp_sink, mark)


def test_20mb_message_byte_for_byte(gw, smtp_sink):
    mark = marker()
    line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ~!@#$%^&*()_+-=[]{}|;:,./<>?\r\n"
    body = line * (20 * 1024 * 1024 // len(line))
    with smtp_to(gw, "submission", timeout=120) as client:
        client.sendmail("alice@example.org", ["rcpt@example.org"], message(mark, body))
    got = wait_delivered(smtp_sink, mark, timeout=120)
    parsed = email.message_from_bytes(got.data)
    assert parsed.get_payload(decode=False).encode() == body


# -- refusals ------------------------------------------------------------------------


def greeting_of(address, timeout=30):
    with socket.create_connection(address, timeout=timeout) as sock:
        reply = smtp_reply(sock.makefile("rb"))
        sock.settimeout(5)
        assert sock.recv(100) == b"", "the gateway must close after a refusal"
        return reply


@pytest.mark.parametrize(
    "name, code, words",
    [
        ("wrong-password", 554, b"refused the credentials: 535"),
        ("untrusted", 554, b"TLS handshake"),
        ("closed", 421, b"connection refused"),
    ],
)
def test_upstream_failures_refuse_with_reason(gw, name, code, words):
    got_code, text = greeting_of(gw.by_name[name])
    assert got_code == code, text
    assert f"destination {name}".encode() in text and words in text
    assert b"not-the-password" not in text


def test_host_name_mismatch(certs, gateway_factory):
    """A server whose certificate is for wrong.example, reached as localhost."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(certs.wrong_name_cert), str(certs.wrong_name_key))
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            try:
                with context.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"220 wrong.example ESMTP\r\n")
                    tls.recv(100)
            except (OSError, ssl.SSLError):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        running = gateway_factory({"destinations": [
            dest("mismatch", "smtps", listener.getsockname()[1], certs)
        ]})
        code, text = greeting_of(running.address())
        assert code == 554 and b"does not match its host name" in text, text
    finally:
        stop.set()
        thread.join()
        listener.close()


def test_silent_upstream_times_out(certs, gateway_factory):
    with realservers.SilentServer() as silent:
        running = gateway_factory({
            "destinations": [dest("silent", "smtp", silent.port, certs)],
            "timeouts": {"login": 1.5},
        })
        code, text = greeting_of(running.address())
    assert code == 421 and b"did not complete the login" in text


def test_oversized_line_refused_and_other_sessions_unharmed(gw, smtp_sink):
    host, port = gw.by_name["plain-noauth"]
    other = smtplib.SMTP(host, port, timeout=30)  # a session already open
    with socket.create_connection((host, port), timeout=30) as sock:
        f = sock.makefile("rb")
        assert smtp_reply(f)[0] == 220
        sock.sendall(b"EHLO " + b"x" * 100_000 + b"\r\n")
        code, text = smtp_reply(f)
        assert code == 500 and b"too long" in text
        assert f.read() == b""  # closed
    mark = marker()
    other.sendmail("a@example.org", ["rcpt@example.org"], message(mark))
    other.quit()
    wait_delivered(smtp_sink, mark)


# -- secrets -------------------------------------------------------------------------


def test_password_never_in_logs_or_app_stream(certs, gateway_factory):
    password = "Zq9-" + uuid.uuid4().hex
    forms = {
        password,
        base64.b64encode(password.encode()).decode(),
        base64.b64encode(f"\0dave\0{password}".encode()).decode(),
        base64.b64encode(f"dave\0dave\0{password}".encode()).decode(),
    }
    with realservers.SMTPSink(auth={"dave": password}) as good, realservers.SMTPSink(auth={"dave": "other"}) as bad:
        with LogCapture() as logs:
            running = gateway_factory({"destinations": [
                {**dest("good", "smtp", good.port, certs), "mail.user": "dave", "mail.password": password,
                 "mail.smtp.starttls.enable": "false"},
                {**dest("bad", "smtp", bad.port, certs), "mail.user": "dave", "mail.password": password,
                 "mail.smtp.starttls.enable": "false"},
                {**dest("login-only", "smtp", good.port, certs), "mail.user": "dave", "mail.password": password,
                 "mail.smtp.starttls.enable": "false"},
            ]})
            stream = bytearray()
            with socket.create_connection(running.address(0), timeout=30) as sock:
                f = sock.makefile("rb")
                for command in [None, b"EHLO x\r\n", b"AUTH PLAIN AGEAYg==\r\n", b"MAIL FROM:<a@b.c>\r\n",
                                b"RCPT TO:<d@e.f>\r\n", b"DATA\r\n", b"Subject: s\r\n\r\nbody\r\n.\r\n", b"QUIT\r\n"]:
                    if command:
                        sock.sendall(command)
                    stream += smtp_reply(f)[1]
            good.wait_for_messages(1)
            stream += greeting_of(running.address(1))[1]
        text = logs.text()
    assert b"535" in stream or b"554" in stream
    for form in forms:
        assert form not in text, "secret in logs"
        assert form.encode() not in bytes(stream), "secret in the application's stream"
    assert "session" in text  # the capture did see the gateway's logs


# -- TLS settings --------------------------------------------------------------------


class _ClientCertRequired:
    """``Certs`` look-alike whose server context demands a client certificate."""

    def __init__(self, certs):
        self.certs = certs

    def server_context(self):
        context = self.certs.server_context()
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(str(self.certs.ca_pem))
        return context


def test_mutual_tls_with_keystore(certs, gateway_factory):
    with realservers.SMTPSink(tls_certs=_ClientCertRequired(certs), implicit_tls=True) as sink:
        base = dest("mtls", "smtps", sink.port, certs, Authentication="NoAuthentication",
                    **{"mail.user": None, "mail.password": None})
        running = gateway_factory({"destinations": [
            {**base, "KeyStoreLocation": str(certs.client_pem)},
            {**base, "Name": "no-client-cert"},
        ]})
        mark = marker()
        with smtplib.SMTP(*running.address(0), timeout=30) as client:
            client.sendmail("a@example.org", ["b@example.org"], message(mark))
        wait_delivered(sink, mark)
        code, text = greeting_of(running.address(1))
        assert code in (421, 554) and b"destination no-client-cert" in text


def test_trust_all_skips_verification_and_warns_each_time(postfix, certs, smtp_sink, gateway_factory):
    with LogCapture() as logs:
        running = gateway_factory({"destinations": [
            dest("trust-all", "smtps", postfix.smtps_port, certs, TrustStoreLocation=str(certs.untrusted_ca_pem), TrustAll="true"),
        ]})
        for _ in range(2):
            mark = marker()
            with smtplib.SMTP(*running.address(), timeout=30) as client:
                client.sendmail("alice@example.org", ["rcpt@example.org"], message(mark))
            wait_delivered(smtp_sink, mark)
    assert logs.text().count("TrustAll is set, the upstream certificate is NOT verified") >= 2


def test_starttls_required_but_not_offered(postfix, certs, gateway_factory):
    running = gateway_factory({"destinations": [
        dest("needs-tls", "smtp", postfix.plain_port, certs, Authentication="NoAuthentication",
             **{"mail.user": None, "mail.password": None, "mail.smtp.starttls.required": "true"}),
    ]})
    code, text = greeting_of(running.address())
    assert code == 554 and b"does not offer STARTTLS" in text
