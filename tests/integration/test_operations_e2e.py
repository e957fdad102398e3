"""Issue 12 end to end: a real ``twistd -n mailgw --config`` serves real sessions --
relayed (Basic, and OAuth2 client credentials against tests/tokenservice.py), refused
for a bad password, refused by the session limit, closed before release -- and a send
API request; then the /metrics scrape (families, labels, counts, parsed with
prometheus-client's parser), the audit lines (fields and values), /status, and a scan of
everything the gateway wrote for every secret of the run in every encoding.

Everything runs once (a module-scoped fixture); each test checks one part, so a report
can tell which part works.
"""

from __future__ import annotations

import imaplib
import json
import os
import signal
import socket
import sys
import uuid
from collections import defaultdict

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.clients import http, read_line
from support.gatewayprocess import Twistd
from support.reactor import wait_for
from support.secretscan import Secret, assert_no_secrets

import realservers
from tokenservice import TokenService

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
CLIENT_ID = "mailgw-e2e"

#: Destination -> what happens to its sessions in this run.
RELAY, BAD_PASSWORD, LIMITED, CLIENT_CREDENTIALS, SUBMIT = "relay-imaps", "badpw-imaps", "limit-imaps", "cc-imaps", "submit-smtps"


class Run:
    """What the module's one run left behind."""

    metrics_text: str
    samples: dict
    status: dict
    status_text: bytes
    audit_text: str
    audit: list
    stdout: str
    stderr: str
    secrets: list
    listeners: dict


def samples_of(text: str) -> dict:
    """sample name -> {frozenset(labels.items()): value}."""
    result: dict = defaultdict(dict)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            result[sample.name][frozenset(sample.labels.items())] = sample.value
    return result


@pytest.fixture(scope="module")
def run(tmp_path_factory, certs, smtp_sink):
    realservers.require_or_skip(realservers.Dovecot.TOOLS)
    password = "pw-" + uuid.uuid4().hex
    wrong = "wrong-" + uuid.uuid4().hex
    client_secret = "cs-" + uuid.uuid4().hex
    send_token = "send-" + uuid.uuid4().hex
    app_password = "app-" + uuid.uuid4().hex  # what the application offers locally
    tmp = tmp_path_factory.mktemp("e2e")
    with TokenService(clients={CLIENT_ID: client_secret}, cc_usernames={CLIENT_ID: "alice"}) as tokens, \
            realservers.Dovecot(tmp / "dovecot", certs, users={"alice": password},
                                relay=(smtp_sink.host, smtp_sink.port),
                                oauth2_introspection_url=tokens.introspection_url) as dovecot:
        dovecot.seed("alice", realservers.SEED_MESSAGE)

        def basic(name, protocol, port, secret):
            return {
                "Name": name, "Type": "MAIL", "ProxyType": "Internet", "Authentication": "BasicAuthentication",
                "mail.transport.protocol": protocol, f"mail.{protocol}.host": "localhost",
                f"mail.{protocol}.port": str(port), "mail.user": "alice", "mail.password": secret,
                "TrustStoreLocation": str(certs.ca_pem),
            }

        cc = {
            "Name": CLIENT_CREDENTIALS, "Type": "MAIL", "ProxyType": "Internet",
            "Authentication": "OAuth2ClientCredentials", "mail.transport.protocol": "imap4s",
            "mail.imap4s.host": "localhost", "mail.imap4s.port": str(dovecot.imaps_port), "mail.user": "alice",
            "TrustStoreLocation": str(certs.ca_pem), "tokenServiceURL": tokens.token_url, "clientId": CLIENT_ID,
            "clientSecret": client_secret, "tokenServiceURLType": "Dedicated",
        }
        destinations = [
            basic(RELAY, "imap4s", dovecot.imaps_port, password),
            basic(BAD_PASSWORD, "imap4s", dovecot.imaps_port, wrong),
            basic(LIMITED, "imap4s", dovecot.imaps_port, password),
            cc,
            basic(SUBMIT, "smtps", dovecot.submissions_port, password),
        ]
        listeners = {d["Name"]: realservers.free_port() for d in destinations}
        http_port = realservers.free_port()
        (tmp / "send-token").write_text(send_token + "\n")
        (tmp / "gateway.yaml").write_text(json.dumps({
            "destinations": destinations,
            "listeners": [{"destination": n, "listen": f"tcp:{p}:interface=127.0.0.1"} for n, p in listeners.items()],
            "http": {"listen": f"tcp:{http_port}:interface=127.0.0.1", "send": {"tokens": [{"file": "send-token"}]}},
            "limits": {"maxSessionsPerDestination": 1},
            "audit": {"path": "audit.jsonl"},
            "logging": {"format": "json", "level": "debug"},  # every session step, with its sid
        }))
        base = f"http://127.0.0.1:{http_port}"
        env = dict(os.environ, OAUTHLIB_INSECURE_TRANSPORT="1")  # the test token service is http
        with Twistd(["mailgw", "--config", "gateway.yaml"], tmp, env) as gateway:
            # /readyz, not a probe of a listener: a probe would be one more session.
            wait_for(lambda: http(base + "/readyz")[0] == 200, timeout=30, what="/readyz")

            # relayed: imaplib logs in (answered locally), reads, logs out.
            for name in (RELAY, CLIENT_CREDENTIALS):
                client = imaplib.IMAP4("127.0.0.1", listeners[name], timeout=30)
                client.login("app", app_password)
                assert client.select("INBOX")[0] == "OK"
                typ, data = client.fetch("1", "(BODY[TEXT])")
                assert typ == "OK" and b"Hello from the seeded INBOX." in data[0][1]
                client.logout()

            # refused for a bad password: the greeting is the refusal.
            with socket.create_connection(("127.0.0.1", listeners[BAD_PASSWORD]), timeout=30) as sock:
                assert read_line(sock).startswith(b"* BYE")

            # refused by the session limit (1): one session open, the next refused.
            held = socket.create_connection(("127.0.0.1", listeners[LIMITED]), timeout=30)
            assert read_line(held).startswith(b"* OK")
            with socket.create_connection(("127.0.0.1", listeners[LIMITED]), timeout=30) as sock:
                refusal = read_line(sock)
                assert refusal.startswith(b"* BYE") and b"too many sessions" in refusal
            held.close()  # closed before release

            # the send API, through the submission destination
            mark = uuid.uuid4().hex
            status, reply = http(f"{base}/v1/send/{SUBMIT}/bob-{mark}@example.org", f"e2e {mark}\n".encode(),
                                 {"Authorization": f"Bearer {send_token}", "From": "app@example.org",
                                  "Subject": f"e2e {mark}"})
            assert status == 200, reply
            smtp_sink.wait_for(lambda m: mark.encode() in m.data, timeout=30)

            def all_closed():
                text = http(base + "/metrics")[1].decode()
                active = samples_of(text)["mailgw_sessions_active"]
                return text if active and not any(active.values()) else None

            metrics_text = wait_for(all_closed, timeout=30, what="every session to end")
            status_text = http(base + "/status")[1]
            assert gateway.stop(60) in (0, -signal.SIGTERM), gateway.stderr()
        stdout, stderr = gateway.log(), gateway.stderr()

        r = Run()
        r.metrics_text, r.samples = metrics_text, samples_of(metrics_text)
        r.status_text, r.status = status_text, json.loads(status_text)
        r.audit_text = (tmp / "audit.jsonl").read_text()
        r.audit = [json.loads(line) for line in r.audit_text.splitlines()]
        r.stdout, r.stderr, r.listeners = stdout, stderr, listeners
        with tokens._lock:
            issued = list(tokens.access_tokens)
        r.secrets = [
            Secret("alice's password", password, user="alice"),
            Secret("the wrong password", wrong, user="alice"),
            Secret("the client secret", client_secret, user=CLIENT_ID),
            Secret("the send API token", send_token),
            Secret("the application's discarded password", app_password, user="app"),
        ] + [Secret(f"access token {i}", token, user="alice") for i, token in enumerate(issued)]
        assert issued, "the token service issued no token"
        yield r


def value(run, name, **labels):
    return run.samples[name].get(frozenset(labels.items()))


def series(run, name, **match):
    """{labels: value} of ``name`` whose labels include ``match``."""
    return {
        labels: v for labels, v in run.samples[name].items() if match.items() <= dict(labels).items()
    }


# -- /metrics -------------------------------------------------------------------------------


def test_sessions_accepted_per_destination(run):
    expected = {RELAY: 1, CLIENT_CREDENTIALS: 1, BAD_PASSWORD: 1, LIMITED: 2, SUBMIT: 1}
    for name, count in expected.items():
        assert value(run, "mailgw_sessions_accepted_total", destination=name) == count, name
        assert value(run, "mailgw_sessions_active", destination=name) == 0, name


def test_a_refusal_counts_once_under_its_reason(run):
    refused = {dict(labels)["destination"]: (dict(labels)["reason"], v)
               for labels, v in series(run, "mailgw_sessions_refused_total").items() if v}
    assert refused == {BAD_PASSWORD: ("auth", 1), LIMITED: ("limit", 1)}


def test_session_durations_by_outcome(run):
    counts = {(dict(labels)["destination"], dict(labels)["outcome"]): v
              for labels, v in series(run, "mailgw_session_duration_seconds_count").items() if v}
    assert counts == {
        (RELAY, "relayed"): 1, (CLIENT_CREDENTIALS, "relayed"): 1, (SUBMIT, "relayed"): 1,
        (BAD_PASSWORD, "refused"): 1, (LIMITED, "refused"): 1, (LIMITED, "closed"): 1,
    }
    for labels, total in series(run, "mailgw_session_duration_seconds_sum").items():
        assert total >= 0


def test_relay_bytes_in_both_directions(run):
    for name in (RELAY, CLIENT_CREDENTIALS, SUBMIT):
        assert value(run, "mailgw_relay_bytes_total", destination=name, direction="to_upstream") > 0, name
        assert value(run, "mailgw_relay_bytes_total", destination=name, direction="to_app") > 0, name
    assert not series(run, "mailgw_relay_bytes_total", destination=BAD_PASSWORD)


def test_upstream_phases_observed(run):
    for name in (RELAY, CLIENT_CREDENTIALS, SUBMIT):
        for phase in ("connect", "tls", "login"):
            assert value(run, "mailgw_upstream_seconds_count", destination=name, phase=phase) >= 1, (name, phase)
    # refused at login: connected and TLS-protected, never logged in
    assert value(run, "mailgw_upstream_seconds_count", destination=BAD_PASSWORD, phase="tls") == 1
    assert not value(run, "mailgw_upstream_seconds_count", destination=BAD_PASSWORD, phase="login")


def test_build_info(run):
    (labels,) = series(run, "mailgw_build_info")
    assert dict(labels)["version"] and run.samples["mailgw_build_info"][labels] == 1


def test_token_metrics(run):
    assert value(run, "mailgw_token_requests_total", grant="client_credentials", outcome="ok") >= 1
    assert value(run, "mailgw_token_request_seconds_count", grant="client_credentials") >= 1
    assert value(run, "mailgw_token_cache_total", result="miss") >= 1


def test_send_api_metric(run):
    assert value(run, "mailgw_send_requests_total", status="200") == 1


# -- the audit log --------------------------------------------------------------------------

SESSION_KEYS = [
    "time", "sid", "destination", "tenant", "client", "upstream", "authentication", "outcome", "reason",
    "released", "bytes_to_upstream", "bytes_to_app", "seconds", "tls",
]


def sessions_of(run, name):
    return [line for line in run.audit if "sid" in line and line["destination"] == name]


def test_audit_has_one_line_per_session_with_the_spec_fields(run):
    session_lines = [line for line in run.audit if "sid" in line]
    assert len(session_lines) == 6 and len({line["sid"] for line in session_lines}) == 6
    for line in session_lines:
        assert list(line) == SESSION_KEYS
        assert line["client"].startswith("127.0.0.1:") and line["tenant"] is None and line["seconds"] >= 0


def test_audit_relayed_sessions(run):
    for name, authentication in ((RELAY, "BasicAuthentication"), (CLIENT_CREDENTIALS, "OAuth2ClientCredentials"),
                                 (SUBMIT, "BasicAuthentication")):
        (line,) = sessions_of(run, name)
        assert line["outcome"] == "relayed" and line["reason"] is None and line["released"] is True
        assert line["authentication"] == authentication
        assert line["upstream"].startswith("localhost:") and line["tls"] in ("TLSv1.2", "TLSv1.3")
        assert line["bytes_to_upstream"] > 0 and line["bytes_to_app"] > 0


def test_audit_refused_and_closed_sessions(run):
    (bad,) = sessions_of(run, BAD_PASSWORD)
    assert (bad["outcome"], bad["reason"], bad["released"], bad["bytes_to_app"]) == ("refused", "auth", False, 0)
    assert bad["tls"] in ("TLSv1.2", "TLSv1.3")
    limited = sorted(sessions_of(run, LIMITED), key=lambda line: line["outcome"])
    assert [(line["outcome"], line["reason"], line["released"]) for line in limited] == [
        ("closed", None, False), ("refused", "limit", False),
    ]


def test_audit_send_line(run):
    (line,) = [line for line in run.audit if "sid" not in line]
    assert line == {**line, "destination": SUBMIT, "from": "app@example.org", "recipients": 1, "status": 200}
    assert line["bytes"] > 0 and "bob-" not in run.audit_text


# -- /status --------------------------------------------------------------------------------


def test_status_page(run):
    status = run.status
    assert status["ready"] is True
    assert {(l["destination"], l["address"]) for l in status["listeners"]} == {
        (name, f"127.0.0.1:{port}") for name, port in run.listeners.items()
    }
    destinations = status["destinations"]
    for name in (RELAY, CLIENT_CREDENTIALS, SUBMIT):
        assert destinations[name]["last_success"]["time"], name
        assert destinations[name]["last_failure"] is None and destinations[name]["sessions"] == 0
    assert destinations[BAD_PASSWORD]["last_failure"]["kind"] == "auth"
    assert destinations[BAD_PASSWORD]["last_failure"]["reason"].startswith(f"destination {BAD_PASSWORD}:")
    assert destinations[BAD_PASSWORD]["last_success"] is None
    assert destinations[LIMITED]["last_failure"]["kind"] == "limit"
    assert 3000 < destinations[CLIENT_CREDENTIALS]["token_expires_in"] <= 3600
    assert "token_expires" not in destinations[RELAY]
    assert status["audit"]["written"] >= 6 and status["audit"]["dropped"] == 0


# -- secrets ---------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["audit_text", "stdout", "stderr", "status_text", "metrics_text"])
def test_no_secret_anywhere(run, where):
    assert_no_secrets(getattr(run, where), run.secrets, where)


def test_the_log_is_json_with_session_ids(run):
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    sids = {line["sid"] for line in run.audit if "sid" in line}
    assert sids <= {line.get("sid") for line in lines}  # every audited session has log lines
