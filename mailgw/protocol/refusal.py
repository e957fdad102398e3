"""Why a session was refused: the one place that pairs a refusal's text with its class.

Every refusal the application sees is a :class:`Refusal`; its ``reason`` is the label
it is counted under in ``mailgw_sessions_refused_total`` and written in the audit log,
so the text and the class cannot drift apart.
"""

from __future__ import annotations

import enum

from attrs import frozen


class Reason(str, enum.Enum):
    """The classes of SPEC 9.2 ``mailgw_sessions_refused_total{reason}``."""

    CONNECT = "connect"  # refused, closed or unreachable upstream
    DNS = "dns"  # the upstream's host name does not resolve
    TLS = "tls"  # handshake failed, STARTTLS missing, refused or attacked
    CERTIFICATE = "certificate"  # chain or host name check failed
    AUTH = "auth"  # the upstream refused our credentials, or offers no usable mechanism
    TIMEOUT = "timeout"  # connect, handshake or login took too long
    LIMIT = "limit"  # too many sessions for the destination or the client
    TOKEN = "token"  # the token service refused or failed
    PROXY = "proxy"  # the SOCKS5 connectivity proxy refused or failed
    PROTOCOL = "protocol"  # a peer broke its protocol (either side)
    SHUTDOWN = "shutdown"  # the gateway is draining
    INTERNAL = "internal"  # a bug of ours

    def __str__(self) -> str:
        return self.value


@frozen
class Refusal:
    """A refusal as the application reads it (``text``, never a secret), whether a retry
    may help (``permanent``), and the class it counts under."""

    text: str
    reason: Reason
    permanent: bool = True
