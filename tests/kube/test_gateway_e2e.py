"""Kubernetes mode end to end: a Destination CR on the fake API server, a `secrets`
destination pointing at real Dovecot, and a client reading the mailbox through the
listener the gateway opened on the allocated port."""

from __future__ import annotations

import base64
import json
import socket
import urllib.request

import pytest
from kubernetes import client as k8s

import realservers
from kubetest import wait_for
from support.clients import imap_conversation, read_line, read_tagged
from mailgw.kube.client import KubeApi
from mailgw.kube.controller import KubeSettings
from mailgw.kube.main import make_kubernetes_service


def free_range(size=20):
    """A run of ports nothing listens on (the allocator picks from it)."""
    start = realservers.free_port()
    return (start, start + size - 1)


@pytest.fixture
def http_port():
    return realservers.free_port()


@pytest.fixture
def gateway(fake, reactor, in_reactor, tmp_path, http_port):
    (tmp_path / "gateway.yaml").write_text(json.dumps({"http": {"listen": f"tcp:{http_port}:interface=127.0.0.1"}}))
    api = KubeApi(k8s.ApiClient(fake.configuration()), timeout=2.0, connect_timeout=1.0)
    settings = KubeSettings(
        gateway_namespace="mailgw-system", identity="gw-0", port_range=free_range(),
        resync_interval=3600, cache_ttl=0, leader_election=False, retry_delay=0.05,
    )
    service = in_reactor(make_kubernetes_service, reactor, str(tmp_path / "gateway.yaml"), api=api, settings=settings)
    in_reactor(service.startService)
    yield service
    in_reactor(service.stopService)


def imap_destination(name, dovecot, certs):
    return {
        "Name": name, "Type": "MAIL", "ProxyType": "Internet", "Authentication": "BasicAuthentication",
        "mail.transport.protocol": "imap4s", "mail.imap4s.host": "localhost", "mail.imap4s.port": str(dovecot.imaps_port),
        "mail.user": "alice", "mail.password": "secret", "TrustStoreLocation": str(certs.ca_pem),
    }


def create(fake, cr_name, destination):
    fake.create("secrets", "apps", {
        "metadata": {"name": destination["Name"], "namespace": "apps"},
        "data": {"destination.json": base64.b64encode(json.dumps(destination).encode()).decode()},
    })
    fake.create("destinations", "apps", {
        "apiVersion": "destination.connectivity.api.sap/v1", "kind": "Destination",
        "metadata": {"name": cr_name}, "spec": {"destinationRef": {"name": destination["Name"]}},
    })


def listener_port(gateway, cr_name):
    manager = gateway.getServiceNamed("kubernetes").listeners
    return wait_for(
        lambda: next((p.getHost().port for r, p in dict(manager.ports).items() if r.cr_name == cr_name), None),
        what=f"a listener for {cr_name}",
    )


def test_ready_once_the_controller_has_synced(gateway, http_port):
    def ready():
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=5).status == 200
        except OSError:
            return False

    wait_for(ready, what="/readyz")
    assert gateway.getServiceNamed("kubernetes").ready


def test_cr_with_secrets_destination_serves_the_mailbox(fake, gateway, dovecot, certs):
    create(fake, "mymail", imap_destination("office-imap", dovecot, certs))
    manager = gateway.getServiceNamed("kubernetes").listeners
    port = listener_port(gateway, "mymail")

    greeting, data = imap_conversation(("127.0.0.1", port), b"a1 SELECT INBOX\r\na2 FETCH 1 BODY[TEXT]\r\na3 LOGOUT\r\n")
    assert greeting.startswith(b"* OK [CAPABILITY")
    assert b"a2 OK" in data and b"Hello from the seeded INBOX." in data

    service = wait_for(lambda: fake.get("services", "apps", "mymail"), what="the Service")
    assert service["spec"]["ports"][0]["port"] == 993

    fake.delete("destinations", "apps", "mymail")
    wait_for(lambda: not manager.ports, what="the listener to close")
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=5)


def test_other_crs_coming_and_going_leave_a_session_alone(fake, gateway, dovecot, certs):
    create(fake, "first", imap_destination("first-imap", dovecot, certs))
    port = listener_port(gateway, "first")
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        assert read_line(sock).startswith(b"* OK")
        sock.sendall(b"a1 SELECT INBOX\r\n")
        assert b"\r\na1 OK" in read_tagged(sock, b"a1")
        create(fake, "second", imap_destination("second-imap", dovecot, certs))
        listener_port(gateway, "second")
        fake.delete("destinations", "apps", "second")
        wait_for(lambda: all(r.cr_name != "second" for r in gateway.getServiceNamed("kubernetes").listeners.ports), what="second to close")
        sock.sendall(b"a2 FETCH 1 BODY[TEXT]\r\n")
        data = read_tagged(sock, b"a2")
    assert b"\r\na2 OK" in data and b"Hello from the seeded INBOX." in data


def test_listeners_accept_ipv6_and_ipv4(fake, gateway, dovecot, certs):
    create(fake, "dualstack", imap_destination("dual-imap", dovecot, certs))
    port = listener_port(gateway, "dualstack")
    for family, host in ((socket.AF_INET6, "::1"), (socket.AF_INET, "127.0.0.1")):
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(30)
            sock.connect((host, port))
            assert sock.makefile("rb").readline().startswith(b"* OK [CAPABILITY"), host


def test_the_cluster_wide_gateway_has_no_send_api(gateway, http_port):
    import urllib.error

    wait_for(lambda: gateway.getServiceNamed("kubernetes").ready, what="synced")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{http_port}/v1/send/x", data=b"hi", method="POST"), timeout=5)
    assert info.value.code == 404
