"""Where the send API's SMTP conversations run (issue 15): in the pool the caller gives
(the gateway's ``mailgw-send`` BlockingPool, part of its service tree), else in the
reactor's thread pool -- no module-level pool of its own."""

from __future__ import annotations

from twisted.internet.defer import succeed
from twisted.internet.testing import MemoryReactor

from mailgw.blocking import BlockingPool
from mailgw.config import parse_config
from mailgw.send import EmailConnection, SendConfig
from mailgw.send import connection as send_connection
from mailgw.service import make_service


def test_send_deferred_runs_in_the_given_pool():
    calls = []

    def pool(function, *args):
        calls.append((function, args))
        return succeed("250 queued")

    email = EmailConnection("you@example.org", SendConfig(hostname="mail.example.org"))
    email.set_content("hello")
    results = []
    email.send_deferred(pool=pool).addCallback(results.append)
    assert results == ["250 queued"]
    [(function, (request, config))] = calls
    assert function is send_connection.send_message and request.primary_recipient == "you@example.org"
    assert not hasattr(send_connection, "_thread_pool") and not hasattr(send_connection, "_pool")


def test_the_gateway_owns_a_send_pool_only_with_a_send_api():
    def pools(doc):
        service = make_service(parse_config(doc, "gateway.yaml"), MemoryReactor())
        return [child.name for child in service if isinstance(child, BlockingPool)]

    assert pools({"http": {"listen": "tcp:9494:interface=127.0.0.1"}}) == []
    assert pools({"http": {"listen": "tcp:9494:interface=127.0.0.1", "send": {}}}) == ["mailgw-send"]
