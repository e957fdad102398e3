"""Warm upstream pools (SPEC 9.7) against real Dovecot over IMAPS and real clients."""

from __future__ import annotations

import imaplib
import json
import poplib
import signal

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from support.destinations import mail
from gatewayharness import start_gateway
from mailgw.destination import parse_destination
from mailgw.protocol.session import Phase
from mailgw.settings import Route
from support.clients import http, imap_without_login
from support.gatewayprocess import GatewayProcess, free_port, write_config
from support.reactor import in_reactor, wait_for


def dest(name, protocol, port, certs, **extra):
    return mail(name, protocol, port, ca=certs.ca_pem, **extra)


def pool_status(gw, name):
    return in_reactor(lambda: gw.gateway.pools[Route(name)].status())


def connects(name) -> float:
    return REGISTRY.get_sample_value("mailgw_upstream_seconds_count", {"destination": name, "phase": "connect"}) or 0.0


def test_sessions_take_logged_in_connections_and_never_share_one(dovecot, certs, reactor, tmp_path):
    name = "warm-imaps"
    before = connects(name)
    gw = start_gateway({
        "destinations": [dest(name, "imap4s", dovecot.imaps_port, certs, **{"mailgw.pool.size": "2"})],
    }, tmp_path)
    try:
        wait_for(lambda: pool_status(gw, name)["ready"] == 2, what="two warm connections")
        assert connects(name) - before == 2
        for index in range(3):
            client = imap_without_login(gw.address(0))
            assert client.select("INBOX")[0] == "OK"
            assert client.logout()[0] == "BYE"
            wait_for(lambda: pool_status(gw, name)["ready"] == 2, what="the pool refilled")
            # Every application session had a connection of its own, made for it in advance.
            assert connects(name) - before == 3 + index
        status = pool_status(gw, name)
        assert status["served"] == 3 and status["failures_in_a_row"] == 0
        # /status shows the pool
        [shown] = in_reactor(gw.service.status_providers["pools"])
        assert shown["route"] == name and shown["size"] == 2
    finally:
        gw.stop()


def test_pooled_connections_are_replaced_when_they_age(dovecot, certs, reactor, tmp_path):
    name = "warm-pop3s"
    before = connects(name)
    gw = start_gateway({
        "destinations": [dest(name, "pop3s", dovecot.pop3s_port, certs, **{"mailgw.pool.size": "1", "mailgw.pool.maxIdle": "1"})],
    }, tmp_path)
    try:
        wait_for(lambda: connects(name) - before >= 3, timeout=20, what="the aged connections to be replaced")
        wait_for(lambda: pool_status(gw, name)["ready"] == 1, what="a fresh warm connection")
        client = poplib.POP3(*gw.address(0), timeout=30)
        assert client.stat()[0] >= 1
        client.quit()
    finally:
        gw.stop()


def test_a_refused_pooled_login_backs_off_and_sessions_get_the_refusal(dovecot, certs, reactor, tmp_path):
    name = "warm-wrong"
    gw = start_gateway({
        "destinations": [dest(name, "imap4s", dovecot.imaps_port, certs, **{"mailgw.pool.size": "2", "mail.password": "wrong-pw"})],
    }, tmp_path)
    try:
        wait_for(lambda: pool_status(gw, name)["failures_in_a_row"] >= 1, what="the pool's first failed login")
        status = pool_status(gw, name)
        assert status["ready"] == 0 and "upstream refused the credentials" in status["last_failure"]
        assert "wrong-pw" not in json.dumps(status)
        # No warm connection: the session logs in itself and gets the usual refusal.
        with pytest.raises(imaplib.IMAP4.error, match="upstream refused the credentials"):
            imaplib.IMAP4(*gw.address(0), timeout=30)
    finally:
        gw.stop()


def test_a_changed_destination_replaces_the_pooled_connections(dovecot, certs, reactor, tmp_path):
    name = "warm-changed"
    gw = start_gateway({
        "destinations": [dest(name, "imap4s", dovecot.imaps_port, certs, **{"mailgw.pool.size": "1"})],
    }, tmp_path)
    try:
        wait_for(lambda: pool_status(gw, name)["ready"] == 1, what="a warm connection")
        old = in_reactor(lambda: gw.gateway.pools[Route(name)].ready[0])
        new = parse_destination(dest(name, "imap4s", dovecot.imaps_port, certs, **{"mailgw.pool.size": "2"}))
        in_reactor(lambda: gw.gateway.source.destinations.__setitem__(name, new))
        in_reactor(lambda: gw.gateway.update_pools([Route(name)]))
        wait_for(lambda: pool_status(gw, name)["ready"] == 2, what="two connections for the new destination")
        assert old.machine.phase is Phase.CLOSED
        assert old not in in_reactor(lambda: list(gw.gateway.pools[Route(name)].ready))
    finally:
        gw.stop()


def test_sighup_with_a_changed_destination_replaces_the_pooled_connections(dovecot, certs, tmp_path):
    """A real twistd: SIGHUP re-reads gateway.yaml; the pool follows the new destination."""

    def status():
        return json.loads(http(gw.http + "/status")[1])

    def connects() -> float:
        return sum(
            s.value for f in text_string_to_metric_families(gw.metrics()) for s in f.samples
            if s.name == "mailgw_upstream_seconds_count" and s.labels == {"destination": "warm", "phase": "connect"}
        )

    port = free_port()
    config = {
        "destinations": [dest("warm", "imap4s", dovecot.imaps_port, certs, **{"mailgw.pool.size": "1"})],
        "listeners": [{"destination": "warm", "listen": f"tcp:{port}:interface=127.0.0.1"}],
    }
    with GatewayProcess(tmp_path, config) as gw:
        wait_for(lambda: status()["pools"] and status()["pools"][0]["ready"] == 1, what="a warm connection")
        assert connects() == 1
        config["destinations"] = [dest("warm", "imap4s", dovecot.imaps_port, certs, **{"mailgw.pool.size": "2", "mailgw.pool.maxIdle": "120"})]
        write_config(tmp_path / "gateway.yaml", {**config, "http": gw.config["http"]})
        gw.signal(signal.SIGHUP)
        wait_for(lambda: status()["pools"][0]["size"] == 2 and status()["pools"][0]["ready"] == 2, what="the reloaded pool")
        assert connects() == 3  # the old connection was replaced, not kept
        client = imap_without_login(("127.0.0.1", port))
        assert client.select("INBOX")[0] == "OK"
        assert client.logout()[0] == "BYE"
