"""A fast-enough SMTP sink for benchmarks: aiosmtpd, AUTH PLAIN/LOGIN for one user, data discarded.

    python bench/smtp_sink.py PORT USER PASSWORD
"""

import sys
import time

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword


class Discard:
    async def handle_DATA(self, server, session, envelope):
        return "250 OK discarded %d bytes" % len(envelope.original_content or b"")


def main():
    port, user, password = int(sys.argv[1]), sys.argv[2].encode(), sys.argv[3].encode()

    def authenticate(server, session, envelope, mechanism, data):
        ok = isinstance(data, LoginPassword) and data.login == user and data.password == password
        return AuthResult(success=ok, handled=False)

    controller = Controller(
        Discard(), hostname="127.0.0.1", port=port, authenticator=authenticate,
        auth_require_tls=False, auth_required=True, data_size_limit=1 << 30, decode_data=False,
    )
    controller.start()
    print("ready", flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        controller.stop()


if __name__ == "__main__":
    main()
