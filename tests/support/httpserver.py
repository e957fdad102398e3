"""The plumbing of the tests' fake HTTP services (the Kubernetes API server, the
destination service): a threaded HTTP/1.1 server on 127.0.0.1 in a daemon thread, and
a request handler that speaks JSON.

    class Handler(JSONHandler):
        def do_GET(self):
            self.send_json(200, {"hello": self.service.name})

    class Fake(HTTPService):
        Handler = Handler

    with Fake() as fake:
        urllib.request.urlopen(fake.url + "/")
"""

from __future__ import annotations

import http.server
import json
import sys
import threading
from typing import Any


class QuietServer(http.server.ThreadingHTTPServer):
    """Clients that hang up (a stopped watch, a timed-out call) are normal here."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class JSONHandler(http.server.BaseHTTPRequestHandler):
    """A quiet HTTP/1.1 handler; ``service`` is the :class:`HTTPService` it serves."""

    protocol_version = "HTTP/1.1"
    # headers and body go out in two writes: without this, Nagle and delayed ACKs add
    # 40 ms to every request on a kept-alive connection
    disable_nagle_algorithm = True
    service: Any

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def send_json(self, code: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def body_bytes(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""


class HTTPService:
    """A fake service on 127.0.0.1 (a free port) served by ``Handler`` in a daemon
    thread; a context manager."""

    Handler: type[JSONHandler]
    thread_name = "fake-http-service"
    server: QuietServer | None = None

    def start(self):
        handler = type(self.Handler.__name__, (self.Handler,), {"service": self})
        self.server = QuietServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, name=self.thread_name, daemon=True
        )
        self.thread.start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self.server is not None, f"{type(self).__name__} is not running"
        return self.server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"
