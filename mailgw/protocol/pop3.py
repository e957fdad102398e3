"""POP3, both sides, sans-IO.

:class:`POP3Upstream` logs in to the real server: greeting, CAPA, STLS (with the
injection guard), CAPA again, then AUTH PLAIN / XOAUTH2 / OAUTHBEARER or USER/PASS, and
CAPA once more for the post-login list.  :class:`POP3AppSide` talks to the application
until release: it greets, answers CAPA, USER, PASS, APOP, AUTH and QUIT locally and
releases at the first other command.
"""

from __future__ import annotations

from .actions import SendToApp
from .appside import BEARER_MECHANISMS, POP3_DIALECT, AppSide
from .common import first_word, has_keyword, keyword_arguments, printable
from .credentials import Password
from .lines import LineReader
from .refusal import Reason
from .upstream import SASLStart, Step, UpstreamMachine

CRLF = b"\r\n"
MAX_CAPA_LINES = 256


def _is_ok(line: bytes) -> bool:
    return line[:3].upper() == b"+OK" and line[3:4] in (b"", b" ")


def _is_err(line: bytes) -> bool:
    return line[:4].upper() == b"-ERR" and line[4:5] in (b"", b" ")


def _is_continuation(line: bytes) -> bool:
    return line == b"+" or line.startswith(b"+ ")


class POP3Upstream(UpstreamMachine):
    """Drives the upstream POP3 session until it is authenticated.

    Same contract as every upstream machine (see
    :class:`~mailgw.protocol.upstream.UpstreamMachine`).  A server without CAPA
    (RFC 1939 only) is logged in with USER/PASS.
    """

    STARTTLS_VERB = "STLS"
    CAPABILITY_COMMAND = b"CAPA"

    def __init__(self, *, max_line: int = 8192, **options):
        super().__init__(**options)  # see UpstreamMachine
        self._reader = LineReader(max_line)  # a response is a line
        self._capa_lines: list[bytes] | None = None  # not None while a CAPA list is read
        self._password: bytes = b""  # USER/PASS: what PASS sends
        self._on = {
            Step.GREETING: self._on_greeting,
            Step.CAPABILITIES: self._on_capa,
            Step.CAPABILITIES_AFTER_LOGIN: self._on_capa,
            Step.STARTTLS: self._on_stls,
            Step.LOGIN: self._on_auth,
            Step.USER: self._on_user,
            Step.PASS: self._on_pass,
            Step.AWAITING_LOGIN: self._on_unexpected_while_waiting,
            Step.PING: lambda line: self._pong(_is_ok(line), printable(line)),
        }

    def _on_response(self, line: bytes) -> list:
        if self._capa_lines is not None:
            return self._on_capa_line(line)
        return super()._on_response(line)

    def _offered(self) -> set[str]:
        return keyword_arguments(self.capabilities, "SASL")  # RFC 5034

    def _send_sasl(self, start: SASLStart) -> list:
        if start.initial is not None and start.mechanism == "PLAIN":
            self._steps.insert(0, start.initial)  # a server that still asks gets it again
        return super()._send_sasl(start)

    def _forget_secrets(self) -> None:
        super()._forget_secrets()
        self._password = b""

    def _login_without_sasl(self, offered: set[str]) -> list:
        creds = self.credentials
        if not isinstance(creds, Password):
            return super()._login_without_sasl(offered)
        if any(c in value for value in (creds.user, creds.password) for c in "\r\n\0"):
            return self._fail(
                "the configured user or password contains a line break or NUL, which USER/PASS cannot carry",
                kind=Reason.AUTH,
            )
        self._password = creds.password.encode("utf-8")
        return self._command(Step.USER, b"USER " + creds.user.encode("utf-8"))

    # -- lines -----------------------------------------------------------------------

    def _on_greeting(self, line: bytes) -> list:
        if _is_ok(line):
            return self._command(Step.CAPABILITIES, b"CAPA")
        if _is_err(line):
            return self._fail(f"upstream greeting refused: {printable(line)}", permanent=False, kind=Reason.CONNECT)
        return self._malformed("POP3 response", line)

    def _on_capa(self, line: bytes) -> list:
        if _is_ok(line):
            self._capa_lines = []
            return []
        if _is_err(line):  # a server without CAPA (RFC 1939 only): carry on
            return self._after_capa(None)
        return self._malformed("POP3 response", line)

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
        if self.step is Step.CAPABILITIES_AFTER_LOGIN:
            return self._ready(capabilities if capabilities is not None else self.capabilities)
        self.capabilities = capabilities or ()
        starttls = self._starttls_wanted(has_keyword(self.capabilities, "STLS"))
        return starttls if starttls is not None else self._login()

    def _on_stls(self, line: bytes) -> list:
        if not (_is_ok(line) or _is_err(line)):
            return self._malformed("POP3 response", line)
        return self._starttls_answer(_is_ok(line), printable(line))

    def _on_auth(self, line: bytes) -> list:
        if _is_ok(line):
            return self._command(Step.CAPABILITIES_AFTER_LOGIN, b"CAPA")
        if _is_continuation(line):
            return self._on_challenge(line[2:])
        if _is_err(line):
            return self._refused(printable(line))
        return self._malformed("POP3 response", line)

    def _on_user(self, line: bytes) -> list:
        if _is_ok(line):
            password, self._password = self._password, b""
            return self._command(Step.PASS, b"PASS " + password)
        if _is_err(line):
            return self._fail(f"upstream refused the user name: {printable(line)}", kind=Reason.AUTH)
        return self._malformed("POP3 response", line)

    def _on_pass(self, line: bytes) -> list:
        if _is_ok(line):
            return self._command(Step.CAPABILITIES_AFTER_LOGIN, b"CAPA")
        if _is_err(line):
            return self._refused(printable(line))
        return self._malformed("POP3 response", line)

    def _on_unexpected_while_waiting(self, line: bytes) -> list:
        return self._unexpected_while_waiting(printable(line))


# ---------------------------------------------------------------------------------------
# Application side

#: CAPA lines never shown to the application: the gateway owns TLS and login.
_HIDDEN = ("STLS", "SASL", "USER")


def _listing(items) -> bytes:
    return b"+OK" + CRLF + b"".join(item.encode("ascii", "replace") + CRLF for item in items) + b"." + CRLF


class POP3AppSide(AppSide):
    """The application-facing POP3 dialogue before release.

    Eager mode: CAPA, USER, PASS, APOP, AUTH and QUIT are answered locally (the offered
    credentials are discarded); every other command releases the session.

    Lazy mode: CAPA advertises ``SASL XOAUTH2 OAUTHBEARER``; USER/PASS/APOP and other
    mechanisms are refused (they carry no token); other commands before authentication
    get ``-ERR [AUTH] Authentication required``.
    """

    dialect = POP3_DIALECT

    def set_capabilities(self, capabilities: tuple[str, ...]) -> None:
        if not self.lazy:
            extra: tuple[str, ...] = ("USER", "SASL PLAIN")
        elif self.authenticated:
            extra = ()
        else:
            extra = ("SASL " + " ".join(BEARER_MECHANISMS),)
        self.capabilities = tuple(
            line for line in capabilities if line.split(" ", 1)[0].upper() not in _HIDDEN
        ) + extra

    def _command(self, line: bytes) -> list:
        verb, arg = first_word(line)
        if not verb:
            return [SendToApp(b"-ERR mailgw: empty command line" + CRLF)]
        if verb == b"CAPA":
            body = b"".join(cap.encode("ascii", "replace") + CRLF for cap in self.capabilities)
            return [SendToApp(b"+OK Capability list follows" + CRLF + body + b"." + CRLF)]
        if verb == b"QUIT":
            return self._quit(b"+OK mailgw signing off" + CRLF)
        if verb == b"STLS":
            return [SendToApp(b"-ERR mailgw: STLS is not offered on this listener" + CRLF)]
        if self.lazy:
            if self.authenticated:
                return self._release(line)
            if verb == b"AUTH":
                if not arg:  # RFC 5034: the mechanism list
                    return [SendToApp(_listing(BEARER_MECHANISMS))]
                mechanism, _, initial = arg.partition(b" ")
                return self._start_bearer(b"", mechanism, initial)
            if verb in (b"USER", b"PASS", b"APOP"):
                return self._without_token(b"", verb)
            return [SendToApp(b"-ERR [AUTH] Authentication required" + CRLF)]
        if verb == b"USER":
            return [SendToApp(b"+OK" + CRLF)]
        if verb in (b"PASS", b"APOP"):
            return [self._say("auth_done")]
        if verb == b"AUTH":
            if not arg:
                return [SendToApp(_listing(("PLAIN",)))]
            mechanism, _, initial = arg.partition(b" ")
            return self._start_prompts(b"", mechanism, initial)
        return self._release(line)
