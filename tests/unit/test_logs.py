"""JSON logs (SPEC 9.4): the record of one event, the observer's lines, and how the
twistd plugin's service hands the observer to twistd's application."""

from __future__ import annotations

import io
import json

from twisted.application import service
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, Logger, LogPublisher, globalLogPublisher
from twisted.python import log as legacy_log
from twisted.python.logfile import LogFile

from mailgw.config import parse_config
from mailgw.logs import JsonLogObserver, event_record, isoformat, offer_observer, twistd_observer
from mailgw.process import GatewayProcess
from mailgw.service import make_service


def emit(*calls):
    """Run ``calls(log)`` against a private publisher; the JSON lines they produce."""
    out = io.StringIO()
    publisher = LogPublisher(JsonLogObserver(out))
    log = Logger(namespace="mailgw.session", observer=publisher)
    for call in calls:
        call(log)
    text = out.getvalue()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def test_isoformat_is_utc_with_milliseconds():
    assert isoformat(0) == "1970-01-01T00:00:00.000Z"
    assert isoformat(1_700_000_000.1234) == "2023-11-14T22:13:20.123Z"


def test_a_session_event_has_the_spec_fields_and_its_sid():
    (line,) = emit(lambda log: log.info("session {sid} accepted from {peer}", sid="s7", peer="127.0.0.1:5000"))
    assert list(line) == ["time", "level", "namespace", "sid", "message"]
    assert line["level"] == "info" and line["namespace"] == "mailgw.session" and line["sid"] == "s7"
    assert line["message"] == "session s7 accepted from 127.0.0.1:5000"


def test_an_event_without_a_sid_has_none_and_fields_stay_out():
    (line,) = emit(lambda log: log.warn("refused: {text}", text="x", password="never-written"))
    assert "sid" not in line and line["level"] == "warn"
    assert "never-written" not in json.dumps(line)  # only formatted fields are written


def test_a_failure_is_one_line_with_the_traceback_as_a_field():
    def fail(log):
        try:
            raise RuntimeError("boom\nsecond line")
        except RuntimeError:
            log.failure("session {sid}: internal error", sid="s9")

    (line,) = emit(fail)
    assert line["level"] == "critical" and line["sid"] == "s9"
    assert line["message"] == "session s9: internal error"
    assert "RuntimeError: boom" in line["traceback"] and "Traceback" in line["traceback"]


def test_multi_line_and_unformattable_messages_stay_one_line_each():
    lines = emit(
        lambda log: log.info("first\nsecond"),
        lambda log: log.info("{missing}"),  # twisted.logger describes the bad format
        lambda log: log.info("{obj}", obj=object()),
    )
    assert len(lines) == 3 and lines[0]["message"] == "first\nsecond"


def test_legacy_events_are_formatted():
    out = io.StringIO()
    observer = JsonLogObserver(out)
    globalLogPublisher.addObserver(observer)
    try:
        legacy_log.msg("Site starting on %d" % 9494)  # Twisted's own older code logs so
    finally:
        globalLogPublisher.removeObserver(observer)
    line = json.loads(out.getvalue())
    assert line["message"] == "Site starting on 9494" and line["level"] == "info"


def test_event_record_tolerates_a_bare_event():
    assert event_record({})["message"] == ""


def test_twistd_observer_follows_twistds_own_choice_of_file(tmp_path):
    assert twistd_observer("text", {"nodaemon": True}) is None
    assert twistd_observer("json", {"nodaemon": True, "logger": "my.factory"}) is None
    assert twistd_observer("json", {"nodaemon": True, "syslog": True}) is None
    assert twistd_observer("json", {"nodaemon": False, "logfile": "-"}) is None  # twistd refuses that itself
    assert isinstance(twistd_observer("json", {"nodaemon": True}), JsonLogObserver)
    observer = twistd_observer("json", {"nodaemon": True, "logfile": str(tmp_path / "gw.log")})
    assert isinstance(observer._out, LogFile)
    observer({"log_format": "hello", "log_level": None, "log_time": 0.0})
    observer._out.close()
    assert json.loads((tmp_path / "gw.log").read_text())["message"] == "hello"


def test_the_gateway_process_offers_its_observer_to_twistds_application(tmp_path):
    observer = JsonLogObserver(io.StringIO())
    top = make_service(parse_config({"logging": {"format": "json"}}, "gw.yaml", tmp_path), Clock())
    assert top.logging.format == "json"  # what the twistd plugin reads to make the observer
    process = GatewayProcess(top, Clock(), on_hangup=lambda: None)
    process.log_observer = observer
    application = service.Application("mailgw")  # what twistd makes after makeService
    process.setServiceParent(application)
    assert application.getComponent(ILogObserver) is observer  # what twistd's AppLogger reads
    assert list(service.IServiceCollection(application)) == [process]


def test_text_format_leaves_twistds_observer_alone(tmp_path):
    top = make_service(parse_config({}, "gw.yaml", tmp_path), Clock())
    application = service.Application("mailgw")
    top.setServiceParent(application)
    assert application.getComponent(ILogObserver, None) is None


def test_an_observer_already_set_wins():
    application = service.Application("mailgw")
    first, second = JsonLogObserver(io.StringIO()), JsonLogObserver(io.StringIO())
    application.setComponent(ILogObserver, first)
    offer_observer(application, second)
    assert application.getComponent(ILogObserver) is first
