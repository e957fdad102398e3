"""Two real gateway processes (``twistd -n mailgw --kubernetes``) against the fake API
server: both serve, one writes; SIGKILL of the leader; a Lease call that hangs; SIGTERM
(the drain) in Kubernetes mode."""

from __future__ import annotations

import signal
import socket
import time

import pytest

import realservers
from kubeprocs import GW_NS, LEASE_DURATION, RENEW_DEADLINE, Replica, lease_holder, recorded_port
from mailgw.kube import model
from kubetest import destination_cr, pod, secret, wait_condition, wait_for



def closed_port() -> int:
    return realservers.free_port()


def refusing_destination(name: str) -> dict:
    """An SMTP destination nobody listens for: the gateway answers with its own 421."""
    return {"Name": name, "Type": "MAIL", "ProxyType": "Internet", "Authentication": "NoAuthentication",
            "mail.transport.protocol": "smtp", "mail.smtp.host": "127.0.0.1", "mail.smtp.port": str(closed_port()),
            "mail.smtp.starttls.enable": "false"}


def greeting(host: str, port: int) -> bytes:
    with socket.create_connection((host, port), timeout=10) as sock:
        return sock.makefile("rb").readline()


@pytest.fixture
def replicas(fake, tmp_path):
    start = realservers.free_port()
    port_range = (start, start + 50)
    fake.create("pods", GW_NS, pod("gw-a", "10.0.0.1"))
    fake.create("pods", GW_NS, pod("gw-b", "10.0.0.2"))
    made = []

    def make(identity, interface, **kw):
        replica = Replica(tmp_path, fake, identity, interface, port_range, **kw)
        made.append(replica)
        return replica

    yield make
    for replica in made:
        replica.close()


def two_replicas(fake, replicas):
    """gw-a and gw-b, both ready, and a CR ``first`` served: ``(a, b, leader, follower)``."""
    a, b = replicas("gw-a", "127.0.0.2"), replicas("gw-b", "127.0.0.3")
    a.wait_ready()
    b.wait_ready()
    holder = wait_for(lambda: lease_holder(fake), what="a leader")
    leader, follower = (a, b) if holder == "gw-a" else (b, a)
    fake.create("secrets", "apps", secret("first", refusing_destination("first")))
    fake.create("destinations", "apps", destination_cr(name="first", ref="first"))
    wait_condition(fake, "True", model.REASON_OK, name="first", timeout=20)
    return a, b, leader, follower


def test_both_serve_one_writes_and_the_survivor_of_a_sigkill_takes_over(fake, replicas):
    a, b, leader, survivor = two_replicas(fake, replicas)
    port = recorded_port(fake, "apps", "first")
    for replica in (a, b):  # every replica serves the route (the gateway's own refusal)
        line = wait_for(lambda r=replica: _try_greeting(r.interface, port), what=f"{replica.identity} serving")
        assert line.startswith(b"421") and b"mailgw" in line, line
    assert not fake.writes_by(survivor.identity)

    leader.kill()
    killed = time.monotonic()
    wait_for(lambda: lease_holder(fake) == survivor.identity, timeout=LEASE_DURATION + 5, what="the takeover")
    fake.create("secrets", "apps", secret("second", refusing_destination("second")))
    fake.create("destinations", "apps", destination_cr(name="second", ref="second"))
    wait_condition(fake, "True", model.REASON_OK, name="second", timeout=LEASE_DURATION + 5)
    port = recorded_port(fake, "apps", "second")
    assert wait_for(lambda: _try_greeting(survivor.interface, port), what="the new route served").startswith(b"421")
    print(f"lease taken over and a new CR served {time.monotonic() - killed:.1f}s after SIGKILL")


def _try_greeting(host, port):
    try:
        return greeting(host, port)
    except OSError:
        return None


def test_a_leader_whose_lease_call_hangs_stops_writing_within_the_renew_deadline(fake, replicas):
    _, _, leader, other = two_replicas(fake, replicas)
    assert fake.writes_by(leader.identity)

    # every Lease call of the leader now hangs (far longer than any deadline)
    fake.fault(r"/leases", status=None, delay=60, times=None, agent=f"({leader.identity})")
    hung = time.monotonic()
    names = []
    while time.monotonic() < hung + RENEW_DEADLINE + LEASE_DURATION + 2:
        names.append(f"during-{len(names)}")
        fake.create("destinations", "apps", destination_cr(name=names[-1], ref="first"))
        time.sleep(0.25)
    for name in names:
        wait_condition(fake, "True", model.REASON_OK, name=name, timeout=LEASE_DURATION + 10)
    assert lease_holder(fake) == other.identity
    # (a write in flight when the deadline passes may land up to a second later: it was
    # sent under the old leadership, before the step-down; none may follow)
    late = fake.writes_by(leader.identity, since=hung + RENEW_DEADLINE + 1.0)
    assert late == [], late
    assert fake.writes_by(other.identity, since=hung)


def test_sigterm_drains_in_kubernetes_mode(fake, replicas, smtp_sink):
    drain = 4.0
    a = replicas("gw-a", "127.0.0.2", drain=drain)
    a.wait_ready()
    wait_for(lambda: lease_holder(fake) == "gw-a", what="gw-a leading")
    b = replicas("gw-b", "127.0.0.3")
    b.wait_ready()
    sink = {"Name": "sink", "Type": "MAIL", "ProxyType": "Internet", "Authentication": "NoAuthentication",
            "mail.transport.protocol": "smtp", "mail.smtp.host": smtp_sink.host,
            "mail.smtp.port": str(smtp_sink.port), "mail.smtp.starttls.enable": "false"}
    fake.create("secrets", "apps", secret("sink", sink))
    fake.create("destinations", "apps", destination_cr(name="mail", ref="sink"))
    wait_condition(fake, "True", model.REASON_OK, name="mail", timeout=20)
    port = recorded_port(fake, "apps", "mail")
    wait_for(lambda: _try_greeting(a.interface, port), what="gw-a serving")

    session = socket.create_connection((a.interface, port), timeout=30)
    reader = session.makefile("rb")
    assert reader.readline().startswith(b"220")
    session.sendall(b"EHLO app\r\n")
    while not reader.readline().startswith(b"250 "):
        pass

    # the API server marks the pod terminating, then the kubelet sends SIGTERM
    fake.update("pods", GW_NS, "gw-a", {"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"}})
    a.stop()
    stopped = time.monotonic()

    def refused():
        try:
            socket.create_connection((a.interface, port), timeout=1).close()
            return False
        except OSError:
            return True

    wait_for(refused, timeout=5, what="new connections refused")
    assert time.monotonic() - stopped < 2.0
    wait_for(lambda: lease_holder(fake) == "gw-b", timeout=3, what="the Lease handed over")

    def terminating():
        es = fake.get("endpointslices", "apps", "mail-mailgw") or {}
        return {e["targetRef"]["name"]: e["conditions"] for e in es.get("endpoints") or []}.get("gw-a")

    conditions = wait_for(lambda: (terminating() or {}).get("terminating") and terminating(), timeout=drain - 1,
                          what="gw-a terminating in the EndpointSlice")
    assert conditions["ready"] is False
    session.sendall(b"NOOP\r\n")  # the open session goes on
    assert reader.readline().startswith(b"250")
    goodbye = reader.readline()
    assert time.monotonic() - stopped > drain - 1.0  # not before the drain timeout
    assert goodbye.startswith(b"421"), goodbye
    assert reader.readline() == b""
    session.close()
    # twistd ends a SIGTERM shutdown by re-raising the signal
    assert a.process.wait(15) in (0, -signal.SIGTERM), a.output()
