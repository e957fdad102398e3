"""The send API on the gateway's own http listener, end to end with curl."""

from __future__ import annotations

import uuid

import realservers
from support.clients import curl_post


def test_post_v1_send_through_a_configured_destination(postfix, certs, smtp_sink, gateway_factory):
    http_port = realservers.free_port()
    gateway_factory({
        "destinations": [{
            "Name": "office", "Type": "MAIL", "Authentication": "BasicAuthentication",
            "mail.transport.protocol": "smtp", "mail.smtp.host": "localhost",
            "mail.smtp.port": str(postfix.submission_port), "mail.user": "alice", "mail.password": "secret",
            "TrustStoreLocation": str(certs.ca_pem),
        }],
        "http": {"listen": f"tcp:{http_port}:interface=127.0.0.1", "send": {}},  # loopback: no tokens needed
    })
    base = f"http://127.0.0.1:{http_port}/v1/send"
    mark = uuid.uuid4().hex
    status, text = curl_post(f"{base}/office/rcpt@example.org", f"sent over HTTP {mark}\n".encode(),
                             [f"Subject: {mark}", "From: app@example.org", "Content-Type: text/plain; charset=UTF-8"])
    assert status == 200 and text.startswith("250"), text
    got = smtp_sink.wait_for(lambda m: mark.encode() in m.data, timeout=30)
    assert got.rcpt_tos == ["rcpt@example.org"]

    assert curl_post(f"{base}/nowhere/rcpt@example.org", b"x", ["Subject: s"])[0] == 404
    status, text = curl_post(f"{base}/office/rcpt@example.org", b"x", ["Cc: Display Name <a@example.org>"])
    assert status == 400 and "Cc" in text
