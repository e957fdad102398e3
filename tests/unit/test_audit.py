"""The audit log (SPEC 9.3): record types that admit only the SPEC's fields, and a writer
that never makes the reactor wait -- on a fake reactor, a stuck stream and a failing
one; no wall clock."""

from __future__ import annotations

import io
import json
import threading
from types import SimpleNamespace

import pytest
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.web.http_headers import Headers

from mailgw import metrics
from mailgw.audit import AuditLog, AuditOpenError, SendAudit, SessionAudit, from_config
from mailgw.send.http import body_size, send_audit_for
from mailgw.config import ConfigError, parse_config
from mailgw.service import make_service

SESSION_FIELDS = [
    "time", "sid", "destination", "tenant", "client", "upstream", "authentication", "outcome", "reason",
    "released", "bytes_to_upstream", "bytes_to_app", "seconds", "tls",
]
SEND_FIELDS = ["time", "destination", "from", "recipients", "bytes", "status"]


class ThreadClock(Clock):
    """A Clock whose ``callFromThread`` queues calls for :meth:`pump` (the test thread
    plays the reactor thread)."""

    def __init__(self):
        super().__init__()
        self.rightNow = 1_700_000_000.0
        self._calls: list = []
        self._lock = threading.Condition()

    def callFromThread(self, f, *args, **kwargs):
        with self._lock:
            self._calls.append((f, args, kwargs))
            self._lock.notify_all()

    def pump(self, until=lambda: True, timeout: float = 10.0) -> None:
        """Run queued calls until ``until()`` holds (the writer thread reports back)."""
        while True:
            with self._lock:
                if not self._calls and not until():
                    if not self._lock.wait(timeout):
                        raise AssertionError("the writer thread did not report back")
                calls, self._calls = self._calls, []
            for f, args, kwargs in calls:
                f(*args, **kwargs)
            if until() and not calls:
                return


def session(**changes) -> SessionAudit:
    values = dict(
        time=1_700_000_000.25, sid="s1", destination="office", tenant=None, client="127.0.0.1:50000",
        upstream="smtp.example.org:465", authentication="BasicAuthentication", outcome="relayed", reason=None,
        released=True, bytes_to_upstream=120, bytes_to_app=340, seconds=1.5, tls="TLSv1.3",
    )
    values.update(changes)
    return SessionAudit(**values)


def send(**changes) -> SendAudit:
    values = dict(time=1_700_000_000.0, destination="office", from_="app@example.org", recipients=2, bytes=10, status=200)
    values.update(changes)
    return SendAudit(**values)


# -- the records ------------------------------------------------------------------------


def test_session_record_has_exactly_the_spec_fields():
    record = session().to_json()
    assert list(record) == SESSION_FIELDS
    assert record["time"] == "2023-11-14T22:13:20.250Z"
    assert record["released"] is True and record["tls"] == "TLSv1.3" and record["reason"] is None


def test_send_record_has_exactly_the_spec_fields():
    record = send().to_json()
    assert list(record) == SEND_FIELDS
    assert record["from"] == "app@example.org" and record["recipients"] == 2


@pytest.mark.parametrize(
    "changes",
    [
        {"outcome": "refused"},  # a refusal needs its reason
        {"outcome": "relayed", "reason": "auth"},  # reasons are for refusals
        {"outcome": "refused", "reason": "password was hunter2"},  # only the SPEC's classes
        {"outcome": "stolen"},
        {"bytes_to_app": -1},
        {"bytes_to_app": True},
        {"released": "yes"},
        {"seconds": "1.5"},
        {"client": ("127.0.0.1", 5)},
    ],
)
def test_session_record_refuses_what_the_spec_does_not_allow(changes):
    with pytest.raises((TypeError, ValueError)):
        session(**changes)


def test_reasons_and_outcomes_are_the_spec_labels():
    # Derived from the Reason and Outcome enums: the SPEC 9.2 contract pins them.
    assert metrics.REFUSAL_REASONS == (
        "connect", "dns", "tls", "certificate", "auth", "timeout", "limit", "token", "proxy", "protocol", "shutdown",
        "internal",
    )
    assert metrics.OUTCOMES == ("relayed", "refused", "closed")


@pytest.mark.parametrize("reason", metrics.REFUSAL_REASONS)
def test_every_refusal_reason_is_accepted(reason):
    assert session(outcome="refused", reason=reason, released=False).to_json()["reason"] == reason


@pytest.mark.parametrize(
    "changes",
    [
        {"recipients": ["bob@example.org"]},  # a count, never the addresses
        {"recipients": -1},
        {"bytes": b"message content"},
        {"status": "200 OK"},
        {"status": 42},
    ],
)
def test_send_record_refuses_what_the_spec_does_not_allow(changes):
    with pytest.raises(TypeError):
        send(**changes)


def test_long_text_is_cut():
    assert len(session(destination="d" * 5000).destination) == 255


def request(path, headers=(), body=b"", code=200):
    h = Headers()
    for name, value in headers:
        h.addRawHeader(name, value)
    return SimpleNamespace(postpath=path, requestHeaders=h, content=io.BytesIO(body), code=code)


def test_send_audit_for_a_request_counts_recipients_and_keeps_only_a_bare_from():
    req = request(
        [b"office", b"bob@example.org"],
        [(b"From", b"app@example.org"), (b"To", b"carol@example.org"), (b"Cc", b"Bob@example.org"),
         (b"Bcc", b"dave@example.org")],
        b"hello",
    )
    record = send_audit_for(req.postpath, req.requestHeaders, 200, 1_700_000_000.0, body_size(req))
    assert record.to_json() == {
        "time": "2023-11-14T22:13:20.000Z", "destination": "office", "from": "app@example.org",
        "recipients": 3, "bytes": 5, "status": 200,
    }
    text = json.dumps(record.to_json())
    for address in ("bob@", "carol@", "dave@"):
        assert address not in text.lower()


def test_send_audit_for_a_request_without_a_usable_from_or_an_answer():
    req = request([b"office"], [(b"From", b"Alice <alice@example.org>"), (b"To", b"bob@example.org")], code=200)
    record = send_audit_for(req.postpath, req.requestHeaders, 499, 0.0, body_size(req))
    assert record.from_ is None and record.status == 499 and record.recipients == 1
    assert "alice" not in json.dumps(record.to_json())


# -- the writer -------------------------------------------------------------------------


def lines_of(text: str) -> list[dict]:
    assert text.endswith("\n") or text == ""
    return [json.loads(line) for line in text.splitlines()]


def stop(audit: AuditLog, clock: ThreadClock) -> None:
    stopped = []
    audit.stopService().addBoth(stopped.append)
    clock.pump(lambda: bool(stopped))
    assert stopped == [None]


def test_writes_one_json_line_per_record_to_a_file(tmp_path):
    path = tmp_path / "audit.jsonl"
    path.write_text('{"earlier": true}\n')  # appended to, never truncated
    clock = ThreadClock()
    audit = AuditLog(str(path), reactor=clock)
    audit.write(session())  # before start: waits in the queue
    audit.startService()
    audit.write(send())
    audit.write(session(sid="s2", outcome="refused", reason="limit", released=False, tls=None))
    stop(audit, clock)
    records = lines_of(path.read_text())
    assert records[0] == {"earlier": True}
    assert [list(r) for r in records[1:]] == [SESSION_FIELDS, SEND_FIELDS, SESSION_FIELDS]
    assert records[3]["reason"] == "limit" and records[3]["tls"] is None
    assert audit.written == 3 and audit.dropped == 0 and audit.queued == 0


def test_reopen_after_logrotate_moved_the_file(tmp_path):
    path = tmp_path / "audit.jsonl"
    clock = ThreadClock()
    audit = AuditLog(str(path), reactor=clock)
    audit.startService()
    audit.write(session(sid="before"))
    clock.pump(lambda: audit.written == 1)
    path.rename(tmp_path / "audit.jsonl.1")  # what logrotate does, then it sends SIGHUP
    audit.reopen()
    audit.write(session(sid="after"))
    stop(audit, clock)
    assert [r["sid"] for r in lines_of((tmp_path / "audit.jsonl.1").read_text())] == ["before"]
    assert [r["sid"] for r in lines_of(path.read_text())] == ["after"]


def test_standard_output_mode_writes_to_the_stdout_of_its_making(capsys):
    clock = ThreadClock()
    audit = AuditLog("-", reactor=clock)
    audit.startService()
    audit.write(send(status=502))
    stop(audit, clock)
    (record,) = lines_of(capsys.readouterr().out)
    assert record["status"] == 502


def test_only_the_two_record_types_are_accepted():
    audit = AuditLog("-", stream=io.StringIO(), reactor=ThreadClock())
    with pytest.raises(TypeError):
        audit.write({"time": 0, "password": "hunter2"})


class StuckStream(io.StringIO):
    """A disk that hangs in write() until released."""

    def __init__(self):
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def write(self, text):
        self.entered.set()
        assert self.release.wait(30), "never released"
        return super().write(text)


def test_a_stuck_disk_never_blocks_writes_and_a_full_queue_drops_and_counts():
    clock = ThreadClock()
    stream = StuckStream()
    audit = AuditLog("stuck.jsonl", stream=stream, reactor=clock, max_queue=3)
    warnings = []
    globalLogPublisher.addObserver(warnings.append)
    dropped_before = metrics.AUDIT_DROPPED._value.get()
    try:
        audit.startService()
        assert audit.write(session(sid="s1"))
        assert stream.entered.wait(10)  # the writer holds s1 and hangs in write()
        # The reactor's side goes on while the writer hangs: three fit, then drops.
        assert [audit.write(session(sid=f"s{i}")) for i in range(2, 7)] == [True, True, True, False, False]
        assert audit.dropped == 2 and audit.queued == 3
        assert audit.status()["dropped"] == 2
        stream.release.set()
        stop(audit, clock)
    finally:
        stream.release.set()
        globalLogPublisher.removeObserver(warnings.append)
    assert [r["sid"] for r in lines_of(stream.getvalue())] == ["s1", "s2", "s3", "s4"]
    assert audit.written == 4
    assert metrics.AUDIT_DROPPED._value.get() - dropped_before == 2
    drops = [e for e in warnings if e.get("log_namespace") == "mailgw.audit" and "dropped" in e.get("log_format", "")]
    assert len(drops) == 1  # rate-limited: one warning, not one per record


class BrokenStream(io.StringIO):
    def write(self, text):
        raise OSError(28, "No space left on device")


def test_a_failing_disk_is_logged_once_and_counted():
    clock = ThreadClock()
    audit = AuditLog("full.jsonl", stream=BrokenStream(), reactor=clock)
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        audit.startService()
        audit.write(session(sid="s1"))
        clock.pump(lambda: audit.dropped == 1)
        audit.write(session(sid="s2"))
        clock.pump(lambda: audit.dropped == 2)
        assert audit.status()["failing"] is True
        stop(audit, clock)
    finally:
        globalLogPublisher.removeObserver(events.append)
    errors = [e for e in events if e.get("log_namespace") == "mailgw.audit" and "write failed" in e.get("log_format", "")]
    assert len(errors) == 1 and errors[0]["cause"] == "No space left on device"


def test_stop_does_not_wait_forever_for_a_stuck_disk():
    clock = ThreadClock()
    stream = StuckStream()
    audit = AuditLog("stuck.jsonl", stream=stream, reactor=clock)
    audit.startService()
    audit.write(session())
    assert stream.entered.wait(10)
    stopped = []
    audit.stopService().addBoth(stopped.append)
    clock.advance(60)  # the grace period passes (on the fake clock)
    assert stopped == [None]
    stream.release.set()


def test_from_config_none_without_audit_and_a_clear_error_for_a_bad_path(tmp_path):
    assert from_config(parse_config({}, "gw.yaml", tmp_path)) is None
    config = parse_config({"audit": {"path": "no/such/dir/audit.jsonl"}}, "gw.yaml", tmp_path)
    with pytest.raises(AuditOpenError, match=r"audit: cannot open .*no/such/dir/audit.jsonl: No such file"):
        from_config(config, Clock())
    with pytest.raises(ConfigError, match=r"^gw.yaml: audit: cannot open"):
        make_service(config, Clock())


def test_make_service_puts_the_audit_log_where_sessions_reach_it(tmp_path):
    config = parse_config({"audit": {"path": "audit.jsonl"}}, "gw.yaml", tmp_path)
    top = make_service(config, Clock())
    assert isinstance(top.gateway.audit, AuditLog)
    assert top.gateway.audit.parent is top and top.gateway.audit.path == str(tmp_path / "audit.jsonl")
    assert make_service(parse_config({}, "gw.yaml", tmp_path), Clock()).gateway.audit is None
