"""Start-up failures of a real ``twistd -n mailgw`` (SPEC 9.6, issue 11 item 6): each
prints exactly one line ``mailgw: ...`` on standard error and exits non-zero, without a
traceback -- in ``--config``, ``--kubernetes`` and ``--demo`` modes."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pytest

from support.gatewayprocess import environment, run_twistd, write_config

sys.path.insert(0, str(Path(__file__).parent.parent / "kube"))
from fakeapi import FakeKubeAPI  # noqa: E402

DESTINATION = {
    "Name": "office", "Type": "MAIL", "Authentication": "BasicAuthentication",
    "mail.transport.protocol": "smtps", "mail.smtps.host": "smtp.example.org",
    "mail.user": "app@example.org", "mail.password": "pw",
}


def listening_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def assert_one_line(result, *expected: str) -> str:
    """Exit status non-zero, exactly one line on standard error, starting ``mailgw: ``,
    containing every ``expected`` text; no traceback anywhere."""
    assert result.returncode != 0, (result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr, result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    [line] = lines
    assert line.startswith("mailgw: "), line
    for text in expected:
        assert text in line, line
    return line


def config_with(tmp_path, **changes) -> Path:
    doc = {"destinations": [DESTINATION], "listeners": [{"destination": "office", "listen": "tcp:0:interface=127.0.0.1"}]}
    doc.update(changes)
    return write_config(tmp_path / "gateway.yaml", doc)


@pytest.fixture
def busy_port():
    sock = listening_socket()
    yield sock.getsockname()[1]
    sock.close()


def test_port_in_use(tmp_path, busy_port):
    path = config_with(tmp_path, listeners=[{"destination": "office", "listen": f"tcp:{busy_port}:interface=127.0.0.1"}])
    assert_one_line(run_twistd(["mailgw", "--config", str(path)], tmp_path),
                    "listeners[0]: cannot listen on", f"tcp:{busy_port}", "address already in use")


def test_http_port_in_use(tmp_path, busy_port):
    path = config_with(tmp_path, http={"listen": f"tcp:{busy_port}:interface=127.0.0.1"})
    assert_one_line(run_twistd(["mailgw", "--config", str(path)], tmp_path), "http: cannot listen on", "address already in use")


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"listeners": [{"destination": "office", "listen": "tcp:99999"}]}, ("port 99999 is out of range",)),
        ({"listeners": [{"destination": "office", "listen": "tcp:25251:interface=127.0.0.1"},
                        {"destination": "office", "listen": "tcp:25251"}]},
         ("listeners[0] and listeners[1] both listen on port 25251",)),
        ({"listeners": [{"destination": "office", "listen": "carrier-pigeon:1"}]}, ("invalid endpoint string",)),
        ({"listeners": [{"destination": "office", "listen": "ssl:0:privateKey=missing.pem"}]}, ("invalid endpoint string",)),
        ({"http": {"listen": "tcp:0", "send": {}}}, ("http.send", "reachable from other hosts", "without tokens")),
    ],
)
def test_bad_listeners(tmp_path, changes, expected):
    path = config_with(tmp_path, **changes)
    assert_one_line(run_twistd(["mailgw", "--config", str(path)], tmp_path), "mailgw: configuration error:", *expected)


def test_bad_files(tmp_path):
    """Every way a file can be unusable, each on its own run."""
    cases = {
        "not-utf8.yaml": (b"destinations: []\nhostname: caf\xe9\n", "not UTF-8"),
        "nested.yaml": (b"[" * 200000, "nested too deeply"),
        "huge.yaml": (b"# padding\n" * 420000, "larger than 4 MiB"),
        "big-secret.yaml": (json.dumps({"destinations": [{**DESTINATION, "mail.password": {"file": "big"}}]}).encode(),
                            "secret file is larger than 64 KiB"),
        "zero-secret.yaml": (json.dumps({"destinations": [{**DESTINATION, "mail.password": {"file": "/dev/zero"}}]}).encode(),
                             "secret file is larger than 64 KiB"),
        "missing-secret.yaml": (json.dumps({"destinations": [{**DESTINATION, "mail.password": {"file": "nowhere"}}]}).encode(),
                                "No such file"),
    }
    (tmp_path / "big").write_bytes(b"s" * (64 * 1024 + 1))
    for name, (content, expected) in cases.items():
        (tmp_path / name).write_bytes(content)
        result = run_twistd(["mailgw", "--config", name], tmp_path)
        assert_one_line(result, "mailgw: configuration error:", name, expected)
    # Unreadable: a directory, and a file that is not there (the tests run as root, so
    # permission bits would not stop them).
    assert_one_line(run_twistd(["mailgw", "--config", str(tmp_path)], tmp_path), "Is a directory")
    assert_one_line(run_twistd(["mailgw", "--config", "absent.yaml"], tmp_path), "absent.yaml", "No such file")


def test_demo_port_in_use(tmp_path):
    from mailgw.demo import DEMO_SMTP_LISTEN

    port = int(DEMO_SMTP_LISTEN.split(":")[1])
    sock = socket.socket()
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen()
    except OSError:
        pass  # something (another demo) holds it already: all the better
    try:
        assert_one_line(run_twistd(["mailgw", "--demo"], tmp_path), "demo: listeners[0]: cannot listen on", "address already in use")
    finally:
        sock.close()


def kubeconfig(tmp_path: Path, server: str) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": server}}],
        "users": [{"name": "fake", "user": {}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
    }))
    return path


def test_kubernetes_mode_failures(tmp_path, busy_port):
    env = environment(KUBECONFIG=str(tmp_path / "no-such-kubeconfig"))
    env.pop("KUBERNETES_SERVICE_HOST", None)
    assert_one_line(run_twistd(["mailgw", "--kubernetes"], tmp_path, env=env), "Kubernetes API configuration")

    with FakeKubeAPI() as fake:
        env = environment(KUBECONFIG=str(kubeconfig(tmp_path, fake.url)))
        path = write_config(tmp_path / "gateway.yaml", {"http": {"listen": f"tcp:{busy_port}:interface=127.0.0.1"}})
        assert_one_line(run_twistd(["mailgw", "--kubernetes", "--config", str(path)], tmp_path, env=env),
                        "http: cannot listen on", "address already in use")
        path = write_config(tmp_path / "gateway.yaml", {"http": {"listen": "tcp:0:interface=127.0.0.1", "send": {}}})
        assert_one_line(run_twistd(["mailgw", "--kubernetes", "--config", str(path)], tmp_path, env=env),
                        "cluster-wide gateway has no send API")
        path.write_bytes(b"http: {listen: \xff}\n")
        assert_one_line(run_twistd(["mailgw", "--kubernetes", "--config", str(path)], tmp_path, env=env), "not UTF-8")
