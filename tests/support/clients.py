"""The clients the tests drive the gateway with: raw sockets (a line, an SMTP reply, an
IMAP conversation), imaplib without a login, HTTP and curl.

Reads are exact about what they consume: :func:`read_line` takes one byte at a time so
that nothing after the line is lost to a buffer.
"""

from __future__ import annotations

import imaplib
import poplib
import socket
import subprocess
import urllib.error
import urllib.request
from typing import Iterable

from support.skips import require_or_skip


def read_line(sock: socket.socket) -> bytes:
    """One line, up to and with its LF, read byte by byte; what came before EOF."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data


def read_until(sock: socket.socket, marker: bytes) -> bytes:
    """Everything up to and with ``marker`` (maybe a little more); fails if the peer
    closes first."""
    data = b""
    while marker not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before {marker!r}: {data!r}"
        data += chunk
    return data


def read_tagged(sock: socket.socket, tag: bytes) -> bytes:
    """Lines (by :func:`read_line`) up to and with the first that starts with ``tag``
    and a space: an IMAP command's completion.  Fails if the peer closes first."""
    data = b""
    while True:
        line = read_line(sock)
        assert line.endswith(b"\n"), f"connection closed before {tag!r}: {data + line!r}"
        data += line
        if line.startswith(tag + b" "):
            return data


def smtp_reply(sock_file) -> tuple[int, bytes]:
    """One (multi-line) SMTP reply from a socket file: ``(code, text)``."""
    lines = []
    while True:
        line = sock_file.readline()
        if not line:
            raise ConnectionError(f"connection closed after {lines!r}")
        lines.append(line)
        if line[3:4] != b"-":
            return int(line[:3]), b"".join(lines)


def imap_conversation(address: tuple[str, int], commands: bytes, timeout: float = 30) -> tuple[bytes, bytes]:
    """A raw IMAP connection: ``(greeting, replies)``.  ``commands`` (tagged, CRLF-ended)
    go out in one write, pipelined as the reference flow without a login does; the
    replies are read up to the last command's completion, which must be OK."""
    last_tag = commands.rstrip(b"\r\n").rsplit(b"\r\n", 1)[-1].split(b" ", 1)[0]
    with socket.create_connection(address, timeout=timeout) as sock:
        greeting = read_line(sock)
        sock.sendall(commands)
        replies = read_tagged(sock, last_tag)
    assert replies.rsplit(b"\r\n", 2)[-2].startswith(last_tag + b" OK"), replies
    return greeting, replies


def imap_without_login(address: tuple[str, int], timeout: float = 30) -> imaplib.IMAP4:
    """imaplib on a gateway listener: the gateway logs in upstream, so no ``login()``."""
    client = imaplib.IMAP4(*address, timeout=timeout)
    client.state = "AUTH"  # imaplib refuses SELECT before login(); the gateway needs none
    return client


#: The body of realservers.SEED_MESSAGE, in every INBOX of the ``dovecot`` fixture.
SEEDED_TEXT = b"Hello from the seeded INBOX."


def imap_reads_the_seeded_message(address: tuple[str, int], timeout: float = 30) -> None:
    """imaplib without a login on a gateway listener (no STARTTLS, AUTH=PLAIN offered)
    finds and reads realservers.SEED_MESSAGE."""
    client = imap_without_login(address, timeout)
    assert "STARTTLS" not in client.capabilities and "AUTH=PLAIN" in client.capabilities
    assert client.select("INBOX")[0] == "OK"
    typ, data = client.search(None, "SUBJECT", '"seeded message"')
    assert typ == "OK" and data[0], data
    typ, data = client.fetch(data[0].split()[0], "(BODY.PEEK[TEXT])")
    assert typ == "OK" and SEEDED_TEXT in data[0][1]
    assert client.logout()[0] == "BYE"


def pop3_reads_the_seeded_message(address: tuple[str, int], timeout: float = 30) -> None:
    """poplib without a login on a gateway listener (no STLS, USER offered) finds and
    reads realservers.SEED_MESSAGE (poplib raises on any -ERR)."""
    client = poplib.POP3(*address, timeout=timeout)
    caps = client.capa()
    assert "STLS" not in caps and "USER" in caps
    count, _ = client.stat()
    assert count >= 1
    # Other modules append big messages to the same INBOX: look at headers first.
    seeded = next(i for i in range(1, count + 1) if b"Subject: seeded message" in client.top(i, 0)[1])
    assert SEEDED_TEXT in b"\r\n".join(client.retr(seeded)[1])
    assert client.quit().startswith(b"+OK")


def http_with_headers(url: str, data: bytes | None = None, headers: dict | None = None,
                      timeout: float = 30) -> tuple[int, dict, bytes]:
    """GET, or POST ``data``: ``(status, headers, body)`` for any HTTP answer, error
    statuses included; ``(0, {}, b"")`` when nothing answers (a poll's "not yet")."""
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()
    except OSError:
        return 0, {}, b""


def http_head_only(port: int, head: bytes, timeout: float = 10) -> bytes:
    """Send ``head`` (an HTTP request line and headers, no body) to 127.0.0.1:``port``
    and read the answer's head: what the server answers before any body arrives."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(head)
        return read_until(conn, b"\r\n\r\n")


def http(url: str, data: bytes | None = None, headers: dict | None = None, timeout: float = 30) -> tuple[int, bytes]:
    """:func:`http_with_headers` without the headers: ``(status, body)``."""
    status, _, body = http_with_headers(url, data, headers, timeout)
    return status, body


def curl_post(url: str, body: bytes = b"", headers: Iterable[str] = (), extra: Iterable[str] = (),
              timeout: float = 60) -> tuple[int, str]:
    """POST ``body`` with curl (``headers`` as ``"Name: value"``, ``extra`` arguments):
    ``(status, response text)``."""
    require_or_skip("curl")
    argv = ["curl", "-sS", "--max-time", str(timeout), "-o", "-", "-w", "\n%{http_code}", "--data-binary", "@-"]
    for header in headers:
        argv += ["-H", header]
    done = subprocess.run([*argv, *extra, url], input=body, capture_output=True, timeout=timeout + 30)
    assert done.returncode == 0, done.stderr
    text, _, status = done.stdout.decode("utf-8").rpartition("\n")
    return int(status), text
