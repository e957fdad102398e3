"""The warm upstream pool on in-memory transports and a Clock: hand-over, health checks,
retirement, refill back-off, one application per connection."""

from __future__ import annotations

import random

from prometheus_client import REGISTRY
from twisted.internet.defer import succeed

from mailgw.destination import parse_destination
from mailgw.oauth import AccessToken
from mailgw.pool import UpstreamPool
from mailgw.protocol.actions import MisuseError
from mailgw.protocol.session import Phase
from mailgw.session import GatewayFactory
from mailgw.settings import Route, Settings
from support.destinations import mail, plain
from support.inmemory import Transport, in_memory_gateway, open_session


def destination(**extra):
    return parse_destination(plain("warm", **{"mailgw.pool.size": "2", "mailgw.pool.maxIdle": "60", **extra}))


def make(dest=None, settings=Settings()):
    dest = dest or destination()
    clock, gateway, upstreams = in_memory_gateway(dest, settings=settings)
    route = Route("warm")
    pool = UpstreamPool(gateway, route, dest, rng=random.Random(1))
    gateway.pools[route] = pool
    pool.start()
    return clock, gateway, pool, upstreams, GatewayFactory(route, gateway)


def test_warms_up_to_size_and_hands_over_a_logged_in_session():
    clock, gateway, pool, upstreams, factory = make()
    assert len(upstreams.connections) == 2 and len(pool.warming) == 2
    for index in range(2):
        upstreams.smtp_ready(index)
    assert len(pool.ready) == 2 and not pool.warming
    session = factory.buildProtocol(None)
    assert session.machine.phase is Phase.WARM
    app = Transport()
    session.makeConnection(app)
    assert app.value().startswith(b"220 mailgw ESMTP")  # greeted at once: no upstream round trip
    assert len(upstreams.connections) == 3  # the pool started a replacement
    assert session in gateway.sessions and pool.served == 1


def test_a_pooled_connection_serves_one_application_and_is_never_reused():
    clock, gateway, pool, upstreams, factory = make(destination(**{"mailgw.pool.size": "1"}))
    upstreams.smtp_ready(0)
    first = factory.buildProtocol(None)
    first.makeConnection(Transport())
    first.dataReceived(b"MAIL FROM:<a@example.org>\r\n")
    first.connectionLost(None)
    assert upstreams.connections[0][1].disconnected  # its upstream went with it
    upstreams.smtp_ready(1)
    second = factory.buildProtocol(None)
    assert second is not first and second._upstream is upstreams.connections[1][0]


def test_without_a_ready_connection_a_session_connects_itself():
    clock, gateway, pool, upstreams, factory = make()
    session = factory.buildProtocol(None)  # none logged in yet
    assert session.machine.phase is Phase.STARTING and session.pool is None


def test_health_checks_keep_good_connections_and_replace_bad_ones():
    clock, gateway, pool, upstreams, factory = make()
    first, second = upstreams.smtp_ready(0), upstreams.smtp_ready(1)
    first.clear(), second.clear()
    clock.advance(20)  # the ping interval: maxIdle / 3
    assert first.value() == second.value() == b"NOOP\r\n"
    upstreams.connections[0][0].dataReceived(b"250 2.0.0 OK\r\n")
    upstreams.connections[1][0].dataReceived(b"421 4.3.2 going away\r\n")
    assert len(pool.ready) == 1 and second.disconnected
    assert len(upstreams.connections) == 3 and len(pool.warming) == 1  # replaced at once


def test_connections_retire_before_max_idle_and_before_their_token_expires():
    clock, gateway, pool, upstreams, factory = make()
    upstreams.smtp_ready(0), upstreams.smtp_ready(1)
    for _ in range(3):  # pings answered until maxIdle
        clock.advance(20)
        for protocol, transport in upstreams.connections[:2]:
            if transport.value().endswith(b"NOOP\r\n") and not transport.disconnected:
                transport.clear()
                protocol.dataReceived(b"250 OK\r\n")
    assert all(transport.disconnected for _, transport in upstreams.connections[:2])
    assert len(upstreams.connections) == 4  # both retired after 60 s and replaced
    # A client-credentials token bounds the time in the pool (its expiry minus a margin).
    machine = pool.warming.pop()
    machine.machine.token_found("tok", expires_in=40)
    assert machine.machine._warm_for == 10


def test_refills_back_off_while_the_upstream_fails():
    clock, gateway, pool, upstreams, factory = make(destination(**{"mailgw.pool.size": "1"}))
    upstreams.connections[0][0].connectionLost(None)  # closed before it said a word
    upstreams.down = True
    attempts = []
    for _ in range(8):
        before = len(pool.warming) + pool.failures
        delay = pool._retry.getTime() - clock.seconds()
        attempts.append(delay)
        clock.advance(delay)
        assert pool.failures >= before - 1
    # Exponential with jitter: each wait at least half the nominal 1, 2, 4 ... 60 s.
    assert attempts[0] >= 0.5 and attempts[-1] >= 30 and all(b >= a * 0.5 for a, b in zip(attempts, attempts[1:]))
    assert pool.failures == 9 and "connection refused" in pool.last_failure
    upstreams.down = False
    clock.advance(pool._retry.getTime() - clock.seconds())
    upstreams.smtp_ready(-1)
    assert len(pool.ready) == 1 and pool.failures == 0


def test_a_changed_destination_replaces_the_pooled_connections():
    clock, gateway, pool, upstreams, factory = make()
    upstreams.smtp_ready(0), upstreams.smtp_ready(1)
    pool.update(destination(**{"mailgw.pool.size": "3", "mail.smtp.port": "2525"}))
    assert all(transport.disconnected for _, transport in upstreams.connections[:2])
    assert len(pool.warming) == 3 and pool.size == 3
    pool.stop()
    assert not pool.ready and not pool.warming
    assert all(transport.disconnected for _, transport in upstreams.connections)


def test_draining_stops_the_pools():
    clock, gateway, pool, upstreams, factory = make()
    upstreams.smtp_ready(0)
    gateway.drain(10)
    assert not gateway.pools and all(transport.disconnected for _, transport in upstreams.connections)


def test_a_session_over_the_limits_is_refused_without_taking_a_warm_connection():
    clock, gateway, pool, upstreams, factory = make(
        destination(**{"mailgw.pool.size": "1"}), Settings(max_sessions_per_destination=1)
    )
    warm = upstreams.smtp_ready(0)
    open_session(gateway, Route("warm"))  # the one session the destination may have
    session = factory.buildProtocol(None)
    assert session.pool is None and session.machine.phase is Phase.STARTING
    app = Transport()
    session.makeConnection(app)
    assert app.value().startswith(b"421 ") and b"too many sessions" in app.value()
    # The logged-in connection waits for the next application; nothing was replaced.
    assert len(pool.ready) == 1 and not warm.disconnected and pool.served == 0


def test_an_internal_error_in_a_warm_connection_discards_it_and_the_pool_replaces_it(events):
    clock, gateway, pool, upstreams, factory = make(destination(**{"mailgw.pool.size": "1"}))
    warm = upstreams.smtp_ready(0)
    (session,) = pool.ready

    def misused(*args):
        raise MisuseError("a machine called in a state that does not allow it")

    session.machine.upstream_data = misused
    upstreams.connections[0][0].dataReceived(b"250 OK\r\n")
    assert warm.disconnected and not pool.ready
    clock.advance(pool._retry.getTime() - clock.seconds())  # (it failed right after its login)
    assert len(upstreams.connections) == 2 and len(pool.warming) == 1  # replaced


def test_a_warm_connection_that_speaks_unasked_is_discarded_not_handed_over():
    clock, gateway, pool, upstreams, factory = make(destination(**{"mailgw.pool.size": "1"}))
    warm = upstreams.smtp_ready(0)
    upstreams.connections[0][0].dataReceived(b"421 4.4.2 autologout\r\n")  # no health check ran
    assert warm.disconnected and not pool.ready
    assert factory.buildProtocol(None).pool is None  # a session of its own, not that one
    # Bytes that come with the health check's answer are as unwelcome.
    clock.advance(pool._retry.getTime() - clock.seconds())
    upstreams.smtp_ready(1)
    clock.advance(20)
    upstreams.connections[1][0].dataReceived(b"250 2.0.0 OK\r\n* BYE\r\n")
    assert upstreams.connections[1][1].disconnected and not pool.ready


def test_a_health_check_without_an_answer_discards_the_connection():
    clock, gateway, pool, upstreams, factory = make(destination(**{"mailgw.pool.size": "1"}))
    warm = upstreams.smtp_ready(0)
    warm.clear()
    clock.advance(20)
    assert warm.value() == b"NOOP\r\n"
    clock.advance(gateway.settings.login_timeout)  # a silent server
    assert warm.disconnected and not pool.ready and len(upstreams.connections) == 2


def test_a_refresh_token_destination_that_needs_no_login_gets_its_pool():
    # mail.smtp.auth "false": nothing for the application to present, an eager session.
    unauthenticated = parse_destination(mail(
        "warm", "smtp", 25, host="127.0.0.1", authentication="OAuth2RefreshToken", password=None,
        tokenServiceURL="https://token.example.org/t", clientId="gw", clientSecret="cs-0123456789",
        **{"mail.smtp.auth": "false", "mail.smtp.starttls.enable": "false", "mailgw.pool.size": "1"},
    ))
    clock, gateway, upstreams = in_memory_gateway(unauthenticated)
    gateway.update_pools([Route("warm")])
    assert Route("warm") in gateway.pools and len(upstreams.connections) == 1


def test_the_pool_gauge_counts_each_tenant_listener_on_its_own():
    dest = destination(**{"mailgw.pool.size": "1"})
    clock, gateway, upstreams = in_memory_gateway(dest)
    pools = [UpstreamPool(gateway, Route("warm", tenant), dest) for tenant in ("acme", "globex")]
    for pool in pools:
        pool.start()
    upstreams.smtp_ready(0)  # acme's logs in, globex's is still connecting

    def gauge(route, state):
        return REGISTRY.get_sample_value("mailgw_pool_connections", {"destination": route, "state": state})

    assert (gauge("warm/acme", "ready"), gauge("warm/acme", "connecting")) == (1, 0)
    assert (gauge("warm/globex", "ready"), gauge("warm/globex", "connecting")) == (0, 1)
    for pool in pools:
        pool.stop()


class ShortLivedTokens:
    """Client-credentials tokens that expire ``lifetime`` seconds after they are asked for."""

    def __init__(self, clock, lifetime):
        self.clock, self.lifetime = clock, lifetime

    def for_client_credentials(self, destination, tenant=None):
        return succeed(AccessToken("at-0123456789", expires_at=self.clock.seconds() + self.lifetime))


def test_a_token_too_short_lived_to_wait_in_the_pool_is_not_pooled_and_refills_back_off():
    dest = parse_destination(mail(
        "warm", "smtp", 25, host="127.0.0.1", authentication="OAuth2ClientCredentials", password=None,
        tokenServiceURL="https://token.example.org/t", clientId="gw", clientSecret="cs-0123456789",
        **{"mail.smtp.starttls.enable": "false", "mailgw.pool.size": "1"},
    ))
    clock, gateway, upstreams = in_memory_gateway(dest)
    gateway.tokens = ShortLivedTokens(clock, 45)  # 15 s in the pool once the margin is taken
    pool = UpstreamPool(gateway, Route("warm"), dest, rng=random.Random(1))
    pool.start()
    assert upstreams.connections == [] and pool.failures == 1  # no login for a connection retired at once
    assert "too soon" in pool.last_failure and pool._retry.getTime() - clock.seconds() >= 0.5
    gateway.tokens = ShortLivedTokens(clock, 3600)
    clock.advance(pool._retry.getTime() - clock.seconds())
    for line in (b"220 hi\r\n", b"250-x\r\n250 AUTH XOAUTH2\r\n", b"235 2.7.0 ok\r\n"):
        upstreams.protocol.dataReceived(line)
    assert len(pool.ready) == 1 and pool.failures == 0


def test_a_server_that_ends_every_session_right_after_the_login_is_refilled_with_back_off():
    clock, gateway, pool, upstreams, factory = make(destination(**{"mailgw.pool.size": "1"}))
    delays = []
    for attempt in range(5):
        upstreams.smtp_ready(-1)
        upstreams.protocol.dataReceived(b"421 4.3.2 bye\r\n")
        assert len(upstreams.connections) == attempt + 1  # no new login at once
        delays.append(pool._retry.getTime() - clock.seconds())
        clock.advance(delays[-1])
    assert delays[0] >= 0.5 and delays[-1] >= 8 and pool.short_lived == 5
    # One that serves an application ends the streak.
    upstreams.smtp_ready(-1)
    factory.buildProtocol(None).makeConnection(Transport())
    assert pool.short_lived == 0
