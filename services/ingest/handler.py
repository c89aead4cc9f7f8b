"""The aiosmtpd hooks of one listener: what EHLO offers, who may send what where, AUTH, storing.

:class:`IngestHandler` answers EHLO, MAIL, RCPT and DATA (aiosmtpd's ``handle_<VERB>`` hooks,
each returning its reply), checks AUTH credentials for the session
(:mod:`services.ingest.session`) and stores each message with its ``policy`` task through
:class:`services.common.commit.Committer`. Who may send what where is
:mod:`services.ingest.access` (pure); the Redis counters (failed AUTHs, messages per tenant) are
:mod:`services.ingest.limits`. The replies are those of the contract in
:mod:`services.ingest.server`, named in :mod:`services.ingest.replies`.

Failure behaviour: every Redis call goes through :func:`from_redis`: when Redis is unreachable,
fails or is too slow, the error is logged and the command is answered ``451 4.3.0``
(:data:`~services.ingest.replies.TEMPFAIL`): nothing is accepted without its checks, and
``250`` after DATA means the message and its task are committed. An unexpected exception in a
command is logged and answered ``451 4.3.0`` (:meth:`IngestHandler.handle_exception`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Final, ParamSpec, Protocol, TypeVar

import redis.asyncio as aioredis
from aiosmtpd.smtp import SMTP, Session, TLSSetupException
from aiosmtpd.smtp import Envelope as SmtpEnvelope
from redis.exceptions import RedisError

from services.common import commit, metrics, spool
from services.common.config import Config
from services.common.listeners import Listener
from services.common.model import Envelope, has_tls_required_no, new_message_id
from services.common.protocol import REQUIRETLS
from services.common.tenants import Directory
from services.ingest import access, limits, replies
from services.ingest.adapter import IngestSession
from services.ingest.message import (
    client_certificate,
    client_ip,
    inbound_tls,
    raw_content,
    received_header,
    with_keyword,
)

log = logging.getLogger("tlsrelay.ingest")

ACCEPT_TIMEOUT = 30.0  # seconds for the spool transaction; the client waits 10 min (RFC 5321)
ID_ATTEMPTS = 3  # message ids tried when one is taken (64 random bits: practically never)
CHECK_TIMEOUT = 10.0  # seconds for a limit counter (AUTH, MAIL); RFC 5321 §4.5.3.2: 5 min
# aiosmtpd's built-in mechanisms; our handle_EHLO advertises them (submission, over TLS only).
AUTH_MECHANISMS: Final = ("LOGIN", "PLAIN")
_REDIS_ERRORS = (RedisError, OSError, TimeoutError)
_FORBIDDEN_IN_ADDRESS = re.compile("[\r\n\0]")

_T = TypeVar("_T")
_P = ParamSpec("_P")


# --------------------------------------------------------------------------- Redis or 451


class RedisUnavailable(Exception):
    """Redis failed or was too slow for a check or a commit; the error has been logged."""


async def from_redis(call: Awaitable[_T], timeout: float, failure: str, *args: object) -> _T:
    """``call``'s result within ``timeout`` seconds; else log ``failure % args`` with the error
    and raise :class:`RedisUnavailable` (a hook wrapped in :func:`tempfail_without_redis`
    then answers ``451 4.3.0``)."""
    try:
        return await asyncio.wait_for(call, timeout)
    except _REDIS_ERRORS as exc:
        log.error(failure + ": %s: %s", *args, type(exc).__name__, exc)
        raise RedisUnavailable from exc


def tempfail_without_redis(
    hook: Callable[_P, Awaitable[_T]],
) -> Callable[_P, Awaitable[_T | str]]:
    """``hook``, answering :data:`~services.ingest.replies.TEMPFAIL` when Redis is unavailable."""

    @functools.wraps(hook)
    async def answered(*args: _P.args, **kwargs: _P.kwargs) -> _T | str:
        try:
            return await hook(*args, **kwargs)
        except RedisUnavailable:
            return replies.TEMPFAIL

    return answered


# --------------------------------------------------------------------------- the handler


class Connection(Protocol):
    """What the server needs of an open session (:class:`services.ingest.session.IngestSMTP`)."""

    @property
    def transport(self) -> asyncio.BaseTransport | None: ...

    def close(self) -> None: ...

    def drain(self) -> None: ...

    def refuse_new_commands(self) -> None: ...


class IngestHandler:
    """The aiosmtpd hooks of one listener: envelope checks and storing a message in the spool."""

    def __init__(
        self,
        config: Config,
        redis: aioredis.Redis,
        listener: Listener = Listener.LISTEN,
        directory: Directory | None = None,
        committer: commit.Committer | None = None,
    ) -> None:
        self.config = config
        self.redis = redis
        self.committer = committer or commit.Committer(
            redis, config.trace_ttl, config.ingest.batch_window, config.ingest.batch_max,
            min_replicas=config.redis_min_replicas, replica_timeout=config.redis_replica_timeout,
            task_window=config.ingest.task_window, task_max=config.delivery.batch_max,
        )  # fmt: skip
        self.listener = listener
        self.directory = directory if directory is not None else Directory(config)
        self.connections: set[Connection] = set()  # the open sessions, added by each session

    @property
    def offers_auth(self) -> bool:
        return self.listener is Listener.SUBMISSION

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: SmtpEnvelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        extensions = [
            f"SIZE {self.config.ingest.max_message_bytes}",
            "8BITMIME",
            "SMTPUTF8",
            "PIPELINING",
            "ENHANCEDSTATUSCODES",
        ]
        if session.ssl is None:
            if server.tls_context is not None:
                extensions.append("STARTTLS")
        else:
            extensions.append(REQUIRETLS)  # RFC 8689 §4: only where it can be honoured
            if self.offers_auth:  # RFC 4954 §4: no plaintext passwords over a clear channel
                extensions.append("AUTH " + " ".join(AUTH_MECHANISMS))
        lines = [server.hostname, *extensions, "HELP"]
        return [f"250-{line}" for line in lines[:-1]] + [f"250 {lines[-1]}"]

    @tempfail_without_redis
    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: SmtpEnvelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        if _FORBIDDEN_IN_ADDRESS.search(address) or _has_surrogates(address):
            return replies.BAD_SENDER_SYNTAX
        if not address.isascii() and not envelope.smtp_utf8:
            return replies.NON_ASCII_NEEDS_SMTPUTF8
        requiretls: tuple[str, ...] = getattr(server, "mail_requiretls", ())  # see IngestSMTP
        refusal = _requiretls_refusal(requiretls, session)
        if refusal is not None:
            return refusal
        if not access.may_send_as(self.listener, self.directory, _auth_tenant(session), address):
            return replies.SENDER_NOT_OWNED
        refusal = await self._rate_refusal(session)
        if refusal is not None:
            return refusal
        envelope.mail_from = address  # "<>" for the null reverse-path (kept truthy for aiosmtpd)
        envelope.mail_options = [o for o in mail_options if not o.startswith("SIZE=")]
        envelope.mail_options.extend(requiretls)
        return replies.SENDER_OK

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: SmtpEnvelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if _FORBIDDEN_IN_ADDRESS.search(address) or _has_surrogates(address) or address == "<>":
            return replies.BAD_RECIPIENT_SYNTAX
        if not address.isascii() and not envelope.smtp_utf8:
            return replies.NON_ASCII_NEEDS_SMTPUTF8
        if len(envelope.rcpt_tos) >= self.config.ingest.max_recipients:
            return replies.TOO_MANY_RECIPIENTS
        if not self._may_relay(session, address):
            return replies.RELAY_DENIED
        envelope.rcpt_tos.append(address)
        return replies.RECIPIENT_OK

    def _may_relay(self, session: Session, rcpt: str) -> bool:
        """Whether this client may send mail to ``rcpt`` on this listener (see access.py)."""
        authenticated = bool(session.authenticated)
        return access.may_relay(
            self.listener, self.directory, client_ip(session), authenticated, rcpt
        )

    def _sending_tenant(self, session: Session) -> str | None:
        return access.sending_tenant(
            self.listener, self.directory, client_ip(session), _auth_tenant(session)
        )

    async def _rate_refusal(self, session: Session) -> str | None:
        """``451 4.7.0`` when the sending tenant is over its ``rate_limit`` (this MAIL counts)."""
        tenant = self._sending_tenant(session)
        limit = self.directory.tenants[tenant].rate_limit if tenant is not None else None
        if tenant is None or limit is None:
            return None
        count = await from_redis(
            limits.count_message(self.redis, tenant, limit),
            CHECK_TIMEOUT,
            "rate limit of tenant %s unknown, MAIL refused",
            tenant,
        )
        if count > limit.count:
            log.info("tenant %s over its rate limit %s: MAIL refused", tenant, limit)
            return replies.RATE_LIMITED
        return None

    # ----------------------------------------------------------------------- AUTH (submission)
    # No method of a handler may be named auth_*: aiosmtpd would offer it as a mechanism.

    @tempfail_without_redis
    async def refusal_before_auth(self, session: Session) -> str | None:
        """Before an AUTH exchange: 421 once this client failed too often, 451 if unknown."""
        address = client_ip(session)
        failures = await from_redis(
            limits.auth_failures(self.redis, address),
            CHECK_TIMEOUT,
            "AUTH from %s refused, failure count unknown",
            address,
        )
        if failures >= self.config.ingest.auth_failure_limit:
            log.warning("AUTH from %s refused: %d failures in the window", address, failures)
            return replies.AUTH_TOO_MANY_FAILURES
        return None

    @tempfail_without_redis
    async def authenticate(self, session: Session, login: bytes, password: bytes) -> str | None:
        """Check a login (scrypt, in a worker thread); None when it is valid, else the reply.

        On success the session records the tenant and login; a failure is counted in Redis.
        """
        username = login.decode("utf-8", errors="replace")
        secret = password.decode("utf-8", errors="replace")
        loop = asyncio.get_running_loop()
        tenant = await loop.run_in_executor(None, self.directory.authenticate, username, secret)
        address = client_ip(session)
        if tenant is not None:
            session.tenant, session.auth_user = tenant, username
            log.info("%s authenticated as %s (tenant %s)", address, username, tenant)
            return None
        window = self.config.ingest.auth_failure_window
        failures = await from_redis(
            limits.record_auth_failure(self.redis, address, window),
            CHECK_TIMEOUT,
            "AUTH failure from %s not counted",
            address,
        )
        log.info("AUTH failed from %s (%d in the window)", address, failures)  # no login, ever
        return replies.AUTH_INVALID

    # ----------------------------------------------------------------------- DATA

    @tempfail_without_redis
    async def handle_DATA(self, server: SMTP, session: Session, envelope: SmtpEnvelope) -> str:
        for _ in range(ID_ATTEMPTS):  # a new id (and Received: field) when one is taken
            stored, body = self._message(session, envelope)
            try:
                await from_redis(
                    self.committer.accept(stored, body),
                    ACCEPT_TIMEOUT,
                    "%s: not queued, spool unavailable",
                    stored.id,
                )
            except spool.IdTaken:
                log.warning("%s: id already in use, storing under a new one", stored.id)
                continue
            log.info("%s: queued from %s, %d bytes", stored.id, stored.client_address, stored.size)
            metrics.ingest_accepted(self.listener.value, stored.size)
            return replies.queued_as(stored.id)
        log.error("no free message id in %d attempts: not queued", ID_ATTEMPTS)
        return replies.TEMPFAIL

    def _message(self, session: Session, envelope: SmtpEnvelope) -> tuple[Envelope, bytes]:
        """The envelope (with a new id) and the body as stored, ``Received:`` field first."""
        stored = self._envelope(session, envelope)
        body = received_header(stored, self.config.hostname, with_keyword(session, envelope))
        body += raw_content(envelope)
        size, no_tls = len(body), has_tls_required_no(body)
        return dataclasses.replace(stored, size=size, tls_required_no=no_tls), body

    def _envelope(self, session: Session, envelope: SmtpEnvelope) -> Envelope:
        sender = envelope.mail_from or ""
        return Envelope(
            id=new_message_id(),
            sender="" if sender == "<>" else sender,
            recipients=tuple(envelope.rcpt_tos),
            mail_options=tuple(envelope.mail_options),
            client_address=client_ip(session),
            client_helo=session.host_name or "",
            inbound_tls=inbound_tls(session),
            received_at=time.time(),
            listener=self.listener.value,
            tenant=self._sending_tenant(session),
            auth_user=session.auth_user if isinstance(session, IngestSession) else None,
            client_cert=client_certificate(session),
        )

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, TLSSetupException):  # a failed handshake; aiosmtpd closes the session
            log.info("STARTTLS handshake failed: %r", error.__cause__)
        else:
            log.error("SMTP session error", exc_info=error)
        return replies.INTERNAL_ERROR


def _requiretls_refusal(requiretls: tuple[str, ...], session: Session) -> str | None:
    """RFC 8689 §4.1: REQUIRETLS takes no value, once, and only in a TLS session."""
    if any(option != REQUIRETLS for option in requiretls):
        return replies.REQUIRETLS_WITH_VALUE
    if len(requiretls) > 1:
        return replies.REQUIRETLS_TWICE
    if requiretls and session.ssl is None:
        return replies.REQUIRETLS_IN_CLEAR
    return None


def _auth_tenant(session: Session) -> str | None:
    return session.tenant if isinstance(session, IngestSession) else None


def _has_surrogates(text: str) -> bool:
    """True when ``text`` came from bytes that were not valid UTF-8 (surrogateescape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
