"""k8s/ manifests and the Containerfile: they parse, the CRD's schema accepts the
reference's Destination examples and rejects bad ones (locally and through the real
client against the fake API server), RBAC covers what the code calls, the Deployment
has what the gateway needs."""

from __future__ import annotations

import glob
import json
import os

import pytest
import yaml
from kubernetes import client as k8s

from fakeapi import CRD_PATH, ROOT, load_crd_schema, validate
from mailgw.kube.config import parse_kube_section
from mailgw.kube.controller import KubeSettings
from mailgw.sources.base import destination_from_json

K8S = os.path.join(ROOT, "k8s")
GROUP = "destination.connectivity.api.sap"

# The reference's Destination examples, transcribed: placeholders filled in, the
# "// can be omitted ..." remarks dropped, and in the shared-mode examples destinationRef
# put under spec (the reference shows it under metadata, which no schema requiring
# spec.destinationRef can accept).
REFERENCE_EXAMPLES = [
    """
apiVersion: destination.connectivity.api.sap/v1
kind: Destination
metadata:
  name: my-smtps
spec:
  destinationRef:
    name: "example-dest-smtps"
  destinationServiceInstanceName: dest-svc
""",
    """
apiVersion: destination.connectivity.api.sap/v1
kind: Destination
metadata:
  name: my-smtps-shared
  annotations:
    transparent-proxy.connectivity.api.sap/tenant-subdomains: '["tenant-subdomain", "another-tenant-subdomain"]'
spec:
  destinationRef:
    name: "example-dest-smtps"
  destinationServiceInstanceName: dest-svc
""",
    """
apiVersion: destination.connectivity.api.sap/v1
kind: Destination
metadata:
  name: my-imaps
spec:
  destinationRef:
    name: "example-dest-imaps"
""",
    """
apiVersion: destination.connectivity.api.sap/v1
kind: Destination
metadata:
  name: my-pop3
spec:
  destinationRef:
    name: "example-dest-pop3"
  destinationServiceInstanceName: dest-svc
""",
    # SPEC section 5's full example
    """
apiVersion: destination.connectivity.api.sap/v1
kind: Destination
metadata:
  name: mymail
  annotations:
    transparent-proxy.connectivity.api.sap/tenant-subdomains: '["t1", "t2"]'
spec:
  destinationRef: {name: example-dest-smtps}
  destinationServiceInstanceName: dest-svc
  service: {port: 2465}
  accessControl: {scope: namespaced}
""",
]

BAD = [
    ({"spec": {}}, "destinationRef is required"),
    ({"spec": {"destinationRef": {}}}, "name is required"),
    ({"spec": {"destinationRef": {"name": ""}}}, "shorter"),
    ({"spec": {"destinationRef": {"name": "x"}, "service": {"port": 0}}}, ">= 1"),
    ({"spec": {"destinationRef": {"name": "x"}, "service": {"port": 70000}}}, "<= 65535"),
    ({"spec": {"destinationRef": {"name": "x"}, "service": {"port": "465"}}}, "integer"),
    ({"spec": {"destinationRef": {"name": "x"}, "accessControl": {"scope": "world"}}}, "one of"),
    ({}, "spec is required"),
]


def docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


KUSTOMIZATION = "kustomization.yaml"
EXAMPLES = {"destinations-example.yaml", "sidecar-example.yaml"}
#: applied on its own, when kubernetes.watchSecrets is on
SECRET_WATCH = "rbac-secret-watch.yaml"


def manifest_files():
    """The Kubernetes object files of k8s/ (the kustomization is not one)."""
    return [p for p in sorted(glob.glob(os.path.join(K8S, "*.yaml"))) if os.path.basename(p) != KUSTOMIZATION]


def all_docs():
    return [(os.path.basename(p), d) for p in manifest_files() for d in docs(p)]


def find(kind, name=None):
    return [d for _, d in all_docs() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def test_every_manifest_parses_and_is_named():
    files = manifest_files()
    assert {"crd.yaml", "rbac.yaml", "deployment.yaml", "sidecar-example.yaml"} <= {os.path.basename(f) for f in files}
    for filename, doc in all_docs():
        assert doc.get("apiVersion") and doc.get("kind"), filename
        assert doc["metadata"].get("name"), filename


def test_crd_names_columns_and_status():
    (crd,) = find("CustomResourceDefinition")
    spec = crd["spec"]
    assert crd["metadata"]["name"] == f"destinations.{GROUP}"
    assert spec["group"] == GROUP and spec["scope"] == "Namespaced"
    assert spec["names"]["kind"] == "Destination" and spec["names"]["plural"] == "destinations"
    assert spec["names"]["shortNames"] == ["dst"]
    (version,) = spec["versions"]
    assert version["name"] == "v1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Destination"] == ".spec.destinationRef.name"
    assert columns["Service"] == ".status.services" and columns["Tenants"] == ".status.tenantSubdomains"
    conditions = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map" and conditions["x-kubernetes-list-map-keys"] == ["type"]
    assert "observedGeneration" in conditions["items"]["properties"]
    (rule,) = version["schema"]["openAPIV3Schema"]["x-kubernetes-validations"]
    assert "size(self.metadata.name) <= 63" in rule["rule"] and rule["message"]
    assert "Available" in columns and "Reason" in columns and "Age" in columns
    schema = version["schema"]["openAPIV3Schema"]
    assert schema["properties"]["spec"]["required"] == ["destinationRef"]


@pytest.mark.parametrize("text", REFERENCE_EXAMPLES)
def test_schema_accepts_the_reference_examples(text):
    obj = yaml.safe_load(text)
    given = (yaml.safe_load(text)["spec"].get("accessControl") or {}).get("scope")
    assert validate(load_crd_schema(), obj) == []
    # defaults as the API server applies them: scope namespaced
    assert obj["spec"]["accessControl"]["scope"] == (given or "namespaced")


@pytest.mark.parametrize("obj,fragment", BAD)
def test_schema_rejects(obj, fragment):
    obj = dict(obj, apiVersion=f"{GROUP}/v1", kind="Destination", metadata={"name": "x"})
    errors = validate(load_crd_schema(), obj)
    assert errors and any(fragment in e for e in errors), errors


def test_status_written_by_the_controller_fits_the_schema():
    from test_kube_reconcile import run, cr_obj

    _, plan = run(cr_obj(tenants='["t1", "t2"]'))
    obj = dict(cr_obj(), status=json.loads(json.dumps(plan.status)))
    assert validate(load_crd_schema(), obj) == []


def test_real_client_create_is_validated_by_the_fake_api(fake):
    custom = k8s.CustomObjectsApi(k8s.ApiClient(fake.configuration()))
    for text in REFERENCE_EXAMPLES:
        obj = yaml.safe_load(text)
        created = custom.create_namespaced_custom_object(GROUP, "v1", "apps", "destinations", obj)
        assert created["spec"]["accessControl"]["scope"] == "namespaced"
    with pytest.raises(k8s.ApiException) as info:
        custom.create_namespaced_custom_object(
            GROUP, "v1", "apps", "destinations",
            {"apiVersion": f"{GROUP}/v1", "kind": "Destination", "metadata": {"name": "noref"}, "spec": {}},
        )
    assert info.value.status == 422
    assert "destinationRef is required" in info.value.body


def test_example_destinations_are_valid():
    examples = docs(os.path.join(K8S, "destinations-example.yaml"))
    schema = load_crd_schema()
    crs = [d for d in examples if d["kind"] == "Destination"]
    assert crs
    for cr in crs:
        assert validate(schema, cr) == [], cr["metadata"]["name"]
    (secret,) = [d for d in examples if d["kind"] == "Secret"]
    dest = destination_from_json(json.loads(secret["stringData"]["destination.json"]), "example")
    assert dest.protocol == "smtps"


def _rules(kind):
    (role,) = find(kind, "mailgw")
    return role["rules"]


def _allowed(rules, group, resource, verb, name=None):
    for rule in rules:
        if group in rule["apiGroups"] and resource in rule["resources"] and verb in rule["verbs"]:
            if "resourceNames" not in rule or name in rule["resourceNames"]:
                return True
    return False


# what the code calls: (group, resource, verb, cluster-wide?)
NEEDED = [
    (GROUP, "destinations", "list", True), (GROUP, "destinations", "watch", True),
    (GROUP, "destinations/status", "patch", True), (GROUP, "destinations/finalizers", "update", True),
    ("discovery.k8s.io", "endpointslices", "watch", True),
    ("networking.k8s.io", "networkpolicies", "watch", False),
    ("", "services", "get", True), ("", "services", "list", True), ("", "services", "watch", True),
    ("", "services", "create", True), ("", "services", "patch", True), ("", "services", "delete", True),
    ("discovery.k8s.io", "endpointslices", "list", True), ("discovery.k8s.io", "endpointslices", "create", True),
    ("discovery.k8s.io", "endpointslices", "patch", True), ("discovery.k8s.io", "endpointslices", "delete", True),
    ("discovery.k8s.io", "endpointslices", "get", True),
    ("", "secrets", "get", True), ("", "events", "create", True),
    ("", "pods", "list", False), ("", "pods", "watch", False), ("", "pods", "patch", False),
    ("networking.k8s.io", "networkpolicies", "list", False), ("networking.k8s.io", "networkpolicies", "get", False),
    ("networking.k8s.io", "networkpolicies", "create", False),
    ("networking.k8s.io", "networkpolicies", "patch", False),
    ("networking.k8s.io", "networkpolicies", "delete", False),
    ("coordination.k8s.io", "leases", "create", False),
]


def test_rbac_covers_the_code_and_nothing_wild():
    cluster, local = _rules("ClusterRole"), _rules("Role")
    for group, resource, verb, cluster_wide in NEEDED:
        rules = cluster if cluster_wide else local
        assert _allowed(rules, group, resource, verb), (group, resource, verb)
    # the Lease the configuration uses, by name, and no other
    (config,) = find("ConfigMap", "mailgw")
    lease = yaml.safe_load(config["data"]["gateway.yaml"])["kubernetes"].get("leaseName", KubeSettings().lease_name)
    for verb in ("get", "update"):
        assert _allowed(local, "coordination.k8s.io", "leases", verb, lease)
        assert not _allowed(local, "coordination.k8s.io", "leases", verb, "another-lease")
    for rule in cluster + local:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
    # nothing the code does not do
    assert not _allowed(cluster, GROUP, "destinations", "update") and not _allowed(cluster, "", "secrets", "create")
    # listing or watching Secrets returns their data, whatever the gateway asks for: opt-in only
    assert not _allowed(cluster, "", "secrets", "list") and not _allowed(cluster, "", "secrets", "watch")
    # the binding Secrets of the destination service instances, by name (watchNamespaces
    # mode binds the ClusterRole only where the Destinations are)
    (config,) = find("ConfigMap", "mailgw")
    instances = (yaml.safe_load(config["data"]["gateway.yaml"])["kubernetes"].get("instances") or {}).values()
    for binding in [i["secret"] for i in instances if i.get("type") == "btp"] + ["dest-svc-binding"]:
        assert _allowed(local, "", "secrets", "get", binding), binding
    assert not _allowed(local, "", "secrets", "get", "any-other-secret")
    assert not _allowed(local, "", "secrets", "list") and not _allowed(local, "", "secrets", "watch")
    assert not _allowed(cluster, "", "events", "patch") and not _allowed(local, "", "pods", "get")
    (binding,) = find("ClusterRoleBinding", "mailgw")
    (sa,) = find("ServiceAccount", "mailgw")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "mailgw",
                                    "namespace": sa["metadata"]["namespace"]}]


def test_the_secret_watch_is_granted_apart_and_only_on_request():
    """kubernetes.watchSecrets needs list and watch on Secrets: a ClusterRole of its own,
    in a file of its own that `kubectl apply -k k8s/` leaves out."""
    (role,) = find("ClusterRole", "mailgw-secret-watch")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["list", "watch"]}]
    (binding,) = find("ClusterRoleBinding", "mailgw-secret-watch")
    assert binding["roleRef"]["name"] == "mailgw-secret-watch"
    assert binding["subjects"] == find("ClusterRoleBinding", "mailgw")[0]["subjects"]
    (kustomization,) = docs(os.path.join(K8S, KUSTOMIZATION))
    assert SECRET_WATCH not in kustomization["resources"]
    with open(os.path.join(K8S, SECRET_WATCH)) as f:
        assert "every Secret" in f.read()  # says plainly what the grant allows


def test_deployment_has_probes_identity_resources_and_matching_labels():
    (deploy,) = find("Deployment", "mailgw")
    pod = deploy["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert pod["spec"]["serviceAccountName"] == "mailgw"
    assert "--kubernetes" in container["args"] and container["args"][:2] == ["twistd", "-n"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == 9494
    assert container["readinessProbe"]["httpGet"]["port"] in ("http", 9494)
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in container["env"] if "valueFrom" in e}
    assert env == {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace"}
    assert container["resources"]["requests"] and container["resources"]["limits"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    labels = pod["metadata"]["labels"]
    settings_labels = dict(KubeSettings().pod_labels)
    assert settings_labels.items() <= labels.items()
    assert deploy["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # the ConfigMap is a valid gateway.yaml; a kubernetes section, when there is one,
    # is valid too; the settings in effect agree with the pods' labels and namespace
    from mailgw.config import parse_config

    (config,) = find("ConfigMap", "mailgw")
    gateway_yaml = yaml.safe_load(config["data"]["gateway.yaml"])
    parse_config({k: v for k, v in gateway_yaml.items() if k != "kubernetes"}, "configmap")
    settings, _ = parse_kube_section(gateway_yaml.get("kubernetes"), "configmap",
                                     environ={"POD_NAMESPACE": deploy["metadata"]["namespace"], "POD_NAME": "p"})
    assert dict(settings.pod_labels).items() <= labels.items()
    assert settings.gateway_namespace == deploy["metadata"]["namespace"]
    assert gateway_yaml["http"]["listen"].startswith("tcp:9494")
    assert "send" not in gateway_yaml["http"]  # the cluster-wide gateway has no send API


def sidecar_example():
    examples = docs(os.path.join(K8S, "sidecar-example.yaml"))
    (secret,) = [d for d in examples if d["kind"] == "Secret"]
    (config_map,) = [d for d in examples if d["kind"] == "ConfigMap"]
    (deploy,) = [d for d in examples if d["kind"] == "Deployment"]
    return secret, config_map, deploy


def test_sidecar_example_config_is_a_valid_standalone_config(tmp_path):
    from mailgw.config import parse_config

    secret, config_map, deploy = sidecar_example()
    for name, text in secret["stringData"].items():
        (tmp_path / name).write_text(text)
    doc = yaml.safe_load(config_map["data"]["gateway.yaml"])
    doc["destinations"] = str(tmp_path)
    config = parse_config(doc, "sidecar", tmp_path)
    names = {json.loads(text)["Name"] for text in secret["stringData"].values()}
    assert {listener.destination for listener in config.listeners} == names
    spec = deploy["spec"]["template"]["spec"]
    (gateway,) = spec["initContainers"]
    (app,) = spec["containers"]
    assert "--kubernetes" not in gateway["args"]
    assert "mail.password" not in json.dumps(app)


def test_sidecar_example_is_a_native_sidecar_on_loopback_only():
    secret, config_map, deploy = sidecar_example()
    spec = deploy["spec"]["template"]["spec"]
    (gateway,) = spec["initContainers"]
    # native sidecar: started before the app (gated by its startupProbe), stopped after it
    assert gateway["name"] == "mailgw" and gateway["restartPolicy"] == "Always"
    assert "startupProbe" in gateway
    assert spec["automountServiceAccountToken"] is False
    doc = yaml.safe_load(config_map["data"]["gateway.yaml"])
    endpoints = [listener["listen"] for listener in doc["listeners"]] + [doc["http"]["listen"]]
    if (doc["http"].get("send") or {}).get("listen"):
        endpoints.append(doc["http"]["send"]["listen"])
    for endpoint in endpoints:  # the send API, when there is one, included
        assert endpoint.startswith("tcp:") and endpoint.endswith(":interface=127.0.0.1"), endpoint
    # so the kubelet, which probes the pod's IP address, cannot use httpGet
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        if probe in gateway:
            assert "exec" in gateway[probe] and "httpGet" not in gateway[probe], probe
            assert "http://127.0.0.1:9494/" in " ".join(gateway[probe]["exec"]["command"])
    assert doc["http"]["listen"] == "tcp:9494:interface=127.0.0.1"
    assert spec["terminationGracePeriodSeconds"] > doc["timeouts"]["drain"]
    assert gateway["securityContext"]["readOnlyRootFilesystem"] is True


def test_deployment_pauses_before_the_drain_within_the_grace_period():
    (deploy,) = find("Deployment", "mailgw")
    pod = deploy["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"  # /bin/sleep of the image (tests/container run it)
    (config,) = find("ConfigMap", "mailgw")
    drain = yaml.safe_load(config["data"]["gateway.yaml"])["timeouts"]["drain"]
    assert pod["terminationGracePeriodSeconds"] > int(command[1]) + drain


def test_pod_disruption_budget_covers_the_gateway_pods():
    (deploy,) = find("Deployment", "mailgw")
    (pdb,) = find("PodDisruptionBudget", "mailgw")
    assert pdb["metadata"]["namespace"] == deploy["metadata"]["namespace"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= deploy["spec"]["template"]["metadata"]["labels"].items()
    assert pdb["spec"]["minAvailable"] < deploy["spec"]["replicas"]  # a node can still be drained


def test_kustomization_ties_the_gateway_manifests_together():
    (kustomization,) = docs(os.path.join(K8S, KUSTOMIZATION))
    assert kustomization["kind"] == "Kustomization"
    resources = kustomization["resources"]
    for resource in resources:
        assert os.path.isfile(os.path.join(K8S, resource)), resource
    gateway_files = {os.path.basename(p) for p in manifest_files()} - EXAMPLES - {SECRET_WATCH}
    assert set(resources) == gateway_files
    assert len(resources) == len(set(resources))
    (deploy,) = find("Deployment", "mailgw")
    image = deploy["spec"]["template"]["spec"]["containers"][0]["image"]
    assert {entry["name"] for entry in kustomization.get("images", [])} <= {image.rsplit(":", 1)[0]}


def test_containerfile():
    with open(os.path.join(ROOT, "Containerfile")) as f:
        text = f.read()
    assert "ARG BASE=docker.io/library/python:3.11-slim" in text
    assert "pip install" in text and "write-plugin-cache" in text
    cmd = [line for line in text.splitlines() if line.startswith("CMD")][-1]
    assert json.loads(cmd[3:].strip()) == ["twistd", "-n", "--pidfile=", "mailgw", "--kubernetes"]
    assert "USER 65532" in text
    assert os.path.exists(CRD_PATH)
