"""A hostile upstream that appends plaintext after its STARTTLS/STLS go-ahead (the
CVE-2011-0411 pattern): the gateway must abort the session instead of treating those
bytes as if they came through TLS."""

from __future__ import annotations

import socket
import threading

import pytest

from support.destinations import mail


class HostileServer:
    """Answers just enough of the protocol to reach STARTTLS, then injects."""

    def __init__(self, greeting: bytes, answer):
        self.greeting, self.answer = greeting, answer
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc_info):
        self.sock.close()
        self.thread.join(5)

    def _serve(self):
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(10)
            f = conn.makefile("rb")
            conn.sendall(self.greeting)
            try:
                while line := f.readline():
                    conn.sendall(self.answer(line))
            except OSError:
                pass


def answering(replies: dict[bytes, bytes], otherwise: bytes):
    """What the server says to a line: the reply to its command word, else ``otherwise``."""
    return lambda line: replies.get(line.split(b" ", 1)[0].strip().upper(), otherwise)


def imap_answer(line):
    tag = line.split(b" ", 1)[0]
    if b"STARTTLS" in line.upper():
        return tag + b" OK begin TLS\r\n* injected\r\n"
    if b"CAPABILITY" in line.upper():
        return b"* CAPABILITY IMAP4rev1 STARTTLS\r\n" + tag + b" OK\r\n"
    return tag + b" BAD what\r\n"


@pytest.mark.parametrize(
    "protocol, greeting, answer, refusal",
    [
        ("smtp", b"220 hostile ESMTP\r\n", answering({
            b"EHLO": b"250-hostile\r\n250 STARTTLS\r\n", b"STARTTLS": b"220 go ahead\r\n250 injected\r\n",
        }, b"500 what\r\n"), b"554"),
        ("imap4", b"* OK [CAPABILITY IMAP4rev1 STARTTLS] hostile\r\n", imap_answer, b"* BYE"),
        ("pop3", b"+OK hostile\r\n", answering({
            b"CAPA": b"+OK\r\nSTLS\r\nUSER\r\n.\r\n", b"STLS": b"+OK begin TLS\r\n+OK injected\r\n",
        }, b"-ERR what\r\n"), b"-ERR"),
    ],
)
def test_injection_after_starttls_go_ahead_aborts(certs, gateway_factory, protocol, greeting, answer, refusal):
    with HostileServer(greeting, answer) as server:
        running = gateway_factory({"destinations": [
            mail("hostile", protocol, server.port, user="u", password="p", ca=certs.ca_pem),
        ]})
        with socket.create_connection(running.address(), timeout=30) as sock:
            line = sock.makefile("rb").readline()
    assert line.startswith(refusal) and b"STARTTLS injection" in line, line
