"""The send API's message rules (SPEC section 8), checked on the generated message parsed
back with the standard ``email`` package."""

from __future__ import annotations

import email
import email.policy
from datetime import datetime, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailgw.send import (
    Attachment,
    EmailConnection,
    MessageError,
    MultipartBody,
    Part,
    SendConfig,
    SendRequest,
    build_message,
)
from mailgw.send.http import parse_send_request

PRIMARY = "bob@example.org"


def text_of(part):
    """Decoded text with line ends as LF (base64 text carries canonical CRLF)."""
    return part.get_content().replace("\r\n", "\n")


def build(**kwargs):
    kwargs.setdefault("primary_recipient", PRIMARY)
    return build_message(SendRequest(**kwargs))


def parse(built):
    """The message as a mail client sees it (line ends converted to LF, as stores do)."""
    assert b"\n" not in built.data.replace(b"\r\n", b"")  # CRLF only on the wire
    return email.message_from_bytes(built.data.replace(b"\r\n", b"\n"),
                                    policy=email.policy.default)


def test_from_defaults_to_primary_recipient():
    built = build(body="hi")
    msg = parse(built)
    assert msg["From"] == PRIMARY
    assert built.envelope_from == PRIMARY


def test_explicit_from_is_header_and_envelope_sender():
    built = build(body="hi", from_address="alice@example.com")
    assert parse(built)["From"] == "alice@example.com"
    assert built.envelope_from == "alice@example.com"


def test_primary_recipient_always_in_to():
    msg = parse(build(body="hi", to=["carol@example.net", "dave@example.net"]))
    assert [a.addr_spec for a in msg["To"].addresses] == [
        PRIMARY, "carol@example.net", "dave@example.net"]


def test_primary_recipient_not_duplicated_in_to():
    built = build(body="hi", to=["BOB@example.org", "carol@example.net"])
    assert [a.addr_spec for a in parse(built)["To"].addresses] == [
        PRIMARY, "carol@example.net"]
    assert built.recipients == (PRIMARY, "carol@example.net")


def test_cc_written_and_in_envelope():
    built = build(body="hi", cc=["carol@example.net"])
    assert parse(built)["Cc"] == "carol@example.net"
    assert "carol@example.net" in built.recipients


def test_bcc_absent_from_headers_but_in_recipients():
    built = build(body="hi", bcc=["secret@example.net"], cc=["carol@example.net"])
    msg = parse(built)
    assert msg["Bcc"] is None
    assert b"secret@example.net" not in built.data
    assert built.recipients == (PRIMARY, "carol@example.net", "secret@example.net")


@pytest.mark.parametrize("field,header", [("to", "To"), ("cc", "Cc"), ("bcc", "Bcc")])
@pytest.mark.parametrize("value,why", [
    ("Carol <carol@example.net>", "display names"),
    ('"Carol" carol@example.net', "display names"),
    ("carol@example.net (Carol)", "display names"),
    ("carol@example.net, dave@example.net", "lists"),
    ("carol@example.net;dave@example.net", "lists"),
    ("carol", "not a bare"),
    ("carol@", "not a bare"),
    ("@example.net", "not a bare"),
    ("a@b@example.net", "not a bare"),
])
def test_non_bare_addresses_refused_naming_the_header(field, header, value, why):
    with pytest.raises(MessageError) as info:
        build(body="hi", **{field: [value]})
    assert info.value.header == header
    assert str(info.value).startswith(f"{header}: ")
    assert why in str(info.value)


def test_from_and_primary_recipient_must_be_bare():
    with pytest.raises(MessageError, match="^From: .*display names"):
        build(body="hi", from_address="Alice <alice@example.com>")
    with pytest.raises(MessageError, match="^recipient: .*lists"):
        build(primary_recipient="a@example.com,b@example.com", body="hi")


def test_default_content_type_is_utf8_text():
    msg = parse(build(body="plain words"))
    assert msg.get_content_type() == "text/plain"
    assert msg.get_content_charset() == "utf-8"
    assert msg["MIME-Version"] == "1.0"
    assert text_of(msg) == "plain words\n"


def test_non_ascii_text_encoded_with_charset_and_7bit_clean():
    text = "Grüße aus Köln — 東京\n"
    built = build(body=text, subject="Grüße ✓")
    built.data.decode("ascii")  # 7-bit clean on the wire
    msg = parse(built)
    assert msg["Content-Transfer-Encoding"] in ("quoted-printable", "base64")
    assert text_of(msg) == text
    assert msg["Subject"] == "Grüße ✓"


def test_text_uses_the_content_type_charset():
    text = "Grüße\n"
    msg = parse(build(body=text, content_type="text/plain; charset=ISO-8859-1; format=flowed"))
    assert msg.get_content_charset() == "iso-8859-1"
    assert msg.get_param("format") == "flowed"
    assert msg.get_payload(decode=True).replace(b"\r\n", b"\n") == text.encode("iso-8859-1")
    assert text_of(msg) == text


def test_text_without_charset_is_7bit_ascii():
    msg = parse(build(body="just ascii\n", content_type="text/plain"))
    assert msg.get_content_charset() == "us-ascii"
    assert msg["Content-Transfer-Encoding"] == "7bit"
    with pytest.raises(MessageError, match="^Content-Type: .*us-ascii"):
        build(body="naïve", content_type="text/plain")


def test_html_text_keeps_its_subtype():
    msg = parse(build(body="<p>hi</p>", content_type="text/html; charset=UTF-8"))
    assert msg.get_content_type() == "text/html"


def test_unknown_charset_and_bad_content_type_refused():
    with pytest.raises(MessageError, match="^Content-Type: unknown charset"):
        build(body="x", content_type="text/plain; charset=no-such-charset")
    with pytest.raises(MessageError, match="^Content-Type: "):
        build(body="x", content_type="not a type")


def test_bytes_body_is_a_binary_part_byte_for_byte():
    data = bytes(range(256)) * 3
    built = build(body=data, content_type="application/pdf")
    msg = parse(built)
    assert msg.get_content_type() == "application/pdf"
    assert msg["Content-Transfer-Encoding"] == "base64"
    assert msg.get_payload(decode=True) == data


def test_bytes_body_with_default_content_type_kept_exact():
    data = "Grüße\r\nno newline change\n".encode("utf-8")
    msg = parse(build(body=data))
    assert msg.get_content_type() == "text/plain"
    assert msg["Content-Transfer-Encoding"] == "base64"
    assert msg.get_payload(decode=True) == data


MIME_BODY = (
    b"--XYZ\r\n"
    b"Content-Type: text/plain; charset=us-ascii\r\n"
    b"\r\n"
    b"ready-made part\r\n"
    b"--XYZ--\r\n"
)


@pytest.mark.parametrize("body", [MIME_BODY, MIME_BODY.decode("ascii"),
                                  MIME_BODY.replace(b"\r\n", b"\n")])
def test_mime_version_passthrough_sends_body_as_is(body):
    built = build(body=body, mime_version="1.0",
                  content_type='multipart/mixed; boundary="XYZ"',
                  headers=[("Content-Transfer-Encoding", "7bit")])
    head, _, sent_body = built.data.partition(b"\r\n\r\n")
    assert sent_body == MIME_BODY
    msg = parse(built)
    assert msg["MIME-Version"] == "1.0"
    assert msg["Content-Transfer-Encoding"] == "7bit"
    assert msg.get_content_type() == "multipart/mixed"
    [part] = msg.iter_parts()
    assert part.get_content() == "ready-made part"  # the CRLF belongs to the delimiter
    assert msg["To"] == PRIMARY


def test_no_passthrough_without_mime_version():
    with pytest.raises(MessageError, match="^Content-Type: multipart/mixed"):
        build(body=MIME_BODY, content_type='multipart/mixed; boundary="XYZ"')


def test_no_passthrough_for_other_multipart_types():
    with pytest.raises(MessageError, match="^Content-Type: "):
        build(body=MIME_BODY, mime_version="1.0",
              content_type='multipart/alternative; boundary="XYZ"')


def test_passthrough_text_must_be_ascii():
    with pytest.raises(MessageError, match="^body: "):
        build(body="ü", mime_version="1.0", content_type="multipart/mixed; boundary=b")


def test_mime_version_with_text_type_is_replaced():
    msg = parse(build(body="x", mime_version="1.0", content_type="text/plain"))
    assert msg.get_all("MIME-Version") == ["1.0"]
    assert text_of(msg) == "x\n"


def test_multi_valued_extra_headers_one_line_each():
    built = build(body="x", headers={"X-Tag": ["one", "two", "three"], "Reply-To": "r@example.org"})
    msg = parse(built)
    assert msg.get_all("X-Tag") == ["one", "two", "three"]
    assert msg["Reply-To"] == "r@example.org"
    assert built.data.count(b"X-Tag: ") == 3


def test_extra_headers_as_pairs_keep_order_and_non_ascii():
    msg = parse(build(body="x", headers=[("X-A", "1"), ("X-B", "ä"), ("X-A", "2")]))
    assert msg.get_all("X-A") == ["1", "2"]
    assert msg["X-B"] == "ä"


@pytest.mark.parametrize("name", ["To", "bcc", "Subject", "Content-Type", "MIME-Version"])
def test_managed_headers_cannot_be_extra_headers(name):
    with pytest.raises(MessageError) as info:
        build(body="x", headers=[(name, "bob@example.org")])
    assert info.value.header == name


def test_extra_header_injection_refused():
    with pytest.raises(MessageError, match="^X-Evil: .*line break"):
        build(body="x", headers=[("X-Evil", "a\r\nBcc: victim@example.org")])
    with pytest.raises(MessageError, match="not a valid header name"):
        build(body="x", headers=[("Bad Name", "v")])
    with pytest.raises(MessageError, match="^Subject: .*line break"):
        build(body="x", subject="hi\nBcc: x@example.org")


def test_transfer_encoding_header_ignored_outside_passthrough():
    msg = parse(build(body="Grüße", headers=[("Content-Transfer-Encoding", "8bit")]))
    assert msg.get_all("Content-Transfer-Encoding") == ["base64"] or \
        msg.get_all("Content-Transfer-Encoding") == ["quoted-printable"]


def test_date_and_message_id_generated_or_taken():
    when = datetime(2024, 5, 6, 7, 8, 9, tzinfo=timezone.utc)
    msg = parse(build_message(SendRequest(PRIMARY, "x", from_address="a@example.com"),
                              now=when))
    assert msg["Date"].datetime == when
    assert msg["Message-ID"].endswith("@example.com>")
    msg = parse(build(body="x", headers=[("Message-ID", "<given@x>"),
                                         ("Date", "Mon, 01 Jan 2024 00:00:00 +0000")]))
    assert msg.get_all("Message-ID") == ["<given@x>"]
    assert msg.get_all("Date") == ["Mon, 01 Jan 2024 00:00:00 +0000"]


def test_attachments_byte_for_byte():
    blob = bytes(range(256)) * 50 + b"\r\n\n\r\x00"
    built = build(body="see attached", attachments=[
        Attachment(blob, "data.bin"),
        Attachment(b"%PDF-1.4\n", "Bericht Ü.pdf", "application/pdf"),
    ])
    msg = parse(built)
    assert msg.get_content_type() == "multipart/mixed"
    body, first, second = msg.iter_parts()
    assert text_of(body) == "see attached\n"
    assert first.get_filename() == "data.bin"
    assert first.get_payload(decode=True) == blob
    assert second.get_content_type() == "application/pdf"
    assert second.get_filename() == "Bericht Ü.pdf"
    assert second.get_payload(decode=True) == b"%PDF-1.4\n"


def test_multipart_body_replaces_mime_headers():
    body = MultipartBody([
        Part("Hallo Welt ü", "text/plain; charset=ISO-8859-1"),
        Part(b"<b>x</b>", "text/html"),
        Part(b"\x00\x01", filename="raw.dat", headers=[("Content-ID", "<raw@x>")]),
    ])
    msg = parse(build(body=body, mime_version="0.9", content_type="text/plain",
                      headers=[("Content-Transfer-Encoding", "binary")]))
    assert msg.get_content_type() == "multipart/mixed"
    assert msg.get_all("MIME-Version") == ["1.0"]
    assert msg["Content-Transfer-Encoding"] is None
    text, html, raw = msg.iter_parts()
    assert text.get_content_charset() == "iso-8859-1"
    assert text_of(text) == "Hallo Welt ü\n"
    assert html.get_payload(decode=True) == b"<b>x</b>"
    assert raw.get_content_type() == "application/octet-stream"
    assert raw.get_payload(decode=True) == b"\x00\x01"
    assert raw["Content-ID"] == "<raw@x>"


def test_empty_multipart_refused():
    with pytest.raises(MessageError, match="^body: "):
        build(body=MultipartBody([]))


def test_email_connection_builds_with_setters_and_mailto():
    conn = EmailConnection("you@example.org", SendConfig(mailto="override@example.org"))
    conn.set_from_address("me@example.org")
    conn.set_subject("Hello you!")
    conn.set_content("This is the e-mail body.")
    conn.add_cc("cc@example.org")
    conn.add_bcc("hidden@example.org")
    conn.add_header("X-Multi", "1", "2")
    conn.add_attachment(b"\xff\x00", "a.bin")
    built = conn.build()
    msg = parse(built)
    assert msg["To"] == "override@example.org"
    assert built.recipients == ("override@example.org", "cc@example.org", "hidden@example.org")
    assert msg["Subject"] == "Hello you!"
    assert msg.get_all("X-Multi") == ["1", "2"]
    assert [p.get_payload(decode=True) for p in msg.iter_parts()][-1] == b"\xff\x00"
    assert "you@example.org" in repr(conn)


def test_config_defaults_and_secret_not_in_repr():
    assert SendConfig().effective_port == 25
    assert SendConfig(tls=True).effective_port == 465
    assert SendConfig(port=2525, tls=True).effective_port == 2525
    config = SendConfig(userid="u", password="hunter2-secret")
    assert "hunter2-secret" not in repr(config)
    assert config.connect_timeout == 15 and config.read_timeout == 60
    with pytest.raises(ValueError):
        SendConfig(tls=True, starttls=True)
    with pytest.raises(ValueError, match="gateway supplies"):
        SendConfig(destination="office", userid="u", password="p")
    gw = SendConfig.via_gateway("office", "127.0.0.1", 2525)
    assert (gw.hostname, gw.effective_port, gw.destination) == ("127.0.0.1", 2525, "office")


# -- the HTTP request mapping (pure) ------------------------------------------------------


def raw(headers):
    grouped = {}
    for name, value in headers:
        grouped.setdefault(name.encode(), []).append(value.encode("utf-8"))
    return list(grouped.items())


def test_http_headers_map_to_fields():
    req = parse_send_request(None, raw([
        ("To", "bob@example.org"), ("To", "carol@example.org"), ("Cc", "c@example.org"),
        ("Bcc", "b@example.org"), ("Subject", "Grüße"), ("Host", "localhost"),
        ("User-Agent", "curl/7"), ("X-Tag", "1"), ("X-Tag", "2"),
        ("Content-Type", "application/x-www-form-urlencoded"),
    ]), "Grüße".encode("utf-8"))
    assert req.primary_recipient == "bob@example.org"
    assert req.to == ("carol@example.org",)
    assert req.cc == ("c@example.org",) and req.bcc == ("b@example.org",)
    assert req.subject == "Grüße"
    assert req.headers == (("X-Tag", "1"), ("X-Tag", "2"))
    assert req.content_type is None  # curl -d's default counts as unset
    assert req.body == "Grüße"


def test_http_path_recipient_wins_and_to_stays():
    req = parse_send_request("path@example.org", raw([("To", "x@example.org")]), b"")
    assert req.primary_recipient == "path@example.org"
    assert req.to == ("x@example.org",)


def test_http_errors_name_the_header():
    with pytest.raises(MessageError, match="^To: no recipient"):
        parse_send_request(None, raw([]), b"")
    with pytest.raises(MessageError, match="^Subject: give this header once"):
        parse_send_request("a@b.example", raw([("Subject", "1"), ("Subject", "2")]), b"")
    with pytest.raises(MessageError, match="^Content-Type: the body is not valid"):
        parse_send_request("a@b.example", raw([("Content-Type", "text/plain; charset=utf-8")]),
                           b"\xff\xfe")
    with pytest.raises(MessageError, match="^X-Bin: header value is not UTF-8"):
        parse_send_request("a@b.example", [(b"X-Bin", [b"\xff"])], b"")


def test_http_binary_and_passthrough_bodies_stay_bytes():
    req = parse_send_request("a@b.example", raw([("Content-Type", "image/png")]), b"\x89PNG")
    assert req.body == b"\x89PNG"
    req = parse_send_request("a@b.example", raw([
        ("Content-Type", "multipart/mixed; boundary=XYZ"), ("MIME-Version", "1.0")]), MIME_BODY)
    assert req.body == MIME_BODY
    assert build_message(req).data.endswith(MIME_BODY)


# -- properties ---------------------------------------------------------------------------

_local = st.from_regex(r"[a-z0-9](?:[a-z0-9._+-]{0,10}[a-z0-9])?", fullmatch=True).filter(
    lambda s: ".." not in s)
_domain = st.from_regex(r"[a-z0-9]{1,8}(?:\.[a-z]{2,6}){1,2}", fullmatch=True)
addresses = st.builds(lambda l, d: f"{l}@{d}", _local, _domain)


@settings(max_examples=60, deadline=None)
@given(primary=addresses, to=st.lists(addresses, max_size=3), cc=st.lists(addresses, max_size=3),
       bcc=st.lists(addresses, max_size=3), text=st.text(max_size=200),
       subject=st.text(max_size=60).filter(lambda s: len(s.splitlines()) <= 1))
def test_property_addresses_and_text_round_trip(primary, to, cc, bcc, text, subject):
    try:
        built = build(primary_recipient=primary, to=to, cc=cc, bcc=bcc, body=text,
                      subject=subject)
    except MessageError as e:
        # Only NUL and line-break characters (refused in headers) stop a subject.
        assert e.header == "Subject" and ("\0" in subject or subject.splitlines() != [subject]), e
        return
    built.data.decode("ascii")
    msg = parse(built)
    written = {a.addr_spec.lower() for h in ("To", "Cc") if msg[h] for a in msg[h].addresses}
    assert primary.lower() in written
    assert {r.lower() for r in built.recipients} == {a.lower() for a in [primary, *to, *cc, *bcc]}
    assert msg["Bcc"] is None
    assert written == {a.lower() for a in [primary, *to, *cc]}
    # email normalises CR, LF and CRLF line ends and ends the text with one newline.
    lines = [line.decode("utf-8") for line in text.encode("utf-8").splitlines()]
    assert text_of(msg) == "\n".join(lines) + "\n"


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=2000), name=st.text(min_size=1, max_size=30).filter(
    lambda s: "\r" not in s and "\n" not in s and "\0" not in s))
def test_property_attachments_exact(data, name):
    try:
        built = build(body=data, attachments=[Attachment(data, name)])
    except MessageError:
        return
    body, attachment = parse(built).iter_parts()
    assert body.get_payload(decode=True) == data
    assert attachment.get_payload(decode=True) == data


@settings(max_examples=100, deadline=None)
@given(value=st.text(max_size=60))
def test_property_any_address_text_is_accepted_bare_or_refused_cleanly(value):
    try:
        built = build(body="x", to=[value])
    except MessageError as e:
        assert e.header == "To"
        return
    assert value.strip() in built.recipients
    assert "," not in value and "<" not in value and " " not in value.strip()


@settings(max_examples=100, deadline=None)
@given(name=st.text(min_size=1, max_size=20), value=st.text(max_size=80))
def test_property_extra_headers_never_crash(name, value):
    try:
        built = build(body="x", headers=[(name, value)])
    except MessageError:
        return
    parse(built)
