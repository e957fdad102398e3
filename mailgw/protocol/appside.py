"""What the application-facing machines of SMTP, IMAP and POP3 share.

Until release the gateway answers the application's login dialogue itself.  The shape
of that dialogue is the same in the three protocols and lives here once: the bounded
line reader, the local SASL prompts (discarding what the application offers), the lazy
OAuth2 flow (the application presents its refresh token or authorisation code with
XOAUTH2 or OAUTHBEARER: decode it, hand it to the session as :class:`ExchangeSecret`,
wait for the outcome while bounding what the application pipelines meanwhile), release
and close.  What differs is how each protocol writes a reply: a :class:`Dialect`.  Each
protocol's machine supplies its dialect and its command table (``_command``).
"""

from __future__ import annotations

import enum

from attrs import frozen

from . import sasl
from .actions import Close, ExchangeSecret, MisuseError, Release, SendToApp
from .common import printable
from .lines import LineReader, LineTooLong

CRLF = b"\r\n"

#: What the application may present when the destination exchanges its secret.
BEARER_MECHANISMS = ("XOAUTH2", "OAUTHBEARER")

#: Application bytes kept while the gateway exchanges a secret (a pipelining client).
MAX_WAITING = 65536

#: The local prompts of each SASL mechanism the application may use in eager mode:
#: LOGIN asks for the user and the password; every other mechanism gets one empty
#: challenge (answered by its initial response).
PROMPTS = {"LOGIN": (sasl.LOGIN_USER_CHALLENGE, sasl.LOGIN_PASSWORD_CHALLENGE)}

NO_TOKEN = "carries no token: this destination needs {auth} XOAUTH2 or OAUTHBEARER with the refresh token or authorization code"


def safe_text(reason: str, limit: int = 400) -> bytes:
    """Text for a reply line: printable ASCII, bounded, never a line break."""
    return printable(reason.encode("utf-8", "replace"), limit).encode("ascii")


class Phase(enum.Enum):
    """Where the application-side dialogue is."""

    COMMAND = "command"  # reading commands
    PROMPTS = "prompts"  # eager AUTH: answering the gateway's local challenges
    BEARER = "bearer"  # lazy AUTH: waiting for the response that carries the secret
    WAITING = "waiting"  # lazy AUTH: the session is exchanging the secret
    LITERAL = "literal"  # IMAP: reading a locally answered command after a literal
    RELEASED = "released"
    CLOSED = "closed"


@frozen
class Dialect:
    """How one protocol words the replies of the shared dialogue: a template per reply.

    Templates are ``str.format`` strings without the CRLF.  ``{tag}`` is the IMAP
    command tag (empty for SMTP and POP3), ``{text}``, ``{why}`` and ``{what}`` are
    explanations (made printable and bounded first), ``{caps}`` the capabilities the
    application is told, ``{host}`` the gateway's host name, ``{limit}`` the line limit
    and ``{challenge}`` a SASL challenge.
    """

    auth_command: str  # the login command that carries SASL, for error texts
    greeting: str
    refusal_permanent: str  # the greeting that refuses a session (upstream, limits)
    refusal_transient: str
    goodbye: str  # the gateway ends a session (drain, idle, dialogue deadline, upstream gone)
    too_long: str
    continuation: str
    auth_done: str  # eager mode: the application's login, answered locally
    auth_succeeded: str  # lazy mode: the upstream accepted the exchanged token
    auth_refused: str  # lazy mode: refused; the application may try again
    auth_unavailable: str  # lazy mode: the token service or the upstream may recover
    auth_cancelled: str
    auth_malformed: str
    auth_without_token: str  # lazy mode: a command or mechanism that carries no secret

    def reply(self, name: str, tag: bytes = b"", **values) -> bytes:
        """The reply ``name`` (one of the templates above) filled in, as a CRLF-terminated
        line."""
        for key in ("text", "why"):
            if key in values:
                values[key] = safe_text(values[key]).decode("ascii")
        text = getattr(self, name).format(tag=tag.decode("latin-1"), **values)
        return text.encode("latin-1", "replace") + CRLF

    def refusal(self, text: str, permanent: bool = True) -> bytes:
        return self.reply("refusal_permanent" if permanent else "refusal_transient", text=text)


# How each protocol words the replies of the shared dialogue, side by side.

#: How SMTP words the replies of the shared dialogue (RFC 5321, RFC 4954): a refusal is
#: 554 when retrying will not help, 421 when it may.
SMTP_DIALECT = Dialect(
    auth_command="AUTH",
    greeting="220 {host} ESMTP mailgw ready",
    refusal_permanent="554 5.3.0 mailgw: {text}",
    refusal_transient="421 4.3.0 mailgw: {text}",
    goodbye="421 4.3.2 mailgw: {text}",
    too_long="500 5.5.6 mailgw: command line too long (limit {limit} bytes)",
    continuation="334 {challenge}",
    auth_done="235 2.7.0 Authentication successful",
    auth_succeeded="235 2.7.0 Authentication successful",
    auth_refused="535 5.7.8 mailgw: {text}",
    auth_unavailable="454 4.7.0 mailgw: {text}",
    auth_cancelled="501 5.7.0 Authentication cancelled",
    auth_malformed="501 5.5.2 mailgw: malformed authentication response: {why}",
    auth_without_token="504 5.5.4 mailgw: {what}",
)


#: How IMAP words the replies of the shared dialogue (RFC 3501, RFC 4959): it has only
#: BYE to refuse a session or end one.
IMAP_DIALECT = Dialect(
    auth_command="AUTHENTICATE",
    greeting="* OK [CAPABILITY {caps}] mailgw ready",
    refusal_permanent="* BYE mailgw: {text}",
    refusal_transient="* BYE mailgw: {text}",
    goodbye="* BYE mailgw: {text}",
    too_long="* BYE mailgw: command line too long (limit {limit} bytes)",
    continuation="+ {challenge}",
    auth_done="{tag} OK AUTHENTICATE completed",
    auth_succeeded="{tag} OK [CAPABILITY {caps}] AUTHENTICATE completed",
    auth_refused="{tag} NO [AUTHENTICATIONFAILED] mailgw: {text}",
    auth_unavailable="{tag} NO [UNAVAILABLE] mailgw: {text}",
    auth_cancelled="{tag} BAD AUTHENTICATE cancelled",
    auth_malformed="{tag} BAD mailgw: malformed authentication response: {why}",
    auth_without_token="{tag} NO [CANNOT] mailgw: {what}",
)


#: How POP3 words the replies of the shared dialogue (RFC 1939, RFC 5034, RFC 3206).
POP3_DIALECT = Dialect(
    auth_command="AUTH",
    greeting="+OK mailgw ready",
    refusal_permanent="-ERR mailgw: {text}",
    refusal_transient="-ERR mailgw: {text}",
    goodbye="-ERR mailgw: {text}",
    too_long="-ERR mailgw: command line too long (limit {limit} bytes)",
    continuation="+ {challenge}",
    auth_done="+OK Logged in.",
    auth_succeeded="+OK Logged in.",
    auth_refused="-ERR [AUTH] mailgw: {text}",
    auth_unavailable="-ERR [SYS/TEMP] mailgw: {text}",
    auth_cancelled="-ERR Authentication cancelled",
    auth_malformed="-ERR mailgw: malformed authentication response: {why}",
    auth_without_token="-ERR [AUTH] mailgw: {what}",
)


class AppSide:
    """The application-facing dialogue before release, protocol-independent part.

    Eager mode: the application's own login is answered locally (whatever it offers is
    discarded); the first command that needs the upstream releases the session with
    itself and any pipelined bytes as the leftover, so the upstream sees them in order.

    Lazy mode (OAuth2RefreshToken, OAuth2AuthorizationCode): the application must
    authenticate with XOAUTH2 or OAUTHBEARER carrying its secret; the machine returns
    :class:`ExchangeSecret` and answers nothing until :meth:`auth_succeeded` or
    :meth:`auth_refused`.
    """

    dialect: Dialect

    def __init__(
        self, *, capabilities: tuple[str, ...] = (), hostname: str = "mailgw", max_line: int = 16384, lazy: bool = False
    ):
        self.hostname = hostname
        self.lazy = lazy
        self.max_line = max_line
        self.phase = Phase.COMMAND
        self.authenticated = False
        self._lines = LineReader(max_line)
        self._tag = b""  # of the login command in progress (IMAP)
        self._prompts: list[bytes] = []
        self._mechanism = ""  # lazy: the bearer mechanism whose response is awaited
        self._literal_left = 0  # IMAP: literal bytes of a local command still to skip
        self.set_capabilities(capabilities)

    # -- the session's calls -------------------------------------------------------------

    def set_capabilities(self, capabilities: tuple[str, ...]) -> None:
        """What the upstream offers (after login when eager): what the application is
        told, minus what the gateway owns (TLS, login)."""
        raise NotImplementedError  # pragma: no cover - every protocol has its own

    def capability_text(self) -> str:
        """The capabilities as the greeting and replies name them (IMAP)."""
        return ""

    def greeting(self) -> bytes:
        return self.dialect.reply("greeting", host=self.hostname, caps=self.capability_text())

    @property
    def buffered(self) -> int:
        """Application bytes held: a partial line (at most ``max_line``), or what the
        application pipelines while a secret is exchanged (at most :data:`MAX_WAITING`)."""
        return len(self._lines)

    def receive(self, data: bytes) -> list:
        """Bytes from the application."""
        if self.phase is Phase.RELEASED:
            raise MisuseError("receive() after release")
        if self.phase is Phase.CLOSED:
            return []
        self._lines.feed(data)
        if self.phase is Phase.WAITING:
            if len(self._lines) > MAX_WAITING:
                return self._close("sent too much data during authentication")
            return []
        return self._process()

    def auth_succeeded(self, capabilities: tuple[str, ...]) -> list:
        """Lazy mode: the upstream accepted the exchanged token; ``capabilities`` are
        its capabilities after login."""
        self._expect(Phase.WAITING)
        self.phase, self.authenticated = Phase.COMMAND, True
        self.set_capabilities(capabilities)
        return [self._say("auth_succeeded", self._tag, caps=self.capability_text())] + self._process()

    def auth_refused(self, reason: str, transient: bool = False) -> list:
        """Lazy mode: the exchange or the upstream login failed; the application may try
        again (``transient``: the token service or the upstream may recover)."""
        self._expect(Phase.WAITING)
        self.phase = Phase.COMMAND
        return [self._say("auth_unavailable" if transient else "auth_refused", self._tag, text=reason)] + self._process()

    # -- the loop ----------------------------------------------------------------------

    def _say(self, reply: str, tag: bytes = b"", **values) -> SendToApp:
        """One of the dialect's replies (see :class:`Dialect`), as an action."""
        return SendToApp(self.dialect.reply(reply, tag, **values))

    def _expect(self, *phases: Phase) -> None:
        if self.phase not in phases:
            raise MisuseError(
                f"{type(self).__name__}: called in phase {self.phase.value}, "
                f"expected {' or '.join(p.value for p in phases)}"
            )

    def _process(self) -> list:
        actions: list = []
        while self.phase in (Phase.COMMAND, Phase.PROMPTS, Phase.BEARER, Phase.LITERAL):
            if self._literal_left:
                count = min(self._literal_left, len(self._lines))
                if not count:
                    break
                self._lines.read_exactly(count)  # a credential or refused data: discarded
                self._literal_left -= count
                continue
            try:
                line = self._lines.read_line()
            except LineTooLong:
                self.phase = Phase.CLOSED
                return actions + [
                    self._say("too_long", limit=self.max_line),
                    Close("application command line too long"),
                ]
            if line is None:
                break
            if self.phase is Phase.PROMPTS:
                actions += self._prompt_answered(line)
            elif self.phase is Phase.BEARER:
                actions += self._bearer_response(line)
            elif self.phase is Phase.LITERAL:
                actions += self._literal_line(line)
            else:
                actions += self._command(line)
        return actions

    def _command(self, line: bytes) -> list:  # pragma: no cover - every protocol has its own
        raise NotImplementedError

    def _literal_line(self, line: bytes) -> list:  # pragma: no cover - IMAP only
        raise MisuseError("literal phase in a protocol without literals")

    def _release(self, line: bytes) -> list:
        self.phase = Phase.RELEASED
        return [Release(line + CRLF + self._lines.take_rest())]

    def _close(self, text: str) -> list:
        """Close the session because of the application: one closing line, then Close."""
        self.phase = Phase.CLOSED
        return [self._say("goodbye", text=text), Close(f"application {text}")]

    def _quit(self, reply: bytes, why: str = "application quit") -> list:
        self.phase = Phase.CLOSED
        return [SendToApp(reply), Close(why)]

    # -- eager login: local prompts --------------------------------------------------------

    def _start_prompts(self, tag: bytes, mechanism: bytes, initial: bytes) -> list:
        """The application's AUTH/AUTHENTICATE in eager mode: prompt as the mechanism
        would, discard the answers, then report success."""
        self._tag = tag
        prompts = list(PROMPTS.get(mechanism.upper().decode("ascii", "replace"), (b"",)))
        if initial.strip():
            prompts.pop(0)  # the initial response answers the first prompt
        if not prompts:
            return self._auth_done()
        self._prompts = prompts
        self.phase = Phase.PROMPTS
        return [self._say("continuation", challenge=self._prompts.pop(0).decode("ascii"))]

    def _prompt_answered(self, line: bytes) -> list:
        if line.strip() == b"*":
            self.phase = Phase.COMMAND
            return [self._say("auth_cancelled", self._tag)]
        if self._prompts:
            return [self._say("continuation", challenge=self._prompts.pop(0).decode("ascii"))]
        return self._auth_done()

    def _auth_done(self) -> list:
        self.phase = Phase.COMMAND
        self.authenticated = True
        return [self._say("auth_done", self._tag)]

    # -- lazy login: the secret the application presents ---------------------------------

    def _start_bearer(self, tag: bytes, mechanism: bytes, initial: bytes) -> list:
        """The application's AUTH/AUTHENTICATE in lazy mode."""
        self._tag = tag
        name = mechanism.upper().decode("ascii", "replace")
        if name not in BEARER_MECHANISMS:
            return self._without_token(tag, b"this mechanism")
        self._mechanism = name
        if initial.strip():
            return self._bearer_response(initial)
        self.phase = Phase.BEARER
        return [self._say("continuation", challenge="")]

    def _bearer_response(self, response: bytes) -> list:
        self.phase = Phase.COMMAND
        if response.strip() == b"*":
            return [self._say("auth_cancelled", self._tag)]
        try:
            presented = sasl.decode_initial_response(self._mechanism, response)
        except sasl.SASLError as e:
            return [self._say("auth_malformed", self._tag, why=str(e))]
        self.phase = Phase.WAITING
        return [ExchangeSecret(self._mechanism, presented.user, presented.secret)]

    def _without_token(self, tag: bytes, verb: bytes) -> list:
        """Lazy mode: a login command that cannot carry the secret (USER, LOGIN, …)."""
        what = verb.decode("ascii", "replace") + " " + NO_TOKEN.format(auth=self.dialect.auth_command)
        return [self._say("auth_without_token", tag, what=what)]
