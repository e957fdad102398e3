"""Helpers shared by the whole test tree (tests/ is on sys.path: ``from support import ...``).
Use them rather than writing another copy in a test module:

- ``reactor``: the global reactor in a daemon thread, ``in_reactor``, ``wait_for`` (poll
  for a condition), ``holds`` (poll that something does not happen).
- ``skips``: the one skip rule (skip by hand, fail in CI with MAILGW_REQUIRE_SERVERS=1).
- ``wire``: what a sans-IO machine returns (``sent``, ``to_app``, ``failure``,
  ``feed_bytewise``, ``started``, ``xoauth2``).
- ``machines``: hostile-input properties of every machine (CI and ``tests.fuzz``).
- ``inmemory``: the gateway on in-memory transports and a Clock (session, pool, reports).
- ``destinations``: BTP MAIL destinations (``mail``, ``plain``).
- ``clients``: raw-socket reads, IMAP conversations, imaplib/poplib readers, HTTP, curl.
- ``gatewayprocess``: a real ``twistd -n mailgw`` (``Twistd``, ``GatewayProcess``).
- ``httpserver``: the plumbing of the fake HTTP services (Kubernetes API, destination service).
- ``socks``: what a SOCKS5 client makes of each failure reply.
- ``secretscan``: every shape of a secret, searched for in logs, replies and pages.
"""
