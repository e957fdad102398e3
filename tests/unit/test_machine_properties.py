"""Hostile input against every sans-IO machine (hypothesis): arbitrary bytes, split at
arbitrary points.  The properties live in tests/support/machines.py; the long run with
many more examples is ``python3 -m tests.fuzz --minutes N``."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from support import machines

CI = settings(max_examples=150, deadline=None)


@pytest.mark.parametrize("family", machines.FAMILIES)
@CI
@given(data=st.data())
def test_upstream_machines(family, data):
    machines.upstream_property(
        family,
        data.draw(machines.upstream_options()),
        data.draw(machines.segments(machines.SERVER_LINES[family])),
        data.draw(machines.CUTS),
    )


@pytest.mark.parametrize("family", machines.FAMILIES)
@pytest.mark.parametrize("lazy", [False, True], ids=["eager", "lazy"])
@CI
@given(data=st.data())
def test_application_side_machines(family, lazy, data):
    machines.app_property(
        family,
        lazy,
        data.draw(machines.segments(machines.CLIENT_LINES[family])),
        data.draw(machines.CUTS),
        data.draw(st.lists(st.sampled_from(["ok", "no", "later"]), max_size=6)),
    )


@CI
@given(options=machines.SOCKS_METHODS, data=machines.PROXY_BYTES, cuts=machines.CUTS)
def test_socks5_machine(options, data, cuts):
    machines.socks_property(options, data, cuts)


@CI
@given(
    mechanism=st.sampled_from(["PLAIN", "XOAUTH2", "OAUTHBEARER", "LOGIN", "x"]),
    response=st.one_of(st.binary(max_size=200), st.binary(max_size=150).map(lambda b: __import__("base64").b64encode(b))),
)
def test_sasl_decoders(mechanism, response):
    machines.sasl_property(mechanism, response)
