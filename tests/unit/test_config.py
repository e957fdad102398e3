"""Destination validation and gateway.yaml parsing."""

import json
import os
import re
import threading
import time

import pytest

from mailgw.config import ConfigError, load_config, parse_config
from mailgw.destination import DestinationError, parse_destination

BASIC = {
    "Name": "office", "Type": "MAIL", "ProxyType": "Internet", "Authentication": "BasicAuthentication",
    "mail.transport.protocol": "smtps", "mail.smtps.host": "smtp.example.org",
    "mail.user": "app@example.org", "mail.password": "pa55word",
}


def with_(**changes):
    d = dict(BASIC)
    for key, value in changes.items():
        key = key.replace("__", ".")
        if value is None:
            d.pop(key, None)
        else:
            d[key] = value
    return d


@pytest.mark.parametrize(
    "protocol, port", [("smtp", 587), ("smtps", 465), ("imap4", 143), ("imap4s", 993), ("pop3", 110), ("pop3s", 995)]
)
def test_default_ports(protocol, port):
    d = parse_destination({**with_(mail__smtps__host=None), "mail.transport.protocol": protocol, f"mail.{protocol}.host": "h"})
    assert d.port == port and d.protocol == protocol


def test_aliases_and_explicit_values():
    d = parse_destination({**with_(mail__smtps__host=None), "mail.transport.protocol": "imaps", "mail.imaps.host": "h", "mail.imaps.port": "1993"})
    assert (d.protocol, d.port, d.family, d.implicit_tls) == ("imap4s", 1993, "imap", True)


def test_secrets_not_in_repr():
    d = parse_destination({**BASIC, "clientSecret": "cs-123"})
    assert "pa55word" not in repr(d) and "cs-123" not in repr(d)


@pytest.mark.parametrize(
    "changes, key",
    [
        (dict(mail__smtps__host=None), "mail.smtps.host"),
        (dict(mail__transport__protocol="smtpx"), "mail.transport.protocol"),
        (dict(Authentication="Kerberos"), "Authentication"),
        (dict(Type="HTTP"), "Type"),
        (dict(ProxyType="Moon"), "ProxyType"),
        (dict(mail__smtps__port="70000"), "mail.smtps.port"),
        (dict(mail__smtps__port="abc"), "mail.smtps.port"),
        (dict(mail__password=None), "mail.password"),
        (dict(Authentication="OAuth2RefreshToken"), "tokenServiceURL"),
        (dict(Authentication="OAuth2RefreshToken", tokenServiceURL="https://t/x"), "clientId"),
        (dict(TrustAll="yes"), "TrustAll"),
        (dict(tokenServiceAuthentication="header"), "tokenServiceAuthentication"),
        (dict(mail__smtps__starttls__required="maybe"), "mail.smtps.starttls.required"),
    ],
)
def test_invalid_destination_names_key(changes, key):
    with pytest.raises(DestinationError) as info:
        parse_destination(with_(**changes))
    assert info.value.key == key and "office" in str(info.value) and key in str(info.value)
    assert "pa55word" not in str(info.value)


def test_common_token_url():
    d = parse_destination(with_(Authentication="OAuth2ClientCredentials", tokenServiceURL="https://{tenant}.auth.example/oauth/token",
                                 clientId="c", clientSecret="s", tokenServiceURLType="Common"))
    assert d.with_tenant_token_url("acme") == "https://acme.auth.example/oauth/token"
    d2 = parse_destination(with_(Authentication="OAuth2ClientCredentials", tokenServiceURL="https://auth.example/t",
                                 clientId="c", clientSecret="s", tokenServiceURLType="Common"))
    assert d2.with_tenant_token_url("acme") == "https://acme.auth.example/t"
    assert d2.with_tenant_token_url(None) == "https://auth.example/t"


def write(tmp_path, text, name="gateway.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_yaml_config_with_secret_references(tmp_path, monkeypatch):
    monkeypatch.setenv("OFFICE_PASSWORD", "from-env")
    (tmp_path / "secret.txt").write_text("from-file\n")
    path = write(tmp_path, """
destinations:
  - {Name: office, Type: MAIL, ProxyType: Internet, Authentication: BasicAuthentication,
     mail.transport.protocol: smtps, mail.smtps.host: smtp.example.org,
     mail.user: app@example.org, mail.password: {env: OFFICE_PASSWORD}}
  - {Name: other, Type: MAIL, Authentication: BasicAuthentication,
     mail.transport.protocol: imap4s, mail.imap4s.host: imap.example.org,
     mail.user: u, mail.password: {file: secret.txt}}
listeners:
  - {destination: office, listen: "tcp:2465:interface=127.0.0.1"}
  - {destination: office, listen: "tcp:2466:interface=127.0.0.1", tenant: acme}
http:
  listen: "tcp:9494:interface=127.0.0.1"
timeouts: {connect: 5, relayIdle: 600, drain: 3}
limits: {maxLine: 4096}
""")
    config = load_config(path)
    assert config.destinations["office"].password == "from-env"
    assert config.destinations["other"].password == "from-file"
    assert [l.tenant for l in config.listeners] == [None, "acme"]
    assert config.settings.connect_timeout == 5 and config.settings.max_line == 4096 and config.settings.drain_timeout == 3


def test_json_config_and_directory_of_destinations(tmp_path):
    (tmp_path / "dests").mkdir()
    (tmp_path / "dests" / "office.json").write_text(json.dumps(BASIC))
    path = write(tmp_path, json.dumps({"destinations": "dests", "listeners": [{"destination": "office", "listen": "tcp:0"}]}), "gw.json")
    assert list(load_config(path).destinations) == ["office"]


@pytest.mark.parametrize(
    "doc, expected",
    [
        ({"destinations": [with_(mail__smtps__host=None)]}, "destination 'office', key 'mail.smtps.host': is missing"),
        ({"destinations": [BASIC, BASIC]}, "defined twice"),
        ({"destinations": [BASIC], "listeners": [{"destination": "nope", "listen": "tcp:1"}]}, "no destination named 'nope'"),
        ({"destinations": [BASIC], "listeners": [{"destination": "office"}]}, "key 'listen'"),
        ({"destinations": [{**BASIC, "mail.password": {"env": "MAILGW_UNSET_VAR"}}]}, "MAILGW_UNSET_VAR is not set"),
        ({"destinations": [{**BASIC, "ProxyType": "OnPremise"}]}, "no connectivityProxy"),
        ({"destinations": [{**BASIC, "TrustStoreLocation": "/nonexistent.pem"}]},
         "key 'TrustStoreLocation': /nonexistent.pem: cannot read PEM file"),
        ({"destinations": [], "connectivityProxy": {"host": "p", "port": 1, "authentication": "sap"}}, "key 'tokenServiceURL'"),
        ({"destinations": [], "connectivityProxy": {"host": "p", "port": 1, "authentication": "sap", "tokenServiceURL": "ftp://x",
                                                     "clientId": "c", "clientSecret": "pa55word"}}, "key 'tokenServiceURL': must be an http(s) URL"),
        ({"destinations": [], "connectivityProxy": {"host": "p", "port": 1, "authentication": "userpass",
                                                     "username": "u" * 256, "password": "pa55word"}}, "username must be 1 to 255 bytes"),
        ({"destinations": [], "connectivityProxy": {"host": "p", "port": 1, "authentication": "userpass",
                                                     "username": "u", "password": "pa55word" * 40}}, "password must be 1 to 255 bytes"),
        ({"destinations": [], "bogus": 1}, "unknown key 'bogus'"),
        ({"destinations": [], "timeouts": {"connect": -1}}, "positive number"),
    ],
)
def test_config_errors_are_one_clear_line(doc, expected, tmp_path):
    with pytest.raises(ConfigError) as info:
        parse_config(doc, "gw.yaml", tmp_path)
    message = str(info.value)
    assert expected in message and message.startswith("gw.yaml") and "\n" not in message
    assert "pa55word" not in message


def test_a_fifo_as_a_pem_file_is_refused_instead_of_blocking(tmp_path):
    # The PEM files are read like every file of the configuration (files.read_capped).
    fifo = tmp_path / "ca.pem"
    os.mkfifo(fifo)

    def writer():  # so that a reader blocked on the FIFO would not hang the test
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
                return
            except OSError:  # nobody reads it (yet)
                time.sleep(0.05)

    threading.Thread(target=writer, daemon=True).start()
    with pytest.raises(ConfigError, match="key 'TrustStoreLocation': .*ca.pem: cannot read PEM file: it is a FIFO"):
        parse_config({"destinations": [{**BASIC, "TrustStoreLocation": str(fifo)}]}, "gw.yaml", tmp_path)


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="line 3"):
        load_config(write(tmp_path, "destinations:\n  - [unclosed\n"))


def test_second_wave_sections(tmp_path):
    (tmp_path / "send-token").write_text("tok-secret\n")
    config = parse_config({
        "destinations": [BASIC],
        "http": {"listen": "tcp:9494", "send": {"listen": "tcp:9495:interface=127.0.0.1", "tokens": [{"file": "send-token"}, "two"]}},
        "audit": {"path": "audit.jsonl"},
        "logging": {"format": "json"},
        "timeouts": {"dialogue": 60, "drain": 5},
        "limits": {"maxSessionsPerClient": 3},
    }, "gw.yaml", tmp_path)
    assert config.http.send.listen == "tcp:9495:interface=127.0.0.1"
    assert config.http.send.tokens == ("tok-secret", "two")
    assert "tok-secret" not in repr(config)
    assert config.audit.path == str(tmp_path / "audit.jsonl")
    assert config.logging.format == "json"
    assert (config.settings.dialogue_timeout, config.settings.drain_timeout, config.settings.max_sessions_per_client) == (60, 5, 3)
    defaults = parse_config({"destinations": [BASIC], "http": {"listen": "tcp:9494"}}, "gw.yaml", tmp_path)
    assert defaults.http.send is None and defaults.audit is None and defaults.logging.format == "text"
    assert parse_config({"destinations": [], "audit": {"path": "-"}}).audit.path == "-"


@pytest.mark.parametrize("doc, expected", [
    ({"http": {"listen": "tcp:1", "send": "yes"}}, "http, key 'send': must be a mapping"),
    ({"http": {"listen": "tcp:1", "send": {"tokens": [""]}}}, "tokens[0]: must be a non-empty string"),
    ({"http": {"listen": "tcp:1", "sned": {}}}, "http: unknown key 'sned'"),
    ({"audit": {"file": "x"}}, "audit: must be a mapping with one key, path"),
    ({"logging": {"format": "xml"}}, "logging, key 'format': must be text or json"),
    ({"limits": {"maxSessionsPerClient": 0}}, "key 'maxSessionsPerClient': must be a positive number"),
])
def test_second_wave_section_errors(doc, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        parse_config({"destinations": [], **doc}, "gw.yaml")


@pytest.mark.parametrize("section, key, value, expected", [
    ("limits", "maxLine", float("inf"), "must be a positive number"),
    ("timeouts", "connect", float("nan"), "must be a positive number"),
    ("limits", "maxSessionsPerClient", 0.5, "must be a whole number"),
    ("timeouts", "Connect", 3, "unknown key 'Connect'"),
])
def test_numbers_must_be_finite_and_counts_whole(section, key, value, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        parse_config({"destinations": [], section: {key: value}}, "gw.yaml")
