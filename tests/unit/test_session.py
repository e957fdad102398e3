"""GatewaySession's glue on in-memory transports and a Clock: no sockets, no reactor."""

from __future__ import annotations

import pytest
from OpenSSL import SSL
from twisted.internet import error
from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure

from mailgw import errors
from mailgw.destination import parse_destination
from mailgw.endpoints.chain import ConfigurationError
from mailgw.protocol.actions import MisuseError
from mailgw.protocol.session import Phase
from mailgw.settings import Route, Settings
from support.destinations import mail, plain
from support.inmemory import in_memory_gateway, open_session
from support.wire import xoauth2

PLAIN_SMTP = parse_destination(plain("plain"))


def make(settings=Settings()):
    clock, gateway, endpoint = in_memory_gateway(PLAIN_SMTP, settings=settings)
    session, app = open_session(gateway, Route("plain"))
    return clock, gateway, session, app, endpoint


def upstream_says(endpoint, data: bytes):
    endpoint.protocol.dataReceived(data)


def test_greets_after_upstream_login_then_releases_and_relays():
    clock, gateway, session, app, endpoint = make()
    assert app.value() == b""  # nothing until the upstream is ready
    endpoint.smtp_ready()
    assert app.value().startswith(b"220 ")
    endpoint.transport.clear()
    session.dataReceived(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\n")
    assert session.phase is Phase.RELAYING
    assert endpoint.transport.value() == b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\n"
    app.clear()
    upstream_says(endpoint, b"250 ok\r\n250 ok\r\n")
    assert app.value() == b"250 ok\r\n250 ok\r\n"


def test_early_application_bytes_are_kept_in_order():
    clock, gateway, session, app, endpoint = make()
    session.dataReceived(b"EHLO early\r\nMAIL FROM:<a@example.org>\r\n")
    endpoint.smtp_ready()
    assert session.phase is Phase.RELAYING
    assert app.value().split(b"\r\n")[1].startswith(b"250-mailgw")
    assert endpoint.transport.value() == b"EHLO mailgw\r\nMAIL FROM:<a@example.org>\r\n"


def test_too_much_early_data_is_refused():
    clock, gateway, session, app, endpoint = make(Settings(max_line=100))
    session.dataReceived(b"x" * 200)
    assert app.value().startswith(b"554 ") and app.disconnecting


def test_login_timeout_refuses_with_421():
    clock, gateway, session, app, endpoint = make(Settings(login_timeout=5))
    clock.advance(5)
    assert app.value().startswith(b"421 ") and b"did not complete the login" in app.value()
    assert app.disconnecting and endpoint.transport.disconnecting


def test_idle_application_before_release_gets_goodbye():
    clock, gateway, session, app, endpoint = make(Settings(idle_timeout=30))
    endpoint.smtp_ready()
    app.clear()
    clock.advance(29)
    session.dataReceived(b"NOOP\r\n")
    clock.advance(29)
    assert not app.disconnecting
    clock.advance(2)
    assert b"421 4.3.2 mailgw: idle timeout" in app.value() and app.disconnecting


def test_upstream_closing_after_release_closes_the_application():
    clock, gateway, session, app, endpoint = make()
    endpoint.smtp_ready()
    session.dataReceived(b"QUIT\r\n")
    endpoint.protocol.connectionLost(None)
    assert app.disconnecting


def test_application_closing_closes_upstream_and_ends_the_session():
    clock, gateway, session, app, endpoint = make()
    endpoint.smtp_ready()
    assert session in gateway.sessions
    session.connectionLost(None)
    assert endpoint.transport.disconnecting and session not in gateway.sessions
    assert session.closed.called


def logged_in(released):
    """A session logged in upstream (``make()``'s five), released by ``MAIL FROM`` or not."""
    clock, gateway, session, app, endpoint = made = make()
    endpoint.smtp_ready()
    if released:
        session.dataReceived(b"MAIL FROM:<a@example.org>\r\n")
    return made


@pytest.mark.parametrize("released", [False, True])
def test_drain_timeout_closes_open_sessions_with_goodbye(released):
    clock, gateway, session, app, endpoint = logged_in(released)
    app.clear()
    done = gateway.drain(10)
    assert not done.called
    clock.advance(10)
    assert app.value().startswith(b"421 4.3.2 mailgw: the gateway is shutting down") and app.disconnecting
    session.connectionLost(None)
    assert done.called and gateway.draining


class StoppedConnecting:
    """An upstream endpoint whose connect never completes and, cancelled, fails as a
    real connector does when told to stop connecting (UserError)."""

    def connect(self, factory):
        return Deferred(lambda d: d.errback(error.UserError()))


def internal_errors(events):
    return [e for e in events if "internal error" in e.get("log_format", "")]


@pytest.mark.parametrize("ending", ["application hangs up", "refused while connecting"])
def test_ending_a_session_while_it_connects_is_no_internal_error(events, ending):
    clock, gateway, _ = in_memory_gateway(PLAIN_SMTP, settings=Settings(max_line=100))
    gateway.upstream_endpoint = lambda destination, tenant: StoppedConnecting()
    session, app = open_session(gateway, Route("plain"))
    assert session._pending  # the connect is in flight
    if ending == "application hangs up":
        session.connectionLost(None)
    else:
        session.dataReceived(b"x" * 200)  # too much before the greeting: refused
        assert app.value().startswith(b"554 ")
    assert not session._pending and internal_errors(events) == []


@pytest.mark.parametrize("exc, reason", [
    (error.TCPTimedOutError(), "timeout"),
    (error.ConnectBindError(), "connect"),
    (error.UnknownHostError(), "connect"),
    (error.ConnectError(osError=24, string="Too many open files"), "connect"),
])
def test_network_failures_are_refusals_of_their_class_not_internal_errors(exc, reason):
    refusal = errors.describe(Failure(exc), "mail.example.org:587")
    assert refusal.reason.value == reason and not refusal.permanent
    assert refusal.text.startswith(("cannot connect to mail.example.org:587", "timed out connecting to"))


def test_a_destination_the_gateway_cannot_reach_is_refused_with_its_reason(events, tmp_path):
    smtps = parse_destination(mail("tls", "smtps", 465, ca=tmp_path / "missing.pem"))
    clock, gateway, _ = in_memory_gateway(PLAIN_SMTP, smtps)

    def no_proxy(destination, tenant):
        raise ConfigurationError(f"destination {destination.name!r} is OnPremise but no connectivityProxy is configured")

    gateway.upstream_endpoint = no_proxy
    session, app = open_session(gateway, Route("plain"))
    assert app.value().startswith(b"554 5.3.0 mailgw: destination plain: destination 'plain' is OnPremise")
    session, app = open_session(gateway, Route("tls"))
    assert b"cannot read" in app.value() and b"missing.pem" in app.value()
    kinds = {name: entry["last_failure"]["kind"] for name, entry in gateway.status.destinations().items()}
    assert kinds == {"plain": "connect", "tls": "tls"} and internal_errors(events) == []


def test_the_per_client_limit_counts_ip_clients_and_leaves_unix_socket_clients_alone():
    clock, gateway, _ = in_memory_gateway(PLAIN_SMTP, settings=Settings(max_sessions_per_client=1))
    first = [open_session(gateway, Route("plain"), UNIXAddress(None))[1] for _ in range(3)]
    assert not any(app.value() for app in first)  # no refusal: UNIX peers have no address to count
    open_session(gateway, Route("plain"), IPv4Address("TCP", "192.0.2.7", 1000))
    _, app = open_session(gateway, Route("plain"), IPv4Address("TCP", "192.0.2.7", 1001))
    assert app.value().startswith(b"421 ") and b"too many sessions from 192.0.2.7" in app.value()


def misused(*args):
    raise MisuseError("a machine called in a state that does not allow it")


@pytest.mark.parametrize("greeted", [False, True])
def test_a_machine_misused_ends_only_its_session_as_an_internal_error(events, greeted):
    clock, gateway, session, app, endpoint = make()
    if greeted:
        endpoint.smtp_ready()
        app.clear()
        session.machine.app_data = misused
        session.dataReceived(b"NOOP\r\n")  # raises nothing into Twisted
        assert app.value() == b"421 4.3.2 mailgw: internal error in the gateway\r\n"
    else:
        session.machine.upstream_data = misused
        endpoint.protocol.dataReceived(b"220 upstream ESMTP\r\n")
        assert app.value() == b"421 4.3.0 mailgw: destination plain: internal error in the gateway\r\n"
        assert gateway.status.destinations()["plain"]["last_failure"]["kind"] == "internal"
    assert app.disconnecting and len(internal_errors(events)) == 1


def test_the_login_phase_of_a_lazy_destination_times_the_login_not_the_dialogue():
    lazy = parse_destination(mail(
        "lazy", "smtp", 587, host="127.0.0.1", authentication="OAuth2RefreshToken", password=None,
        tokenServiceURL="http://127.0.0.1:1/oauth/token", clientId="gw", clientSecret="cs-0123456789",
        **{"mail.smtp.starttls.enable": "false"},
    ))
    clock, gateway, endpoint = in_memory_gateway(lazy)
    gateway.exchange = lambda route, destination, secret: succeed("at-0123456789")
    phases = []
    gateway.upstream_phase = lambda session, phase, seconds: phases.append((phase, seconds))
    session, app = open_session(gateway, Route("lazy"))
    endpoint.protocol.dataReceived(b"220 upstream ESMTP\r\n250-upstream\r\n250 AUTH XOAUTH2\r\n")
    assert app.value().startswith(b"220 ")
    clock.advance(50)  # the application takes its time before it authenticates
    session.dataReceived(b"AUTH XOAUTH2 " + xoauth2("alice", "rt-0123456789") + b"\r\n")
    clock.advance(2)
    endpoint.protocol.dataReceived(b"235 2.7.0 ok\r\n")
    assert app.value().endswith(b"235 2.7.0 Authentication successful\r\n")
    assert ("login", 2) in phases


@pytest.mark.parametrize("released", [False, True])
def test_a_closed_session_leaves_no_abort_timer_behind(released):
    # Each would keep the session's whole object graph alive for CLOSE_GRACE seconds.
    clock, gateway, session, app, endpoint = logged_in(released)
    session.connectionLost(None)
    assert endpoint.transport.disconnecting and clock.getDelayedCalls()  # the upstream's deadline
    endpoint.protocol.connectionLost(None)
    assert clock.getDelayedCalls() == []


@pytest.mark.parametrize("why, reason", [
    ("certificate verify failed", "certificate"),
    ("tlsv1 alert unknown ca, self-signed certificate", "certificate"),
    ("wrong version number", "tls"),
])
def test_openssl_reasons_that_name_a_certificate_count_as_certificate(why, reason):
    failure = Failure(SSL.Error([("SSL routines", "", part) for part in why.split(", ")]))
    assert errors.describe(failure, "mail.example.org:465").reason.value == reason
