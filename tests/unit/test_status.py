"""/status and /readyz: the board sessions report into, the page's shape, readiness
reasons.  A Clock and in-memory requests; no sockets."""

from __future__ import annotations

import json

from twisted.internet.task import Clock
from twisted.web.test.requesthelper import DummyRequest

from mailgw import __version__
from mailgw.service import Gateway, StaticSource
from mailgw.settings import Route, Settings
from mailgw.status import ListenerInfo, StatusBoard, StatusResource
from mailgw.web import _Ready

T0 = 1_700_000_000.0


def clock_at(seconds=T0) -> Clock:
    clock = Clock()
    clock.advance(seconds)
    return clock


def test_board_keeps_last_success_failure_and_token_expiry():
    clock = clock_at()
    board = StatusBoard(clock)
    board.destination_succeeded("office")
    clock.advance(10)
    board.destination_failed("office", "destination office: login refused", kind="auth")
    board.token_expires("office", T0 + 3600)
    assert board.destinations() == {
        "office": {
            "last_success": {"time": "2023-11-14T22:13:20.000Z"},
            "last_failure": {"time": "2023-11-14T22:13:30.000Z", "reason": "destination office: login refused", "kind": "auth"},
            "token_expires": "2023-11-14T23:13:20.000Z",
            "token_expires_in": 3590.0,
        }
    }
    board.destination_succeeded("office", when=T0 + 20)  # an explicit time wins
    assert board.destinations()["office"]["last_success"]["time"] == "2023-11-14T22:13:40.000Z"


def test_board_is_bounded_and_reasons_are_cut():
    board = StatusBoard(clock_at(), max_destinations=3)
    for i in range(5):
        board.destination_failed(f"d{i}", "x" * 1000)
    assert list(board.destinations()) == ["d2", "d3", "d4"]
    assert len(board.destinations()["d4"]["last_failure"]["reason"]) == 300
    board.forget("d3")
    assert list(board.destinations()) == ["d2", "d4"]


class FakeSession:
    def __init__(self, route):
        self.route = route


def gateway_with_sessions(*routes) -> Gateway:
    gateway = Gateway(clock_at(), Settings(), StaticSource({}))
    gateway.sessions = {FakeSession(route) for route in routes}
    return gateway


def render(resource_, path=b"status"):
    request = DummyRequest([path])
    result = resource_.render(request)
    if isinstance(result, bytes):
        request.write(result)
        request.finish()
    assert request.finished
    return request, b"".join(request.written)


def test_status_page_shape():
    gateway = gateway_with_sessions(Route("office"), Route("office"), Route("office", "acme"), Route("gone"))
    gateway.status.destination_failed("office", "destination office: connection refused", kind="connect")
    listeners = [ListenerInfo("office", None, "127.0.0.1:2465"), ListenerInfo("office", "acme", "127.0.0.1:2466")]
    page = StatusResource(gateway, lambda: listeners, {"pool": lambda: {"office": {"ready": 2, "connecting": 0}}})
    request, body = render(page)
    assert request.responseHeaders.getRawHeaders(b"content-type") == [b"application/json"]
    status = json.loads(body)
    assert status["version"] == __version__ and status["ready"] is True and status["not_ready"] == []
    assert status["listeners"] == [
        {"route": "office", "destination": "office", "tenant": None, "address": "127.0.0.1:2465", "sessions": 2},
        {"route": "office/acme", "destination": "office", "tenant": "acme", "address": "127.0.0.1:2466", "sessions": 1},
    ]
    assert status["destinations"]["office"]["sessions"] == 3
    assert status["destinations"]["office"]["last_failure"]["kind"] == "connect"
    assert status["destinations"]["gone"] == {"last_success": None, "last_failure": None, "sessions": 1}
    assert status["pool"] == {"office": {"ready": 2, "connecting": 0}}
    assert "audit" not in status and "controller" not in status


def test_a_provider_added_later_shows_and_a_broken_one_does_not_break_the_page():
    gateway = gateway_with_sessions()
    providers = {}
    page = StatusResource(gateway, providers=providers)
    providers["controller"] = lambda: {"leader": True, "synced": True, "queue_depth": 0}

    def broken():
        raise KeyError("hunter2")  # the message must not reach the page

    providers["pool"] = broken
    status = json.loads(render(page)[1])
    assert status["controller"]["leader"] is True
    assert status["pool"] == {"error": "KeyError"} and "hunter2" not in json.dumps(status)


def test_readiness_names_every_failing_check():
    gateway = gateway_with_sessions()
    ready = _Ready(gateway)
    request, body = render(ready, b"readyz")
    assert body == b"ready\n" and request.responseCode in (None, 200)

    synced = []
    gateway.add_readiness_check("controller not synced", lambda: bool(synced))
    gateway.readiness_checks.append(lambda: False)  # a bare callable: "starting"
    gateway.draining = True
    request, body = render(ready, b"readyz")
    assert request.responseCode == 503
    assert body == b"not ready: draining, controller not synced, starting\n"
    assert gateway.not_ready() == ["draining", "controller not synced", "starting"] and not gateway.ready
    gateway.draining, gateway.readiness_checks[1:] = False, []
    synced.append(True)
    assert gateway.ready and render(ready, b"readyz")[1] == b"ready\n"
