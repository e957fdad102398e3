"""SOCKS5 as one layer of the endpoint chain: ``TCP(proxy) -> SOCKS5(target) -> TLS``.

:class:`SOCKS5ClientEndpoint` wraps the endpoint that reaches the proxy.  It runs the
sans-IO handshake (:class:`mailgw.protocol.socks5.SOCKS5Client`) on a private protocol,
and once the proxy has connected the tunnel it hands the *real* transport to the
application protocol:

* ``transport.protocol`` is pointed at the application protocol (that is what a TCP
  connection dispatches ``dataReceived``/``connectionLost`` to, and what
  ``transport.startTLS`` wraps), so STARTTLS through the tunnel reaches the real TCP
  transport and ``IHandshakeListener.handshakeCompleted`` reaches the application;
* ``app.makeConnection(transport)`` is called, the ``connect()`` Deferred fires with the
  application protocol, and only then are bytes that arrived together with the CONNECT
  reply (e.g. a server greeting) delivered with ``dataReceived`` — the same order a
  plain TCP endpoint guarantees.

For transports without a ``protocol`` attribute the handshake protocol stays in the
path and forwards events, so nothing is lost either way.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import defer, error
from twisted.internet.address import HostnameAddress
from twisted.internet.interfaces import IProtocolFactory, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailgw.protocol.actions import SendUpstream
from mailgw.protocol.socks5 import (
    MalformedReply,
    Method,
    SOCKS5Client,
    SOCKSConfigurationError,
    SOCKSConnected,
    SOCKSError,
)

__all__ = [
    "SOCKS5ClientEndpoint",
    "SOCKSTimeoutError",
    "ProxyConnectError",
    "ProxyConnectionLost",
]

log = Logger()


class SOCKSTimeoutError(SOCKSError, defer.TimeoutError):
    """The proxy (or the token for it) did not complete the handshake in time."""


class ProxyConnectError(SOCKSError, error.ConnectError):
    """The SOCKS5 proxy itself could not be reached; ``reason`` is the original error."""

    def __init__(self, message: str, reason: BaseException | None = None):
        Exception.__init__(self, message)
        self.osError = None
        self.reason = reason

    def __str__(self) -> str:
        return str(self.args[0])


class ProxyConnectionLost(SOCKSError, error.ConnectionLost):
    """The proxy closed the connection before the handshake completed."""

    def __str__(self) -> str:
        return str(self.args[0])


JWTProvider = Callable[[], "defer.Deferred[str]"]


@implementer(IStreamClientEndpoint)
class SOCKS5ClientEndpoint:
    """Connect to ``host:port`` through a SOCKS5 proxy reached via ``proxy_endpoint``.

    :param proxy_endpoint: an ``IStreamClientEndpoint`` for the proxy (usually TCP).
    :param host: the target host name, sent to the proxy as a domain name.
    :param port: the target port.
    :param method: ``"none"``, ``"userpass"`` (RFC 1929, needs ``username`` and
        ``password``) or ``"sap"`` (the connectivity proxy's method 0x80, needs
        ``jwt_provider``).
    :param jwt_provider: zero-argument callable returning a ``Deferred[str]`` with the
        JWT; called once per ``connect()``, in parallel with the proxy connection.  The
        Deferred must belong to this caller: it is cancelled when the attempt is
        abandoned.
    :param location_id: ``CloudConnectorLocationId`` sent with method 0x80.
    :param timeout: seconds for the whole attempt (token, proxy connection and
        handshake); ``None`` for no limit.
    :param reactor: provides ``callLater`` (defaults to the global reactor).

    ``connect()`` fires with the application protocol once the tunnel is up; it fails
    with a :class:`~mailgw.protocol.socks5.SOCKSError` subclass (reply codes, refused
    authentication, malformed replies, :class:`ProxyConnectError`,
    :class:`ProxyConnectionLost`, :class:`SOCKSTimeoutError`), with the JWT provider's
    own error, or with ``CancelledError`` when cancelled (which aborts the proxy
    connection).
    """

    def __init__(
        self,
        proxy_endpoint: IStreamClientEndpoint,
        host: str,
        port: int,
        method: Method = "none",
        username: str | None = None,
        password: str | None = None,
        jwt_provider: JWTProvider | None = None,
        location_id: str | None = None,
        timeout: float | None = 30.0,
        reactor: IReactorTime | None = None,
    ):
        if method == "sap" and jwt_provider is None:
            raise SOCKSConfigurationError(
                "connectivity proxy method 0x80 needs a jwt_provider"
            )
        # Validate everything else now (a placeholder JWT stands in for the real one),
        # so a bad configuration fails when the chain is built, not per connection.
        SOCKS5Client(
            host,
            port,
            method,
            username=username,
            password=password,
            jwt="x" if method == "sap" else None,
            location_id=location_id,
        )
        self._proxy = proxy_endpoint
        self._host = host
        self._port = port
        self._method: Method = method
        self._username = username
        self._password = password
        self._jwt_provider = jwt_provider
        self._location_id = location_id
        self._timeout = timeout
        self._reactor = reactor

    def __repr__(self) -> str:
        return (
            f"<SOCKS5ClientEndpoint {self._host}:{self._port} via {self._proxy!r} "
            f"method={self._method}>"
        )

    def connect(self, protocolFactory: IProtocolFactory) -> "defer.Deferred[Protocol]":
        """Connect through the proxy; see the class docstring for the outcomes."""
        reactor = self._reactor
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor  # type: ignore[assignment]
        return _SOCKSAttempt(self, protocolFactory, reactor).start()

    def _machine(self, jwt: str | None) -> SOCKS5Client:
        return SOCKS5Client(
            self._host,
            self._port,
            self._method,
            username=self._username,
            password=self._password,
            jwt=jwt,
            location_id=self._location_id,
        )


class _HandshakeProtocol(Protocol):
    """Runs the SOCKS5 handshake; after hand-over it only forwards (see module doc)."""

    def __init__(self, attempt: _SOCKSAttempt):
        self._attempt = attempt
        self.app: Any = None

    def dataReceived(self, data: bytes) -> None:
        if self.app is not None:
            self.app.dataReceived(data)
        else:
            self._attempt.data_received(self, data)

    def connectionLost(self, reason: Failure = error.ConnectionDone) -> None:  # type: ignore[assignment]
        if self.app is not None:
            self.app.connectionLost(reason)
        else:
            self._attempt.connection_lost(self, reason)


class _HandshakeFactory(Factory):
    def __init__(self, attempt: _SOCKSAttempt):
        self._attempt = attempt

    def buildProtocol(self, addr: Any) -> _HandshakeProtocol:
        return _HandshakeProtocol(self._attempt)


def _abort(transport: Any) -> None:
    abort = getattr(transport, "abortConnection", None) or transport.loseConnection
    abort()


class _SOCKSAttempt:
    """One ``connect()``: token, proxy connection, handshake, hand-over, or failure."""

    def __init__(self, endpoint: SOCKS5ClientEndpoint, factory: IProtocolFactory,
                 reactor: IReactorTime):
        self._ep = endpoint
        self._factory = factory
        self._reactor = reactor
        self.result: defer.Deferred[Protocol] = defer.Deferred(self._cancel)
        self._finished = False
        self._timer: Any = None
        self._jwt_d: defer.Deferred[str] | None = None
        self._jwt: str | None = None
        self._proxy_d: defer.Deferred[Any] | None = None
        self._proto: _HandshakeProtocol | None = None
        self._machine: SOCKS5Client | None = None

    @property
    def _target(self) -> str:
        return f"{self._ep._host}:{self._ep._port}"

    # -- start

    def start(self) -> defer.Deferred[Protocol]:
        if self._ep._timeout is not None:
            self._timer = self._reactor.callLater(self._ep._timeout, self._timed_out)
        if self._ep._method == "sap":
            assert self._ep._jwt_provider is not None
            self._jwt_d = defer.maybeDeferred(self._ep._jwt_provider)
            self._jwt_d.addCallbacks(self._got_jwt, self._jwt_failed)
        if not self._finished:
            self._proxy_d = defer.maybeDeferred(self._ep._proxy.connect,
                                                _HandshakeFactory(self))
            self._proxy_d.addCallbacks(self._proxy_connected, self._proxy_failed)
        return self.result

    def _got_jwt(self, jwt: object) -> None:
        self._jwt_d = None
        if self._finished:
            return
        if not isinstance(jwt, str) or not jwt:
            self._fail(SOCKSConfigurationError(
                "connectivity proxy token provider returned no token"))
            return
        self._jwt = jwt
        self._maybe_begin()

    def _jwt_failed(self, failure: Failure) -> None:
        self._jwt_d = None
        if not self._finished:
            # The token error is the provider's own typed error: pass it on unchanged.
            self._fail(failure)

    def _proxy_connected(self, proto: _HandshakeProtocol) -> None:
        self._proxy_d = None
        if self._finished:
            _abort(proto.transport)
            return
        self._proto = proto
        self._maybe_begin()

    def _proxy_failed(self, failure: Failure) -> None:
        self._proxy_d = None
        if self._finished:
            return
        self._fail(ProxyConnectError(
            f"cannot connect to the SOCKS5 proxy (for {self._target}): "
            f"{failure.getErrorMessage()}",
            failure.value,
        ))

    def _maybe_begin(self) -> None:
        if self._proto is None or self._machine is not None:
            return
        if self._ep._method == "sap" and self._jwt is None:
            return
        try:
            self._machine = self._ep._machine(self._jwt)
        except SOCKSError as e:
            self._fail(e)
            return
        self._proto.transport.write(self._machine.start())

    # -- handshake

    def data_received(self, proto: _HandshakeProtocol, data: bytes) -> None:
        if proto is not self._proto or self._finished:
            return
        if self._machine is None:
            self._fail(MalformedReply(
                "SOCKS5 proxy sent data before the client greeting"))
            return
        try:
            actions = self._machine.receive(data)
        except SOCKSError as e:
            self._fail(e)
            return
        for action in actions:
            if isinstance(action, SendUpstream):
                proto.transport.write(action.data)
            elif isinstance(action, SOCKSConnected):
                self._hand_over(proto, action)

    def connection_lost(self, proto: _HandshakeProtocol, reason: Failure) -> None:
        if proto is not self._proto:
            return
        self._proto = None
        if self._finished:
            return
        state = self._machine.state if self._machine else "waiting for the token"
        self._fail(ProxyConnectionLost(
            f"SOCKS5 proxy closed the connection during the handshake for "
            f"{self._target} (while {state}): {reason.getErrorMessage()}"
        ))

    def _hand_over(self, proto: _HandshakeProtocol, connected: SOCKSConnected) -> None:
        transport = proto.transport
        self._finished = True
        self._cancel_timer()
        assert self._machine is not None
        try:
            app = self._factory.buildProtocol(
                HostnameAddress(self._machine.host_bytes, self._ep._port))
            if app is None:
                raise error.NoProtocol()
        except BaseException:
            _abort(transport)
            self.result.errback()
            return
        # From here on the real transport talks to the application protocol.
        proto.app = app
        if getattr(transport, "protocol", None) is not None:
            transport.protocol = app
        try:
            app.makeConnection(transport)
        except BaseException:
            _abort(transport)
            self.result.errback()
            return
        log.debug(
            "SOCKS5 tunnel to {target} open (method {method}, bound {bound})",
            target=self._target, method=self._ep._method,
            bound=f"{connected.bound_host}:{connected.bound_port}",
        )
        self.result.callback(app)
        if connected.leftover and not getattr(transport, "disconnecting", False):
            app.dataReceived(connected.leftover)

    # -- ending

    def _timed_out(self) -> None:
        self._timer = None
        if self._finished:
            return
        if self._machine is not None:
            stage = self._machine.state
        elif self._proto is None:
            stage = "connecting to the proxy"
        else:
            stage = "waiting for the connectivity proxy token"
        timeout = self._ep._timeout
        self._fail(SOCKSTimeoutError(
            f"SOCKS5 handshake for {self._target} timed out after {timeout:g} s "
            f"(while {stage})"
        ))

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def _cleanup(self) -> None:
        self._finished = True
        self._cancel_timer()
        if self._proxy_d is not None:
            d, self._proxy_d = self._proxy_d, None
            d.cancel()
        if self._jwt_d is not None:
            d2, self._jwt_d = self._jwt_d, None
            d2.cancel()
        if self._proto is not None and self._proto.transport is not None:
            _abort(self._proto.transport)

    def _fail(self, reason: BaseException | Failure) -> None:
        if self._finished:
            return
        self._cleanup()
        log.debug("SOCKS5 handshake for {target} failed: {reason}", target=self._target,
                  reason=reason.getErrorMessage() if isinstance(reason, Failure)
                  else str(reason))
        self.result.errback(reason if isinstance(reason, Failure) else Failure(reason))

    def _cancel(self, _: defer.Deferred[Protocol]) -> None:
        if not self._finished:
            self._cleanup()
