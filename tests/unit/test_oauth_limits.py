"""SPEC 9.6 for the token client, against tests/tokenservice.py misbehaving on purpose:
a 1 MiB cap on responses, one deadline per request however slowly the service trickles
bytes (the thread stops and the slot is free again), credentials redacted from every
error text even when the service echoes them, and the token metrics."""

from __future__ import annotations

import base64
import threading

import pytest
from prometheus_client import REGISTRY
from twisted.internet import defer
from twisted.logger import formatEvent

from tokenservice import TokenService
from mailgw.oauth import MAX_RESPONSE_BYTES, REFRESH_TOKEN, TokenClient, TokenError, secret_forms
from support.reactor import in_reactor
from support.secretscan import Secret, assert_no_secrets

CLIENT_ID = "mail-gateway"
#: Characters that URL-encoding and base64 both change.
CLIENT_SECRET = "cs/Secret+with=odd&chars 7f3a"
REFRESH = "rt/alice+Secret=19c2"
SECRETS = [Secret("client secret", CLIENT_SECRET, user=CLIENT_ID), Secret("refresh token", REFRESH, user="alice@example.org")]


@pytest.fixture
def svc():
    with TokenService(clients={CLIENT_ID: CLIENT_SECRET}) as service:
        service.add_refresh_token(REFRESH, "alice@example.org")
        yield service


def counted(grant, outcome) -> float:
    return REGISTRY.get_sample_value("mailgw_token_requests_total", {"grant": grant, "outcome": outcome}) or 0.0


def failure_of(f, *args, **kwargs) -> TokenError:
    with pytest.raises(TokenError) as info:
        in_reactor(f, *args, **kwargs)
    return info.value


# --- 1 MiB cap ------------------------------------------------------------------------------


def test_response_over_one_mib_is_refused_without_reading_it_all(reactor, svc, make_client):
    client = make_client(deadline=20)
    svc.huge_body = 64 * 1024 * 1024
    before = counted("client_credentials", "error")
    error = failure_of(client.client_credentials, svc.token_url, CLIENT_ID, CLIENT_SECRET)
    assert error.error_code == "response_too_large"
    assert "more than 1024 KiB" in str(error) and f"127.0.0.1:{svc.port}" in str(error)
    assert counted("client_credentials", "error") == before + 1
    # We stopped reading at the cap and closed: the service could not write it all.
    assert svc.client_gone.wait(20)
    assert svc.body_bytes_sent < svc.huge_body


def test_response_just_under_the_cap_is_fine(reactor, svc, make_client):
    client = make_client(deadline=20)
    head, tail = b'{"access_token": "at-big", "expires_in": 60, "padding": "', b'"}'
    svc.garbage = head + b"p" * (MAX_RESPONSE_BYTES - len(head) - len(tail)) + tail
    token = in_reactor(client.client_credentials, svc.token_url, CLIENT_ID, CLIENT_SECRET)
    assert token.access_token == "at-big"


# --- deadline ---------------------------------------------------------------------------------


def test_trickling_service_meets_the_deadline_and_the_slot_is_free_again(reactor, svc, make_client):
    # One slot and one thread: the second request can only succeed if the first one's
    # slot was released and its thread stopped at the deadline.
    client = make_client(deadline=1.0, max_concurrent=1, pool_size=1)
    svc.trickle = 0.05  # a byte every 50 ms: every read succeeds long before its timeout
    before = counted("client_credentials", "timeout")
    error = failure_of(client.client_credentials, svc.token_url, CLIENT_ID, CLIENT_SECRET)
    assert error.error_code == "timeout"
    assert counted("client_credentials", "timeout") == before + 1
    # The thread let go of the connection (the service's next write fails) ...
    assert svc.client_gone.wait(20), "the pool thread still holds the trickling connection"
    # ... and the next request gets the slot and the thread.
    svc.trickle = None
    token = in_reactor(client.client_credentials, svc.token_url, CLIENT_ID, CLIENT_SECRET)
    assert token.access_token.startswith("at-")


def test_trickle_while_others_wait_for_the_slot(reactor, svc, make_client):
    client = make_client(deadline=1.0, max_concurrent=1, pool_size=2)
    svc.trickle = 0.05

    def two():
        return defer.DeferredList(
            [client.client_credentials(svc.token_url, CLIENT_ID, CLIENT_SECRET, scope=str(i)) for i in range(2)],
            consumeErrors=True,
        )

    results = in_reactor(two)
    # Both end with timeout (the second waited for the slot within the same deadline).
    assert [r[1].value.error_code for r in results] == ["timeout", "timeout"]


# --- redaction --------------------------------------------------------------------------------


@pytest.mark.parametrize("client_auth", ["basic", "body"])
def test_echoed_credentials_are_redacted(reactor, svc, make_client, events, client_auth):
    client = make_client(deadline=10)
    svc.echo_credentials = True
    before = counted("refresh_token", "refused")
    error = failure_of(client.exchange, REFRESH_TOKEN, svc.token_url, CLIENT_ID, CLIENT_SECRET, REFRESH, client_auth=client_auth)
    assert error.error_code == "invalid_client"
    assert counted("refresh_token", "refused") == before + 1
    text = str(error) + repr(error)
    if client_auth == "basic":
        assert "Authorization: Basic ***" in text
    assert "grant_type=refresh_token" in text  # the echo is there, minus the secrets
    logged = "\n".join(formatEvent(e) for e in events)
    assert_no_secrets(text, SECRETS, "the error")
    assert_no_secrets(logged, SECRETS, "the log", ignore_case=True)


def parse_secret_echoing(status_code, reason, content_type, content):
    """The TokenError for a token-service response, to a grant whose client secret is
    ``cs-Secret``."""
    from mailgw.oauth import _Grant, _parse_response

    class Response:
        headers = {"Content-Type": content_type}

    response = Response()
    response.status_code, response.reason, response.content = status_code, reason, content
    grant = _Grant("client_credentials", "http://t.example/token", CLIENT_ID, "cs-Secret")
    with pytest.raises(TokenError) as info:
        _parse_response(response, grant)
    return info.value


def test_error_code_that_echoes_a_secret_is_not_used():
    error = parse_secret_echoing(400, "Bad Request", "application/json",
                                 b'{"error": "cs-Secret", "error_description": "x"}')
    assert error.error_code == "unknown_error" and "cs-Secret" not in str(error)


def test_a_content_type_that_echoes_a_secret_is_redacted():
    error = parse_secret_echoing(200, "OK", "text/x-cs-Secret-and-more; charset=utf-8", b"not json")
    assert error.error_code == "malformed_response" and "cs-Secret" not in str(error)


def test_secret_forms():
    forms = secret_forms(("a b/c",), "id", "a b/c")
    for expected in ("a b/c", "a%20b%2Fc", "a+b%2Fc", base64.b64encode(b"a b/c").decode(),
                     base64.b64encode(b"id:a b/c").decode(), base64.b64encode(b"id:a+b%2Fc").decode()):
        assert expected in forms
    assert list(forms) == sorted(forms, key=len, reverse=True)


# --- the cache metric -----------------------------------------------------------------------


def test_token_cache_lookups_are_counted():
    from twisted.internet.testing import MemoryReactorClock

    from mailgw.config import parse_config
    from mailgw.service import make_service

    def value(result):
        return REGISTRY.get_sample_value("mailgw_token_cache_total", {"result": result}) or 0.0

    service = make_service(parse_config({}, "gateway.yaml"), MemoryReactorClock())
    cache = service.gateway.tokens.cache
    before = {r: value(r) for r in ("hit", "miss", "shared")}
    fetched = defer.Deferred()
    cache.get("k", lambda: fetched)
    cache.get("k", lambda: fetched)
    from mailgw.oauth import AccessToken

    fetched.callback(AccessToken("at", expires_at=3600, expires_in=3600))
    cache.get("k", lambda: fetched)
    assert {r: value(r) - before[r] for r in before} == {"hit": 1, "miss": 1, "shared": 1}


def test_stop_interrupts_a_trickling_request(reactor, svc, make_client):
    client = make_client(deadline=30)
    svc.trickle = 0.05
    outcome = []
    started = threading.Event()

    def begin():
        d = client.client_credentials(svc.token_url, CLIENT_ID, CLIENT_SECRET)
        d.addErrback(lambda f: outcome.append(f.value))
        reactor.callLater(0.5, started.set)

    in_reactor(begin)
    started.wait(10)
    in_reactor(client.stop)
    assert outcome and outcome[0].error_code == "stopped"
    assert svc.client_gone.wait(20)


def test_every_admitted_request_has_a_thread(reactor):
    client = TokenClient(reactor, max_concurrent=8)
    assert client.pool.max_threads == 8 and client.max_concurrent == 8
