"""Hostile applications against a real ``twistd -n mailgw`` and real upstreams: a client
that never reads its replies, a slowloris, a flood from one address, a client that
talks before its greeting (SPEC 7, 9.6)."""

from __future__ import annotations

import re
import select
import socket
import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families

from support.clients import read_line
from support.destinations import plain
from support.gatewayprocess import GatewayProcess, free_port
from support.reactor import wait_for

MiB = 1024


def _sample(metrics: str, name: str, **labels) -> float:
    for family in text_string_to_metric_families(metrics):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def _connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.settimeout(20)
    sock.connect(("127.0.0.1", port))
    return sock


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, smtp_sink, dovecot):
    """One gateway for the module: SMTP to aiosmtpd, IMAP to Dovecot (Basic)."""
    ports = {name: free_port() for name in ("smtp", "imap")}
    config = {
        "destinations": [
            plain("sink", "smtp", smtp_sink.port),
            plain("mailbox", "imap4", dovecot.imap_port, Authentication="BasicAuthentication",
                         **{"mail.user": "alice", "mail.password": "secret"}),
        ],
        "listeners": [
            {"destination": "sink", "listen": f"tcp:{ports['smtp']}:interface=127.0.0.1"},
            {"destination": "mailbox", "listen": f"tcp:{ports['imap']}:interface=127.0.0.1"},
        ],
    }
    with GatewayProcess(tmp_path_factory.mktemp("hostile"), config) as process:
        process.ports = ports
        yield process


@pytest.mark.parametrize("family, command", [("smtp", b"EHLO x\r\n"), ("imap", b"a CAPABILITY\r\n")])
def test_a_client_that_never_reads_cannot_grow_memory(gateway, family, command):
    """SPEC 9.6: reading pauses while more than 64 KiB of replies are unread."""
    sock = _connect(gateway.ports[family])
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    assert read_line(sock)[:1] in (b"2", b"*")  # the greeting
    before = gateway.rss_kib()
    sock.setblocking(False)
    burst, sent = command * 8192, 0
    while sent < 200 * MiB * 1024:  # unbounded without backpressure: 200 MiB of commands
        _, writable, _ = select.select([], [sock], [], 2.0)
        if not writable:
            break  # the gateway stopped reading, and the kernel's buffers are full
        try:
            sent += sock.send(burst)
        except BlockingIOError:
            continue
    grown = gateway.rss_kib() - before
    sock.close()
    print(f"{family}: sent {sent} bytes of unread commands, RSS grew {grown} KiB")
    assert sent < 200 * MiB * 1024, "the gateway kept reading from a client that reads nothing"
    assert grown < 16 * MiB, f"RSS grew by {grown} KiB after {sent} bytes of unread {family} commands"


def test_a_trickling_client_meets_the_dialogue_deadline(tmp_path, smtp_sink):
    """SPEC 9.6: ``timeouts.dialogue`` bounds the pre-release dialogue however the
    application trickles bytes (each byte resets the idle timer)."""
    port = free_port()
    config = {
        "destinations": [plain("sink", "smtp", smtp_sink.port)],
        "listeners": [{"destination": "sink", "listen": f"tcp:{port}:interface=127.0.0.1"}],
        "timeouts": {"dialogue": 2, "idle": 1},
    }
    with GatewayProcess(tmp_path, config) as process:
        sock = _connect(port)
        assert read_line(sock).startswith(b"220 ")
        got = b""
        stop = threading.Event()

        def trickle():
            for byte in b"NOOP NOOP NOOP NOOP NOOP NOOP NOOP NOOP NOOP\r\n" * 100:
                if stop.wait(0.3):
                    return
                try:
                    sock.send(bytes([byte]))
                except OSError:
                    return

        threading.Thread(target=trickle, daemon=True).start()
        try:
            got = _read_all(sock)
        finally:
            stop.set()
        assert got.endswith(b"421 4.3.2 mailgw: the login dialogue took longer than 2s\r\n"), got
        assert _sample(process.metrics(), "mailgw_session_duration_seconds_count", destination="sink", outcome="closed") == 1


def test_sessions_per_client_address_are_limited(tmp_path, smtp_sink):
    """SPEC 9.6: ``limits.maxSessionsPerClient`` per client IP address; other clients
    are still served."""
    port = free_port()
    config = {
        "destinations": [plain("sink", "smtp", smtp_sink.port)],
        "listeners": [{"destination": "sink", "listen": f"tcp:{port}:interface=127.0.0.1"}],
        "limits": {"maxSessionsPerClient": 3},
    }
    with GatewayProcess(tmp_path, config) as process:
        held = [_connect(port) for _ in range(3)]
        for sock in held:
            assert read_line(sock).startswith(b"220 ")
        extra = _connect(port)
        assert _read_all(extra) == b"421 4.3.0 mailgw: destination sink: too many sessions from 127.0.0.1, try again later\r\n"
        other = _connect(port, source="127.0.0.2")
        assert read_line(other).startswith(b"220 ")
        metrics = process.metrics()
        assert _sample(metrics, "mailgw_sessions_refused_total", destination="sink", reason="limit") == 1
        assert _sample(metrics, "mailgw_sessions_active", destination="sink") == 4
        for sock in held + [extra, other]:
            sock.close()


class _SilentServer:
    """An upstream that accepts and never says a word (a stuck mail server)."""

    def __enter__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def _accept(self):
        while True:
            try:
                self.accepted.append(self.sock.accept()[0])
            except OSError:
                return

    def __exit__(self, *exc_info):
        self.sock.close()
        for conn in self.accepted:
            conn.close()


def test_too_much_before_the_greeting_is_refused_once(tmp_path):
    """More than ``maxLine`` before the greeting: one refusal line naming no internal
    class, counted once under one reason."""
    port = free_port()
    with _SilentServer() as upstream:
        config = {
            "destinations": [plain("stuck", "smtp", upstream.port)],
            "listeners": [{"destination": "stuck", "listen": f"tcp:{port}:interface=127.0.0.1"}],
            "limits": {"maxLine": 1000},
        }
        with GatewayProcess(tmp_path, config) as process:
            sock = _connect(port)
            sock.sendall(b"EHLO " + b"x" * 2000 + b"\r\n")
            got = _read_all(sock)
            assert got == b"554 5.3.0 mailgw: destination stuck: application sent too much data before the greeting\r\n"
            assert not re.search(rb"Error|Exception|Traceback", got)
            wait_for(lambda: _sample(process.metrics(), "mailgw_session_duration_seconds_count", destination="stuck"),
                     what="the session's end to be counted")
            counted = {
                s.labels["reason"]: s.value
                for f in text_string_to_metric_families(process.metrics()) for s in f.samples
                if s.name == "mailgw_sessions_refused_total" and s.labels.get("destination") == "stuck"
            }
            assert counted == {"protocol": 1.0}
