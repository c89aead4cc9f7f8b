"""One SMTP client session to one address of one destination host (aiosmtplib).

``attempt(...)`` connects, says EHLO, follows :mod:`services.deliver.tls` for STARTTLS, and runs
one transaction for the given recipients. It never raises for anything the network or the peer
does: every outcome is an :class:`Attempt` — per-recipient replies when the transaction ran, or a
session-level ``error`` with ``next_host=True`` when the caller should try the next address
(connection refused, timeout, bad greeting, TLS required but not available, disconnect).

Clear text happens only where :func:`services.deliver.tls.after_starttls` or
:func:`~services.deliver.tls.wants_starttls` says so; a handshake failure in opportunistic mode
reconnects in clear and reports it through ``on_handshake_failed`` (the shared "TLS broken" memory).
The STARTTLS contexts (TLS 1.0 and old ciphers accepted where any TLS beats clear, modern
defaults where the certificate is verified or must match TLSA records) are
:mod:`services.deliver.tlscontext`'s. At a DANE host (mode ``dane``) the handshake does not check
the certificate; right after it, before EHLO, the server's chain is compared with the host's TLSA
records (:func:`services.deliver.dane.check`): no match → ``dane_failed``, next host, nothing sent.

When the server advertises PIPELINING (in the EHLO that counts: after STARTTLS, the one over
TLS), MAIL, every RCPT and DATA go in one write and their replies are read in order by
:mod:`services.deliver.pipelining` (RFC 2920); each recipient's fate is the one the same replies
give it command by command. STARTTLS itself and EHLO are never pipelined.

Every attempt is counted, with its duration, in ``services.common.metrics`` when it ends.

:func:`probe` is the same session without a transaction (``tlsrelay check``): connect, greeting,
EHLO, STARTTLS and the handshake per the TLS table, EHLO again, QUIT — never MAIL; not counted.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiosmtplib

from services.common.model import Envelope, Reply, TlsMode
from services.common.protocol import REQUIRETLS, TLS_REQUIRED_STATUS
from services.deliver import dane, leafcheck, mtasts, observe, pipelining, tls
from services.deliver.pool import ConnectionPool, Pooled, PoolKey
from services.deliver.shaping import Gate, Lease, Throttle
from services.deliver.tls import Action, Outcome, Situation
from services.deliver.tlscontext import tls_context

# RFC 3463 codes for failures that have no server reply of their own.
TLS_UNAVAILABLE = Reply(451, TLS_REQUIRED_STATUS, "TLS required but not available")
CONNECT_FAILED = "4.4.1"  # RFC 3463: no answer from host
CONNECTION_DROPPED = "4.4.2"  # RFC 3463: bad connection
PROTOCOL_ERROR = "4.5.0"  # RFC 3463: other or undefined protocol status (deferred, never final)
BAD_SEQUENCE = 503  # RFC 5321 §4.2.4: bad sequence of commands


@dataclass(frozen=True)
class Peer:
    """Where to connect and what name to expect on its certificate."""

    host: str  # MX host name (or route host): shown in traces
    address: str  # IP address actually connected to
    port: int
    tls_name: str  # name checked against the certificate in verified mode


@dataclass(frozen=True)
class TlsSettings:
    """The requirement for this delivery and the material to meet it."""

    mode: TlsMode
    ca_file: str | None = None  # verified mode: CA bundle (None → system CAs)
    remembered_broken: bool = False
    client_cert: tuple[str, str] | None = None  # (cert, key) PEM files presented to the server
    # MTA-STS testing mode: after an unverified handshake, note in ``Attempt.verify_code`` what
    # verification would have said (services.deliver.mtasts.leaf_problem); never changes a fate.
    check_leaf: bool = False
    # DANE (mode dane): the host's TLSA records (presentation format) and the names a DANE-TA
    # leaf may be issued to (the MX host, the destination domain; RFC 7672 §3.2.3).
    tlsa: tuple[str, ...] = ()
    tlsa_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class Timeouts:
    """Our EHLO name and how long to wait for each phase (RFC 5321 §4.5.3.2 gives the defaults:
    greeting 5 min, MAIL/RCPT 5 min, DATA end 10 min; TCP connect is ours, as Postfix's 30 s)."""

    local_hostname: str
    connect: float = 30.0
    command: float = 300.0
    greeting: float = 300.0
    data: float = 600.0
    pipelining: bool = True  # use PIPELINING where offered (delivery.pipelining)


@dataclass(frozen=True)
class Hooks:
    """What the session tells its caller while it runs (both default to doing nothing)."""

    on_handshake_failed: Callable[[Peer], None] = lambda peer: None
    # Called just before the message is sent: from here until the reply is recorded, a crash
    # leaves the relay unsure whether the peer has it (RFC 1047).
    before_data: Callable[[Peer], None] = lambda peer: None


@dataclass
class Attempt:
    """What happened in one attempt (one address); becomes one trace event."""

    peer: Peer
    mode: TlsMode
    outcome: Outcome | None = None
    tls_version: str | None = None
    cipher: str | None = None
    error: Reply | None = None  # session-level failure (nothing was accepted)
    next_host: bool = False  # the caller should try the next address/host
    replies: dict[str, Reply] = field(default_factory=dict)  # per recipient, final for this try
    data_sent: bool = False  # the transaction got to DATA (the message went over the wire)
    # The transaction ended with a 250 to the final dot: the server is between transactions. Any
    # other ending (a refused DATA, refused recipients, a refused sender) may leave it open
    # (Postfix keeps it after a 4xx/5xx to DATA), so the session needs RSET before reuse.
    clean: bool = False
    # The peer answered out of step (a 2xx where 354 belonged, a non-reply): what it says next
    # cannot be trusted to answer our next command, so the session is closed, never reused.
    desync: bool = False
    greeted: bool = False  # a new session got the server's greeting (delivery.mx_session_limit)
    reused: bool = False  # rode a pooled session (no connect, EHLO or handshake of its own)
    verify_code: int | None = None  # OpenSSL X509_V_ERR_* of a failed certificate check
    local_address: str | None = None  # our side of the connection (TLSRPT sending-mta-ip)
    dane: str | None = None  # DANE: which TLSA record matched, or why none did
    # The destination's own reply lines at the greeting, MAIL and RCPT that were not a success
    # (never a reply of ours): what traffic shaping's back-off looks at.
    server_replies: list[str] = field(default_factory=list)
    # No session could be had: a shaping limit (services.deliver.shaping.Throttle); nothing
    # was tried, and the round waits (not an attempt).
    throttled: Throttle | None = None
    # An unverified TLS session: what verification would have said of the server's leaf
    # (services.deliver.leafcheck; for `tlsrelay posture`'s what-if); a reused session's too.
    leaf_verdict: str | None = None
    greeting: str = ""  # the server's 220 line (shown by `tlsrelay check`)

    def to_json(self) -> dict[str, Any]:
        return {
            "host": self.peer.host,
            "address": self.peer.address,
            "port": self.peer.port,
            "tls_mode": self.mode.label,
            "tls_outcome": self.outcome.value if self.outcome else None,
            "tls_version": self.tls_version,
            "cipher": self.cipher,
            "error": str(self.error) if self.error else None,
            "replies": {r: str(reply) for r, reply in self.replies.items()},
            "reused": self.reused,
            **({"dane": self.dane} if self.dane is not None else {}),
        }


class _NextHost(Exception):
    """Abandon this address; carries the reply to record."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


async def attempt(
    peer: Peer,
    envelope: Envelope,
    recipients: Sequence[str],
    body: bytes,
    settings: TlsSettings,
    timeouts: Timeouts,
    hooks: Hooks = Hooks(),
    pool: ConnectionPool | None = None,
    gate: Gate | None = None,
) -> Attempt:
    """One attempt; with a ``pool``, on a parked session for the same key when there is one.
    With a ``gate`` (traffic shaping), a new session needs a connection lease from it first:
    when none can be had, the attempt ends ``throttled`` without connecting."""
    started = time.monotonic()
    key = _pool_key(peer, settings, gate.site.id if gate is not None else "")
    pooled, reset = (None, False)
    if pool is not None:
        pooled, reset = await _reusable(pool, key, timeouts.pipelining)
    lease = pooled.lease if pooled is not None else None
    if pooled is None and gate is not None:
        got = await gate.lease()
        if isinstance(got, Throttle):
            return Attempt(peer=peer, mode=settings.mode, throttled=got)
        lease = got
    result = await _attempt(
        peer,
        envelope,
        recipients,
        body,
        settings,
        timeouts,
        hooks,
        pool,
        pooled,
        gate,
        lease,
        reset,
    )
    if pooled is not None and result.next_host and not result.data_sent:
        # The parked session died under us (before DATA): try once more on a fresh one, with
        # the lease it held (given back to the round's gate when it closed).
        fresh = await gate.lease() if gate is not None else None
        if isinstance(fresh, Throttle):
            return Attempt(peer=peer, mode=settings.mode, throttled=fresh)
        lease = fresh
        result = await _attempt(
            peer, envelope, recipients, body, settings, timeouts, hooks, pool, None, gate, lease
        )
    observe.attempt(result, time.monotonic() - started)
    return result


async def _attempt(
    peer: Peer,
    envelope: Envelope,
    recipients: Sequence[str],
    body: bytes,
    settings: TlsSettings,
    timeouts: Timeouts,
    hooks: Hooks,
    pool: ConnectionPool | None,
    pooled: Pooled | None,
    gate: Gate | None = None,
    lease: Lease | None = None,
    reset: bool = False,
) -> Attempt:
    """``lease``: the session's connection lease (shaping); it stays with the session when it
    is parked, else it goes back to ``gate`` (for the round's next address) when it closes.
    ``reset``: the pooled session's RSET check goes first in the transaction's group."""
    result = Attempt(peer=peer, mode=settings.mode)
    smtp: aiosmtplib.SMTP | None = None
    parked = False
    try:
        if pooled is not None:
            smtp = pooled.smtp
            result.outcome, result.tls_version, result.cipher = (
                pooled.outcome,
                pooled.tls_version,
                pooled.cipher,
            )
            result.leaf_verdict = pooled.leaf_verdict
            result.reused = True
        else:
            smtp = await _open(peer, timeouts, result)
            result.local_address = _local_address(smtp)
            smtp = await _negotiate_tls(smtp, result, settings, timeouts, hooks.on_handshake_failed)
        await _transaction(smtp, envelope, recipients, body, result, hooks, timeouts, reset)
    except _NextHost as exc:
        result.error, result.next_host = exc.reply, True
    except BaseException:  # cancelled (delivery.job_timeout): drop the session, never park it
        if smtp is not None:
            smtp.close()
            smtp = None
        raise
    finally:
        handed_off = False
        if smtp is not None:
            max_uses = gate.site.limits.messages_per_connection if gate is not None else None
            parked = _park(pool, peer, settings, smtp, result, pooled, lease, max_uses, gate)
            if not parked and not result.next_host:
                # The transaction is over (recorded next): QUIT in the background, the lease
                # held until the session is closed (see _close_soon).
                _close_soon(smtp, _release(gate, lease))
                handed_off = True
            elif not parked:
                try:
                    await _close(smtp)
                finally:  # even when delivery.job_timeout falls during the QUIT: never leaked
                    if gate is not None:
                        gate.give_back(lease)
                    handed_off = True
        if not parked and not handed_off and gate is not None:
            gate.give_back(lease)
    return result


def _pool_key(peer: Peer, settings: TlsSettings, site: str = "") -> PoolKey:
    return PoolKey(
        peer.address, peer.port, int(settings.mode), settings.ca_file, settings.client_cert,
        peer.tls_name, settings.tlsa, settings.tlsa_names, site,
    )  # fmt: skip


async def _reusable(
    pool: ConnectionPool, key: PoolKey, pipelining: bool
) -> tuple[Pooled | None, bool]:
    """A parked session that still answers ``RSET`` with 250 (else it is closed); one that
    finished a transaction a moment ago is taken without the check (see ``pool.needs_check``).
    With PIPELINING the check rides in the transaction's group instead of costing a round trip
    of its own: (the session, True) — the transaction reads RSET's reply first."""
    pool.expire()
    while (pooled := pool.take(key)) is not None:
        if not pool.needs_check(pooled):
            return pooled, False
        if pipelining and pooled.smtp.supports_extension("pipelining"):
            return pooled, True
        try:
            await pooled.smtp.rset()
            return pooled, False
        except Exception:  # dead, timed out by the server, or a stale reply in the buffer
            pool.drop(pooled)
        except BaseException:  # cancelled
            pool.drop(pooled)
            raise
    return None, False


def _park(
    pool: ConnectionPool | None,
    peer: Peer,
    settings: TlsSettings,
    smtp: aiosmtplib.SMTP,
    result: Attempt,
    pooled: Pooled | None,
    lease: Lease | None = None,
    max_uses: int | None = None,
    gate: Gate | None = None,
) -> bool:
    """Keep the session for the next delivery unless it failed or fell out of step; one whose
    transaction did not end with a 250 to the final dot is parked unclean (RSET before reuse).
    A session whose lease was lost (it expired: another worker may hold it now) is closed."""
    if pool is None or result.next_host or result.desync or not smtp.is_connected:
        return False
    if lease is not None and lease.lost:
        return False
    uses = pooled.uses + 1 if pooled is not None else 1
    parked = Pooled(
        smtp, result.outcome, result.tls_version, result.cipher, uses, clean=result.clean,
        lease=lease, max_uses=max_uses, leaf_verdict=result.leaf_verdict,
    )  # fmt: skip
    return pool.give(_pool_key(peer, settings, gate.site.id if gate else ""), parked)


async def _open(peer: Peer, timeouts: Timeouts, result: Attempt) -> aiosmtplib.SMTP:
    """Connect, read the greeting (noted in ``result.greeted``) and say EHLO; anything wrong →
    next host."""
    # start_tls=False: STARTTLS is decided by our TLS table, never by aiosmtplib's defaults.
    smtp = aiosmtplib.SMTP(
        hostname=peer.address,  # for messages only: we connect the socket ourselves
        local_hostname=timeouts.local_hostname,
        timeout=timeouts.command,
        start_tls=False,
        use_tls=False,
        validate_certs=False,
    )
    try:
        sock = await _tcp_connect(peer, timeouts.connect)
        greeting = await smtp.connect(sock=sock, timeout=timeouts.greeting)
        result.greeted, result.greeting = True, str(Reply.parse(greeting.code, greeting.message))
        await smtp.ehlo()
    except aiosmtplib.SMTPResponseException as exc:
        smtp.close()
        if isinstance(exc, aiosmtplib.SMTPConnectResponseError):  # the greeting itself
            _heard(result, exc.code, exc.message)
        raise _NextHost(_server_reply(exc)) from None
    except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
        smtp.close()
        raise _NextHost(Reply(421, CONNECT_FAILED, f"connect failed: {_text(exc)}")) from None
    except BaseException:  # cancelled
        smtp.close()
        raise
    return smtp


async def _tcp_connect(peer: Peer, timeout: float) -> socket.socket:
    """The TCP connection alone, under ``timeout`` (the greeting gets its own, longer one)."""
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in peer.address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, (peer.address, peer.port)), timeout)
    except BaseException:
        sock.close()
        raise
    return sock


async def _negotiate_tls(
    smtp: aiosmtplib.SMTP,
    result: Attempt,
    settings: TlsSettings,
    timeouts: Timeouts,
    on_handshake_failed: Callable[[Peer], None],
) -> aiosmtplib.SMTP:
    """Upgrade per the TLS table; return the client to continue on (a new one after reconnect)."""
    action, outcome = tls.wants_starttls(settings.mode, settings.remembered_broken)
    if action is Action.TRY_TLS:
        situation = await _starttls(smtp, result, settings)
        action, outcome = tls.after_starttls(settings.mode, situation)
    result.outcome = outcome
    if action is Action.SEND_TLS:
        result.tls_version, result.cipher = _tls_info(smtp)
        if settings.check_leaf and not settings.mode.authenticates:
            result.verify_code = _leaf_problem(smtp, result.peer.tls_name)
        if not settings.mode.authenticates:
            result.leaf_verdict = _leaf_verdict(smtp, result.peer.tls_name, settings.ca_file)
    elif action is Action.NEXT_HOST:
        why = outcome.value if outcome else "no TLS"
        detail = f"{TLS_UNAVAILABLE.text} at {result.peer.host} ({why})"
        raise _NextHost(Reply(TLS_UNAVAILABLE.code, TLS_UNAVAILABLE.status, detail))
    elif action is Action.RECONNECT_CLEAR:
        on_handshake_failed(result.peer)
        await _close(smtp)
        smtp = await _open(result.peer, timeouts, result)
    return smtp


async def _starttls(smtp: aiosmtplib.SMTP, result: Attempt, settings: TlsSettings) -> Situation:
    """STARTTLS, then EHLO again over TLS (RFC 3207 §4.2: forget what was said in clear).

    Bytes the peer sent after its ``220`` and before the handshake are not from the TLS peer
    (response injection, the client side of the CVE-2011-0411 class): aiosmtplib discards them;
    should any still be buffered after the upgrade, the session is treated as a failed handshake
    and the TLS table decides (next host for required TLS), never read as replies."""
    if not smtp.supports_extension("starttls"):
        return Situation.NOT_OFFERED
    try:
        context = tls_context(settings)
        await smtp.starttls(server_hostname=result.peer.tls_name, tls_context=context)
        if _buffered_before_tls(smtp):
            smtp.close()
            return Situation.HANDSHAKE_FAILED
        if settings.mode.must_match_tlsa and not _dane_match(smtp, result, settings):
            return Situation.DANE_FAILED
        await smtp.ehlo()
    except Exception as exc:
        verify = _verify_error(exc)
        if verify is None:
            return Situation.HANDSHAKE_FAILED
        result.verify_code = verify.verify_code
        return Situation.VERIFY_FAILED
    return Situation.HANDSHAKE_OK


def _dane_match(smtp: aiosmtplib.SMTP, result: Attempt, settings: TlsSettings) -> bool:
    """The server's certificate against the host's TLSA records (noted in ``result.dane``)."""
    ssl_object = smtp.get_transport_info("ssl_object")
    chain = dane.peer_chain(ssl_object) if isinstance(ssl_object, ssl.SSLObject) else []
    found = dane.check(chain, settings.tlsa, settings.tlsa_names, time.time())
    result.dane = found.text
    return found.ok


def _buffered_before_tls(smtp: aiosmtplib.SMTP) -> bool:
    """Unparsed bytes left in aiosmtplib's reply buffer (its ``_buffer``, private: absent or
    empty when the library discards them itself, as 5.1 does)."""
    return bool(getattr(smtp.protocol, "_buffer", b""))


def _verify_error(exc: BaseException | None) -> ssl.SSLCertVerificationError | None:
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, ssl.SSLCertVerificationError):
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def _local_address(smtp: aiosmtplib.SMTP) -> str | None:
    sockname = smtp.get_transport_info("sockname")
    return str(sockname[0]) if isinstance(sockname, tuple) and sockname else None


async def _transaction(
    smtp: aiosmtplib.SMTP,
    envelope: Envelope,
    recipients: Sequence[str],
    body: bytes,
    result: Attempt,
    hooks: Hooks,
    timeouts: Timeouts,
    reset: bool = False,
) -> None:
    """MAIL, RCPT per recipient, DATA. Fills ``result.replies`` with each recipient's fate.
    ``reset``: RSET first (a parked session's check, in the group when pipelining)."""
    options = _mail_options(smtp, envelope, result)
    encoding = _address_encoding(envelope, recipients, options, result)
    if timeouts.pipelining and smtp.supports_extension("pipelining"):
        group = _Group(envelope.sender, options, recipients, reset, encoding)
        await _pipelined(smtp, group, body, result, hooks, timeouts)
        return
    if reset:  # (not reached today: _reusable leaves the check in the group only when pipelining)
        try:
            await smtp.rset()
        except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
            raise _NextHost(Reply(421, CONNECTION_DROPPED, _text(exc))) from None
    try:
        await smtp.mail(envelope.sender, options=options, encoding=encoding)
    except aiosmtplib.SMTPResponseException as exc:
        _heard(result, exc.code, exc.message)
        _mail_refused(exc.code, exc.message, recipients, result)
        return
    except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
        raise _NextHost(Reply(421, CONNECTION_DROPPED, _text(exc))) from None
    accepted = await _recipients(smtp, recipients, result, encoding)
    if accepted:
        hooks.before_data(result.peer)
        result.data_sent = True
        reply = await _data(smtp, body, timeouts.data, result)
        result.replies.update(dict.fromkeys(accepted, reply))


async def _recipients(
    smtp: aiosmtplib.SMTP, recipients: Sequence[str], result: Attempt, encoding: str = "ascii"
) -> list[str]:
    accepted = []
    for rcpt in recipients:
        try:
            await smtp.rcpt(rcpt, encoding=encoding)
            accepted.append(rcpt)
        except aiosmtplib.SMTPResponseException as exc:
            _heard(result, exc.code, exc.message)
            result.replies[rcpt] = _rcpt_refused(exc.code, exc.message)
        except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
            raise _NextHost(Reply(421, CONNECTION_DROPPED, _text(exc))) from None
    return accepted


def _rcpt_refused(code: int, message: str) -> Reply:
    """A RCPT reply that did not accept the recipient (not 250/251): the recipient's fate. A
    2xx here (252, ...: not a RCPT reply, RFC 5321 §4.3.2) is a protocol error, deferred 4.5.0,
    never a success: no DATA is sent for that recipient."""
    if 200 <= code < 300:
        why = f"protocol error: {code} {' '.join(message.split())[:200]} in reply to RCPT"
        return Reply(451, PROTOCOL_ERROR, why)
    return _peer_reply(code, message)


async def _data(smtp: aiosmtplib.SMTP, body: bytes, timeout: float, result: Attempt) -> Reply:
    """DATA, the body, the final dot. Success is exactly ``354`` then ``250`` (RFC 5321
    §4.3.2); any other 2xx/3xx (a server skipping a step, a stale reply left by a doubled
    RCPT answer) means the body may never have been read: a protocol error, deferred 4.5.0."""
    try:
        response = await smtp.data(body, timeout=timeout)
    except aiosmtplib.SMTPResponseException as exc:
        if not 400 <= exc.code < 600:
            result.desync = True
            return Reply(451, PROTOCOL_ERROR, f"protocol error: {_reply(exc)} in reply to DATA")
        return _server_reply(exc)
    except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
        # RFC 1047: after the final dot the message may have arrived; we cannot know. Defer.
        return Reply(451, CONNECTION_DROPPED, f"connection lost during DATA: {_text(exc)}")
    result.clean = True
    return Reply.parse(response.code, response.message)


def _mail_refused(code: int, message: str, recipients: Sequence[str], result: Attempt) -> None:
    """MAIL got ``code``, not 250: a refused sender is every recipient's reply (5xx), anything
    else is the next host's turn."""
    if code == BAD_SEQUENCE:  # the server still holds a transaction: never a bounce
        result.desync = True
        why = f"MAIL out of sequence: {code} {message[:200]}"
        raise _NextHost(Reply(451, PROTOCOL_ERROR, why))
    if code >= 500:  # the sender is refused: the same for every recipient
        result.replies = dict.fromkeys(recipients, _peer_reply(code, message))
        return
    raise _NextHost(_peer_reply(code, message))


@dataclass(frozen=True)
class _Group:
    """What one pipelined group says: [RSET], MAIL with its options, RCPT each, DATA."""

    sender: str
    options: list[str]
    recipients: Sequence[str]
    reset: bool = False
    encoding: str = "ascii"  # of the addresses: utf-8 under SMTPUTF8 (RFC 6531)

    def commands(self) -> bytes:
        reset = b"RSET\r\n" if self.reset else b""
        return reset + pipelining.envelope_commands(
            self.sender, self.options, self.recipients, self.encoding
        )


async def _pipelined(
    smtp: aiosmtplib.SMTP,
    group: _Group,
    body: bytes,
    result: Attempt,
    hooks: Hooks,
    timeouts: Timeouts,
) -> None:
    """:func:`_transaction` as one group (RFC 2920): MAIL, every RCPT and DATA in one write,
    their replies read in order, the message sent after DATA's ``354`` only when a recipient was
    accepted (§3.1). Each recipient gets the fate the same replies give it one command at a
    time; the session is kept only when every reply was read and nothing more was said. A
    reply to MAIL or RCPT that is not an SMTP reply leaves the rest unpaired: next host (the
    message was not sent). A parked session's RSET may lead the group: anything but 250 to it
    is a session that died while parked (next host, nothing sent: a fresh session is tried)."""
    commands, recipients = group.commands(), group.recipients
    try:
        with pipelining.Pipeline(smtp) as pipe:
            pipe.send(commands)
            if group.reset:
                reset = await _group_reply(pipe, timeouts.command, result)
                if reset.code != 250:
                    why = f"parked session answered RSET with {reset.code} {reset.text[:200]}"
                    raise _NextHost(Reply(421, CONNECTION_DROPPED, why))
            mail = await _group_reply(pipe, timeouts.command, result)
            if mail.code != 250:
                _heard(result, mail.code, mail.text)
                _mail_refused(mail.code, mail.text, recipients, result)
                return  # the rest of the group is not read: the session is closed
            accepted = []
            for rcpt in recipients:
                reply = await _group_reply(pipe, timeouts.command, result)
                if reply.code in (250, 251):  # aiosmtplib's rcpt() accepts exactly these
                    accepted.append(rcpt)
                else:
                    _heard(result, reply.code, reply.text)
                    result.replies[rcpt] = _rcpt_refused(reply.code, reply.text)
            if not accepted:
                await _no_data(pipe, timeouts.command)
                return
            result.data_sent = True
            end = await _pipelined_data(pipe, body, result, hooks, timeouts.data)
            result.replies.update(dict.fromkeys(accepted, end))
    except pipelining.Disconnected as exc:  # a parked session that died: nothing was sent
        raise _NextHost(Reply(421, CONNECTION_DROPPED, _text(exc))) from None


async def _group_reply(
    pipe: pipelining.Pipeline, timeout: float, result: Attempt
) -> pipelining.RawReply:
    """The next reply to MAIL or RCPT; unreadable → next host (as a lost connection is when the
    commands go one by one)."""
    try:
        return await pipe.reply(timeout)
    except pipelining.Malformed as exc:
        result.desync = True
        raise _NextHost(Reply(451, PROTOCOL_ERROR, f"invalid SMTP reply: {exc}")) from None
    except (TimeoutError, pipelining.ReplyError) as exc:
        raise _NextHost(Reply(421, CONNECTION_DROPPED, _text(exc))) from None


async def _no_data(pipe: pipelining.Pipeline, timeout: float) -> None:
    """Every recipient was refused, yet DATA was sent: it must be refused too (RFC 2920 §3.1),
    and then the session goes on (RSET before reuse). A peer that answers it ``354`` instead has
    shown it does not keep to §3.1: nothing more is sent to it (not even the lone dot §3.1
    suggests) and the session is closed."""
    try:
        reply = await pipe.reply(timeout)
    except (TimeoutError, pipelining.ReplyError):
        return
    if reply.code != 354:
        pipe.finish()


async def _pipelined_data(
    pipe: pipelining.Pipeline, body: bytes, result: Attempt, hooks: Hooks, timeout: float
) -> Reply:
    """DATA's reply, then the message and its final reply: what :func:`_data` makes of them."""
    try:
        start = await pipe.reply(timeout)
        if start.code == 354:
            hooks.before_data(result.peer)
            pipe.send(pipelining.message_data(body))
            final = await pipe.reply(timeout)
            if final.code == 250:
                pipe.finish()
                result.clean = True
                return Reply.parse(final.code, final.text)
            start = final
    except pipelining.Malformed as exc:
        result.desync = True
        return Reply(451, PROTOCOL_ERROR, f"protocol error: {exc} in reply to DATA")
    except (TimeoutError, pipelining.ReplyError) as exc:
        # RFC 1047: after the final dot the message may have arrived; we cannot know. Defer.
        return Reply(451, CONNECTION_DROPPED, f"connection lost during DATA: {_text(exc)}")
    if not 400 <= start.code < 600:
        result.desync = True
        why = f"{start.code} {start.text[:200]}"
        return Reply(451, PROTOCOL_ERROR, f"protocol error: {why} in reply to DATA")
    pipe.finish()  # refused: the server may hold the transaction (RSET before reuse)
    return _peer_reply(start.code, start.text)


def _mail_options(smtp: aiosmtplib.SMTP, envelope: Envelope, result: Attempt) -> list[str]:
    """Pass on BODY=8BITMIME and SMTPUTF8 where the peer supports them, and REQUIRETLS always.

    RFC 8689 §4.2.1: a REQUIRETLS message is relayed only over TLS to a host that advertises
    REQUIRETLS; anything else is a permanent failure for this host (5.7.30).
    """
    options = []
    for option in envelope.mail_options:
        keyword = option.split("=", 1)[0].upper()
        if keyword == "BODY" and smtp.supports_extension("8bitmime"):
            options.append(option)
        elif keyword == "SMTPUTF8" and smtp.supports_extension("smtputf8"):
            options.append("SMTPUTF8")
        elif keyword == REQUIRETLS:
            if result.tls_version is None or not smtp.supports_extension("requiretls"):
                host = result.peer.host
                raise _NextHost(Reply(550, "5.7.30", f"REQUIRETLS not supported by {host}"))
            options.append(REQUIRETLS)
    return options


def _address_encoding(
    envelope: Envelope, recipients: Sequence[str], options: Sequence[str], result: Attempt
) -> str:
    """How the envelope's addresses go on the wire: UTF-8 when SMTPUTF8 is passed on (RFC 6531
    §3.2), else ASCII. A non-ASCII address to a host without SMTPUTF8 cannot be sent as it is:
    a permanent failure for this host (§3.4: 5.6.7), the next host may take it."""
    if "SMTPUTF8" in options:
        return "utf-8"
    if not all(address.isascii() for address in (envelope.sender, *recipients)):
        why = f"{result.peer.host} does not support SMTPUTF8, needed by a non-ASCII address"
        raise _NextHost(Reply(550, "5.6.7", why))
    return "ascii"


def _leaf_problem(smtp: aiosmtplib.SMTP, name: str) -> int | None:
    ssl_object = smtp.get_transport_info("ssl_object")
    if not isinstance(ssl_object, ssl.SSLObject | ssl.SSLSocket):
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return mtasts.leaf_problem(der, name, time.time()) if der else None


def _leaf_verdict(smtp: aiosmtplib.SMTP, name: str, ca_file: str | None) -> str | None:
    der = _peer_der(smtp)
    return leafcheck.verdict(der, name, ca_file) if der else None


def _peer_der(smtp: aiosmtplib.SMTP) -> bytes | None:
    ssl_object = smtp.get_transport_info("ssl_object")
    if not isinstance(ssl_object, ssl.SSLObject | ssl.SSLSocket):
        return None
    return ssl_object.getpeercert(binary_form=True)


def _tls_info(smtp: aiosmtplib.SMTP) -> tuple[str | None, str | None]:
    ssl_object = smtp.get_transport_info("ssl_object")
    if not isinstance(ssl_object, ssl.SSLObject | ssl.SSLSocket):
        return None, None
    cipher = ssl_object.cipher()
    return ssl_object.version(), cipher[0] if cipher else None


# QUITs under way (see _close_soon); a batch waits for them at its end (closed()).
_closing: set[asyncio.Task[None]] = set()
QUIT_TIMEOUT = 5.0  # s: a peer that does not answer QUIT by then is simply disconnected


def _close_soon(smtp: aiosmtplib.SMTP, then: Callable[[], None] | None = None) -> None:
    """Say QUIT in the background, then call ``then`` (the connection lease goes only once the
    session is closed, so the destination never sees more sessions than the site allows). The
    attempt's result is known by now; were the goodbye part of the attempt,
    ``delivery.job_timeout`` falling on a peer slow to answer QUIT would abandon a round whose
    message was already taken (250 to the final dot), and its retry would send it twice."""

    async def close() -> None:
        try:
            await _close(smtp)
        finally:
            if then is not None:
                then()

    task = asyncio.get_running_loop().create_task(close())
    _closing.add(task)
    task.add_done_callback(_closing.discard)


def _release(gate: Gate | None, lease: Lease | None) -> Callable[[], None] | None:
    """What gives ``lease`` back to its shaper once its session is closed (None: no lease)."""
    if gate is None or lease is None:
        return None
    shaper = gate.shaper
    return lambda: shaper.release(lease)


async def closed() -> None:
    """Wait for the QUITs attempts began (each bounded by :data:`QUIT_TIMEOUT`)."""
    loop = asyncio.get_running_loop()
    while mine := [task for task in _closing if task.get_loop() is loop]:
        await asyncio.gather(*mine, return_exceptions=True)


async def _close(smtp: aiosmtplib.SMTP) -> None:
    if not smtp.is_connected:
        return
    try:
        await asyncio.wait_for(smtp.quit(), timeout=QUIT_TIMEOUT)
    except Exception:
        smtp.close()
    except BaseException:  # cancelled (the worker's loop is shutting down)
        smtp.close()
        raise


def _heard(result: Attempt, code: int, message: str) -> None:
    """Note the destination's reply line (a real reply, not aiosmtplib's code -1) for the
    back-off patterns (services/deliver/shaping.py)."""
    if 200 <= code < 600:
        result.server_replies.append(f"{code} {' '.join(message.split())[:500]}")


def _server_reply(exc: aiosmtplib.SMTPResponseException) -> Reply:
    return _peer_reply(exc.code, exc.message)


def _peer_reply(code: int, message: str) -> Reply:
    """The peer's reply; a line that is not an SMTP reply at all (aiosmtplib's code -1) is a
    temporary protocol failure (RFC 3463 X.5.0), never a permanent one."""
    if 200 <= code < 600:
        return Reply.parse(code, message)
    return Reply(451, "4.5.0", f"invalid SMTP reply from server: {message[:200]!r}")


def _reply(exc: aiosmtplib.SMTPResponseException) -> str:
    """A reply that is not taken at its word, as text for the trace (folded by Reply)."""
    return f"{exc.code} {exc.message[:200]}"


def _text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip().rstrip(":")


# --------------------------------------------------------------------------- probing (no mail)


@dataclass
class Probe:
    """What :func:`probe` found at one address; no mail was sent."""

    attempt: Attempt  # greeting, TLS outcome, version, cipher, verify_code; error: where it ended
    starttls: bool = False  # STARTTLS was offered in the EHLO reply in clear
    requiretls: bool = False  # REQUIRETLS was advertised in the EHLO reply over TLS
    certificate: bytes | None = None  # the server's leaf certificate (DER)


async def probe(peer: Peer, settings: TlsSettings, timeouts: Timeouts) -> Probe:
    """A delivery's session without a transaction (``tlsrelay check``): connect, greeting, EHLO,
    STARTTLS and the handshake as the TLS table says for ``settings``, EHLO again, then QUIT —
    never MAIL. ``settings.mode`` must require encryption, so that a failed handshake ends the
    probe (it never reconnects in clear). Never raises for what the network or the peer does."""
    if not settings.mode.requires_encryption:
        raise ValueError(f"a probe needs a mode that requires TLS, not {settings.mode.label}")
    found = Probe(Attempt(peer=peer, mode=settings.mode))
    smtp: aiosmtplib.SMTP | None = None
    try:
        smtp = await _open(peer, timeouts, found.attempt)
        found.starttls = smtp.supports_extension("starttls")
        smtp = await _negotiate_tls(
            smtp, found.attempt, settings, timeouts, Hooks().on_handshake_failed
        )
        found.requiretls = smtp.supports_extension("requiretls")
        found.certificate = _peer_der(smtp)
    except _NextHost as exc:
        found.attempt.error, found.attempt.next_host = exc.reply, True
    except BaseException:  # cancelled: drop the connection
        if smtp is not None:
            smtp.close()
        raise
    if smtp is not None:
        await _close_and_wait(smtp)
    return found


async def _close_and_wait(smtp: aiosmtplib.SMTP, limit: float = 2.0) -> None:
    """QUIT, then wait (at most ``limit`` seconds) until the socket is closed: a TLS session
    finishes its shutdown after QUIT, and a short-lived caller (``tlsrelay check``) ends its
    event loop right after the probes."""
    sock = smtp.get_transport_info("socket") if smtp.is_connected else None
    await _close(smtp)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while sock is not None and sock.fileno() != -1 and loop.time() < deadline:
        await asyncio.sleep(0.01)
