"""Fuzz every sans-IO machine for a long time: ``python3 -m tests.fuzz --minutes 30``.

The same properties as tests/unit/test_machine_properties.py (tests/support/machines.py),
with many more examples: round after round over every machine until the time is up,
each round with fresh random inputs.  Prints how many examples each machine saw and
exits non-zero with hypothesis's falsifying example at the first failure.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from support import machines  # noqa: E402


def _upstream(family):
    @given(data=st.data())
    def test(data):
        machines.upstream_property(family, data.draw(machines.upstream_options()),
                                   data.draw(machines.segments(machines.SERVER_LINES[family])), data.draw(machines.CUTS))
    return test


def _app(family, lazy):
    @given(data=st.data())
    def test(data):
        machines.app_property(family, lazy, data.draw(machines.segments(machines.CLIENT_LINES[family])),
                              data.draw(machines.CUTS), data.draw(st.lists(st.sampled_from(["ok", "no", "later"]), max_size=6)))
    return test


def _socks():
    @given(options=machines.SOCKS_METHODS, data=machines.PROXY_BYTES, cuts=machines.CUTS)
    def test(options, data, cuts):
        machines.socks_property(options, data, cuts)
    return test


def _sasl():
    @given(mechanism=st.sampled_from(["PLAIN", "XOAUTH2", "OAUTHBEARER", "LOGIN"]), response=st.binary(max_size=400))
    def test(mechanism, response):
        machines.sasl_property(mechanism, response)
    return test


def properties():
    """(name, test) for every machine, decorated afresh for each round."""
    tests = []
    for family in machines.FAMILIES:
        tests.append((f"{family} upstream", _upstream(family)))
        for lazy in (False, True):
            tests.append((f"{family} application side ({'lazy' if lazy else 'eager'})", _app(family, lazy)))
    return tests + [("SOCKS5 client", _socks()), ("SASL decoders", _sasl())]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to fuzz (default 10)")
    parser.add_argument("--examples", type=int, default=2000, help="examples per machine per round (default 2000)")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.minutes * 60
    counts: dict[str, int] = {}
    run = settings(max_examples=args.examples, deadline=None, database=None, derandomize=False,
                   suppress_health_check=list(HealthCheck))
    rounds = 0
    while time.monotonic() < deadline:
        rounds += 1
        for name, test in properties():
            if time.monotonic() >= deadline:
                break
            started = time.monotonic()
            try:
                run(test)()
            except Exception:
                print(f"FAILED: {name} (round {rounds}); hypothesis printed the falsifying example above", file=sys.stderr)
                raise
            counts[name] = counts.get(name, 0) + args.examples
            print(f"round {rounds}: {name}: {args.examples} examples in {time.monotonic() - started:.1f}s", flush=True)
    print(f"\nno failure in {args.minutes:g} minutes:")
    for name, count in counts.items():
        print(f"  {name}: {count} examples")
    return 0


if __name__ == "__main__":
    sys.exit(main())
