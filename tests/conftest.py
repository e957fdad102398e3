"""Shared pytest fixtures.

Real-server fixtures are session-scoped: each server starts once, on demand, the first
time a test asks for it, and is stopped (its whole process group killed) at the end of
the session. The servers themselves live in ``tests/realservers.py``; tests import that
module directly (``import realservers``) because this file puts ``tests/`` on sys.path.

A missing server binary skips the test, or fails it when ``MAILGW_REQUIRE_SERVERS=1``
(CI sets it): see ``realservers.require_or_skip``.

Session fixtures are shared by many tests: never assume a mailbox or the SMTP sink is
empty. Match what you look for on a marker unique to your test
(``smtp_sink.wait_for(lambda m: marker in m.data)``), or start a private server from
``realservers`` inside your test when you need a clean one.
"""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import realservers  # noqa: E402  (needs the sys.path entry above)

_TESTS = Path(__file__).parent
#: Each top-level directory of the test tree is a pytest marker of the same name
#: (registered in setup.cfg): ``pytest -m unit`` runs the fast part only.
_MARKED_DIRECTORIES = ("unit", "integration", "kube", "container")


def pytest_collection_modifyitems(config, items):
    for item in items:
        try:
            top = Path(item.path).relative_to(_TESTS).parts[0]
        except ValueError:
            continue
        if top in _MARKED_DIRECTORIES:
            item.add_marker(top)


# --------------------------------------------------------------------------------------
# The global reactor in a daemon thread (tests/support/reactor.py)


@pytest.fixture(scope="session")
def reactor():
    """The global reactor, running in a daemon thread for the whole session."""
    from support.reactor import running_reactor

    return running_reactor()


# --------------------------------------------------------------------------------------
# Real servers (tests/realservers.py)


@pytest.fixture(scope="session")
def certs(tmp_path_factory):
    """``realservers.Certs``: trusted CA, localhost leaf, client cert, untrusted and
    wrong-name leaves, all as files."""
    return realservers.Certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="session")
def smtp_sink():
    """A plain aiosmtpd sink (no TLS, no AUTH) on ``smtp_sink.host``/``.port``; Dovecot's
    submission and the ``postfix`` fixture relay to it. Its ``messages`` accumulate over
    the session."""
    realservers.import_or_skip("aiosmtpd")
    with realservers.SMTPSink() as sink:
        yield sink


@pytest.fixture(scope="session")
def dovecot(tmp_path_factory, certs, smtp_sink):
    """Dovecot with users ``realservers.DEFAULT_USERS`` (alice/secret, bob with an awkward
    password), ``realservers.SEED_MESSAGE`` in each INBOX, and submission relaying to
    ``smtp_sink``."""
    realservers.require_or_skip(realservers.Dovecot.TOOLS)
    server = realservers.Dovecot(
        tmp_path_factory.mktemp("dovecot"),
        certs,
        users=realservers.DEFAULT_USERS,
        relay=(smtp_sink.host, smtp_sink.port),
    )
    with server:
        for user in server.users:
            server.seed(user, realservers.SEED_MESSAGE)
        yield server


@pytest.fixture(scope="session")
def postfix(tmp_path_factory, certs, dovecot, smtp_sink):
    """Private Postfix relaying everything to ``smtp_sink``; SASL (submission, SMTPS)
    checks the ``dovecot`` fixture's users. Ports: ``submission_port``, ``smtps_port``,
    ``plain_port``."""
    realservers.require_or_skip(realservers.Postfix.TOOLS)
    server = realservers.Postfix(
        tmp_path_factory.mktemp("postfix"),
        certs,
        dovecot_auth_socket=dovecot.auth_socket,
        relay=(smtp_sink.host, smtp_sink.port),
    )
    with server:
        yield server


@pytest.fixture(scope="session")
def microsocks():
    """microsocks SOCKS5 proxy without authentication (``host``, ``port``)."""
    realservers.require_or_skip(realservers.Microsocks.TOOLS)
    with realservers.Microsocks() as proxy:
        yield proxy
