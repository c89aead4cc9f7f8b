"""One SMTP client session to one address of one destination host (aiosmtplib).

``attempt(...)`` connects, says EHLO, follows :mod:`services.deliver.tls` for STARTTLS, and runs
one transaction for the given recipients (:mod:`services.deliver.transaction`; the records it
takes and gives, :class:`Peer` … :class:`Attempt`, are :mod:`services.deliver.attempt`'s). It
never raises for anything the network or the peer does: every outcome is an :class:`Attempt` —
per-recipient replies when the transaction ran, or a session-level ``error`` with
``next_host=True`` when the caller should try the next address (connection refused, timeout, bad
greeting, TLS required but not available, disconnect).

Clear text happens only where :func:`services.deliver.tls.after_starttls` or
:func:`~services.deliver.tls.wants_starttls` says so; a handshake failure in opportunistic mode
reconnects in clear and reports it through ``on_handshake_failed`` (the shared "TLS broken" memory).
The STARTTLS contexts (TLS 1.0 and old ciphers accepted where any TLS beats clear, modern
defaults where the certificate is verified or must match TLSA records) are
:mod:`services.deliver.tlscontext`'s. At a DANE host (mode ``dane``) the handshake does not check
the certificate; right after it, before EHLO, the server's chain is compared with the host's TLSA
records (:func:`services.deliver.dane.check`): no match → ``dane_failed``, next host, nothing sent.

Every attempt is counted, with its duration, in ``services.common.metrics`` when it ends. A
process runs at most :data:`HANDSHAKES` STARTTLS handshakes at once; more wait their turn (a
bound on the memory of a thousand sessions opening together).

What the connection says of the peer (certificate checks, TLS version, our address) is read by
:mod:`services.deliver.peerinfo`.

:func:`probe` is the same session without a transaction (``tlsrelay check``): connect, greeting,
EHLO, STARTTLS and the handshake per the TLS table, EHLO again, QUIT — never MAIL; not counted.
"""

from __future__ import annotations

import asyncio
import socket
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import aiosmtplib

from services.common.model import Envelope, Reply
from services.common.protocol import TLS_REQUIRED_STATUS
from services.deliver import observe, peerinfo, pipelining, tls
from services.deliver.attempt import Attempt, Hooks, Peer, Timeouts, TlsSettings
from services.deliver.pool import ConnectionPool, Pooled, PoolKey
from services.deliver.shaping import Gate, Lease, Throttle
from services.deliver.tls import Action, Situation
from services.deliver.tlscontext import tls_context
from services.deliver.transaction import NextHost, heard, server_reply, text, transaction

# RFC 3463 codes for failures that have no server reply of their own.
TLS_UNAVAILABLE = Reply(451, TLS_REQUIRED_STATUS, "TLS required but not available")
CONNECT_FAILED = "4.4.1"  # RFC 3463: no answer from host


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
    when none can be had, the attempt ends ``throttled`` without connecting. While it waits for
    a lease, a session for the same key that another lane of the process parks is taken instead
    (:meth:`Gate.lease`'s ``parked``)."""
    started = time.monotonic()
    key = _pool_key(peer, settings, gate.site.id if gate is not None else "")
    pooled, reset, lease = None, False, None
    while True:
        if pool is not None:
            pooled, reset = await _reusable(pool, key, timeouts.pipelining)
        if pooled is not None:
            lease = pooled.lease
            break
        if gate is None:
            break
        got = await gate.lease(partial(pool.has, key) if pool is not None else None)
        if isinstance(got, Throttle):
            return Attempt(peer=peer, mode=settings.mode, throttled=got)
        if got is not None:
            lease = got
            break
        # Another lane of this process parked a session for this key while the round waited
        # for a connection: take it (the next look at the pool) rather than wait on.
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
        fresh = await gate.lease() if gate is not None else None  # never None when asked
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
            if pooled.uses == 0:  # a successor's first transaction: its TLS session is new
                result.opened_ahead = True
                result.verify_code, result.local_address, result.dane = (
                    pooled.verify_code,
                    pooled.local_address,
                    pooled.dane,
                )
        else:
            smtp = await _open(peer, timeouts, result)
            result.local_address = peerinfo.local_address(smtp)
            smtp = await _negotiate_tls(smtp, result, settings, timeouts, hooks.on_handshake_failed)
        await transaction(smtp, envelope, recipients, body, result, hooks, timeouts, reset)
    except NextHost as exc:
        result.error, result.next_host = exc.reply, True
    except BaseException:  # cancelled (delivery.job_timeout): drop the session, never park it
        if smtp is not None:
            pipelining.hang_up(smtp)
            smtp = None
        raise
    finally:
        handed_off = False
        if smtp is not None:
            max_uses = gate.site.limits.messages_per_connection if gate is not None else None
            kept = _park(pool, peer, settings, smtp, result, pooled, lease, max_uses, gate)
            parked = kept is not None
            if kept is not None and pool is not None and pool.successor_due(kept):
                successor = _successor(pool, peer, settings, timeouts, gate, kept.outcome, max_uses)
                pool.open_successor(successor, gate.site.id if gate is not None else "")
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
) -> Pooled | None:
    """Keep the session for the next delivery unless it failed or fell out of step; one whose
    transaction did not end with a 250 to the final dot is parked unclean (RSET before reuse).
    A session whose lease was lost (it expired: another worker may hold it now) is closed.
    Returns what was parked, or None (the caller closes the session)."""
    if pool is None or result.next_host or result.desync or not smtp.is_connected:
        return None
    if lease is not None and lease.lost:
        return None
    uses = pooled.uses + 1 if pooled is not None else 1
    parked = Pooled(
        smtp, result.outcome, result.tls_version, result.cipher, uses, clean=result.clean,
        lease=lease, max_uses=max_uses, leaf_verdict=result.leaf_verdict,
    )  # fmt: skip
    return (
        parked
        if pool.give(_pool_key(peer, settings, gate.site.id if gate else ""), parked)
        else None
    )


class _HandshakeFailed(Exception):
    """A successor's handshake failed where its predecessor's had not."""


async def _successor(
    pool: ConnectionPool,
    peer: Peer,
    settings: TlsSettings,
    timeouts: Timeouts,
    gate: Gate | None,
    outcome: tls.Outcome | None,
    max_uses: int | None,
) -> None:
    """Open the session that takes over from one nearing its last transaction and park it
    unused (services/deliver/pool.py, "Successor sessions"): the same opening and TLS table as
    an attempt's, kept only with the TLS ``outcome`` of the session it follows. Never an attempt:
    nothing sent, nothing recorded but the site's back-off (a greeting matching
    ``delivery.backoff.replies``), never raises but for cancellation."""
    lease: Lease | None = None
    smtp: aiosmtplib.SMTP | None = None
    kept = False
    result = Attempt(peer=peer, mode=settings.mode)
    try:
        if gate is not None:
            got = await gate.shaper.take(gate.site, gate.seniority, waits=False)
            if not isinstance(got, Lease):
                return  # the site is at a limit: the next delivery opens its own, as before
            lease = got
        smtp = await _open(peer, timeouts, result)
        result.local_address = peerinfo.local_address(smtp)

        def no_wasted_reconnect(_peer: Peer) -> None:
            # The handshake failed and the TLS table says reconnect in clear: a connection to
            # be thrown away unless its predecessor's outcome was that one too. It ends here;
            # the next delivery's own session follows the table and records the failure.
            if result.outcome is not outcome:
                raise _HandshakeFailed

        smtp = await _negotiate_tls(smtp, result, settings, timeouts, no_wasted_reconnect)
        if result.outcome is outcome and not (lease is not None and lease.lost):
            successor = Pooled(
                smtp, result.outcome, result.tls_version, result.cipher, uses=0, clean=True,
                lease=lease, max_uses=max_uses, leaf_verdict=result.leaf_verdict,
                verify_code=result.verify_code, local_address=result.local_address,
                dane=result.dane,
            )  # fmt: skip
            key = _pool_key(peer, settings, gate.site.id if gate is not None else "")
            kept = pool.give(key, successor)
    except Exception:  # Redis, refused, timed out, a failed handshake: no successor
        if gate is not None and result.server_replies:
            # A greeting that says slow down (421, "too many connections") steps the site
            # back as an attempt's would (never raises: its Redis errors are logged).
            gate.shaper.backoff(gate.site, result.server_replies)
    except BaseException:  # cancelled (the pool closes): hang up now, no QUIT
        if smtp is not None:
            pipelining.hang_up(smtp)
            smtp = None
        raise
    finally:
        if not kept:
            try:
                if smtp is not None:
                    await _close(smtp)
            finally:
                if lease is not None and gate is not None:
                    gate.shaper.release(lease)


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
            heard(result, exc.code, exc.message)
        raise NextHost(server_reply(exc)) from None
    except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
        smtp.close()
        raise NextHost(Reply(421, CONNECT_FAILED, f"connect failed: {text(exc)}")) from None
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
        result.tls_version, result.cipher = peerinfo.tls_info(smtp)
        if settings.check_leaf and not settings.mode.authenticates:
            result.verify_code = peerinfo.leaf_problem(smtp, result.peer.tls_name)
        if not settings.mode.authenticates:
            result.leaf_verdict = peerinfo.leaf_verdict(
                smtp, result.peer.tls_name, settings.ca_file
            )
    elif action is Action.NEXT_HOST:
        why = outcome.value if outcome else "no TLS"
        detail = f"{TLS_UNAVAILABLE.text} at {result.peer.host} ({why})"
        raise NextHost(Reply(TLS_UNAVAILABLE.code, TLS_UNAVAILABLE.status, detail))
    elif action is Action.RECONNECT_CLEAR:
        on_handshake_failed(result.peer)
        await _close(smtp)
        smtp = await _open(result.peer, timeouts, result)
    return smtp


# TLS handshakes one deliver process runs at once. A handshake in flight holds OpenSSL's buffers
# (about 16 kB more than the session it becomes): a process opening 1 000 sessions at once peaked
# at 154 MB, at 139 MB with this bound (bench/README, session 6), and opened them as fast (CPU
# sets the pace of that many handshakes, not the bound). Default lanes (5) never reach it.
HANDSHAKES = 256
_handshakes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
    weakref.WeakKeyDictionary()
)


def handshakes() -> asyncio.Semaphore:
    """This event loop's bound on TLS handshakes in flight (:data:`HANDSHAKES`)."""
    loop = asyncio.get_running_loop()
    bound = _handshakes.get(loop)
    if bound is None:
        bound = _handshakes[loop] = asyncio.Semaphore(HANDSHAKES)
    return bound


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
        async with handshakes():
            await smtp.starttls(server_hostname=result.peer.tls_name, tls_context=context)
        if peerinfo.buffered_before_tls(smtp):
            smtp.close()
            return Situation.HANDSHAKE_FAILED
        if settings.mode.must_match_tlsa and not peerinfo.dane_match(smtp, result, settings):
            return Situation.DANE_FAILED
        await smtp.ehlo()
    except Exception as exc:
        verify = peerinfo.verify_error(exc)
        if verify is None:
            return Situation.HANDSHAKE_FAILED
        result.verify_code = verify.verify_code
        return Situation.VERIFY_FAILED
    return Situation.HANDSHAKE_OK


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
    except Exception:  # a QUIT stuck behind bytes the peer does not read: aborted
        pipelining.hang_up(smtp)
    except BaseException:  # cancelled (the worker's loop is shutting down)
        pipelining.hang_up(smtp)
        raise


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
        found.certificate = peerinfo.peer_der(smtp)
    except NextHost as exc:
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
