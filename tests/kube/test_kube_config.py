"""The kubernetes: section of gateway.yaml."""

from __future__ import annotations

import pytest

from mailgw.kube.config import parse_kube_section


def test_defaults_come_from_the_pod():
    settings, kubeconfig = parse_kube_section(None, environ={"POD_NAMESPACE": "gw", "POD_NAME": "gw-7"})
    assert (settings.gateway_namespace, settings.identity) == ("gw", "gw-7")
    assert settings.resync_interval == 180 and settings.cache_ttl == 120
    assert settings.default_instance == "secrets" and settings.leader_election is True
    assert kubeconfig is None


def test_full_section():
    settings, kubeconfig = parse_kube_section(
        {"namespace": "mail", "podLabels": {"app": "gw"}, "portRange": [30000, 30100],
         "resyncInterval": 60, "destinationCacheTTL": 30, "watchTimeout": 120, "apiTimeout": 5,
         "leaderElection": False, "leaseName": "gw-lock", "defaultInstance": "dest-svc",
         "instances": {"dest-svc": {"type": "btp", "secret": "binding"}, "secrets": {"type": "secrets"}},
         "kubeconfig": "/tmp/kc"},
        environ={"POD_NAMESPACE": "ignored"},
    )
    assert settings.gateway_namespace == "mail" and dict(settings.pod_labels) == {"app": "gw"}
    assert settings.port_range == (30000, 30100) and settings.watch_timeout == 120
    assert settings.btp_instances == (("dest-svc", "binding"),)
    assert settings.default_instance == "dest-svc" and settings.leader_election is False
    assert settings.lease_name == "gw-lock" and kubeconfig == "/tmp/kc"


@pytest.mark.parametrize(
    "section,fragment",
    [
        ({"nope": 1}, "unknown key"),
        ({"portRange": "80-90"}, "portRange"),
        ({"portRange": "30000"}, "portRange"),
        ({"portRange": "3-x"}, "portRange"),
        ({"resyncInterval": 0}, "resyncInterval"),
        ({"resyncInterval": True}, "resyncInterval"),
        ({"namespace": "Bad_NS"}, "namespace"),
        ({"podLabels": {}}, "podLabels"),
        ({"leaderElection": "yes"}, "leaderElection"),
        ({"instances": {"x": {"type": "btp"}}}, "secret"),
        ({"instances": {"x": {"type": "ldap"}}}, "type"),
        ({"defaultInstance": "missing"}, "defaultInstance"),
        ([], "mapping"),
    ],
)
def test_errors_name_the_key(section, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse_kube_section(section, "gateway.yaml", environ={})
