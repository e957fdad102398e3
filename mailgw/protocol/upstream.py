"""What every upstream login machine shares (SMTP, IMAP, POP3).

The TLS policy, the life cycle (``start``, ``tls_established``, ``authenticate`` for the
lazy OAuth2 types), the bytes that arrive after login and how failures and refusals are
reported.  Each protocol supplies ``_after_starttls()`` (ask for capabilities again) and
``_login()`` (start its login exchange with ``self.credentials``).
"""

from __future__ import annotations

from .actions import LoginRefused, ProtocolError, StartTLS, UpstreamFailed
from .common import UpstreamBuffer
from .credentials import Credentials

#: Plaintext after the STARTTLS go-ahead would be read as if it came through the TLS
#: tunnel: a command/response-injection attack (CVE-2011-0411 and kin).
INJECTION = "upstream sent data before the TLS handshake (possible STARTTLS injection)"


class UpstreamMachine:
    """Base of the upstream machines.  ``credentials=None`` means no login
    (NoAuthentication), unless ``login_later`` is set: then the machine stops after TLS
    and capability discovery with ``UpstreamConnected`` and :meth:`authenticate` logs
    in later, as often as needed, each attempt ending in ``UpstreamReady`` or
    ``LoginRefused``."""

    def __init__(
        self,
        *,
        implicit_tls: bool,
        starttls_enable: bool = True,
        starttls_required: bool = False,
        credentials: Credentials | None = None,
        login_later: bool = False,
    ):
        self.implicit_tls = implicit_tls
        self.login_later = login_later and credentials is None
        self.starttls_enable = starttls_enable and not implicit_tls
        self.starttls_required = starttls_required and not implicit_tls
        self.credentials = credentials
        self.tls_active = False
        self._state = "new"  # until start(): the glue calls it once the connection is up
        self._pending = UpstreamBuffer()

    def start(self) -> list:
        """Actions to take as soon as the connection is up."""
        # With implicit TLS nothing may arrive before the handshake completes.
        self._state = "implicit-tls" if self.implicit_tls else "greeting"
        return [StartTLS()] if self.implicit_tls else []

    def _outside_login(self, data: bytes) -> list | None:
        """The actions for bytes that arrive while no login dialogue runs (before start,
        between the STARTTLS go-ahead and the handshake, after login or failure); None
        while it runs and the protocol should parse them."""
        if self._state == "ready":
            if self._pending.add(data):
                return []
            return self._fail("upstream sent too much unsolicited data", permanent=False)
        if self._state == "failed":
            return []
        if self._state in ("implicit-tls", "tls-handshake"):
            return self._fail(INJECTION)
        if self._state == "new":
            return self._fail("upstream data before the session started")
        return None

    def tls_established(self) -> list:
        self.tls_active = True
        if self._state == "implicit-tls":
            self._state = "greeting"
            return []
        if self._state == "tls-handshake":
            return self._after_starttls()
        raise ProtocolError(f"TLS completed in unexpected state {self._state}")

    def authenticate(self, credentials: Credentials) -> list:
        """Log in now with ``credentials`` (``login_later`` mode, after
        ``UpstreamConnected`` or ``LoginRefused``)."""
        if not self.login_later or self._state != "awaiting-login":
            raise ProtocolError(f"authenticate() in state {self._state}")
        self.credentials = credentials
        return self._login()

    def take_pending(self) -> bytes:
        """Upstream bytes that arrived after login, for the application at release."""
        return self._pending.take()

    def _fail(self, reason: str, permanent: bool = True) -> list:
        self._state = "failed"
        return [UpstreamFailed(reason, permanent=permanent)]

    def _refused(self, reason: str) -> list:
        """A login attempt failed: fatal when eager, retryable when ``login_later``."""
        if not self.login_later:
            return self._fail(reason)
        self._state, self.credentials = "awaiting-login", None
        return [LoginRefused(reason)]

    def _after_starttls(self) -> list:  # pragma: no cover - abstract
        raise NotImplementedError

    def _login(self) -> list:  # pragma: no cover - abstract
        raise NotImplementedError
