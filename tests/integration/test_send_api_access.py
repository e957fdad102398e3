"""Who may use the send API (SPEC 9.1, issue 11 item 3), on a real ``twistd -n mailgw``:
no send API unless ``http.send`` is configured; on its own listener with bearer tokens
(none: 401 with ``WWW-Authenticate: Bearer``; wrong: 403); probes and metrics need no
token; the token never reaches the log; every answer is counted.  (A send API reachable
off loopback without tokens stops start-up: test_startup_failures.py.)"""

from __future__ import annotations

import re
import urllib.error
import urllib.request
import uuid

import realservers
from support.gatewayprocess import Twistd, accepts, wait_until, write_config

TOKEN = "send-" + uuid.uuid4().hex


def request(url: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, dict, str]:
    req = urllib.request.Request(url, data=body, headers=headers or {}, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


def sink_destination(sink) -> dict:
    return {
        "Name": "office", "Type": "MAIL", "Authentication": "NoAuthentication", "mail.transport.protocol": "smtp",
        "mail.smtp.host": sink.host, "mail.smtp.port": str(sink.port), "mail.smtp.starttls.enable": "false",
    }


def sent_count(metrics: str, status: int) -> float:
    found = re.search(rf'^mailgw_send_requests_total{{status="{status}"}} (\S+)$', metrics, re.M)
    return float(found.group(1)) if found else 0.0


def test_no_send_api_unless_configured(tmp_path, smtp_sink):
    smtp, http = realservers.free_port(), realservers.free_port()
    write_config(tmp_path / "gateway.yaml", {
        "destinations": [sink_destination(smtp_sink)],
        "listeners": [{"destination": "office", "listen": f"tcp:{smtp}:interface=127.0.0.1"}],
        "http": {"listen": f"tcp:{http}:interface=127.0.0.1"},
    })
    with Twistd(["mailgw", "--config", "gateway.yaml"], tmp_path) as gateway:
        base = f"http://127.0.0.1:{http}"
        wait_until(lambda: accepts(http), "the http listener")
        status, _, _ = request(f"{base}/v1/send/office/you@example.org", b"hello", {"Subject": "x"})
        assert status == 404
        for path in ("/healthz", "/readyz", "/metrics"):
            assert request(base + path)[0] == 200, path
        gateway.stop()


def test_send_api_on_its_own_listener_with_bearer_tokens(tmp_path, smtp_sink):
    smtp, http, send = (realservers.free_port() for _ in range(3))
    (tmp_path / "send-token").write_text(TOKEN + "\n")
    write_config(tmp_path / "gateway.yaml", {
        "destinations": [sink_destination(smtp_sink)],
        "listeners": [{"destination": "office", "listen": f"tcp:{smtp}:interface=127.0.0.1"}],
        # the send API on all interfaces: allowed because it needs a token
        "http": {"listen": f"tcp:{http}:interface=127.0.0.1", "send": {"listen": f"tcp:{send}", "tokens": [{"file": "send-token"}]}},
    })
    with Twistd(["mailgw", "--config", "gateway.yaml"], tmp_path) as gateway:
        base, api = f"http://127.0.0.1:{http}", f"http://127.0.0.1:{send}/v1/send/office/you@example.org"
        wait_until(lambda: accepts(http) and accepts(send), "the http and send listeners")
        before = request(base + "/metrics")[2]

        status, headers, text = request(api, b"no token", {"Subject": "s"})
        assert status == 401 and headers.get("WWW-Authenticate", "").startswith("Bearer"), (status, headers)
        status, headers, text = request(api, b"bad token", {"Subject": "s", "Authorization": "Bearer not-" + TOKEN})
        assert status == 403, text
        status, _, _ = request(api, b"basic", {"Authorization": "Basic " + TOKEN})
        assert status == 401

        mark = uuid.uuid4().hex
        status, _, text = request(api, f"sent with a token {mark}\n".encode(),
                                  {"Subject": mark, "From": "app@example.org", "Authorization": f"Bearer {TOKEN}"})
        assert status == 200 and text.startswith("250"), text
        got = smtp_sink.wait_for(lambda m: mark.encode() in m.data, timeout=30)
        assert got.rcpt_tos == ["you@example.org"] and TOKEN.encode() not in got.data

        # Probes and metrics stay on the http listener, without a token; the send API
        # is not there.
        for path in ("/healthz", "/readyz"):
            assert request(base + path)[0] == 200
        assert request(f"{base}/v1/send/office/you@example.org", b"x", {"Authorization": f"Bearer {TOKEN}"})[0] == 404
        after = request(base + "/metrics")[2]
        for code, more in ((401, 2), (403, 1), (200, 1)):
            assert sent_count(after, code) - sent_count(before, code) == more, code
        gateway.stop()
        assert TOKEN not in gateway.log() + gateway.stderr()
