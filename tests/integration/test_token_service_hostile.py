"""A token service that echoes the request's credentials in its error_description
(SPEC 9.6): what reaches the application and the log is redacted, for the eager
client-credentials grant (the SMTP refusal greeting) and the lazy refresh-token exchange
(the IMAP reply to AUTHENTICATE, upstream: real Dovecot)."""

from __future__ import annotations

import socket

import pytest

import realservers
from gatewayharness import LogCapture
import tokenservice
from support.destinations import mail
from support.clients import read_line, read_tagged
from support.secretscan import Secret, assert_no_secrets
from support.wire import xoauth2

CLIENT_ID = "mailgw-client"
CLIENT_SECRET = "cs/echo+me=if&you dare"
REFRESH = "rt/alice+echo=me"


@pytest.fixture(scope="module")
def echoing():
    with tokenservice.running(clients={CLIENT_ID: CLIENT_SECRET}) as service:
        service.add_refresh_token(REFRESH, "alice")
        service.echo_credentials = True
        yield service


@pytest.fixture(scope="module")
def oauth_dovecot(tmp_path_factory, certs, smtp_sink, echoing):
    """Dovecot offering XOAUTH2, so the gateway greets and the exchange is attempted."""
    workdir, relay = tmp_path_factory.mktemp("dovecot-echo"), (smtp_sink.host, smtp_sink.port)
    with realservers.oauth_dovecot(workdir, certs, relay, echoing.introspection_url) as server:
        yield server


def destination(name, authentication, protocol, port, certs, echoing):
    return mail(name, protocol, port, authentication=authentication, password=None, ca=certs.ca_pem,
                tokenServiceURL=echoing.token_url, clientId=CLIENT_ID, clientSecret=CLIENT_SECRET)


def test_echoed_credentials_never_reach_the_application_or_the_log(oauth_dovecot, certs, echoing, gateway_factory):
    dovecot = oauth_dovecot
    with LogCapture() as logs:
        gateway = gateway_factory({"destinations": [
            destination("cc-smtp", "OAuth2ClientCredentials", "smtp", dovecot.submission_port, certs, echoing),
            destination("rt-imaps", "OAuth2RefreshToken", "imap4s", dovecot.imaps_port, certs, echoing),
        ]})
        # Eager: the refusal greeting names the token service's error.
        with socket.create_connection(gateway.address(0), timeout=30) as sock:
            smtp_reply = sock.makefile("rb").readline()
        assert smtp_reply[:1] in (b"4", b"5") and b"invalid_client" in smtp_reply, smtp_reply
        # Lazy: the application's refresh token is exchanged and refused.
        with socket.create_connection(gateway.address(1), timeout=30) as sock:
            greeting = read_line(sock)
            assert greeting.startswith(b"* OK"), greeting
            sock.sendall(b"t1 AUTHENTICATE XOAUTH2 " + xoauth2("alice", REFRESH) + b"\r\n")
            imap_reply = read_tagged(sock, b"t1")
        assert b"t1 NO [AUTHENTICATIONFAILED]" in imap_reply and b"invalid_client" in imap_reply, imap_reply
        assert b"***" in imap_reply  # the echo arrived, redacted
    secrets = [Secret("client secret", CLIENT_SECRET, user=CLIENT_ID), Secret("refresh token", REFRESH, user="alice")]
    for where, text in (("the SMTP reply", smtp_reply), ("the IMAP reply", imap_reply), ("the log", logs.text())):
        assert_no_secrets(text, secrets, where, ignore_case=True)
