"""The ``kubernetes:`` section of gateway.yaml, turned into :class:`KubeSettings`.

    kubernetes:
      namespace: mailgw-system          # default: $POD_NAMESPACE, else mailgw-system
      podLabels: {app.kubernetes.io/name: mailgw}
      portRange: "20000-29999"          # gateway ports allocated to destinations
      resyncInterval: 180               # seconds
      destinationCacheTTL: 120          # seconds
      watchTimeout: 300                 # seconds, server-side watch timeout
      apiTimeout: 10                    # seconds per API call
      leaderElection: true
      leaseName: mailgw-leader
      leaseDuration: 15                 # seconds; leaseDuration > renewDeadline > retryPeriod
      renewDeadline: 10                 # a leader that has not renewed for this long stops writing
      retryPeriod: 2                    # seconds between election rounds
      defaultInstance: secrets          # used when a CR has no destinationServiceInstanceName
      instances:                        # destination service instances (btp source)
        dest-svc: {type: btp, secret: dest-svc-binding}   # binding Secret in `namespace`
      watchNamespaces: [apps, mail]     # default: all namespaces
      watchSecrets: false               # true: changed `secrets` destinations apply within
                                        # seconds; needs k8s/rbac-secret-watch.yaml
      listenInterface: ""               # default: every address, IPv4 and IPv6
      kubeconfig: ~/.kube/config        # local runs only; in a pod the in-cluster config

Every problem raises ``ValueError`` naming the key.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from mailgw.config import positive
from mailgw.kube.controller import KubeSettings
from mailgw.kube.model import is_dns_label

_NUMBERS = {
    "resyncInterval": "resync_interval",
    "destinationCacheTTL": "cache_ttl",
    "watchTimeout": "watch_timeout",
    "apiTimeout": "api_timeout",
    "leaseDuration": "lease_duration",
    "renewDeadline": "renew_deadline",
    "retryPeriod": "retry_period",
}
_KEYS = set(_NUMBERS) | {
    "namespace", "podLabels", "portRange", "leaderElection", "leaseName", "defaultInstance",
    "instances", "kubeconfig", "identity", "watchNamespaces", "watchSecrets", "listenInterface",
}


def _port_range(value: Any, where: str) -> tuple[int, int]:
    if isinstance(value, str) and "-" in value:
        parts = value.split("-", 1)
    elif isinstance(value, (list, tuple)) and len(value) == 2:
        parts = list(value)
    else:
        raise ValueError(f"{where}: portRange must be 'LOW-HIGH' or [LOW, HIGH]")
    try:
        lo, hi = (int(str(p).strip()) for p in parts)
    except ValueError:
        raise ValueError(f"{where}: portRange must hold two port numbers") from None
    if not 1024 <= lo <= hi <= 65535:
        raise ValueError(f"{where}: portRange must lie within 1024-65535, low before high")
    return lo, hi


def _check_lease_timings(values: Mapping[str, Any], where: str) -> None:
    """A leader stops writing ``renewDeadline`` after its last renewal, and a follower
    takes over ``leaseDuration`` after it: the first must come first, or two replicas
    write at once; and a round every ``retryPeriod`` must fit in the deadline."""
    defaults = KubeSettings.__attrs_attrs__
    duration, deadline, period = (
        values.get(name, getattr(defaults, name).default) for name in ("lease_duration", "renew_deadline", "retry_period")
    )
    if not duration > deadline > period:
        raise ValueError(
            f"{where}: leaseDuration > renewDeadline > retryPeriod must hold "
            f"(now {duration:g}, {deadline:g}, {period:g} seconds)"
        )


def parse_kube_section(
    raw: Mapping[str, Any] | None, origin: str = "<config>", environ: Mapping[str, str] | None = None
) -> tuple[KubeSettings, str | None]:
    """Settings and the kubeconfig path (None: in-cluster, or the default kubeconfig)."""
    where = f"{origin}: kubernetes"
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}: must be a mapping")
    unknown = set(raw) - _KEYS
    if unknown:
        raise ValueError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for key, attribute in _NUMBERS.items():
        if key in raw:
            values[attribute] = positive(raw[key], f"{where}, key {key!r}", whole=key == "watchTimeout")
    if "namespace" in raw:
        if not is_dns_label(raw["namespace"]):
            raise ValueError(f"{where}, key 'namespace': must be a namespace name")
        values["gateway_namespace"] = raw["namespace"]
    if "identity" in raw:
        if not isinstance(raw["identity"], str) or not raw["identity"]:
            raise ValueError(f"{where}, key 'identity': must be a non-empty string")
        values["identity"] = raw["identity"]
    if "watchNamespaces" in raw:
        names = raw["watchNamespaces"]
        if not isinstance(names, list) or not all(isinstance(n, str) and is_dns_label(n) for n in names):
            raise ValueError(f"{where}, key 'watchNamespaces': must be a list of namespace names")
        values["watch_namespaces"] = tuple(names)
    if "listenInterface" in raw:
        interface = raw["listenInterface"]
        if not isinstance(interface, str):
            raise ValueError(f"{where}, key 'listenInterface': must be an IP address or empty")
        if interface:
            import ipaddress

            try:
                ipaddress.ip_address(interface)
            except ValueError:
                raise ValueError(f"{where}, key 'listenInterface': {interface[:60]!r} is not an IP address") from None
        values["listen_interface"] = interface
    if "podLabels" in raw:
        labels = raw["podLabels"]
        if not isinstance(labels, Mapping) or not labels or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
        ):
            raise ValueError(f"{where}, key 'podLabels': must be a non-empty mapping of strings")
        values["pod_labels"] = dict(labels)
    if "portRange" in raw:
        values["port_range"] = _port_range(raw["portRange"], where)
    if "leaderElection" in raw:
        if not isinstance(raw["leaderElection"], bool):
            raise ValueError(f"{where}, key 'leaderElection': must be true or false")
        values["leader_election"] = raw["leaderElection"]
    if "watchSecrets" in raw:
        if not isinstance(raw["watchSecrets"], bool):
            raise ValueError(f"{where}, key 'watchSecrets': must be true or false")
        values["watch_secrets"] = raw["watchSecrets"]
    if "leaseName" in raw:
        if not isinstance(raw["leaseName"], str) or not is_dns_label(raw["leaseName"]):
            raise ValueError(f"{where}, key 'leaseName': must be a DNS label")
        values["lease_name"] = raw["leaseName"]
    instances = raw.get("instances") or {}
    if not isinstance(instances, Mapping):
        raise ValueError(f"{where}, key 'instances': must be a mapping of instance names")
    btp: dict[str, str] = {}
    for name, spec in instances.items():
        here = f"{where}, instance {name!r}"
        if not isinstance(spec, Mapping):
            raise ValueError(f"{here}: must be a mapping with type")
        kind = spec.get("type")
        if kind == "btp":
            secret = spec.get("secret")
            if not isinstance(secret, str) or not secret:
                raise ValueError(f"{here}: type btp needs 'secret' (the binding Secret's name)")
            btp[str(name)] = secret
        elif kind == "secrets":
            if name != "secrets":
                raise ValueError(f"{here}: the secrets source is built in as instance 'secrets'")
        else:
            raise ValueError(f"{here}: type must be btp or secrets, not {kind!r}")
    values["btp_instances"] = btp
    if "defaultInstance" in raw:
        default = raw["defaultInstance"]
        if default is not None and (not isinstance(default, str) or (default != "secrets" and default not in btp)):
            raise ValueError(f"{where}, key 'defaultInstance': {default!r} is not a configured instance")
        values["default_instance"] = default
    _check_lease_timings(values, where)
    kubeconfig = raw.get("kubeconfig")
    if kubeconfig is not None and not isinstance(kubeconfig, str):
        raise ValueError(f"{where}, key 'kubeconfig': must be a path")
    settings = KubeSettings.from_environment(env, **values)
    return settings, os.path.expanduser(kubeconfig) if kubeconfig else None
