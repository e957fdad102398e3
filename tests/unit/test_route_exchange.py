"""Lazy OAuth2 in Kubernetes mode: the destination service exchanges the application's
secret when the route's source can (X-refresh-token / X-code), else the token service."""

from twisted.internet.defer import fail, succeed
from twisted.internet.task import Clock

from mailgw.destination import parse_destination
from mailgw.kube.main import RouteSource
from mailgw.kube.model import Route
from mailgw.sources.base import AuthToken, FindResult, TokenExchangeFailed
from mailgw.oauth import AccessToken, TokenError
from mailgw.service import Gateway, StaticSource
from mailgw.settings import Route as SessionRoute, Settings

DEST = parse_destination({
    "Name": "d", "Type": "MAIL", "Authentication": "OAuth2RefreshToken", "mail.transport.protocol": "smtps",
    "mail.smtps.host": "h", "tokenServiceURL": "https://t/token", "clientId": "c", "clientSecret": "s",
})


class RouteDestination:
    def __init__(self, can, result):
        self.can, self.result, self.asked = can, result, []

    def can_exchange(self):
        return self.can

    def lookup(self):
        return succeed(DEST)

    def exchange(self, **kwargs):
        self.asked.append(kwargs)
        return self.result


class Tokens:
    def __init__(self):
        self.asked = []

    def exchange(self, destination, tenant, secret):
        self.asked.append((destination.name, tenant, secret))
        return succeed(AccessToken(access_token="from-token-service", expires_at=1e12))


def gateway_with(route_destination):
    """A gateway and the session route of a controller-opened listener for apps/mymail
    (its source answers through ``route_destination``)."""
    tokens = Tokens()
    route = Route("apps", "mymail", None).listener_route(RouteSource(route_destination))
    return Gateway(Clock(), Settings(), StaticSource({}), tokens=tokens), tokens, route


def result_of(d):
    box = []
    d.addBoth(box.append)
    return box[0]


def test_destination_service_token_is_used_when_the_source_exchanges():
    rd = RouteDestination(True, succeed(FindResult(DEST, (AuthToken("Bearer", "at-from-dest-svc"),))))
    gateway, tokens, route = gateway_with(rd)
    assert result_of(gateway.exchange(route, DEST, "rt-1")) == "at-from-dest-svc"
    assert rd.asked == [{"refresh_token": "rt-1"}] and tokens.asked == []


def test_destination_service_errors_become_token_errors():
    # the source checks the returned token itself (BtpSource._check_tokens): an unusable
    # one arrives here as TokenExchangeFailed carrying the service's (redacted) error
    refused = TokenExchangeFailed("destination service could not get a token for destination 'd': invalid_grant")
    rd = RouteDestination(True, fail(refused))
    gateway, _, route = gateway_with(rd)
    failure = result_of(gateway.exchange(route, DEST, "rt-1"))
    assert failure.check(TokenError) and "invalid_grant" in str(failure.value) and "rt-1" not in str(failure.value)
    rd = RouteDestination(True, fail(TokenExchangeFailed("destination service answered 400")))
    gateway, _, route = gateway_with(rd)
    assert result_of(gateway.exchange(route, DEST, "rt-1")).check(TokenError)


def test_token_service_when_the_source_does_not_exchange():
    gateway, tokens, route = gateway_with(RouteDestination(False, None))
    assert result_of(gateway.exchange(route, DEST, "rt-2")) == "from-token-service"
    assert tokens.asked == [("d", None, "rt-2")]


class LabelledSource:
    def __init__(self, label):
        self.label = label

    def lookup(self, name, tenant=None):
        return succeed(f"{self.label}:{name}")

    def family(self, name):
        return self.label

    def exchange(self, name, destination, secret):
        return succeed(f"{self.label}-token")


def test_a_route_that_carries_its_own_source_is_answered_by_it():
    gateway = Gateway(Clock(), Settings(), LabelledSource("gateway"), tokens=Tokens())
    route = SessionRoute("apps/mymail", None, source=LabelledSource("listener"))
    assert result_of(gateway.lookup(route)) == "listener:apps/mymail"
    assert result_of(gateway.exchange(route, DEST, "rt-1")) == "listener-token"
    assert gateway.family_of(route) == "listener"
    assert result_of(gateway.lookup(SessionRoute("apps/mymail"))) == "gateway:apps/mymail"
    # the source is no part of the route's identity (warm pools are keyed by route)
    assert route == SessionRoute("apps/mymail") and hash(route) == hash(SessionRoute("apps/mymail"))


def test_a_session_of_a_closed_listener_still_exchanges_through_its_route():
    """The drain (or the CR's deletion) closes the listener while its sessions go on: a
    session that logs in afterwards still gets its token from the route's source, not
    from the destination's tokenServiceURL."""
    from twisted.internet.testing import MemoryReactorClock

    from mailgw.kube.main import ListenerManager

    reactor, tokens = MemoryReactorClock(), Tokens()
    gateway = Gateway(reactor, Settings(), StaticSource({}), tokens=tokens)
    manager = ListenerManager(reactor, gateway, "127.0.0.1")
    rd = RouteDestination(True, succeed(FindResult(DEST, (AuthToken("Bearer", "at-from-dest-svc"),))))
    manager.open(Route("apps", "mymail", None), 20000, rd)
    ((_, factory, _, _),) = reactor.tcpServers
    manager.close(Route("apps", "mymail", None))
    assert result_of(gateway.exchange(factory.route, DEST, "rt-1")) == "at-from-dest-svc"
    assert gateway.family_of(factory.route) == "smtp" and tokens.asked == []
