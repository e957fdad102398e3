"""What ended sessions report to the operator through the Gateway: one SessionAudit each
(SPEC 9.3) and the status board's last success, last failure and token expiry.  In-memory
transports and a Clock, as in test_session.py."""

from __future__ import annotations

import json

from twisted.internet.address import IPv6Address
from twisted.internet.defer import succeed
from twisted.internet.task import Clock

from mailgw.audit import SessionAudit
from mailgw.destination import parse_destination
from mailgw.oauth import AccessToken, TokenCache, TokenProvider
from mailgw.settings import Route, Settings
from support.destinations import mail, plain
from support.inmemory import in_memory_gateway, open_session
from support.secretscan import Secret, assert_no_secrets

T0 = 1_700_000_000.0
PLAIN_SMTP = parse_destination(plain("plain"))
CLIENT_SECRET = "cs-" + "5f0c9e2a7d" * 3
ACCESS_TOKEN = "at-" + "a1b2c3d4e5" * 3
CC_SMTP = parse_destination(mail(
    "cc", "smtp", 587, host="127.0.0.1", authentication="OAuth2ClientCredentials", user="alice@example.org",
    password=None, tokenServiceURL="http://127.0.0.1:1/oauth/token", clientId="gw", clientSecret=CLIENT_SECRET,
    **{"mail.smtp.starttls.enable": "false"},
))


class Recorder:
    """Stands in for the AuditLog."""

    def __init__(self):
        self.records = []

    def write(self, record):
        self.records.append(record)


class TokenClient:
    def __init__(self, clock):
        self.clock = clock

    def client_credentials(self, *args):
        return succeed(AccessToken(ACCESS_TOKEN, expires_at=self.clock.seconds() + 3600, expires_in=3600))


def make(destination=PLAIN_SMTP, settings=Settings(), peer=None):
    clock = Clock()
    clock.advance(T0)
    tokens = TokenProvider(TokenClient(clock), TokenCache(clock))
    _, gateway, endpoint = in_memory_gateway(destination, settings=settings, clock=clock, tokens=tokens, audit=Recorder())
    session, app = open_session(gateway, Route(destination.name), peer)
    return clock, gateway, session, app, endpoint


def end(session):
    session.connectionLost(None)
    return session.gateway.audit.records


def test_a_relayed_session_is_audited_and_its_destination_succeeded():
    clock, gateway, session, app, endpoint = make()
    endpoint.protocol.dataReceived(b"220 upstream ESMTP\r\n")
    endpoint.protocol.dataReceived(b"250-upstream\r\n250 PIPELINING\r\n")
    clock.advance(2)
    session.dataReceived(b"MAIL FROM:<a@example.org>\r\n")
    endpoint.protocol.dataReceived(b"250 ok\r\n")
    clock.advance(1.5)
    (record,) = end(session)
    assert isinstance(record, SessionAudit)
    peer = app.getPeer()
    assert record.to_json() == {
        "time": "2023-11-14T22:13:23.500Z", "sid": session.sid, "destination": "plain", "tenant": None,
        "client": f"{peer.host}:{peer.port}", "upstream": "127.0.0.1:25", "authentication": "NoAuthentication",
        "outcome": "relayed", "reason": None, "released": True,
        "bytes_to_upstream": len(b"MAIL FROM:<a@example.org>\r\n"), "bytes_to_app": len(b"250 ok\r\n"),
        "seconds": 3.5, "tls": None,
    }
    assert gateway.status.destinations()["plain"]["last_success"] == {"time": "2023-11-14T22:13:20.000Z"}
    assert "a@example.org" not in json.dumps(record.to_json())


def test_ipv6_addresses_are_audited_in_brackets():
    """``[2001:db8::7]:50412``: without the brackets the port reads as part of the address."""
    v6 = parse_destination(plain("v6", host="2001:db8::1"))
    clock, gateway, session, app, endpoint = make(v6, peer=IPv6Address("TCP", "2001:db8::7", 50412))
    (record,) = end(session)
    assert (record.client, record.upstream) == ("[2001:db8::7]:50412", "[2001:db8::1]:25")


def test_a_session_over_the_limit_is_audited_as_refused_with_reason_limit():
    clock, gateway, session, app, endpoint = make(settings=Settings(max_sessions_per_destination=0))
    assert app.value().startswith(b"421 ")
    (record,) = end(session)
    assert (record.outcome, record.reason, record.released, record.upstream) == ("refused", "limit", False, None)
    failure = gateway.status.destinations()["plain"]["last_failure"]
    assert failure["kind"] == "limit" and failure["reason"].startswith("destination plain: too many sessions")


def test_an_application_leaving_before_release_is_closed():
    clock, gateway, session, app, endpoint = make()
    endpoint.protocol.dataReceived(b"220 upstream ESMTP\r\n250-upstream\r\n250 PIPELINING\r\n")
    (record,) = end(session)
    assert (record.outcome, record.reason, record.released, record.bytes_to_app) == ("closed", None, False, 0)


def test_client_credentials_token_expiry_reaches_the_board_but_never_the_token():
    clock, gateway, session, app, endpoint = make(CC_SMTP)
    endpoint.protocol.dataReceived(b"220 upstream ESMTP\r\n")
    endpoint.protocol.dataReceived(b"250-upstream\r\n250 AUTH XOAUTH2 OAUTHBEARER\r\n")
    assert endpoint.transport.value().split(b"\r\n")[1].startswith(b"AUTH XOAUTH2 ")
    endpoint.protocol.dataReceived(b"235 2.7.0 ok\r\n")
    assert app.value().startswith(b"220 ")
    entry = gateway.status.destinations()["cc"]
    assert entry["token_expires"] == "2023-11-14T23:13:20.000Z" and entry["token_expires_in"] == 3600.0
    (record,) = end(session)
    assert record.authentication == "OAuth2ClientCredentials"
    secrets = [Secret("client secret", CLIENT_SECRET, user="gw"), Secret("access token", ACCESS_TOKEN, user="alice@example.org")]
    assert_no_secrets(json.dumps(gateway.status.destinations()), secrets, "the status board")
    assert_no_secrets(json.dumps(record.to_json()), secrets, "the audit record")
