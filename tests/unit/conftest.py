"""Fixtures of the unit tests that run the token client against tests/tokenservice.py
(test_oauth.py, test_oauth_limits.py): a real thread pool and real HTTP on loopback."""

import pytest
from twisted.logger import globalLogPublisher

from mailgw.oauth import TokenClient
from support.reactor import in_reactor


@pytest.fixture
def insecure_transport(monkeypatch):
    """http:// token URLs (the test token service speaks http): allowed in tests only,
    never by the library."""
    monkeypatch.setenv("OAUTHLIB_INSECURE_TRANSPORT", "1")


@pytest.fixture
def make_client(reactor, insecure_transport):
    """``make(**kwargs)``: a started TokenClient; every one is stopped after the test."""
    clients = []

    def make(**kwargs):
        client = TokenClient(reactor, **kwargs)
        in_reactor(client.start)
        clients.append(client)
        return client

    yield make
    for client in clients:
        in_reactor(client.stop)


@pytest.fixture
def events():
    """Every twisted.logger event emitted during the test."""
    captured = []
    globalLogPublisher.addObserver(captured.append)
    yield captured
    globalLogPublisher.removeObserver(captured.append)
