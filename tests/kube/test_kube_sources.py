"""Destination sources: secrets, btp (against a fake destination service, through the
project's token client), the cache and the registry; and the btp source through the
controller."""

from __future__ import annotations

import base64
import json

import pytest
from kubernetes import client as k8s
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from fakedestsvc import FakeDestinationService
from mailgw.kube import model
from mailgw.blocking import BlockingPool
from mailgw.kube.client import KubeApi
from mailgw.kube.controller import KubeController, KubeSettings
from mailgw.kube.model import Route
from mailgw.kube.secrets import SecretsSource, credentials_from_secret
from mailgw.oauth import TokenCache, TokenClient, TokenProvider
from mailgw.sources.base import (
    DestinationNotFound,
    InstanceNotFound,
    InvalidDestination,
    MappingSource,
    ProxyTypeNotSupported,
    SourceUnavailable,
    TokenExchangeFailed,
    TypeNotSupported,
)
from mailgw.sources.btp import BtpCredentials, BtpSource, tenant_url
from mailgw.sources.cache import CachingSource, SourceRegistry
from kubetest import GW_LABELS, GW_NS, SMTPS, FakeListeners, destination_cr, pod, secret, wait_condition, wait_for


def sync(fn, *args):
    return maybeDeferred(fn, *args)


def outcome(d: Deferred):
    """The result of an already fired Deferred, or its exception."""
    box = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    value = box[0]
    return value.value if isinstance(value, Failure) else value


# --- secrets --------------------------------------------------------------------------


@pytest.fixture
def secrets(fake):
    return SecretsSource(KubeApi(k8s.ApiClient(fake.configuration()), timeout=2), sync)


def test_secrets_found(fake, secrets):
    fake.create("secrets", "apps", secret("d1", SMTPS))
    dest = outcome(secrets.lookup("apps", "d1"))
    assert (dest.name, dest.host, dest.port, dest.password) == ("example-dest-smtps", "smtp.example.org", 465, "secret")
    assert "secret" not in repr(dest)


def test_secrets_tenant_key_preferred(fake, secrets):
    obj = secret("d1", SMTPS)
    obj["data"]["destination.t1.json"] = base64.b64encode(
        json.dumps(dict(SMTPS, **{"mail.smtps.host": "t1.example.org"})).encode()).decode()
    fake.create("secrets", "apps", obj)
    assert outcome(secrets.lookup("apps", "d1", "t1")).host == "t1.example.org"
    assert outcome(secrets.lookup("apps", "d1", "t2")).host == "smtp.example.org"
    assert outcome(secrets.lookup("apps", "d1")).host == "smtp.example.org"


@pytest.mark.parametrize(
    "data,error,fragment",
    [
        (None, DestinationNotFound, "not found"),
        ({}, DestinationNotFound, "destination.json"),
        ({"destination.json": "%%%"}, InvalidDestination, "base64"),
        ({"destination.json": base64.b64encode(b"{nope").decode()}, InvalidDestination, "JSON"),
        ({"destination.json": base64.b64encode(b"\xff\xfe").decode()}, InvalidDestination, "UTF-8"),
        ({"destination.json": base64.b64encode(b"[1]").decode()}, InvalidDestination, "object"),
        ({"destination.json": base64.b64encode(json.dumps({"Name": "w", "Type": "HTTP"}).encode()).decode()},
         TypeNotSupported, "HTTP"),
        ({"destination.json": base64.b64encode(json.dumps(dict(SMTPS, ProxyType="PrivateLink")).encode()).decode()},
         ProxyTypeNotSupported, "PrivateLink"),
        ({"destination.json": base64.b64encode(json.dumps({k: v for k, v in SMTPS.items() if k != "mail.smtps.host"}).encode()).decode()},
         InvalidDestination, "mail.smtps.host"),
    ],
)
def test_secrets_failures(fake, secrets, data, error, fragment):
    if data is not None:
        fake.create("secrets", "apps", {"metadata": {"name": "d1"}, "data": data})
    e = outcome(secrets.lookup("apps", "d1"))
    assert isinstance(e, error), e
    assert fragment in e.message
    assert "secret" not in e.message.replace("Secret", "")


def test_secrets_api_error_is_transient(fake, secrets):
    fake.fault(r"/secrets/d1$", status=500)
    e = outcome(secrets.lookup("apps", "d1"))
    assert isinstance(e, SourceUnavailable) and not e.definitive


# --- cache and registry -----------------------------------------------------------------


class Scripted:
    def __init__(self):
        self.calls = []
        self.pending = []

    def lookup(self, ns, name, tenant=None, **kw):
        self.calls.append((ns, name, tenant))
        d = Deferred()
        self.pending.append(d)
        return d


def test_cache_single_flight_and_expiry():
    clock, inner = Clock(), Scripted()
    cache = CachingSource(inner, clock, 120)
    d1, d2 = cache.lookup("a", "x"), cache.lookup("a", "x")
    assert len(inner.calls) == 1
    inner.pending[0].callback("dest")
    assert outcome(d1) == outcome(d2) == "dest"
    assert outcome(cache.lookup("a", "x")) == "dest" and len(inner.calls) == 1
    cache.lookup("a", "x", "t1")
    assert len(inner.calls) == 2  # tenants are separate entries
    clock.advance(121)
    cache.lookup("a", "x")
    assert len(inner.calls) == 3


def test_cache_keeps_definitive_failures_only():
    clock, inner = Clock(), Scripted()
    cache = CachingSource(inner, clock, 120)
    first = cache.lookup("a", "x")
    inner.pending[0].errback(DestinationNotFound("gone"))
    assert isinstance(outcome(first), DestinationNotFound)
    assert isinstance(outcome(cache.lookup("a", "x")), DestinationNotFound)
    assert len(inner.calls) == 1
    transient = cache.lookup("a", "y")
    inner.pending[1].errback(SourceUnavailable("down"))
    assert isinstance(outcome(transient), SourceUnavailable)
    cache.lookup("a", "y")
    assert len(inner.calls) == 3
    cache.invalidate("a")
    cache.lookup("a", "x")
    assert len(inner.calls) == 4


def test_a_session_lookup_never_waits_for_a_flight_of_another_plane():
    """A reconcile's lookup runs in the control pool: a session looking the same
    destination up must not queue behind it (its own flight, in its own pool), while a
    stored answer serves every plane."""
    clock, control = Clock(), object()
    runs = []

    class Planed(Scripted):
        def lookup(self, ns, name, tenant=None, *, run=None):
            runs.append(run)
            return super().lookup(ns, name, tenant)

    inner = Planed()
    cache = CachingSource(inner, clock, 120)
    reconcile = cache.lookup("a", "x", run=control)
    session, other_session = cache.lookup("a", "x"), cache.lookup("a", "x")
    assert runs == [control, None]  # the sessions share one flight of their own
    inner.pending[1].callback("dest")
    assert outcome(session) == outcome(other_session) == "dest" and not reconcile.called
    assert outcome(cache.lookup("a", "x", run=control)) == "dest" and len(runs) == 2  # the stored answer
    inner.pending[0].callback("dest")
    assert outcome(reconcile) == "dest"
    cache.invalidate("a", "x")
    cache.lookup("a", "x", run=control)
    assert len(runs) == 3


def test_registry_default_and_unknown():
    static = MappingSource({("a", "x"): "dest"})
    reg = SourceRegistry({"secrets": static}, default="secrets")
    assert outcome(reg.lookup(None, "a", "x")) == "dest"
    assert isinstance(outcome(reg.lookup("nope", "a", "x")), InstanceNotFound)
    assert isinstance(outcome(SourceRegistry({}, None).lookup(None, "a", "x")), InstanceNotFound)


# --- btp ---------------------------------------------------------------------------------


@pytest.fixture
def destsvc(monkeypatch):
    with FakeDestinationService() as svc:
        # requests (the token client's and the find calls) go through the fake as a proxy
        monkeypatch.setenv("HTTP_PROXY", svc.url)
        monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
        monkeypatch.setenv("OAUTHLIB_INSECURE_TRANSPORT", "1")  # the fake speaks http
        svc.destinations[("provider", "example-dest-smtps")] = SMTPS
        svc.destinations[("t1", "example-dest-smtps")] = dict(SMTPS, **{"mail.smtps.host": "t1.example.org"})
        svc.destinations[("provider", "web")] = {"Name": "web", "Type": "HTTP", "URL": "https://x"}
        lazy = dict(SMTPS, Authentication="OAuth2RefreshToken", tokenServiceURL="https://login.example/token",
                    clientId="c", clientSecret="s")
        del lazy["mail.password"]
        svc.destinations[("provider", "lazy")] = lazy
        yield svc


CREDS = BtpCredentials("dest-client", "dest-secret", "http://provider.auth.test", "http://destination.test")


@pytest.fixture
def pools(reactor, in_reactor):
    """A worker pool and the token client, started; stopped at the end."""
    pool = BlockingPool(reactor, "test-btp", 2)
    tokens = TokenClient(reactor, deadline=5)
    in_reactor(pool.startService)
    in_reactor(tokens.start)
    yield pool, tokens
    in_reactor(pool.stopService)
    in_reactor(tokens.stop)


def btp_source(reactor, pools, creds=CREDS, timeout=5):
    pool, tokens = pools
    return BtpSource(lambda: creds, pool, tokens, TokenCache(reactor), timeout=timeout)


@pytest.fixture
def btp(destsvc, reactor, pools):
    return btp_source(reactor, pools)


def test_btp_lookup_and_token_cache(btp, destsvc, in_reactor):
    dest = in_reactor(btp.lookup, "apps", "example-dest-smtps")
    assert dest.host == "smtp.example.org"
    in_reactor(btp.lookup, "apps", "example-dest-smtps")
    assert destsvc.token_requests == ["provider"]
    assert [r["name"] for r in destsvc.find_requests] == ["example-dest-smtps"] * 2


def test_btp_tenant_lookup_uses_the_tenant_token(btp, destsvc, in_reactor):
    dest = in_reactor(btp.lookup, "apps", "example-dest-smtps", "t1")
    assert dest.host == "t1.example.org"
    assert destsvc.token_requests == ["t1"]
    assert destsvc.find_requests[-1]["subdomain"] == "t1"


def test_btp_not_found_and_wrong_type(btp, in_reactor):
    with pytest.raises(DestinationNotFound, match="nothere"):
        in_reactor(btp.lookup, "apps", "nothere")
    with pytest.raises(DestinationNotFound, match="tenant t2"):
        in_reactor(btp.lookup, "apps", "example-dest-smtps", "t2")
    with pytest.raises(TypeNotSupported, match="HTTP"):
        in_reactor(btp.lookup, "apps", "web")


def test_btp_bad_credentials_do_not_leak(destsvc, reactor, in_reactor, pools):
    wrong = BtpCredentials("dest-client", "WRONG-SECRET", CREDS.url, CREDS.uri)
    source = btp_source(reactor, pools, wrong)
    with pytest.raises(SourceUnavailable) as info:
        in_reactor(source.lookup, "apps", "example-dest-smtps")
    assert "invalid_client" in info.value.message and "401" in info.value.message
    assert "WRONG-SECRET" not in info.value.message and "WRONG-SECRET" not in repr(wrong)


def test_btp_revoked_token_is_renewed_once(btp, destsvc, in_reactor):
    in_reactor(btp.lookup, "apps", "example-dest-smtps")
    destsvc.revoke_tokens()
    assert in_reactor(btp.lookup, "apps", "example-dest-smtps").host == "smtp.example.org"
    assert destsvc.token_requests == ["provider", "provider"]


def test_btp_exchange_refresh_token_and_code(btp, destsvc, in_reactor):
    result = in_reactor(lambda: btp.exchange("apps", "lazy", refresh_token="rt-123"))
    assert result.destination.lazy
    assert result.auth_tokens[0].value.startswith("access-") and result.auth_tokens[0].type == "Bearer"
    assert "access-" not in repr(result.auth_tokens[0])
    assert destsvc.find_requests[-1]["refresh"] is True
    in_reactor(lambda: btp.exchange("apps", "lazy", code="code-1"))
    assert destsvc.find_requests[-1]["code"] is True
    with pytest.raises(TokenExchangeFailed, match="invalid_grant") as info:
        in_reactor(lambda: btp.exchange("apps", "lazy", refresh_token="bad-token-value"))
    assert "bad-token-value" not in info.value.message


def test_btp_service_down(reactor, in_reactor, pools, monkeypatch):
    monkeypatch.setenv("OAUTHLIB_INSECURE_TRANSPORT", "1")
    down = BtpCredentials("c", "s", "http://127.0.0.1:9", "http://127.0.0.1:9")
    source = btp_source(reactor, pools, down, timeout=1)
    with pytest.raises(SourceUnavailable, match="unreachable"):
        in_reactor(source.lookup, "apps", "x")


@pytest.mark.parametrize(
    "url,tenant,expected",
    [
        ("https://provider.authentication.eu10.hana.ondemand.com", None,
         "https://provider.authentication.eu10.hana.ondemand.com"),
        ("https://provider.authentication.eu10.hana.ondemand.com", "t1",
         "https://t1.authentication.eu10.hana.ondemand.com"),
        ("https://provider.auth.test:8443/base", "t1", "https://t1.auth.test:8443/base"),
        ("https://{tenant}.auth.test", "t1", "https://t1.auth.test"),
        ("http://127.0.0.1:9000", "t1", "http://127.0.0.1:9000"),
    ],
)
def test_tenant_url(url, tenant, expected):
    assert tenant_url(url, tenant) == expected


def test_credentials_from_secret():
    enc = lambda s: base64.b64encode(s.encode()).decode()  # noqa: E731
    creds = credentials_from_secret({"data": {"clientid": enc("c"), "clientsecret": enc("s"),
                                              "url": enc("https://a.auth"), "uri": enc("https://dest")}}, "S")
    assert creds == BtpCredentials("c", "s", "https://a.auth", "https://dest")
    with pytest.raises(SourceUnavailable, match="uri"):
        credentials_from_secret({"data": {"clientid": enc("c"), "clientsecret": enc("s"), "url": enc("https://a")}}, "S")


BINDING = f"/namespaces/{GW_NS}/secrets/dest-svc-binding$"


@pytest.fixture
def btp_controller(fake, destsvc, reactor, in_reactor):
    """``start(**settings)``: a controller whose CR apps/mymail (tenants provider and t1)
    names the btp instance dest-svc, whose binding is a Secret in the gateway namespace."""
    enc = lambda s: base64.b64encode(s.encode()).decode()  # noqa: E731
    fake.create("secrets", GW_NS, {"metadata": {"name": "dest-svc-binding"}, "data": {
        "clientid": enc("dest-client"), "clientsecret": enc("dest-secret"),
        "url": enc("http://provider.auth.test"), "uri": enc("http://destination.test")}})
    fake.create("pods", GW_NS, pod("gw-0", "10.0.0.10"))
    fake.create("destinations", "apps", destination_cr(instance="dest-svc", tenants='["provider", "t1"]'))
    token_client = TokenClient(reactor, deadline=5)
    in_reactor(token_client.start)
    started = []

    def start(**overrides):
        api = KubeApi(k8s.ApiClient(fake.configuration()), timeout=2)
        values = dict(gateway_namespace=GW_NS, pod_labels=GW_LABELS, identity="gw-0",
                      port_range=(20000, 20999), resync_interval=3600, cache_ttl=60,
                      leader_election=False, retry_delay=0.05, btp_instances={"dest-svc": "dest-svc-binding"})
        values.update(overrides)
        listeners = FakeListeners()
        controller = in_reactor(KubeController.create, api, listeners, KubeSettings(**values), reactor, None,
                                TokenProvider(token_client, TokenCache(reactor)))
        in_reactor(controller.startService)
        started.append(controller)
        return controller, listeners

    yield start
    for controller in started:
        in_reactor(controller.stopService)
    in_reactor(token_client.stop)


def test_btp_through_the_controller(fake, destsvc, btp_controller, in_reactor):
    """A CR naming a btp instance whose binding is a Secret in the gateway namespace."""
    controller, listeners = btp_controller()
    wait_condition(fake, "True", model.REASON_OK)
    assert {s["metadata"]["name"] for s in fake.list("services", "apps")} == {"mymail-provider", "mymail-t1"}
    route = Route("apps", "mymail", "t1")
    wait_for(lambda: route in listeners.ports(), what="tenant listener")
    dest = listeners.open_routes[route][1]
    assert in_reactor(dest.lookup).host == "t1.example.org"
    assert in_reactor(dest.can_exchange) is True
    assert sorted(destsvc.token_requests) == ["provider", "t1"]


def test_the_binding_secret_is_read_once_until_it_changes(fake, destsvc, btp_controller, in_reactor):
    """The binding was read for every destination lookup and every token exchange."""
    controller, listeners = btp_controller(watch_secrets=True)
    wait_condition(fake, "True", model.REASON_OK)  # two lookups, one per tenant
    route = Route("apps", "mymail", "t1")
    wait_for(lambda: route in listeners.ports(), what="tenant listener")
    dest = listeners.open_routes[route][1]
    for i in range(3):  # sessions: each exchanges its own refresh token (never cached)
        assert in_reactor(lambda: dest.exchange(refresh_token=f"rt-{i}")).auth_tokens[0].value.startswith("access-")
    assert fake.count("GET", BINDING) <= 2  # one per worker pool (reconciles, sessions)
    fake.update("secrets", GW_NS, "dest-svc-binding", {"metadata": {"labels": {"rotated": "1"}}})
    before = fake.count("GET", BINDING)
    wait_for(lambda: in_reactor(lambda: dest.exchange(refresh_token="rt-9")) and fake.count("GET", BINDING) > before,
             what="the changed binding read again")


def test_sources_fail_fast_when_the_pool_is_not_running(fake, reactor, in_reactor):
    pool = BlockingPool(reactor, "never-started")
    source = SecretsSource(KubeApi(k8s.ApiClient(fake.configuration())), pool)
    e = outcome(source.lookup("apps", "d1"))
    assert isinstance(e, SourceUnavailable) and "PoolStopped" in e.message
    btp = BtpSource(lambda: CREDS, pool, TokenClient(reactor), TokenCache(reactor))
    assert isinstance(outcome(btp.lookup("apps", "x")), SourceUnavailable)


def test_btp_token_error_that_echoes_the_presented_secret_is_redacted():
    from mailgw.oauth import secret_forms
    from mailgw.sources.base import AuthToken, FindResult, TokenExchangeFailed

    refresh = "rt-Very-Secret-Value"
    result = FindResult(None, (AuthToken(type="Bearer", value="", expires_in=None, error=f"invalid refresh token {refresh}\n"),))
    with pytest.raises(TokenExchangeFailed) as info:
        BtpSource._check_tokens(result, "mail", secret_forms((refresh,)))
    assert refresh not in str(info.value) and "\n" not in str(info.value) and "invalid refresh token" in str(info.value)
