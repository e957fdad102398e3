"""Issue 5 end to end: ``ProxyType: OnPremise`` destinations through a SOCKS5 connectivity
proxy, with real clients (smtplib, imaplib, poplib), the real gateway, real proxies
(microsocks without and with RFC 1929 authentication, Dante, and ``tests/socks80.py``'s
method-0x80 server with a JWT from ``tests/tokenservice.py``) and real mail servers
(Postfix, Dovecot).

Every upstream host is ``localhost`` with ``TrustStoreLocation`` set to the test CA, so
STARTTLS and implicit TLS through the tunnel verify the certificate and the host name.
Servers and the per-proxy gateways start once per module; tests that need a special
configuration start their own gateway through ``gateway_factory``.
"""

from __future__ import annotations

import imaplib
import poplib
import smtplib
import socket
import uuid

import pytest

import realservers
from support.destinations import mail
from gatewayharness import LogCapture, start_gateway
from support.clients import imap_reads_the_seeded_message, pop3_reads_the_seeded_message, smtp_reply
from mailgw.config import ConfigError, parse_config
from socks80 import SAPSocksServer
import tokenservice

ALICE_PASSWORD = realservers.DEFAULT_USERS["alice"]

#: The connectivity service's OAuth2 client (method 0x80's JWT comes from it).
CONN_CLIENT = "connectivity-client"
CONN_SECRET = "conn-cs-" + uuid.uuid4().hex
#: microsocks ``-u/-P``.
PROXY_USER = "gw-proxy"
PROXY_PASSWORD = "proxy-pw-" + uuid.uuid4().hex
LOCATION = "office-berlin.1"


def _target_host() -> str:
    """``localhost``, as the issue asks, unless it resolves to IPv6 first here.

    The mail servers listen on 127.0.0.1 only, and microsocks connects to the first
    address it resolves; the certificates also name 127.0.0.1, so verification stays on.
    """
    try:
        first = socket.getaddrinfo("localhost", 25, type=socket.SOCK_STREAM)[0][4][0]
    except OSError:
        return "127.0.0.1"
    return "localhost" if first == "127.0.0.1" else "127.0.0.1"


TARGET = _target_host()


def dest(name, protocol, port, certs, *, proxy_type="OnPremise", **extra):
    return mail(name, protocol, port, host=TARGET, ca=certs.ca_pem, ProxyType=proxy_type, **extra)


def smtp_destinations(postfix, certs, **extra):
    return [
        dest("submission", "smtp", postfix.submission_port, certs, **{"mail.smtp.starttls.required": "true"}, **extra),
        dest("smtps", "smtps", postfix.smtps_port, certs, **extra),
        dest("plain", "smtp", postfix.plain_port, certs, Authentication="NoAuthentication",
             **{"mail.user": None, "mail.password": None, "mail.smtp.starttls.enable": "false"}, **extra),
    ]


SMTP_NAMES = ["submission", "smtps", "plain"]


def mailbox_destinations(dovecot, certs, **extra):
    return [
        dest("imap", "imap4", dovecot.imap_port, certs, **{"mail.imap4.starttls.required": "true"}, **extra),
        dest("imaps", "imap4s", dovecot.imaps_port, certs, **extra),
        dest("pop3", "pop3", dovecot.pop3_port, certs, **{"mail.pop3.starttls.required": "true"}, **extra),
        dest("pop3s", "pop3s", dovecot.pop3s_port, certs, **extra),
    ]


def all_destinations(postfix, dovecot, certs, **extra):
    """SMTP destinations first (listeners 0..2), then IMAP and POP3 (3..6)."""
    return smtp_destinations(postfix, certs, **extra) + mailbox_destinations(dovecot, certs, **extra)


#: (destination name, what its refusal starts with) for the three families.
FAMILIES = [("submission", b"554 "), ("imap", b"* BYE mailgw: "), ("pop3", b"-ERR mailgw: ")]
#: The same for a transient failure (SMTP says 421 then).
FAMILIES_TRANSIENT = [("submission", b"421 "), ("imap", b"* BYE mailgw: "), ("pop3", b"-ERR mailgw: ")]


def marker():
    return uuid.uuid4().hex


def message(mark):
    return f"From: app@example.org\r\nTo: rcpt@example.org\r\nSubject: {mark}\r\n\r\nthrough the tunnel\r\n".encode()


def wait_delivered(sink, mark, timeout=20):
    return sink.wait_for(lambda m: mark.encode() in m.data, timeout=timeout)


def send_mail(address, sink, timeout=20):
    mark = marker()
    with smtplib.SMTP(*address, timeout=timeout) as client:
        code, ehlo = client.ehlo()
        assert code == 250 and b"STARTTLS" not in ehlo
        client.sendmail("alice@example.org", ["rcpt@example.org"], message(mark))
    wait_delivered(sink, mark)


USE = {"submission": None, "smtps": None, "plain": None, "imap": imap_reads_the_seeded_message,
       "imaps": imap_reads_the_seeded_message, "pop3": pop3_reads_the_seeded_message, "pop3s": pop3_reads_the_seeded_message}


def use(address, name, sink):
    """A complete, successful session with destination ``name`` through ``address``."""
    if USE[name] is None:
        send_mail(address, sink)
    else:
        USE[name](address)


def first_reply(address, timeout=20) -> bytes:
    """What the gateway says first (a refusal here), checking that it then closes."""
    with socket.create_connection(address, timeout=timeout) as sock:
        data = b""
        while not data.endswith(b"\r\n") or (data[:1].isdigit() and data[3:4] == b"-"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
        sock.settimeout(5)
        rest = sock.recv(4096)
        assert rest == b"", f"the gateway must close after a refusal, sent {rest!r}"
        return data


class IssuedBy:
    """The 0x80 server's ``expected_jwt``: any client-credentials token that the token
    service issued to the connectivity client (the server compares with ``==``; the
    gateway fetches the token in parallel with the proxy connection, so no fixed value
    can be known in advance)."""

    def __init__(self, tokens: tokenservice.TokenService, client_id: str):
        self.tokens, self.client_id = tokens, client_id

    def __eq__(self, jwt):
        with self.tokens._lock:
            issued = self.tokens.access_tokens.get(jwt)
        return issued is not None and issued.client_id == self.client_id and issued.grant_type == "client_credentials"

    __hash__ = None


# -- servers and gateways (once per module) -------------------------------------------


@pytest.fixture(scope="module")
def tokens():
    with tokenservice.running(clients={CONN_CLIENT: CONN_SECRET}) as service:
        yield service


@pytest.fixture(scope="module")
def sap_proxy(tokens):
    with SAPSocksServer(expected_jwt="unset") as proxy:
        proxy.configure(expected_jwt=IssuedBy(tokens, CONN_CLIENT))
        yield proxy


@pytest.fixture
def sap(sap_proxy, tokens):
    """The 0x80 server, back to normal answers after each test."""
    yield sap_proxy
    sap_proxy.configure(expected_jwt=IssuedBy(tokens, CONN_CLIENT))


@pytest.fixture(scope="module")
def userpass_proxy():
    realservers.require_or_skip(realservers.Microsocks.TOOLS)
    with realservers.Microsocks(user=PROXY_USER, password=PROXY_PASSWORD) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def dante(tmp_path_factory):
    realservers.require_or_skip(realservers.Dante.TOOLS)
    with realservers.Dante(tmp_path_factory.mktemp("dante")) as proxy:
        yield proxy


def proxy_config(kind, proxy, tokens=None, **overrides):
    config = {"host": proxy.host, "port": proxy.port, "authentication": "none"}
    if kind == "userpass":
        config.update(authentication="userpass", username=PROXY_USER, password=PROXY_PASSWORD)
    elif kind == "sap":
        config.update(authentication="sap", tokenServiceURL=tokens.token_url, clientId=CONN_CLIENT,
                      clientSecret=CONN_SECRET)
    config.update(overrides)
    return config


PROXIES = ["microsocks", "microsocks-userpass", "dante", "sap"]


@pytest.fixture(scope="module")
def gateways(request, postfix, dovecot, certs, reactor, tmp_path_factory, tokens):
    """One gateway per proxy, each with every OnPremise destination; the ``sap`` one
    also has Internet destinations and destinations with a location id."""
    started = {}
    fixtures = {"microsocks": "microsocks", "microsocks-userpass": "userpass_proxy", "dante": "dante", "sap": "sap_proxy"}
    kinds = {"microsocks": "none", "microsocks-userpass": "userpass", "dante": "none", "sap": "sap"}
    try:
        for name in PROXIES:
            proxy = request.getfixturevalue(fixtures[name])
            destinations = all_destinations(postfix, dovecot, certs)
            if name == "sap":
                destinations += [
                    dest("located", "smtps", postfix.smtps_port, certs, CloudConnectorLocationId=LOCATION),
                    dest("internet-smtps", "smtps", postfix.smtps_port, certs, proxy_type="Internet"),
                    dest("internet-submission", "smtp", postfix.submission_port, certs, proxy_type="Internet",
                         **{"mail.smtp.starttls.required": "true"}),
                ]
            running = start_gateway(
                {"destinations": destinations, "connectivityProxy": proxy_config(kinds[name], proxy, tokens)},
                tmp_path_factory.mktemp("gw"),
            )
            started[name] = running
        yield started
    finally:
        for running in started.values():
            running.stop()


def connectivity_token_requests(tokens):
    return sum(1 for entry in tokens.log if entry.client_id == CONN_CLIENT and entry.grant_type == "client_credentials")


def connectivity_jwts(tokens):
    with tokens._lock:
        return [t for t, issued in tokens.access_tokens.items() if issued.client_id == CONN_CLIENT]


# -- through every proxy ----------------------------------------------------------------


@pytest.mark.parametrize("name", SMTP_NAMES)
@pytest.mark.parametrize("proxy", PROXIES)
def test_smtp_through_proxy(gateways, smtp_sink, proxy, name):
    send_mail(gateways[proxy].by_name[name], smtp_sink)


@pytest.mark.parametrize("name", ["imap", "imaps"])
@pytest.mark.parametrize("proxy", PROXIES)
def test_imap_through_proxy(gateways, proxy, name):
    imap_reads_the_seeded_message(gateways[proxy].by_name[name])


@pytest.mark.parametrize("name", ["pop3", "pop3s"])
@pytest.mark.parametrize("proxy", PROXIES)
def test_pop3_through_proxy(gateways, proxy, name):
    pop3_reads_the_seeded_message(gateways[proxy].by_name[name])


def test_imap_and_pop3_logins_answered_locally_through_proxy(gateways):
    client = imaplib.IMAP4(*gateways["dante"].by_name["imap"], timeout=20)
    assert client.login("whoever", 'any "password"')[0] == "OK"
    assert client.select("INBOX")[0] == "OK"
    client.logout()
    pop = poplib.POP3(*gateways["sap"].by_name["pop3"], timeout=20)
    pop.user("whoever")
    pop.pass_("whatever")
    assert pop.stat()[0] >= 1
    pop.quit()


def test_smtp_login_answered_locally_through_proxy(gateways, smtp_sink):
    mark = marker()
    with smtplib.SMTP(*gateways["microsocks-userpass"].by_name["submission"], timeout=20) as client:
        client.login("whoever", "the application's password is discarded")
        client.sendmail("alice@example.org", ["rcpt@example.org"], message(mark))
    wait_delivered(smtp_sink, mark)


# -- method 0x80: JWT, location id, cache -----------------------------------------------------


def test_sap_handshake_carries_the_issued_jwt_and_location(gateways, sap, tokens, smtp_sink, postfix):
    before = len(sap.sessions)
    send_mail(gateways["sap"].by_name["located"], smtp_sink)
    send_mail(gateways["sap"].by_name["smtps"], smtp_sink)
    located, plain = sap.sessions[before:]
    for session in (located, plain):
        assert session.error is None and session.reply == 0x00
        assert session.methods == b"\x80" and session.atyp == 0x03
        assert (session.target_host, session.target_port) == (TARGET, postfix.smtps_port)
        assert session.jwt_valid and session.jwt in connectivity_jwts(tokens)
        assert tokens.username_for(session.jwt) == CONN_CLIENT
    assert located.location_id == LOCATION
    assert plain.location_id is None


def test_sap_token_fetched_once_for_two_sessions(postfix, certs, sap, tokens, smtp_sink, gateway_factory):
    before = connectivity_token_requests(tokens)
    sessions_before = len(sap.sessions)
    running = gateway_factory({
        "destinations": [dest("cached", "smtps", postfix.smtps_port, certs, CloudConnectorLocationId=LOCATION)],
        "connectivityProxy": proxy_config("sap", sap, tokens),
    })
    send_mail(running.address(), smtp_sink)
    send_mail(running.address(), smtp_sink)
    assert connectivity_token_requests(tokens) - before == 1
    first, second = sap.sessions[sessions_before:]
    assert first.jwt == second.jwt and first.jwt_valid
    request = tokens.requests[-1]
    assert request.form.get("grant_type") == "client_credentials" and request.client_id == CONN_CLIENT


def test_sap_proxy_refusing_the_jwt(gateways, sap):
    sap.configure(expected_jwt="some-other-token")
    text = first_reply(gateways["sap"].by_name["submission"])
    assert text.startswith(b"554 ") and b"destination submission" in text
    assert b"connectivity proxy rejected the authentication" in text
    assert sap.sessions[-1].jwt_valid is False


# -- Internet destinations never touch the proxy ---------------------------------------------


def test_internet_destinations_bypass_the_proxy(gateways, sap, smtp_sink):
    before = len(sap.sessions)
    for name in ("internet-smtps", "internet-submission"):
        send_mail(gateways["sap"].by_name[name], smtp_sink)
    assert len(sap.sessions) == before


def test_internet_destination_works_while_the_proxy_stalls(postfix, dovecot, certs, smtp_sink, gateway_factory):
    """A proxy that accepts and never answers: OnPremise sessions are refused after the
    connect timeout (1 s), an Internet destination of the same gateway never notices."""
    with realservers.SilentServer() as silent:
        running = start(gateway_factory, [
            dest("direct", "smtps", postfix.smtps_port, certs, proxy_type="Internet"),
            *all_destinations(postfix, dovecot, certs),
        ], connectivityProxy=proxy_config("none", silent), timeouts={"connect": 1})
        send_mail(running.by_name["direct"], smtp_sink)
        assert silent.accepted == 0
        for name, prefix in FAMILIES_TRANSIENT:
            text = first_reply(running.by_name[name])
            assert text.startswith(prefix) and f"destination {name}: ".encode() in text, text
            assert b"SOCKS5 handshake" in text and b"timed out after 1 s" in text, text
        assert silent.accepted == len(FAMILIES_TRANSIENT)
        send_mail(running.by_name["direct"], smtp_sink)


# -- refusals ----------------------------------------------------------------------------------

REPLY_WORDS = {
    0x01: b"general failure",
    0x02: b"no access mapping for",
    0x03: b"connector unreachable or unknown location",
    0x04: b"host unreachable",
    0x05: b"refused, or authentication at the connector failed",
    0x06: b"TTL expired",
    0x07: b"CONNECT command not supported",
    0x08: b"address type not supported",
}


def start(gateway_factory, destinations, **doc):
    running = gateway_factory({"destinations": destinations, **doc})
    return running


def open_session(name, address, sink):
    """Open a session with ``name`` (through the proxy, logged in upstream) and return a
    function that completes it later."""
    if name == "imap":
        client = imaplib.IMAP4(*address, timeout=20)

        def finish():
            client.state = "AUTH"
            assert client.select("INBOX")[0] == "OK"
            client.logout()
    elif name == "pop3":
        client = poplib.POP3(*address, timeout=20)

        def finish():
            assert client.stat()[0] >= 1
            client.quit()
    else:
        client = smtplib.SMTP(*address, timeout=20)

        def finish():
            mark = marker()
            client.sendmail("alice@example.org", ["rcpt@example.org"], message(mark))
            client.quit()
            wait_delivered(sink, mark)
    return finish


@pytest.mark.parametrize("name, prefix", FAMILIES)
def test_each_reply_code_refuses_naming_the_cause_and_others_keep_working(gateways, sap, smtp_sink, dovecot, postfix,
                                                                           name, prefix):
    running = gateways["sap"]
    port = {"submission": postfix.submission_port, "imap": dovecot.imap_port, "pop3": dovecot.pop3_port}[name]
    finish_other = open_session(name, running.by_name[name], smtp_sink)  # already through the tunnel
    for code, words in REPLY_WORDS.items():
        sap.configure(reply=code)
        text = first_reply(running.by_name[name])
        assert text.startswith(prefix), (code, text)
        assert f"destination {name}: ".encode() in text and words in text, (code, text)
        assert f"{TARGET}:{port}".encode() in text or code == 0x07, (code, text)
        assert f"0x{code:02x}".encode() in text
        assert sap.sessions[-1].reply == code
    sap.configure()
    finish_other()
    use(running.by_name[name], name, smtp_sink)


def test_starttls_through_the_tunnel_verifies_the_certificate(postfix, dovecot, certs, microsocks, gateway_factory):
    """The same STARTTLS/STLS destinations, trusting another CA: refused, so the
    successful sessions above really verified the server through the tunnel."""
    running = start(gateway_factory, all_destinations(postfix, dovecot, certs, TrustStoreLocation=str(certs.untrusted_ca_pem)),
                    connectivityProxy=proxy_config("none", microsocks))
    for name, prefix in FAMILIES:
        text = first_reply(running.by_name[name])
        assert text.startswith(prefix) and f"destination {name}: TLS handshake with {TARGET}:".encode() in text, text


def test_sap_proxy_stalling_after_connect_request(postfix, certs, sap, tokens, smtp_sink, gateway_factory):
    running = start(gateway_factory, [dest("stall", "smtps", postfix.smtps_port, certs)],
                    connectivityProxy=proxy_config("sap", sap, tokens), timeouts={"connect": 1})
    sap.configure(stall="connect")
    text = first_reply(running.by_name["stall"])
    assert text.startswith(b"421 ") and b"destination stall: " in text
    assert b"timed out after 1 s (while waiting for the CONNECT reply)" in text
    sap.configure()
    send_mail(running.by_name["stall"], smtp_sink)


def test_proxy_down(postfix, dovecot, certs, gateway_factory):
    with realservers.ClosedPort() as closed:
        running = start(gateway_factory, all_destinations(postfix, dovecot, certs),
                        connectivityProxy=proxy_config("none", closed))
        for name, prefix in FAMILIES_TRANSIENT:
            text = first_reply(running.by_name[name])
            assert text.startswith(prefix) and f"destination {name}: ".encode() in text, text
            assert b"cannot connect to the SOCKS5 proxy" in text and b"refused" in text, text


def test_wrong_proxy_password(postfix, dovecot, certs, userpass_proxy, smtp_sink, gateway_factory):
    wrong = "wrong-pw-" + uuid.uuid4().hex
    running = start(gateway_factory, all_destinations(postfix, dovecot, certs),
                    connectivityProxy=proxy_config("userpass", userpass_proxy, password=wrong))
    for name, prefix in FAMILIES:
        text = first_reply(running.by_name[name])
        assert text.startswith(prefix) and f"destination {name}: ".encode() in text, text
        assert b"rejected the username/password" in text and PROXY_USER.encode() in text, text
        assert wrong.encode() not in text


def test_token_service_refusing_the_client(postfix, dovecot, certs, sap, tokens, gateway_factory):
    wrong = "wrong-cs-" + uuid.uuid4().hex
    running = start(gateway_factory, all_destinations(postfix, dovecot, certs),
                    connectivityProxy=proxy_config("sap", sap, tokens, clientSecret=wrong))
    for name, prefix in FAMILIES:
        text = first_reply(running.by_name[name])
        assert text.startswith(prefix) and f"destination {name}: token service".encode() in text, text
        assert b"invalid_client" in text and CONN_CLIENT.encode() in text and wrong.encode() not in text


def test_onpremise_without_connectivity_proxy_is_a_config_error(certs):
    with pytest.raises(ConfigError) as raised:
        parse_config({"destinations": [dest("on-prem", "imap4s", 993, certs)]}, "gateway.yaml")
    message = str(raised.value)
    assert "on-prem" in message and "ProxyType" in message and "connectivityProxy" in message


# -- secrets -------------------------------------------------------------------------------------


def converse(address, name, sink) -> bytes:
    """A raw session with the application's own (discarded) login; the bytes received."""
    got = bytearray()
    with socket.create_connection(address, timeout=20) as sock:
        f = sock.makefile("rb")
        if name in SMTP_NAMES:
            mark = marker()
            for command in [None, b"EHLO x\r\n", b"AUTH PLAIN AGEAYg==\r\n", b"MAIL FROM:<a@b.c>\r\n",
                            b"RCPT TO:<d@e.f>\r\n", b"DATA\r\n",
                            f"Subject: {mark}\r\n\r\nbody\r\n.\r\n".encode(), b"QUIT\r\n"]:
                if command:
                    sock.sendall(command)
                got += smtp_reply(f)[1]
            wait_delivered(sink, mark)
        elif name.startswith("imap"):
            sock.sendall(b"a1 LOGIN app pw\r\na2 CAPABILITY\r\na3 SELECT INBOX\r\na4 LOGOUT\r\n")
            while not got.endswith(b"\r\n") or b"a4 OK" not in got:
                chunk = sock.recv(65536)
                assert chunk, bytes(got)
                got += chunk
            assert b"a3 OK" in got
        else:
            sock.sendall(b"USER app\r\nPASS pw\r\nSTAT\r\nQUIT\r\n")
            while got.count(b"\r\n") < 5:
                chunk = sock.recv(65536)
                assert chunk, bytes(got)
                got += chunk
            assert got.count(b"+OK") == 5, bytes(got)
    return bytes(got)


def test_no_secret_in_logs_or_application_stream(postfix, dovecot, certs, sap, tokens, userpass_proxy, smtp_sink,
                                                  gateway_factory):
    stream = bytearray()
    destinations = all_destinations(postfix, dovecot, certs, CloudConnectorLocationId=LOCATION)
    with LogCapture() as logs:
        sap_gw = start(gateway_factory, destinations, connectivityProxy=proxy_config("sap", sap, tokens))
        bad_token_gw = start(gateway_factory, destinations,
                             connectivityProxy=proxy_config("sap", sap, tokens, clientSecret=CONN_SECRET + "-not"))
        userpass_gw = start(gateway_factory, destinations, connectivityProxy=proxy_config("userpass", userpass_proxy))
        bad_password_gw = start(gateway_factory, destinations, connectivityProxy=proxy_config(
            "userpass", userpass_proxy, password=PROXY_PASSWORD + "-not"))
        for running in (sap_gw, userpass_gw):
            for name in USE:
                stream += converse(running.by_name[name], name, smtp_sink)
        for name, _ in FAMILIES:
            sap.configure(reply=0x05)
            stream += first_reply(sap_gw.by_name[name])
            sap.configure(expected_jwt="rejected")
            stream += first_reply(sap_gw.by_name[name])
            sap.configure(expected_jwt=IssuedBy(tokens, CONN_CLIENT))
            stream += first_reply(bad_token_gw.by_name[name])
            stream += first_reply(bad_password_gw.by_name[name])
        text = logs.text()
    stream = bytes(stream)
    for words in [b"invalid_client", b"username/password", b"0x05", b"rejected the authentication",
                  b"a3 OK", b"* BYE", b"-ERR", b"554 ", b"250 "]:
        assert words in stream, words
    jwts = connectivity_jwts(tokens)
    assert jwts
    for secret in [CONN_SECRET, PROXY_PASSWORD, ALICE_PASSWORD, *jwts]:
        assert secret not in text, "secret in the gateway's logs"
        assert secret.encode() not in stream, "secret in the application's stream"
    assert "session" in text  # the capture did see the gateway's logs
