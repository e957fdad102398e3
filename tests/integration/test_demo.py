"""``twistd mailgw --demo``: the gateway in front of the built-in SMTP/IMAP/POP3 demo server.

The demo runs in-process on the test reactor (listeners on port 0); the tests read the
addresses from what the demo prints, so the printed text is checked as well.
"""

from __future__ import annotations

import imaplib
import io
import poplib
import re
import smtplib
import subprocess
import uuid

import pytest
from support.clients import imap_conversation, imap_without_login
from support.skips import require_or_skip

from gatewayharness import LogCapture, in_reactor

LOOPBACK_ANY = "tcp:0:interface=127.0.0.1"


class Demo:
    def __init__(self, service, printed: str):
        self.service = service
        self.printed = printed
        self.gateway = {name: (host, int(port)) for name, host, port in
                        re.findall(r"(SMTP|IMAP|POP3) for applications: ([\d.]+):(\d+)", printed)}
        upstream = re.search(r"demo mail server: +SMTP [\d.]+:(\d+), IMAP [\d.]+:(\d+), POP3 [\d.]+:(\d+)", printed)
        self.upstream = {name: ("127.0.0.1", int(port)) for name, port in zip(("SMTP", "IMAP", "POP3"), upstream.groups())}

    def send(self, subject: str, body: str = "sent through the gateway") -> None:
        with smtplib.SMTP(*self.gateway["SMTP"], timeout=30) as client:  # no login
            client.sendmail("app@example.org", ["you@example.org"], f"Subject: {subject}\r\n\r\n{body}\r\n")

    def stop(self) -> None:
        in_reactor(self.service.stopService)


def start_demo() -> Demo:
    from twisted.internet import reactor

    from mailgw.demo import DemoService

    out = io.StringIO()
    service = DemoService(reactor, smtp_listen=LOOPBACK_ANY, imap_listen=LOOPBACK_ANY, pop3_listen=LOOPBACK_ANY,
                          http=None, out=out)
    in_reactor(service.startService)
    return Demo(service, out.getvalue())


@pytest.fixture(scope="module")
def demo(reactor):
    running = start_demo()
    yield running
    running.stop()


def pop3_lines(client: poplib.POP3, number: int) -> bytes:
    return b"\r\n".join(client.retr(number)[1])


def test_prints_where_to_connect_and_what_to_try(demo):
    assert set(demo.gateway) == {"SMTP", "IMAP", "POP3"}
    assert demo.service.password not in demo.printed
    for command in ("smtplib", "swaks --server", "curl 'imap://", "curl pop3://", "poplib.POP3("):
        assert command in demo.printed


def test_smtp_through_the_gateway_delivers(demo):
    mark = uuid.uuid4().hex
    demo.send(mark)
    assert any(mark.encode() in m.data for m in demo.service.mailbox.messages)


def test_imap_reference_flow_on_a_raw_socket_shows_the_welcome(demo):
    greeting, data = imap_conversation(demo.gateway["IMAP"], b"a1 SELECT INBOX\r\na2 FETCH 1 BODY[]\r\na3 LOGOUT\r\n")
    assert greeting.startswith(b"* OK [CAPABILITY ")
    assert b"a1 OK" in data and b"a2 OK" in data
    assert b"Subject: Welcome to the mailgw demo\r\n" in data


def test_imap_reads_a_message_just_sent(demo):
    mark = uuid.uuid4().hex
    demo.send(mark, "read me over IMAP")
    client = imap_without_login(demo.gateway["IMAP"])
    typ, data = client.select("INBOX")
    assert typ == "OK"
    count = int(data[0])
    typ, data = client.fetch(str(count), "(UID FLAGS BODY[])")
    assert typ == "OK"
    assert f"Subject: {mark}".encode() in data[0][1] and b"read me over IMAP" in data[0][1]
    typ, data = client.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert data[0][1] == b"Subject: Welcome to the mailgw demo\r\n"
    client.logout()


def test_imap_idle_sees_a_message_delivered_over_smtp(demo):
    client = imap_without_login(demo.gateway["IMAP"])
    count = int(client.select("INBOX")[1][0])
    tag = client._new_tag()
    client.send(tag + b" IDLE\r\n")
    assert client.readline().startswith(b"+")
    demo.send(uuid.uuid4().hex)
    assert client.readline() == b"* %d EXISTS\r\n" % (count + 1)
    client.send(b"DONE\r\n")
    assert client.readline().startswith(tag + b" OK")
    client.logout()


def test_pop3_without_login_reads_the_welcome_and_a_message_just_sent(demo):
    mark = uuid.uuid4().hex
    demo.send(mark, "read me over POP3")
    client = poplib.POP3(*demo.gateway["POP3"], timeout=30)
    count, _ = client.stat()
    assert b"Subject: Welcome to the mailgw demo" in pop3_lines(client, 1)
    last = pop3_lines(client, count)
    assert f"Subject: {mark}".encode() in last and b"read me over POP3" in last
    client.quit()


def test_pop3_dele_removes_the_message_for_imap_too(demo):
    mark = uuid.uuid4().hex
    demo.send(mark)
    client = poplib.POP3(*demo.gateway["POP3"], timeout=30)
    count, _ = client.stat()
    assert mark.encode() in pop3_lines(client, count)
    client.dele(count)
    client.quit()
    assert not any(mark.encode() in m.data for m in demo.service.mailbox.messages)
    assert b"Welcome to the mailgw demo" in demo.service.mailbox.messages[0].data


@pytest.fixture
def curl():
    require_or_skip("curl")


def test_the_printed_read_commands_work_as_printed(demo, curl):
    """curl imap:// and pop3:// with dummy credentials, and the poplib one-liner, through a shell."""
    mark = uuid.uuid4().hex
    demo.send(mark)
    commands = demo.printed.split("Read the mailbox", 1)[1].strip().splitlines()[1:]
    assert len(commands) == 3
    outputs = []
    for command in commands:
        result = subprocess.run(["bash", "-c", "curl() { command curl -sS --max-time 20 \"$@\"; }; " + command.strip()],
                                capture_output=True, timeout=30)
        assert result.returncode == 0, (command, result.stderr)
        outputs.append(result.stdout)
    imap, pop3, python = outputs
    assert b"Subject: Welcome to the mailgw demo" in imap
    assert b"Subject: Welcome to the mailgw demo" in pop3
    assert f"Subject: {mark}".encode() in python  # the one-liner shows the newest message


def test_the_demo_server_refuses_a_wrong_password(demo):
    """Only the gateway knows the demo account's password."""
    from mailgw.demo import DEMO_USER

    with smtplib.SMTP(*demo.upstream["SMTP"], timeout=30) as client:
        with pytest.raises(smtplib.SMTPSenderRefused):
            client.sendmail("app@example.org", ["you@example.org"], b"Subject: no login\r\n\r\n")
        with pytest.raises(smtplib.SMTPAuthenticationError):
            client.login(DEMO_USER, "wrong")
    imap = imaplib.IMAP4(*demo.upstream["IMAP"], timeout=30)
    with pytest.raises(imaplib.IMAP4.error, match="LOGIN failed"):
        imap.login(DEMO_USER, "wrong")
    assert imap.login(DEMO_USER, demo.service.password)[0] == "OK"  # the right one does work
    imap.logout()
    pop3 = poplib.POP3(*demo.upstream["POP3"], timeout=30)
    pop3.user(DEMO_USER)
    with pytest.raises(poplib.error_proto, match="Authentication failed"):
        pop3.pass_("wrong")
    pop3.quit()


def test_the_demo_password_stays_out_of_logs_and_output(reactor):
    with LogCapture() as logs:
        demo = start_demo()
        try:
            demo.send("secret check")
            client = imap_without_login(demo.gateway["IMAP"])
            assert client.select("INBOX")[0] == "OK"
            assert client.fetch("1", "(BODY[])")[0] == "OK"
            client.logout()
            pop3 = poplib.POP3(*demo.gateway["POP3"], timeout=30)
            pop3.retr(1)
            pop3.quit()
        finally:
            demo.stop()
    assert demo.service.password not in logs.text()
    assert demo.service.password not in demo.printed
