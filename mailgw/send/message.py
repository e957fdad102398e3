"""Building the mail message of a send request (SPEC section 8), as a pure function.

:func:`build_message` turns a :class:`SendRequest` value into a :class:`BuiltMessage`:
the envelope sender, the envelope recipients and the message bytes (CRLF line ends,
7-bit clean unless the caller passed 8-bit bytes through the MIME-Version pass-through).
It does no I/O, so every rule is a short unit test.  The rules, from the reference's
"smtp protocol":

- From defaults to the primary recipient; the primary recipient is always in To.
- Addresses are bare ``user@domain``: display names and comma-separated lists are
  refused with a :class:`MessageError` naming the header.
- Bcc recipients are envelope recipients only, never written into the headers.
- Content-Type defaults to ``text/plain; charset=UTF-8``.  Text is encoded with the
  charset of the Content-Type (7-bit ASCII when it names none); bytes are sent as a
  binary (base64) MIME part; a :class:`MultipartBody` (or attachments) becomes
  ``multipart/mixed`` and replaces MIME-Version, Content-Type and
  Content-Transfer-Encoding.
- When MIME-Version is set, the Content-Type starts with ``multipart/mixed`` and the body
  is not a :class:`MultipartBody`, the body is already MIME and is sent as it is.
- Other headers are copied, one header line per value.

MIME is built with the standard :mod:`email` package (``EmailMessage`` and a policy with
CRLF line ends and 7-bit transfer encodings, so any SMTP server accepts the result).
"""

from __future__ import annotations

import email.errors
import email.policy
import email.utils
import re
from datetime import datetime
from email.message import EmailMessage, MIMEPart
from typing import Iterable, Union

from attrs import field, frozen

__all__ = [
    "DEFAULT_CONTENT_TYPE",
    "Attachment",
    "BuiltMessage",
    "MessageError",
    "MultipartBody",
    "Part",
    "SendRequest",
    "build_message",
    "check_address",
    "parse_content_type",
]

DEFAULT_CONTENT_TYPE = "text/plain; charset=UTF-8"

#: CRLF line ends and 7-bit transfer encodings (quoted-printable/base64 for 8-bit text).
POLICY = email.policy.SMTP.clone(cte_type="7bit")

#: Headers the builder writes itself; a request sets them through its own fields.
MANAGED_HEADERS = frozenset(
    {"from", "to", "cc", "bcc", "subject", "content-type", "mime-version"}
)
#: Replaced by the builder unless the body passes through unchanged.
TRANSFER_ENCODING = "content-transfer-encoding"

# A bare address: a dot-atom local part, "@", a domain of dot-separated labels.  Anything
# else (display names, angle brackets, quoting, comments, lists) is refused.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_ADDRESS = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*@{_LABEL}(?:\.{_LABEL})*")
# Everything str.splitlines() breaks at; the email package refuses them in headers.
_LINE_BREAK = re.compile("[\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]")
# RFC 5322 field names: printable ASCII except the colon.
_FIELD_NAME = re.compile(r"[!-9;-~]+")


class MessageError(ValueError):
    """A send request is malformed.  ``header`` names the offending header (or part).

    The message is safe to show to the client that made the request.
    """

    def __init__(self, header: str, problem: str):
        self.header = header
        self.problem = problem
        super().__init__(f"{header}: {problem}")


@frozen
class Part:
    """One part of a :class:`MultipartBody`.

    ``content`` is text (encoded with the charset of ``content_type``, default
    ``text/plain; charset=UTF-8``) or bytes (sent base64-encoded, byte for byte; default
    type ``application/octet-stream``).  A ``filename`` makes the part an attachment.
    ``headers`` are extra part headers as ``(name, value)`` pairs.
    """

    content: Union[str, bytes] = field(repr=False)
    content_type: str | None = None
    filename: str | None = None
    headers: tuple[tuple[str, str], ...] = field(default=(), converter=tuple)


def Attachment(
    data: bytes, filename: str, content_type: str = "application/octet-stream"
) -> Part:
    """A file attachment: ``data`` sent byte for byte under ``filename``."""
    return Part(bytes(data), content_type, filename)


@frozen
class MultipartBody:
    """A ``multipart/mixed`` body made of :class:`Part` values, in order."""

    parts: tuple[Part, ...] = field(converter=tuple)


Body = Union[str, bytes, MultipartBody]


def _addresses(value: Iterable[str] | str | None) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(value)


def _headers(value) -> tuple[tuple[str, str], ...]:
    """Extra headers as pairs; a mapping may give a list of values for one name."""
    if value is None:
        return ()
    items = value.items() if hasattr(value, "items") else value
    pairs: list[tuple[str, str]] = []
    for name, values in items:
        if isinstance(values, str):
            pairs.append((name, values))
        else:
            pairs.extend((name, v) for v in values)
    return tuple(pairs)


@frozen
class SendRequest:
    """Everything one mail is made of; the input of :func:`build_message`.

    ``primary_recipient`` is the resource target (or the configured ``mailto``).
    ``headers`` holds any other headers, one ``(name, value)`` pair per header line
    (a mapping of name to value or list of values is accepted too).  ``content_type``
    and ``mime_version`` are the request's Content-Type and MIME-Version headers.
    ``attachments`` are appended after the body, turning it into ``multipart/mixed``.
    """

    primary_recipient: str
    body: Body = field(default="", repr=False)
    from_address: str | None = None
    subject: str | None = None
    to: tuple[str, ...] = field(default=(), converter=_addresses)
    cc: tuple[str, ...] = field(default=(), converter=_addresses)
    bcc: tuple[str, ...] = field(default=(), converter=_addresses)
    content_type: str | None = None
    mime_version: str | None = None
    headers: tuple[tuple[str, str], ...] = field(default=(), converter=_headers)
    attachments: tuple[Part, ...] = field(default=(), converter=tuple)


@frozen
class BuiltMessage:
    """The result of :func:`build_message`: what goes into MAIL FROM, RCPT TO and DATA."""

    envelope_from: str
    recipients: tuple[str, ...]
    data: bytes = field(repr=False)


def check_address(header: str, value: object) -> str:
    """Return ``value`` if it is one bare ``user@domain`` address, else raise.

    The error names ``header`` and says why (display name, list, not an address).
    """
    if not isinstance(value, str):
        raise MessageError(header, f"expected an address string, got {type(value).__name__}")
    address = value.strip()
    if not address:
        raise MessageError(header, "empty address")
    if _ADDRESS.fullmatch(address):
        return address
    shown = _shown(address)
    if "," in address or ";" in address:
        problem = "lists are not supported, give one address per value"
    elif "<" in address or '"' in address or "(" in address or " " in address:
        problem = "display names are not supported, give a bare user@domain address"
    else:
        problem = "not a bare user@domain address"
    raise MessageError(header, f"{shown}: {problem}")


def _shown(value: str, limit: int = 80) -> str:
    """A value quoted for an error message, shortened."""
    if len(value) > limit:
        value = value[:limit] + "..."
    return repr(value)


def _unique(addresses: Iterable[str]) -> tuple[str, ...]:
    seen: set[str] = set()
    out = []
    for address in addresses:
        key = address.lower()
        if key not in seen:
            seen.add(key)
            out.append(address)
    return tuple(out)


def _check_header_value(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise MessageError(name, f"header value must be text, got {type(value).__name__}")
    if _LINE_BREAK.search(value):
        raise MessageError(name, "header value contains a line break")
    if "\0" in value:
        raise MessageError(name, "header value contains a NUL character")
    return value


def _content_type(value: str | None, header: str = "Content-Type") -> EmailMessage:
    """Parse a Content-Type value into a scratch message (for its params)."""
    scratch = EmailMessage(policy=POLICY)
    text = _check_header_value(header, value if value is not None else DEFAULT_CONTENT_TYPE)
    try:
        scratch["Content-Type"] = text
        ctype = scratch["Content-Type"]
    except (ValueError, TypeError, IndexError, email.errors.HeaderParseError):
        raise MessageError(header, f"{_shown(text)} is not a valid content type") from None
    if ctype.defects or "/" not in text.split(";", 1)[0]:
        raise MessageError(header, f"{_shown(text)} is not a valid content type")
    return scratch


def parse_content_type(value: str | None, header: str = "Content-Type"):
    """``(maintype, subtype, params)`` of a Content-Type value (default when ``None``).

    Raises :class:`MessageError` naming ``header`` when it is not a content type.
    """
    scratch = _content_type(value, header)
    params = dict(scratch["Content-Type"].params)
    return scratch.get_content_maintype(), scratch.get_content_subtype(), params


def _encoded(header: str, text: str, charset: str) -> bytes:
    """``text`` in ``charset``, or a MessageError naming what is wrong."""
    try:
        return text.encode(charset)
    except LookupError:
        raise MessageError(header, f"unknown charset {charset!r}") from None
    except UnicodeEncodeError:
        raise MessageError(header, f"the body cannot be encoded in charset {charset!r}") from None


def _fill_part(part: MIMEPart, content: Union[str, bytes], content_type: str | None,
               header: str, default_type: str) -> None:
    """Set ``content`` into ``part`` following the text/bytes rules."""
    maintype, subtype, params = parse_content_type(
        content_type if content_type is not None else default_type, header)
    if maintype in ("multipart", "message"):
        raise MessageError(
            header,
            f"{maintype}/{subtype} bodies must be given as a multipart body, or as "
            "ready MIME with MIME-Version set and multipart/mixed",
        )
    if isinstance(content, str):
        charset = params.pop("charset", None) or "us-ascii"
        data = _encoded(header, content, charset)
        if maintype == "text":
            part.set_content(content, subtype=subtype, charset=charset, params=params)
            return
        # Text given for a non-text type: its bytes in the named charset.
        params["charset"] = charset
    elif isinstance(content, (bytes, bytearray, memoryview)):
        data = bytes(content)
    else:
        raise MessageError("body", f"unsupported body type {type(content).__name__}")
    part.set_content(data, maintype=maintype, subtype=subtype, cte="base64",
                     params=params)


def _is_passthrough(request: SendRequest) -> bool:
    """The reference's rule: ready MIME is sent as it is."""
    return (
        request.mime_version is not None
        and request.content_type is not None
        and request.content_type.strip().lower().startswith("multipart/mixed")
        and not isinstance(request.body, MultipartBody)
        and not request.attachments
    )


def _crlf(data: bytes) -> bytes:
    """Normalise bare LF and bare CR line ends to CRLF."""
    return re.sub(rb"\r\n|\r|\n", b"\r\n", data)


def _make_part(part: Part, index: int) -> MIMEPart:
    label = f"part {index + 1}"
    if not isinstance(part, Part):
        raise MessageError(label, f"expected a Part, got {type(part).__name__}")
    mime = MIMEPart(policy=POLICY)
    default = "application/octet-stream" if isinstance(part.content, bytes) else DEFAULT_CONTENT_TYPE
    _fill_part(mime, part.content, part.content_type, f"{label} Content-Type", default)
    if part.filename is not None:
        filename = _check_header_value(f"{label} filename", part.filename)
        mime.add_header("Content-Disposition", "attachment", filename=filename)
    for name, value in part.headers:
        _add_header(mime, name, value, where=f"{label} ")
    return mime


def _add_header(msg, name: str, value: str, where: str = "") -> None:
    if not isinstance(name, str) or not _FIELD_NAME.fullmatch(name):
        raise MessageError(f"{where}{name!r}"[:80], "not a valid header name")
    _check_header_value(f"{where}{name}", value)
    try:
        msg[name] = value
    except (ValueError, TypeError, IndexError, email.errors.HeaderParseError) as e:
        raise MessageError(f"{where}{name}", f"invalid value: {e}") from None


def build_message(
    request: SendRequest,
    *,
    now: datetime | None = None,
    message_id: str | None = None,
) -> BuiltMessage:
    """Build the envelope and the message bytes for ``request``.

    ``now`` and ``message_id`` fix the generated Date and Message-ID headers (tests);
    headers of the same name in ``request.headers`` take precedence over both.
    Raises :class:`MessageError` naming the header for a malformed request.
    """
    primary = check_address("recipient", request.primary_recipient)
    from_address = (
        check_address("From", request.from_address)
        if request.from_address is not None
        else primary
    )
    to = _unique([primary, *(check_address("To", a) for a in request.to)])
    cc = _unique(check_address("Cc", a) for a in request.cc)
    bcc = _unique(check_address("Bcc", a) for a in request.bcc)
    recipients = _unique([*to, *cc, *bcc])

    extra = []
    for name, value in request.headers:
        if not isinstance(name, str) or not _FIELD_NAME.fullmatch(name):
            raise MessageError(_shown(str(name), 40), "not a valid header name")
        lname = name.lower()
        if lname in MANAGED_HEADERS:
            raise MessageError(
                name, "set this header through its own field, not as an extra header"
            )
        extra.append((name, _check_header_value(name, value)))
    extra_names = {name.lower() for name, _ in extra}

    passthrough = _is_passthrough(request)
    msg = EmailMessage(policy=POLICY)
    msg["From"] = from_address
    msg["To"] = ", ".join(to)
    if cc:
        msg["Cc"] = ", ".join(cc)
    if request.subject is not None:
        _add_header(msg, "Subject", request.subject)
    if "date" not in extra_names:
        msg["Date"] = email.utils.format_datetime(now or datetime.now().astimezone())
    if "message-id" not in extra_names:
        domain = from_address.rpartition("@")[2]
        msg["Message-ID"] = message_id or email.utils.make_msgid(domain=domain)
    for name, value in extra:
        if name.lower() == TRANSFER_ENCODING and not passthrough:
            continue  # the builder chooses the transfer encoding
        _add_header(msg, name, value)

    if passthrough:
        _add_header(msg, "MIME-Version", request.mime_version)
        _add_header(msg, "Content-Type", request.content_type)
        body = request.body
        if isinstance(body, str):
            try:
                body = body.encode("ascii")
            except UnicodeEncodeError:
                raise MessageError(
                    "body", "a ready MIME body (MIME-Version set) must be 7-bit ASCII"
                ) from None
        elif isinstance(body, (bytearray, memoryview)):
            body = bytes(body)
        elif not isinstance(body, bytes):
            raise MessageError("body", f"unsupported body type {type(body).__name__}")
        head = b"".join(POLICY.fold_binary(name, value) for name, value in msg.items())
        data = head + b"\r\n" + _crlf(body)
        return BuiltMessage(from_address, recipients, data)

    if isinstance(request.body, MultipartBody) or request.attachments:
        parts: list[MIMEPart] = []
        body = request.body
        if isinstance(body, MultipartBody):
            sources = list(body.parts)
        elif (isinstance(body, str) and body == "") or body is None:
            sources = []
        else:
            sources = [Part(body, request.content_type)]
        sources.extend(request.attachments)
        if not sources:
            raise MessageError("body", "a multipart body needs at least one part")
        for index, part in enumerate(sources):
            parts.append(_make_part(part, index))
        msg["MIME-Version"] = "1.0"
        msg["Content-Type"] = "multipart/mixed"
        msg.set_payload(parts)
    else:
        _fill_part(msg, request.body, request.content_type, "Content-Type",
                   DEFAULT_CONTENT_TYPE)
    try:
        data = msg.as_bytes(policy=POLICY)
    except (ValueError, TypeError, IndexError, UnicodeError,
            email.errors.HeaderParseError) as e:
        raise MessageError("message", f"cannot be encoded: {e}") from None
    return BuiltMessage(from_address, recipients, data)
