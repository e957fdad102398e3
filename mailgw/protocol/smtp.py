"""SMTP, both sides, sans-IO.

:class:`SMTPUpstream` logs in to the real server: greeting, EHLO, STARTTLS (with the
injection guard), EHLO again, AUTH.  :class:`SMTPAppSide` talks to the application until
release: it greets, answers EHLO/HELO/AUTH locally and releases at the first other command.
"""

from __future__ import annotations

from .actions import ProtocolError, SendToApp
from .appside import BEARER_MECHANISMS, SMTP_DIALECT, AppSide
from .common import first_word, has_keyword, keyword_arguments, printable
from .lines import LineReader
from .refusal import Reason
from .upstream import Step, UpstreamMachine

CRLF = b"\r\n"
MAX_REPLY_LINES = 256


class Reply:
    """One complete (possibly multi-line) SMTP reply."""

    def __init__(self, code: int, lines: list[bytes]):
        self.code = code
        self.lines = lines  # text after "NNN-" / "NNN "

    def __str__(self) -> str:
        return f"{self.code} {printable(self.lines[0] if self.lines else b'')}"


class ReplyReader(LineReader):
    """A line reader that assembles SMTP replies, one at a time; bounded in line length
    and line count.  Replies are taken one by one (:meth:`next`) so that what follows a
    reply is read only once the reply was acted on: the same actions however TCP splits
    bytes."""

    def __init__(self, max_line: int):
        super().__init__(max_line)
        self._partial: list[bytes] = []
        self._code: int | None = None

    def next(self) -> Reply | None:
        """The next complete reply, or None; :class:`ProtocolError` when malformed."""
        while (line := self.read_line()) is not None:
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
                reply = Reply(code, self._partial)
                self._partial, self._code = [], None
                return reply
        return None


def parse_ehlo(reply: Reply) -> tuple[str, ...]:
    """The extension lines of an EHLO reply (the first line is the server's name)."""
    return tuple(printable(line, 512) for line in reply.lines[1:] if line.strip())


def auth_mechanisms(extensions: tuple[str, ...]) -> set[str]:
    """The mechanisms of the AUTH extension, and of ``AUTH=`` (pre-RFC 4954 servers)."""
    legacy = tuple(ext[5:] for ext in extensions if ext.upper().startswith("AUTH="))
    return keyword_arguments(extensions, "AUTH") | {m for line in legacy for m in line.upper().split()}


class SMTPUpstream(UpstreamMachine):
    """Drives the upstream SMTP session until it is authenticated.

    The glue calls :meth:`start`, then :meth:`receive` with every upstream byte and
    :meth:`tls_established` once a handshake it was asked for completes; it carries out
    the returned actions (see :class:`~mailgw.protocol.upstream.UpstreamMachine`).
    """

    def __init__(self, *, ehlo_name: str = "mailgw", max_line: int = 8192, **options):
        super().__init__(**options)  # see UpstreamMachine
        self.ehlo_name = ehlo_name.encode("ascii")
        self._reader = ReplyReader(max_line)
        self._on = {
            Step.GREETING: self._on_greeting,
            Step.CAPABILITIES: self._on_ehlo,
            Step.HELO: self._on_helo,
            Step.STARTTLS: lambda reply: self._starttls_answer(reply.code == 220, str(reply)),
            Step.LOGIN: self._on_auth,
            Step.AWAITING_LOGIN: self._on_unexpected_while_waiting,
            Step.PING: lambda reply: self._pong(reply.code == 250, str(reply)),
        }

    @property
    def CAPABILITY_COMMAND(self) -> bytes:  # noqa: N802 - the base's class attribute
        return b"EHLO " + self.ehlo_name

    def _offered(self) -> set[str]:
        return auth_mechanisms(self.capabilities)

    # -- replies ---------------------------------------------------------------------

    def _on_greeting(self, reply: Reply) -> list:
        if reply.code != 220:
            return self._fail(f"upstream greeting refused: {reply}", permanent=reply.code >= 500, kind=Reason.CONNECT)
        return self._ask_capabilities()

    def _on_ehlo(self, reply: Reply) -> list:
        if reply.code != 250:
            if self.credentials is not None or self.lazy or self.starttls_required:
                return self._fail(f"upstream refused EHLO: {reply}")
            # an old server without ESMTP, and nothing to negotiate
            return self._command(Step.HELO, b"HELO " + self.ehlo_name)
        self.capabilities = parse_ehlo(reply)
        starttls = self._starttls_wanted(has_keyword(self.capabilities, "STARTTLS"))
        return starttls if starttls is not None else self._login()

    def _on_helo(self, reply: Reply) -> list:
        if reply.code != 250:
            return self._fail(f"upstream refused HELO: {reply}")
        return self._ready(self.capabilities)

    def _on_auth(self, reply: Reply) -> list:
        if reply.code == 235:
            return self._ready(self.capabilities)
        if reply.code == 334:
            return self._on_challenge(reply.lines[0] if reply.lines else b"")
        return self._refused(str(reply))

    def _on_unexpected_while_waiting(self, reply: Reply) -> list:
        if reply.code == 421:
            return self._fail(f"upstream closed the session: {reply}", permanent=False, kind=Reason.CONNECT)
        return self._unexpected_while_waiting(str(reply))


#: Extensions never advertised to the application: the gateway owns TLS and AUTH.
_HIDDEN_EXTENSIONS = ("STARTTLS", "AUTH")

#: Commands answered before authentication in lazy mode (the rest get 530).
_LAZY_BEFORE_AUTH = (b"EHLO", b"HELO", b"AUTH", b"RSET", b"NOOP", b"STARTTLS", b"QUIT")


class SMTPAppSide(AppSide):
    """The application-facing SMTP dialogue before release.

    Eager mode: EHLO/HELO and AUTH are answered locally (the offered credentials are
    discarded), RSET/NOOP and QUIT too (as IMAP's LOGOUT and POP3's QUIT: the upstream
    gets its own QUIT from the gateway); every other command (MAIL FROM straight after
    the greeting included) releases the session.

    Lazy mode: EHLO advertises ``AUTH XOAUTH2 OAUTHBEARER``; before authentication mail
    commands get ``530 5.7.0 Authentication required``; after it, as in eager mode.
    """

    dialect = SMTP_DIALECT

    def set_capabilities(self, capabilities: tuple[str, ...]) -> None:
        auth = "AUTH " + " ".join(BEARER_MECHANISMS) if self.lazy else "AUTH PLAIN LOGIN"
        self.extensions = tuple(ext for ext in capabilities if not ext.upper().startswith(_HIDDEN_EXTENSIONS)) + (auth,)

    def _command(self, line: bytes) -> list:
        verb, arg = first_word(line)
        if self.lazy and not self.authenticated and verb not in _LAZY_BEFORE_AUTH:
            return [SendToApp(b"530 5.7.0 Authentication required" + CRLF)]
        if verb in (b"EHLO", b"HELO"):
            return [SendToApp(self._hello(verb, arg))]
        if verb == b"AUTH":
            return self._auth(arg)
        if verb in (b"RSET", b"NOOP"):
            return [SendToApp(b"250 2.0.0 OK" + CRLF)]
        if verb == b"STARTTLS":
            return [SendToApp(b"502 5.5.1 mailgw: STARTTLS is not offered on this listener" + CRLF)]
        if verb == b"QUIT":  # nothing was relayed: no relay to build for the goodbye
            return self._quit(b"221 2.0.0 mailgw closing connection" + CRLF)
        return self._release(line)

    def _hello(self, verb: bytes, arg: bytes) -> bytes:
        if not arg:
            return b"501 5.5.4 Syntax: " + verb + b" hostname" + CRLF
        hostname = self.hostname.encode("ascii", "replace")
        if verb == b"HELO":
            return b"250 " + hostname + CRLF
        lines = [hostname] + [ext.encode("ascii", "replace") for ext in self.extensions]
        return b"".join(
            b"250" + (b" " if i == len(lines) - 1 else b"-") + text + CRLF for i, text in enumerate(lines)
        )

    def _auth(self, arg: bytes) -> list:
        if self.authenticated:
            return [SendToApp(b"503 5.5.1 Already authenticated" + CRLF)]
        mechanism, _, initial = arg.partition(b" ")
        if not mechanism:
            return [SendToApp(b"501 5.5.4 Syntax: AUTH mechanism" + CRLF)]
        if self.lazy:
            return self._start_bearer(b"", mechanism, initial)
        return self._start_prompts(b"", mechanism, initial)
