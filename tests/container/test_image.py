"""The container image, built from this tree and run with podman in each of its modes:
the demo, the sidecar (standalone mode with a mounted gateway.yaml, against the real
Dovecot on the host), the cluster-wide gateway (``--kubernetes`` against the tests' fake
API server, with a mounted kubeconfig), and SIGTERM's drain.

Every container runs as the production manifests run it: read-only root file system,
the image's non-root user, no capabilities, no new privileges, runc, explicit resource
limits (podmantest.py).  Every log is checked for the plugin cache warning: twistd must
find the cache written at build time fresh.

Networking: the containers share the host's network namespace (``--network host``).
That is the sidecar's shape: in a pod the application and the gateway share one network
namespace and the gateway listens on its loopback; here the test process (and, in the
sidecar test, a second container joined with ``--network container:``) plays the
application.  It also lets the gateway reach the test servers, which listen on the
host's loopback only.
"""

from __future__ import annotations

import base64
import imaplib
import json
import os
import shutil
import smtplib
import socket
import urllib.error
import urllib.request
import uuid

import pytest
import yaml

import realservers
from fakeapi import FakeKubeAPI
from podmantest import PLUGIN_CACHE_WARNING, ROOT, UID, Container
from support.clients import imap_conversation

LOCAL = "127.0.0.1"
#: Fixed ports of ``twistd mailgw --demo`` (SMTP, IMAP, POP3, http).
DEMO_PORTS = (2525, 1143, 1110, 9494)
#: Seconds ``podman stop`` waits after SIGTERM before it kills the container.
GRACE = 60

pytestmark = pytest.mark.timeout(1200)  # the first test builds the image (a few minutes at most)


def accepts(port: int) -> bool:
    try:
        socket.create_connection((LOCAL, port), timeout=2).close()
        return True
    except OSError:
        return False


def http_status(url: str) -> int | None:
    try:
        return urllib.request.urlopen(url, timeout=5).status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def banner(port: int, prefix: bytes):
    """The greeting line at port when it starts with prefix, else None (for polling)."""
    try:
        with socket.create_connection((LOCAL, port), timeout=5) as sock:
            line = sock.makefile("rb").readline()
            return line if line.startswith(prefix) else None
    except OSError:
        return None


def check_the_run(container: Container) -> None:
    """The settings every run must have: read-only root file system, runc, the image's
    non-root user."""
    info = container.inspect()
    assert info["HostConfig"]["ReadonlyRootfs"] is True
    assert os.path.basename(info["OCIRuntime"]) == "runc"
    # the gateway itself (the container's first process), seen from the host
    with open(f"/proc/{info['State']['Pid']}/status") as f:
        uids = next(line.split()[1:] for line in f if line.startswith("Uid:"))
    assert uids == [str(UID)] * 4, uids  # real, effective, saved, file system


def check_the_log(log: str) -> None:
    """twistd found the plugin cache written at build time fresh (else it tries to write
    it, and on a read-only root file system logs the warning), and nothing crashed."""
    assert PLUGIN_CACHE_WARNING not in log, log
    assert "Traceback" not in log, log


def stop_and_check_exit(container: Container) -> str:
    """SIGTERM; the gateway must exit 0 by itself before the grace period ends (a kill
    after the grace period would exit 137).  Returns the container's log."""
    stopper = container.stop(GRACE)
    out, err = stopper.communicate(timeout=GRACE + 60)
    assert stopper.returncode == 0, err
    log = container.logs()
    assert container.exit_code() == 0, log
    check_the_log(log)
    return log


def write_json(path, doc) -> None:
    path.write_text(json.dumps(doc, indent=2))
    path.chmod(0o644)


def copy_readable(source, target) -> None:
    shutil.copyfile(source, target)
    target.chmod(0o644)


# ---------------------------------------------------------------------------------------
# The demo


def test_demo_sends_and_reads_mail_from_the_host(run_container):
    busy = [port for port in DEMO_PORTS if accepts(port)]
    assert not busy, f"the demo's fixed ports {busy} are taken on this machine"
    demo = run_container(["twistd", "-n", "--pidfile=", "mailgw", "--demo"])
    demo.wait_until(lambda: banner(2525, b"220"), "the demo's SMTP listener")
    check_the_run(demo)

    mark = uuid.uuid4().hex
    with smtplib.SMTP(LOCAL, 2525, timeout=30) as client:  # no login: the gateway has it
        client.sendmail("app@example.org", ["you@example.org"], f"Subject: {mark}\r\n\r\nfrom the host\r\n")
    imap = imaplib.IMAP4(LOCAL, 1143, timeout=30)
    assert imap.login("any", "thing")[0] == "OK"  # answered by the gateway
    count = int(imap.select("INBOX")[1][0])
    typ, data = imap.fetch(str(count), "(BODY[])")
    assert typ == "OK" and f"Subject: {mark}".encode() in data[0][1]
    imap.logout()
    assert http_status(f"http://{LOCAL}:9494/healthz") == 200

    log = stop_and_check_exit(demo)
    assert "mailgw demo is running" in log


# ---------------------------------------------------------------------------------------
# The sidecar: standalone mode as k8s/sidecar-example.yaml runs it


def sidecar_example():
    with open(ROOT / "k8s" / "sidecar-example.yaml") as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    (secret,) = [d for d in docs if d["kind"] == "Secret"]
    (config_map,) = [d for d in docs if d["kind"] == "ConfigMap"]
    (deploy,) = [d for d in docs if d["kind"] == "Deployment"]
    (gateway,) = deploy["spec"]["template"]["spec"]["initContainers"]
    return secret, config_map["data"]["gateway.yaml"], gateway


def start_sidecar(run_container, mounted, dovecot, certs):
    """The example's gateway container: its gateway.yaml and command as they are, its
    mounts at the same paths; the example's destinations (same names) point at Dovecot.
    Returns the container and the example's listeners and http port by name."""
    secret, gateway_yaml, spec = sidecar_example()
    config = yaml.safe_load(gateway_yaml)
    ports = {listener["destination"]: int(listener["listen"].split(":")[1]) for listener in config["listeners"]}
    ports["http"] = int(config["http"]["listen"].split(":")[1])
    busy = [port for port in ports.values() if accepts(port)]
    assert not busy, f"the sidecar example's ports {busy} are taken on this machine"

    (mounted / "gateway.yaml").write_text(gateway_yaml)
    (mounted / "gateway.yaml").chmod(0o644)
    destinations = mounted / "destinations"
    destinations.mkdir(mode=0o755)
    copy_readable(certs.ca_pem, mounted / "ca.pem")
    common = {"Type": "MAIL", "ProxyType": "Internet", "Authentication": "BasicAuthentication",
              "mail.user": "alice", "mail.password": "secret", "TrustStoreLocation": "/etc/mailgw/trust/ca.pem"}
    ours = {
        "office-smtp": {"mail.transport.protocol": "smtp", "mail.smtp.host": "localhost",
                        "mail.smtp.port": str(dovecot.submission_port), "mail.smtp.starttls.required": "true"},
        "office-imap": {"mail.transport.protocol": "imap4s", "mail.imap4s.host": "localhost",
                        "mail.imap4s.port": str(dovecot.imaps_port)},
    }
    assert set(secret["stringData"]) == {f"{name}.json" for name in ours}
    for name, keys in ours.items():
        write_json(destinations / f"{name}.json", dict(common, Name=name, **keys))

    mounts = {m["mountPath"]: m["name"] for m in spec["volumeMounts"]}
    assert mounts == {"/etc/mailgw/gateway.yaml": "mailgw-config", "/etc/mailgw/destinations": "mailgw-destinations",
                      "/tmp": "mailgw-tmp"}  # /tmp: podman's --read-only gives one
    gateway = run_container(spec["args"], volumes={
        str(mounted / "gateway.yaml"): "/etc/mailgw/gateway.yaml",
        str(destinations): "/etc/mailgw/destinations",
        str(mounted / "ca.pem"): "/etc/mailgw/trust/ca.pem",
    })
    gateway.wait_until(lambda: banner(ports["office-smtp"], b"220"), "the SMTP listener's greeting")
    return gateway, spec, ports


def probe(gateway: Container, spec, name: str) -> int:
    """Run the example's exec probe ``name`` in the container; its exit code."""
    return gateway.exec_status(*spec[name]["exec"]["command"])


def test_sidecar_serves_the_application_in_its_network_namespace(run_container, mounted, dovecot, smtp_sink, certs):
    gateway, spec, ports = start_sidecar(run_container, mounted, dovecot, certs)
    check_the_run(gateway)
    assert probe(gateway, spec, "startupProbe") == 0
    assert probe(gateway, spec, "livenessProbe") == 0

    # The application on the host (the shared namespace): reads the mailbox and sends
    # mail without credentials.
    imap = imaplib.IMAP4(LOCAL, ports["office-imap"], timeout=30)
    imap.state = "AUTH"  # imaplib insists on a login; the gateway needs none
    assert imap.select("INBOX")[0] == "OK"
    typ, data = imap.fetch("1", "(BODY[])")
    assert typ == "OK" and realservers.SEED_MESSAGE.split(b"\r\n\r\n")[1] in data[0][1]
    imap.logout()
    mark = uuid.uuid4().hex
    with smtplib.SMTP(LOCAL, ports["office-smtp"], timeout=30) as client:
        client.sendmail("alice@example.org", ["ops@example.org"], f"Subject: {mark}\r\n\r\nfrom the host\r\n")
    smtp_sink.wait_for(lambda m: mark.encode() in m.data, timeout=30)

    # The application as a container of its own, joined to the gateway's network
    # namespace as the containers of one pod are: 127.0.0.1 is the gateway.
    app_mark = uuid.uuid4().hex
    app = run_container(
        ["python3", "-c", APP, str(ports["office-smtp"]), str(ports["office-imap"]), app_mark],
        network=f"container:{gateway.name}",
    )
    assert app.wait() == 0, app.logs()
    assert "INBOX OK" in app.logs()
    smtp_sink.wait_for(lambda m: app_mark.encode() in m.data, timeout=30)
    stop_and_check_exit(gateway)


#: The application of the sidecar test: sends one message, selects the INBOX.
APP = """
import imaplib, smtplib, sys
smtp_port, imap_port, mark = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
with smtplib.SMTP("127.0.0.1", smtp_port, timeout=30) as s:
    s.sendmail("app@example.org", ["ops@example.org"], f"Subject: {mark}\\r\\n\\r\\nfrom the app container\\r\\n")
imap = imaplib.IMAP4("127.0.0.1", imap_port, timeout=30)
imap.login("any", "thing")
print("INBOX", imap.select("INBOX")[0])
imap.logout()
"""


def test_sigterm_drains_the_open_session_and_exits_0(run_container, mounted, dovecot, smtp_sink, certs):
    """``podman stop``: the gateway stops accepting and reports not ready, the session
    open at SIGTERM finishes its mail, and the container exits 0 within the grace period."""
    gateway, spec, ports = start_sidecar(run_container, mounted, dovecot, certs)
    client = smtplib.SMTP(LOCAL, ports["office-smtp"], timeout=30)
    client.ehlo()
    stopper = gateway.stop(GRACE)
    try:
        base = f"http://{LOCAL}:{ports['http']}"
        gateway.wait_until(lambda: http_status(base + "/readyz") == 503, "/readyz to report draining")
        gateway.wait_until(lambda: not accepts(ports["office-smtp"]), "the listener to stop accepting")
        assert probe(gateway, spec, "startupProbe") != 0  # /readyz: 503
        assert gateway.running()  # still draining: the open session holds it
        mark = uuid.uuid4().hex
        client.sendmail("alice@example.org", ["ops@example.org"], f"Subject: {mark}\r\n\r\ndrained\r\n")
        client.quit()
        smtp_sink.wait_for(lambda m: mark.encode() in m.data, timeout=30)
        out, err = stopper.communicate(timeout=GRACE + 60)
    finally:
        if stopper.poll() is None:
            stopper.kill()
    assert stopper.returncode == 0, err
    log = gateway.logs()
    assert gateway.exit_code() == 0, log  # 137 had podman killed it after the grace period
    check_the_log(log)


# ---------------------------------------------------------------------------------------
# The cluster-wide gateway: --kubernetes against the fake API server


def deployment_container() -> dict:
    with open(ROOT / "k8s" / "deployment.yaml") as f:
        (deploy,) = [d for d in yaml.safe_load_all(f) if d and d["kind"] == "Deployment"]
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    return container


def kubeconfig(url: str) -> dict:
    return {
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "fake", "cluster": {"server": url}}],
        "users": [{"name": "mailgw", "user": {"token": "not-checked-by-the-fake"}}],
        "contexts": [{"name": "test", "context": {"cluster": "fake", "user": "mailgw"}}],
    }


def test_kubernetes_mode_serves_a_destination_end_to_end(run_container, mounted, dovecot, certs):
    copy_readable(certs.ca_pem, mounted / "ca.pem")
    low = realservers.free_port()
    http_port = realservers.free_port()
    with FakeKubeAPI() as fake:
        write_json(mounted / "kubeconfig", kubeconfig(fake.url))
        write_json(mounted / "gateway.yaml", {
            "http": {"listen": f"tcp:{http_port}:interface=127.0.0.1"},
            "kubernetes": {"portRange": f"{low}-{low + 19}", "resyncInterval": 3600},
        })
        # This container as the gateway pod the EndpointSlices point at.
        fake.create("pods", "mailgw-system", {
            "metadata": {"name": "gw-0", "namespace": "mailgw-system", "labels": {"app.kubernetes.io/name": "mailgw"}},
            "status": {"podIP": LOCAL, "conditions": [{"type": "Ready", "status": "True"}]},
        })
        destination = {
            "Name": "office-imap", "Type": "MAIL", "ProxyType": "Internet", "Authentication": "BasicAuthentication",
            "mail.transport.protocol": "imap4s", "mail.imap4s.host": "localhost",
            "mail.imap4s.port": str(dovecot.imaps_port), "mail.user": "alice", "mail.password": "secret",
            "TrustStoreLocation": "/etc/mailgw/ca.pem",
        }
        fake.create("secrets", "apps", {
            "metadata": {"name": "office-imap", "namespace": "apps"},
            "data": {"destination.json": base64.b64encode(json.dumps(destination).encode()).decode()},
        })
        fake.create("destinations", "apps", {
            "apiVersion": "destination.connectivity.api.sap/v1", "kind": "Destination",
            "metadata": {"name": "mymail"}, "spec": {"destinationRef": {"name": "office-imap"}},
        })
        # k8s/deployment.yaml's command; the downward API's variables; a kubeconfig
        # instead of the in-cluster service account.
        spec = deployment_container()
        assert "/etc/mailgw/gateway.yaml" in spec["args"]
        gateway = run_container(
            spec["args"],
            volumes={str(mounted): "/etc/mailgw"},
            env={"KUBECONFIG": "/etc/mailgw/kubeconfig", "POD_NAME": "gw-0", "POD_NAMESPACE": "mailgw-system"},
        )
        gateway.wait_until(lambda: http_status(f"http://{LOCAL}:{http_port}/readyz") == 200, "/readyz")
        check_the_run(gateway)

        def allocated():
            service = fake.get("services", "apps", "mymail") or {}
            return (service.get("metadata", {}).get("annotations") or {}).get("mailgw.io/gateway-port")

        port = int(gateway.wait_until(allocated, "the Service with its gateway port"))
        assert low <= port <= low + 19
        assert fake.get("services", "apps", "mymail")["spec"]["ports"][0]["port"] == 993

        def available():
            status = (fake.get("destinations", "apps", "mymail") or {}).get("status") or {}
            return any(c["type"] == "Available" and c["status"] == "True" for c in status.get("conditions") or [])

        gateway.wait_until(available, "the Destination to be Available")

        def endpoints():
            slice_ = fake.get("endpointslices", "apps", "mymail-mailgw") or {}
            return [(address, p["port"]) for e in slice_.get("endpoints") or [] for address in e["addresses"]
                    for p in slice_.get("ports") or []]

        assert gateway.wait_until(endpoints, "the EndpointSlice") == [(LOCAL, port)]

        # A client of the Service: reads the mailbox through the allocated port.
        gateway.wait_until(lambda: banner(port, b"* OK"), "the destination's listener")
        greeting, data = imap_conversation((LOCAL, port), b"a1 SELECT INBOX\r\na2 FETCH 1 BODY[TEXT]\r\na3 LOGOUT\r\n")
        assert greeting.startswith(b"* OK [CAPABILITY")
        assert b"a2 OK" in data and b"Hello from the seeded INBOX." in data

        # What the kubelet does to a deleted pod: the preStop hook, then SIGTERM.
        assert gateway.exec_status(*spec["lifecycle"]["preStop"]["exec"]["command"]) == 0
        stop_and_check_exit(gateway)
