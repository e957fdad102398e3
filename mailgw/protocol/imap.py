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

from .actions import ProtocolError, SendToApp, SendUpstream
from .appside import BEARER_MECHANISMS, IMAP_DIALECT, AppSide, Phase
from .common import first_word, printable
from .credentials import Password
from .lines import LineReader
from .refusal import Reason
from .upstream import Step, UpstreamMachine

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


class ResponseReader(LineReader):
    """A line reader that splits upstream bytes into :class:`Response` values, one at a
    time.

    Literals (``{n}`` CRLF and n bytes) inside untagged data responses are consumed as
    they arrive, so the buffer never holds more than one line; a whole response (lines
    and literals) is bounded by ``max_response``.
    """

    def __init__(self, max_line: int, max_response: int):
        super().__init__(max_line)
        self.max_response = max_response
        self._first: bytes | None = None
        self._size = 0
        self._literal_left = 0

    def next(self) -> Response | None:
        """The next complete response, or None; :class:`ProtocolError` when too long."""
        while True:
            if self._literal_left:
                count = min(self._literal_left, len(self))
                if not count:
                    return None
                self.read_exactly(count)
                self._literal_left -= count
                continue
            line = self.read_line()
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

    Same contract as every upstream machine (see
    :class:`~mailgw.protocol.upstream.UpstreamMachine`).  A ``PREAUTH`` greeting means
    the session is already authenticated: no login, and no STARTTLS either.
    """

    def __init__(self, *, max_line: int = 8192, **options):
        super().__init__(**options)  # see UpstreamMachine
        self._reader = ResponseReader(max_line, max(4 * max_line, 65536))
        self._preauth = False
        self._serial = 0
        self._tag = b""
        self._seen_caps: tuple[str, ...] | None = None  # untagged, since the last command
        self._login_chunks: list[bytes] = []  # LOGIN command: what each "+" gets
        self._on_tagged = {
            Step.CAPABILITIES: self._on_capability,
            Step.STARTTLS: lambda ok, response: self._starttls_answer(ok, str(response)),
            Step.LOGIN: self._on_login,
            Step.CAPABILITIES_AFTER_LOGIN: self._on_capability_after_login,
            Step.PING: lambda ok, response: self._pong(ok, str(response)),
        }

    def _offered(self) -> set[str]:
        return {c[5:].upper() for c in self.capabilities if c.upper().startswith("AUTH=")}

    def _has(self, capability: str) -> bool:
        return any(c.upper() == capability for c in self.capabilities)

    def _next_tag(self) -> bytes:
        self._serial += 1
        self._tag = b"g%d" % self._serial
        self._seen_caps = None
        return self._tag

    def _tagged(self, text: bytes) -> bytes:
        return self._next_tag() + b" " + text

    SASL_COMMAND = b"AUTHENTICATE"
    LOGOUT_COMMAND = b"LOGOUT"

    def _takes_initial_response(self) -> bool:
        return self._has("SASL-IR")  # else it answers the first "+"

    def _forget_secrets(self) -> None:
        super()._forget_secrets()
        self._login_chunks = []

    def _login(self) -> list:
        if self._preauth:
            return self._ready(self.capabilities)
        self._login_chunks = []
        return super()._login()

    def _login_without_sasl(self, offered: set[str]) -> list:
        if not isinstance(self.credentials, Password):
            return super()._login_without_sasl(offered)
        if self._has("LOGINDISABLED"):
            return self._fail(
                "upstream disables LOGIN on this connection"
                + ("" if self.tls_active else " (it is not encrypted)")
                + " and offers no AUTHENTICATE PLAIN",
                kind=Reason.AUTH,
            )
        chunks = login_command(
            self._next_tag(),
            self.credentials.user.encode("utf-8"),
            self.credentials.password.encode("utf-8"),
            literal_plus=self._has("LITERAL+"),
            literal_minus=self._has("LITERAL-"),
        )
        self.step = Step.LOGIN
        self._login_chunks = chunks[1:]
        return [SendUpstream(chunks[0])]

    # -- responses -------------------------------------------------------------------

    def _on_response(self, response: Response) -> list:
        if self.step is Step.GREETING:
            return self._on_greeting(response)
        if response.tag == b"*":
            return self._on_untagged(response)
        if response.tag == b"+":
            if self.step is not Step.LOGIN:
                return self._fail(f"upstream sent an unexpected continuation request: {response}")
            if self._login_chunks:
                return [SendUpstream(self._login_chunks.pop(0))]
            return self._on_challenge(response.text)
        if self.step is Step.AWAITING_LOGIN:
            return self._unexpected_while_waiting(printable(response.line, 80))
        if response.tag != self._tag:
            return self._fail(f"upstream answered an unknown tag: {printable(response.line, 80)}")
        if response.status not in (b"OK", b"NO", b"BAD"):
            return self._malformed("tagged response", response.line)
        handler = self._on_tagged.get(self.step)
        if handler is None:
            return self._fail(f"unexpected upstream response in step {self.step.value}: {response}")
        return handler(response.status == b"OK", response)

    def _caps_from(self, response: Response) -> tuple[str, ...] | None:
        caps = response.capabilities()
        return caps if caps is not None else self._seen_caps

    def _on_greeting(self, response: Response) -> list:
        if response.tag != b"*" or response.status not in (b"OK", b"PREAUTH", b"BYE"):
            return self._malformed("IMAP greeting", response.line)
        if response.status == b"BYE":
            return self._fail(f"upstream refused the session: {response}", permanent=False, kind=Reason.CONNECT)
        self._preauth = response.status == b"PREAUTH"
        caps = response.capabilities()
        if caps is None:
            return self._ask_capabilities()
        self.capabilities = caps
        return self._after_capabilities()

    def _on_untagged(self, response: Response) -> list:
        if response.status == b"BYE":
            return self._fail(f"upstream closed the session: {response}", permanent=False, kind=Reason.CONNECT)
        caps = response.capabilities()
        if caps is not None:
            self._seen_caps = caps
        return []  # other untagged data (alerts, ENABLED, ...) is of no concern here

    def _on_capability(self, ok: bool, response: Response) -> list:
        if not ok:
            return self._fail(f"upstream refused CAPABILITY: {response}")
        self.capabilities = self._caps_from(response) or ()
        return self._after_capabilities()

    def _after_capabilities(self) -> list:
        if self._preauth and not self.tls_active and self.starttls_enable:
            if self.starttls_required:
                return self._fail(
                    "upstream greeted with PREAUTH, so STARTTLS is impossible, and the destination requires it",
                    kind=Reason.TLS,
                )
            return self._login()
        starttls = self._starttls_wanted(self._has("STARTTLS"))
        return starttls if starttls is not None else self._login()

    def _on_login(self, ok: bool, response: Response) -> list:
        if not ok:
            return self._refused(str(response))
        caps = self._caps_from(response)
        if caps is not None:
            return self._ready(caps)
        return self._command(Step.CAPABILITIES_AFTER_LOGIN, b"CAPABILITY")

    def _on_capability_after_login(self, ok: bool, response: Response) -> list:
        caps = self._caps_from(response) if ok else None
        return self._ready(caps if caps is not None else self.capabilities)


# ---------------------------------------------------------------------------------------
# Application side


def _hidden(capability: str) -> bool:
    """Capabilities never advertised to the application: the gateway owns TLS and login."""
    upper = capability.upper()
    return upper in ("STARTTLS", "LOGINDISABLED", "SASL-IR", "IMAP4REV1") or upper.startswith("AUTH=")


class IMAPAppSide(AppSide):
    """The application-facing IMAP dialogue before release.

    Eager mode: CAPABILITY, LOGIN (atom, quoted and literal forms), AUTHENTICATE (any
    mechanism, inline or with continuations), NOOP, ID (before login) and LOGOUT are
    answered locally with the client's own tag; every other command releases the
    session with its tag untouched.

    Lazy mode: the capabilities advertise ``AUTH=XOAUTH2 AUTH=OAUTHBEARER SASL-IR`` and
    ``LOGINDISABLED``; LOGIN and other mechanisms are refused (they carry no token);
    other commands before authentication get ``BAD``.
    """

    dialect = IMAP_DIALECT

    def __init__(self, **kwargs):
        self._final = b""  # the answer to a locally answered command being read to its end
        self._command_size = 0
        self._finishes_login = False  # that command is a LOGIN answered OK
        self._refusing = False  # that command is refused
        super().__init__(**kwargs)

    def set_capabilities(self, capabilities: tuple[str, ...]) -> None:
        if not self.lazy:
            extra: tuple[str, ...] = ("AUTH=PLAIN",)
        elif self.authenticated:
            extra = ()
        else:
            extra = ("SASL-IR", "LOGINDISABLED") + tuple("AUTH=" + m for m in BEARER_MECHANISMS)
        # LITERAL+/LITERAL- stay when the upstream has them: this side accepts {n+} too.
        caps = ["IMAP4rev1"]
        for cap in capabilities:
            if not _hidden(cap) and cap.upper() not in (c.upper() for c in caps):
                caps.append(cap)
        self.capabilities = tuple(caps) + extra

    def capability_text(self) -> str:
        return " ".join(self.capabilities)

    def _command(self, line: bytes) -> list:
        if not line.strip():
            return [SendToApp(b"* BAD mailgw: empty command line" + CRLF)]
        tag, _, rest = line.partition(b" ")
        verb, arg = first_word(rest)
        if verb == b"CAPABILITY":
            return [SendToApp(b"* CAPABILITY " + self.capability_text().encode("ascii", "replace") + CRLF + tag + b" OK CAPABILITY completed" + CRLF)]
        if verb == b"NOOP":
            return [SendToApp(tag + b" OK NOOP completed" + CRLF)]
        if verb == b"LOGOUT":
            return self._quit(b"* BYE mailgw logging out" + CRLF + tag + b" OK LOGOUT completed" + CRLF, "application logged out")
        if verb == b"STARTTLS":
            return [SendToApp(tag + b" BAD mailgw: STARTTLS is not offered on this listener" + CRLF)]
        if self.lazy and self.authenticated:
            return self._release(line)
        if verb == b"ID" and not self.authenticated:
            # Some clients send ID before logging in; upstream, that would come too late.
            return [SendToApp(b"* ID NIL" + CRLF + tag + b" OK ID completed" + CRLF)]
        if verb == b"AUTHENTICATE":
            mechanism, _, initial = arg.partition(b" ")
            if not mechanism:
                return [SendToApp(tag + b" BAD AUTHENTICATE needs a mechanism" + CRLF)]
            if self.lazy:
                return self._start_bearer(tag, mechanism, initial)
            return self._start_prompts(tag, mechanism, initial)
        if self.lazy:  # and not authenticated yet
            if verb == b"LOGIN":
                [refusal] = self._without_token(tag, b"LOGIN")
                return self._read_local_command(tag, line, refusal.data, refused=True)
            reply = tag + b" BAD mailgw: authentication required: AUTHENTICATE XOAUTH2 or OAUTHBEARER first" + CRLF
            return self._read_local_command(tag, line, reply, refused=True)
        if verb == b"LOGIN":
            if not arg:
                return [SendToApp(tag + b" BAD LOGIN needs a user and a password" + CRLF)]
            return self._read_local_command(tag, line, tag + b" OK LOGIN completed" + CRLF, authenticates=True)
        return self._release(line)

    def _read_local_command(self, tag: bytes, line: bytes, reply: bytes, *, authenticates: bool = False, refused: bool = False) -> list:
        """Read a command answered locally to its end (its literals are discarded), then
        answer ``reply``.  A refused command is answered at its first synchronizing
        literal instead, so the client does not send it (RFC 3501 section 7.5)."""
        self._tag, self._command_size, self._final = tag, 0, reply
        self._finishes_login, self._refusing = authenticates, refused
        return self._literal_line(line)

    def _literal_line(self, line: bytes) -> list:
        """One line of a locally answered command: the first, or one after a literal."""
        self._command_size += len(line) + 2
        if self._command_size > self.max_line:
            return self._close(f"command too long (limit {self.max_line} bytes)")
        match = _LITERAL.search(line)
        if match is None or (self._refusing and not match.group(2)):
            self.phase = Phase.COMMAND
            if self._finishes_login:
                self.authenticated = True
            return [SendToApp(self._final)]
        size = _literal_size(match)
        if size is None or self._command_size + size > self.max_line:
            return self._close(f"literal too large (limit {self.max_line} bytes)")
        self._command_size += size
        self._literal_left = size
        self.phase = Phase.LITERAL
        if match.group(2):  # {n+}: the client sends the literal without waiting
            return []
        return [SendToApp(b"+ Ready for literal data" + CRLF)]
