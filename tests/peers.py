"""Real SMTP destination servers ("sinks") for end-to-end tests.

One class, :class:`Sink`, with a ``kind`` option:

``"starttls"``
    Advertises STARTTLS and completes the handshake with a certificate issued by a
    ``trustme.CA`` (``sink.ca``; shared process-wide by default, see
    :func:`tests.certs.default_ca`) for ``cert_names`` (default ``["localhost", "127.0.0.1"]``
    plus the bound host when it is an other address).  ``cert="selfsigned"`` serves a
    self-signed certificate that is *not* from the test CA instead (same names);
    ``cert="expired"`` one from the test CA whose validity ended a month ago.
``"plain"``
    Does not advertise STARTTLS; a STARTTLS command is refused with ``502 5.5.1``.
``"broken"``
    Advertises STARTTLS, answers ``220 2.0.0 Ready to start TLS``, then writes bytes
    that are not a TLS record and closes the connection.  A client that reconnects and
    stays in clear is served normally.

``extensions`` adds EHLO keywords to any kind, e.g. ``extensions=("REQUIRETLS",)``; with
``"CHUNKING"`` the sink also takes RFC 3030 ``BDAT`` (``SinkSMTP.smtp_BDAT``).  A sink
that advertises REQUIRETLS (RFC 8689) accepts the ``REQUIRETLS`` MAIL parameter, in clear too
(a misbehaving peer is a legitimate test subject), and keeps it in ``Message.mail_options``;
one that does not refuses it with ``555 5.5.4``, as a real server would.  Every MAIL command
is recorded in ``sink.mail_commands`` (:class:`tests.sinksmtp.MailCommand`), whatever the
reply.

Every kind runs a real aiosmtpd ``SMTP`` protocol (:mod:`tests.sinksmtp`) on a loopback
socket, in its own thread with its own event loop; certificates come from :mod:`tests.certs`.
Everything the sink records is guarded by one ``threading.Condition``; read it from the test
thread through the properties and use :meth:`Sink.wait_for` / :meth:`Sink.wait_messages`
(deadline-based, no fixed sleeps).

Usage::

    with Sink(kind="starttls") as sink:
        sink.ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
        ...  # deliver to ("127.0.0.1", sink.port)
        (msg,) = sink.wait_messages(1)
        assert msg.tls == "TLSv1.3"
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import smtplib
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tests.background import Background
from tests.certs import default_ca, server_context
from tests.sinksmtp import MailCommand, Message, SinkSMTP, is_positive, keyword_of

__all__ = ["KINDS", "Sink", "served_key_digest"]

Kind = Literal["starttls", "plain", "broken"]
KINDS: tuple[str, ...] = ("starttls", "plain", "broken")

RcptReplies = Mapping[str, str] | Callable[[str], str | None]
DataReply = str | Callable[[Message], str | None]


def _counter(name: str) -> Any:
    def get(self: Sink) -> int:
        with self._cond:
            return self._counters[name]

    return property(get, doc=f"Number of {name.replace('_', ' ')} (thread-safe).")


class Sink(Background):
    """A real SMTP server on loopback that records what it receives.

    :param kind: ``"starttls"`` | ``"plain"`` | ``"broken"`` (see module docstring).
    :param host: address to bind (``"127.0.0.1"``, ``"127.0.0.3"``, ``"::1"``, ...).
    :param port: port to bind; 0 picks a free one (read ``.port`` after start).
    :param ca: ``trustme.CA`` issuing the certificate; default :func:`default_ca`.
    :param cert: ``"ca"`` (issued by ``ca``), ``"selfsigned"`` (not from ``ca``) or
        ``"expired"`` (issued by ``ca``, validity over).
    :param cert_names: SAN names/IPs of the served certificate.
    :param rcpt_replies: mapping of recipient (case-insensitive) -> reply, or a callable
        ``(address) -> reply | None``; None / unlisted accepts with 250.
    :param data_reply: reply for DATA, or callable ``(Message) -> reply | None``.
        Messages answered 2xx go to ``messages``, others to ``rejected``.
    :param slow_for: ``(Message) -> seconds``: a further delay of the reply to the final dot of
        that message (e.g. one peer session that hangs while the others go on).
    :param data_delay: seconds the reply to the final dot takes (without blocking the sink's
        other sessions); the message is recorded when the reply is sent.
    :param mail_delay: seconds the reply to MAIL takes (without blocking other sessions);
        ``mail_busy_peak`` counts the MAIL commands waiting for it at once.
    :param hostname: name in the greeting / EHLO reply.
    :param min_tls_version / max_tls_version: restrict the server's TLS versions.
    :param greeting: ``(connection number) -> reply | None``: a reply instead of the 220
        greeting (the connection is then closed), e.g. ``421 4.7.0 Too many connections``.
    :param extensions: extra EHLO keywords (lines) to advertise, in clear and over TLS, e.g.
        ``("REQUIRETLS",)``; advertising REQUIRETLS makes the sink accept that MAIL parameter.
    """

    def __init__(
        self,
        kind: Kind = "starttls",
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        ca: trustme.CA | None = None,
        cert: Literal["ca", "selfsigned", "expired"] = "ca",
        cert_names: Iterable[str] | None = None,
        rcpt_replies: RcptReplies | None = None,
        data_reply: DataReply | None = None,
        data_delay: float = 0.0,
        slow_for: Callable[[Message], float] | None = None,
        mail_delay: float = 0.0,
        hostname: str | None = None,
        min_tls_version: ssl.TLSVersion | None = None,
        max_tls_version: ssl.TLSVersion | None = None,
        extensions: Iterable[str] = (),
        greeting: Callable[[int], str | None] | None = None,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown sink kind {kind!r}; expected one of {KINDS}")
        if cert not in ("ca", "selfsigned", "expired"):
            raise ValueError(f"cert must be 'ca', 'selfsigned' or 'expired', not {cert!r}")
        self.kind: str = kind
        self.host = host
        self.port = port
        self.ca: trustme.CA = ca if ca is not None else default_ca()
        self.cert = cert
        if cert_names is None:
            names = ["localhost", "127.0.0.1"]
            if host not in names and host not in ("", "0.0.0.0", "::"):
                names.append(host)
        else:
            names = list(cert_names)
        self.cert_names: list[str] = names
        self.hostname = hostname or f"{kind}-sink.test"
        self._rcpt_replies = rcpt_replies
        self._data_reply_spec = data_reply
        self.data_delay = data_delay
        self._slow_for = slow_for
        self._busy = 0  # transactions between the final dot and its reply
        self.busy_peak = 0  # the most of them at once: deliveries in flight here
        self.mail_delay = mail_delay
        self._mail_busy = 0  # MAIL commands not answered yet
        self.mail_busy_peak = 0  # the most of them at once: transactions begun together
        self._min_tls = min_tls_version
        self._max_tls = max_tls_version
        if isinstance(extensions, str):
            raise TypeError("extensions must be an iterable of keywords, not one string")
        self.extensions: tuple[str, ...] = tuple(extensions)
        for extension in self.extensions:
            if not extension.strip() or any(c in extension for c in "\r\n\0"):
                raise ValueError(f"not an EHLO keyword line: {extension!r}")

        self._cond = threading.Condition(threading.RLock())
        self._messages: list[Message] = []
        self._rejected: list[Message] = []
        self._errors: list[str] = []
        self._mail_commands: list[MailCommand] = []
        self._counters = dict.fromkeys(
            (
                "connections",
                "closed_connections",
                "starttls_attempts",
                "tls_handshakes_ok",
                "tls_handshakes_failed",
                "cleartext_transactions",
                "data_commands",
                "bdat_commands",
            ),
            0,
        )
        self._live: set[SinkSMTP] = set()
        self._peak = 0  # the most connections open at once
        self._greeting = greeting
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._started = threading.Event()
        self._startup_error: BaseException | None = None
        self._tls_context: ssl.SSLContext | None = None

    # lifecycle ----------------------------------------------------------------
    def start(self) -> Sink:
        if self._thread is not None:
            raise RuntimeError("sink already started")
        # A stopped sink may be started again; it re-binds the same port.
        self._started.clear()
        self._startup_error = None
        if self.kind == "starttls":
            issuer = None if self.cert == "selfsigned" else self.ca
            self._tls_context = server_context(
                self.cert_names, issuer, self._min_tls, self._max_tls, self.cert == "expired"
            )
        self._thread = threading.Thread(
            target=self._run, name=f"sink-{self.kind}-{self.host}", daemon=True
        )
        self._thread.start()
        if not self._started.wait(timeout=10):
            raise RuntimeError(f"{self!r} did not start within 10 s")
        if self._startup_error is not None:
            self._thread.join(timeout=10)
            self._thread = None
            raise self._startup_error
        return self

    def stop(self) -> None:
        thread, loop, stop_event = self._thread, self._loop, self._stop_event
        if thread is None:
            return
        if loop is not None and stop_event is not None and thread.is_alive():
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(stop_event.set)
        thread.join(timeout=10)
        if thread.is_alive():
            raise RuntimeError(f"{self!r} thread did not stop within 10 s")
        self._thread = None
        self._loop = None
        self._stop_event = None

    def __repr__(self) -> str:
        return f"<Sink kind={self.kind} {self.address_text}>"

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def address_text(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def write_ca_pem(self, path: Any) -> str:
        """Write the test CA certificate (PEM) to *path*; return the path as str."""
        self.ca.cert_pem.write_to_path(str(path))
        return str(path)

    # recorded state -----------------------------------------------------------
    @property
    def messages(self) -> list[Message]:
        with self._cond:
            return list(self._messages)

    @property
    def rejected(self) -> list[Message]:
        """DATA transactions answered with a non-2xx reply."""
        with self._cond:
            return list(self._rejected)

    @property
    def mail_commands(self) -> list[MailCommand]:
        """Every MAIL command received, in order, whatever the reply (thread-safe)."""
        with self._cond:
            return list(self._mail_commands)

    def advertises(self, keyword: str) -> bool:
        """Whether ``keyword`` is one of the extra ``extensions`` (case-insensitive)."""
        return any(keyword_of(extension) == keyword.upper() for extension in self.extensions)

    connections = _counter("connections")
    closed_connections = _counter("closed_connections")
    starttls_attempts = _counter("starttls_attempts")
    tls_handshakes_ok = _counter("tls_handshakes_ok")
    tls_handshakes_failed = _counter("tls_handshakes_failed")
    cleartext_transactions = _counter("cleartext_transactions")
    data_commands = _counter("data_commands")
    bdat_commands = _counter("bdat_commands")  # RFC 3030, with extensions=("CHUNKING",)

    @property
    def errors(self) -> list[str]:
        """Exceptions raised inside SMTP sessions, e.g. failed TLS handshakes."""
        with self._cond:
            return list(self._errors)

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {**self._counters, "messages": len(self._messages)}

    def summary(self) -> str:
        with self._cond:
            lines = [f"{self!r} counters={self.stats()}"]
            lines.extend(
                f"  MAIL: from={c.mail_from!r} options={c.options!r} tls={c.tls}"
                for c in self._mail_commands
            )
            for label, msgs in (("message", self._messages), ("rejected", self._rejected)):
                for m in msgs:
                    lines.append(
                        f"  {label}: from={m.mail_from!r} to={m.rcpt_tos!r} tls={m.tls} "
                        f"conn={m.connection} reply={m.reply!r} bytes={len(m.data)}"
                    )
            lines.extend(f"  error: {e}" for e in self._errors)
            return "\n".join(lines)

    def wait_for(
        self, predicate: Callable[[], object], timeout: float = 10.0, what: str = ""
    ) -> None:
        """Wait until ``predicate()`` is true (re-checked on every recorded event)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    desc = what or getattr(predicate, "__name__", "predicate")
                    raise AssertionError(
                        f"timed out after {timeout:.1f}s waiting for {desc}\n{self.summary()}"
                    )
                self._cond.wait(remaining)

    def wait_messages(self, n: int = 1, timeout: float = 10.0) -> list[Message]:
        """Wait until at least *n* messages were accepted; return all of them."""
        self.wait_for(lambda: len(self._messages) >= n, timeout, what=f"{n} accepted message(s)")
        return self.messages

    # called from the sink thread ----------------------------------------------
    def bump(self, name: str) -> None:
        with self._cond:
            self._counters[name] += 1
            self._cond.notify_all()

    def on_connect(self, proto: SinkSMTP) -> int:
        with self._cond:
            self._live.add(proto)
            self._peak = max(self._peak, len(self._live))
            self._counters["connections"] += 1
            self._cond.notify_all()
            return self._counters["connections"]

    def greeting(self, conn_no: int) -> str | None:
        return self._greeting(conn_no) if self._greeting is not None else None

    @property
    def peak_connections(self) -> int:
        """The most connections that were open at the same time (thread-safe)."""
        with self._cond:
            return self._peak

    @property
    def open_connections(self) -> int:
        with self._cond:
            return len(self._live)

    def on_disconnect(self, proto: SinkSMTP) -> None:
        with self._cond:
            if proto in self._live:
                self._live.discard(proto)
                self._counters["closed_connections"] += 1
                self._cond.notify_all()

    def record(self, msg: Message) -> None:
        with self._cond:
            (self._messages if is_positive(msg.reply) else self._rejected).append(msg)
            self._cond.notify_all()

    def record_mail(self, command: MailCommand) -> None:
        with self._cond:
            self._mail_commands.append(command)
            self._cond.notify_all()

    def record_error(self, text: str) -> None:
        with self._cond:
            self._errors.append(text)
            self._cond.notify_all()

    def rcpt_reply(self, address: str) -> str | None:
        spec = self._rcpt_replies
        if spec is None:
            return None
        if callable(spec):
            return spec(address)
        lowered = {k.lower(): v for k, v in spec.items()}
        return lowered.get(address.lower())

    def mail_busy(self, step: int) -> None:
        """A MAIL command came (1) or its reply went (-1)."""
        with self._cond:
            self._mail_busy += step
            self.mail_busy_peak = max(self.mail_busy_peak, self._mail_busy)

    def busy(self, step: int) -> None:
        """A transaction's final dot came (1) or its reply went (-1)."""
        with self._cond:
            self._busy += step
            self.busy_peak = max(self.busy_peak, self._busy)

    def delay_for(self, msg: Message) -> float:
        """Seconds before the reply to the final dot of ``msg``."""
        return self.data_delay + (self._slow_for(msg) if self._slow_for is not None else 0.0)

    def data_reply(self, msg: Message) -> str | None:
        spec = self._data_reply_spec
        if spec is None or isinstance(spec, str):
            return spec
        return spec(msg)

    # internals ----------------------------------------------------------------
    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # surfaced by start()
            if not self._started.is_set():
                self._startup_error = exc
                self._started.set()
            else:
                raise

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._stop_event = asyncio.Event()

        def factory() -> SinkSMTP:
            return SinkSMTP(
                self,
                hostname=self.hostname,
                tls_context=self._tls_context,
                enable_SMTPUTF8=True,
                decode_data=False,
                loop=loop,
            )

        server = await loop.create_server(factory, host=self.host, port=self.port)
        try:
            self.port = server.sockets[0].getsockname()[1]
            self._started.set()
            await self._stop_event.wait()
        finally:
            server.close()
            with self._cond:
                live = list(self._live)
            for proto in live:
                proto.abort()
            await server.wait_closed()
            # Let the connection_lost() callbacks scheduled by abort() run.
            for _ in range(100):
                with self._cond:
                    if not self._live:
                        break
                await asyncio.sleep(0)


def served_key_digest(target: Sink) -> str:
    """SHA-256 of the public key (SPKI) a STARTTLS sink serves, read over a real STARTTLS
    session (no MAIL): the data of its DANE-EE ``3 1 1`` TLSA record."""
    with smtplib.SMTP(target.host, target.port, timeout=10) as client:
        client.starttls(context=ssl._create_unverified_context())
        assert isinstance(client.sock, ssl.SSLSocket)
        der = client.sock.getpeercert(binary_form=True)
    assert der is not None
    key = x509.load_der_x509_certificate(der).public_key()
    return hashlib.sha256(
        key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    ).hexdigest()
