"""The SMTP listeners: receive mail, store it in the Redis spool and queue it for policy.

One process runs up to three listeners (:class:`~services.common.listeners.Listener`), one socket
and one :class:`~services.ingest.handler.IngestHandler` each, all storing through one
:class:`services.common.commit.Committer`:

- ``listen`` (``ingest.listen``, port 25's role): mail to tenant domains from anyone, to other
  domains only from ``ingest.relay_networks`` or a tenant's ``networks``. No AUTH (``502``).
- ``submission`` (``ingest.submission``, port 587's role; only when configured): AUTH PLAIN and
  LOGIN, advertised and accepted only after STARTTLS; every message needs AUTH.
- ``relay`` (``ingest.relay``, else ``regions[region].relay``; else not started): the
  inter-region endpoint, STARTTLS with a platform-CA client certificate required.

This module starts, drains and stops the listeners; the contract below is kept by:

- :mod:`services.ingest.replies`: every reply, named, with its RFC section;
- :mod:`services.ingest.message`: the DATA reader within the limits and the ``Received:`` field;
- :mod:`services.ingest.adapter`: the only module that touches aiosmtpd's private members;
- :mod:`services.ingest.session`: one SMTP session, its protocol limits and the AUTH exchange;
- :mod:`services.ingest.handler`: the hooks (EHLO, MAIL, RCPT, DATA), AUTH checks, storing;
- :mod:`services.ingest.access` (who may send what where, pure) and
  :mod:`services.ingest.limits` (the Redis counters: failed AUTHs per client, messages per
  tenant); :mod:`services.ingest.tlscert` (the STARTTLS contexts).

Contract (these replies are relied on by clients and tests):

- EHLO advertises SIZE <ingest.max_message_bytes>, 8BITMIME, SMTPUTF8, PIPELINING,
  ENHANCEDSTATUSCODES, STARTTLS (only while the session is in clear), REQUIRETLS (RFC 8689,
  only once the session is TLS, never in clear), ``AUTH LOGIN PLAIN`` (submission, over TLS
  only) and HELP. Every reply but the greeting, the HELO/EHLO lines, 354 and 334 carries an
  RFC 3463 enhanced status code; replies aiosmtpd produces without one get a default from
  :data:`ENHANCED_DEFAULTS`.
- MAIL: ``SIZE=`` above the limit → ``552 5.3.4``; the null reverse-path ``<>`` is accepted.
  ``REQUIRETLS`` (RFC 8689 §4.1, takes no value) in clear → ``530 5.7.10``; with a value or given
  twice → ``501 5.5.4``; over TLS it is accepted and kept as ``"REQUIRETLS"`` in
  ``Envelope.mail_options`` for the policy and deliver services. A ``TLS-Required: No`` header
  (RFC 8689 §5) sets ``Envelope.tls_required_no`` and, like every header, is stored untouched.
- RCPT: more than ``ingest.max_recipients`` → ``452 4.5.3 Too many recipients``; a recipient this
  client may not send to → ``554 5.7.1 Relay access denied`` (:func:`access.may_relay`: on
  ``listen`` other than tenant domains from outside the relay and tenant networks; on ``relay``
  anything but a tenant of this region). CR, LF or NUL in an address → ``501 5.1.7`` (sender) /
  ``501 5.1.3`` (recipient).
- Submission: AUTH before STARTTLS → ``538 5.7.11 Encryption required for requested
  authentication mechanism``; MAIL before AUTH → ``530 5.7.0 Authentication required``; login
  ``user@<a domain of the tenant>``, checked with scrypt off the event loop: ``235 2.7.0
  Authentication successful`` or ``535 5.7.8 Authentication credentials invalid``. Failed AUTHs
  are counted per client address in Redis (all ingest processes): after
  ``ingest.auth_failure_limit`` within ``ingest.auth_failure_window``, AUTH → ``421 4.7.0 Too
  many authentication failures, try later`` and the connection is closed, the password unread.
  MAIL FROM outside the tenant's domains → ``553 5.7.1 Sender address not owned by the
  authenticated tenant``. Passwords and AUTH payloads are never logged.
- Relay: nothing but EHLO/STARTTLS/NOOP/QUIT in clear (``530 5.7.0 Must issue a STARTTLS
  command first``); a client without a certificate of ``platform_tls.ca`` fails the handshake
  (:func:`tlscert.platform_context`) and the connection is closed.
- Tenant rate limit: the sending tenant (authenticated on submission, by ``networks`` on
  ``listen``) with a ``rate_limit`` has its MAIL commands counted in fixed windows; over it,
  MAIL → ``451 4.7.0 Rate limit exceeded, try again later``.
- The stored envelope records ``listener``, ``tenant`` (the sending tenant), ``auth_user`` and
  ``client_cert`` (the relay client's certificate CN, else first SAN).
- DATA: the stored body is a ``Received:`` header (RFC 5321 §4.4; ``with ESMTPSA`` when
  authenticated, the client certificate's name on the relay listener) followed by the octets
  exactly as received (only SMTP dot-stuffing undone). ``250 2.0.0 Ok: queued as <ID>`` is sent
  only after the transaction that stores the message and its ``policy`` task committed
  (:class:`services.common.commit.Committer`: messages finishing within ``ingest.batch_window``
  share one transaction and one policy task). More data than the limit → ``552 5.3.4``.
- STARTTLS uses ``ingest.tls_cert``/``tls_key``, else a self-signed certificate; the relay listener
  uses ``platform_tls`` (see :mod:`services.ingest.tlscert`). Each listener accepts the TLS versions
  and ciphers of its profile (``ingest.tls_profiles``, :mod:`.tlsprofile`). Commands pipelined in
  clear after STARTTLS are discarded, never run inside the TLS session (RFC 3207 §4.2; aiosmtpd ≥
  1.4.6 clears its buffer, tests/test_hostile.py guards it).

Limits against hostile or broken clients (constants in :mod:`services.ingest.session` and
:mod:`services.ingest.message`, beside their RFC sections):

- ``ingest.max_connections`` open sessions *per listener* (a flood on ``listen`` cannot lock
  out ``submission`` or ``relay``): a further connection → ``421 4.7.0 Too many connections,
  try again later`` and closed, before any session; the others are served as usual.
- A command line over 512 octets with its CRLF (RFC 5321 §4.5.3.1.4; MAIL 575 for SIZE=,
  BODY=, SMTPUTF8 and REQUIRETLS; AUTH and SASL responses 12288, RFC 4954 §4) → ``500 5.5.2
  Line too long``; no line is buffered beyond 12288 octets whatever its length.
- A text line of DATA over 1000 octets with its CRLF (RFC 5321 §4.5.3.1.6, a transparency dot
  not counted) → the whole message is read, then refused ``500 5.6.0 Line too long: text lines
  are limited to 1000 octets``. Lines are not folded as Postfix does: the stored octets are
  exactly those received (DKIM signatures stay valid), and the sender learns now rather than
  from a later bounce.
- A header section over ``ingest.max_header_bytes`` → ``552 5.3.4 Header section too large``
  (at the end of DATA). The header section ends at the first empty line or at the first line
  that is neither a field nor a folded continuation: a message without a blank line or without
  any header is accepted and stored as received, and so are 8-bit headers without 8BITMIME or
  SMTPUTF8 (a relay does not repair messages; policy parses them leniently).
- More than ``ingest.max_hops`` ``Received:`` fields in the header section (RFC 5321 §6.3: a
  mail loop) → ``554 5.4.6 Too many hops`` at the end of DATA, nothing stored.
- No command, DATA line or TLS handshake progress for ``ingest.command_timeout`` (RFC 5321
  §4.5.3.2.7) → ``421 4.4.2 Timeout, closing connection`` and closed; a slow but steady DATA
  transfer is not cut off.
- ``ingest.max_bad_commands`` syntax errors (replies 500-509 and 555: unknown verbs, bad
  arguments, bad sequence, lines too long) → that reply, then ``421 4.7.0 Too many errors,
  closing connection`` (as Postfix's hard error limit), closed; pipelined commands after it are
  never run. aiosmtpd's own hang-up after 5 unknown verbs (``502``) is replaced by this count.
- Every DATA limit is checked while reading: after the first limit crossed nothing more is
  kept, so a session holds at most ``max_message_bytes`` plus one buffer whatever it sends
  (aiosmtpd kept an endless line whole). A session closed with a 421 that its client does not
  read is aborted after ``HANG_UP_GRACE`` seconds (:mod:`services.ingest.session`), and one
  closed in the middle of the TLS handshake is ended at once (asyncio never reports it lost):
  neither holds a slot.
- Replies are printable ASCII of at most 512 octets (RFC 5321 §4.5.3.1.5) even where aiosmtpd
  echoes an argument; an address the stdlib parser cannot read (``<``, ``a@``) is ``553 5.1.3``.

Failure behaviour: when Redis is unreachable, fails or is too slow, DATA (and AUTH or MAIL when
they need a counter) is answered ``451 4.3.0 Temporary failure, try again later`` and the error
is logged: nothing is accepted without its checks. A commit is one MULTI/EXEC, so nothing
half-written remains and the client retries later. An unexpected exception in a command is
logged and answered ``451 4.3.0`` too (never a stack trace to the peer). If Redis committed but
the reply was lost, the client retries and the message may be delivered twice: mail is
at-least-once (RFC 5321 §6.1), never lost. :meth:`IngestServer.stop` closes every listener and
open session; a message whose 250 was not yet sent is not acknowledged. A listener that cannot
be bound stops the start-up (none listens) with :class:`ListenError` naming its key; so does a
relay listener without ``platform_tls``.

Metrics (``services.common.metrics``): each connection is counted when it closes (with whether
STARTTLS succeeded); each 4xx/5xx reply to MAIL, RCPT or DATA, and each message stored, is counted
per listener.

Memory per inbound TLS session: aiosmtpd builds asyncio's ``SSLProtocol`` for STARTTLS, whose
receive buffer is 256 KiB per session for its life (300 sessions held 85 MB). :func:`serve`
bounds it to :data:`READ_BUFFER` (:mod:`services.common.tlsbuffers`): one full TLS record, so a
message body is still read a record at a time (bench/README.md, "Session 6").
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl
import time
from typing import Final

import redis.asyncio as aioredis

from services.common import commit, eventloop, health, listeners, metrics, spool, tlsbuffers
from services.common.config import Config
from services.common.listeners import Listener
from services.common.tenants import Directory
from services.common.values import HostPort
from services.ingest import tlscert
from services.ingest.handler import Connection, IngestHandler
from services.ingest.session import IngestSMTP

log = logging.getLogger("tlsrelay.ingest")

READ_BUFFER: Final = 16 * 1024  # bytes an inbound TLS session reads at once (asyncio: 256 KiB)


class ListenError(Exception):
    """A listener cannot be bound; ``str()`` names its key, e.g. ``ingest.listen: cannot listen
    on 127.0.0.1:2525: Address already in use``."""


class IngestServer:
    """Every configured listener (:func:`~services.common.listeners.listener_addresses`), sharing
    one Redis client.

    ``start()`` binds them all (or none: a failure releases what was bound); ``stop()`` releases
    everything.
    """

    def __init__(self, config: Config, redis_url: str) -> None:
        self.config = config
        self.redis_url = redis_url
        self._servers: list[asyncio.Server] = []
        self._handlers: list[IngestHandler] = []
        self._committer: commit.Committer | None = None
        self._redis: aioredis.Redis | None = None
        self._addresses: dict[Listener, HostPort] = {}

    @property
    def addresses(self) -> dict[Listener, HostPort]:
        """Each listener's endpoint actually bound (the real port when the configuration says 0)."""
        if not self._addresses:
            raise RuntimeError("IngestServer is not started")
        return dict(self._addresses)

    @property
    def address(self) -> HostPort:
        """The ``listen`` listener's endpoint."""
        return self.addresses[Listener.LISTEN]

    async def start(self) -> None:
        self._addresses = {}
        endpoints = listeners.listener_addresses(self.config)
        profiles = self.config.ingest.tls_profiles
        contexts = {
            Listener.LISTEN: tlscert.server_context(self.config, profiles.listen),
            Listener.SUBMISSION: tlscert.server_context(self.config, profiles.submission),
        }
        if Listener.RELAY in endpoints:
            contexts[Listener.RELAY] = tlscert.platform_context(self.config, profiles.relay)
        self._redis = spool.connect_async(self.redis_url)
        directory = Directory(self.config)
        ingest = self.config.ingest
        # One group commit for all listeners: their messages share transactions.
        committer = commit.Committer(
            self._redis, self.config.trace_ttl, ingest.batch_window, ingest.batch_max,
            sessions=lambda: sum(len(h.connections) for h in self._handlers),
            min_replicas=self.config.redis_min_replicas,
            replica_timeout=self.config.redis_replica_timeout,
            task_window=ingest.task_window, task_max=self.config.delivery.batch_max,
        )  # fmt: skip
        self._committer = committer
        metrics.prime_ingest(listener.value for listener in endpoints)
        try:
            for listener, endpoint in endpoints.items():
                handler = IngestHandler(self.config, self._redis, listener, directory, committer)
                self._handlers.append(handler)
                self._addresses[listener] = await self._listen(
                    handler, contexts[listener], endpoint
                )
        except BaseException:
            await self.stop()
            self._addresses = {}
            raise

    async def _listen(
        self, handler: IngestHandler, tls_context: ssl.SSLContext, endpoint: HostPort
    ) -> HostPort:
        loop = asyncio.get_running_loop()
        try:
            server = await loop.create_server(
                lambda: self._protocol(handler, tls_context, loop), endpoint.host, endpoint.port
            )
        except OSError as exc:
            # asyncio rewrites strerror ("error while attempting to bind..."); errno is kept.
            why = os.strerror(exc.errno) if exc.errno else str(exc)
            key = listeners.listener_key(self.config, handler.listener)
            raise ListenError(f"{key}: cannot listen on {endpoint}: {why}") from None
        self._servers.append(server)
        host, port = server.sockets[0].getsockname()[:2]
        return HostPort(host, port)

    def _protocol(
        self, handler: IngestHandler, tls_context: ssl.SSLContext, loop: asyncio.AbstractEventLoop
    ) -> IngestSMTP:
        return IngestSMTP(
            handler,
            data_size_limit=self.config.ingest.max_message_bytes,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=self.config.hostname,
            ident="ESMTP tlsrelay",
            tls_context=tls_context,
            # RFC 3207 §4: the relay endpoint takes nothing but EHLO/STARTTLS/NOOP/QUIT in clear.
            require_starttls=handler.listener is Listener.RELAY,
            # RFC 4954: submission takes mail only after AUTH, and AUTH only over TLS (538).
            auth_required=handler.offers_auth,
            auth_require_tls=True,
            timeout=self.config.ingest.command_timeout,
            loop=loop,
        )

    async def drain(self, grace: float) -> None:
        """SIGTERM: stop accepting (readiness fails first); sessions between transactions get
        ``421 4.3.2`` and are closed at once, those in a transaction get ``grace`` seconds to
        finish it (then the same); after that the rest answer ``421`` to their next command,
        and what is left is closed 10 s later."""
        health.INGEST.ready = False
        for server in self._servers:
            server.close()
        sessions = set().union(*(h.connections for h in self._handlers))
        for session in sessions:
            session.drain()
        await _wait_gone(sessions, grace)
        for session in sessions:
            session.refuse_new_commands()
        await _wait_gone(sessions, 10.0)

    async def stop(self) -> None:
        servers, handlers, redis = self._servers, self._handlers, self._redis
        self._servers, self._handlers, self._redis = [], [], None
        for server in servers:
            server.close()
        for server in servers:
            await server.wait_closed()
        for handler in handlers:
            await _close_sessions(handler.connections)
        committer, self._committer = self._committer, None
        if committer is not None:  # its writes end, and the policy task of what it stored
            await committer.close()
        if redis is not None:
            await redis.aclose()


async def _wait_gone(sessions: set[Connection], timeout: float) -> None:
    """Wait until every session in ``sessions`` has disconnected, or ``timeout`` passed."""
    deadline = time.monotonic() + timeout
    while any(s.transport is not None for s in sessions) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


async def _beat() -> None:
    """Liveness: prove the event loop runs (``/live`` turns 503 if this stops)."""
    while True:
        health.INGEST.beat = time.monotonic()
        await asyncio.sleep(1)


async def _close_sessions(connections: set[Connection], timeout: float = 5.0) -> None:
    """Close every open session and wait (bounded) until their connections are gone."""
    for connection in list(connections):
        connection.close()
    deadline = time.monotonic() + timeout
    while connections and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0)  # let the cancelled session tasks finish


def serve(config: Config, redis_url: str) -> None:
    """Run every configured listener until SIGTERM or SIGINT, then stop them all cleanly."""
    tlsbuffers.bound_read_buffers(READ_BUFFER)  # before any session: see READ_BUFFER
    eventloop.run(_serve(config, redis_url), config.event_loop)


async def _serve(config: Config, redis_url: str) -> None:
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    server = IngestServer(config, redis_url)
    await server.start()
    beat = asyncio.create_task(_beat())
    health.INGEST.ready = True
    try:
        for listener, address in server.addresses.items():
            print(f"ingest listening on smtp://{address} ({listener})", flush=True)
        if config.metrics.ingest is not None:  # served by the CLI before the listeners started
            print(f"ingest metrics on http://{config.metrics.ingest}/metrics", flush=True)
        await stopping.wait()
        log.info("draining: idle sessions closed; transactions get %ss", config.ingest.drain_grace)
        await server.drain(config.ingest.drain_grace)
    finally:
        beat.cancel()
        await server.stop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
