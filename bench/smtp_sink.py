"""The bench's SMTP server, in a process of its own: ``tests/realservers.py``'s aiosmtpd sink.

    python3 bench/smtp_sink.py PORT USER PASSWORD

AUTH PLAIN/LOGIN for one user (optional for clients: the set-up loop only says EHLO and
QUIT), messages discarded instead of kept (the bench sends tens of megabytes). Its own
process so that the bench's client threads do not share a GIL with the server. Prints
``ready`` once it accepts.
"""

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import realservers  # noqa: E402


class DiscardingSink(realservers.SMTPSink):
    """Accepts every message and keeps none."""

    async def handle_DATA(self, server, session, envelope):
        return "250 OK"


def main():
    port, user, password = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    # A large backlog: the memory section opens a thousand sessions at once, and the
    # gateway (backlog 1024) connects upstream for each.
    sink = DiscardingSink(auth={user: password}, auth_required=False, port=port, data_size_limit=1 << 30, backlog=4096)
    sink.start()
    print("ready", flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        sink.stop()


if __name__ == "__main__":
    main()
