"""IMAP4rev1, both sides, sans-IO.

:class:`IMAPUpstream` logs in to the real server: greeting (possibly carrying
``[CAPABILITY ...]`` or ``PREAUTH``), CAPABILITY, STARTTLS (with the injection guard),
CAPABILITY again, then AUTHENTICATE PLAIN / XOAUTH2 / OAUTHBEARER or LOGIN, and captures
the post-login capability list.  :class:`IMAPAppSide` talks to the application until
release: it greets with ``* OK [CAPABILITY ...]``, answers CAPABILITY, LOGIN,
AUTHENTICATE, NOOP, ID and LOGOUT locally and releases at the first other command; tags
are preserved because that command goes upstream untouched.
"""

from __future__ import annotations

import re

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

#: ``{n}`` or ``{n+}`` at the end of a line announces a literal of n bytes.
_LITERAL = re.compile(rb"\{(\d+)(\+?)\}$")
#: More digits than this is a literal size nobody means (and ``int()`` of thousands of
#: digits is slow, or refused outright by Python's int/str limit).
_MAX_LITERAL_DIGITS = 10
#: Untagged responses whose text is resp-text, never followed by a literal.
_STATUS_RESPONSES = frozenset((b"OK", b"NO", b"BAD", b"BYE", b"PREAUTH"))
#: RFC 7888: LITERAL- allows non-synchronizing literals up to this size only.
_LITERAL_MINUS_MAX = 4096



def _literal_size(match: re.Match) -> int | None:
    digits = match.group(1)
    if len(digits) > _MAX_LITERAL_DIGITS:
        return None
    return int(digits)


# ---------------------------------------------------------------------------------------
# Upstream responses


class Response:
    """One complete server response.

    ``tag`` is ``b"*"`` (untagged), ``b"+"`` (continuation request) or the command tag;
    ``status`` the upper-cased word after the tag (``OK``, ``CAPABILITY``, ``3`` ...);
    ``text`` what follows it on the first line.  Literal contents are read and dropped:
    nothing before login needs them.
    """

    def __init__(self, line: bytes):
        self.line = line
        if line.startswith(b"+"):
            self.tag, self.status, self.text = b"+", b"", line[1:].lstrip(b" ")
        else:
            self.tag, _, rest = line.partition(b" ")
            status, _, self.text = rest.partition(b" ")
            self.status = status.upper()

    def code(self) -> tuple[bytes, bytes] | None:
        """The response code ``[NAME args]`` of a status response, if any."""
        if not self.text.startswith(b"["):
            return None
        end = self.text.find(b"]")
        if end < 0:
            return None
        name, _, args = self.text[1:end].partition(b" ")
        return name.upper(), args

    def capabilities(self) -> tuple[str, ...] | None:
        """The capability atoms this response carries (untagged CAPABILITY or a
        ``[CAPABILITY ...]`` response code), else ``None``."""
        if self.tag == b"*" and self.status == b"CAPABILITY":
            return parse_capabilities(self.text)
        code = self.code()
        if code is not None and code[0] == b"CAPABILITY":
            return parse_capabilities(code[1])
        return None

    def __str__(self) -> str:
        """Safe to log or show: the status and text, without the tag."""
        if self.tag == b"+":
            return printable(b"+ " + self.text)
        return printable(self.status + b" " + self.text if self.text else self.status)


def parse_capabilities(text: bytes) -> tuple[str, ...]:
    return tuple(printable(atom, 200) for atom in text.split() if atom)


class ResponseReader:
    """Splits upstream bytes into :class:`Response` values, one at a time.

    Literals (``{n}`` CRLF and n bytes) inside untagged data responses are consumed as
    they arrive, so the buffer never holds more than one line; a whole response (lines
    and literals) is bounded by ``max_response``.
    """

    def __init__(self, max_line: int, max_response: int):
        self.lines = LineReader(max_line)
        self.max_response = max_response
        self._first: bytes | None = None
        self._size = 0
        self._literal_left = 0

    def feed(self, data: bytes) -> None:
        self.lines.feed(data)

    def idle(self) -> bool:
        """True when nothing at all is buffered or half read."""
        return self._first is None and not len(self.lines)

    def take_rest(self) -> bytes:
        return self.lines.take_rest()

    def next(self) -> Response | None:
        while True:
            if self._literal_left:
                count = min(self._literal_left, len(self.lines))
                if not count:
                    return None
                self.lines.read_exactly(count)
                self._literal_left -= count
                continue
            line = self.lines.read_line()
            if line is None:
                return None
            self._size += len(line) + 2
            if self._size > self.max_response:
                raise ProtocolError(f"upstream response longer than {self.max_response} bytes")
            if self._first is None:
                self._first = line
                words = line.split(b" ", 2)
                may_have_literal = (
                    words[0] == b"*" and len(words) > 1 and words[1].upper() not in _STATUS_RESPONSES
                )
            else:
                may_have_literal = True  # a line after a literal continues a data response
            match = _LITERAL.search(line) if may_have_literal else None
            if match is not None:
                size = _literal_size(match)
                if size is None or self._size + size > self.max_response:
                    raise ProtocolError(f"upstream response longer than {self.max_response} bytes")
                self._size += size
                self._literal_left = size
                continue
            response = Response(self._first)
            self._first, self._size = None, 0
            return response


# ---------------------------------------------------------------------------------------
# Quoting


def needs_literal(value: bytes) -> bool:
    """A quoted string cannot carry CR, LF, NUL or 8-bit bytes: those need a literal."""
    return any(b in (0, 10, 13) or b > 0x7F for b in value)


def quote(value: bytes) -> bytes:
    """An IMAP quoted string (RFC 3501 section 4.3) for 7-bit text without CR/LF/NUL."""
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def login_command(tag: bytes, user: bytes, password: bytes, literal_plus: bool, literal_minus: bool) -> list[bytes]:
    """The LOGIN command as the chunks to send: the first at once, each further one after
    a ``+`` continuation request (one per synchronizing literal)."""
    chunks: list[bytes] = []
    current = tag + b" LOGIN"
    for value in (user, password):
        current += b" "
        if not needs_literal(value):
            current += quote(value)
            continue
        non_sync = literal_plus or (literal_minus and len(value) <= _LITERAL_MINUS_MAX)
        current += b"{%d%s}" % (len(value), b"+" if non_sync else b"") + CRLF
        if not non_sync:
            chunks.append(current)
            current = b""
        current += value
    chunks.append(current + CRLF)
    return chunks


# ---------------------------------------------------------------------------------------
# Upstream


class IMAPUpstream(UpstreamMachine):
    """Drives the upstream IMAP session until it is authenticated.

    The glue calls :meth:`start`, then :meth:`receive` with every upstream byte and
    :meth:`tls_established` once a handshake it was asked for completes; it carries out
    the returned actions.  ``credentials=None`` means no login (NoAuthentication), unless
    ``login_later`` is set (the lazy OAuth2 types): then the machine stops after TLS and
    CAPABILITY with :class:`UpstreamConnected`, and :meth:`authenticate` logs in later,
    as often as needed, each attempt ending in :class:`UpstreamReady` or
    :class:`LoginRefused`.
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
        self._reader = ResponseReader(max_line, max(4 * max_line, 65536))
        self._preauth = False
        self._serial = 0
        self._tag = b""
        self._seen_caps: tuple[str, ...] | None = None  # untagged, since the last command
        self._steps: list[bytes] = []  # what to send on each further "+" continuation
        self._error_reply: bytes | None = None  # answer to a bearer error challenge
        self._challenge_status: str | None = None

    # -- inputs --------------------------------------------------------------------

    def receive(self, data: bytes) -> list:
        handled = self._outside_login(data)
        if handled is not None:
            return handled
        self._reader.feed(data)
        actions: list = []
        while True:
            try:
                response = self._reader.next()
            except ProtocolError as e:
                return actions + self._fail(str(e))
            if response is None:
                return actions
            actions += self._on_response(response)
            if self._state == "tls-handshake" and not self._reader.idle():
                # Plaintext after the go-ahead would be read as if it came through the
                # TLS tunnel: a response-injection attack (CVE-2011-0411 and kin).
                return self._fail(INJECTION)
            if self._state == "failed":
                return actions
            if self._state == "ready":
                leftover = self._reader.take_rest()
                if leftover and not self._pending.add(leftover):
                    return self._fail("upstream sent too much unsolicited data", permanent=False)
                return actions

    def _after_starttls(self) -> list:
        self.capabilities = ()  # RFC 3501 6.2.1: forget what was said in plaintext
        return self._command("capability", b"CAPABILITY")

    def _next_tag(self) -> bytes:
        self._serial += 1
        self._tag = b"g%d" % self._serial
        self._seen_caps = None
        return self._tag

    def _command(self, state: str, text: bytes) -> list:
        self._state = state
        return [SendUpstream(self._next_tag() + b" " + text + CRLF)]

    def _has(self, capability: str) -> bool:
        return any(c.upper() == capability for c in self.capabilities)

    def _auth_mechanisms(self) -> list[str]:
        return [c[5:].upper() for c in self.capabilities if c.upper().startswith("AUTH=")]

    # -- responses -------------------------------------------------------------------

    def _on_response(self, response: Response) -> list:
        state = self._state
        if state == "greeting":
            return self._on_greeting(response)
        if response.tag == b"*":
            return self._on_untagged(response)
        if response.tag == b"+":
            return self._on_continuation(response)
        if state == "awaiting-login":
            return self._fail(
                f"upstream sent an unexpected response while waiting for the application to authenticate: {printable(response.line, 80)}"
            )
        if response.tag != self._tag:
            return self._fail(f"upstream answered an unknown tag: {printable(response.line, 80)}")
        if response.status not in (b"OK", b"NO", b"BAD"):
            return self._fail(f"upstream sent a malformed tagged response: {printable(response.line, 80)}")
        ok = response.status == b"OK"
        if state == "capability":
            if not ok:
                return self._fail(f"upstream refused CAPABILITY: {response}")
            self.capabilities = self._caps_from(response) or ()
            return self._after_capabilities()
        if state == "starttls":
            if ok:
                self._state = "tls-handshake"
                return [StartTLS()]
            if self.starttls_required:
                return self._fail(f"upstream refused STARTTLS: {response}")
            self.starttls_enable = False  # carry on in plaintext, as configured
            return self._login()
        if state in ("authenticate", "login"):
            if ok:
                return self._logged_in(response)
            reason = f"upstream refused the credentials: {response}"
            if self._challenge_status:
                reason += f" (token status {self._challenge_status})"
            return self._refused(reason)
        if state == "capability-after-login":
            caps = self._caps_from(response) if ok else None
            return self._ready(caps if caps is not None else self.capabilities)
        raise ProtocolError(f"unexpected upstream response in state {state}")  # pragma: no cover

    def _caps_from(self, response: Response) -> tuple[str, ...] | None:
        caps = response.capabilities()
        return caps if caps is not None else self._seen_caps

    def _on_greeting(self, response: Response) -> list:
        if response.tag != b"*" or response.status not in (b"OK", b"PREAUTH", b"BYE"):
            return self._fail(f"upstream sent a malformed IMAP greeting: {printable(response.line, 80)}")
        if response.status == b"BYE":
            return self._fail(f"upstream refused the session: {response}", permanent=False)
        self._preauth = response.status == b"PREAUTH"
        caps = response.capabilities()
        if caps is None:
            return self._command("capability", b"CAPABILITY")
        self.capabilities = caps
        return self._after_capabilities()

    def _on_untagged(self, response: Response) -> list:
        if response.status == b"BYE":
            return self._fail(f"upstream closed the session: {response}", permanent=False)
        caps = response.capabilities()
        if caps is not None:
            self._seen_caps = caps
        return []  # other untagged data (alerts, ENABLED, ...) is of no concern here

    def _on_continuation(self, response: Response) -> list:
        if self._state not in ("authenticate", "login"):
            return self._fail(f"upstream sent an unexpected continuation request: {response}")
        if self._steps:
            return [SendUpstream(self._steps.pop(0))]
        if self._state == "authenticate" and self._error_reply is not None:
            # XOAUTH2 / OAUTHBEARER: the server refused the token and sent a JSON error
            # challenge; answering it gets the final tagged NO.
            reply, self._error_reply = self._error_reply, None
            try:
                status = sasl.decode_error_challenge(response.text).get("status")
            except sasl.SASLError:
                status = None
            self._challenge_status = printable(status.encode("utf-8", "replace"), 40) if status else None
            return [SendUpstream(reply + CRLF)]
        return self._fail("upstream asked for more authentication data than expected")

    # -- steps -----------------------------------------------------------------------

    def _after_capabilities(self) -> list:
        if not self.tls_active and self.starttls_enable:
            if self._preauth:
                if self.starttls_required:
                    return self._fail("upstream greeted with PREAUTH, so STARTTLS is impossible, and the destination requires it")
            elif self._has("STARTTLS"):
                return self._command("starttls", b"STARTTLS")
            elif self.starttls_required:
                return self._fail("upstream does not offer STARTTLS and the destination requires it")
        return self._login()

    def _login(self) -> list:
        creds = self.credentials
        if creds is None and self.login_later and not self._preauth:
            return self._await_login()
        if creds is None or self._preauth:
            return self._ready(self.capabilities)
        mechanisms = self._auth_mechanisms()
        self._steps, self._error_reply, self._challenge_status = [], None, None
        if isinstance(creds, Password):
            if "PLAIN" in mechanisms:
                try:
                    response = sasl.plain_initial_response(creds.user, creds.password)
                except sasl.SASLError:
                    return self._fail("the configured user or password contains NUL, which PLAIN cannot carry")
                return self._authenticate(b"PLAIN", response)
            if self._has("LOGINDISABLED"):
                return self._fail(
                    "upstream disables LOGIN on this connection"
                    + ("" if self.tls_active else " (it is not encrypted)")
                    + " and offers no AUTHENTICATE PLAIN"
                )
            chunks = login_command(
                self._next_tag(),
                creds.user.encode("utf-8"),
                creds.password.encode("utf-8"),
                literal_plus=self._has("LITERAL+"),
                literal_minus=self._has("LITERAL-"),
            )
            self._state = "login"
            self._steps = chunks[1:]
            return [SendUpstream(chunks[0])]
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
                    actions = self._authenticate(mechanism.encode("ascii"), response)
                    self._error_reply = sasl.error_challenge_reply(mechanism)
                    return actions
            return self._fail(self._no_mechanism("XOAUTH2 or OAUTHBEARER", mechanisms))
        raise TypeError(f"unknown credentials type {type(creds).__name__}")  # pragma: no cover

    def _authenticate(self, mechanism: bytes, response: bytes) -> list:
        if self._has("SASL-IR"):
            return self._command("authenticate", b"AUTHENTICATE " + mechanism + b" " + response)
        self._steps = [response + CRLF]
        return self._command("authenticate", b"AUTHENTICATE " + mechanism)

    def _await_login(self) -> list:
        mechanisms = self._auth_mechanisms()
        if not {"XOAUTH2", "OAUTHBEARER"} & set(mechanisms):
            return self._fail(self._no_mechanism("XOAUTH2 or OAUTHBEARER", mechanisms))
        self._state = "awaiting-login"
        return [UpstreamConnected(self.capabilities)]

    def _no_mechanism(self, wanted: str, offered: list[str]) -> str:
        if not offered:
            return f"upstream offers no {wanted} authentication (no AUTH= capability)"
        return f"upstream offers no {wanted} authentication (offers {' '.join(sorted(offered))})"

    def _logged_in(self, response: Response) -> list:
        caps = self._caps_from(response)
        if caps is not None:
            return self._ready(caps)
        return self._command("capability-after-login", b"CAPABILITY")

    def _ready(self, capabilities: tuple[str, ...]) -> list:
        self.capabilities = capabilities
        self._state = "ready"
        return [UpstreamReady(capabilities)]


# ---------------------------------------------------------------------------------------
# Application side


def _hidden(capability: str) -> bool:
    """Capabilities never advertised to the application: the gateway owns TLS and login."""
    upper = capability.upper()
    return upper in ("STARTTLS", "LOGINDISABLED", "SASL-IR", "IMAP4REV1") or upper.startswith("AUTH=")


#: What the application may present when the destination exchanges its secret.
BEARER_MECHANISMS = ("XOAUTH2", "OAUTHBEARER")

#: Pipelined application bytes kept while the gateway exchanges a secret.
_MAX_WAITING = 65536

_NO_TOKEN = b"carries no token: this destination needs AUTHENTICATE XOAUTH2 or OAUTHBEARER with the refresh token or authorization code"


class IMAPAppSide:
    """The application-facing IMAP dialogue before release.

    Eager mode: CAPABILITY, LOGIN (atom, quoted and literal forms), AUTHENTICATE (any
    mechanism, inline or with continuations), NOOP, ID (before login) and LOGOUT are
    answered locally with the client's own tag; offered credentials are discarded.
    Every other command releases the session with its line and any pipelined bytes as
    the leftover.

    ``lazy`` mode (OAuth2RefreshToken, OAuth2AuthorizationCode): the capabilities
    advertise ``AUTH=XOAUTH2 AUTH=OAUTHBEARER SASL-IR`` (and ``LOGINDISABLED``);
    ``AUTHENTICATE XOAUTH2``/``OAUTHBEARER`` (inline or after a ``+``) is decoded into an
    :class:`ExchangeSecret` action and the machine waits for :meth:`auth_succeeded` or
    :meth:`auth_refused`.  LOGIN and other mechanisms are refused (they carry no token);
    other commands before authentication get ``BAD``.  After it, CAPABILITY, NOOP and
    LOGOUT stay local and every other command releases.
    """

    def __init__(
        self, *, capabilities: tuple[str, ...] = (), hostname: str = "mailgw", max_line: int = 16384, lazy: bool = False
    ):
        self.hostname = hostname
        self.lazy = lazy
        self.capabilities = self._visible(capabilities, extra=(
            ("SASL-IR", "LOGINDISABLED") + tuple("AUTH=" + m for m in BEARER_MECHANISMS) if lazy else ("AUTH=PLAIN",)
        ))
        self.max_line = max_line
        self._lines = LineReader(max_line)
        # command, literal, auth (eager prompts), bearer (lazy response line), waiting
        # (exchange in progress), released, closed
        self._state = "command"
        self._tag = b""  # of the local command in progress (LOGIN with literals, AUTHENTICATE)
        self._command_size = 0
        self._literal_left = 0
        self._final = b""  # the answer to a command being read to its end
        self._finishes_login = False  # that command is a LOGIN answered OK
        self._refusing = False  # that command is refused
        self._auth_prompts: list[bytes] = []
        self._bearer_mechanism = ""
        self._authenticated = False

    @staticmethod
    def _visible(capabilities: tuple[str, ...], extra: tuple[str, ...]) -> tuple[str, ...]:
        # LITERAL+/LITERAL- stay when the upstream has them: this side accepts {n+} too.
        caps = ["IMAP4rev1"]
        for cap in capabilities:
            if not _hidden(cap) and cap.upper() not in (c.upper() for c in caps):
                caps.append(cap)
        return tuple(caps) + extra

    def greeting(self) -> bytes:
        return b"* OK [CAPABILITY " + self._caps() + b"] mailgw ready" + CRLF

    @staticmethod
    def refusal(reason: str, permanent: bool = True) -> bytes:
        """The greeting that refuses the session (IMAP has only BYE for that)."""
        return b"* BYE mailgw: " + printable(reason.encode("utf-8", "replace"), 400).encode("ascii") + CRLF

    @staticmethod
    def goodbye(reason: str) -> bytes:
        """What the application gets when the gateway closes a session (drain, idle)."""
        return b"* BYE mailgw: " + printable(reason.encode("utf-8", "replace"), 400).encode("ascii") + CRLF

    def _caps(self) -> bytes:
        return " ".join(self.capabilities).encode("ascii", "replace")

    def receive(self, data: bytes) -> list:
        if self._state == "released":
            raise ProtocolError("receive() after release")
        if self._state == "closed":
            return []
        self._lines.feed(data)
        if self._state == "waiting":
            if len(self._lines) > _MAX_WAITING:
                return self._close("sent too much data during authentication")
            return []
        return self._process()

    # -- lazy authentication results -----------------------------------------------

    def auth_succeeded(self, capabilities: tuple[str, ...]) -> list:
        """The upstream accepted the exchanged token; ``capabilities`` are its
        capabilities after login."""
        self._state, self._authenticated = "command", True
        self.capabilities = self._visible(capabilities, extra=())
        reply = self._tag + b" OK [CAPABILITY " + self._caps() + b"] AUTHENTICATE completed" + CRLF
        return [SendToApp(reply)] + self._process()

    def auth_refused(self, reason: str, transient: bool = False) -> list:
        """The exchange or the upstream login failed; the application may try again."""
        self._state = "command"
        code = b"[UNAVAILABLE]" if transient else b"[AUTHENTICATIONFAILED]"
        text = printable(reason.encode("utf-8", "replace"), 400).encode("ascii")
        return [SendToApp(self._tag + b" NO " + code + b" mailgw: " + text + CRLF)] + self._process()

    # -- commands --------------------------------------------------------------------

    def _process(self) -> list:
        actions: list = []
        while self._state not in ("released", "closed", "waiting"):
            if self._literal_left:
                count = min(self._literal_left, len(self._lines))
                if not count:
                    break
                self._lines.read_exactly(count)  # a LOGIN credential or refused data: discarded
                self._literal_left -= count
                continue
            try:
                line = self._lines.read_line()
            except LineTooLong:
                return actions + self._close(f"command line too long (limit {self.max_line} bytes)")
            if line is None:
                break
            if self._state == "auth":
                actions += self._auth_continue(line)
            elif self._state == "bearer":
                actions += self._bearer_response(line)
            elif self._state == "literal":
                actions += self._command_continue(line)
            else:
                actions += self._command(line)
        return actions

    def _close(self, reason: str) -> list:
        self._state = "closed"
        return [SendToApp(b"* BYE mailgw: " + reason.encode("ascii") + CRLF), Close(f"application {reason}")]

    def _command(self, line: bytes) -> list:
        if not line.strip():
            return [SendToApp(b"* BAD mailgw: empty command line" + CRLF)]
        tag, _, rest = line.partition(b" ")
        verb, arg = first_word(rest)
        if verb == b"CAPABILITY":
            return [SendToApp(b"* CAPABILITY " + self._caps() + CRLF + tag + b" OK CAPABILITY completed" + CRLF)]
        if verb == b"NOOP":
            return [SendToApp(tag + b" OK NOOP completed" + CRLF)]
        if verb == b"LOGOUT":
            self._state = "closed"
            return [
                SendToApp(b"* BYE mailgw logging out" + CRLF + tag + b" OK LOGOUT completed" + CRLF),
                Close("application logged out"),
            ]
        if verb == b"STARTTLS":
            return [SendToApp(tag + b" BAD mailgw: STARTTLS is not offered on this listener" + CRLF)]
        if self.lazy:
            if self._authenticated:
                return self._release(line)
            return self._lazy_command(tag, verb, arg, line)
        if verb == b"LOGIN":
            if not arg:
                return [SendToApp(tag + b" BAD LOGIN needs a user and a password" + CRLF)]
            return self._command_start(tag, line, tag + b" OK LOGIN completed" + CRLF, authenticates=True)
        if verb == b"AUTHENTICATE":
            return self._auth_start(tag, arg)
        if verb == b"ID" and not self._authenticated:
            # Some clients send ID before logging in; upstream, that would come too late.
            return [SendToApp(b"* ID NIL" + CRLF + tag + b" OK ID completed" + CRLF)]
        return self._release(line)

    def _release(self, line: bytes) -> list:
        self._state = "released"
        return [Release(line + CRLF + self._lines.take_rest())]

    def _lazy_command(self, tag: bytes, verb: bytes, arg: bytes, line: bytes) -> list:
        """A command before the application authenticated (lazy mode)."""
        if verb == b"AUTHENTICATE":
            return self._bearer_start(tag, arg)
        if verb == b"ID":
            return [SendToApp(b"* ID NIL" + CRLF + tag + b" OK ID completed" + CRLF)]
        if verb == b"LOGIN":
            reply = tag + b" NO [CANNOT] mailgw: LOGIN " + _NO_TOKEN + CRLF
        else:
            reply = tag + b" BAD mailgw: authentication required: AUTHENTICATE XOAUTH2 or OAUTHBEARER first" + CRLF
        return self._command_start(tag, line, reply, refused=True)

    def _command_start(self, tag: bytes, line: bytes, reply: bytes, *, authenticates: bool = False, refused: bool = False) -> list:
        """Read a command answered locally to its end (its literals are discarded), then
        answer ``reply``.  A refused command is answered at its first synchronizing
        literal instead, so the client does not send it (RFC 3501 section 7.5)."""
        self._tag, self._command_size, self._final = tag, 0, reply
        self._finishes_login, self._refusing = authenticates, refused
        return self._command_continue(line)

    def _command_continue(self, line: bytes) -> list:
        """One line of a locally answered command: the first, or one after a literal."""
        self._command_size += len(line) + 2
        if self._command_size > self.max_line:
            return self._close(f"command too long (limit {self.max_line} bytes)")
        match = _LITERAL.search(line)
        if match is None or (self._refusing and not match.group(2)):
            self._state = "command"
            if self._finishes_login:
                self._authenticated = True
            return [SendToApp(self._final)]
        size = _literal_size(match)
        if size is None or self._command_size + size > self.max_line:
            return self._close(f"literal too large (limit {self.max_line} bytes)")
        self._command_size += size
        self._literal_left = size
        self._state = "literal"
        if match.group(2):  # {n+}: the client sends the literal without waiting
            return []
        return [SendToApp(b"+ Ready for literal data" + CRLF)]

    def _auth_start(self, tag: bytes, arg: bytes) -> list:
        mechanism, _, initial = arg.partition(b" ")
        if not mechanism:
            return [SendToApp(tag + b" BAD AUTHENTICATE needs a mechanism" + CRLF)]
        prompts = (
            [sasl.LOGIN_USER_CHALLENGE, sasl.LOGIN_PASSWORD_CHALLENGE] if mechanism.upper() == b"LOGIN" else [b""]
        )
        if initial.strip():
            prompts.pop(0)  # the initial response (SASL-IR) answers the first prompt
        self._tag = tag
        if not prompts:
            return self._auth_done()
        self._state = "auth"
        self._auth_prompts = prompts
        return [SendToApp(b"+ " + self._auth_prompts.pop(0) + CRLF)]

    def _auth_continue(self, line: bytes) -> list:
        if line.strip() == b"*":
            self._state = "command"
            return [SendToApp(self._tag + b" BAD AUTHENTICATE cancelled" + CRLF)]
        if self._auth_prompts:
            return [SendToApp(b"+ " + self._auth_prompts.pop(0) + CRLF)]
        return self._auth_done()

    def _auth_done(self) -> list:
        self._state = "command"
        self._authenticated = True
        return [SendToApp(self._tag + b" OK AUTHENTICATE completed" + CRLF)]

    def _bearer_start(self, tag: bytes, arg: bytes) -> list:
        mechanism, _, initial = arg.partition(b" ")
        if not mechanism:
            return [SendToApp(tag + b" BAD AUTHENTICATE needs a mechanism" + CRLF)]
        name = mechanism.upper().decode("ascii", "replace")
        if name not in BEARER_MECHANISMS:
            return [SendToApp(tag + b" NO [CANNOT] mailgw: this mechanism " + _NO_TOKEN + CRLF)]
        self._tag, self._bearer_mechanism = tag, name
        if initial.strip():
            return self._bearer_response(initial)
        self._state = "bearer"
        return [SendToApp(b"+ " + CRLF)]

    def _bearer_response(self, response: bytes) -> list:
        self._state = "command"
        if response.strip() == b"*":
            return [SendToApp(self._tag + b" BAD AUTHENTICATE cancelled" + CRLF)]
        try:
            presented = sasl.decode_initial_response(self._bearer_mechanism, response)
        except sasl.SASLError as e:
            text = f" BAD mailgw: malformed authentication response: {e}".encode("ascii", "replace")
            return [SendToApp(self._tag + text + CRLF)]
        self._state = "waiting"
        return [ExchangeSecret(self._bearer_mechanism, presented.user, presented.secret)]
