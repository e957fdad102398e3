"""OAuth2 through the gateway: a real Dovecot whose oauth2 passdb introspects the test
token service (tests/tokenservice.py)."""

from __future__ import annotations

import imaplib
import poplib
import smtplib
import socket
import uuid

import pytest

import realservers
from gatewayharness import LogCapture
from tokenservice import TokenService

CLIENT_ID, CLIENT_SECRET = "mailgw-client", "cs-" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def tokens(monkeypatch_module):
    monkeypatch_module.setenv("OAUTHLIB_INSECURE_TRANSPORT", "1")  # the test service is http
    with TokenService(clients={CLIENT_ID: CLIENT_SECRET}, cc_usernames={CLIENT_ID: "alice"}) as service:
        yield service


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def oauth_dovecot(tmp_path_factory, certs, smtp_sink, tokens):
    realservers.require_or_skip(realservers.Dovecot.TOOLS)
    server = realservers.Dovecot(
        tmp_path_factory.mktemp("dovecot-oauth"), certs, users={"alice": "pw-" + uuid.uuid4().hex},
        relay=(smtp_sink.host, smtp_sink.port), oauth2_introspection_url=tokens.introspection_url,
    )
    with server:
        server.seed("alice", realservers.SEED_MESSAGE)
        yield server


def cc_dest(name, protocol, port, certs, tokens, **extra):
    d = {
        "Name": name, "Type": "MAIL", "ProxyType": "Internet", "Authentication": "OAuth2ClientCredentials",
        "mail.transport.protocol": protocol, f"mail.{protocol}.host": "localhost", f"mail.{protocol}.port": str(port),
        "mail.user": "alice", "TrustStoreLocation": str(certs.ca_pem),
        "tokenServiceURL": tokens.token_url, "clientId": CLIENT_ID, "clientSecret": CLIENT_SECRET,
        "tokenServiceURLType": "Dedicated",
    }
    d.update(extra)
    return d


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
