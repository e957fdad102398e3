"""SOCKS5 client handshake (RFC 1928, RFC 1929 and the connectivity proxy's method 0x80).

Sans-IO like every machine in this package: :class:`SOCKS5Client` turns bytes from the
proxy into actions and never touches a socket.  The glue (``mailgw.endpoints.socks5``)
writes :class:`~mailgw.protocol.actions.SendUpstream` data to the proxy and, on
:class:`SOCKSConnected`, hands the connection (and its ``leftover`` bytes) to the
application protocol.

The target is always sent as a domain name (ATYP 0x03) so that name resolution happens
behind the proxy, which is the only place an on-premise host name means anything.

Every failure raises a subclass of :class:`SOCKSError`.  Messages name the target and
the step that failed but never the password, the JWT or raw proxy bytes.
"""

from __future__ import annotations

import base64
import enum
import ipaddress
import struct
from typing import Literal, Union

from attrs import field, frozen

from .actions import ProtocolError, SendUpstream

__all__ = [
    "SOCKS5Client",
    "SOCKSConnected",
    "SOCKSError",
    "SOCKSConfigurationError",
    "DomainNameTooLong",
    "MalformedReply",
    "NoAcceptableMethod",
    "UnexpectedMethod",
    "SOCKSAuthenticationError",
    "UserPassRejected",
    "SAPAuthRejected",
    "SOCKSReplyError",
    "GeneralFailure",
    "ConnectionNotAllowed",
    "NetworkUnreachable",
    "HostUnreachable",
    "ConnectionRefused",
    "TTLExpired",
    "CommandNotSupported",
    "AddressTypeNotSupported",
    "UnknownReplyCode",
    "METHOD_NONE",
    "METHOD_USERPASS",
    "METHOD_SAP",
]

Method = Literal["none", "userpass", "sap"]

METHOD_NONE = 0x00
METHOD_USERPASS = 0x02
METHOD_SAP = 0x80
METHOD_NO_ACCEPTABLE = 0xFF

_METHOD_CODES: dict[str, int] = {
    "none": METHOD_NONE,
    "userpass": METHOD_USERPASS,
    "sap": METHOD_SAP,
}
_METHOD_NAMES = {code: name for name, code in _METHOD_CODES.items()}

_ATYP_IPV4 = 0x01
_ATYP_DOMAIN = 0x03
_ATYP_IPV6 = 0x04

#: The longest reply the handshake ever waits for: a CONNECT reply with a 255-byte
#: domain name (4 header + 1 length + 255 + 2 port).  Unconsumed bytes never exceed it.
MAX_REPLY = 4 + 1 + 255 + 2


# --------------------------------------------------------------------------- errors


class SOCKSError(ProtocolError):
    """The SOCKS5 handshake failed.  The message is safe to log and to show."""


class SOCKSConfigurationError(SOCKSError, ValueError):
    """The handshake cannot even be started with these parameters."""


class DomainNameTooLong(SOCKSConfigurationError):
    """The target host name does not fit SOCKS5's one-byte length (255 bytes)."""


class MalformedReply(SOCKSError):
    """The proxy sent bytes that are not a valid SOCKS5 reply at this point."""


class NoAcceptableMethod(SOCKSError):
    """The proxy accepts none of the authentication methods we offered (0xFF)."""


class UnexpectedMethod(SOCKSError):
    """The proxy picked an authentication method we did not offer."""


class SOCKSAuthenticationError(SOCKSError):
    """The proxy refused our credentials."""


class UserPassRejected(SOCKSAuthenticationError):
    """RFC 1929 username/password authentication failed."""


class SAPAuthRejected(SOCKSAuthenticationError):
    """The connectivity proxy refused the JWT / location id (method 0x80)."""


class SOCKSReplyError(SOCKSError):
    """The proxy refused the CONNECT request; ``code`` is the RFC 1928 REP field."""

    code: int = -1

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code


class GeneralFailure(SOCKSReplyError):
    code = 0x01


class ConnectionNotAllowed(SOCKSReplyError):
    code = 0x02


class NetworkUnreachable(SOCKSReplyError):
    code = 0x03


class HostUnreachable(SOCKSReplyError):
    code = 0x04


class ConnectionRefused(SOCKSReplyError):
    code = 0x05


class TTLExpired(SOCKSReplyError):
    code = 0x06


class CommandNotSupported(SOCKSReplyError):
    code = 0x07


class AddressTypeNotSupported(SOCKSReplyError):
    code = 0x08


class UnknownReplyCode(SOCKSReplyError):
    """A REP value outside RFC 1928's table."""


# code -> (class, message template); {target} is "host:port".
_REPLY_ERRORS: dict[int, tuple[type[SOCKSReplyError], str]] = {
    0x01: (GeneralFailure, "SOCKS5 proxy: general failure connecting to {target} (0x01)"),
    0x02: (
        ConnectionNotAllowed,
        "connectivity proxy: no access mapping for {target} "
        "(connection not allowed by ruleset, 0x02)",
    ),
    0x03: (
        NetworkUnreachable,
        "connectivity proxy: connector unreachable or unknown location for {target} "
        "(network unreachable, 0x03)",
    ),
    0x04: (HostUnreachable, "SOCKS5 proxy: host unreachable: {target} (0x04)"),
    0x05: (
        ConnectionRefused,
        "SOCKS5 proxy: connection to {target} refused, or authentication at the "
        "connector failed (0x05)",
    ),
    0x06: (TTLExpired, "SOCKS5 proxy: TTL expired connecting to {target} (0x06)"),
    0x07: (CommandNotSupported, "SOCKS5 proxy: CONNECT command not supported (0x07)"),
    0x08: (
        AddressTypeNotSupported,
        "SOCKS5 proxy: address type not supported (domain name target {target}, 0x08)",
    ),
}


def reply_error(code: int, target: str) -> SOCKSReplyError:
    """The typed error for a CONNECT reply code (``code`` must not be 0)."""
    try:
        cls, template = _REPLY_ERRORS[code]
    except KeyError:
        return UnknownReplyCode(
            f"SOCKS5 proxy refused the connection to {target} with unknown reply code "
            f"0x{code:02x}",
            code,
        )
    return cls(template.format(target=target))


# --------------------------------------------------------------------------- actions


@frozen
class SOCKSConnected:
    """The proxy has connected the tunnel; the connection now belongs to the application.

    ``bound_host``/``bound_port`` are the proxy's BND.ADDR/BND.PORT (informational).
    ``leftover`` holds bytes the proxy sent after its CONNECT reply — the target's first
    bytes, e.g. a greeting — and must be handed to the application protocol at once.
    """

    bound_host: str
    bound_port: int
    leftover: bytes = field(default=b"", repr=False)


SOCKSAction = Union[SendUpstream, SOCKSConnected]


# --------------------------------------------------------------------------- machine


class _State(enum.Enum):
    INITIAL = "not started"
    METHOD = "waiting for the method selection"
    USERPASS = "waiting for the username/password reply"
    SAP = "waiting for the connectivity proxy's authentication reply"
    CONNECT = "waiting for the CONNECT reply"
    CONNECTED = "connected"
    FAILED = "failed"


def _encode_host(host: str) -> bytes:
    if not host:
        raise SOCKSConfigurationError("SOCKS5 target host name is empty")
    try:
        raw = host.encode("ascii")
    except UnicodeEncodeError:
        try:
            raw = host.encode("idna")
        except UnicodeError:
            raise SOCKSConfigurationError(
                f"SOCKS5 target host name {host!r} is not a valid domain name"
            ) from None
    if len(raw) > 255:
        raise DomainNameTooLong(
            f"SOCKS5 target host name is {len(raw)} bytes long; at most 255 fit "
            f"(starts with {host[:40]!r})"
        )
    return raw


def userpass_request(username: str | None, password: str | None) -> bytes:
    """The RFC 1929 username/password request; :class:`SOCKSConfigurationError` when the
    pair cannot be sent (the configuration checks it with this at start-up)."""
    if username is None or password is None:
        raise SOCKSConfigurationError("SOCKS5 username/password method needs a username and a password")
    user = username.encode("utf-8")
    pw = password.encode("utf-8")
    if not 0 < len(user) < 256:
        raise SOCKSConfigurationError("SOCKS5 username must be 1 to 255 bytes")
    if not 0 < len(pw) < 256:
        raise SOCKSConfigurationError("SOCKS5 password must be 1 to 255 bytes")
    return bytes([0x01, len(user)]) + user + bytes([len(pw)]) + pw


class SOCKS5Client:
    """Client side of one SOCKS5 CONNECT handshake.

    Use::

        machine = SOCKS5Client("mail.corp", 143, method="sap", jwt=token,
                               location_id="loc1")
        send_to_proxy(machine.start())
        for each chunk from the proxy:
            for action in machine.receive(chunk):
                SendUpstream  -> write action.data to the proxy
                SOCKSConnected -> done: hand over, deliver action.leftover

    ``receive`` raises a :class:`SOCKSError` subclass on any refusal or malformed
    reply; after that (or after success) the machine accepts no more data.

    Only the configured method is offered.  Between ``receive`` calls the machine never
    holds more than :data:`MAX_REPLY` unparsed bytes: before a phase's reply is
    complete it needs fewer, and bytes the proxy could not legitimately have sent yet
    (anything after a method or authentication reply, before our next request) are
    rejected as malformed.
    """

    def __init__(
        self,
        host: str,
        port: int,
        method: Method = "none",
        username: str | None = None,
        password: str | None = None,
        jwt: str | None = None,
        location_id: str | None = None,
    ):
        if method not in _METHOD_CODES:
            raise SOCKSConfigurationError(
                f"unknown SOCKS5 method {method!r}; expected none, userpass or sap"
            )
        if not isinstance(port, int) or not 0 < port < 65536:
            raise SOCKSConfigurationError(f"SOCKS5 target port {port!r} is out of range")
        self.host = host
        self.port = port
        self.method: Method = method
        self.username = username
        self.location_id = location_id
        self.host_bytes = _encode_host(host)
        self._auth_request = self._build_auth_request(method, username, password, jwt,
                                                      location_id)
        self._state = _State.INITIAL
        self._buffer = bytearray()
        self.bound_host: str | None = None
        self.bound_port: int | None = None
        #: Bytes after the CONNECT reply, set once connected.
        self.leftover = b""

    # -- construction helpers

    @staticmethod
    def _build_auth_request(
        method: str,
        username: str | None,
        password: str | None,
        jwt: str | None,
        location_id: str | None,
    ) -> bytes:
        if method == "userpass":
            return userpass_request(username, password)
        if method == "sap":
            if not jwt:
                raise SOCKSConfigurationError(
                    "connectivity proxy method 0x80 needs a JWT (none was given)"
                )
            token = jwt.encode("utf-8")
            if len(token) > 0xFFFFFFFF:
                raise SOCKSConfigurationError("connectivity proxy JWT is too long")
            if location_id:
                loc = base64.b64encode(location_id.encode("utf-8"))
                if len(loc) > 255:
                    raise SOCKSConfigurationError(
                        "CloudConnectorLocationId is too long: its base64 form must fit "
                        "255 bytes"
                    )
            else:
                loc = b""
            return b"\x01" + struct.pack(">I", len(token)) + token + bytes([len(loc)]) + loc
        return b""

    # -- public API

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def state(self) -> str:
        """Where the handshake is, in words (for timeouts and lost-connection messages)."""
        return self._state.value

    @property
    def connected(self) -> bool:
        return self._state is _State.CONNECTED

    @property
    def buffered(self) -> int:
        """Number of received bytes not yet consumed (bounded by :data:`MAX_REPLY`)."""
        return len(self._buffer)

    def start(self) -> bytes:
        """The greeting (version and offered method) to send once the proxy is reached."""
        if self._state is not _State.INITIAL:
            raise RuntimeError("SOCKS5Client.start() called twice")
        self._state = _State.METHOD
        return bytes([0x05, 0x01, _METHOD_CODES[self.method]])

    def receive(self, data: bytes) -> list[SOCKSAction]:
        """Feed bytes from the proxy; returns what to do next.

        Raises a :class:`SOCKSError` subclass when the proxy refuses or misbehaves.
        """
        if self._state is _State.INITIAL:
            raise RuntimeError("SOCKS5Client.receive() before start()")
        if self._state in (_State.CONNECTED, _State.FAILED):
            raise RuntimeError(f"SOCKS5Client.receive() after the handshake {self.state}")
        self._buffer += data
        try:
            return self._advance()
        except SOCKSError:
            self._state = _State.FAILED
            self._buffer.clear()
            raise

    # -- state machine

    def _advance(self) -> list[SOCKSAction]:
        if self._state is _State.METHOD:
            step = self._on_method()
        elif self._state is _State.USERPASS:
            step = self._on_auth_reply(UserPassRejected, "username/password")
        elif self._state is _State.SAP:
            step = self._on_auth_reply(SAPAuthRejected, "connectivity proxy")
        else:
            step = self._on_connect_reply()
        if step is None:
            return []
        if isinstance(step, SendUpstream):
            # We just produced a request: the proxy cannot have answered it yet.
            self._no_early_bytes()
        return [step]

    def _no_early_bytes(self) -> None:
        if self._buffer:
            raise MalformedReply(
                f"SOCKS5 proxy sent {len(self._buffer)} unexpected byte(s) before our "
                f"request (while {self.state})"
            )

    def _connect_request(self) -> SendUpstream:
        self._state = _State.CONNECT
        return SendUpstream(
            bytes([0x05, 0x01, 0x00, _ATYP_DOMAIN, len(self.host_bytes)])
            + self.host_bytes
            + struct.pack(">H", self.port)
        )

    def _check_version(self, expected: int, what: str) -> None:
        if self._buffer[0] != expected:
            raise MalformedReply(
                f"SOCKS5 proxy sent a malformed {what}: version byte 0x{self._buffer[0]:02x}"
                f", expected 0x{expected:02x} (is this a SOCKS5 proxy?)"
            )

    def _on_method(self) -> SendUpstream | None:
        if self._buffer:
            self._check_version(0x05, "method selection")
        if len(self._buffer) < 2:
            return None
        chosen = self._buffer[1]
        del self._buffer[:2]
        offered = _METHOD_CODES[self.method]
        if chosen == METHOD_NO_ACCEPTABLE:
            raise NoAcceptableMethod(
                f"SOCKS5 proxy accepts none of the offered authentication methods "
                f"({self.method}, 0x{offered:02x})"
            )
        if chosen != offered:
            name = _METHOD_NAMES.get(chosen, "unknown")
            raise UnexpectedMethod(
                f"SOCKS5 proxy chose authentication method 0x{chosen:02x} ({name}), "
                f"but we offered only 0x{offered:02x} ({self.method})"
            )
        if chosen == METHOD_USERPASS:
            self._state = _State.USERPASS
            return SendUpstream(self._auth_request)
        if chosen == METHOD_SAP:
            self._state = _State.SAP
            return SendUpstream(self._auth_request)
        return self._connect_request()

    def _on_auth_reply(
        self, rejected: type[SOCKSAuthenticationError], what: str
    ) -> SendUpstream | None:
        if self._buffer:
            self._check_version(0x01, f"{what} authentication reply")
        if len(self._buffer) < 2:
            return None
        status = self._buffer[1]
        del self._buffer[:2]
        if status != 0x00:
            if rejected is UserPassRejected:
                message = (
                    f"SOCKS5 proxy rejected the username/password for user "
                    f"{self.username!r} (status 0x{status:02x})"
                )
            else:
                message = (
                    f"connectivity proxy rejected the authentication (JWT or location id"
                    f", status 0x{status:02x})"
                )
            raise rejected(message)
        return self._connect_request()

    def _on_connect_reply(self) -> SOCKSConnected | None:
        buf = self._buffer
        if buf:
            self._check_version(0x05, "CONNECT reply")
        if len(buf) < 2:
            return None
        if buf[1] != 0x00:
            # Refusals are reported at once: many proxies close right after REP, so
            # waiting for a complete BND.ADDR would turn a clear answer into "lost".
            raise reply_error(buf[1], self.target)
        if len(buf) < 3:
            return None
        if buf[2] != 0x00:
            raise MalformedReply(
                f"SOCKS5 proxy sent a malformed CONNECT reply: reserved byte "
                f"0x{buf[2]:02x}, expected 0x00"
            )
        if len(buf) < 4:
            return None
        atyp = buf[3]
        if atyp == _ATYP_IPV4:
            start, addr_len = 4, 4
        elif atyp == _ATYP_IPV6:
            start, addr_len = 4, 16
        elif atyp == _ATYP_DOMAIN:
            if len(buf) < 5:
                return None
            start, addr_len = 5, buf[4]
        else:
            raise MalformedReply(
                f"SOCKS5 proxy sent a malformed CONNECT reply: unknown address type "
                f"0x{atyp:02x}"
            )
        end = start + addr_len + 2
        if len(buf) < end:
            return None
        raw = bytes(buf[start : start + addr_len])
        if atyp == _ATYP_IPV4:
            bound_host = str(ipaddress.IPv4Address(raw))
        elif atyp == _ATYP_IPV6:
            bound_host = str(ipaddress.IPv6Address(raw))
        else:
            bound_host = raw.decode("ascii", "replace")
        (bound_port,) = struct.unpack(">H", buf[end - 2 : end])
        self.leftover = bytes(buf[end:])
        buf.clear()
        self.bound_host = bound_host
        self.bound_port = bound_port
        self._state = _State.CONNECTED
        return SOCKSConnected(bound_host, bound_port, self.leftover)

    def __repr__(self) -> str:
        return (
            f"<SOCKS5Client target={self.target} method={self.method} "
            f"state={self.state!r}>"
        )
