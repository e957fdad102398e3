"""The ``twistd mailgw`` command as an operator uses it: config errors, SIGTERM (the demo: test_demo.py)."""

from __future__ import annotations

import json
import re
import signal
import smtplib
import uuid

import pytest

import realservers
from support.clients import http
from support.gatewayprocess import Twistd, accepts, run_twistd, wait_until, write_config

def test_plugin_is_discovered(tmp_path):
    result = run_twistd(["mailgw", "--help"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "--demo" in result.stdout and "--config" in result.stdout


@pytest.mark.parametrize(
    "config, expected",
    [
        ({"destinations": [{"Name": "office", "Type": "MAIL", "mail.transport.protocol": "smtps"}]},
         "destination 'office', key 'mail.smtps.host': is missing"),
        ({"destinations": [], "listeners": [{"destination": "ghost", "listen": "tcp:1"}]},
         "no destination named 'ghost'"),
        ("destinations: [unclosed\n", "not valid YAML/JSON"),
    ],
)
def test_bad_config_stops_startup_with_one_clear_line(tmp_path, config, expected):
    path = tmp_path / "gateway.yaml"
    path.write_text(config if isinstance(config, str) else json.dumps(config))
    result = run_twistd(["mailgw", "--config", str(path)], tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Traceback" not in output
    assert re.search(r"mailgw: configuration error: .*gateway\.yaml", output)
    assert expected in output


def test_sigterm_drains_open_sessions(tmp_path, postfix, smtp_sink):
    """A session open at SIGTERM finishes its mail; new connections are refused; clean exit."""
    port = realservers.free_port()
    http_port = realservers.free_port()
    config = {
        "destinations": [{
            "Name": "plain", "Type": "MAIL", "Authentication": "NoAuthentication",
            "mail.transport.protocol": "smtp", "mail.smtp.host": "127.0.0.1",
            "mail.smtp.port": str(postfix.plain_port), "mail.smtp.starttls.enable": "false",
        }],
        "listeners": [{"destination": "plain", "listen": f"tcp:{port}:interface=127.0.0.1"}],
        "http": {"listen": f"tcp:{http_port}:interface=127.0.0.1"},
        "timeouts": {"drain": 20},
    }
    write_config(tmp_path / "gateway.yaml", config)
    with Twistd(["mailgw", "--config", "gateway.yaml"], tmp_path) as gateway:
        realservers.wait_for_banner("127.0.0.1", port, "220", timeout=20)
        client = smtplib.SMTP("127.0.0.1", port, timeout=30)
        assert client.ehlo()[0] == 250
        base = f"http://127.0.0.1:{http_port}"
        assert http(base + "/readyz") == (200, b"ready\n")
        assert 'mailgw_sessions_active{destination="plain"} 1.0' in http(base + "/metrics")[1].decode()
        gateway.signal(signal.SIGTERM)
        wait_until(lambda: http(base + "/readyz")[0] == 503, "/readyz to report draining")
        wait_until(lambda: not accepts(port), "the listener to stop accepting")
        mark = uuid.uuid4().hex
        client.sendmail("a@example.org", ["b@example.org"], f"Subject: {mark}\r\n\r\ndrained\r\n")
        client.quit()
        smtp_sink.wait_for(lambda m: mark.encode() in m.data, timeout=30)
        # twistd re-raises the signal that stopped it once shutdown is complete.
        assert gateway.proc.wait(timeout=30) in (0, -signal.SIGTERM)
    output = gateway.log() + gateway.stderr()
    # (a probe of the listener just before it closed may have opened a second session)
    assert re.search(r"draining [12] open sessions", output), output


def test_kubernetes_mode_bad_section_is_one_clear_line(tmp_path):
    path = tmp_path / "gateway.yaml"
    path.write_text(json.dumps({"kubernetes": {"portRange": "lots"}}))
    result = run_twistd(["mailgw", "--kubernetes", "--config", str(path)], tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "Traceback" not in output
    assert "mailgw: configuration error:" in output and "portRange" in output
