"""Where and how the Kubernetes mode's listeners listen (mailgw.kube.main.listen_tcp)."""

import socket

import pytest
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactor

from mailgw.kube.main import listen_tcp
from mailgw.listening import DEFAULT_BACKLOG


def test_one_interface_listens_with_the_default_backlog():
    reactor = MemoryReactor()
    listen_tcp(reactor, 20000, Factory(), "127.0.0.1")
    listen_tcp(reactor, 20001, Factory(), "::1")
    assert [(port, backlog, interface) for port, _, backlog, interface in reactor.tcpServers] == [
        (20000, DEFAULT_BACKLOG, "127.0.0.1"), (20001, DEFAULT_BACKLOG, "::1")]


@pytest.mark.parametrize("failure", ["no IPv6 socket", "IPv6 switched off"])
def test_the_ipv4_fallback_listens_with_the_default_backlog(monkeypatch, failure):
    """SPEC 9.6: 1024 unless the endpoint says otherwise (Twisted's own default is 50)."""
    real = socket.socket

    class NoIPv6(real):
        def __init__(self, family=-1, *args, **kwargs):
            if family == socket.AF_INET6 and failure == "no IPv6 socket":
                raise OSError("address family not supported")
            super().__init__(family, *args, **kwargs)

        def bind(self, address):
            if self.family == socket.AF_INET6:
                import errno

                raise OSError(errno.EADDRNOTAVAIL, "cannot assign requested address")
            return super().bind(address)

    monkeypatch.setattr(socket, "socket", NoIPv6)
    reactor = MemoryReactor()
    listen_tcp(reactor, 20000, Factory())
    assert [(port, backlog) for port, _, backlog, _ in reactor.tcpServers] == [(20000, DEFAULT_BACKLOG)]
