"""Who may use the send API (SPEC 9.1, issue 11 item 3), on a real ``twistd -n mailgw``:
no send API unless ``http.send`` is configured; on its own listener with bearer tokens
(none: 401 with ``WWW-Authenticate: Bearer``; wrong: 403); probes and metrics need no
token; the token never reaches the log; every answer is counted.  (A send API reachable
off loopback without tokens stops start-up: test_startup_failures.py.)"""

from __future__ import annotations

import re
import uuid

import realservers
from support.clients import http, http_with_headers
from support.gatewayprocess import Twistd, accepts, wait_until, write_config

TOKEN = "send-" + uuid.uuid4().hex


def sink_destination(sink) -> dict:
    return {
        "Name": "office", "Type": "MAIL", "Authentication": "NoAuthentication", "mail.transport.protocol": "smtp",
        "mail.smtp.host": sink.host, "mail.smtp.port": str(sink.port), "mail.smtp.starttls.enable": "false",
    }


def sent_count(metrics: str, status: int) -> float:
    found = re.search(rf'^mailgw_send_requests_total{{status="{status}"}} (\S+)$', metrics, re.M)
    return float(found.group(1)) if found else 0.0


def test_no_send_api_unless_configured(tmp_path, smtp_sink):
    smtp, http_port = realservers.free_port(), realservers.free_port()
    write_config(tmp_path / "gateway.yaml", {
        "destinations": [sink_destination(smtp_sink)],
        "listeners": [{"destination": "office", "listen": f"tcp:{smtp}:interface=127.0.0.1"}],
        "http": {"listen": f"tcp:{http_port}:interface=127.0.0.1"},
    })
    with Twistd(["mailgw", "--config", "gateway.yaml"], tmp_path) as gateway:
        base = f"http://127.0.0.1:{http_port}"
        wait_until(lambda: accepts(http_port), "the http listener")
        assert http(f"{base}/v1/send/office/you@example.org", b"hello", {"Subject": "x"})[0] == 404
        for path in ("/healthz", "/readyz", "/metrics"):
            assert http(base + path)[0] == 200, path
        gateway.stop()


def test_send_api_on_its_own_listener_with_bearer_tokens(tmp_path, smtp_sink):
    smtp, http_port, send = (realservers.free_port() for _ in range(3))
    (tmp_path / "send-token").write_text(TOKEN + "\n")
    write_config(tmp_path / "gateway.yaml", {
        "destinations": [sink_destination(smtp_sink)],
        "listeners": [{"destination": "office", "listen": f"tcp:{smtp}:interface=127.0.0.1"}],
        # the send API on all interfaces: allowed because it needs a token
        "http": {"listen": f"tcp:{http_port}:interface=127.0.0.1", "send": {"listen": f"tcp:{send}", "tokens": [{"file": "send-token"}]}},
    })
    with Twistd(["mailgw", "--config", "gateway.yaml"], tmp_path) as gateway:
        base, api = f"http://127.0.0.1:{http_port}", f"http://127.0.0.1:{send}/v1/send/office/you@example.org"
        wait_until(lambda: accepts(http_port) and accepts(send), "the http and send listeners")
        before = http(base + "/metrics")[1].decode()

        status, headers, body = http_with_headers(api, b"no token", {"Subject": "s"})
        assert status == 401 and headers.get("WWW-Authenticate", "").startswith("Bearer"), (status, headers)
        status, body = http(api, b"bad token", {"Subject": "s", "Authorization": "Bearer not-" + TOKEN})
        assert status == 403, body
        assert http(api, b"basic", {"Authorization": "Basic " + TOKEN})[0] == 401

        mark = uuid.uuid4().hex
        status, body = http(api, f"sent with a token {mark}\n".encode(),
                            {"Subject": mark, "From": "app@example.org", "Authorization": f"Bearer {TOKEN}"})
        assert status == 200 and body.startswith(b"250"), body
        got = smtp_sink.wait_for(lambda m: mark.encode() in m.data, timeout=30)
        assert got.rcpt_tos == ["you@example.org"] and TOKEN.encode() not in got.data

        # Probes and metrics stay on the http listener, without a token; the send API
        # is not there.
        for path in ("/healthz", "/readyz"):
            assert http(base + path)[0] == 200
        assert http(f"{base}/v1/send/office/you@example.org", b"x", {"Authorization": f"Bearer {TOKEN}"})[0] == 404
        after = http(base + "/metrics")[1].decode()
        for code, more in ((401, 2), (403, 1), (200, 1)):
            assert sent_count(after, code) - sent_count(before, code) == more, code
        gateway.stop()
        assert TOKEN not in gateway.log() + gateway.stderr()
        # No access log: it would carry the recipient in the path, and a line per probe.
        assert "you@example.org" not in gateway.log() and "/healthz" not in gateway.log()
