"""SIGHUP on a real ``twistd -n mailgw`` (SPEC 9.5, issue 11 item 4).

Standalone: the configuration file is read again; a removed listener stops accepting
while its open session finishes on the old destination, a kept listener and a new one
serve the changed destination; a bad file keeps everything running and logs exactly one
line.  Kubernetes mode: SIGHUP never stops the gateway.
"""

from __future__ import annotations

import json
import signal
import smtplib
import socket
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import realservers
from support.gatewayprocess import Twistd, accepts, environment, wait_until, write_config

sys.path.insert(0, str(Path(__file__).parent.parent / "kube"))
from fakeapi import FakeKubeAPI  # noqa: E402

NOT_RELOADED = "mailgw: configuration not reloaded: gateway.yaml: "


def plain(name: str, sink) -> dict:
    return {
        "Name": name, "Type": "MAIL", "Authentication": "NoAuthentication", "mail.transport.protocol": "smtp",
        "mail.smtp.host": sink.host, "mail.smtp.port": str(sink.port), "mail.smtp.starttls.enable": "false",
    }


def listener(port: int, destination: str = "office") -> dict:
    return {"destination": destination, "listen": f"tcp:{port}:interface=127.0.0.1"}


def send(port: int, mark: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.sendmail("app@example.org", ["you@example.org"], f"Subject: {mark}\r\n\r\nvia {port}\r\n")


def delivered(sink, mark: str):
    return sink.wait_for(lambda m: mark.encode() in m.data, timeout=30)


def greets(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            return sock.makefile("rb").readline().startswith(b"220")
    except OSError:
        return False


def test_sighup_reloads_listeners_and_destinations(tmp_path, smtp_sink):
    removed, kept, added, http = (realservers.free_port() for _ in range(4))
    path = tmp_path / "gateway.yaml"
    with realservers.SMTPSink() as new_sink:
        write_config(path, {
            "destinations": [plain("office", smtp_sink)],
            "listeners": [listener(removed), listener(kept)],
            "http": {"listen": f"tcp:{http}:interface=127.0.0.1"},
        })
        with Twistd(["mailgw", "--config", "gateway.yaml"], tmp_path) as gateway:
            wait_until(lambda: greets(removed) and greets(kept), "the gateway to greet")
            open_session = smtplib.SMTP("127.0.0.1", removed, timeout=30)
            open_session.ehlo()

            # office now points at another server; one listener goes, one comes.
            write_config(path, {
                "destinations": [plain("office", new_sink)],
                "listeners": [listener(kept), listener(added)],
                "http": {"listen": f"tcp:{http}:interface=127.0.0.1"},
            })
            gateway.signal(signal.SIGHUP)
            gateway.wait_for_log("configuration reloaded from gateway.yaml")
            wait_until(lambda: greets(added), "the added listener")
            assert not accepts(removed)

            # The session opened before the reload finishes, on the old destination ...
            old_mark = uuid.uuid4().hex
            open_session.sendmail("app@example.org", ["you@example.org"], f"Subject: {old_mark}\r\n\r\nold\r\n")
            open_session.quit()
            delivered(smtp_sink, old_mark)
            # ... and new sessions use the new one, on the kept and the added listener.
            for port in (kept, added):
                mark = uuid.uuid4().hex
                send(port, mark)
                delivered(new_sink, mark)

            # A file that cannot be used: one log line each, nothing changes.
            busy = socket.socket()
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            bad_files = [
                b"destinations: [unclosed\n",
                b"destinations: []\nhostname: caf\xe9\n",
                json.dumps({"destinations": [plain("office", new_sink)],
                            "listeners": [listener(kept), listener(added), listener(busy.getsockname()[1])],
                            "http": {"listen": f"tcp:{http}:interface=127.0.0.1"}}).encode(),
            ]
            for number, content in enumerate(bad_files, start=1):
                before = len(gateway.log().splitlines())
                path.write_bytes(content)
                gateway.signal(signal.SIGHUP)
                log = gateway.wait_for_log(NOT_RELOADED, count=number)
                # (sessions of the sends above may still log their close)
                new_lines = [line for line in log.splitlines()[before:] if "[mailgw.session" not in line]
                assert len(new_lines) == 1 and NOT_RELOADED in new_lines[0], new_lines
            busy.close()
            lines = [line for line in log.splitlines() if "configuration not reloaded" in line]
            assert len(lines) == 3, lines
            assert "not valid YAML/JSON" in lines[0]
            assert "not UTF-8" in lines[1]
            assert "listeners[2]: cannot listen on" in lines[2] and "address already in use" in lines[2]
            assert "Traceback" not in log
            assert gateway.alive()
            mark = uuid.uuid4().hex
            send(added, mark)
            delivered(new_sink, mark)
            assert greets(kept) and not accepts(removed)
            assert urllib.request.urlopen(f"http://127.0.0.1:{http}/readyz", timeout=10).status == 200
            assert gateway.stop() in (0, -signal.SIGTERM)


def test_sighup_never_stops_the_kubernetes_gateway(tmp_path):
    http = realservers.free_port()
    with FakeKubeAPI() as fake:
        (tmp_path / "kubeconfig").write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": fake.url}}],
            "users": [{"name": "fake", "user": {}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
        }))
        write_config(tmp_path / "gateway.yaml", {"http": {"listen": f"tcp:{http}:interface=127.0.0.1"}})
        env = environment(KUBECONFIG=str(tmp_path / "kubeconfig"), POD_NAMESPACE="mailgw-system", POD_NAME="gw-0")
        with Twistd(["mailgw", "--kubernetes", "--config", "gateway.yaml"], tmp_path, env=env) as gateway:
            base = f"http://127.0.0.1:{http}"
            wait_until(lambda: accepts(http), "the http listener")
            for number in (1, 2):
                gateway.signal(signal.SIGHUP)
                gateway.wait_for_log("SIGHUP ignored: Kubernetes mode", count=number)
            assert gateway.alive()
            assert urllib.request.urlopen(base + "/healthz", timeout=10).status == 200
            assert gateway.stop() in (0, -signal.SIGTERM)


def test_sighup_rotates_the_send_api_tokens(tmp_path, smtp_sink):
    """A leaked send API token is replaced with a SIGHUP, no restart."""
    port, http = realservers.free_port(), realservers.free_port()
    path = tmp_path / "gateway.yaml"

    def config(token: str) -> dict:
        return {
            "destinations": [plain("office", smtp_sink)], "listeners": [listener(port)],
            "http": {"listen": f"tcp:{http}:interface=127.0.0.1", "send": {"tokens": [token]}},
        }

    def status(token: str) -> int:
        request = urllib.request.Request(
            f"http://127.0.0.1:{http}/v1/send/office/you@example.org", data=b"rotation\r\n", method="POST",
            headers={"Authorization": f"Bearer {token}", "Subject": "rotation", "From": "app@example.org"},
        )
        try:
            return urllib.request.urlopen(request, timeout=30).status
        except urllib.error.HTTPError as e:
            return e.code

    write_config(path, config("old-token-1"))
    with Twistd(["mailgw", "--config", "gateway.yaml"], tmp_path) as gateway:
        wait_until(lambda: greets(port), "the gateway to greet")
        assert status("old-token-1") == 200
        write_config(path, config("new-token-2"))
        gateway.signal(signal.SIGHUP)
        gateway.wait_for_log("configuration reloaded from gateway.yaml")
        assert (status("old-token-1"), status("new-token-2")) == (403, 200)
        assert "takes effect at the next restart" not in gateway.log()
        assert gateway.stop() in (0, -signal.SIGTERM)


def test_sighup_reopens_the_audit_file_after_logrotate(tmp_path, smtp_sink):
    port = realservers.free_port()
    write_config(tmp_path / "gateway.yaml", {
        "destinations": [plain("office", smtp_sink)], "listeners": [listener(port)],
        "audit": {"path": "audit.jsonl"},
    })
    audit, rotated = tmp_path / "audit.jsonl", tmp_path / "audit.jsonl.1"
    with Twistd(["mailgw", "--config", "gateway.yaml"], tmp_path) as gateway:
        wait_until(lambda: greets(port), "the gateway to greet")
        send(port, uuid.uuid4().hex)
        wait_until(lambda: audit.read_text().count('"outcome":"relayed"') == 1, "the first audit line")
        audit.rename(rotated)  # what logrotate does before it sends SIGHUP
        gateway.signal(signal.SIGHUP)
        gateway.wait_for_log("configuration reloaded from gateway.yaml")
        send(port, uuid.uuid4().hex)
        wait_until(lambda: audit.exists() and '"outcome":"relayed"' in audit.read_text(), "an audit line in the new file")
        assert gateway.stop() in (0, -signal.SIGTERM)
    relayed = '"outcome":"relayed"'  # (greets() made a session of its own before the first)
    assert rotated.read_text().count(relayed) == 1 and audit.read_text().count(relayed) == 1
