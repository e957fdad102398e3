"""Upstream TLS settings: built once per set of settings, rebuilt when a PEM file changes."""

import os

import trustme

from mailgw.destination import parse_destination
from mailgw.endpoints.tls import client_tls_options


def destination(ca_path, **extra):
    return parse_destination({
        "Name": "d", "Type": "MAIL", "mail.transport.protocol": "smtps", "mail.smtps.host": "mail.example.org",
        "TrustStoreLocation": str(ca_path), **extra,
    })


def test_options_are_shared_and_follow_a_changed_trust_store(tmp_path):
    ca_path = tmp_path / "ca.pem"
    ca_path.write_bytes(trustme.CA().cert_pem.bytes())
    first = client_tls_options(destination(ca_path))
    assert client_tls_options(destination(ca_path)) is first
    ca_path.write_bytes(trustme.CA().cert_pem.bytes())
    stat = ca_path.stat()
    os.utime(ca_path, (stat.st_atime, stat.st_mtime + 10))
    assert client_tls_options(destination(ca_path)) is not first


def test_trust_all_is_not_shared_with_verifying_options(tmp_path):
    ca_path = tmp_path / "ca.pem"
    ca_path.write_bytes(trustme.CA().cert_pem.bytes())
    verifying = client_tls_options(destination(ca_path))
    assert client_tls_options(destination(ca_path, TrustAll="true")) is not verifying
