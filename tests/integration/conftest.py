"""Fixtures for tests that run the real gateway in-process (see tests/gatewayharness.py)."""

import pytest

import gatewayharness


@pytest.fixture
def gateway_factory(reactor, tmp_path):
    """``start(doc)`` starts a gateway from a gateway.yaml-like dict; all are stopped after the test."""
    started = []

    def start(doc, **kwargs):
        running = gatewayharness.start_gateway(doc, tmp_path, **kwargs)
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()
