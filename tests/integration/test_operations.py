"""Operations over real sockets: /status and /readyz, the send API's audit lines, JSON
logs and the audit log on standard output from a real ``twistd -n mailgw --config``, and
the monitoring files of k8s/monitoring checked against a real /metrics scrape."""

from __future__ import annotations

import json
import re
import signal
import smtplib
import sys
import uuid
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from support.clients import http, http_head_only
from support.gatewayprocess import Twistd, write_config
from support.reactor import in_reactor, wait_for
from support.secretscan import Secret, assert_no_secrets

import realservers

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "k8s" / "monitoring"
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]

#: SPEC 9.2: family -> (type, labels).  Dashboards and alerts may use nothing else.
SPEC_METRICS = {
    "mailgw_sessions_accepted_total": ("counter", {"destination"}),
    "mailgw_sessions_active": ("gauge", {"destination"}),
    "mailgw_sessions_refused_total": ("counter", {"destination", "reason"}),
    "mailgw_session_duration_seconds": ("histogram", {"destination", "outcome"}),
    "mailgw_relay_bytes_total": ("counter", {"destination", "direction"}),
    "mailgw_upstream_seconds": ("histogram", {"destination", "phase"}),
    "mailgw_token_requests_total": ("counter", {"grant", "outcome"}),
    "mailgw_token_request_seconds": ("histogram", {"grant"}),
    "mailgw_token_cache_total": ("counter", {"result"}),
    "mailgw_pool_connections": ("gauge", {"destination", "state"}),
    "mailgw_send_requests_total": ("counter", {"status"}),
    "mailgw_kube_reconciles_total": ("counter", {"result"}),
    "mailgw_kube_reconcile_seconds": ("histogram", set()),
    "mailgw_kube_queue_depth": ("gauge", set()),
    "mailgw_kube_leader": ("gauge", set()),
    "mailgw_kube_watch_restarts_total": ("counter", {"resource"}),
    "mailgw_kube_api_requests_total": ("counter", {"verb", "resource", "code"}),
    "mailgw_build_info": ("gauge", {"version"}),
}
#: Labels Prometheus adds to every scraped series (the Operator's target labels).
TARGET_LABELS = {"namespace", "pod", "instance", "job", "service", "endpoint", "container"}


def plain_destination(name, sink, **extra):
    d = {
        "Name": name, "Type": "MAIL", "Authentication": "NoAuthentication", "mail.transport.protocol": "smtp",
        "mail.smtp.host": "127.0.0.1", "mail.smtp.port": str(sink.port), "mail.smtp.starttls.enable": "false",
    }
    d.update(extra)
    return d


# -- the monitoring files against a real scrape -------------------------------------------


def scrape_names(text: str) -> dict[str, str]:
    """Every series name a query may use -> its family's SPEC name (``_total`` included)."""
    names = {}
    for family in text_string_to_metric_families(text):
        if family.type == "counter":
            spec = family.name + "_total"
            names[spec] = spec
            names[family.name + "_created"] = spec
        elif family.type == "histogram":
            for suffix in ("", "_bucket", "_count", "_sum", "_created"):
                names[family.name + suffix] = family.name
        else:
            names[family.name] = family.name
    return names


def dashboard_exprs() -> list[str]:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            exprs.append(variable["definition"])
    return exprs


def rule_docs() -> list[dict]:
    return [d for d in yaml.safe_load_all((MONITORING / "prometheusrule.yaml").read_text()) if d]


def rules() -> list[dict]:
    return [rule for doc in rule_docs() for group in doc["spec"]["groups"] for rule in group["rules"]]


def check_expression(expr: str, names: dict[str, str]) -> list[str]:
    """Problems with one PromQL expression: unknown metrics, labels not in SPEC 9.2."""
    problems = []
    used = re.findall(r"\b(mailgw_[a-z0-9_]+)", expr)
    if not used and "mailgw:" not in expr and not expr.startswith("vector("):
        problems.append(f"names no mailgw metric: {expr}")
    families = set()
    for name in used:
        if name not in names:
            problems.append(f"{name} is not in the /metrics scrape")
            continue
        families.add(names[name])
    allowed = set(TARGET_LABELS) | {"le"}
    for family in families:
        allowed |= SPEC_METRICS[family][1]
    for name, selector in re.findall(r"\b(mailgw_[a-z0-9_]+)\{([^}]*)\}", expr):
        for label in re.findall(r"([a-z_]+)\s*(?:=~|!~|!=|=)", selector):
            if name in names and label not in SPEC_METRICS[names[name]][1] | TARGET_LABELS | {"le"}:
                problems.append(f"{name} has no label {label}")
    for group in re.findall(r"\bby\s*\(([^)]*)\)", expr):
        for label in filter(None, (part.strip() for part in group.split(","))):
            if label not in allowed:
                problems.append(f"grouping by {label}, which none of {sorted(families)} has")
    return problems


def test_every_metric_in_the_dashboard_and_the_alerts_is_in_a_scrape(gateway_factory):
    http_port = realservers.free_port()
    gateway_factory({"destinations": [], "http": {"listen": f"tcp:{http_port}:interface=127.0.0.1"}})
    status, body = http(f"http://127.0.0.1:{http_port}/metrics")
    assert status == 200
    names = scrape_names(body.decode())
    for family in SPEC_METRICS:  # the contract itself is exported
        assert family in names, family

    exprs = dashboard_exprs() + [rule["expr"] for rule in rules()]
    assert len(exprs) > 30
    problems = [f"{p}" for expr in exprs for p in check_expression(expr, names)]
    assert problems == []
    referenced = {names[n] for expr in exprs for n in re.findall(r"\b(mailgw_[a-z0-9_]+)", expr)}
    assert referenced == set(SPEC_METRICS), set(SPEC_METRICS) - referenced  # every metric is on the dashboard


def test_the_checker_catches_a_misspelled_metric_and_label():
    names = {"mailgw_sessions_active": "mailgw_sessions_active"}
    assert check_expression("sum(mailgw_session_active)", names) == ["mailgw_session_active is not in the /metrics scrape"]
    assert check_expression('sum by (reason) (mailgw_sessions_active{phase="x"})', names) == [
        "mailgw_sessions_active has no label phase", "grouping by reason, which none of ['mailgw_sessions_active'] has",
    ]


def test_alerts_are_complete_and_their_runbooks_exist():
    headings = {
        re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in (ROOT / "docs" / "operations.md").read_text().splitlines() if line.startswith("#")
    }
    alerts = [rule for rule in rules() if "alert" in rule]
    assert {a["alert"] for a in alerts} >= {
        "MailgwRefusalRatioHigh", "MailgwTokenRequestsFailing", "MailgwNoLeader", "MailgwReconcileErrors",
        "MailgwSessionsNearLimit",
    }
    for alert in alerts:
        assert alert["labels"]["severity"] in ("critical", "warning", "info"), alert["alert"]
        annotations = alert["annotations"]
        assert annotations["summary"] and annotations["description"], alert["alert"]
        anchor = annotations["runbook_url"].rpartition("#")[2]
        assert anchor == alert["alert"].lower() and anchor in headings, alert["alert"]
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    used = {name for rule in rules() for name in re.findall(r"\b(mailgw:[a-z0-9_:]+)", rule["expr"])}
    assert used <= recorded


def test_dashboard_and_service_monitor_shape():
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and dashboard["uid"] == "mailgw"
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["targets"] and all(t["refId"] and t["expr"] for t in panel["targets"]), panel["title"]
    (monitor,) = yaml.safe_load_all((MONITORING / "servicemonitor.yaml").read_text())
    services = [
        d for d in yaml.safe_load_all((ROOT / "k8s" / "deployment.yaml").read_text())
        if d and d["kind"] == "Service" and d["metadata"]["name"] == "mailgw-http"
    ]
    (service,) = services
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert service["metadata"]["namespace"] in monitor["spec"]["namespaceSelector"]["matchNames"]
    ports = {p["name"] for p in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= ports


# -- /status and /readyz over HTTP ---------------------------------------------------------


def test_status_and_readyz_over_http(smtp_sink, gateway_factory):
    http_port = realservers.free_port()
    running = gateway_factory({
        "destinations": [plain_destination("plain", smtp_sink)],
        "http": {"listen": f"tcp:{http_port}:interface=127.0.0.1"},
    })
    base = f"http://127.0.0.1:{http_port}"
    host, port = running.address(0)
    with smtplib.SMTP(host, port, timeout=30) as client:
        assert client.ehlo()[0] == 250
        status, body = http(base + "/status")
        assert status == 200
        page = json.loads(body)
        assert page["ready"] is True and page["not_ready"] == []
        assert page["listeners"] == [
            {"route": "plain", "destination": "plain", "tenant": None, "address": f"{host}:{port}", "sessions": 1},
        ]
        assert page["destinations"]["plain"]["sessions"] == 1
        assert "audit" not in page
        client.quit()

    running.service.status_providers["pool"] = lambda: {"plain": {"ready": 0, "connecting": 0}}
    assert json.loads(http(base + "/status")[1])["pool"] == {"plain": {"ready": 0, "connecting": 0}}

    assert http(base + "/readyz") == (200, b"ready\n")
    in_reactor(setattr, running.gateway, "draining", True)
    try:
        assert http(base + "/readyz") == (503, b"not ready: draining\n")
        page = json.loads(http(base + "/status")[1])
        assert page["ready"] is False and page["not_ready"] == ["draining"]
    finally:
        in_reactor(setattr, running.gateway, "draining", False)


# -- the send API's audit lines ------------------------------------------------------------


def test_send_api_requests_are_audited_without_recipients_or_content(smtp_sink, gateway_factory, tmp_path):
    http_port = realservers.free_port()
    running = gateway_factory({
        "destinations": [plain_destination("plain", smtp_sink)],
        "http": {"listen": f"tcp:{http_port}:interface=127.0.0.1", "send": {}},
        "audit": {"path": "audit.jsonl"},
    })
    base = f"http://127.0.0.1:{http_port}/v1/send"
    mark = uuid.uuid4().hex
    rcpt = f"rcpt-{mark}@example.org"
    status, reply = http(f"{base}/plain/{rcpt}", f"content {mark}\n".encode(), {
        "From": "app@example.org", "Subject": f"subject {mark}", "Cc": f"cc-{mark}@example.org",
        "Content-Type": "text/plain; charset=UTF-8",
    })
    assert status == 200, reply
    smtp_sink.wait_for(lambda m: mark.encode() in m.data, timeout=30)
    assert http(f"{base}/nowhere/{rcpt}", b"x")[0] == 404
    assert http(f"{base}/plain/{rcpt}", b"x", {"To": f"Name <to-{mark}@example.org>"})[0] == 400
    # Answered before the body (LimitedRequest): audited all the same, with 0 bytes read.
    too_large = http_head_only(http_port, f"POST /v1/send/plain/{rcpt} HTTP/1.1\r\nHost: x\r\n"
                                          "Content-Length: 50000000\r\n\r\n".encode())
    assert too_large.startswith(b"HTTP/1.1 413 "), too_large
    running.stop()  # the audit log writes what is queued before it stops

    text = (tmp_path / "audit.jsonl").read_text()
    lines = [json.loads(line) for line in text.splitlines()]
    sessions = [line for line in lines if "sid" in line]  # the send API's own SMTP session
    assert [line["outcome"] for line in sessions] == ["relayed"]
    lines = [line for line in lines if "sid" not in line]
    assert [list(line) for line in lines] == [["time", "destination", "from", "recipients", "bytes", "status"]] * 4
    by_status = {line["status"]: line for line in lines}
    assert by_status[200] == {**by_status[200], "destination": "plain", "from": "app@example.org", "recipients": 2,
                              "bytes": len(f"content {mark}\n")}
    assert by_status[404]["destination"] == "nowhere" and by_status[404]["from"] is None
    assert by_status[400]["recipients"] == 2
    assert by_status[413] == {**by_status[413], "destination": "plain", "recipients": 1, "bytes": 0}
    assert mark not in text  # no recipient address, subject or content, in any of them


# -- twistd: JSON logs, and the audit log on standard output ------------------------------


@pytest.fixture
def auth_sink():
    """A private SMTP server demanding AUTH with a distinctive password."""
    password = "pw-" + uuid.uuid4().hex
    with realservers.SMTPSink(auth={"gw-user": password}) as sink:
        sink.password = password
        yield sink


def test_twistd_json_logs_and_audit_on_stdout(tmp_path, auth_sink):
    port, http_port = realservers.free_port(), realservers.free_port()
    send_token = "send-" + uuid.uuid4().hex
    (tmp_path / "send-token").write_text(send_token + "\n")
    config = {
        "destinations": [plain_destination(
            "office", auth_sink, Authentication="BasicAuthentication", **{"mail.user": "gw-user", "mail.password": auth_sink.password},
        )],
        "listeners": [{"destination": "office", "listen": f"tcp:{port}:interface=127.0.0.1"}],
        "http": {"listen": f"tcp:{http_port}:interface=127.0.0.1", "send": {"tokens": [{"file": "send-token"}]}},
        "logging": {"format": "json", "level": "debug"},  # every session step, with its sid
        "audit": {"path": "-"},
    }
    write_config(tmp_path / "gateway.yaml", config)
    with Twistd(["mailgw", "--config", "gateway.yaml"], tmp_path) as gateway:
        realservers.wait_for_banner("127.0.0.1", port, "220", timeout=30)
        mark = uuid.uuid4().hex
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.login("app", "app-password-" + mark)  # answered locally, discarded
            client.sendmail("app@example.org", ["bob@example.org"], f"Subject: {mark}\r\n\r\nbody\r\n")
        auth_sink.wait_for(lambda m: mark.encode() in m.data, timeout=30)
        status, _ = http(f"http://127.0.0.1:{http_port}/v1/send/office/carol-{mark}@example.org", b"hi",
                         {"Authorization": f"Bearer {send_token}", "From": "app@example.org"})
        assert status == 200

        def audit_written():
            return json.loads(http(f"http://127.0.0.1:{http_port}/status")[1])["audit"]["written"]

        wait_for(audit_written, timeout=30, what="the audit line")
        status_page = http(f"http://127.0.0.1:{http_port}/status")[1]
        assert gateway.stop(60) in (0, -signal.SIGTERM), gateway.stderr()
    out, err = gateway.log(), gateway.stderr()

    lines = [json.loads(line) for line in out.splitlines()]  # every line is one JSON object
    logs = [line for line in lines if "level" in line]
    audit = [line for line in lines if "level" not in line]
    for line in logs:
        assert set(line) <= {"time", "level", "namespace", "sid", "message", "traceback"}, line
        assert {"time", "level", "namespace", "message"} <= set(line), line
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"])
    assert any("starting up" in line["message"] for line in logs)  # twistd's own lines too
    session = [line for line in logs if line.get("sid")]
    assert session, "no session lines"
    # Two sessions at least: wait_for_banner's probe and the mail's.
    assert len({line["sid"] for line in session}) >= 2, [line["message"] for line in session]
    for line in session:
        assert re.match(rf"session {line['sid']}\b", line["message"]), line
    assert all(line["namespace"].startswith("mailgw") for line in session)
    sends = [line for line in audit if "recipients" in line]
    assert [(s["destination"], s["from"], s["recipients"], s["status"]) for s in sends] == [("office", "app@example.org", 1, 200)]
    assert f"carol-{mark}" not in json.dumps(audit)

    secrets = [
        Secret("the upstream password", auth_sink.password, user="gw-user"),
        Secret("the application's discarded password", "app-password-" + mark, user="app"),
        Secret("the send API token", send_token),
    ]
    assert_no_secrets(out, secrets, "standard output (logs and audit)")
    assert_no_secrets(err, secrets, "standard error")
    assert_no_secrets(status_page, secrets, "/status")
