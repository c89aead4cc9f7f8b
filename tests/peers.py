"""Real SMTP destination servers ("sinks") for end-to-end tests.

One class, :class:`Sink`, with a ``kind`` option:

``"starttls"``
    Advertises STARTTLS and completes the handshake with a certificate issued by a
    ``trustme.CA`` (``sink.ca``; shared process-wide by default, see :func:`default_ca`)
    for ``cert_names`` (default ``["localhost", "127.0.0.1"]`` plus the bound host when
    it is an other address).  ``cert="selfsigned"`` serves a self-signed certificate
    that is *not* from the test CA instead (same names).
``"plain"``
    Does not advertise STARTTLS; a STARTTLS command is refused with ``502 5.5.1``.
``"broken"``
    Advertises STARTTLS, answers ``220 2.0.0 Ready to start TLS``, then writes bytes
    that are not a TLS record and closes the connection.  A client that reconnects and
    stays in clear is served normally.

``extensions`` adds EHLO keywords to any kind, e.g. ``extensions=("REQUIRETLS",)``.  A sink
that advertises REQUIRETLS (RFC 8689) accepts the ``REQUIRETLS`` MAIL parameter, in clear too
(a misbehaving peer is a legitimate test subject), and keeps it in ``Message.mail_options``;
one that does not refuses it with ``555 5.5.4``, as a real server would.  Every MAIL command
is recorded in ``sink.mail_commands`` (:class:`MailCommand`), whatever the reply.

Every kind runs a real aiosmtpd ``SMTP`` protocol on a loopback socket, in its own
thread with its own event loop.  Everything the sink records is guarded by one
``threading.Condition``; read it from the test thread through the properties and use
:meth:`Sink.wait_for` / :meth:`Sink.wait_messages` (deadline-based, no fixed sleeps).

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
import dataclasses
import datetime
import functools
import ipaddress
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, NamedTuple

import trustme
from aiosmtpd.smtp import SMTP, Envelope, Session, TLSSetupException

__all__ = ["KINDS", "MailCommand", "Message", "Sink", "default_ca", "selfsigned_cert_pem"]

Kind = Literal["starttls", "plain", "broken"]
KINDS: tuple[str, ...] = ("starttls", "plain", "broken")

RcptReplies = Mapping[str, str] | Callable[[str], str | None]
DataReply = str | Callable[["Message"], str | None]

#: Bytes the "broken" sink sends instead of a TLS ServerHello (not a TLS record).
BROKEN_TLS_GARBAGE = b"this is not a TLS ServerHello\r\n" * 4

_EHLO_KEEP = ("SIZE", "8BITMIME", "SMTPUTF8")
REQUIRETLS = "REQUIRETLS"  # RFC 8689 EHLO keyword and MAIL parameter


@functools.cache
def default_ca() -> trustme.CA:
    """Process-wide test CA shared by all sinks unless one is passed explicitly."""
    return trustme.CA(organization_name="tlsrelay test CA")


def selfsigned_cert_pem(names: Iterable[str]) -> tuple[bytes, bytes]:
    """A self-signed (not CA-issued) certificate for *names*: ``(cert_pem, key_pem)``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    names = list(names)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


@dataclasses.dataclass(frozen=True)
class Message:
    """One DATA transaction received by a sink."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes  # raw bytes after dot-unstuffing (envelope.original_content)
    tls: str | None  # None in clear, else e.g. "TLSv1.3"
    cipher: str | None  # cipher name, e.g. "TLS_AES_256_GCM_SHA384"
    peer: Any  # client address as given by the socket (host, port[, ...])
    mail_options: list[str]
    rcpt_options: list[str]
    smtp_utf8: bool
    helo: str | None  # EHLO/HELO name the client sent
    connection: int  # 1-based ordinal of the connection on this sink
    reply: str  # reply the sink sent for the DATA command


class MailCommand(NamedTuple):
    """One MAIL command a sink received, whatever it answered (also when no DATA followed).

    A plain tuple ``(mail_from, options, tls)``, so it compares equal to one.
    """

    mail_from: str  # the reverse-path ("<>" for the null one), or the raw argument if unparsable
    options: list[str]  # MAIL parameters as sent, upper-cased (aiosmtpd's view), in order
    tls: str | None  # None in clear, else e.g. "TLSv1.3"


def _is_positive(reply: str) -> bool:
    return reply[:1] == "2"


def _keyword(text: str) -> str:
    """The keyword of an EHLO line or of a MAIL parameter (``KEY`` of ``KEY=value``), upper."""
    return text.split(" ", 1)[0].partition("=")[0].upper()


class _SinkSMTP(SMTP):
    """aiosmtpd protocol with per-kind STARTTLS behaviour and recording."""

    def __init__(self, sink: Sink, **kwargs: Any) -> None:
        self._sink = sink
        self.conn_no = 0
        self.tls_version: str | None = None
        self.tls_cipher: str | None = None
        # Set while a MAIL command is processed, for _SinkHandler.handle_MAIL: the parameters
        # as sent, and the REQUIRETLS ones taken out before aiosmtpd (which refuses them) saw it.
        self.mail_options: list[str] = []
        self.mail_requiretls: list[str] = []
        super().__init__(_SinkHandler(sink), **kwargs)

    # connection bookkeeping -------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        is_tls_upgrade = self._original_transport is not None
        if not is_tls_upgrade:
            self.conn_no = self._sink._on_connect(self)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        try:
            super().connection_lost(error)
        finally:
            self._sink._on_disconnect(self)

    def _abort(self) -> None:
        for transport in (self.transport, self._original_transport):
            if isinstance(transport, asyncio.Transport) and not transport.is_closing():
                transport.abort()

    async def push(self, status: str | bytes) -> None:
        # aiosmtpd answers unknown MAIL/RCPT parameters with a bare 555; add the RFC 3463 code.
        if isinstance(status, str) and status.startswith("555 ") and not status[4:5].isdigit():
            status = "555 5.5.4 " + status[4:]
        await super().push(status)

    # commands ---------------------------------------------------------------
    async def smtp_MAIL(self, arg: str | None) -> None:
        if self._tls_protocol is None:
            self._sink._bump("cleartext_transactions")
        mail_from, path, options = self._parse_mail(arg)
        self._sink._record_mail(MailCommand(mail_from, list(options), self.tls_version))
        requiretls = [o for o in options if _keyword(o) == REQUIRETLS]
        if requiretls and self._sink.advertises(REQUIRETLS) and path is not None:
            # aiosmtpd does not know REQUIRETLS (555): hand it the command without it.
            kept = [o for o in options if _keyword(o) != REQUIRETLS]
            arg = " ".join(["FROM:" + path, *kept])
        else:
            requiretls = []
        self.mail_options, self.mail_requiretls = options, requiretls
        try:
            await super().smtp_MAIL(arg)
        finally:
            self.mail_options, self.mail_requiretls = [], []

    def _parse_mail(self, arg: str | None) -> tuple[str, str | None, list[str]]:
        """``(mail_from, path, options)`` of a MAIL argument, parsed the way aiosmtpd does.

        ``path`` is the reverse-path as written (None when aiosmtpd will refuse the command
        anyway); ``options`` are the parameters, upper-cased.
        """
        rest = self._strip_command_keyword("FROM:", arg or "")
        if rest is None:
            return arg or "", None, []
        address, params = self._getaddr(rest)
        if not address or params is None:
            return rest, None, []
        path = rest[: len(rest) - len(params)].rstrip()
        return address, path, params.upper().split()

    async def smtp_STARTTLS(self, arg: str) -> None:
        if arg:
            await self.push("501 5.5.4 Syntax: STARTTLS")
            return
        self._sink._bump("starttls_attempts")
        kind = self._sink.kind
        if kind == "plain":
            await self.push("502 5.5.1 STARTTLS not supported")
            return
        if self._tls_protocol is not None:
            await self.push("503 5.5.1 TLS already active")
            return
        if kind == "broken":
            await self._broken_starttls()
            return
        try:
            await super().smtp_STARTTLS(arg)
        except Exception:
            self._sink._bump("tls_handshakes_failed")
            raise
        assert self.transport is not None
        ssl_object = self.transport.get_extra_info("ssl_object")
        self.tls_version = ssl_object.version()
        cipher = ssl_object.cipher()
        self.tls_cipher = cipher[0] if cipher else None
        self._sink._bump("tls_handshakes_ok")

    async def _broken_starttls(self) -> None:
        await self.push("220 2.0.0 Ready to start TLS")
        # Consume the ClientHello first so that closing does not turn into a TCP RST
        # that could race the garbage; then answer with something that is not TLS.
        with contextlib.suppress(TimeoutError, ConnectionError):
            await asyncio.wait_for(self._reader.read(65536), timeout=5)
        assert isinstance(self.transport, asyncio.Transport)
        self.transport.write(BROKEN_TLS_GARBAGE)
        self.transport.close()
        self._sink._bump("tls_handshakes_failed")


class _SinkHandler:
    """aiosmtpd handler hooks: EHLO capabilities, reply scripting, recording."""

    def __init__(self, sink: Sink) -> None:
        self._sink = sink

    async def handle_EHLO(
        self,
        server: _SinkSMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        caps = [r for r in responses[1:-1] if r[4:].split(" ")[0].upper() in _EHLO_KEEP]
        caps.append("250-PIPELINING")
        if self._sink.kind in ("starttls", "broken") and server._tls_protocol is None:
            caps.append("250-STARTTLS")
        caps.extend(f"250-{extension}" for extension in self._sink.extensions)
        return [responses[0], *caps, "250 HELP"]

    async def handle_MAIL(
        self,
        server: _SinkSMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        # Reached only once aiosmtpd accepted the command (minus a REQUIRETLS it cannot parse).
        if server.mail_requiretls and server.mail_requiretls != [REQUIRETLS]:
            return "501 5.5.4 REQUIRETLS takes no value and is given once"
        envelope.mail_from = address
        envelope.mail_options.extend(server.mail_options)  # as sent, REQUIRETLS included
        return "250 OK"  # aiosmtpd's own reply without a hook

    async def handle_RCPT(
        self,
        server: _SinkSMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        reply = self._sink._rcpt_reply(address)
        if reply is None or _is_positive(reply):
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
            return reply or "250 2.1.5 OK"
        return reply

    async def handle_exception(self, error: Exception) -> str:
        # A failed STARTTLS handshake is an expected event in these tests: record it
        # instead of letting aiosmtpd log a traceback (the connection is closed anyway).
        if isinstance(error, TLSSetupException) and error.__cause__ is not None:
            error = error.__cause__  # type: ignore[assignment]
        self._sink._record_error(f"{type(error).__name__}: {error}")
        return f"451 4.3.0 sink error: {type(error).__name__}"

    async def handle_DATA(self, server: _SinkSMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content
        if raw is None:
            content = envelope.content or b""
            raw = (
                content.encode("utf-8", "surrogateescape") if isinstance(content, str) else content
            )
        msg = Message(
            mail_from=envelope.mail_from or "",
            rcpt_tos=list(envelope.rcpt_tos),
            data=bytes(raw),
            tls=server.tls_version,
            cipher=server.tls_cipher,
            peer=session.peer,
            mail_options=list(envelope.mail_options),
            rcpt_options=list(envelope.rcpt_options),
            smtp_utf8=bool(envelope.smtp_utf8),
            helo=session.host_name,
            connection=server.conn_no,
            reply="",
        )
        reply = self._sink._data_reply(msg) or "250 2.0.0 OK queued"
        self._sink._record(dataclasses.replace(msg, reply=reply))
        return reply


def _counter(name: str) -> Any:
    def get(self: Sink) -> int:
        with self._cond:
            return self._counters[name]

    return property(get, doc=f"Number of {name.replace('_', ' ')} (thread-safe).")


class Sink:
    """A real SMTP server on loopback that records what it receives.

    :param kind: ``"starttls"`` | ``"plain"`` | ``"broken"`` (see module docstring).
    :param host: address to bind (``"127.0.0.1"``, ``"127.0.0.3"``, ``"::1"``, ...).
    :param port: port to bind; 0 picks a free one (read ``.port`` after start).
    :param ca: ``trustme.CA`` issuing the certificate; default :func:`default_ca`.
    :param cert: ``"ca"`` (issued by ``ca``) or ``"selfsigned"`` (not from ``ca``).
    :param cert_names: SAN names/IPs of the served certificate.
    :param rcpt_replies: mapping of recipient (case-insensitive) -> reply, or a callable
        ``(address) -> reply | None``; None / unlisted accepts with 250.
    :param data_reply: reply for DATA, or callable ``(Message) -> reply | None``.
        Messages answered 2xx go to ``messages``, others to ``rejected``.
    :param hostname: name in the greeting / EHLO reply.
    :param min_tls_version / max_tls_version: restrict the server's TLS versions.
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
        cert: Literal["ca", "selfsigned"] = "ca",
        cert_names: Iterable[str] | None = None,
        rcpt_replies: RcptReplies | None = None,
        data_reply: DataReply | None = None,
        hostname: str | None = None,
        min_tls_version: ssl.TLSVersion | None = None,
        max_tls_version: ssl.TLSVersion | None = None,
        extensions: Iterable[str] = (),
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown sink kind {kind!r}; expected one of {KINDS}")
        if cert not in ("ca", "selfsigned"):
            raise ValueError(f"cert must be 'ca' or 'selfsigned', not {cert!r}")
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
            ),
            0,
        )
        self._live: set[_SinkSMTP] = set()
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
            self._tls_context = self._make_tls_context()
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

    def __enter__(self) -> Sink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

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
        return any(_keyword(extension) == keyword.upper() for extension in self.extensions)

    connections = _counter("connections")
    closed_connections = _counter("closed_connections")
    starttls_attempts = _counter("starttls_attempts")
    tls_handshakes_ok = _counter("tls_handshakes_ok")
    tls_handshakes_failed = _counter("tls_handshakes_failed")
    cleartext_transactions = _counter("cleartext_transactions")

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
    def _bump(self, name: str) -> None:
        with self._cond:
            self._counters[name] += 1
            self._cond.notify_all()

    def _on_connect(self, proto: _SinkSMTP) -> int:
        with self._cond:
            self._live.add(proto)
            self._counters["connections"] += 1
            self._cond.notify_all()
            return self._counters["connections"]

    def _on_disconnect(self, proto: _SinkSMTP) -> None:
        with self._cond:
            if proto in self._live:
                self._live.discard(proto)
                self._counters["closed_connections"] += 1
                self._cond.notify_all()

    def _record(self, msg: Message) -> None:
        with self._cond:
            (self._messages if _is_positive(msg.reply) else self._rejected).append(msg)
            self._cond.notify_all()

    def _record_mail(self, command: MailCommand) -> None:
        with self._cond:
            self._mail_commands.append(command)
            self._cond.notify_all()

    def _record_error(self, text: str) -> None:
        with self._cond:
            self._errors.append(text)
            self._cond.notify_all()

    def _rcpt_reply(self, address: str) -> str | None:
        spec = self._rcpt_replies
        if spec is None:
            return None
        if callable(spec):
            return spec(address)
        lowered = {k.lower(): v for k, v in spec.items()}
        return lowered.get(address.lower())

    def _data_reply(self, msg: Message) -> str | None:
        spec = self._data_reply_spec
        if spec is None or isinstance(spec, str):
            return spec
        return spec(msg)

    # internals ----------------------------------------------------------------
    def _make_tls_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        if self._min_tls is not None:
            ctx.minimum_version = self._min_tls
        if self._max_tls is not None:
            ctx.maximum_version = self._max_tls
        if self.cert == "selfsigned":
            cert_pem, key_pem = selfsigned_cert_pem(self.cert_names)
            ctx.load_cert_chain(*_pem_files(cert_pem, key_pem))
        else:
            self.ca.issue_cert(*self.cert_names).configure_cert(ctx)
        return ctx

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

        def factory() -> _SinkSMTP:
            return _SinkSMTP(
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
                proto._abort()
            await server.wait_closed()
            # Let the connection_lost() callbacks scheduled by abort() run.
            for _ in range(100):
                with self._cond:
                    if not self._live:
                        break
                await asyncio.sleep(0)


def _pem_files(cert_pem: bytes, key_pem: bytes) -> tuple[str, str]:
    """load_cert_chain() needs files: write both PEMs to a private temp dir."""
    import atexit
    import shutil
    import tempfile

    tmp = tempfile.mkdtemp(prefix="sink-cert-")
    atexit.register(shutil.rmtree, tmp, True)
    cert_path, key_path = f"{tmp}/cert.pem", f"{tmp}/key.pem"
    with open(cert_path, "wb") as f:
        f.write(cert_pem)
    with open(key_path, "wb") as f:
        f.write(key_pem)
    return cert_path, key_path
