"""The ``twistd mailgw`` command as an operator uses it: config errors, SIGTERM (the demo: test_demo.py)."""

from __future__ import annotations

import json
import re
import signal
import socket
import smtplib
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

import pytest

import realservers

# The twistd command, run by the same interpreter as the tests.
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def run_twistd(args, cwd, timeout=30):
    return subprocess.run(TWISTD + args, cwd=cwd, capture_output=True, text=True, timeout=timeout)


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
    result = run_twistd(["-n", "mailgw", "--config", str(path)], tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Traceback" not in output
    assert re.search(r"mailgw: configuration error: .*gateway\.yaml", output)
    assert expected in output


def wait_until(predicate, what, timeout=20):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def readyz_status(base):
    try:
        return urllib.request.urlopen(base + "/readyz", timeout=5).status
    except urllib.error.HTTPError as e:
        return e.code


def accepts(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        return True
    except OSError:
        return False


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
    (tmp_path / "gateway.yaml").write_text(json.dumps(config))
    proc = subprocess.Popen(
        TWISTD + ["-n", "--pidfile=", "mailgw", "--config", "gateway.yaml"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        realservers.wait_for_banner("127.0.0.1", port, "220", timeout=20)
        client = smtplib.SMTP("127.0.0.1", port, timeout=30)
        client.ehlo()
        base = f"http://127.0.0.1:{http_port}"
        assert urllib.request.urlopen(base + "/readyz", timeout=10).status == 200
        metrics = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
        assert 'mailgw_sessions_active{destination="plain"} 1.0' in metrics
        proc.send_signal(signal.SIGTERM)
        wait_until(lambda: readyz_status(base) == 503, "/readyz to report draining")
        wait_until(lambda: not accepts(port), "the listener to stop accepting")
        mark = uuid.uuid4().hex
        client.sendmail("a@example.org", ["b@example.org"], f"Subject: {mark}\r\n\r\ndrained\r\n")
        client.quit()
        smtp_sink.wait_for(lambda m: mark.encode() in m.data, timeout=30)
        # twistd re-raises the signal that stopped it once shutdown is complete.
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
        output = proc.communicate()[0]
    # (a probe of the listener just before it closed may have opened a second session)
    assert re.search(r"draining [12] open sessions", output), output


def test_kubernetes_mode_bad_section_is_one_clear_line(tmp_path):
    path = tmp_path / "gateway.yaml"
    path.write_text(json.dumps({"kubernetes": {"portRange": "lots"}}))
    result = run_twistd(["-n", "mailgw", "--kubernetes", "--config", str(path)], tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "Traceback" not in output
    assert "mailgw: configuration error:" in output and "portRange" in output
