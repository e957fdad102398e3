"""Listening sockets from Twisted endpoint strings.

Two halves:

- pure helpers that read an endpoint string the way Twisted does, without a reactor:
  :func:`parse_endpoint`, :func:`check_endpoint` (port numbers), :func:`with_backlog`
  (SPEC 9.6: backlog 1024 unless the string says otherwise),
  :func:`reachable_off_loopback` (SPEC 9.1: may other hosts connect?) and
  :func:`find_conflict` (two listeners on one port);
- :class:`ListenerGroup`, a service that owns a set of listening ports, binds them in
  ``privilegedStartService`` (so a port in use fails start-up at once, before anything
  else starts), and can be changed while running (SIGHUP) without touching the
  connections its ports already accepted.

A failure to listen is a :class:`StartupError` with a one-line message naming where
the listener is configured and why it cannot listen.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Callable, Iterable

from attrs import define, frozen
from twisted.application.service import Service
from twisted.internet import defer, endpoints, error
from twisted.logger import Logger
from twisted.python.failure import Failure

from .destination import host_port

log = Logger()

#: Listen queue for endpoint strings that do not give ``backlog=``.  Twisted's default
#: of 50 left a third of a 1,000-connection burst waiting for a greeting that never came;
#: the kernel caps it at net.core.somaxconn (4096 by default since Linux 5.4).
DEFAULT_BACKLOG = 1024

#: Where each endpoint type takes ``backlog`` positionally (after the type), as in
#: Twisted's own parsers: tcp:port:interface:backlog, tcp6:port:backlog:interface,
#: ssl:port:privateKey:certKey:sslmethod:interface:backlog, unix:address:mode:backlog.
_BACKLOG_POSITION = {"tcp": 2, "tcp6": 1, "ssl": 5, "unix": 2}
#: Where each IP endpoint type takes ``interface`` positionally, and its default.
_INTERFACE = {"tcp": (1, ""), "tcp6": (2, "::"), "ssl": (4, "")}
_WILDCARDS = {"", "0.0.0.0", "::"}


class StartupError(Exception):
    """The gateway cannot listen as configured; the message is one line saying where
    and why (a port in use, a bad endpoint string)."""


@frozen
class EndpointString:
    """A Twisted server endpoint string, split the way ``serverFromString`` splits it:
    ``kind:arg:arg:key=value``, with ``\\`` escaping the next character."""

    kind: str
    args: tuple[str, ...]
    kwargs: tuple[tuple[str, str], ...]

    def get(self, key: str, position: int | None = None, default: str | None = None) -> str | None:
        """The parameter ``key``, given by name or at ``position`` among the arguments."""
        for name, value in self.kwargs:
            if name == key:
                return value
        if position is not None and position < len(self.args):
            return self.args[position]
        return default

    @property
    def port(self) -> str | None:
        """The port argument of tcp, tcp6 and ssl strings (as written)."""
        return self.get("port", 0) if self.kind in _INTERFACE else None

    @property
    def interface(self) -> str | None:
        """The address an IP endpoint binds (Twisted's default when not given)."""
        if self.kind not in _INTERFACE:
            return None
        position, default = _INTERFACE[self.kind]
        return self.get("interface", position, default)

    @property
    def backlog(self) -> str | None:
        position = _BACKLOG_POSITION.get(self.kind)
        return self.get("backlog", position) if position is not None else None


def parse_endpoint(description: str) -> EndpointString:
    """Split ``description`` like Twisted's endpoint string parser (no reactor needed).

    Raises ``ValueError`` for an empty string or a trailing backslash.
    """
    if not isinstance(description, str) or not description:
        raise ValueError("an endpoint string must not be empty")
    fields: list[tuple[str, ...]] = []
    current, pending = "", ()  # pending: the strings of the field being read
    after_equals = False
    chars = iter(description)
    for char in chars:
        if char == ":" or (char == "=" and not after_equals):
            pending += (current,)
            current = ""
            if char == ":":
                fields.append(pending)
                pending, after_equals = (), False
            else:
                after_equals = True
        elif char == "\\":
            try:
                current += next(chars)
            except StopIteration:
                raise ValueError("an endpoint string must not end with a backslash") from None
        else:
            current += char
    fields.append(pending + (current,))
    args = [f[0] for f in fields if len(f) == 1]
    kwargs = tuple((f[0], f[1]) for f in fields if len(f) == 2)
    return EndpointString(kind=args[0].lower(), args=tuple(args[1:]), kwargs=kwargs)


def check_endpoint(description: str) -> EndpointString:
    """Parse ``description`` and check what Twisted would only find out when binding
    (or would report with a traceback): port numbers and the backlog.

    Raises ``ValueError`` with a short reason.
    """
    parsed = parse_endpoint(description)
    port = parsed.port
    if parsed.kind in _INTERFACE:
        if port is None or not port.strip().isdigit():
            raise ValueError(f"port {port!r} is not a port number" if port else "no port given")
        if not 0 <= int(port) <= 65535:
            raise ValueError(f"port {int(port)} is out of range (0-65535)")
    backlog = parsed.backlog
    if backlog is not None and not (backlog.strip().isdigit() and int(backlog) > 0):
        raise ValueError(f"backlog {backlog!r} is not a positive number")
    return parsed


def with_backlog(description: str, backlog: int = DEFAULT_BACKLOG) -> str:
    """``description`` with ``:backlog=<backlog>`` added when it is a tcp, tcp6, ssl or
    unix string that gives no backlog; any other string comes back unchanged."""
    try:
        parsed = parse_endpoint(description)
    except ValueError:
        return description  # serverFromString will say what is wrong with it
    if parsed.kind not in _BACKLOG_POSITION or parsed.backlog is not None:
        return description
    return f"{description}:backlog={backlog}"


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (IPv4, IPv6, IPv4-mapped IPv6)."""
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]").split("%")[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def reachable_off_loopback(description: str) -> bool:
    """Whether a socket listening on ``description`` may accept connections from other
    hosts: an IP endpoint without ``interface=``, on a wildcard (``0.0.0.0``, ``::``) or
    on a non-loopback address.  Unix sockets are local.  Types this function does not
    know (``systemd:``, plugins) count as reachable: nothing says otherwise."""
    try:
        parsed = parse_endpoint(description)
    except ValueError:
        return True
    if parsed.kind == "unix":
        return False
    if parsed.kind not in _INTERFACE:
        return True
    return not is_loopback_host(parsed.interface or "")


def _socket_key(parsed: EndpointString) -> tuple[str, Any, str] | None:
    """What a listening socket occupies: ``("ip", port, interface)`` or
    ``("unix", path, "")``; None when it cannot collide (port 0, other types)."""
    if parsed.kind in _INTERFACE:
        port = int(parsed.port or 0)
        if port == 0:
            return None
        interface = parsed.interface or ""
        return ("ip", port, "*" if interface in _WILDCARDS else interface)
    if parsed.kind == "unix" and parsed.args:
        return ("unix", parsed.get("address", 0), "")
    return None


def shares_socket(first: str, second: str) -> bool:
    """Whether two endpoint strings would bind the same socket (same port on the same or
    a wildcard interface, or the same unix path)."""
    try:
        a, b = _socket_key(parse_endpoint(first)), _socket_key(parse_endpoint(second))
    except ValueError:
        return False
    if a is None or b is None or a[:2] != b[:2]:
        return False
    return a[2] == b[2] or "*" in (a[2], b[2])


def find_conflict(named: Iterable[tuple[str, str]]) -> str | None:
    """The first pair of ``(name, endpoint string)`` that would bind the same socket,
    as a message (``"listeners[0] and http both listen on port 2525"``), else None."""
    seen: list[tuple[str, str]] = []
    for name, description in named:
        for other_name, other in seen:
            if shares_socket(other, description):
                key = _socket_key(parse_endpoint(description))
                what = f"port {key[1]}" if key and key[0] == "ip" else f"unix socket {key[1] if key else description}"
                return f"{other_name} and {name} both listen on {what}"
        seen.append((name, description))
    return None


def describe_listen_error(exc: BaseException) -> str:
    """A short reason for a failure to listen, without a traceback."""
    if isinstance(exc, error.CannotListenError):
        inner = exc.socketError
        reason = getattr(inner, "strerror", None) or str(inner)
        return reason[:1].lower() + reason[1:] if reason else "cannot listen"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text


def endpoint_from_string(reactor: Any, description: str) -> Any:
    """``serverFromString`` for ``description`` with the default backlog added; any
    problem (unknown type, bad argument, unreadable key file) is a ``ValueError``."""
    check_endpoint(description)
    try:
        return endpoints.serverFromString(reactor, with_backlog(description))
    except Exception as e:  # operator input: unknown keys are TypeErrors, key files OSErrors
        raise ValueError(describe_listen_error(e)) from None


# ---------------------------------------------------------------------------------------
# listening


@define(eq=False)
class Listener:
    """One listening socket: where it is configured (``name``, for messages), the
    endpoint string as configured (``listen``: its identity across reloads), the
    factory, and for application listeners the route it serves."""

    name: str
    listen: str
    factory: Any
    route: Any = None
    port: Any = None  # the IListeningPort while listening

    @property
    def address(self) -> Any:
        """Where the port listens (``getHost()``), or None when it does not."""
        return self.port.getHost() if self.port is not None else None


def _where(address: Any) -> str:
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    if host is not None and port is not None:
        return host_port(host, port)
    return str(getattr(address, "name", None) or address)


def listen_now(reactor: Any, listener: Listener) -> Any:
    """Bind ``listener`` now and return its port, or raise :class:`StartupError`.

    Twisted's tcp, tcp6, ssl, unix and systemd endpoints listen synchronously; an
    endpoint that would answer later is refused, so start-up never goes on with a
    listener that may still fail.
    """
    where = f"{listener.name}: cannot listen on {listener.listen!r}"
    try:
        endpoint = endpoint_from_string(reactor, listener.listen)
    except ValueError as e:
        raise StartupError(f"{listener.name}: invalid endpoint string {listener.listen!r}: {e}") from None
    outcome: list[Any] = []
    d = endpoint.listen(listener.factory)
    d.addBoth(outcome.append)
    if not outcome:
        d.cancel()
        d.addErrback(lambda _: None)
        raise StartupError(f"{where}: this endpoint type does not listen at once (use tcp, tcp6, ssl or unix)")
    result = outcome[0]
    if isinstance(result, Failure):
        raise StartupError(f"{where}: {describe_listen_error(result.value)}")
    return result


class ListenerGroup(Service):
    """Listening ports that start and stop together, and can be replaced while running.

    Ports are bound in ``privilegedStartService`` (or ``startService`` when nobody called
    that: tests, services started late); the first that fails closes the others and
    raises :class:`StartupError`.  Stopping closes every port; connections already
    accepted are not touched (the gateway drains them).
    """

    def __init__(self, reactor: Any):
        self.reactor = reactor
        self._listeners: list[Listener] = []

    @property
    def listeners(self) -> tuple[Listener, ...]:
        return tuple(self._listeners)

    def add(self, listener: Listener) -> None:
        """Add ``listener``; it listens now when the group already does."""
        if self.running:
            self._open([listener])
        self._listeners.append(listener)

    def find(self, predicate: Callable[[Listener], bool]) -> Listener | None:
        return next((item for item in self._listeners if predicate(item)), None)

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._open(self._listeners)

    def startService(self) -> None:
        super().startService()
        self._open(self._listeners)

    def stopService(self) -> defer.Deferred:
        super().stopService()
        return self._close(self._listeners)

    def _open(self, listeners: Iterable[Listener]) -> None:
        opened = []
        try:
            for listener in listeners:
                if listener.port is None:
                    listener.port = listen_now(self.reactor, listener)
                    opened.append(listener)
        except StartupError:
            self._close(opened, quiet=True)
            raise
        for listener in opened:
            log.info("{listener}: listening on {address}", listener=listener.name, address=_where(listener.address))

    @staticmethod
    def _close(listeners: Iterable[Listener], quiet: bool = False) -> defer.Deferred:
        closing = []
        for listener in listeners:
            port, listener.port = listener.port, None
            if port is not None:
                if not quiet:
                    log.info("{listener}: no longer listening on {address}", listener=listener.name, address=_where(port.getHost()))
                closing.append(defer.maybeDeferred(port.stopListening))
        return defer.gatherResults(closing, consumeErrors=True).addCallback(lambda _: None)

    @defer.inlineCallbacks
    def replace(self, wanted: list[Listener], commit: Callable[[], None] | None = None):
        """Make the group ``wanted``: listeners are matched by their endpoint string;
        those kept keep their port (and take the new name, route and factory's route),
        removed ones stop accepting, new ones listen.  ``commit()`` runs right after the
        new ports are bound, before the reactor can accept on them.

        Fails with :class:`StartupError` (nothing changed) when a new listener cannot
        listen.  A new listener on the socket of a removed one (the same port, another
        endpoint string) can only bind once the old one is closed: then the removed
        listeners close first, and are opened again if a new one fails.
        """
        pairs, removed = self._match(wanted)
        added = [new for new, old in pairs if old is None]
        if not any(shares_socket(new.listen, old.listen) for new in added for old in removed):
            # The usual case: the new ports bind while everything runs as it was, so a
            # failure (a port another process holds) changes nothing at all.
            self._open(added)
            self._commit(pairs, commit)
            yield self._close(removed)
            return
        yield self._close(removed)
        try:
            self._open(added)
        except StartupError:
            for item in removed:
                try:
                    self._open([item])
                except StartupError as e:
                    log.error("{listener} could not be reopened: {error}", listener=item.name, error=str(e))
            raise
        self._commit(pairs, commit)

    def _match(self, wanted: list[Listener]) -> tuple[list[tuple[Listener, Listener | None]], list[Listener]]:
        """Each wanted listener with the running one it keeps (None: a new one), and the
        running ones no wanted listener keeps.  Listeners are matched by endpoint
        string, in order: two with the same string (``tcp:0``) are two listeners."""
        running: dict[str, list[Listener]] = {}
        for item in self._listeners:
            running.setdefault(item.listen, []).append(item)
        pairs = [(item, running[item.listen].pop(0) if running.get(item.listen) else None) for item in wanted]
        return pairs, [item for left in running.values() for item in left]

    def _commit(self, pairs: list[tuple[Listener, Listener | None]], commit: Callable[[], None] | None) -> None:
        # Runs in the same reactor turn as the binding: the new ports cannot have
        # accepted a connection before the configuration they serve is in place.
        result = []
        for item, old in pairs:
            if old is None:
                result.append(item)
                continue
            old.name, old.route = item.name, item.route
            if hasattr(old.factory, "route"):
                old.factory.route = item.route  # the next connection serves the new route
            result.append(old)
        self._listeners = result
        if commit is not None:
            commit()
