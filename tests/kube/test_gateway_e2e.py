"""Kubernetes mode end to end: a Destination CR on the fake API server, a `secrets`
destination pointing at real Dovecot, and a client reading the mailbox through the
listener the gateway opened on the allocated port."""

from __future__ import annotations

import socket

import pytest

from kubetest import publish, wait_for
from support.clients import http, imap_conversation, read_line, read_tagged
from support.destinations import mail


@pytest.fixture
def gateway(kube_gateway, in_reactor, http_port):
    service = kube_gateway(http_port)
    in_reactor(service.startService)
    return service


def imap_destination(name, dovecot, certs):
    return mail(name, "imap4s", dovecot.imaps_port, ca=certs.ca_pem)


def listener_port(gateway, cr_name):
    manager = gateway.getServiceNamed("kubernetes").listeners
    return wait_for(
        lambda: next((p.getHost().port for r, p in dict(manager.ports).items() if r.cr_name == cr_name), None),
        what=f"a listener for {cr_name}",
    )


def test_ready_once_the_controller_has_synced(gateway, http_port):
    wait_for(lambda: http(f"http://127.0.0.1:{http_port}/readyz") == (200, b"ready\n"), what="/readyz")
    assert gateway.getServiceNamed("kubernetes").ready


def test_cr_with_secrets_destination_serves_the_mailbox(fake, gateway, dovecot, certs):
    publish(fake, "mymail", imap_destination("office-imap", dovecot, certs))
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
    publish(fake, "first", imap_destination("first-imap", dovecot, certs))
    port = listener_port(gateway, "first")
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        assert read_line(sock).startswith(b"* OK")
        sock.sendall(b"a1 SELECT INBOX\r\n")
        assert b"\r\na1 OK" in read_tagged(sock, b"a1")
        publish(fake, "second", imap_destination("second-imap", dovecot, certs))
        listener_port(gateway, "second")
        fake.delete("destinations", "apps", "second")
        wait_for(lambda: all(r.cr_name != "second" for r in gateway.getServiceNamed("kubernetes").listeners.ports), what="second to close")
        sock.sendall(b"a2 FETCH 1 BODY[TEXT]\r\n")
        data = read_tagged(sock, b"a2")
    assert b"\r\na2 OK" in data and b"Hello from the seeded INBOX." in data


def test_listeners_accept_ipv6_and_ipv4(fake, gateway, dovecot, certs):
    publish(fake, "dualstack", imap_destination("dual-imap", dovecot, certs))
    port = listener_port(gateway, "dualstack")
    for family, host in ((socket.AF_INET6, "::1"), (socket.AF_INET, "127.0.0.1")):
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(30)
            sock.connect((host, port))
            assert sock.makefile("rb").readline().startswith(b"* OK [CAPABILITY"), host


def test_the_cluster_wide_gateway_has_no_send_api(gateway, http_port):
    wait_for(lambda: gateway.getServiceNamed("kubernetes").ready, what="synced")
    assert http(f"http://127.0.0.1:{http_port}/v1/send/x", b"hi", timeout=5)[0] == 404
