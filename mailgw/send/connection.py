"""Sending a built message over SMTP: :class:`SendConfig`, :class:`EmailConnection`.

Implementation choice: the SMTP client is the standard library's :mod:`smtplib`, driven
command by command, and the Twisted path (:meth:`EmailConnection.send_deferred`) runs it
off the reactor thread: in a :class:`~mailgw.blocking.BlockingPool` when the caller gives
one (the gateway's send API owns a ``mailgw-send`` pool in its service tree), else in the
reactor's own thread pool, so the Python API needs no service tree and keeps no global
state of its own.  Why not ``twisted.mail.smtp``:

- ``send()`` must work from plain Python code.  With smtplib it is an ordinary blocking
  call; with Twisted's client it would have to start and share a reactor in a background
  thread, which is global, cannot be restarted and would belong to the caller's process.
- The contract needs control Twisted's ``ESMTPSender`` does not give without subclassing
  its internals: the server's *final reply text* (its Deferred fires with counts), the
  rule "AUTH PLAIN or a clear error" (it picks among registered authenticators and
  reports a generic failure), and "any refused recipient refuses the send" (it
  tolerates partial failures).  Calling ``mail``/``rcpt``/``data``/``docmd`` ourselves
  makes each of these a few obvious lines.
- Timeouts map directly: the connection timeout is the ``socket.create_connection``
  timeout, the read timeout is the socket timeout afterwards (every reply read and the
  TLS handshake).
- TLS uses one library throughout, :mod:`ssl`: one ``SSLContext`` per send, built from
  the config (trust PEM instead of the system store, client certificate chain, minimum
  TLS 1.2, SNI and host-name verification on unless verification is disabled), used for
  implicit TLS and for STARTTLS alike.

The reactor thread never blocks: all socket work happens in a pool's threads.  The
password never appears in a repr (``repr=False``), an exception message or a log line;
smtplib's debug output stays off.
"""

from __future__ import annotations

import smtplib
import socket
import ssl
from typing import Any, Callable

import attrs
from attrs import field, frozen
from twisted.logger import Logger

from ..protocol.sasl import plain_initial_response
from .message import (
    Attachment,
    BuiltMessage,
    MultipartBody,
    Part,
    SendRequest,
    build_message,
)

__all__ = ["EmailConnection", "SendConfig", "SendError", "send_message",
           "send_message_deferred", "send_built", "send_built_deferred"]

log = Logger(namespace="mailgw.send")


class SendError(Exception):
    """The mail was not sent: connection, TLS, authentication or a refusal by the server.

    ``code`` is the SMTP reply code when the server refused (``None`` for connection,
    TLS and timeout failures); ``reply`` is the server's reply text, if any.  The message
    names the server and the step, never a secret.
    """

    def __init__(self, message: str, code: int | None = None, reply: str | None = None):
        self.code = code
        self.reply = reply
        super().__init__(message)


class SendTimeout(SendError):
    """The server did not connect or reply within the configured timeout."""


def _positive(instance, attribute, value):
    if value is not None and not value > 0:
        raise ValueError(f"{attribute.name} must be positive, got {value!r}")


def _port(instance, attribute, value):
    if value is not None and not (0 < value < 65536):
        raise ValueError(f"port must be 1..65535, got {value!r}")


@frozen
class SendConfig:
    """Where and how to send (SPEC section 8, the reference's smtp configuration).

    - ``hostname``/``port``: the SMTP server; the port defaults to 465 with ``tls``
      (implicit TLS, "SMTPS"), else 25.
    - ``mailto``: overrides the primary recipient of every mail sent with this config.
    - ``starttls``: upgrade a plain connection with STARTTLS (required: a server not
      offering it is an error).  Mutually exclusive with ``tls``.
    - ``trust_pem``: PEM file of CA certificates trusted instead of the system store.
    - ``client_cert_pem``: PEM file with the client certificate (chain) and, unless
      ``client_key_pem`` is given, its private key.
    - ``verify``: ``False`` disables certificate and host-name verification (a warning
      is logged at every use).
    - ``userid``/``password``: authenticate with AUTH PLAIN (only PLAIN: a server that
      does not offer it is a clear error).
    - ``connect_timeout`` (15 s) and ``read_timeout`` (60 s, each reply and the TLS
      handshake).
    - ``destination``: the name of a mailgw destination when ``hostname``/``port`` is the
      gateway's SMTP listener for it (see :meth:`via_gateway`); the gateway supplies the
      credentials, so none may be set here.  Used in messages and logs.
    - ``local_hostname``: the name sent in EHLO (default: this host's FQDN).
    """

    hostname: str = "localhost"
    port: int | None = field(default=None, validator=_port)
    mailto: str | None = None
    tls: bool = False
    starttls: bool = False
    trust_pem: str | None = None
    client_cert_pem: str | None = None
    client_key_pem: str | None = None
    verify: bool = True
    userid: str | None = None
    password: str | None = field(default=None, repr=False)
    connect_timeout: float = field(default=15.0, validator=_positive)
    read_timeout: float = field(default=60.0, validator=_positive)
    destination: str | None = None
    local_hostname: str | None = None

    def __attrs_post_init__(self):
        if self.tls and self.starttls:
            raise ValueError("tls (implicit TLS) and starttls exclude each other")
        if self.password is not None and self.userid is None:
            raise ValueError("password given without userid")
        if self.destination is not None and self.userid is not None:
            raise ValueError(
                f"destination {self.destination!r}: the gateway supplies the "
                "credentials, do not set userid/password"
            )
        if self.client_key_pem is not None and self.client_cert_pem is None:
            raise ValueError("client_key_pem given without client_cert_pem")

    @classmethod
    def via_gateway(cls, destination: str, host: str = "localhost", port: int = 25,
                    **kwargs: Any) -> "SendConfig":
        """Send through mailgw's SMTP listener for ``destination`` (no credentials).

        The listener answers the application side of the protocol itself and
        authenticates upstream with the destination's credentials, so the application
        holds none.  ``kwargs`` may set timeouts, ``mailto`` or TLS options when the
        listener is configured with TLS.
        """
        return cls(hostname=host, port=port, destination=destination, **kwargs)

    @property
    def effective_port(self) -> int:
        if self.port is not None:
            return self.port
        return 465 if self.tls else 25

    @property
    def uses_tls(self) -> bool:
        return self.tls or self.starttls

    def describe(self) -> str:
        """The server as shown in messages: ``host:port`` plus the destination."""
        where = f"{self.hostname}:{self.effective_port}"
        if self.destination is not None:
            where = f"destination {self.destination!r} via {where}"
        return where


def ssl_context(config: SendConfig) -> ssl.SSLContext:
    """The client TLS context for ``config``; raises :class:`SendError` for bad files."""
    try:
        if config.trust_pem is not None:
            context = ssl.create_default_context(cafile=config.trust_pem)
        else:
            context = ssl.create_default_context()
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if config.client_cert_pem is not None:
            context.load_cert_chain(config.client_cert_pem, config.client_key_pem)
    except (OSError, ssl.SSLError) as e:
        raise SendError(f"TLS configuration for {config.describe()}: {e}") from None
    if not config.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class _SMTP(smtplib.SMTP):
    """smtplib with separate connect and read timeouts and optional implicit TLS."""

    def __init__(self, config: SendConfig, context: ssl.SSLContext | None):
        self._config = config
        self._context = context
        super().__init__(local_hostname=config.local_hostname,
                         timeout=config.read_timeout)

    #: What connect() is doing, for error messages: connect, TLS handshake, greeting.
    phase = "connect"

    def _get_socket(self, host, port, timeout):
        # starttls() takes the SNI / verification name from _host, which smtplib only
        # sets when the host is given to the constructor.
        self._host = host
        sock = socket.create_connection((host, port), self._config.connect_timeout)
        try:
            sock.settimeout(self._config.read_timeout)
            if self._config.tls:
                self.phase = "TLS handshake"
                assert self._context is not None
                sock = self._context.wrap_socket(sock, server_hostname=host)
        except BaseException:
            sock.close()
            raise
        self.phase = "greeting"
        return sock


def _text(reply: bytes | str) -> str:
    if isinstance(reply, bytes):
        return reply.decode("utf-8", "replace")
    return reply


def _reply(code: int, text: bytes | str) -> str:
    return f"{code} {_text(text)}"


def _root_cause(exc: BaseException) -> BaseException:
    """smtplib wraps socket errors in SMTPServerDisconnected; find the socket error."""
    seen = exc
    while seen.__cause__ is not None or seen.__context__ is not None:
        seen = seen.__cause__ or seen.__context__
        if isinstance(seen, (TimeoutError, ssl.SSLError, ConnectionError)):
            return seen
    return exc


def _transport_error(config: SendConfig, step: str, exc: BaseException) -> SendError:
    """A SendError for a socket/TLS failure during ``step``."""
    where = config.describe()
    cause = _root_cause(exc)
    if isinstance(cause, ssl.SSLCertVerificationError):
        return SendError(
            f"{where}: TLS certificate verification failed: {cause.verify_message or cause}"
        )
    if isinstance(cause, ssl.SSLError):
        return SendError(f"{where}: TLS failed during {step}: {cause.reason or cause}")
    if isinstance(cause, TimeoutError):
        if step == "connect":
            return SendTimeout(
                f"{where}: no connection within {config.connect_timeout:g} s "
                "(connection timeout)"
            )
        return SendTimeout(
            f"{where}: no reply within {config.read_timeout:g} s during {step} "
            "(read timeout)"
        )
    if isinstance(exc, smtplib.SMTPServerDisconnected):
        if step == "greeting" and config.tls:
            # With TLS 1.3 a server refusing our certificate (or its absence) after the
            # handshake often just closes: say what is likely.
            return SendError(
                f"{where}: the server closed the connection after the TLS handshake, "
                "before its greeting (does it require a client certificate, or refuse "
                "this one?)")
        return SendError(f"{where}: the server closed the connection during {step}")
    return SendError(f"{where}: {step} failed: {cause}")


def send_built(built: BuiltMessage, config: SendConfig) -> str:
    """Send ``built`` as configured; blocking.  Returns the final reply ("250 ...").

    Any refusal (sender, any recipient, data) raises :class:`SendError` with the code.
    """
    where = config.describe()
    context = ssl_context(config) if config.uses_tls else None
    if context is not None and not config.verify:
        log.warn("certificate verification disabled for {where}", where=where)
    smtp = _SMTP(config, context)
    step = "connect"
    try:
        try:
            code, text = smtp.connect(config.hostname, config.effective_port)
        except (ConnectionRefusedError, socket.gaierror) as e:
            if smtp.phase == "connect":
                raise SendError(f"{where}: cannot connect: {e.strerror or e}") from None
            raise _transport_error(config, smtp.phase, e) from None
        except (smtplib.SMTPException, OSError) as e:
            raise _transport_error(config, smtp.phase, e) from None
        if code != 220:
            raise SendError(f"{where}: refused the connection: {_reply(code, text)}",
                            code, _text(text))
        step = "EHLO"
        _ehlo(smtp, config)
        if config.starttls:
            step = "STARTTLS"
            if not smtp.has_extn("starttls"):
                raise SendError(f"{where}: the server does not offer STARTTLS")
            assert context is not None
            code, text = smtp.starttls(context=context)
            step = "EHLO after STARTTLS"
            _ehlo(smtp, config)
        if config.userid is not None:
            step = "AUTH"
            _auth_plain(smtp, config)
        step = "MAIL FROM"
        options = []
        if smtp.does_esmtp and smtp.has_extn("size"):
            options.append(f"SIZE={len(built.data)}")
        code, text = smtp.mail(built.envelope_from, options)
        if code != 250:
            raise SendError(
                f"{where}: sender {built.envelope_from} refused: {_reply(code, text)}",
                code, _text(text))
        step = "RCPT TO"
        for recipient in built.recipients:
            code, text = smtp.rcpt(recipient)
            if code not in (250, 251):
                _rset(smtp)
                raise SendError(
                    f"{where}: recipient {recipient} refused: {_reply(code, text)}",
                    code, _text(text))
        step = "DATA"
        try:
            code, text = smtp.data(built.data)
        except smtplib.SMTPDataError as e:
            raise SendError(
                f"{where}: message refused: {_reply(e.smtp_code, e.smtp_error)}",
                e.smtp_code, _text(e.smtp_error)) from None
        final = _reply(code, text)
        log.info("sent mail to {count} recipient(s) via {where}: {final}",
                 count=len(built.recipients), where=where, final=final)
        step = "QUIT"
        try:
            smtp.quit()
        except (smtplib.SMTPException, OSError):
            pass  # the mail is accepted; a failed goodbye does not matter
        return final
    except SendError:
        raise
    except smtplib.SMTPNotSupportedError as e:
        raise SendError(f"{where}: {step}: {e}") from None
    except smtplib.SMTPResponseException as e:
        raise SendError(f"{where}: {step} refused: {_reply(e.smtp_code, e.smtp_error)}",
                        e.smtp_code, _text(e.smtp_error)) from None
    except (smtplib.SMTPException, OSError) as e:
        raise _transport_error(config, step, e) from None
    finally:
        smtp.close()


def _ehlo(smtp: smtplib.SMTP, config: SendConfig) -> None:
    code, text = smtp.ehlo()
    if code == 250:
        return
    if config.uses_tls or config.userid is not None:
        # STARTTLS and AUTH are ESMTP: a server refusing EHLO cannot do them.
        raise SendError(f"{config.describe()}: EHLO refused: {_reply(code, text)}",
                        code, _text(text))
    code, text = smtp.helo()
    if code != 250:
        raise SendError(f"{config.describe()}: HELO refused: {_reply(code, text)}",
                        code, _text(text))


def _auth_plain(smtp: smtplib.SMTP, config: SendConfig) -> None:
    where = config.describe()
    offered = smtp.esmtp_features.get("auth", "").upper().split()
    if "PLAIN" not in offered:
        shown = ", ".join(offered) if offered else "none"
        raise SendError(
            f"{where}: the server does not offer AUTH PLAIN (offers: {shown}); "
            "only AUTH PLAIN is supported"
        )
    response = plain_initial_response(config.userid or "", config.password or "")
    code, text = smtp.docmd("AUTH", "PLAIN " + response.decode("ascii"))
    if code == 334:
        # A server that ignores the initial response asks for it again.
        code, text = smtp.docmd(response.decode("ascii"))
    if code != 235:
        raise SendError(f"{where}: authentication failed: {_reply(code, text)}",
                        code, _text(text))


def _rset(smtp: smtplib.SMTP) -> None:
    try:
        smtp.rset()
    except (smtplib.SMTPException, OSError):
        pass


def _effective(request: SendRequest, config: SendConfig) -> SendRequest:
    if config.mailto is not None:
        return attrs.evolve(request, primary_recipient=config.mailto)
    return request


def send_message(request: SendRequest, config: SendConfig) -> str:
    """Build and send ``request``; blocking.  Returns the server's final reply text.

    Raises :class:`~mailgw.send.message.MessageError` for a malformed request and
    :class:`SendError` when the mail could not be sent.
    """
    return send_built(build_message(_effective(request, config)), config)


# -- the Twisted side -------------------------------------------------------------------

#: Threads of the gateway's send pool (``mailgw-send``): concurrent sends over HTTP, each
#: holding one thread while it talks SMTP.
POOL_SIZE = 10


def _in_pool(reactor, pool, function: Callable[..., str], *args):
    """Run ``function`` off the reactor thread: in ``pool`` (a
    :class:`~mailgw.blocking.BlockingPool`, or any callable with its signature) when
    given, else in the reactor's own thread pool."""
    if pool is not None:
        return pool(function, *args)
    from twisted.internet.threads import deferToThreadPool

    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    return deferToThreadPool(reactor, reactor.getThreadPool(), function, *args)


def send_message_deferred(request: SendRequest, config: SendConfig, reactor=None, pool=None):
    """:func:`send_message` off the reactor thread: a Deferred firing with the reply.

    It runs in ``pool`` when given (the gateway passes its ``mailgw-send``
    :class:`~mailgw.blocking.BlockingPool`), else in the reactor's thread pool.  It fails
    with :class:`MessageError` or :class:`SendError` like :func:`send_message`.
    """
    return _in_pool(reactor, pool, send_message, request, config)


def send_built_deferred(built: BuiltMessage, config: SendConfig, reactor=None, pool=None):
    """:func:`send_built` off the reactor thread: a Deferred firing with the reply."""
    return _in_pool(reactor, pool, send_built, built, config)


# -- the reference-style API ------------------------------------------------------------


class EmailConnection:
    """One mail to send, in the style of the reference's ``EmailConnection``.

    ::

        email = EmailConnection("you@example.org", SendConfig(hostname="smtp.example.org"))
        email.set_from_address("me@example.org")
        email.set_subject("Hello you!")
        email.set_content("This is the e-mail body.")
        reply = email.send()          # "250 2.0.0 Ok: queued as ..."

    Attributes may be set directly instead of through the setters: ``from_address``,
    ``subject``, ``content`` (str, bytes or :class:`MultipartBody`), ``content_type``,
    ``mime_version``, ``to``/``cc``/``bcc`` (lists of bare addresses), ``headers``
    (list of ``(name, value)``, one header line each) and ``attachments`` (list of
    :class:`Part`).  ``config.mailto``, when set, replaces the primary recipient.
    """

    def __init__(self, primary_recipient: str, config: SendConfig | None = None):
        self.primary_recipient = primary_recipient
        self.config = config if config is not None else SendConfig()
        self.from_address: str | None = None
        self.subject: str | None = None
        self.content: str | bytes | MultipartBody = ""
        self.content_type: str | None = None
        self.mime_version: str | None = None
        self.to: list[str] = []
        self.cc: list[str] = []
        self.bcc: list[str] = []
        self.headers: list[tuple[str, str]] = []
        self.attachments: list[Part] = []

    def __repr__(self) -> str:
        return (f"<EmailConnection to {self.primary_recipient!r} "
                f"via {self.config.describe()}>")

    # Setters named like the reference's, for readers coming from it.
    def set_from_address(self, address: str) -> None:
        self.from_address = address

    def set_subject(self, subject: str) -> None:
        self.subject = subject

    def set_content(self, content: str | bytes | MultipartBody,
                    content_type: str | None = None) -> None:
        self.content = content
        if content_type is not None:
            self.content_type = content_type

    def set_content_type(self, content_type: str) -> None:
        self.content_type = content_type

    def set_mime_version(self, version: str) -> None:
        self.mime_version = version

    def add_to(self, *addresses: str) -> None:
        self.to.extend(addresses)

    def add_cc(self, *addresses: str) -> None:
        self.cc.extend(addresses)

    def add_bcc(self, *addresses: str) -> None:
        self.bcc.extend(addresses)

    def add_header(self, name: str, *values: str) -> None:
        """Add header ``name`` once per value."""
        self.headers.extend((name, value) for value in values)

    def add_attachment(self, data: bytes, filename: str,
                       content_type: str = "application/octet-stream") -> None:
        self.attachments.append(Attachment(data, filename, content_type))

    def request(self) -> SendRequest:
        """A snapshot of this mail as a :class:`SendRequest` (``mailto`` applied)."""
        return _effective(SendRequest(
            primary_recipient=self.primary_recipient,
            body=self.content,
            from_address=self.from_address,
            subject=self.subject,
            to=list(self.to),
            cc=list(self.cc),
            bcc=list(self.bcc),
            content_type=self.content_type,
            mime_version=self.mime_version,
            headers=list(self.headers),
            attachments=list(self.attachments),
        ), self.config)

    def build(self) -> BuiltMessage:
        """The envelope and bytes that :meth:`send` would send."""
        return build_message(self.request())

    def send(self) -> str:
        """Send now, blocking; returns the server's final reply text.

        Raises :class:`MessageError` for a malformed mail and :class:`SendError`
        (``.code`` set when the server refused) when it could not be sent.
        """
        return send_built(self.build(), self.config)

    def send_deferred(self, reactor=None, pool=None):
        """Send from Twisted code: a Deferred firing with the final reply text.

        The mail is snapshotted now; building and sending run off the reactor thread,
        in ``pool`` (a :class:`~mailgw.blocking.BlockingPool` the caller's service tree
        owns) or else in the reactor's thread pool.  Failures as for :meth:`send`.
        """
        return send_message_deferred(self.request(), self.config, reactor, pool)
