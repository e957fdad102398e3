"""SMTP, both sides, sans-IO.

:class:`SMTPUpstream` logs in to the real server: greeting, EHLO, STARTTLS (with the
injection guard), EHLO again, AUTH.  :class:`SMTPAppSide` talks to the application until
release: it greets, answers EHLO/HELO/AUTH locally and releases at the first other command.
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
MAX_REPLY_LINES = 256


class Reply:
    """One complete (possibly multi-line) SMTP reply."""

    def __init__(self, code: int, lines: list[bytes]):
        self.code = code
        self.lines = lines  # text after "NNN-" / "NNN "

    def __str__(self) -> str:
        return f"{self.code} {printable(self.lines[0] if self.lines else b'')}"


class ReplyReader:
    """Assembles SMTP replies from bytes; bounded in line length and line count."""

    def __init__(self, max_line: int):
        self.lines = LineReader(max_line)
        self._partial: list[bytes] = []
        self._code: int | None = None

    def feed(self, data: bytes) -> list[Reply]:
        self.lines.feed(data)
        replies = []
        while (line := self.lines.read_line()) is not None:
            if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in (b"", b" ", b"-"):
                raise ProtocolError(f"upstream sent a malformed SMTP reply: {printable(line, 80)}")
            code = int(line[:3])
            if self._code is not None and code != self._code:
                raise ProtocolError("upstream sent a multi-line reply with mixed codes")
            self._code = code
            self._partial.append(line[4:])
            if len(self._partial) > MAX_REPLY_LINES:
                raise ProtocolError(f"upstream reply longer than {MAX_REPLY_LINES} lines")
            if line[3:4] != b"-":
                replies.append(Reply(code, self._partial))
                self._partial, self._code = [], None
        return replies


def parse_ehlo(reply: Reply) -> tuple[str, ...]:
    """The extension lines of an EHLO reply (the first line is the server's name)."""
    return tuple(printable(line, 512) for line in reply.lines[1:] if line.strip())


def _has_extension(extensions: tuple[str, ...], keyword: str) -> bool:
    return any(ext.split(" ", 1)[0].upper() == keyword for ext in extensions)


def auth_mechanisms(extensions: tuple[str, ...]) -> set[str]:
    mechanisms: set[str] = set()
    for ext in extensions:
        words = ext.upper().split()
        if words and words[0] == "AUTH":
            mechanisms.update(words[1:])
        elif words and words[0].startswith("AUTH="):  # pre-RFC 4954 servers
            mechanisms.update([words[0][5:], *words[1:]])
    return mechanisms


class SMTPUpstream(UpstreamMachine):
    """Drives the upstream SMTP session until it is authenticated.

    The glue calls :meth:`start`, then :meth:`receive` with every upstream byte and
    :meth:`tls_established` once a handshake it was asked for completes; it carries out
    the returned actions.  ``credentials=None`` means no AUTH (NoAuthentication), unless
    ``login_later`` is set (the lazy OAuth2 types): then the machine stops after TLS and
    EHLO with :class:`UpstreamConnected`, and :meth:`authenticate` logs in later, as
    often as needed, each attempt ending in :class:`UpstreamReady` or
    :class:`LoginRefused`.
    """

    def __init__(
        self,
        *,
        implicit_tls: bool,
        starttls_enable: bool = True,
        starttls_required: bool = False,
        credentials: Credentials | None = None,
        ehlo_name: str = "mailgw",
        max_line: int = 8192,
        login_later: bool = False,
    ):
        super().__init__(
            implicit_tls=implicit_tls, starttls_enable=starttls_enable, starttls_required=starttls_required,
            credentials=credentials, login_later=login_later,
        )
        self.ehlo_name = ehlo_name.encode("ascii")
        self.extensions: tuple[str, ...] = ()
        self._replies = ReplyReader(max_line)

    # -- inputs --------------------------------------------------------------------

    def receive(self, data: bytes) -> list:
        handled = self._outside_login(data)
        if handled is not None:
            return handled
        try:
            replies = self._replies.feed(data)
        except ProtocolError as e:
            return self._fail(str(e))
        actions: list = []
        for index, reply in enumerate(replies):
            actions += self._on_reply(reply)
            if self._state == "tls-handshake":
                if index + 1 < len(replies) or len(self._replies.lines):
                    return self._fail(INJECTION)
            if self._state in ("failed", "ready"):
                break
        if self._state == "ready":
            leftover = self._replies.lines.take_rest()
            if leftover:
                self._pending.add(leftover)
        return actions

    def _after_starttls(self) -> list:
        return self._ehlo()

    def _ehlo(self) -> list:
        self._state = "ehlo"
        return [SendUpstream(b"EHLO " + self.ehlo_name + CRLF)]

    def _on_reply(self, reply: Reply) -> list:
        state = self._state
        if state == "greeting":
            if reply.code != 220:
                return self._fail(f"upstream greeting refused: {reply}", permanent=reply.code >= 500)
            return self._ehlo()
        if state == "ehlo":
            if reply.code != 250:
                if self.credentials is not None or self.login_later or self.starttls_required:
                    return self._fail(f"upstream refused EHLO: {reply}")
                self._state = "helo"
                return [SendUpstream(b"HELO " + self.ehlo_name + CRLF)]
            self.extensions = parse_ehlo(reply)
            return self._after_ehlo()
        if state == "helo":
            if reply.code != 250:
                return self._fail(f"upstream refused HELO: {reply}")
            return self._ready()
        if state == "starttls":
            if reply.code != 220:
                if self.starttls_required:
                    return self._fail(f"upstream refused STARTTLS: {reply}")
                self.starttls_enable = False  # carry on in plaintext, as configured
                return self._login()
            self._state = "tls-handshake"
            return [StartTLS()]
        if state == "auth":
            return self._on_auth_reply(reply)
        if state == "awaiting-login":
            if reply.code == 421:
                return self._fail(f"upstream closed the session: {reply}", permanent=False)
            return self._fail(f"unexpected upstream reply while waiting for the application to authenticate: {reply}")
        return self._fail(f"unexpected upstream reply in state {state}: {reply}")

    def _after_ehlo(self) -> list:
        if not self.tls_active and self.starttls_enable:
            if _has_extension(self.extensions, "STARTTLS"):
                self._state = "starttls"
                return [SendUpstream(b"STARTTLS" + CRLF)]
            if self.starttls_required:
                return self._fail(
                    "upstream does not offer STARTTLS and the destination requires it"
                )
        return self._login()

    def _login(self) -> list:
        creds = self.credentials
        offered = auth_mechanisms(self.extensions)
        if creds is None:
            if self.login_later:
                return self._await_login(offered)
            return self._ready()
        if isinstance(creds, Password):
            if "PLAIN" in offered:
                self._auth_steps = []
                self._state = "auth"
                return [SendUpstream(b"AUTH PLAIN " + sasl.plain_initial_response(creds.user, creds.password) + CRLF)]
            if "LOGIN" in offered:
                self._auth_steps = [
                    sasl.b64encode(creds.user.encode("utf-8")),
                    sasl.b64encode(creds.password.encode("utf-8")),
                ]
                self._state = "auth"
                return [SendUpstream(b"AUTH LOGIN" + CRLF)]
            return self._fail(self._no_mechanism("PLAIN or LOGIN", offered))
        if isinstance(creds, BearerToken):
            if "XOAUTH2" in offered:
                self._auth_steps = [b""]  # answers the JSON error challenge
                self._state = "auth"
                return [SendUpstream(b"AUTH XOAUTH2 " + sasl.xoauth2_initial_response(creds.user, creds.token) + CRLF)]
            if "OAUTHBEARER" in offered:
                self._auth_steps = [sasl.b64encode(b"\x01")]
                self._state = "auth"
                return [SendUpstream(b"AUTH OAUTHBEARER " + sasl.oauthbearer_initial_response(creds.user, creds.token) + CRLF)]
            return self._fail(self._no_mechanism("XOAUTH2 or OAUTHBEARER", offered))
        raise TypeError(f"unknown credentials type {type(creds).__name__}")  # pragma: no cover

    def _await_login(self, offered: set[str]) -> list:
        if not offered & {"XOAUTH2", "OAUTHBEARER"}:
            return self._fail(self._no_mechanism("XOAUTH2 or OAUTHBEARER", offered))
        self._state = "awaiting-login"
        return [UpstreamConnected(self.extensions)]

    def _no_mechanism(self, wanted: str, offered: set[str]) -> str:
        if not offered:
            return "upstream offers no authentication (AUTH) on this connection"
        return f"upstream offers no {wanted} authentication (offers {' '.join(sorted(offered))})"

    def _on_auth_reply(self, reply: Reply) -> list:
        if reply.code == 235:
            return self._ready()
        if reply.code == 334 and self._auth_steps:
            return [SendUpstream(self._auth_steps.pop(0) + CRLF)]
        if reply.code == 334:
            return self._fail("upstream asked for more authentication data than expected")
        return self._refused(f"upstream refused the credentials: {reply}")

    def _ready(self) -> list:
        self._state = "ready"
        return [UpstreamReady(self.extensions)]


#: Extensions never advertised to the application: the gateway owns TLS and AUTH.
_HIDDEN_EXTENSIONS = ("STARTTLS", "AUTH")

_AUTH_PROMPTS = {
    "LOGIN": [b"VXNlcm5hbWU6", b"UGFzc3dvcmQ6"],  # "Username:", "Password:"
}

#: What the application may present when the destination exchanges its secret.
BEARER_MECHANISMS = ("XOAUTH2", "OAUTHBEARER")

#: Commands answered before authentication in ``lazy`` mode (the rest get 530).
_LAZY_BEFORE_AUTH = (b"EHLO", b"HELO", b"AUTH", b"RSET", b"NOOP", b"STARTTLS", b"QUIT")

#: Pipelined application bytes kept while the gateway exchanges a secret.
_MAX_WAITING = 65536


class SMTPAppSide:
    """The application-facing SMTP dialogue before release.

    Eager mode: EHLO/HELO and AUTH are answered locally (the offered credentials are
    discarded), RSET/NOOP too; every other command releases the session with itself and
    any pipelined bytes as the leftover, so the upstream sees them in order.

    ``lazy`` mode (OAuth2RefreshToken, OAuth2AuthorizationCode): EHLO advertises
    ``AUTH XOAUTH2 OAUTHBEARER``; ``AUTH XOAUTH2``/``OAUTHBEARER`` (inline or after a
    ``334``) is decoded into an :class:`ExchangeSecret` action, and the machine waits
    for :meth:`auth_succeeded` or :meth:`auth_refused`.  Before that, mail commands get
    ``530 5.7.0 Authentication required``; after it, the session releases as in eager
    mode.
    """

    def __init__(
        self, *, capabilities: tuple[str, ...] = (), hostname: str = "mailgw", max_line: int = 16384, lazy: bool = False
    ):
        self.hostname = hostname.encode("ascii", "replace")
        self.lazy = lazy
        # ``capabilities`` are the upstream's EHLO extensions (after login when eager).
        self.extensions = self._visible(capabilities)
        self._lines = LineReader(max_line)
        self._auth_prompts: list[bytes] | None = None  # not None while an AUTH is in progress
        self._bearer_mechanism: str | None = None  # lazy AUTH waiting for its response line
        self._waiting = False  # an ExchangeSecret is being carried out
        self._authenticated = False
        self._released = False
        self._closed = False

    def _visible(self, capabilities: tuple[str, ...]) -> tuple[str, ...]:
        auth = "AUTH " + " ".join(BEARER_MECHANISMS) if self.lazy else "AUTH PLAIN LOGIN"
        return tuple(ext for ext in capabilities if not ext.upper().startswith(_HIDDEN_EXTENSIONS)) + (auth,)

    def greeting(self) -> bytes:
        return b"220 " + self.hostname + b" ESMTP mailgw ready" + CRLF

    @staticmethod
    def refusal(reason: str, permanent: bool = True) -> bytes:
        """The greeting that refuses the session (SPEC: 554 permanent, 421 transient)."""
        text = printable(reason.encode("utf-8", "replace"), 400)
        if permanent:
            return f"554 5.3.0 mailgw: {text}".encode("ascii") + CRLF
        return f"421 4.3.0 mailgw: {text}".encode("ascii") + CRLF

    @staticmethod
    def goodbye(reason: str) -> bytes:
        """What the application gets when the gateway closes a session (drain, idle)."""
        text = printable(reason.encode("utf-8", "replace"), 400)
        return f"421 4.3.2 mailgw: {text}".encode("ascii") + CRLF

    def receive(self, data: bytes) -> list:
        if self._released:
            raise ProtocolError("receive() after release")
        if self._closed:
            return []
        self._lines.feed(data)
        if self._waiting:
            if len(self._lines) > _MAX_WAITING:
                self._closed = True
                return [
                    SendToApp(b"421 4.7.0 mailgw: too much data sent during authentication" + CRLF),
                    Close("application sent too much data during authentication"),
                ]
            return []
        return self._process()

    # -- lazy authentication results -----------------------------------------------

    def auth_succeeded(self, capabilities: tuple[str, ...]) -> list:
        """The upstream accepted the exchanged token; ``capabilities`` are its EHLO
        extensions after login."""
        self._waiting, self._authenticated = False, True
        self.extensions = self._visible(capabilities)
        return [SendToApp(b"235 2.7.0 Authentication successful" + CRLF)] + self._process()

    def auth_refused(self, reason: str, transient: bool = False) -> list:
        """The exchange or the upstream login failed; the application may try again."""
        self._waiting = False
        text = printable(reason.encode("utf-8", "replace"), 400).encode("ascii")
        prefix = b"454 4.7.0 mailgw: " if transient else b"535 5.7.8 mailgw: "
        return [SendToApp(prefix + text + CRLF)] + self._process()

    # -- commands --------------------------------------------------------------------

    def _process(self) -> list:
        actions: list = []
        while not self._waiting:
            try:
                line = self._lines.read_line()
            except LineTooLong:
                self._closed = True
                return actions + [
                    SendToApp(f"500 5.5.6 mailgw: command line too long (limit {self._lines.max_line} bytes)".encode() + CRLF),
                    Close("application command line too long"),
                ]
            if line is None:
                break
            if self._bearer_mechanism is not None:
                actions += self._bearer_response(line)
                continue
            if self._auth_prompts is not None:
                actions += self._auth_continue(line)
                continue
            verb, arg = first_word(line)
            if self.lazy and not self._authenticated and verb not in _LAZY_BEFORE_AUTH:
                actions.append(SendToApp(b"530 5.7.0 Authentication required" + CRLF))
            elif verb in (b"EHLO", b"HELO"):
                actions.append(SendToApp(self._hello(verb, arg)))
            elif verb == b"AUTH":
                actions += self._auth_start(arg)
            elif verb in (b"RSET", b"NOOP"):
                actions.append(SendToApp(b"250 2.0.0 OK" + CRLF))
            elif verb == b"STARTTLS":
                actions.append(SendToApp(b"502 5.5.1 mailgw: STARTTLS is not offered on this listener" + CRLF))
            elif verb == b"QUIT" and self.lazy and not self._authenticated:
                self._closed = True
                return actions + [SendToApp(b"221 2.0.0 mailgw closing connection" + CRLF), Close("application quit")]
            else:
                self._released = True
                return actions + [Release(line + CRLF + self._lines.take_rest())]
        return actions

    def _hello(self, verb: bytes, arg: bytes) -> bytes:
        if not arg:
            return b"501 5.5.4 Syntax: " + verb + b" hostname" + CRLF
        if verb == b"HELO":
            return b"250 " + self.hostname + CRLF
        lines = [self.hostname] + [ext.encode("ascii", "replace") for ext in self.extensions]
        return b"".join(
            b"250" + (b" " if i == len(lines) - 1 else b"-") + text + CRLF for i, text in enumerate(lines)
        )

    def _auth_start(self, arg: bytes) -> list:
        if self._authenticated:
            return [SendToApp(b"503 5.5.1 Already authenticated" + CRLF)]
        mechanism, _, initial = arg.partition(b" ")
        if not mechanism:
            return [SendToApp(b"501 5.5.4 Syntax: AUTH mechanism" + CRLF)]
        name = mechanism.upper().decode("ascii", "replace")
        if self.lazy:
            if name not in BEARER_MECHANISMS:
                return [SendToApp(
                    b"504 5.5.4 mailgw: this destination needs AUTH XOAUTH2 or OAUTHBEARER"
                    b" carrying the refresh token or authorization code" + CRLF
                )]
            if initial.strip():
                self._bearer_mechanism = name
                return self._bearer_response(initial)
            self._bearer_mechanism = name
            return [SendToApp(b"334 " + CRLF)]
        prompts = list(_AUTH_PROMPTS.get(name, [b""]))
        if initial:
            prompts.pop(0)  # the initial response answers the first prompt
        if not prompts:
            return self._auth_done()
        self._auth_prompts = prompts
        return [SendToApp(b"334 " + self._auth_prompts.pop(0) + CRLF)]

    def _bearer_response(self, response: bytes) -> list:
        mechanism, self._bearer_mechanism = self._bearer_mechanism, None
        if response.strip() == b"*":
            return [SendToApp(b"501 5.7.0 Authentication cancelled" + CRLF)]
        try:
            presented = sasl.decode_initial_response(mechanism, response)
        except sasl.SASLError as e:
            return [SendToApp(f"501 5.5.2 mailgw: malformed authentication response: {e}".encode("ascii", "replace") + CRLF)]
        self._waiting = True
        return [ExchangeSecret(mechanism, presented.user, presented.secret)]

    def _auth_continue(self, line: bytes) -> list:
        if line.strip() == b"*":
            self._auth_prompts = None
            return [SendToApp(b"501 5.7.0 Authentication cancelled" + CRLF)]
        if self._auth_prompts:
            return [SendToApp(b"334 " + self._auth_prompts.pop(0) + CRLF)]
        self._auth_prompts = None
        return self._auth_done()

    def _auth_done(self) -> list:
        self._authenticated = True
        return [SendToApp(b"235 2.7.0 Authentication successful" + CRLF)]
