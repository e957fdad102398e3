"""What every upstream login machine shares (SMTP, IMAP, POP3).

The TLS policy, the life cycle (``start``, ``tls_established``, ``authenticate`` for the
lazy OAuth2 types, ``receive_eof``), the SASL login (which mechanism, what to send on
each continuation, the bearer error challenge), the bytes that arrive after login, and
how failures and refusals are reported.  Each protocol supplies how a response is read
and what a command looks like: ``self._reader`` (a :class:`~mailgw.protocol.lines.LineReader`
whose ``next()`` gives the next complete response, or None, and raises ProtocolError
when it is malformed), ``_on_response()``, ``_after_starttls()`` (ask for capabilities again), ``_offered()`` (the SASL mechanisms
on offer), ``SASL_COMMAND``, ``_takes_initial_response()`` and ``_send_step()`` (the
protocol's AUTH command and its continuation lines) and ``_login_without_sasl()`` (IMAP
LOGIN, POP3 USER/PASS).
"""

from __future__ import annotations

import enum
from attrs import field, frozen

from . import sasl
from .actions import LoginRefused, MisuseError, ProtocolError, SendUpstream, StartTLS, UpstreamAwaitingLogin, UpstreamFailed, UpstreamReady
from .common import UpstreamBuffer, printable
from .lines import LineTooLong
from .credentials import BearerToken, Credentials, Password
from .refusal import Reason

CRLF = b"\r\n"

#: Plaintext after the STARTTLS go-ahead would be read as if it came through the TLS
#: tunnel: a command/response-injection attack (CVE-2011-0411 and kin).
INJECTION = "upstream sent data before the TLS handshake (possible STARTTLS injection)"

#: Mechanisms the gateway logs in with, best first.
PASSWORD_MECHANISMS = ("PLAIN", "LOGIN")
BEARER_MECHANISMS = ("XOAUTH2", "OAUTHBEARER")


class Step(enum.Enum):
    """Where an upstream machine is.  Each protocol uses the subset it needs."""

    NEW = "new"  # before start(): the connection is not up yet
    IMPLICIT_TLS = "implicit-tls"  # handshake first, nothing may arrive
    GREETING = "greeting"
    CAPABILITIES = "capabilities"  # EHLO / CAPABILITY / CAPA
    HELO = "helo"  # SMTP servers that refuse EHLO
    STARTTLS = "starttls"  # STARTTLS / STLS sent
    TLS_HANDSHAKE = "tls-handshake"  # go-ahead received, handshake running
    LOGIN = "login"  # AUTH / AUTHENTICATE / LOGIN sent
    USER = "user"  # POP3 USER sent
    PASS = "pass"  # POP3 PASS sent
    CAPABILITIES_AFTER_LOGIN = "capabilities-after-login"
    AWAITING_LOGIN = "awaiting-login"  # lazy types: waiting for the application's secret
    READY = "ready"
    PING = "ping"  # a warm pooled connection's health check (NOOP) is running
    FAILED = "failed"


class LoginImpossible(Exception):
    """The credentials cannot be carried by the chosen mechanism (safe message)."""


@frozen
class SASLStart:
    """How to log in with a SASL mechanism: the initial response (base64, or ``None``
    when the mechanism has none), the answers to further continuations in order, and
    the answer to a bearer error challenge (``None``: the mechanism has none)."""

    mechanism: str
    initial: bytes | None = field(repr=False)
    steps: tuple[bytes, ...] = field(default=(), repr=False)
    error_reply: bytes | None = field(default=None, repr=False)


def sasl_start(credentials: Credentials, offered: set[str]) -> SASLStart | None:
    """The SASL login for ``credentials`` with what the upstream ``offered``: PLAIN, else
    LOGIN for a password; XOAUTH2, else OAUTHBEARER for a token.  ``None`` when none of
    those is offered; :class:`LoginImpossible` when the credentials cannot be sent."""
    if isinstance(credentials, Password):
        user, password = credentials.user, credentials.password
        if "PLAIN" in offered:
            try:
                return SASLStart("PLAIN", sasl.plain_initial_response(user, password))
            except sasl.SASLError:
                raise LoginImpossible("the configured user or password contains NUL, which PLAIN cannot carry") from None
        if "LOGIN" in offered:
            user_b64, password_b64 = sasl.encode_login(user, password)
            return SASLStart("LOGIN", None, (user_b64, password_b64))
        return None
    if isinstance(credentials, BearerToken):
        for mechanism in BEARER_MECHANISMS:
            if mechanism in offered:
                try:
                    if mechanism == "XOAUTH2":
                        initial = sasl.xoauth2_initial_response(credentials.user, credentials.token)
                    else:
                        initial = sasl.oauthbearer_initial_response(credentials.user, credentials.token)
                except sasl.SASLError:
                    raise LoginImpossible(f"the access token or user cannot be sent with {mechanism}") from None
                return SASLStart(mechanism, initial, (), sasl.error_challenge_reply(mechanism))
        return None
    raise MisuseError(f"unknown credentials type {type(credentials).__name__}")


def no_mechanism(credentials: Credentials | None, offered: set[str]) -> str:
    """Why the login cannot start: the upstream offers nothing we can use."""
    wanted = " or ".join(PASSWORD_MECHANISMS if isinstance(credentials, Password) else BEARER_MECHANISMS)
    if not offered:
        return f"upstream offers no {wanted} authentication (it offers none)"
    return f"upstream offers no {wanted} authentication (offers {' '.join(sorted(offered))})"


class UpstreamMachine:
    """Base of the upstream machines.

    ``credentials=None`` means no login (NoAuthentication), unless ``lazy`` is set: then
    the machine stops after TLS and capability discovery with
    :class:`UpstreamAwaitingLogin` and :meth:`authenticate` logs in later, as often as
    needed, each attempt ending in :class:`UpstreamReady` or :class:`LoginRefused`.
    """

    #: Upstream bytes kept between login and release (a server's unsolicited data).
    PENDING_LIMIT = 65536

    def __init__(
        self,
        *,
        implicit_tls: bool,
        starttls_enable: bool = True,
        starttls_required: bool = False,
        credentials: Credentials | None = None,
        lazy: bool = False,
    ):
        self.implicit_tls = implicit_tls
        self.lazy = lazy and credentials is None
        self.starttls_enable = starttls_enable and not implicit_tls
        self.starttls_required = starttls_required and not implicit_tls
        self.credentials = credentials
        self.tls_active = False
        #: what the server offers: SMTP EHLO extension lines, IMAP capability atoms,
        #: POP3 CAPA lines (as ``str``); once READY, the post-login ones
        self.capabilities: tuple[str, ...] = ()
        self.step = Step.NEW
        self._pending = UpstreamBuffer(self.PENDING_LIMIT)
        self._sasl: SASLStart | None = None
        self._steps: list[bytes] = []  # answers still to give to continuations
        self._token_status: str | None = None  # from a bearer error challenge

    # -- the glue's calls --------------------------------------------------------------

    def start(self) -> list:
        """Actions to take as soon as the connection is up."""
        self._expect(Step.NEW)
        # With implicit TLS nothing may arrive before the handshake completes.
        self.step = Step.IMPLICIT_TLS if self.implicit_tls else Step.GREETING
        return [StartTLS()] if self.implicit_tls else []

    def receive(self, data: bytes) -> list:
        """Bytes from the upstream."""
        if self.step is Step.READY:
            if self._pending.add(data):
                return []
            return self._fail("upstream sent too much unsolicited data", permanent=False)
        if self.step is Step.FAILED:
            return []
        if self.step in (Step.IMPLICIT_TLS, Step.TLS_HANDSHAKE):
            return self._fail(INJECTION, kind=Reason.TLS)
        if self.step is Step.NEW:
            return self._fail("upstream data before the session started")
        self._reader.feed(data)
        actions: list = []
        while True:
            try:
                response = self._reader.next()
            except LineTooLong as e:
                return actions + self._fail(f"upstream sent a {e}")
            except ProtocolError as e:
                return actions + self._fail(str(e))
            if response is None:
                return actions
            actions += self._on_response(response)
            if self.step is Step.TLS_HANDSHAKE and len(self._reader):
                return actions + self._fail(INJECTION, kind=Reason.TLS)
            if self.step is Step.FAILED:
                return actions
            if self.step is Step.READY:
                return actions + self._keep_after_ready(self._reader.take_rest())

    def receive_eof(self) -> list:
        """The upstream closed the connection (before release)."""
        if self.step in (Step.FAILED, Step.NEW):
            return []
        doing = {
            Step.READY: "after the login",
            Step.AWAITING_LOGIN: "while waiting for the application to authenticate",
        }.get(self.step, f"during the login ({self.step.value})")
        return self._fail(f"upstream closed the connection {doing}", permanent=False, kind=Reason.CONNECT)

    def tls_established(self) -> list:
        self._expect(Step.IMPLICIT_TLS, Step.TLS_HANDSHAKE)
        self.tls_active = True
        if self.step is Step.IMPLICIT_TLS:
            self.step = Step.GREETING
            return []
        return self._after_starttls()

    def authenticate(self, credentials: Credentials) -> list:
        """Log in now with ``credentials`` (lazy mode, after :class:`UpstreamAwaitingLogin`
        or :class:`LoginRefused`)."""
        if not self.lazy:
            raise MisuseError("authenticate() on a machine that logs in by itself")
        self._expect(Step.AWAITING_LOGIN)
        self.credentials = credentials
        return self._login()

    def ping(self) -> list:
        """Check an idle, logged-in connection (a warm pool's): NOOP, then
        :class:`UpstreamReady` again, or :class:`UpstreamFailed`.  A connection that sent
        anything unasked while idle is not healthy: its bytes would reach an application
        that never asked for them."""
        self._expect(Step.READY)
        if len(self._pending):
            return self._fail("upstream sent unsolicited data while idle", permanent=False, kind=Reason.CONNECT)
        self.step = Step.PING
        return self._send_ping()

    def logout(self) -> list:
        """The application ended its session before release: end a logged-in upstream
        session with the protocol's own goodbye (QUIT, IMAP's LOGOUT), so the server
        sees a session that ended, not a lost connection.  Its answer is not awaited:
        the connection closes after it."""
        if self.step is not Step.READY:
            return []
        self.step = Step.FAILED  # nothing more is read or sent
        return [SendUpstream(self._tagged(self.LOGOUT_COMMAND) + CRLF)]

    def _command(self, step: Step, text: bytes) -> list:
        """Send the command ``text`` and wait for its answer in ``step``."""
        self.step = step
        return [SendUpstream(self._tagged(text) + CRLF)]

    def _tagged(self, text: bytes) -> bytes:
        """The command line as sent (IMAP puts a fresh tag before it)."""
        return text

    def _send_step(self, data: bytes) -> list:
        """A continuation line of a SASL exchange."""
        return [SendUpstream(data + CRLF)]

    def _ask_capabilities(self) -> list:
        return self._command(Step.CAPABILITIES, self.CAPABILITY_COMMAND)

    def _after_starttls(self) -> list:
        self.capabilities = ()  # RFC 3207, 3501 6.2.1, 2595: forget what was said in plaintext
        return self._ask_capabilities()

    def _send_starttls(self) -> list:
        return self._command(Step.STARTTLS, self.STARTTLS_VERB.encode("ascii"))

    def _send_ping(self) -> list:
        return self._command(Step.PING, b"NOOP")

    def _on_response(self, response) -> list:
        handler = self._on.get(self.step)
        if handler is None:
            return self._fail(f"unexpected upstream response in step {self.step.value}")
        return handler(response)

    def _pong(self, ok: bool, reply: str) -> list:
        if not ok:
            return self._fail(f"upstream failed the health check: {reply}", permanent=False, kind=Reason.CONNECT)
        self.step = Step.READY
        return [UpstreamReady(self.capabilities)]

    @property
    def buffered(self) -> int:
        """Upstream bytes held: a partial response being read, plus what arrived after
        login (each bounded: ``max_line`` and :attr:`PENDING_LIMIT`)."""
        return len(self._reader) + len(self._pending)

    def take_pending(self) -> bytes:
        """Upstream bytes that arrived after login, for the application at release."""
        self._expect(Step.READY)
        return self._pending.take()

    # -- shared steps ------------------------------------------------------------------

    def _expect(self, *steps: Step) -> None:
        if self.step not in steps:
            raise MisuseError(
                f"{type(self).__name__}: called in step {self.step.value}, "
                f"expected {' or '.join(s.value for s in steps)}"
            )

    def _fail(self, reason: str, permanent: bool = True, kind: Reason = Reason.PROTOCOL) -> list:
        self.step = Step.FAILED
        self._forget_secrets()
        return [UpstreamFailed(reason, permanent=permanent, kind=kind)]

    def _forget_secrets(self) -> None:
        """A login attempt is over (ready, failed or refused): drop the credentials and
        everything made of them, so that no secret lives on for the whole relay.
        Protocols that keep more (a LOGIN command's literals, PASS) extend this."""
        self.credentials = None
        self._sasl = None
        self._steps = []

    def _unexpected_while_waiting(self, response: str) -> list:
        """A response nobody asked for while the lazy login waits for the application's
        token (``response`` as the protocol prints it).  Transient: a new session may
        find the server in a better mood."""
        return self._fail(
            f"upstream sent an unexpected response while waiting for the application to authenticate: {response}",
            permanent=False,
        )

    def _malformed(self, what: str, line: bytes) -> list:
        return self._fail(f"upstream sent a malformed {what}: {printable(line, 80)}")

    def _starttls_wanted(self, offered: bool) -> list | None:
        """After the first capability list: the actions that start STARTTLS, fail for
        lack of it, or ``None`` to carry on to the login."""
        if self.tls_active or not self.starttls_enable:
            return None
        if offered:
            self.step = Step.STARTTLS
            return self._send_starttls()
        if self.starttls_required:
            return self._fail(
                f"upstream does not offer {self.STARTTLS_VERB} and the destination requires it", kind=Reason.TLS
            )
        return None

    def _starttls_answer(self, ok: bool, reply: str) -> list:
        """The server's answer to STARTTLS: go ahead with the handshake, or (refused)
        carry on in plaintext unless TLS is required."""
        if ok:
            self.step = Step.TLS_HANDSHAKE
            return [StartTLS()]
        if self.starttls_required:
            return self._fail(f"upstream refused {self.STARTTLS_VERB}: {reply}", kind=Reason.TLS)
        self.starttls_enable = False  # carry on in plaintext, as configured
        return self._login()

    def _login(self) -> list:
        """Start logging in with ``self.credentials`` (or stop to wait for them)."""
        offered = self._offered()
        if self.credentials is None:
            if not self.lazy:
                return self._ready(self.capabilities)
            if not offered & set(BEARER_MECHANISMS):
                return self._fail(no_mechanism(BearerToken("", ""), offered), kind=Reason.AUTH)
            self.step = Step.AWAITING_LOGIN
            return [UpstreamAwaitingLogin(self.capabilities)]
        self._token_status = None
        try:
            start = sasl_start(self.credentials, offered)
        except LoginImpossible as e:
            return self._fail(str(e), kind=Reason.AUTH)
        if start is None:
            return self._login_without_sasl(offered)
        self._sasl = start
        self._steps = list(start.steps)
        self.step = Step.LOGIN
        return self._send_sasl(start)

    def _on_challenge(self, challenge: bytes) -> list:
        """A continuation request during a SASL login: the next answer, the answer to a
        bearer error challenge, or a failure when the server asks for more than the
        mechanism has."""
        if self._steps:
            return self._send_step(self._steps.pop(0))
        error_reply = self._sasl.error_reply if self._sasl is not None else None
        if error_reply is not None:
            # XOAUTH2 / OAUTHBEARER: the token was refused and a JSON error challenge
            # sent; answering it gets the final refusal.
            self._sasl = None
            try:
                status = sasl.decode_error_challenge(challenge).get("status")
            except sasl.SASLError:
                status = None
            self._token_status = printable(status.encode("utf-8", "replace"), 40) if status else None
            return self._send_step(error_reply)
        return self._fail("upstream asked for more authentication data than expected")

    def _refused(self, reply: str) -> list:
        """A login attempt failed: fatal when eager, retryable when lazy."""
        reason = f"upstream refused the credentials: {reply}"
        if self._token_status:
            reason += f" (token status {self._token_status})"
        if not self.lazy:
            return self._fail(reason, kind=Reason.AUTH)
        self.step = Step.AWAITING_LOGIN
        self._forget_secrets()
        return [LoginRefused(reason)]

    def _ready(self, capabilities: tuple[str, ...]) -> list:
        self.capabilities = capabilities
        self.step = Step.READY
        self._forget_secrets()
        return [UpstreamReady(capabilities)]

    def _keep_after_ready(self, leftover: bytes) -> list:
        """Bytes that arrived together with the last login response."""
        if leftover and not self._pending.add(leftover):
            return self._fail("upstream sent too much unsolicited data", permanent=False)
        return []

    # -- what each protocol supplies -----------------------------------------------------

    STARTTLS_VERB = "STARTTLS"
    #: the command that asks for the capabilities (SMTP: EHLO with its name)
    CAPABILITY_COMMAND = b"CAPABILITY"
    #: the command that starts a SASL login
    SASL_COMMAND = b"AUTH"
    #: the command that ends a session (IMAP: LOGOUT)
    LOGOUT_COMMAND = b"QUIT"

    def _offered(self) -> set[str]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _send_sasl(self, start: SASLStart) -> list:
        """The SASL command: ``SASL_COMMAND mechanism [initial-response]``, the initial
        response inline where the server takes it, else as the answer to the first
        continuation."""
        command = self.SASL_COMMAND + b" " + start.mechanism.encode("ascii")
        if start.initial is not None:
            if self._takes_initial_response():
                command += b" " + start.initial
            else:
                self._steps.insert(0, start.initial)
        return self._command(Step.LOGIN, command)

    def _takes_initial_response(self) -> bool:
        """SMTP (RFC 4954) and POP3 (RFC 5034) always do; IMAP only with SASL-IR."""
        return True

    def _login_without_sasl(self, offered: set[str]) -> list:
        return self._fail(no_mechanism(self.credentials, offered), kind=Reason.AUTH)
