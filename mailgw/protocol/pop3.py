"""POP3, both sides, sans-IO.

:class:`POP3Upstream` logs in to the real server: greeting, CAPA, STLS (with the
injection guard), CAPA again, then AUTH PLAIN / XOAUTH2 / OAUTHBEARER or USER/PASS, and
CAPA once more for the post-login list.  :class:`POP3AppSide` talks to the application
until release: it greets, answers CAPA, USER, PASS, APOP, AUTH and QUIT locally and
releases at the first other command.
"""

from __future__ import annotations

from . import sasl
from .actions import (
    Close,
    ExchangeSecret,
    ProtocolError,
    Release,
    SendToApp,
    SendUpstream,
    StartTLS,
    UpstreamConnected,
    UpstreamReady,
)
from .common import first_word, printable
from .credentials import BearerToken, Credentials, Password
from .upstream import INJECTION, UpstreamMachine
from .lines import LineReader, LineTooLong

CRLF = b"\r\n"
MAX_CAPA_LINES = 256



def _is_ok(line: bytes) -> bool:
    return line[:3].upper() == b"+OK" and line[3:4] in (b"", b" ")


def _is_err(line: bytes) -> bool:
    return line[:4].upper() == b"-ERR" and line[4:5] in (b"", b" ")


def _is_continuation(line: bytes) -> bool:
    return line == b"+" or line.startswith(b"+ ")


def sasl_mechanisms(capabilities: tuple[str, ...]) -> set[str]:
    """The mechanisms of the ``SASL`` CAPA line (RFC 5034)."""
    mechanisms: set[str] = set()
    for line in capabilities:
        words = line.upper().split()
        if words and words[0] == "SASL":
            mechanisms.update(words[1:])
    return mechanisms


def _has_capability(capabilities: tuple[str, ...], keyword: str) -> bool:
    return any(line.split(" ", 1)[0].upper() == keyword for line in capabilities)


class POP3Upstream(UpstreamMachine):
    """Drives the upstream POP3 session until it is authenticated.

    Same contract as the SMTP and IMAP upstream machines: :meth:`start`,
    :meth:`receive`, :meth:`tls_established`, :meth:`take_pending`.
    ``credentials=None`` means no login (NoAuthentication), unless ``login_later`` is
    set (the lazy OAuth2 types): then the machine stops after TLS and CAPA with
    :class:`UpstreamConnected`, and :meth:`authenticate` logs in later, as often as
    needed, each attempt ending in :class:`UpstreamReady` or :class:`LoginRefused`.
    """

    def __init__(
        self,
        *,
        implicit_tls: bool,
        starttls_enable: bool = True,
        starttls_required: bool = False,
        credentials: Credentials | None = None,
        max_line: int = 8192,
        login_later: bool = False,
    ):
        super().__init__(
            implicit_tls=implicit_tls, starttls_enable=starttls_enable, starttls_required=starttls_required,
            credentials=credentials, login_later=login_later,
        )
        self.capabilities: tuple[str, ...] = ()
        self._lines = LineReader(max_line)
        self._capa_lines: list[bytes] | None = None  # not None while a CAPA list is read
        self._steps: list[bytes] = []  # what to send on a "+" continuation (or the PASS)
        self._error_reply: bytes | None = None

    # -- inputs --------------------------------------------------------------------

    def receive(self, data: bytes) -> list:
        handled = self._outside_login(data)
        if handled is not None:
            return handled
        self._lines.feed(data)
        actions: list = []
        while True:
            try:
                line = self._lines.read_line()
            except LineTooLong as e:
                return actions + self._fail(f"upstream sent a {e}")
            if line is None:
                return actions
            actions += self._on_line(line)
            if self._state == "tls-handshake" and len(self._lines):
                # Plaintext after the go-ahead would be read as if it came through the
                # TLS tunnel: a response-injection attack (CVE-2011-0411 and kin).
                return self._fail(INJECTION)
            if self._state == "failed":
                return actions
            if self._state == "ready":
                leftover = self._lines.take_rest()
                if leftover and not self._pending.add(leftover):
                    return self._fail("upstream sent too much unsolicited data", permanent=False)
                return actions

    def _after_starttls(self) -> list:
        self.capabilities = ()  # RFC 2595: what was said in plaintext no longer counts
        return self._send("capa", b"CAPA")

    def _send(self, state: str, command: bytes) -> list:
        self._state = state
        return [SendUpstream(command + CRLF)]

    def _malformed(self, line: bytes) -> list:
        return self._fail(f"upstream sent a malformed POP3 response: {printable(line, 80)}")

    # -- lines -----------------------------------------------------------------------

    def _on_line(self, line: bytes) -> list:
        state = self._state
        if self._capa_lines is not None:
            return self._on_capa_line(line)
        if state == "greeting":
            if _is_ok(line):
                return self._send("capa", b"CAPA")
            if _is_err(line):
                return self._fail(f"upstream greeting refused: {printable(line)}", permanent=False)
            return self._malformed(line)
        if state in ("capa", "capa-after-login"):
            if _is_ok(line):
                self._capa_lines = []
                return []
            if _is_err(line):  # a server without CAPA (RFC 1939 only): carry on
                return self._after_capa(None)
            return self._malformed(line)
        if state == "stls":
            if _is_ok(line):
                self._state = "tls-handshake"
                return [StartTLS()]
            if not _is_err(line):
                return self._malformed(line)
            if self.starttls_required:
                return self._fail(f"upstream refused STLS: {printable(line)}")
            self.starttls_enable = False  # carry on in plaintext, as configured
            return self._login()
        if state == "auth":
            if _is_ok(line):
                return self._logged_in()
            if _is_continuation(line):
                return self._on_continuation(line)
            if _is_err(line):
                return self._refused(f"upstream refused the credentials: {printable(line)}")
            return self._malformed(line)
        if state in ("user", "pass"):
            if _is_ok(line):
                if state == "user":
                    return self._send("pass", b"PASS " + self._steps.pop())
                return self._logged_in()
            if _is_err(line):
                what = "user name" if state == "user" else "credentials"
                return self._fail(f"upstream refused the {what}: {printable(line)}")
            return self._malformed(line)
        if state == "awaiting-login":
            return self._fail(
                f"upstream sent an unexpected response while waiting for the application to authenticate: {printable(line)}",
                permanent=False,
            )
        raise ProtocolError(f"unexpected upstream response in state {state}")  # pragma: no cover

    def _on_capa_line(self, line: bytes) -> list:
        assert self._capa_lines is not None
        if line == b".":
            lines, self._capa_lines = self._capa_lines, None
            return self._after_capa(tuple(printable(item, 512) for item in lines if item.strip()))
        if line.startswith(b"."):
            line = line[1:]  # dot-stuffing
        self._capa_lines.append(line)
        if len(self._capa_lines) > MAX_CAPA_LINES:
            return self._fail(f"upstream CAPA list longer than {MAX_CAPA_LINES} lines")
        return []

    def _after_capa(self, capabilities: tuple[str, ...] | None) -> list:
        if self._state == "capa-after-login":
            return self._ready(capabilities if capabilities is not None else self.capabilities)
        self.capabilities = capabilities or ()
        if not self.tls_active and self.starttls_enable:
            if _has_capability(self.capabilities, "STLS"):
                return self._send("stls", b"STLS")
            if self.starttls_required:
                return self._fail("upstream does not offer STLS and the destination requires it")
        return self._login()

    def _login(self) -> list:
        creds = self.credentials
        mechanisms = sasl_mechanisms(self.capabilities)
        if creds is None and self.login_later:
            if not mechanisms & {"XOAUTH2", "OAUTHBEARER"}:
                return self._fail(self._no_bearer_mechanism(mechanisms))
            self._state = "awaiting-login"
            return [UpstreamConnected(self.capabilities)]
        if creds is None:
            return self._ready(self.capabilities)
        self._steps, self._error_reply = [], None
        if isinstance(creds, Password):
            if "PLAIN" in mechanisms:
                try:
                    response = sasl.plain_initial_response(creds.user, creds.password)
                except sasl.SASLError:
                    return self._fail("the configured user or password contains NUL, which PLAIN cannot carry")
                # RFC 5034 allows the initial response; a server that still asks gets it again.
                self._steps = [response]
                return self._send("auth", b"AUTH PLAIN " + response)
            if any(c in value for value in (creds.user, creds.password) for c in "\r\n\0"):
                return self._fail("the configured user or password contains a line break or NUL, which USER/PASS cannot carry")
            self._steps = [creds.password.encode("utf-8")]
            return self._send("user", b"USER " + creds.user.encode("utf-8"))
        if isinstance(creds, BearerToken):
            for mechanism in ("XOAUTH2", "OAUTHBEARER"):
                if mechanism in mechanisms:
                    try:
                        if mechanism == "XOAUTH2":
                            response = sasl.xoauth2_initial_response(creds.user, creds.token)
                        else:
                            response = sasl.oauthbearer_initial_response(creds.user, creds.token)
                    except sasl.SASLError:
                        return self._fail(f"the access token cannot be sent with {mechanism}")
                    self._error_reply = sasl.error_challenge_reply(mechanism)
                    return self._send("auth", b"AUTH " + mechanism.encode("ascii") + b" " + response)
            return self._fail(self._no_bearer_mechanism(mechanisms))
        raise TypeError(f"unknown credentials type {type(creds).__name__}")  # pragma: no cover

    @staticmethod
    def _no_bearer_mechanism(mechanisms: set[str]) -> str:
        if not mechanisms:
            return "upstream offers no XOAUTH2 or OAUTHBEARER authentication (no SASL capability)"
        return f"upstream offers no XOAUTH2 or OAUTHBEARER authentication (offers {' '.join(sorted(mechanisms))})"

    def _on_continuation(self, line: bytes) -> list:
        if self._steps:
            return [SendUpstream(self._steps.pop(0) + CRLF)]
        if self._error_reply is not None:
            # XOAUTH2 / OAUTHBEARER: the token was refused and a JSON error challenge sent;
            # answering it gets the final -ERR.
            reply, self._error_reply = self._error_reply, None
            return [SendUpstream(reply + CRLF)]
        return self._fail("upstream asked for more authentication data than expected")

    def _logged_in(self) -> list:
        return self._send("capa-after-login", b"CAPA")

    def _ready(self, capabilities: tuple[str, ...]) -> list:
        self.capabilities = capabilities
        self._state = "ready"
        return [UpstreamReady(capabilities)]


# ---------------------------------------------------------------------------------------
# Application side

#: CAPA lines never shown to the application: the gateway owns TLS and login.
_HIDDEN = ("STLS", "SASL", "USER")

_AUTH_PROMPTS = {b"LOGIN": [sasl.LOGIN_USER_CHALLENGE, sasl.LOGIN_PASSWORD_CHALLENGE]}

#: What the application may present when the destination exchanges its secret.
BEARER_MECHANISMS = ("XOAUTH2", "OAUTHBEARER")

#: Pipelined application bytes kept while the gateway exchanges a secret.
_MAX_WAITING = 65536

_NO_TOKEN = b"carries no token: this destination needs AUTH XOAUTH2 or OAUTHBEARER with the refresh token or authorization code"


class POP3AppSide:
    """The application-facing POP3 dialogue before release.

    Eager mode: CAPA, USER, PASS, APOP, AUTH and QUIT are answered locally (the offered
    credentials are discarded); every other command releases the session with its line
    and any pipelined bytes as the leftover, so the upstream sees them in order.

    ``lazy`` mode (OAuth2RefreshToken, OAuth2AuthorizationCode): CAPA advertises
    ``SASL XOAUTH2 OAUTHBEARER``; ``AUTH XOAUTH2``/``OAUTHBEARER`` (inline or after a
    ``+``) is decoded into an :class:`ExchangeSecret` action and the machine waits for
    :meth:`auth_succeeded` or :meth:`auth_refused`.  USER/PASS/APOP and other mechanisms
    are refused (they carry no token); other commands before authentication get
    ``-ERR [AUTH] Authentication required``.  After it, CAPA and QUIT stay local and
    every other command releases.
    """

    def __init__(
        self, *, capabilities: tuple[str, ...] = (), hostname: str = "mailgw", max_line: int = 16384, lazy: bool = False
    ):
        self.hostname = hostname
        self.lazy = lazy
        self.capabilities = self._visible(
            capabilities, ("SASL " + " ".join(BEARER_MECHANISMS),) if lazy else ("USER", "SASL PLAIN")
        )
        self.max_line = max_line
        self._lines = LineReader(max_line)
        self._auth_prompts: list[bytes] | None = None  # not None while an AUTH is in progress
        self._bearer_mechanism: str | None = None  # lazy AUTH waiting for its response line
        self._authenticated = False
        self._state = "command"  # command, waiting (exchange in progress), released, closed

    @staticmethod
    def _visible(capabilities: tuple[str, ...], extra: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(line for line in capabilities if line.split(" ", 1)[0].upper() not in _HIDDEN) + extra

    def greeting(self) -> bytes:
        return b"+OK mailgw ready" + CRLF

    @staticmethod
    def refusal(reason: str, permanent: bool = True) -> bytes:
        """The greeting that refuses the session."""
        return b"-ERR mailgw: " + printable(reason.encode("utf-8", "replace"), 400).encode("ascii") + CRLF

    @staticmethod
    def goodbye(reason: str) -> bytes:
        """What the application gets when the gateway closes a session (drain, idle)."""
        return b"-ERR mailgw: " + printable(reason.encode("utf-8", "replace"), 400).encode("ascii") + CRLF

    def receive(self, data: bytes) -> list:
        if self._state == "released":
            raise ProtocolError("receive() after release")
        if self._state == "closed":
            return []
        self._lines.feed(data)
        if self._state == "waiting":
            if len(self._lines) > _MAX_WAITING:
                self._state = "closed"
                return [
                    SendToApp(b"-ERR mailgw: too much data sent during authentication" + CRLF),
                    Close("application sent too much data during authentication"),
                ]
            return []
        return self._process()

    # -- lazy authentication results -----------------------------------------------

    def auth_succeeded(self, capabilities: tuple[str, ...]) -> list:
        """The upstream accepted the exchanged token; ``capabilities`` are its CAPA
        lines after login."""
        self._state, self._authenticated = "command", True
        self.capabilities = self._visible(capabilities, ())
        return [SendToApp(b"+OK Logged in." + CRLF)] + self._process()

    def auth_refused(self, reason: str, transient: bool = False) -> list:
        """The exchange or the upstream login failed; the application may try again."""
        self._state = "command"
        code = b"[SYS/TEMP]" if transient else b"[AUTH]"
        text = printable(reason.encode("utf-8", "replace"), 400).encode("ascii")
        return [SendToApp(b"-ERR " + code + b" mailgw: " + text + CRLF)] + self._process()

    # -- commands --------------------------------------------------------------------

    def _process(self) -> list:
        actions: list = []
        while self._state == "command":
            try:
                line = self._lines.read_line()
            except LineTooLong:
                self._state = "closed"
                return actions + [
                    SendToApp(f"-ERR mailgw: command line too long (limit {self.max_line} bytes)".encode() + CRLF),
                    Close("application command line too long"),
                ]
            if line is None:
                break
            if self._bearer_mechanism is not None:
                actions += self._bearer_response(line)
            elif self._auth_prompts is not None:
                actions += self._auth_continue(line)
            else:
                actions += self._command(line)
        return actions

    def _command(self, line: bytes) -> list:
        verb, arg = first_word(line)
        if not verb:
            return [SendToApp(b"-ERR mailgw: empty command line" + CRLF)]
        if verb == b"CAPA":
            body = b"".join(cap.encode("ascii", "replace") + CRLF for cap in self.capabilities)
            return [SendToApp(b"+OK Capability list follows" + CRLF + body + b"." + CRLF)]
        if verb == b"QUIT":
            self._state = "closed"
            return [SendToApp(b"+OK mailgw signing off" + CRLF), Close("application quit")]
        if verb == b"STLS":
            return [SendToApp(b"-ERR mailgw: STLS is not offered on this listener" + CRLF)]
        if self.lazy:
            if self._authenticated:
                return self._release(line)
            if verb == b"AUTH":
                return self._bearer_start(arg)
            if verb in (b"USER", b"PASS", b"APOP"):
                return [SendToApp(b"-ERR [AUTH] mailgw: " + verb + b" " + _NO_TOKEN + CRLF)]
            return [SendToApp(b"-ERR [AUTH] Authentication required" + CRLF)]
        if verb == b"USER":
            return [SendToApp(b"+OK" + CRLF)]
        if verb in (b"PASS", b"APOP"):
            return [SendToApp(b"+OK Logged in." + CRLF)]
        if verb == b"AUTH":
            return self._auth_start(arg)
        return self._release(line)

    def _release(self, line: bytes) -> list:
        self._state = "released"
        return [Release(line + CRLF + self._lines.take_rest())]

    def _auth_start(self, arg: bytes) -> list:
        if not arg:
            return [SendToApp(b"+OK" + CRLF + b"PLAIN" + CRLF + b"." + CRLF)]
        mechanism, _, initial = arg.partition(b" ")
        prompts = list(_AUTH_PROMPTS.get(mechanism.upper(), [b""]))
        if initial.strip():
            prompts.pop(0)  # the initial response answers the first prompt
        if not prompts:
            return [SendToApp(b"+OK Logged in." + CRLF)]
        self._auth_prompts = prompts
        return [SendToApp(b"+ " + self._auth_prompts.pop(0) + CRLF)]

    def _auth_continue(self, line: bytes) -> list:
        if line.strip() == b"*":
            self._auth_prompts = None
            return [SendToApp(b"-ERR Authentication cancelled" + CRLF)]
        if self._auth_prompts:
            return [SendToApp(b"+ " + self._auth_prompts.pop(0) + CRLF)]
        self._auth_prompts = None
        return [SendToApp(b"+OK Logged in." + CRLF)]

    def _bearer_start(self, arg: bytes) -> list:
        if not arg:  # RFC 5034: the mechanism list
            body = b"".join(m.encode("ascii") + CRLF for m in BEARER_MECHANISMS)
            return [SendToApp(b"+OK" + CRLF + body + b"." + CRLF)]
        mechanism, _, initial = arg.partition(b" ")
        name = mechanism.upper().decode("ascii", "replace")
        if name not in BEARER_MECHANISMS:
            return [SendToApp(b"-ERR [AUTH] mailgw: this mechanism " + _NO_TOKEN + CRLF)]
        self._bearer_mechanism = name
        if initial.strip():
            return self._bearer_response(initial)
        return [SendToApp(b"+ " + CRLF)]

    def _bearer_response(self, response: bytes) -> list:
        mechanism, self._bearer_mechanism = self._bearer_mechanism, None
        if response.strip() == b"*":
            return [SendToApp(b"-ERR Authentication cancelled" + CRLF)]
        try:
            presented = sasl.decode_initial_response(mechanism, response)
        except sasl.SASLError as e:
            return [SendToApp(f"-ERR mailgw: malformed authentication response: {e}".encode("ascii", "replace") + CRLF)]
        self._state = "waiting"
        return [ExchangeSecret(mechanism, presented.user, presented.secret)]
