"""Smoke tests for the real-server fixtures: each one driven directly by stdlib clients
(and swaks/curl), with no mailgw code involved. If these fail, the gateway's integration
tests cannot be trusted."""

import http.server
import imaplib
import json
import poplib
import shutil
import smtplib
import socket
import ssl
import subprocess
import threading
import urllib.parse
import uuid

import pytest

import realservers
from realservers import SEED_MESSAGE

ALICE = ("alice", realservers.DEFAULT_USERS["alice"])
BOB = ("bob", realservers.DEFAULT_USERS["bob"])


def _marker() -> str:
    return uuid.uuid4().hex


def _message(marker: str) -> tuple[bytes, bytes]:
    """A message whose body exercises dot-stuffing, a long line and trailing spaces."""
    body = (
        f"marker {marker}\r\n"
        ".a line starting with a dot\r\n"
        "..two dots\r\n"
        f"{'x' * 1500}\r\n"
        "trailing spaces   \r\n"
    ).encode()
    headers = (
        f"From: alice@example.com\r\nTo: rcpt@example.net\r\nSubject: smoke {marker}\r\n\r\n"
    ).encode()
    return headers + body, body


def _body(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n", 1)[1]


def _socks5_connect(proxy_host, proxy_port, dest_port, auth=None) -> socket.socket:
    """Raw SOCKS5 CONNECT to 127.0.0.1:dest_port; returns the tunnelled socket."""
    s = socket.create_connection((proxy_host, proxy_port), timeout=5)
    if auth:
        s.sendall(b"\x05\x01\x02")
        assert s.recv(2) == b"\x05\x02"
        user, password = (x.encode() for x in auth)
        s.sendall(b"\x01" + bytes([len(user)]) + user + bytes([len(password)]) + password)
        assert s.recv(2) == b"\x01\x00"
    else:
        s.sendall(b"\x05\x01\x00")
        assert s.recv(2) == b"\x05\x00"
    s.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + dest_port.to_bytes(2, "big"))
    reply = b""
    while len(reply) < 10:
        chunk = s.recv(10 - len(reply))
        assert chunk, "proxy closed during CONNECT"
        reply += chunk
    assert reply[:2] == b"\x05\x00", reply
    return s


def _read_line(s: socket.socket) -> bytes:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = s.recv(1)
        assert chunk
        buf += chunk
    return buf


# --------------------------------------------------------------------------------------
# Certificates


def _handshake(server_ctx, client_ctx, server_hostname):
    """TLS handshake in memory; raises the client's ssl error if any."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=server_hostname)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"c": False, "s": False}
    for _ in range(20):
        for name, obj in (("c", client), ("s", server)):
            if not done[name]:
                try:
                    obj.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLError:
                    if name == "c":
                        raise
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return
    raise AssertionError("handshake did not finish")


def test_certs(certs):
    def server_ctx(cert, key):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(cert), str(key))
        return ctx

    trusted = certs.client_context()
    _handshake(server_ctx(certs.server_cert, certs.server_key), trusted, "localhost")
    _handshake(server_ctx(certs.server_pem, certs.server_pem), trusted, "127.0.0.1")
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
        _handshake(server_ctx(certs.untrusted_cert, certs.untrusted_key), trusted, "localhost")
    _handshake(
        server_ctx(certs.untrusted_pem, certs.untrusted_pem),
        ssl.create_default_context(cafile=str(certs.untrusted_ca_pem)),
        "localhost",
    )
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        _handshake(server_ctx(certs.wrong_name_cert, certs.wrong_name_key), trusted, "localhost")
    _handshake(server_ctx(certs.wrong_name_pem, certs.wrong_name_pem), trusted, "wrong.example")
    # Mutual TLS: the client leaf is accepted by a server that trusts the CA.
    mtls = server_ctx(certs.server_cert, certs.server_key)
    mtls.load_verify_locations(str(certs.ca_pem))
    mtls.verify_mode = ssl.CERT_REQUIRED
    _handshake(mtls, certs.client_context(client_cert=True), "localhost")


# --------------------------------------------------------------------------------------
# Dovecot


def test_imap_starttls_login_fetch(dovecot, certs):
    with imaplib.IMAP4(dovecot.host, dovecot.imap_port, timeout=10) as imap:
        assert "STARTTLS" in imap.capabilities
        imap.starttls(ssl_context=certs.client_context())
        imap.login(*ALICE)
        typ, data = imap.select("INBOX")
        assert typ == "OK" and int(data[0]) >= 1
        typ, data = imap.fetch("1", "(BODY.PEEK[])")
        assert typ == "OK"
        assert data[0][1] == SEED_MESSAGE


def test_imaps_login(dovecot, certs):
    with imaplib.IMAP4_SSL(
        dovecot.host, dovecot.imaps_port, ssl_context=certs.client_context(), timeout=10
    ) as imap:
        imap.login(*ALICE)
        assert imap.select("INBOX", readonly=True)[0] == "OK"


def test_imap_odd_password_and_wrong_password(dovecot):
    with imaplib.IMAP4(dovecot.host, dovecot.imap_port, timeout=10) as imap:
        # imaplib sends bob's password as a quoted string with \" and \\ escapes.
        assert imap.login(*BOB)[0] == "OK"
    for user, password in (("alice", "wrong"), ("nobody", "secret"), ("alice", "")):
        with imaplib.IMAP4(dovecot.host, dovecot.imap_port, timeout=10) as imap:
            with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
                imap.login(user, password)


def test_pop3_stls_login_retr(dovecot, certs):
    pop = poplib.POP3(dovecot.host, dovecot.pop3_port, timeout=10)
    try:
        assert "STLS" in pop.capa()
        pop.stls(context=certs.client_context())
        pop.user("alice")
        pop.pass_("secret")
        _, lines, _ = pop.retr(1)
        assert b"\r\n".join(lines) + b"\r\n" == SEED_MESSAGE
    finally:
        pop.quit()


def test_pop3s_login(dovecot, certs):
    pop = poplib.POP3_SSL(dovecot.host, dovecot.pop3s_port, context=certs.client_context(),
                          timeout=10)
    try:
        pop.user("bob")
        pop.pass_(BOB[1])
        assert pop.stat()[0] >= 1
    finally:
        pop.quit()
    pop = poplib.POP3_SSL(dovecot.host, dovecot.pop3s_port, context=certs.client_context(),
                          timeout=10)
    try:
        pop.user("alice")
        with pytest.raises(poplib.error_proto):
            pop.pass_("wrong")
    finally:
        pop.close()


def test_dovecot_submission_relays_to_sink(dovecot, smtp_sink, certs):
    marker = _marker()
    msg, body = _message(marker)
    with smtplib.SMTP(dovecot.host, dovecot.submission_port, timeout=10) as smtp:
        smtp.starttls(context=certs.client_context())
        smtp.login(*ALICE)
        smtp.sendmail("alice@example.com", ["rcpt@example.net"], msg)
    got = smtp_sink.wait_for(lambda m: marker.encode() in m.data)
    assert got.rcpt_tos == ["rcpt@example.net"]
    assert _body(got.data) == body
    with smtplib.SMTP_SSL(dovecot.host, dovecot.submissions_port,
                          context=certs.client_context(), timeout=10) as smtp:
        assert smtp.login(*BOB)[0] == 235


def test_dovecot_require_tls_variant(tmp_path, certs):
    realservers.require_or_skip(realservers.Dovecot.TOOLS)
    with realservers.Dovecot(tmp_path, certs, users={"carol": "pw"}, require_tls=True) as d:
        with imaplib.IMAP4(d.host, d.imap_port, timeout=10) as imap:
            assert "LOGINDISABLED" in imap.capabilities
            with pytest.raises(imaplib.IMAP4.error):
                imap.login("carol", "pw")
        with imaplib.IMAP4(d.host, d.imap_port, timeout=10) as imap:
            imap.starttls(ssl_context=certs.client_context())
            assert imap.login("carol", "pw")[0] == "OK"


def test_dovecot_oauth2_passdb(tmp_path, certs):
    realservers.require_or_skip(realservers.Dovecot.TOOLS)
    seen = []

    class Introspect(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"])).decode()
            # Dovecot posts token=...&client_id=&client_secret=
            token = urllib.parse.parse_qs(body).get("token", [""])[0]
            seen.append(token)
            active = token == "good-token"
            answer = {"active": active, "username": "alice"} if active else {"active": False}
            data = json.dumps(answer).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Introspect)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/introspect"
    try:
        with realservers.Dovecot(tmp_path, certs, oauth2_introspection_url=url) as d:
            def xoauth2(token):
                return lambda _: f"user=alice\x01auth=Bearer {token}\x01\x01".encode()

            with imaplib.IMAP4(d.host, d.imap_port, timeout=10) as imap:
                assert imap.authenticate("XOAUTH2", xoauth2("good-token"))[0] == "OK"
            with imaplib.IMAP4(d.host, d.imap_port, timeout=10) as imap:
                with pytest.raises(imaplib.IMAP4.error):
                    imap.authenticate("XOAUTH2", xoauth2("bad-token"))
            with imaplib.IMAP4(d.host, d.imap_port, timeout=10) as imap:
                # The password passdb does not take a token, nor the oauth2 one a password.
                with pytest.raises(imaplib.IMAP4.error):
                    imap.login("alice", "good-token")
            assert "good-token" in seen
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_dovecot_seed_and_messages(tmp_path, certs):
    realservers.require_or_skip(realservers.Dovecot.TOOLS)
    with realservers.Dovecot(tmp_path, certs, users={"dave": "pw"}) as d:
        d.seed("dave", SEED_MESSAGE)
        d.seed("dave", b"Subject: second\r\n\r\nin Archive\r\n", mailbox="Archive")
        assert d.messages("dave") == [SEED_MESSAGE.replace(b"\r\n", b"\n")]
        assert d.messages("dave", "Archive") == [b"Subject: second\n\nin Archive\n"]


# --------------------------------------------------------------------------------------
# Postfix


def test_postfix_submission_starttls_auth_relays_byte_exact(postfix, smtp_sink, certs):
    marker = _marker()
    msg, body = _message(marker)
    with smtplib.SMTP(postfix.host, postfix.submission_port, timeout=10) as smtp:
        assert smtp.ehlo()[0] == 250
        assert not smtp.has_extn("auth"), "AUTH must wait for STARTTLS"
        smtp.starttls(context=certs.client_context())
        assert smtp.ehlo()[0] == 250
        smtp.user, smtp.password = ALICE
        assert smtp.auth("PLAIN", smtp.auth_plain)[0] == 235
        smtp.sendmail("alice@example.com", ["rcpt@example.net"], msg)
    got = smtp_sink.wait_for(lambda m: marker.encode() in m.data)
    assert got.mail_from == "alice@example.com"
    assert got.rcpt_tos == ["rcpt@example.net"]
    assert _body(got.data) == body


def test_postfix_submission_refuses_unauthenticated_relay(postfix, certs):
    with smtplib.SMTP(postfix.host, postfix.submission_port, timeout=10) as smtp:
        with pytest.raises(smtplib.SMTPSenderRefused) as err:
            smtp.sendmail("a@example.com", ["b@example.net"], b"Subject: x\r\n\r\nx\r\n")
        assert err.value.smtp_code == 530  # STARTTLS first
        assert smtp.rset()[0] == 530  # even RSET waits for STARTTLS here
        smtp.starttls(context=certs.client_context())
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            smtp.sendmail("a@example.com", ["b@example.net"], b"Subject: x\r\n\r\nx\r\n")


def test_postfix_smtps_auth(postfix, smtp_sink, certs):
    marker = _marker()
    msg, body = _message(marker)
    with smtplib.SMTP_SSL(postfix.host, postfix.smtps_port, context=certs.client_context(),
                          timeout=10) as smtp:
        smtp.login(*BOB)
        smtp.sendmail("bob@example.com", ["rcpt@example.net"], msg)
    assert _body(smtp_sink.wait_for(lambda m: marker.encode() in m.data).data) == body


def test_postfix_wrong_password_refused(postfix, certs):
    with smtplib.SMTP_SSL(postfix.host, postfix.smtps_port, context=certs.client_context(),
                          timeout=10) as smtp:
        with pytest.raises(smtplib.SMTPAuthenticationError) as err:
            smtp.login("alice", "wrong")
        assert err.value.smtp_code == 535


def test_postfix_plain_port_relays_without_auth(postfix, smtp_sink):
    marker = _marker()
    msg, body = _message(marker)
    with smtplib.SMTP(postfix.host, postfix.plain_port, timeout=10) as smtp:
        assert smtp.ehlo()[0] == 250
        assert not smtp.has_extn("starttls") and not smtp.has_extn("auth")
        smtp.sendmail("anyone@example.com", ["rcpt@example.net"], msg)
    assert _body(smtp_sink.wait_for(lambda m: marker.encode() in m.data).data) == body


def test_swaks_against_postfix_submission(postfix, smtp_sink, certs):
    realservers.require_or_skip("swaks")
    marker = _marker()
    out = subprocess.run(
        ["swaks", "--server", f"{postfix.host}:{postfix.submission_port}", "--tls",
         "--tls-ca-path", str(certs.ca_pem), "--auth", "PLAIN", "--auth-user", "alice",
         "--auth-password", "secret", "--from", "alice@example.com",
         "--to", "rcpt@example.net", "--header", f"Subject: {marker}"],
        capture_output=True, text=True, timeout=30,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    smtp_sink.wait_for(lambda m: marker.encode() in m.data)


def test_curl_imaps_fetch(dovecot, certs):
    realservers.require_or_skip("curl")
    out = subprocess.run(
        ["curl", "-sS", "--cacert", str(certs.ca_pem), "--user", "alice:secret",
         f"imaps://localhost:{dovecot.imaps_port}/INBOX;UID=1"],
        capture_output=True, timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == SEED_MESSAGE


# --------------------------------------------------------------------------------------
# SMTP sink variants (in-process aiosmtpd)


def test_sink_auth_and_tls_variants(certs):
    realservers.import_or_skip("aiosmtpd")
    with realservers.SMTPSink(auth={"u": "p w"}) as sink:
        with smtplib.SMTP(sink.host, sink.port, timeout=10) as smtp:
            with pytest.raises(smtplib.SMTPAuthenticationError):
                smtp.login("u", "wrong")
            smtp.login("u", "p w")
            smtp.sendmail("a@x", ["b@y"], b"Subject: s\r\n\r\nhi\r\n")
        assert sink.wait_for_messages(1)[0] == ("a@x", ["b@y"], b"Subject: s\r\n\r\nhi\r\n")
        attempts = sink.auth_attempts
        assert attempts[-1] == ("PLAIN", "u", True)
        assert not any(a.success for a in attempts[:-1])
    with realservers.SMTPSink(tls_certs=certs, require_starttls=True) as sink:
        with smtplib.SMTP(sink.host, sink.port, timeout=10) as smtp:
            with pytest.raises(smtplib.SMTPSenderRefused):
                smtp.sendmail("a@x", ["b@y"], b"x\r\n")
            smtp.starttls(context=certs.client_context())
            smtp.sendmail("a@x", ["b@y"], b"x\r\n")
        sink.wait_for_messages(1)
    with realservers.SMTPSink(tls_certs=certs, implicit_tls=True, auth={"u": "p"}) as sink:
        with smtplib.SMTP_SSL(sink.host, sink.port, context=certs.client_context(),
                              timeout=10) as smtp:
            smtp.login("u", "p")


# --------------------------------------------------------------------------------------
# SOCKS5 proxies


def test_microsocks_tunnels_to_postfix(microsocks, postfix):
    with _socks5_connect(microsocks.host, microsocks.port, postfix.plain_port) as s:
        assert _read_line(s).startswith(b"220 ")


def test_microsocks_with_auth(postfix):
    realservers.require_or_skip(realservers.Microsocks.TOOLS)
    with realservers.Microsocks(user="sockuser", password="sockpass") as proxy:
        with _socks5_connect(proxy.host, proxy.port, postfix.plain_port,
                             auth=("sockuser", "sockpass")) as s:
            assert _read_line(s).startswith(b"220 ")
        with socket.create_connection((proxy.host, proxy.port), timeout=5) as s:
            s.sendall(b"\x05\x01\x00")
            assert s.recv(2) == b"\x05\xff"  # no acceptable method without credentials


def test_dante_tunnels_to_postfix(tmp_path, postfix):
    realservers.require_or_skip(realservers.Dante.TOOLS)
    with realservers.Dante(tmp_path) as proxy:
        with _socks5_connect(proxy.host, proxy.port, postfix.plain_port) as s:
            assert _read_line(s).startswith(b"220 ")


# --------------------------------------------------------------------------------------
# Misbehaving peers and the skip rule


def test_silent_server_and_closed_port():
    with realservers.SilentServer() as silent:
        with socket.create_connection((silent.host, silent.port), timeout=5) as s:
            s.settimeout(0.3)
            with pytest.raises(TimeoutError):
                s.recv(1)
    with realservers.ClosedPort() as closed:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((closed.host, closed.port), timeout=5)


def test_require_or_skip(monkeypatch):
    realservers.require_or_skip(["sh", "/bin/sh"])
    monkeypatch.delenv(realservers.REQUIRE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match="no-such-tool-xyz not installed"):
        realservers.require_or_skip("no-such-tool-xyz")
    monkeypatch.setenv(realservers.REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="no-such-tool-xyz not installed"):
        realservers.require_or_skip("no-such-tool-xyz")
    assert shutil.which("sh")


def test_postfix_and_sink_pass_a_20mb_message(postfix, smtp_sink):
    marker = _marker()
    line = b"y" * 998 + b"\r\n"
    body = line * (20 * 1024 * 1024 // len(line) + 1)
    msg = f"Subject: big {marker}\r\n\r\n".encode() + body
    with smtplib.SMTP(postfix.host, postfix.plain_port, timeout=30) as smtp:
        smtp.sendmail("big@example.com", ["rcpt@example.net"], msg)
    got = smtp_sink.wait_for(lambda m: marker.encode() in m.data[:1000], timeout=30)
    assert _body(got.data) == body
