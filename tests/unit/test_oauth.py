"""OAuth2 grants, errors, cache and single flight: real HTTP against tests/tokenservice.py.

The real reactor runs in a background thread (the ``reactor`` fixture); test code drives
it with ``support.reactor.in_reactor``.  ``make_client`` and ``events``: tests/unit/conftest.py.
"""

from __future__ import annotations

import logging
import socket
import time

import pytest
import requests
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import formatEvent

from tokenservice import TokenService
from mailgw import oauth
from mailgw.destination import (
    OAUTH2_AUTHORIZATION_CODE,
    OAUTH2_CLIENT_CREDENTIALS,
    OAUTH2_REFRESH_TOKEN,
    Destination,
)
from mailgw.oauth import AUTHORIZATION_CODE, REFRESH_TOKEN, AccessToken, TokenCache, TokenError, TokenProvider
from support.reactor import in_reactor, wait_for

CLIENT_ID = "mail-gateway"
CLIENT_SECRET = "cs-Sup3rSecret-client-7f3a"
REFRESH = "rt-alice-Secret-19c2"
CODE = "code-alice-Secret-55d1"


@pytest.fixture
def svc():
    with TokenService(clients={CLIENT_ID: CLIENT_SECRET}) as service:
        service.add_refresh_token(REFRESH, "alice@example.org")
        service.add_code(CODE, "alice@example.org")
        yield service


@pytest.fixture
def client(make_client):
    return make_client(deadline=2.0)


def destination(svc, authentication=OAUTH2_CLIENT_CREDENTIALS, **changes):
    values = dict(
        name="office",
        protocol="smtps",
        host="smtp.example.org",
        port=465,
        authentication=authentication,
        user="app@example.org",
        token_service_url=svc.token_url,
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
    )
    values.update(changes)
    return Destination(**values)


def expect_error(f, *args, **kwargs) -> TokenError:
    with pytest.raises(TokenError) as info:
        in_reactor(f, *args, **kwargs)
    error = info.value
    for secret in (CLIENT_SECRET, REFRESH, CODE):
        assert secret not in str(error) and secret not in repr(error)
    assert error.__context__ is None and error.__cause__ is None
    return error


# --- grants ------------------------------------------------------------------------------


@pytest.mark.parametrize("client_auth", ["basic", "body"])
def test_client_credentials(reactor, svc, client, client_auth):
    token = in_reactor(client.client_credentials, svc.token_url, CLIENT_ID, CLIENT_SECRET, client_auth=client_auth)
    assert isinstance(token, AccessToken)
    assert svc.username_for(token.access_token) == CLIENT_ID
    assert token.token_type == "Bearer"
    assert token.expires_in == 3600
    assert abs(token.expires_at - (time.time() + 3600)) < 5
    assert token.refresh_token is None
    [record] = svc.requests
    assert (record.grant_type, record.client_id, record.auth_method) == ("client_credentials", CLIENT_ID, client_auth)
    assert ("client_secret" in record.form) == (client_auth == "body")


def test_client_credentials_scope(reactor, svc, client):
    token = in_reactor(client.client_credentials, svc.token_url, CLIENT_ID, CLIENT_SECRET, scope="mail.send mail.read")
    assert svc.requests[0].form["scope"] == "mail.send mail.read"
    assert token.scope == "mail.send mail.read"


@pytest.mark.parametrize("client_auth", ["basic", "body"])
def test_refresh_token_grant(reactor, svc, client, client_auth):
    token = in_reactor(client.exchange, REFRESH_TOKEN, svc.token_url, CLIENT_ID, CLIENT_SECRET, REFRESH, client_auth=client_auth)
    assert svc.username_for(token.access_token) == "alice@example.org"
    [record] = svc.requests
    assert record.grant_type == "refresh_token"
    assert record.auth_method == client_auth
    assert record.form["refresh_token"] == REFRESH


def test_authorization_code_grant_single_use(reactor, svc, client):
    svc.add_code("code-2", "bob", redirect_uri="https://app.example/cb")
    token = in_reactor(client.exchange, AUTHORIZATION_CODE, svc.token_url, CLIENT_ID, CLIENT_SECRET, CODE)
    assert svc.username_for(token.access_token) == "alice@example.org"
    assert token.refresh_token  # the service returns one with this grant
    assert expect_error(client.exchange, AUTHORIZATION_CODE, svc.token_url, CLIENT_ID, CLIENT_SECRET, CODE).error_code == "invalid_grant"
    token = in_reactor(
        client.exchange, AUTHORIZATION_CODE, svc.token_url, CLIENT_ID, CLIENT_SECRET, "code-2", redirect_uri="https://app.example/cb"
    )
    assert svc.username_for(token.access_token) == "bob"
    assert svc.requests[-1].form["redirect_uri"] == "https://app.example/cb"


def test_introspection(svc, reactor, client):
    token = in_reactor(client.exchange, REFRESH_TOKEN, svc.token_url, CLIENT_ID, CLIENT_SECRET, REFRESH)
    answer = requests.post(svc.introspection_url, data={"token": token.access_token}, timeout=5).json()
    assert answer["active"] is True and answer["username"] == "alice@example.org"
    assert requests.post(svc.introspection_url, data={"token": "nope"}, timeout=5).json() == {"active": False}
    svc.revoke_access_token(token.access_token)
    assert requests.post(svc.introspection_url, data={"token": token.access_token}, timeout=5).json() == {"active": False}


def test_no_expires_in_gets_default_lifetime(reactor, svc, client):
    svc.expires_in = None
    token = in_reactor(client.client_credentials, svc.token_url, CLIENT_ID, CLIENT_SECRET)
    assert token.expires_in == oauth.DEFAULT_LIFETIME
    assert abs(token.expires_at - (time.time() + oauth.DEFAULT_LIFETIME)) < 5


# --- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize("client_auth", ["basic", "body"])
def test_wrong_client_secret(reactor, svc, client, client_auth):
    error = expect_error(client.client_credentials, svc.token_url, CLIENT_ID, "wrong-secret", client_auth=client_auth)
    assert error.error_code == "invalid_client"
    assert error.status == 401
    assert f"127.0.0.1:{svc.port}" in str(error)
    assert "wrong-secret" not in str(error)


def test_revoked_refresh_token(reactor, svc, client):
    svc.revoke(REFRESH)
    error = expect_error(client.exchange, REFRESH_TOKEN, svc.token_url, CLIENT_ID, CLIENT_SECRET, REFRESH)
    assert error.error_code == "invalid_grant"
    assert "invalid_grant" in str(error)


def test_refuse_all(reactor, svc, client):
    svc.refuse_all = True
    assert expect_error(client.client_credentials, svc.token_url, CLIENT_ID, CLIENT_SECRET).error_code == "invalid_grant"


def test_service_down(reactor, client):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    error = expect_error(client.client_credentials, f"http://127.0.0.1:{port}/oauth/token", CLIENT_ID, CLIENT_SECRET)
    assert error.error_code == "unreachable"
    assert f"127.0.0.1:{port}" in str(error)


def test_slow_service_times_out(reactor, svc, make_client):
    client = make_client(deadline=0.3)
    svc.delay = 2
    started = time.monotonic()
    error = expect_error(client.client_credentials, svc.token_url, CLIENT_ID, CLIENT_SECRET)
    assert error.error_code == "timeout"
    assert time.monotonic() - started < 1.5
    svc.stop()  # wakes the delayed handler so the pool thread ends at once


def test_overall_deadline(reactor, svc, make_client):
    client = make_client(deadline=0.3)
    svc.delay = 5
    started = time.monotonic()
    error = expect_error(client.client_credentials, svc.token_url, CLIENT_ID, CLIENT_SECRET)
    assert error.error_code == "timeout"
    assert time.monotonic() - started < 1.5
    svc.stop()


@pytest.mark.parametrize(
    "setup, code",
    [
        (lambda s: setattr(s, "fail_status", 500), "http_error"),
        (lambda s: setattr(s, "fail_status", 404), "http_error"),
        (lambda s: setattr(s, "garbage", b"<html><body>login here</body></html>"), "malformed_response"),
        (lambda s: setattr(s, "garbage", b'{"access_token": "x", '), "malformed_response"),
        (lambda s: setattr(s, "garbage", b'["access_token"]'), "malformed_response"),
        (lambda s: setattr(s, "garbage", b'{"access_token": "x", "expires_in": "soon"}'), "malformed_response"),
        (lambda s: setattr(s, "garbage", b'{"access_token": 42}'), "malformed_response"),
        (lambda s: setattr(s, "garbage", b"[" * 100000), "malformed_response"),
        (lambda s: setattr(s, "omit_access_token", True), "malformed_response"),
    ],
)
def test_bad_answers(reactor, svc, client, setup, code):
    setup(svc)
    error = expect_error(client.client_credentials, svc.token_url, CLIENT_ID, CLIENT_SECRET)
    assert error.error_code == code
    assert f"127.0.0.1:{svc.port}" in str(error)
    assert "login here" not in str(error)


def test_error_description_is_redacted(reactor, client):
    class Echo(TokenService):
        def _token(self, form, client_id):
            return 400, {"error": "invalid_grant", "error_description": f"bad token {form.get('refresh_token')}\x00\n"}

    with Echo(clients={CLIENT_ID: CLIENT_SECRET}) as echo:
        error = expect_error(client.exchange, REFRESH_TOKEN, echo.token_url, CLIENT_ID, CLIENT_SECRET, REFRESH)
    assert error.error_code == "invalid_grant"
    assert "bad token ***" in str(error)


def test_scope_changed_by_the_service_is_accepted(reactor, client):
    class Narrower(TokenService):
        def _token(self, form, client_id):
            status, body = super()._token(form, client_id)
            body["scope"] = "mail.read"
            return status, body

    with Narrower(clients={CLIENT_ID: CLIENT_SECRET}) as narrower:
        token = in_reactor(client.client_credentials, narrower.token_url, CLIENT_ID, CLIENT_SECRET, scope="mail.read mail.send")
    assert token.scope == "mail.read"


def test_common_url_without_tenant(reactor, svc, provider):
    dest = destination(svc, token_service_url=svc.tenant_token_url, token_service_url_type="Common")
    error = expect_error(provider.for_client_credentials, dest, None)
    assert error.error_code == "invalid_configuration"
    assert svc.requests == []


def test_https_required_without_the_test_switch(reactor, svc, client, monkeypatch):
    monkeypatch.delenv("OAUTHLIB_INSECURE_TRANSPORT")
    error = expect_error(client.client_credentials, svc.token_url, CLIENT_ID, CLIENT_SECRET)
    assert error.error_code == "insecure_transport"
    assert svc.requests == []


def test_stopped_client(reactor, svc, make_client):
    client = make_client(deadline=2.0)
    in_reactor(client.stop)
    assert expect_error(client.client_credentials, svc.token_url, CLIENT_ID, CLIENT_SECRET).error_code == "stopped"


def test_stop_fails_calls_in_flight(reactor, svc, make_client):
    client = make_client(deadline=5)
    svc.delay = 5
    outcome = []

    def start():
        client.client_credentials(svc.token_url, CLIENT_ID, CLIENT_SECRET).addCallbacks(outcome.append, outcome.append)

    in_reactor(start)
    wait_for(lambda: svc.active == 1, what="the request to reach the service")
    stopping = in_reactor(lambda: [client.stop()])  # not waited for: its thread is still in the request
    [failure] = wait_for(lambda: outcome, what="the call to fail")
    assert failure.check(TokenError) and failure.value.error_code == "stopped", failure
    svc.stop()  # wakes the delayed handler: the pool thread ends
    in_reactor(lambda: stopping[0], timeout=10)


def test_max_concurrent(reactor, svc, make_client):
    client = make_client(deadline=2.0, max_concurrent=1, pool_size=4)
    svc.delay = 0.1

    def three():
        return defer.gatherResults(
            [client.client_credentials(svc.token_url, CLIENT_ID, CLIENT_SECRET, scope=str(i)) for i in range(3)]
        )

    in_reactor(three)
    assert svc.token_requests() == 3
    assert svc.max_active == 1


# --- cache and single flight over HTTP ------------------------------------------------------


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def provider(client, clock):
    return TokenProvider(client, TokenCache(clock))


def test_cache_within_lifetime_then_expiry(reactor, svc, provider, clock):
    dest = destination(svc)
    first = in_reactor(provider.for_client_credentials, dest)
    second = in_reactor(provider.for_client_credentials, dest)
    assert first == second
    assert svc.token_requests() == 1
    in_reactor(clock.advance, 3600 - 60 - 1)
    assert in_reactor(provider.for_client_credentials, dest) == first
    assert svc.token_requests() == 1
    in_reactor(clock.advance, 2)
    third = in_reactor(provider.for_client_credentials, dest)
    assert third.access_token != first.access_token
    assert svc.token_requests() == 2


def test_cache_keys_tenant_and_scope(reactor, svc, provider):
    dest = destination(svc, token_service_url=svc.tenant_token_url, token_service_url_type="Common")
    a = in_reactor(provider.for_client_credentials, dest, "acme")
    b = in_reactor(provider.for_client_credentials, dest, "globex")
    assert a != b
    assert [r.tenant for r in svc.requests] == ["acme", "globex"]
    in_reactor(provider.for_client_credentials, dest, "acme")
    in_reactor(provider.for_client_credentials, destination(svc, scope="other"))
    assert svc.token_requests() == 3


def test_concurrent_requests_share_one(reactor, svc, provider):
    svc.delay = 0.2
    dest = destination(svc)

    def five():
        ds = [provider.for_client_credentials(dest) for _ in range(5)]
        assert len({id(d) for d in ds}) == 5
        return defer.gatherResults(ds)

    tokens = in_reactor(five)
    assert len({t.access_token for t in tokens}) == 1
    assert svc.token_requests() == 1


def test_failure_shared_and_not_cached(reactor, svc, provider):
    svc.refuse_all = True
    svc.delay = 0.1
    dest = destination(svc)

    def three():
        return defer.DeferredList([provider.for_client_credentials(dest) for _ in range(3)], consumeErrors=True)

    results = in_reactor(three)
    assert [ok for ok, _ in results] == [False] * 3
    assert {f.value.error_code for _, f in results} == {"invalid_grant"}
    assert svc.token_requests() == 1
    svc.refuse_all = False
    svc.delay = 0
    token = in_reactor(provider.for_client_credentials, dest)
    assert svc.username_for(token.access_token) == CLIENT_ID
    assert svc.token_requests() == 2


def test_exchange_refresh_token_cached_by_secret(reactor, svc, provider):
    dest = destination(svc, OAUTH2_REFRESH_TOKEN)
    first = in_reactor(provider.exchange, dest, None, REFRESH)
    assert svc.username_for(first.access_token) == "alice@example.org"
    assert in_reactor(provider.exchange, dest, None, REFRESH) == first
    assert svc.token_requests("refresh_token") == 1
    error = expect_error(provider.exchange, dest, None, "rt-unknown")
    assert error.error_code == "invalid_grant"


def test_exchange_code_is_used_once(reactor, svc, provider):
    dest = destination(svc, OAUTH2_AUTHORIZATION_CODE)
    first = in_reactor(provider.exchange, dest, None, CODE)
    # The code is single-use at the service; the second session is served from the cache.
    assert in_reactor(provider.exchange, dest, None, CODE) == first
    assert svc.token_requests("authorization_code") == 1
    provider.invalidate(dest, None, CODE)
    assert expect_error(provider.exchange, dest, None, CODE).error_code == "invalid_grant"


def test_exchange_refuses_other_authentication(svc, provider):
    with pytest.raises(ValueError):
        provider.exchange(destination(svc), None, REFRESH)


# --- secrets stay secret ---------------------------------------------------------------------


def test_secrets_never_leak(reactor, svc, make_client, events, caplog):
    caplog.set_level(logging.DEBUG)
    client = make_client(deadline=0.3)
    provider = TokenProvider(client, TokenCache(Clock()))
    tokens = [
        in_reactor(provider.for_client_credentials, destination(svc)),
        in_reactor(provider.exchange, destination(svc, OAUTH2_REFRESH_TOKEN), None, REFRESH),
        in_reactor(provider.exchange, destination(svc, OAUTH2_AUTHORIZATION_CODE), None, CODE),
    ]
    errors = [
        expect_error(client.client_credentials, svc.token_url, CLIENT_ID, CLIENT_SECRET + "x"),
        expect_error(client.exchange, REFRESH_TOKEN, svc.token_url, CLIENT_ID, CLIENT_SECRET, REFRESH + "x"),
        expect_error(client.exchange, AUTHORIZATION_CODE, svc.token_url, CLIENT_ID, CLIENT_SECRET, CODE),
    ]
    svc.garbage = f"<html>{CLIENT_SECRET}</html>".encode()
    errors.append(expect_error(client.client_credentials, svc.token_url, CLIENT_ID, CLIENT_SECRET))
    svc.garbage = None
    svc.delay = 1
    errors.append(expect_error(client.client_credentials, svc.token_url, CLIENT_ID, CLIENT_SECRET))
    svc.stop()

    secrets = [CLIENT_SECRET, REFRESH, CODE] + [t.access_token for t in tokens] + [t.refresh_token for t in tokens if t.refresh_token]
    texts = [repr(t) for t in tokens] + [str(e) for e in errors] + [repr(e) for e in errors]
    texts += [formatEvent(e) for e in events] + [repr(e) for e in events]
    texts += [r.getMessage() for r in caplog.records]
    assert any("token obtained" in text for text in texts)  # the observer did see our events
    for secret in secrets:
        for text in texts:
            assert secret not in text


# --- the cache alone (no reactor, no HTTP) -----------------------------------------------------


def _token(value="tok", expires_in=3600.0):
    return AccessToken(access_token=value, expires_at=expires_in, expires_in=expires_in)


def test_cache_single_flight_distinct_deferreds_and_cancel():
    clock = Clock()
    cache = TokenCache(clock)
    fetches = []

    def fetch():
        fetches.append(defer.Deferred())
        return fetches[-1]

    a, b, c = (cache.get("k", fetch) for _ in range(3))
    assert len(fetches) == 1 and len({id(a), id(b), id(c)}) == 3
    b.cancel()
    b.addErrback(lambda f: f.trap(defer.CancelledError))
    got = []
    a.addCallback(lambda t: (got.append(t), "changed by a's callback")[1])
    c.addCallback(got.append)
    fetches[0].callback(_token())
    assert got == [_token(), _token()]
    assert cache.in_flight == 0 and len(cache) == 1


def test_cache_margin_never_negative():
    clock = Clock()
    cache = TokenCache(clock, margin=60)
    calls = []

    def fetch(expires_in):
        calls.append(expires_in)
        return defer.succeed(_token(str(len(calls)), expires_in))

    cache.get("short", lambda: fetch(30.0))
    clock.advance(14)
    cache.get("short", lambda: fetch(30.0))
    assert len(calls) == 1  # half the lifetime when shorter than twice the margin
    clock.advance(2)
    cache.get("short", lambda: fetch(30.0))
    assert len(calls) == 2
    results = []
    cache.get("zero", lambda: fetch(0.0)).addCallback(results.append)
    cache.get("zero", lambda: fetch(0.0)).addCallback(results.append)
    assert len(calls) == 4 and len(results) == 2  # delivered, never cached


def test_cache_failure_not_cached_and_eviction():
    clock = Clock()
    cache = TokenCache(clock, max_entries=2)
    failures = []
    cache.get("k", lambda: defer.fail(TokenError("invalid_grant", "no"))).addErrback(failures.append)
    assert len(failures) == 1 and len(cache) == 0
    for key in "abc":
        cache.get(key, lambda: defer.succeed(_token(key)))
    assert len(cache) == 2 and cache.peek("a") is None and cache.peek("c") is not None
    cache.invalidate("c")
    assert cache.peek("c") is None


def test_keys_hold_no_secret():
    key = oauth.exchange_key("https://t.example/token", CLIENT_ID, CLIENT_SECRET, REFRESH)
    assert REFRESH not in repr(key)
    assert key == oauth.exchange_key("https://t.example/token", CLIENT_ID, CLIENT_SECRET, REFRESH)
    assert key != oauth.exchange_key("https://t.example/token", CLIENT_ID, CLIENT_SECRET, CODE)
    assert CLIENT_SECRET not in repr(key)
    # A destination with another (wrong) client secret never shares a cached token.
    assert key != oauth.exchange_key("https://t.example/token", CLIENT_ID, "wrong", REFRESH)
    cc = oauth.client_credentials_key("https://t.example/token", CLIENT_ID, CLIENT_SECRET)
    assert cc != oauth.client_credentials_key("https://t.example/token", CLIENT_ID, "wrong")
    assert CLIENT_SECRET not in repr(cc)


def test_access_token_repr_hides_secrets():
    token = AccessToken(access_token="at-secret", expires_at=1.0, refresh_token="rt-secret")
    assert "at-secret" not in repr(token) and "rt-secret" not in repr(token)


@pytest.mark.parametrize("method", ["basic", "body"])
def test_destination_chooses_client_authentication(reactor, svc, provider, method):
    """tokenServiceAuthentication: HTTP Basic by default, the form body when asked."""
    in_reactor(provider.for_client_credentials, destination(svc, token_client_auth=method))
    in_reactor(provider.exchange, destination(svc, OAUTH2_REFRESH_TOKEN, token_client_auth=method), None, REFRESH)
    assert [r.auth_method for r in svc.requests[-2:]] == [method, method]
