"""The pure checks behind SPEC 9.1 and 9.6: endpoint strings (backlog, reachability,
conflicts, port ranges), size caps and encodings of configuration and secret files, and
what make_service refuses before anything binds."""

from __future__ import annotations

import json

import pytest
from twisted.internet.testing import MemoryReactor

from mailgw.config import MAX_CONFIG_BYTES, MAX_SECRET_BYTES, ConfigError, load_config, parse_config
from mailgw.listening import (
    DEFAULT_BACKLOG,
    check_endpoint,
    find_conflict,
    parse_endpoint,
    reachable_off_loopback,
    shares_socket,
    with_backlog,
)
from mailgw.service import check_listening, make_service

DESTINATION = {
    "Name": "office", "Type": "MAIL", "Authentication": "NoAuthentication",
    "mail.transport.protocol": "smtp", "mail.smtp.host": "127.0.0.1",
}


# --- endpoint strings --------------------------------------------------------------------


def test_parse_like_twisted():
    parsed = parse_endpoint(r"tcp6:2525:interface=\:\:1")
    assert (parsed.kind, parsed.port, parsed.interface) == ("tcp6", "2525", "::1")
    parsed = parse_endpoint("tcp:port=25:interface=127.0.0.1")
    assert (parsed.port, parsed.interface) == ("25", "127.0.0.1")
    parsed = parse_endpoint("ssl:465:privateKey=key.pem:certKey=cert.pem")
    assert parsed.interface == "" and parsed.get("privateKey") == "key.pem"
    with pytest.raises(ValueError):
        parse_endpoint("")


@pytest.mark.parametrize(
    "given, expected",
    [
        ("tcp:2525", f"tcp:2525:backlog={DEFAULT_BACKLOG}"),
        ("tcp:2525:interface=127.0.0.1", f"tcp:2525:interface=127.0.0.1:backlog={DEFAULT_BACKLOG}"),
        (r"tcp6:2525:interface=\:\:1", rf"tcp6:2525:interface=\:\:1:backlog={DEFAULT_BACKLOG}"),
        ("ssl:2465:privateKey=k.pem", f"ssl:2465:privateKey=k.pem:backlog={DEFAULT_BACKLOG}"),
        ("unix:/run/mailgw.sock", f"unix:/run/mailgw.sock:backlog={DEFAULT_BACKLOG}"),
        # an explicit backlog is kept, by name or in its position
        ("tcp:2525:backlog=10", "tcp:2525:backlog=10"),
        ("tcp:2525:127.0.0.1:10", "tcp:2525:127.0.0.1:10"),
        ("tcp6:2525:10", "tcp6:2525:10"),
        ("ssl:2465:k.pem:c.pem:SSLv23_METHOD:127.0.0.1:10", "ssl:2465:k.pem:c.pem:SSLv23_METHOD:127.0.0.1:10"),
        ("unix:/s:666:10", "unix:/s:666:10"),
        # types without a backlog are left alone
        ("systemd:domain=INET:index=0", "systemd:domain=INET:index=0"),
    ],
)
def test_with_backlog(given, expected):
    assert with_backlog(given) == expected


def test_backlog_reaches_the_listen_call():
    from mailgw.listening import Listener, listen_now

    reactor = MemoryReactor()
    listen_now(reactor, Listener("x", "tcp:2525:interface=127.0.0.1", object()))
    listen_now(reactor, Listener("y", "tcp:2526:backlog=7", object()))
    assert [call[2] for call in reactor.tcpServers] == [DEFAULT_BACKLOG, 7]


@pytest.mark.parametrize(
    "description, reachable",
    [
        ("tcp:9494", True),
        ("tcp:9494:interface=0.0.0.0", True),
        ("tcp:9494:interface=192.168.1.10", True),
        (r"tcp6:9494", True),
        (r"tcp6:9494:interface=\:\:", True),
        ("tcp:9494:interface=127.0.0.1", False),
        ("tcp:9494:interface=127.0.0.2", False),
        ("tcp:9494:interface=localhost", False),
        (r"tcp6:9494:interface=\:\:1", False),
        (r"tcp6:9494:interface=\:\:ffff\:127.0.0.1", False),
        ("ssl:9494:privateKey=k.pem", True),
        ("ssl:9494:privateKey=k.pem:interface=127.0.0.1", False),
        ("unix:/run/mailgw/send.sock", False),
        ("systemd:domain=INET:index=0", True),  # cannot tell: counts as reachable
    ],
)
def test_reachable_off_loopback(description, reachable):
    assert reachable_off_loopback(description) is reachable


def test_conflicts():
    assert shares_socket("tcp:2525:interface=127.0.0.1", "tcp:2525:interface=127.0.0.1")
    assert shares_socket("tcp:2525", "tcp:2525:interface=127.0.0.1")
    assert shares_socket(r"tcp6:2525", "tcp:2525:interface=127.0.0.1")
    assert not shares_socket("tcp:2525:interface=127.0.0.1", "tcp:2525:interface=127.0.0.2")
    assert not shares_socket("tcp:0", "tcp:0")
    assert not shares_socket("tcp:2525", "tcp:2526")
    assert shares_socket("unix:/s", "unix:/s:mode=600")
    named = [("listeners[0]", "tcp:2525:interface=127.0.0.1"), ("http", "tcp:2525")]
    assert find_conflict(named) == "listeners[0] and http both listen on port 2525"
    assert find_conflict(named[:1]) is None


@pytest.mark.parametrize(
    "description, reason",
    [
        ("tcp:99999", "port 99999 is out of range"),
        ("tcp:http", "'http' is not a port number"),
        ("tcp:2525:backlog=lots", "backlog 'lots' is not a positive number"),
    ],
)
def test_check_endpoint(description, reason):
    with pytest.raises(ValueError, match=reason):
        check_endpoint(description)


# --- what make_service refuses ------------------------------------------------------------


def config(**sections):
    doc = {"destinations": [DESTINATION], "listeners": [{"destination": "office", "listen": "tcp:2525:interface=127.0.0.1"}]}
    doc.update(sections)
    return parse_config(doc, "gateway.yaml")


@pytest.mark.parametrize(
    "sections, message",
    [
        ({"listeners": [{"destination": "office", "listen": "tcp:99999"}]},
         "gateway.yaml: listeners[0]: invalid endpoint string 'tcp:99999': port 99999 is out of range"),
        ({"listeners": [{"destination": "office", "listen": "tcp:2525:interface=127.0.0.1"},
                        {"destination": "office", "listen": "tcp:2525:interface=127.0.0.1"}]},
         "gateway.yaml: listeners[0] and listeners[1] both listen on port 2525"),
        ({"listeners": [{"destination": "office", "listen": "nonsense:1"}]},
         "listeners[0]: invalid endpoint string 'nonsense:1'"),
        ({"listeners": [{"destination": "office", "listen": "tcp:2525:colour=blue"}]},
         "listeners[0]: invalid endpoint string"),
        ({"http": {"listen": "tcp:2525:interface=127.0.0.1"}}, "listeners[0] and http both listen on port 2525"),
        ({"http": {"listen": "tcp:9494", "send": {}}},
         "http.send: the send API would be reachable from other hosts on 'tcp:9494' without tokens"),
        ({"http": {"listen": "tcp:9494:interface=127.0.0.1", "send": {"listen": "tcp:9495:interface=0.0.0.0"}}},
         "reachable from other hosts on 'tcp:9495:interface=0.0.0.0' without tokens"),
    ],
)
def test_refused_before_listening(sections, message):
    with pytest.raises(ConfigError) as info:
        make_service(config(**sections), MemoryReactor())
    assert message in str(info.value)


def test_send_api_allowed_on_loopback_or_with_tokens(tmp_path):
    check_listening(config(http={"listen": "tcp:9494:interface=127.0.0.1", "send": {}}), MemoryReactor())
    check_listening(config(http={"listen": "tcp:9494", "send": {"listen": "unix:" + str(tmp_path / "s")}}), MemoryReactor())
    check_listening(config(http={"listen": "tcp:9494", "send": {"tokens": ["t0ken"]}}), MemoryReactor())


def test_kubernetes_mode_has_no_send_api():
    with pytest.raises(ConfigError, match="cluster-wide gateway has no send API"):
        check_listening(config(http={"listen": "tcp:9494:interface=127.0.0.1", "send": {}}), MemoryReactor(), send_api=False)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # twisted.web's own 404 resource
def test_no_send_api_unless_configured():
    from twisted.web.test.requesthelper import DummyRequest

    service = make_service(config(http={"listen": "tcp:9494"}), MemoryReactor())
    [http] = service.web.listeners
    site = http.factory
    assert site.getResourceFor(DummyRequest([b"v1", b"send", b"office"])).code == 404
    assert getattr(site.getResourceFor(DummyRequest([b"metrics"])), "code", None) != 404


# --- files ----------------------------------------------------------------------------------


def write_config(tmp_path, text: str | bytes, name="gateway.yaml"):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def test_config_file_over_the_cap(tmp_path):
    path = write_config(tmp_path, "# padding\n" * (MAX_CONFIG_BYTES // 10 + 1))
    with pytest.raises(ConfigError, match="configuration file is larger than 4 MiB"):
        load_config(path)


def test_config_file_that_never_ends():
    with pytest.raises(ConfigError, match="larger than 4 MiB"):
        load_config("/dev/zero")


def test_config_file_not_utf8(tmp_path):
    path = write_config(tmp_path, b"destinations: []\nhostname: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"not UTF-8 \(byte 0xe9 at offset 30\)"):
        load_config(path)


@pytest.mark.parametrize("name, text", [("gateway.yaml", "[" * 100000), ("gateway.json", '{"a":' * 100000)])
def test_config_nested_too_deeply(tmp_path, name, text):
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_config(write_config(tmp_path, text, name))


def test_unreadable_config(tmp_path):
    with pytest.raises(ConfigError, match="cannot read configuration file: Is a directory"):
        load_config(tmp_path)


def secret_config(tmp_path, secret_path):
    doc = {"destinations": [{**DESTINATION, "Authentication": "BasicAuthentication", "mail.user": "u",
                             "mail.password": {"file": str(secret_path)}}]}
    return write_config(tmp_path, json.dumps(doc))


def test_secret_file_over_the_cap(tmp_path):
    (tmp_path / "big").write_bytes(b"x" * (MAX_SECRET_BYTES + 1))
    with pytest.raises(ConfigError, match="key 'mail.password': .*big: secret file is larger than 64 KiB"):
        load_config(secret_config(tmp_path, tmp_path / "big"))
    (tmp_path / "fits").write_bytes(b"y" * (MAX_SECRET_BYTES - 1) + b"\n")
    assert load_config(secret_config(tmp_path, tmp_path / "fits")).destinations["office"].password == "y" * (MAX_SECRET_BYTES - 1)


def test_secret_file_dev_zero_is_not_read_to_the_end(tmp_path):
    with pytest.raises(ConfigError, match="larger than 64 KiB"):
        load_config(secret_config(tmp_path, "/dev/zero"))


def test_secret_file_not_utf8(tmp_path):
    (tmp_path / "pw").write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="secret file is not UTF-8"):
        load_config(secret_config(tmp_path, tmp_path / "pw"))


# --- ListenerGroup: binding and replacing (SIGHUP) ----------------------------------------


class FussyReactor(MemoryReactor):
    """A MemoryReactor whose ports can be refused, and that knows which are open."""

    def __init__(self, refuse=(), refuse_backlog=None):
        super().__init__()
        self.refuse = set(refuse)
        self.refuse_backlog = refuse_backlog
        self.open: dict[int, object] = {}

    def listenTCP(self, port, factory, backlog=50, interface=""):
        from twisted.internet.error import CannotListenError

        if port in self.refuse or port in self.open or backlog == self.refuse_backlog:
            raise CannotListenError(interface, port, OSError(98, "Address already in use"))
        listening = super().listenTCP(port, factory, backlog, interface)
        self.open[port] = factory
        original = listening.stopListening

        def stop():
            self.open.pop(port, None)
            return original()

        listening.stopListening = stop
        return listening


def group(reactor, *specs):
    from mailgw.listening import Listener, ListenerGroup

    result = ListenerGroup(reactor)
    for name, listen in specs:
        result.add(Listener(name, listen, Factory(name)))
    return result


class Factory:
    def __init__(self, route):
        self.route = route


def spec(name, listen):
    from mailgw.listening import Listener

    return Listener(name, listen, Factory(name), route=name)


def test_group_binds_in_privileged_start_and_fails_as_one():
    from mailgw.listening import StartupError

    reactor = FussyReactor(refuse={2527})
    listeners = group(reactor, ("a", "tcp:2526"), ("b", "tcp:2527"))
    with pytest.raises(StartupError, match="b: cannot listen on 'tcp:2527': address already in use"):
        listeners.privilegedStartService()
    assert reactor.open == {}  # the one that did bind was closed again


def test_replace_keeps_adds_removes_and_moves_routes():
    reactor = FussyReactor()
    listeners = group(reactor, ("a", "tcp:2526"), ("b", "tcp:2527"))
    listeners.startService()
    kept = listeners.listeners[0]
    committed = []
    d = listeners.replace([spec("a2", "tcp:2526"), spec("c", "tcp:2528")], lambda: committed.append(set(reactor.open)))
    assert d.called and committed == [{2526, 2527, 2528}]  # commit before the removed one closes
    assert set(reactor.open) == {2526, 2528}
    assert listeners.listeners[0] is kept and kept.factory.route == "a2" and kept.route == "a2"


def test_replace_that_cannot_listen_changes_nothing():
    from mailgw.listening import StartupError

    reactor = FussyReactor(refuse={2529})
    listeners = group(reactor, ("a", "tcp:2526"), ("b", "tcp:2527"))
    listeners.startService()
    failures = []
    listeners.replace([spec("c", "tcp:2528"), spec("d", "tcp:2529")], lambda: failures.append("committed")).addErrback(failures.append)
    [failure] = failures
    assert failure.check(StartupError)
    assert set(reactor.open) == {2526, 2527} and [item.name for item in listeners.listeners] == ["a", "b"]


def test_replace_on_the_same_port_with_another_string():
    reactor = FussyReactor()
    listeners = group(reactor, ("a", "tcp:2526:interface=127.0.0.1"))
    listeners.startService()
    # Same socket, another string: the old one closes before the new one binds.
    listeners.replace([spec("a", "tcp:2526:interface=127.0.0.1:backlog=10")])
    assert set(reactor.open) == {2526}
    assert listeners.listeners[0].listen.endswith("backlog=10")
    assert [call[2] for call in reactor.tcpServers] == [DEFAULT_BACKLOG, 10]


def test_replace_on_the_same_port_that_fails_reopens_the_old_one():
    from mailgw.listening import StartupError

    reactor = FussyReactor(refuse_backlog=10)
    listeners = group(reactor, ("a", "tcp:2526:interface=127.0.0.1"), ("b", "tcp:2527"))
    listeners.startService()
    failures = []
    listeners.replace([spec("a", "tcp:2526:interface=127.0.0.1:backlog=10"), spec("c", "tcp:2528")]).addErrback(failures.append)
    assert failures and failures[0].check(StartupError)
    assert set(reactor.open) == {2526, 2527}  # the old listener is back, the new one gone
    assert [item.listen for item in listeners.listeners] == ["tcp:2526:interface=127.0.0.1", "tcp:2527"]
    assert all(item.port is not None for item in listeners.listeners)


def test_replace_matches_listeners_with_the_same_string_one_for_one():
    """Two listeners on ``tcp:0`` are two listeners: a reload keeps both (and closes
    the one it drops), none is left listening outside the group."""
    reactor = MemoryReactor()
    listeners = group(reactor, ("a", "tcp:0:interface=127.0.0.1"), ("b", "tcp:0:interface=127.0.0.1"))
    listeners.startService()
    first, second = listeners.listeners
    stopped = []
    second.port.stopListening = lambda: stopped.append(second)
    listeners.replace([spec("a2", "tcp:0:interface=127.0.0.1"), spec("b2", "tcp:0:interface=127.0.0.1")])
    assert listeners.listeners == (first, second) and [item.name for item in listeners.listeners] == ["a2", "b2"]
    assert len(reactor.tcpServers) == 2 and not stopped  # kept, nothing new bound
    listeners.replace([spec("a3", "tcp:0:interface=127.0.0.1")])
    assert listeners.listeners == (first,) and stopped == [second]


def test_secret_file_that_is_a_fifo_is_refused_without_waiting(tmp_path):
    import os

    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(ConfigError, match="it is a FIFO, not a file"):
        load_config(secret_config(tmp_path, tmp_path / "pipe"))
