"""IMAP, IMAPS, POP3 and POP3S through the gateway against real Dovecot."""

from __future__ import annotations

import base64
import imaplib
import poplib
import re
import socket
import subprocess
import uuid

import pytest
from support.clients import imap_conversation, imap_reads_the_seeded_message, imap_without_login
from support.clients import pop3_reads_the_seeded_message
from support.skips import require_or_skip

import realservers
from support import destinations
from gatewayharness import LogCapture, start_gateway

PASSWORDS = realservers.DEFAULT_USERS


def dest(name, protocol, port, certs, user="alice", **extra):
    return destinations.mail(name, protocol, port, user=user, password=PASSWORDS.get(user, "x"), ca=certs.ca_pem, **extra)


def mail(subject, body=b"body line\r\n"):
    return (f"From: a@example.org\r\nTo: alice@example.org\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject}@mailgw.test>\r\n\r\n").encode() + body


@pytest.fixture(scope="module")
def gw(dovecot, certs, reactor, tmp_path_factory):
    destinations = [
        dest("imap", "imap4", dovecot.imap_port, certs, **{"mail.imap4.starttls.required": "true"}),
        dest("imaps", "imap4s", dovecot.imaps_port, certs),
        dest("pop3", "pop3", dovecot.pop3_port, certs, **{"mail.pop3.starttls.required": "true"}),
        dest("pop3s", "pop3s", dovecot.pop3s_port, certs),
        dest("imap-bob", "imap4s", dovecot.imaps_port, certs, user="bob"),
        dest("pop3-bob", "pop3s", dovecot.pop3s_port, certs, user="bob"),
        dest("imap-wrong", "imap4s", dovecot.imaps_port, certs, **{"mail.password": "wrong-pw"}),
        dest("pop3-wrong", "pop3s", dovecot.pop3s_port, certs, **{"mail.password": "wrong-pw"}),
        dest("imap-untrusted", "imap4s", dovecot.imaps_port, certs, TrustStoreLocation=str(certs.untrusted_ca_pem)),
        dest("pop3-closed", "pop3", realservers.free_port(), certs),
    ]
    running = start_gateway({"destinations": destinations}, tmp_path_factory.mktemp("gw"))
    yield running
    running.stop()


# -- IMAP ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["imap", "imaps", "imap-bob"])
def test_imaplib_without_login(gw, name):
    imap_reads_the_seeded_message(gw.by_name[name])


def test_imaplib_with_login_answered_locally(gw):
    client = imaplib.IMAP4(*gw.by_name["imap"], timeout=60)
    assert client.login("whoever", 'any "password" at all')[0] == "OK"
    assert client.select("INBOX")[0] == "OK"
    client.logout()


def test_reference_flow_without_login_on_a_raw_socket(gw):
    commands = b'a1 LIST "" "*"\r\na2 SELECT INBOX\r\na3 FETCH 1 BODY[TEXT]\r\na4 LOGOUT\r\n'
    greeting, data = imap_conversation(gw.by_name["imaps"], commands)
    assert greeting.startswith(b"* OK [CAPABILITY ") and b"STARTTLS" not in greeting
    assert b"a1 OK" in data and b"a2 OK" in data and b"a3 OK" in data
    assert b'"INBOX"' in data or b" INBOX" in data


def test_imap_login_with_literal_before_release(gw):
    with socket.create_connection(gw.by_name["imap"], timeout=30) as sock:
        f = sock.makefile("rb")
        f.readline()
        sock.sendall(b"a1 LOGIN {5}\r\n")
        assert f.readline().startswith(b"+")
        sock.sendall(b"alice {3+}\r\nabc\r\na2 SELECT INBOX\r\n")
        assert f.readline().startswith(b"a1 OK")
        lines = []
        while not lines or not lines[-1].startswith(b"a2 "):
            lines.append(f.readline())
        assert lines[-1].startswith(b"a2 OK")


def test_imap_idle_sees_new_mail(gw, dovecot):
    client = imap_without_login(gw.by_name["imaps"])
    assert client.select("INBOX")[0] == "OK"
    tag = client._new_tag()
    client.send(tag + b" IDLE\r\n")
    assert client.readline().startswith(b"+")
    # The server idles now: what arrives is announced.
    dovecot.seed("alice", mail("idle-" + uuid.uuid4().hex))
    client.sock.settimeout(30)
    line = client.readline()
    while b"EXISTS" not in line:
        line = client.readline()
    assert re.match(rb"\* \d+ EXISTS", line)
    client.send(b"DONE\r\n")
    while not client.readline().startswith(tag + b" OK"):
        pass
    client.logout()


def test_imap_20mb_fetch_and_5mb_append(gw, dovecot, certs):
    subject = "big-" + uuid.uuid4().hex
    line = b"The quick brown fox jumps over the lazy dog 0123456789 ~!@#$%^&*()_+\r\n"
    body = line * (20 * 1024 * 1024 // len(line))
    dovecot.seed("alice", mail(subject, body))
    client = imap_without_login(gw.by_name["imaps"], timeout=120)
    assert client.select("INBOX")[0] == "OK"
    number = client.search(None, "SUBJECT", subject)[1][0].split()[0]
    typ, data = client.fetch(number, "(BODY.PEEK[TEXT])")
    assert typ == "OK" and data[0][1] == body

    appended = "append-" + uuid.uuid4().hex
    small = line * (5 * 1024 * 1024 // len(line))
    assert client.append("INBOX", None, None, mail(appended, small))[0] == "OK"
    client.logout()
    direct = imaplib.IMAP4_SSL("localhost", dovecot.imaps_port, ssl_context=certs.client_context())
    direct.login("alice", PASSWORDS["alice"])
    assert direct.select("INBOX")[0] == "OK"
    number = direct.search(None, "SUBJECT", appended)[1][0].split()[0]
    assert direct.fetch(number, "(BODY.PEEK[TEXT])")[1][0][1] == small
    direct.logout()


# -- POP3 ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["pop3", "pop3s", "pop3-bob"])
def test_poplib_without_login(gw, name):
    pop3_reads_the_seeded_message(gw.by_name[name])


def test_poplib_with_user_pass_answered_locally(gw):
    client = poplib.POP3(*gw.by_name["pop3"], timeout=60)
    client.user("whoever")
    client.pass_("whatever")
    assert client.stat()[0] >= 1
    client.quit()


def test_pop3_reference_flow_on_a_raw_socket(gw):
    with socket.create_connection(gw.by_name["pop3s"], timeout=30) as sock:
        f = sock.makefile("rb")
        assert f.readline().startswith(b"+OK")
        sock.sendall(b"list\r\n")
        assert f.readline().startswith(b"+OK")
        while f.readline() != b".\r\n":
            pass
        sock.sendall(b"retr 1\r\n")
        assert f.readline().startswith(b"+OK")
        message = b""
        while (line := f.readline()) != b".\r\n":
            message += line
        assert b"Subject: seeded message\r\n" in message  # the fixture's first message
        sock.sendall(b"quit\r\n")
        assert f.readline().startswith(b"+OK")


# -- curl ----------------------------------------------------------------------------


def _curl_or_skip():
    require_or_skip("curl")


def test_curl_imap_and_pop3_with_dummy_credentials(gw):
    _curl_or_skip()
    host, port = gw.by_name["imap"]
    result = subprocess.run(["curl", "-sS", "--max-time", "30", "--user", "dummy:dummy",
                             f"imap://{host}:{port}/INBOX;UID=1/;SECTION=TEXT"],
                            capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr
    host, port = gw.by_name["pop3"]
    result = subprocess.run(["curl", "-sS", "--max-time", "30", "--user", "dummy:dummy", f"pop3://{host}:{port}/1"],
                            capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert b"Subject:" in result.stdout


# -- refusals ------------------------------------------------------------------------


def first_line(address):
    with socket.create_connection(address, timeout=30) as sock:
        line = sock.makefile("rb").readline()
        sock.settimeout(5)
        assert sock.recv(100) == b""
        return line


@pytest.mark.parametrize(
    "name, start, words",
    [
        ("imap-wrong", b"* BYE mailgw: destination imap-wrong", b"refused"),
        ("pop3-wrong", b"-ERR mailgw: destination pop3-wrong", b"refused"),
        ("imap-untrusted", b"* BYE mailgw: destination imap-untrusted", b"TLS handshake"),
        ("pop3-closed", b"-ERR mailgw: destination pop3-closed", b"connection refused"),
    ],
)
def test_refusals(gw, name, start, words):
    line = first_line(gw.by_name[name])
    assert line.startswith(start) and words in line, line
    assert b"wrong-pw" not in line


@pytest.mark.parametrize("protocol, prefix", [("imap4", b"* BYE"), ("pop3", b"-ERR")])
def test_silent_upstream(certs, gateway_factory, protocol, prefix):
    with realservers.SilentServer() as silent:
        running = gateway_factory({"destinations": [dest("silent", protocol, silent.port, certs)], "timeouts": {"login": 1.5}})
        line = first_line(running.address())
    assert line.startswith(prefix) and b"did not complete the login" in line


@pytest.mark.parametrize("name, prefix", [("imap", b"* BYE"), ("pop3", b"-ERR")])
def test_hostile_pre_release_input(gw, name, prefix):
    with socket.create_connection(gw.by_name[name], timeout=30) as sock:
        f = sock.makefile("rb")
        f.readline()
        sock.sendall(b"a1 " + b"A" * 100_000 + b"\r\n")
        reply = f.readline()
        assert reply.startswith(prefix) or reply.startswith(b"a1 BAD"), reply
        assert f.read() == b""


# -- secrets -------------------------------------------------------------------------


def test_no_secret_in_logs_or_streams(certs, tmp_path, gateway_factory):
    password = "Zq9-" + uuid.uuid4().hex
    forms = [password, base64.b64encode(password.encode()).decode(),
             base64.b64encode(f"\0carol\0{password}".encode()).decode()]
    with realservers.Dovecot(tmp_path / "dovecot", certs, users={"carol": password, "dan": "other"}) as server:
        server.seed("carol", realservers.SEED_MESSAGE)
        with LogCapture() as logs:
            running = gateway_factory({"destinations": [
                {**dest("i", "imap4", server.imap_port, certs, user="carol"), "mail.password": password},
                {**dest("p", "pop3", server.pop3_port, certs, user="carol"), "mail.password": password},
                {**dest("i-bad", "imap4", server.imap_port, certs, user="dan"), "mail.password": password},
                {**dest("p-bad", "pop3", server.pop3_port, certs, user="dan"), "mail.password": password},
            ]})
            client = imap_without_login(running.address(0))
            assert client.select("INBOX")[0] == "OK"
            stream = repr(client.fetch("1", "(RFC822)"))
            client.logout()
            pop = poplib.POP3(*running.address(1), timeout=30)
            stream += repr(pop.retr(1))
            pop.quit()
            stream += repr(first_line(running.address(2))) + repr(first_line(running.address(3)))
        text = logs.text()
    assert "session" in text
    for form in forms:
        assert form not in text and form not in stream
