"""A real HTTPS server on loopback that publishes MTA-STS policies (RFC 8461 §3.3) for tests.

    with PolicyServer(ca) as web:
        web.publish("a.test", "version: STSv1\\nmode: enforce\\nmx: mx.a.test\\nmax_age: 86400\\n")
        ... fetch https://mta-sts.a.test:<web.port>/.well-known/mta-sts.txt (DNS: 127.0.0.1) ...

Each ``mta-sts.<domain>`` name gets its own certificate from the given ``trustme.CA``, chosen
by SNI (``publish(..., bad_cert=True)`` serves one for another name instead). Per domain the
answer may be changed while the server runs: the body, the status (e.g. 500, or 301 with a
``Location``), the media type and chunked transfer encoding. ``requests(domain)`` counts the GETs
each domain received. TLS is handshaken in the per-connection thread, so a stalled client holds
up nobody else. :meth:`PolicyServer.stop` shuts down, closes the socket and joins the thread.
"""

from __future__ import annotations

import ssl
import tempfile
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import trustme

from tests.background import Background


@dataclass
class Answer:
    body: str
    status: int = 200
    content_type: str = "text/plain"
    chunked: bool = False
    bad_cert: bool = False
    location: str | None = None


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        host = (self.headers.get("Host") or "").split(":")[0].lower()
        domain = host.removeprefix("mta-sts.")
        owner = self.server.owner
        answer = owner.answer_for(domain, self.path)
        payload = answer.body.encode() if answer else b"not found\n"
        self.send_response(answer.status if answer else 404)
        self.send_header("Content-Type", answer.content_type if answer else "text/plain")
        if answer and answer.location:
            self.send_header("Location", answer.location)
        self.send_header("Connection", "close")
        if answer and answer.chunked:
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(0, len(payload), 7):
                piece = payload[i : i + 7]
                self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        else:
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: PolicyServer

    def finish_request(self, request: Any, client_address: Any) -> None:
        try:
            tls = self.owner.context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            return  # a client that rejected our certificate: nothing more to say
        try:
            super().finish_request(tls, client_address)
        finally:
            tls.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client hanging up mid-answer is not the test's business


class PolicyServer(Background):
    """Policies by domain, served at ``https://mta-sts.<domain>:<port>/.well-known/...``."""

    def __init__(self, ca: trustme.CA, address: str = "127.0.0.1") -> None:
        self.ca = ca
        self.address = address
        self.port = 0
        self._lock = threading.Lock()
        self._answers: dict[str, Answer] = {}
        self._counts: dict[str, int] = {}
        self._contexts: dict[str, ssl.SSLContext] = {}
        self._tmp = tempfile.TemporaryDirectory()
        self.context = self._context_for("localhost")
        self.context.sni_callback = self._sni
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def publish(self, domain: str, body: str, **options: Any) -> None:
        """Serve ``body`` (or another answer, see :class:`Answer`) for ``domain``."""
        with self._lock:
            self._answers[domain.lower()] = Answer(body, **options)

    def withdraw(self, domain: str) -> None:
        with self._lock:
            self._answers.pop(domain.lower(), None)

    def requests(self, domain: str) -> int:
        with self._lock:
            return self._counts.get(domain.lower(), 0)

    def answer_for(self, domain: str, path: str) -> Answer | None:
        with self._lock:
            self._counts[domain] = self._counts.get(domain, 0) + 1
            return self._answers.get(domain) if path == "/.well-known/mta-sts.txt" else None

    def _sni(self, sock: ssl.SSLObject, name: str | None, _: ssl.SSLContext) -> None:
        domain = (name or "").lower().removeprefix("mta-sts.")
        with self._lock:
            answer = self._answers.get(domain)
        wanted = "wrong.invalid" if answer and answer.bad_cert else (name or "localhost")
        sock.context = self._context_for(wanted)

    def _context_for(self, name: str) -> ssl.SSLContext:
        with self._lock:
            if name not in self._contexts:
                context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                cert = self.ca.issue_cert(name)
                path = Path(self._tmp.name) / f"{name}.pem"
                cert.private_key_and_cert_chain_pem.write_to_path(str(path))
                context.load_cert_chain(str(path))
                self._contexts[name] = context
            return self._contexts[name]

    def start(self) -> PolicyServer:
        self._server = _Server((self.address, 0), _Handler)
        self._server.owner = self
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"PolicyServer-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
            self._server.server_close()
        self._server, self._thread = None, None
        self._tmp.cleanup()
