"""One session's decisions, sans-IO: from accept to release (or refusal).

:class:`SessionMachine` takes events from both legs and from the services the session
uses (destination found, token obtained, upstream connected, bytes, TLS done, timers,
closes) and returns actions (write, start TLS, look up, connect, exchange a secret,
start or stop a timer, release, close).  It owns the application-side and upstream
machines of the destination's protocol and routes bytes between them; the Twisted glue
(``mailgw.session``) only carries the actions out.  So every decision — eager or lazy
login, what a refusal says and which class it counts under, retries of the lazy login,
forgetting a token the upstream refused, the order of bytes at release — is reachable
by a unit test without a socket.

Life of a session::

    STARTING   accepted -> destination -> (token) -> connect -> TLS -> login
    DIALOGUE   greeted; local login dialogue (lazy types: the application's secret is
               exchanged and the upstream login runs now, as often as needed)
    RELAYING   released: the glue splices the two connections
    CLOSING    refused or ended: nothing more is read, the glue closes
    CLOSED     the application connection is gone

A session is refused at most once, under one :class:`~mailgw.protocol.refusal.Reason`.
"""

from __future__ import annotations

import enum

from attrs import field, frozen

from ..destination import OAUTH2_AUTHORIZATION_CODE, Destination
from ..settings import Route, Settings
from . import families
from .actions import (
    Close,
    ExchangeSecret,
    LoginRefused,
    MisuseError,
    Release,
    SendToApp,
    SendUpstream,
    StartTLS,
    UpstreamAwaitingLogin,
    UpstreamFailed,
    UpstreamReady,
)
from .appside import AppSide
from .credentials import BearerToken, Credentials
from .refusal import Reason, Refusal
from .upstream import Step, UpstreamMachine

# -- actions the session glue carries out (besides SendToApp, SendUpstream, StartTLS) ----


@frozen
class LookUp:
    """Ask the route's destination source for the destination."""


@frozen
class FetchToken:
    """Get a client-credentials token for the destination (cached, single flight)."""


@frozen
class Connect:
    """Open the upstream connection (endpoint chain) to ``destination``."""

    destination: Destination


@frozen
class Exchange:
    """Exchange the application's refresh token or authorisation code for an access
    token (at the destination's source when it can, else at the token service)."""

    secret: str = field(repr=False)


@frozen
class ForgetToken:
    """The upstream refused a token: drop it from the cache (``secret`` None: the
    client-credentials token; else the token exchanged for that secret)."""

    secret: str | None = field(default=None, repr=False)


@frozen
class StartTimer:
    """Start (or restart) the timer ``name``; when it fires, call ``timer(name)``."""

    name: str
    seconds: float


@frozen
class StopTimer:
    name: str


@frozen
class StartRelay:
    """Released: write ``to_app`` (upstream bytes that arrived after login) and
    ``to_upstream`` (the application's command and what it pipelined), then splice."""

    to_app: bytes = field(repr=False)
    to_upstream: bytes = field(repr=False)


@frozen
class CloseApp:
    """Close the application connection once what was written is flushed (and the
    upstream connection with it)."""


@frozen
class Milestone:
    """A step worth measuring or reporting: ``connected``, ``tls``, ``login`` (the
    upstream accepted the login), ``authenticating`` (lazy types: the upstream login
    starts now, with the application's exchanged token)."""

    name: str


@frozen
class Refused:
    """The session is refused (emitted exactly once): metrics, status, audit."""

    refusal: Refusal


@frozen
class Warmed:
    """Warm mode: the upstream is logged in and waits for an application (a pool's)."""


@frozen
class Discarded:
    """Warm mode: the connection cannot serve an application (failed, aged, unhealthy)."""

    refusal: Refusal


@frozen
class Log:
    """A line for the log; ``level`` is ``debug``, ``info`` or ``warn``.  Never a secret."""

    level: str
    message: str


class Phase(enum.Enum):
    STARTING = "starting"
    WARM = "warm"  # a pool's: logged in, no application yet
    DIALOGUE = "dialogue"
    RELAYING = "relaying"
    CLOSING = "closing"
    CLOSED = "closed"


class Outcome(str, enum.Enum):
    """SPEC 9.2 ``mailgw_session_duration_seconds{outcome}`` and the audit log's."""

    RELAYED = "relayed"
    REFUSED = "refused"
    CLOSED = "closed"

    def __str__(self) -> str:
        return self.value


#: Timers.  ``login``: accept (or a lazy login attempt) until the upstream is ready;
#: ``tls``: one handshake; ``idle``: the application silent before release;
#: ``dialogue``: greeting to release, however the application trickles bytes;
#: ``pooled``: how long a warm connection may wait; ``ping``: its next health check;
#: ``pong``: the answer to that check (as long as a login may take).
LOGIN, TLS, IDLE, DIALOGUE, POOLED, PING, PONG = "login", "tls", "idle", "dialogue", "pooled", "ping", "pong"

#: A warm connection logged in with a token is retired this long before the token
#: expires (servers may end sessions whose token expired).
TOKEN_MARGIN = 30.0

#: A warm connection must be able to wait at least this long (or ``mailgw.pool.maxIdle``
#: when shorter): one whose token expires sooner would be retired almost at once and
#: replaced at once, a login a few seconds for nothing.  It is not made; its pool backs off.
MIN_WARM_SECONDS = 60.0

#: Lazy types: how many secrets one session may present.  Each costs a token-service
#: request (and an upstream login): an application retrying in a loop is told to stop
#: instead of running on until the dialogue deadline.
MAX_TOKEN_LOGINS = 3


class SessionMachine:
    """The decisions of one session; see the module docstring.

    ``family`` is the protocol family to refuse in before the destination is known (the
    listener's best knowledge).  ``warm``: a warm pool's session (SPEC 9.7), which logs in
    before any application connects (:class:`Warmed`), keeps the connection healthy and
    greets at once when one does (:meth:`app_attached`); what goes wrong before that is
    :class:`Discarded`, never a refusal.
    """

    def __init__(self, route: Route, settings: Settings, family: str = "smtp", warm: bool = False):
        self.route = route
        self.settings = settings
        self.family = family
        self.warm = warm
        self._warm_for: float | None = None  # a token's lifetime caps the time in the pool
        self.phase = Phase.STARTING
        self.destination: Destination | None = None
        self.refusal: Refusal | None = None
        self.released = False
        self.app: AppSide | None = None
        self.upstream: UpstreamMachine | None = None
        self._accepted = False
        self._early = bytearray()  # application bytes that arrived before the greeting
        self._user = ""  # lazy: who the application logs in as
        self._presented: str | None = None  # lazy: the secret whose token is being tried
        self._token_logins = 0  # lazy: secrets presented so far

    @property
    def outcome(self) -> Outcome:
        if self.released:
            return Outcome.RELAYED
        if self.refusal is not None:
            return Outcome.REFUSED
        return Outcome.CLOSED

    @property
    def name(self) -> str:
        return self.destination.name if self.destination is not None else self.route.destination

    # -- events: set-up --------------------------------------------------------------------

    def accepted(self) -> list:
        """The application connected (limits already checked by the glue)."""
        self._expect(Phase.STARTING)
        if self._accepted:
            raise MisuseError("accepted() twice")
        self._accepted = True
        return [StartTimer(LOGIN, self.settings.login_timeout), LookUp()]

    def destination_found(self, destination: Destination) -> list:
        if self.phase is not Phase.STARTING:
            return []
        self.destination = destination
        self.family = destination.family
        if families.needs_token(destination):
            return [FetchToken()]
        try:
            credentials = families.password(destination)
        except ValueError as e:
            return self.failed(Refusal(str(e), Reason.INTERNAL, permanent=True))
        return self._connect(credentials)

    def token_found(self, access_token: str, expires_in: float | None = None) -> list:
        """The client-credentials token for the eager login (``expires_in``: seconds it
        stays valid, which bounds how long a warm connection may wait)."""
        if self.phase is not Phase.STARTING or self.destination is None:
            return []
        if expires_in is not None:
            self._warm_for = max(0.0, expires_in - TOKEN_MARGIN)
            if self.warm and self._warm_for < min(MIN_WARM_SECONDS, self.destination.pool_max_idle):
                text = f"the access token expires in {expires_in:.0f}s, too soon to keep a connection warm"
                return self._refuse(Refusal(text, Reason.TOKEN, permanent=False))
        return self._connect(BearerToken(self.destination.user or "", access_token))

    def _connect(self, credentials: Credentials | None) -> list:
        self.upstream = families.upstream_machine(self.destination, credentials, self.settings)
        return [Log("debug", f"connecting to {self.destination.address}"), Connect(self.destination)]

    def upstream_connected(self) -> list:
        if self.phase in (Phase.CLOSING, Phase.CLOSED):
            return []
        self._expect(Phase.STARTING)
        if self.upstream is None:
            raise MisuseError("upstream_connected() before Connect")
        return [Milestone("connected")] + self._from_upstream(self.upstream.start())

    def failed(self, refusal: Refusal) -> list:
        """Something the session needs failed (destination, token, connect, TLS, a limit,
        the drain): refuse before the greeting, say goodbye after it."""
        if self.phase in (Phase.STARTING, Phase.WARM):
            return self._refuse(refusal)
        if self.phase is Phase.DIALOGUE:
            return self._goodbye(refusal.text)
        return []

    # -- events: the upstream leg ------------------------------------------------------------

    def upstream_data(self, data: bytes) -> list:
        if self.phase not in (Phase.STARTING, Phase.WARM, Phase.DIALOGUE) or self.upstream is None:
            return []
        if self.phase is Phase.WARM:
            return self._warm_upstream_data(data)
        return self._from_upstream(self.upstream.receive(data))

    def _warm_upstream_data(self, data: bytes) -> list:
        """A warm connection expects nothing but the answer to its health check.  Any
        other byte (``* BYE Autologout``, ``421``) means the server is ending or
        confused, and the application that took the connection would read it: discard
        the connection at once."""
        out: list = []
        if self.upstream.step is Step.PING:
            out = self._from_upstream(self.upstream.receive(data))
            if self.phase is not Phase.WARM or not (self.upstream.step is Step.READY and self.upstream.buffered):
                return out
        unasked = "the upstream server sent data unasked while the connection waited in the pool"
        return out + self._refuse(Refusal(unasked, Reason.CONNECT, permanent=False))

    def upstream_tls_done(self) -> list:
        if self.phase not in (Phase.STARTING, Phase.DIALOGUE) or self.upstream is None:
            return []
        return [StopTimer(TLS), Milestone("tls")] + self._from_upstream(self.upstream.tls_established())

    def upstream_lost(self, refusal: Refusal | None = None) -> list:
        """The upstream connection closed before release; ``refusal`` says why when the
        glue knows better than "closed" (a certificate or TLS failure, a reset)."""
        if self.phase in (Phase.STARTING, Phase.WARM):
            if refusal is not None or self.upstream is None:
                return self._refuse(refusal or Refusal("the upstream server closed the connection", Reason.CONNECT, False))
            return self._from_upstream(self.upstream.receive_eof())
        if self.phase is Phase.DIALOGUE:
            return [Log("info", "upstream closed before release")] + self._goodbye(
                "the upstream server closed the connection", upstream_gone=True)
        return []

    # -- events: the application leg -------------------------------------------------------

    def app_data(self, data: bytes) -> list:
        if self.phase is Phase.STARTING:
            # The application spoke before its greeting: keep it, in order, but bounded.
            self._early += data
            if len(self._early) > self.settings.max_line:
                return self._refuse(Refusal("application sent too much data before the greeting", Reason.PROTOCOL))
            return []
        if self.phase is not Phase.DIALOGUE:
            return []
        return [StartTimer(IDLE, self.settings.idle_timeout)] + self._from_app(self.app.receive(data))

    def closed(self) -> list:
        """The application connection is gone (final)."""
        if self.phase is Phase.CLOSED:
            return []
        self.phase = Phase.CLOSED
        self._presented = None
        return [StopTimer(name) for name in (LOGIN, TLS, IDLE, DIALOGUE, POOLED, PING, PONG)]

    # -- events: a warm pool's session -----------------------------------------------------

    @property
    def ready_for_application(self) -> bool:
        """Warm, healthy and idle: an application may take this session now."""
        return self.phase is Phase.WARM and self.upstream is not None and self.upstream.step is Step.READY

    def app_attached(self, refusal: Refusal | None = None) -> list:
        """An application connected to this warm session: greet it at once (or refuse
        it: ``refusal``, a limit the glue found)."""
        if not self.ready_for_application:
            raise MisuseError("app_attached() to a session that is not warm and idle")
        self.warm = False
        out = [StopTimer(POOLED), StopTimer(PING)]
        if refusal is not None:
            return out + self._refuse(refusal)
        return out + self._greet(self.upstream.capabilities, lazy=False)

    # -- events: the lazy login -------------------------------------------------------------

    def exchanged(self, access_token: str) -> list:
        """The application's secret became ``access_token``: log in upstream with it."""
        if self.phase is not Phase.DIALOGUE or self.upstream is None or self._presented is None:
            return []  # the application or the upstream went away meanwhile
        return [StartTimer(LOGIN, self.settings.login_timeout), Milestone("authenticating")] + self._from_upstream(
            self.upstream.authenticate(BearerToken(self._user, access_token))
        )

    def exchange_failed(self, refusal: Refusal) -> list:
        if self.phase is not Phase.DIALOGUE:
            return []
        self._presented = None
        return [Log("info", f"token exchange refused: {refusal.text}")] + self._from_app(
            self.app.auth_refused(refusal.text, transient=not refusal.permanent)
        )

    # -- events: timers and shutdown -------------------------------------------------------

    def timer(self, name: str) -> list:
        if name == LOGIN:
            where = self.destination.address if self.destination else "the upstream"
            text = f"{where} did not complete the login within {self.settings.login_timeout:.0f}s"
            return self.failed(Refusal(text, Reason.TIMEOUT, permanent=False))
        if name == TLS:
            where = self.destination.address if self.destination else "the upstream"
            return self.failed(Refusal(f"TLS handshake with {where} timed out", Reason.TIMEOUT, permanent=False))
        if name == POOLED and self.phase is Phase.WARM:
            return self._refuse(Refusal("retired after its time in the pool", Reason.CONNECT, False))
        if name == PING and self.ready_for_application:
            # A server that never answers would keep the connection counted ready
            # but never taken, never replaced until its time in the pool is over.
            return [StartTimer(PONG, self.settings.login_timeout)] + self._from_upstream(self.upstream.ping())
        if name == PONG and self.phase is Phase.WARM:
            text = f"the upstream did not answer the health check within {self.settings.login_timeout:.0f}s"
            return self._refuse(Refusal(text, Reason.TIMEOUT, permanent=False))
        if name == IDLE and self.phase is Phase.DIALOGUE:
            return [Log("info", "application idle before release, closing")] + self._goodbye("idle timeout")
        if name == DIALOGUE and self.phase is Phase.DIALOGUE:
            seconds = self.settings.dialogue_timeout
            return [Log("info", f"dialogue not finished within {seconds:.0f}s, closing")] + self._goodbye(
                f"the login dialogue took longer than {seconds:.0f}s"
            )
        return []

    def shutdown(self, reason: str) -> list:
        """The drain timeout is reached: end the session with the protocol's goodbye
        (a refusal before the greeting).  After release the glue writes
        :meth:`goodbye_bytes` and closes the relay."""
        return self.failed(Refusal(reason, Reason.SHUTDOWN, permanent=False))

    def goodbye_bytes(self, text: str) -> bytes:
        return families.dialect(self.family).reply("goodbye", text=text)

    # -- routing the protocol machines' actions ------------------------------------------------

    def _from_upstream(self, actions: list) -> list:
        if actions and isinstance(actions[-1], UpstreamFailed):
            # A call that ends in failure: what it asked to send or start first is moot.
            actions = [a for a in actions if not isinstance(a, (SendUpstream, StartTLS))]
        out: list = []
        for action in actions:
            if self.phase in (Phase.CLOSING, Phase.CLOSED):
                break
            if isinstance(action, (SendUpstream, SendToApp)):
                out.append(action)
            elif isinstance(action, StartTLS):
                out += [StartTimer(TLS, self.settings.tls_timeout), action]
            elif isinstance(action, UpstreamReady):
                out += self._upstream_ready(action.capabilities)
            elif isinstance(action, UpstreamAwaitingLogin):
                out += [StopTimer(LOGIN)] + self._greet(action.capabilities, lazy=True)
            elif isinstance(action, LoginRefused):
                out += self._login_refused(action.reason)
            elif isinstance(action, UpstreamFailed):
                out += self._upstream_failed(action)
            else:
                raise MisuseError(f"unknown upstream action {action!r}")
        return out

    def _from_app(self, actions: list) -> list:
        out: list = []
        for action in actions:
            if self.phase in (Phase.CLOSING, Phase.CLOSED):
                break
            if isinstance(action, SendToApp):
                out.append(action)
            elif isinstance(action, ExchangeSecret):
                out += self._exchange(action)
            elif isinstance(action, Release):
                out += self._release(action.leftover)
            elif isinstance(action, Close):
                out += self._close(action.reason)
            else:
                raise MisuseError(f"unknown application action {action!r}")
        return out

    # -- decisions -----------------------------------------------------------------------------

    def _upstream_ready(self, capabilities: tuple[str, ...]) -> list:
        if self.phase is Phase.WARM:  # a health check passed
            return [StopTimer(PONG), StartTimer(PING, self._ping_interval())]
        out = [StopTimer(LOGIN), Milestone("login")]
        if self.phase is Phase.STARTING and self.warm:
            self.phase = Phase.WARM
            lifetime = self.destination.pool_max_idle
            if self._warm_for is not None:
                lifetime = min(lifetime, self._warm_for)
            return out + [Warmed(), StartTimer(POOLED, lifetime), StartTimer(PING, self._ping_interval())]
        if self.phase is Phase.STARTING:
            return out + self._greet(capabilities, lazy=False)
        # lazy: the exchanged token was accepted
        self._presented = None
        return out + [Log("debug", f"upstream {self.destination.address} accepted the access token")] + self._from_app(
            self.app.auth_succeeded(capabilities)
        )

    def _ping_interval(self) -> float:
        """How often a warm connection is checked: often enough to notice a server that
        dropped it well before an application would."""
        return max(1.0, min(self.destination.pool_max_idle / 3, 30.0))

    def _greet(self, capabilities: tuple[str, ...], lazy: bool) -> list:
        self.app = families.app_machine(self.destination, capabilities, self.settings, lazy=lazy)
        self.phase = Phase.DIALOGUE
        waiting = ", the login waits for the application's token" if lazy else ""
        out = [
            Log("debug", f"upstream {self.destination.address} ready{waiting}, greeting the application"),
            SendToApp(self.app.greeting()),
            StartTimer(IDLE, self.settings.idle_timeout),
            StartTimer(DIALOGUE, self.settings.dialogue_timeout),
        ]
        if self._early:
            early, self._early = bytes(self._early), bytearray()
            out += self._from_app(self.app.receive(early))
        return out

    def _upstream_failed(self, failure: UpstreamFailed) -> list:
        if self.phase is Phase.STARTING and failure.kind is Reason.AUTH and families.needs_token(self.destination):
            # The cached client-credentials token may have been revoked: fetch afresh next time.
            out = [ForgetToken(None)]
        else:
            out = []
        return out + self.failed(Refusal(failure.reason, failure.kind, failure.permanent))

    def _exchange(self, request: ExchangeSecret) -> list:
        destination = self.destination
        user = request.user or destination.user
        if not user:
            return self._from_app(self.app.auth_refused(
                f"no user: the {request.mechanism} response names none and destination {destination.name} has no mail.user"
            ))
        if self._token_logins >= MAX_TOKEN_LOGINS:
            return [Log("info", f"login attempt {self._token_logins + 1} in one session, closing")] + self._goodbye(
                f"too many login attempts in one session ({MAX_TOKEN_LOGINS}); connect again to retry"
            )
        self._token_logins += 1
        what = "authorization code" if destination.authentication == OAUTH2_AUTHORIZATION_CODE else "refresh token"
        self._user, self._presented = user, request.secret
        return [
            Log("debug", f"the application presented a {what} ({request.mechanism}); exchanging it"),
            Exchange(request.secret),
        ]

    def _login_refused(self, reason: str) -> list:
        out: list = [StopTimer(LOGIN), Log("info", reason)]
        if self._presented is not None:
            # The cached token may have been revoked: the next attempt exchanges afresh.
            out.append(ForgetToken(self._presented))
            self._presented = None
        return out + self._from_app(self.app.auth_refused(reason))

    def _release(self, leftover: bytes) -> list:
        self.phase = Phase.RELAYING
        self.released = True
        return [
            StopTimer(LOGIN), StopTimer(TLS), StopTimer(IDLE), StopTimer(DIALOGUE),
            StartRelay(to_app=self.upstream.take_pending(), to_upstream=leftover),
        ]

    # -- endings -------------------------------------------------------------------------------

    def _refuse(self, refusal: Refusal) -> list:
        """Refuse with the protocol's own refusal greeting, naming the destination."""
        if self.phase not in (Phase.STARTING, Phase.WARM):
            return []
        text = f"destination {self.name}: {refusal.text}"
        self.phase = Phase.CLOSING
        if self.warm:  # no application to tell: the pool replaces the connection
            return [Log("debug", f"warm connection discarded: {text}"), Discarded(Refusal(text, refusal.reason, refusal.permanent))]
        self.refusal = Refusal(text, refusal.reason, refusal.permanent)
        return [
            Log("warn", f"refused ({refusal.reason}): {text}"),
            Refused(self.refusal),
            SendToApp(families.dialect(self.family).refusal(text, refusal.permanent)),
            CloseApp(),
        ]

    def _goodbye(self, text: str, *, upstream_gone: bool = False) -> list:
        out = [] if upstream_gone else self._upstream_goodbye()
        self.phase = Phase.CLOSING
        return out + [SendToApp(self.goodbye_bytes(text)), CloseApp()]

    def _close(self, reason: str) -> list:
        out = self._upstream_goodbye()
        self.phase = Phase.CLOSING
        return out + [Log("debug", f"closing: {reason}"), CloseApp()]

    def _upstream_goodbye(self) -> list:
        """Before release, a logged-in upstream session ends with the protocol's own
        goodbye (QUIT, IMAP's LOGOUT) rather than a dropped connection, whoever ends it
        (the application, a timeout, the drain).  After release the bytes are the
        application's: nothing is added to them."""
        if self.upstream is None or self.phase is not Phase.DIALOGUE:
            return []
        return self._from_upstream(self.upstream.logout())

    def _expect(self, *phases: Phase) -> None:
        if self.phase not in phases:
            raise MisuseError(
                f"SessionMachine: called in phase {self.phase.value}, expected {' or '.join(p.value for p in phases)}"
            )
