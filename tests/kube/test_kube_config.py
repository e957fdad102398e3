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
        ({"watchSecrets": "yes"}, "watchSecrets"),
        ({"instances": {"x": {"type": "btp"}}}, "secret"),
        ({"instances": {"x": {"type": "ldap"}}}, "type"),
        ({"defaultInstance": "missing"}, "defaultInstance"),
        ([], "mapping"),
    ],
)
def test_errors_name_the_key(section, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse_kube_section(section, "gateway.yaml", environ={})


def test_watch_namespaces_and_listen_interface():
    settings, _ = parse_kube_section({"watchNamespaces": ["apps", "mail"], "listenInterface": "::1",
                                      "watchSecrets": True}, environ={})
    assert settings.watch_namespaces == ("apps", "mail") and settings.listen_interface == "::1"
    assert settings.watch_secrets and not parse_kube_section(None, environ={})[0].watch_secrets
    assert settings.namespaces == ("apps", "mail")
    assert parse_kube_section(None, environ={})[0].namespaces == (None,)
    for bad in ({"watchNamespaces": "apps"}, {"watchNamespaces": ["Bad_NS"]}, {"listenInterface": "eth0"}):
        with pytest.raises(ValueError, match="watchNamespaces|listenInterface"):
            parse_kube_section(bad, environ={})


def test_a_send_api_in_kubernetes_mode_stops_start_up_with_one_line(tmp_path):
    import json

    from twisted.internet import reactor

    from mailgw.kube.main import make_kubernetes_service

    path = tmp_path / "gateway.yaml"
    path.write_text(json.dumps({"http": {"listen": "tcp:9494", "send": {}}}))
    with pytest.raises(SystemExit) as info:
        make_kubernetes_service(reactor, str(path))
    message = str(info.value)
    assert message.startswith("mailgw: configuration error:") and "send API" in message
    assert "\n" not in message


@pytest.mark.parametrize("section", [
    {"renewDeadline": 15},  # the default leaseDuration: a follower could take over while we write
    {"leaseDuration": 8},  # below the default renewDeadline
    {"renewDeadline": 2},  # the default retryPeriod: no round would ever renew in time
    {"leaseDuration": 30, "renewDeadline": 20, "retryPeriod": 25},
])
def test_lease_timings_must_nest(section):
    with pytest.raises(ValueError, match=r"leaseDuration > renewDeadline > retryPeriod"):
        parse_kube_section(section, "gateway.yaml", environ={})
    settings, _ = parse_kube_section({"leaseDuration": 30, "renewDeadline": 20, "retryPeriod": 5}, environ={})
    assert (settings.lease_duration, settings.renew_deadline, settings.retry_period) == (30, 20, 5)
