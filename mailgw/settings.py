"""Values every layer shares: what a listener serves, and the session timeouts and limits.

Kept at the bottom of the house (attrs only) so that the configuration, the sessions,
the protocol machines' glue and Kubernetes mode can all use them without importing
each other.
"""

from __future__ import annotations

from typing import Any

from attrs import field, frozen


@frozen
class Route:
    """What a listener serves: the name its destination source looks up, and a tenant.

    In standalone mode ``destination`` is the destination's ``Name``; in Kubernetes
    mode it is the key of the CR's route (``namespace/cr[/tenant]``).

    ``source``, when set, is the destination source of this listener's sessions, asked
    instead of the gateway's: Kubernetes mode gives each listener its own, so a session
    keeps it after its listener has closed (a drain, a CR deleted).  It takes no part in
    equality.
    """

    destination: str
    tenant: str | None = None
    source: Any = field(default=None, eq=False, repr=False)

    def __str__(self) -> str:
        return self.destination + (f"/{self.tenant}" if self.tenant else "")


@frozen
class Settings:
    """Timeouts (seconds) and limits that apply to every session (gateway.yaml
    ``timeouts:`` and ``limits:``)."""

    connect_timeout: float = 10.0
    tls_timeout: float = 10.0
    login_timeout: float = 30.0  # from accept until the upstream is ready
    idle_timeout: float = 300.0  # application silent before release
    dialogue_timeout: float = 120.0  # greeting to release, however the application trickles
    relay_idle_timeout: float = 1800.0  # after release; long enough for IMAP IDLE
    token_timeout: float = 10.0  # each token request as a whole
    drain_timeout: float = 30.0  # SIGTERM: how long open sessions may go on
    max_line: int = 16384  # application command line before release
    max_sessions_per_destination: int = 1000
    max_sessions_per_client: int = 100  # open sessions per client IP address (UNIX sockets: none)
    max_token_requests: int = 8  # concurrent token requests, all destinations together
    hostname: str = "mailgw"
