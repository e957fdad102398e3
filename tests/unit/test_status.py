"""/status and /readyz: the board sessions report into, the page's shape, readiness
reasons.  A Clock and in-memory requests; no sockets."""

from __future__ import annotations

from twisted.internet.task import Clock

from mailgw.status import StatusBoard

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
