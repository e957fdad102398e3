"""Upstream TLS settings: built once per set of settings, rebuilt when a PEM file changes
(looked at again once a minute, never on every session)."""

import os

import trustme

from mailgw.destination import parse_destination
from mailgw.endpoints import tls
from mailgw.endpoints.tls import RECHECK_SECONDS, client_tls_options


def destination(ca_path, **extra):
    return parse_destination({
        "Name": "d", "Type": "MAIL", "mail.transport.protocol": "smtps", "mail.smtps.host": "mail.example.org",
        "TrustStoreLocation": str(ca_path), **extra,
    })


def test_options_are_shared_and_follow_a_changed_trust_store(tmp_path):
    ca_path = tmp_path / "ca.pem"
    ca_path.write_bytes(trustme.CA().cert_pem.bytes())
    first = client_tls_options(destination(ca_path), now=0)
    assert client_tls_options(destination(ca_path), now=1) is first
    ca_path.write_bytes(trustme.CA().cert_pem.bytes())
    stat = ca_path.stat()
    os.utime(ca_path, (stat.st_atime, stat.st_mtime + 10))
    assert client_tls_options(destination(ca_path), now=2) is first  # not looked at yet
    changed = client_tls_options(destination(ca_path), now=RECHECK_SECONDS + 1)
    assert changed is not first
    assert client_tls_options(destination(ca_path), now=3 * RECHECK_SECONDS) is changed  # looked at: unchanged


def test_trust_all_is_not_shared_with_verifying_options(tmp_path):
    ca_path = tmp_path / "ca.pem"
    ca_path.write_bytes(trustme.CA().cert_pem.bytes())
    verifying = client_tls_options(destination(ca_path))
    assert client_tls_options(destination(ca_path, TrustAll="true")) is not verifying


def test_sessions_neither_stat_the_pem_files_nor_repeat_the_trust_all_warning(tmp_path, monkeypatch, events):
    ca_path = tmp_path / "ca.pem"
    ca_path.write_bytes(trustme.CA().cert_pem.bytes())
    trusting = destination(ca_path, Name="trusting", TrustAll="true")
    client_tls_options(trusting, now=100)
    stats = []
    real_stat = os.stat
    monkeypatch.setattr(tls.os, "stat", lambda *args, **kw: stats.append(args) or real_stat(*args, **kw))
    for second in range(101, 110):  # a session a second
        client_tls_options(trusting, now=second)
    assert stats == []
    warnings = [e for e in events if "TrustAll" in e.get("log_format", "")]
    assert len(warnings) == 1 and warnings[0]["destination"] == "trusting"
