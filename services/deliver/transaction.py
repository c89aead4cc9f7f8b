"""One SMTP transaction on a session that is open, greeted and (where the TLS table says so)
encrypted: MAIL with its options, RCPT per recipient, DATA.

:func:`transaction` fills ``Attempt.replies`` with each recipient's fate, for this try: the
server's own reply, a refused sender's reply for every recipient, or a deferral of ours (RFC 3463
codes below) where the peer did not answer as SMTP says. It raises :class:`NextHost` when this
address is abandoned before the message was sent: the connection lost or a reply unreadable
before DATA, MAIL refused other than with a 5xx (or out of sequence), REQUIRETLS (5.7.30) or a
non-ASCII address without SMTPUTF8 (5.6.7) that this host cannot take. From DATA on nothing is
raised: every ending is a reply (RFC 1047: a connection lost after the final dot is deferred,
never final). An answer out of step sets ``Attempt.desync``: the session is then closed, never
reused.

When the server advertises PIPELINING (in the EHLO that counts: after STARTTLS, the one over
TLS), MAIL, every RCPT and DATA go in one write and their replies are read in order by
:mod:`services.deliver.pipelining` (RFC 2920); each recipient's fate is the one the same replies
give it command by command. STARTTLS itself and EHLO are never pipelined. Where it also
advertises CHUNKING (RFC 3030) the message itself joins the group as ``BDAT <size> LAST``
(``delivery.chunking``): one round trip per message; from that write on, a reply that does not
come defers (RFC 1047), as a lost reply to the final dot does.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import aiosmtplib

from services.common.model import Envelope, Reply
from services.common.protocol import REQUIRETLS
from services.deliver import pipelining
from services.deliver.attempt import Attempt, Hooks, Peer, Timeouts

# RFC 3463 codes for failures that have no server reply of their own.
CONNECTION_DROPPED = "4.4.2"  # RFC 3463: bad connection
PROTOCOL_ERROR = "4.5.0"  # RFC 3463: other or undefined protocol status (deferred, never final)
BAD_SEQUENCE = 503  # RFC 5321 §4.2.4: bad sequence of commands


class NextHost(Exception):
    """Abandon this address; carries the reply to record."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


async def transaction(
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
        if timeouts.chunking and smtp.supports_extension("chunking") and chunking_for(result.peer):
            await _chunked(smtp, group, body, result, hooks, timeouts)
        else:
            await _pipelined(smtp, group, body, result, hooks, timeouts)
        return
    if reset:  # (not reached today: _reusable leaves the check in the group only when pipelining)
        try:
            await smtp.rset()
        except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
            raise NextHost(Reply(421, CONNECTION_DROPPED, text(exc))) from None
    await hooks.before_mail(result.peer)  # may wait (no reply outstanding): see Hooks
    try:
        await smtp.mail(envelope.sender, options=options, encoding=encoding)
    except aiosmtplib.SMTPResponseException as exc:
        heard(result, exc.code, exc.message)
        _mail_refused(exc.code, exc.message, recipients, result)
        return
    except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
        raise NextHost(Reply(421, CONNECTION_DROPPED, text(exc))) from None
    accepted = await _recipients(smtp, recipients, result, encoding)
    if accepted:
        hooks.before_data_now(result.peer)  # no await before DATA here: see Hooks
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
            heard(result, exc.code, exc.message)
            result.replies[rcpt] = _rcpt_refused(exc.code, exc.message)
        except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
            raise NextHost(Reply(421, CONNECTION_DROPPED, text(exc))) from None
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
    transport = smtp.transport  # aiosmtplib lets go of it when it gives up (below)
    try:
        response = await smtp.data(body, timeout=timeout)
    except aiosmtplib.SMTPResponseException as exc:
        if not 400 <= exc.code < 600:
            result.desync = True
            return Reply(451, PROTOCOL_ERROR, f"protocol error: {_reply(exc)} in reply to DATA")
        return server_reply(exc)
    except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
        # aiosmtplib closed the session; a message the peer stopped reading is still in the
        # transport, which a close keeps until it drains: dropped (pipelining.hang_up).
        pipelining.drop_unsent(transport)
        # RFC 1047: after the final dot the message may have arrived; we cannot know. Defer.
        return Reply(451, CONNECTION_DROPPED, f"connection lost during DATA: {text(exc)}")
    result.clean = True
    return Reply.parse(response.code, response.message)


def _mail_refused(code: int, message: str, recipients: Sequence[str], result: Attempt) -> None:
    """MAIL got ``code``, not 250: a refused sender is every recipient's reply (5xx), anything
    else is the next host's turn."""
    if code == BAD_SEQUENCE:  # the server still holds a transaction: never a bounce
        result.desync = True
        why = f"MAIL out of sequence: {code} {message[:200]}"
        raise NextHost(Reply(451, PROTOCOL_ERROR, why))
    if code >= 500:  # the sender is refused: the same for every recipient
        result.replies = dict.fromkeys(recipients, _peer_reply(code, message))
        return
    raise NextHost(_peer_reply(code, message))


@dataclass(frozen=True)
class _Group:
    """What one pipelined group says: [RSET], MAIL with its options, RCPT each, DATA."""

    sender: str
    options: list[str]
    recipients: Sequence[str]
    reset: bool = False
    encoding: str = "ascii"  # of the addresses: utf-8 under SMTPUTF8 (RFC 6531)

    def commands(self, chunk: int | None = None) -> bytes:
        """The group's command lines; ``chunk``: ``BDAT <chunk> LAST`` in DATA's place."""
        reset = b"RSET\r\n" if self.reset else b""
        return reset + pipelining.envelope_commands(
            self.sender, self.options, self.recipients, self.encoding, chunk
        )


async def _pipelined(
    smtp: aiosmtplib.SMTP,
    group: _Group,
    body: bytes,
    result: Attempt,
    hooks: Hooks,
    timeouts: Timeouts,
) -> None:
    """:func:`transaction` as one group (RFC 2920): MAIL, every RCPT and DATA in one write,
    their replies read in order, the message sent after DATA's ``354`` only when a recipient was
    accepted (§3.1). Each recipient gets the fate the same replies give it one command at a
    time; the session is kept only when every reply was read and nothing more was said. A
    reply to MAIL or RCPT that is not an SMTP reply leaves the rest unpaired: next host (the
    message was not sent). A parked session's RSET may lead the group: anything but 250 to it
    is a session that died while parked (next host, nothing sent: a fresh session is tried)."""
    commands, recipients = group.commands(), group.recipients
    try:
        with pipelining.Pipeline(smtp) as pipe:
            await pipe.send(commands)
            if group.reset:
                reset = await _group_reply(pipe, timeouts.command, result)
                if reset.code != 250:
                    why = f"parked session answered RSET with {reset.code} {reset.text[:200]}"
                    raise NextHost(Reply(421, CONNECTION_DROPPED, why))
            mail = await _group_reply(pipe, timeouts.command, result)
            if mail.code != 250:
                heard(result, mail.code, mail.text)
                _mail_refused(mail.code, mail.text, recipients, result)
                return  # the rest of the group is not read: the session is closed
            accepted = []
            for rcpt in recipients:
                reply = await _group_reply(pipe, timeouts.command, result)
                if reply.code in (250, 251):  # aiosmtplib's rcpt() accepts exactly these
                    accepted.append(rcpt)
                else:
                    heard(result, reply.code, reply.text)
                    result.replies[rcpt] = _rcpt_refused(reply.code, reply.text)
            if not accepted:
                await _no_data(pipe, timeouts.command)
                return
            result.data_sent = True
            end = await _pipelined_data(pipe, body, result, hooks, timeouts.data)
            result.replies.update(dict.fromkeys(accepted, end))
    except pipelining.Disconnected as exc:  # a parked session that died: nothing was sent
        raise NextHost(Reply(421, CONNECTION_DROPPED, text(exc))) from None


async def _chunked(
    smtp: aiosmtplib.SMTP,
    group: _Group,
    body: bytes,
    result: Attempt,
    hooks: Hooks,
    timeouts: Timeouts,
) -> None:
    """:func:`_pipelined` where the server also offers CHUNKING (RFC 3030): the message goes in
    the group itself, as one ``BDAT <size> LAST`` chunk after the RCPTs — one round trip per
    message, not two (as Exim sends it). The server reads the whole chunk whatever it made of
    MAIL and RCPT and answers it last (§2: refused when no recipient was accepted).

    From the write on the message may have been taken even if no reply comes: a pipelining
    server answers the group once it has done all of it, so the replies to MAIL and RCPT can be
    lost with the one to BDAT after the message was queued (RFC 1047). So an ending that is not
    a reply is a deferral (``451 4.4.2``), never the next host, once the group is written. The
    ways to the next host (a fresh session first, for a parked one): a connection cut while the
    group was being written (the chunk never arrived whole); a refused MAIL (no transaction; but
    ``503``, out of sequence, is unsure: a transaction still open may have taken the chunk); a
    parked session that closed the connection with no reply at all to the RSET leading the
    group, or a refusal of it and nothing more (:class:`_Stale`: closed while parked, an idle
    timeout's ``421`` — a server does not queue a message in a session it has dropped, and
    answers in order). A parked session that is still open but slow to answer is not one."""
    data = pipelining.chunk_data(body)
    commands, recipients = group.commands(len(data)), group.recipients
    await hooks.before_data(result.peer)  # the in-flight mark (RFC 1047) before the message
    try:
        with pipelining.Pipeline(smtp) as pipe:
            try:
                await pipe.send(commands + data)
            except pipelining.Disconnected as exc:  # the chunk was cut short: not taken
                raise NextHost(Reply(421, CONNECTION_DROPPED, text(exc))) from None
            result.data_sent = True
            await _chunked_replies(pipe, group, result, timeouts)
    except pipelining.Disconnected as exc:  # the session was closed before the write
        raise NextHost(Reply(421, CONNECTION_DROPPED, text(exc))) from None
    except _Stale as exc:
        result.data_sent = False  # nothing was taken: a fresh session may carry it at once
        raise NextHost(Reply(421, CONNECTION_DROPPED, str(exc))) from None
    for rcpt in recipients:  # whatever has no fate of its own was in the lost part
        result.replies.setdefault(rcpt, Reply(451, CONNECTION_DROPPED, "no reply"))


async def _chunked_replies(
    pipe: pipelining.Pipeline, group: _Group, result: Attempt, timeouts: Timeouts
) -> None:
    """The replies to a chunked group, in order: [RSET], MAIL, each RCPT, BDAT. A reply that
    does not come (or is not a reply) defers the recipients without a fate yet, with what went
    wrong (:func:`_unsure`).

    Every one of them is awaited up to the data timeout (RFC 5321 §4.5.3.2.6, the final dot's),
    never the command timeout: a pipelining server answers the group once it has done all of it
    — read the chunk (whose transfer the timer also covers: the write only queued it) and
    checked and queued the message — so its reply to the RSET or the MAIL leading the group
    comes as late as DATA's final reply does. Cut at the command timeout, a message the server
    takes a while to take would be deferred and sent again at every retry, queued each time."""
    accepted: list[str] = []
    wait = timeouts.data
    try:
        if group.reset:
            await _parked_check(pipe, wait, result)
        try:
            mail = await pipe.reply(wait)
        except pipelining.Disconnected as exc:
            if group.reset and result.desync:  # RSET refused, then closed: an idle timeout
                raise _Stale(f"parked session refused RSET and closed: {text(exc)}") from None
            raise
        if mail.code == BAD_SEQUENCE:  # a transaction still open took our RCPTs and chunk?
            heard(result, mail.code, mail.text)
            result.desync = True
            why = f"MAIL out of sequence: {mail.code} {mail.text[:200]}"
            _unsure(result, group.recipients, Reply(451, PROTOCOL_ERROR, why))
            return
        if mail.code != 250:
            heard(result, mail.code, mail.text)
            _mail_refused(mail.code, mail.text, group.recipients, result)
            return  # no transaction, nothing taken; the rest is not read: the session closes
        for rcpt in group.recipients:
            reply = await pipe.reply(wait)
            if reply.code in (250, 251):
                accepted.append(rcpt)
            else:
                heard(result, reply.code, reply.text)
                result.replies[rcpt] = _rcpt_refused(reply.code, reply.text)
        end = await pipe.reply(wait)
    except pipelining.Malformed as exc:
        result.desync = True
        _unsure(result, group.recipients, Reply(451, PROTOCOL_ERROR, f"invalid SMTP reply: {exc}"))
        return
    except (TimeoutError, pipelining.ReplyError) as exc:
        why = f"connection lost during BDAT: {text(exc)}"
        _unsure(result, group.recipients, Reply(451, CONNECTION_DROPPED, why))
        return
    _chunk_end(pipe, end, accepted, result)


class _Stale(Exception):
    """A parked session was gone before the group reached it: nothing was taken."""


async def _parked_check(pipe: pipelining.Pipeline, timeout: float, result: Attempt) -> None:
    """The reply to the RSET leading a parked session's group: the connection closed without
    one is a session that was closed while parked (:class:`_Stale`); anything but ``250`` marks
    it not to be kept. No reply *in time* is not that: the connection is open, and the server
    may be checking the message it read before it answers (a ``TimeoutError``: deferred, as
    any reply lost after the chunk went; a fresh session at once would deliver it twice)."""
    try:
        reset = await pipe.reply(timeout)
    except pipelining.Disconnected as exc:
        raise _Stale(f"parked session gave no reply to RSET: {text(exc)}") from None
    if reset.code != 250:
        result.desync = True


def _chunk_end(
    pipe: pipelining.Pipeline, end: pipelining.RawReply, accepted: list[str], result: Attempt
) -> None:
    """BDAT's reply: exactly ``250`` delivers to the accepted recipients; 4xx/5xx is their
    fate; anything else is a protocol error (deferred 4.5.0, the session closed). With no
    recipient accepted it must be a refusal (else the server is out of step: closed)."""
    if not accepted:
        if 400 <= end.code < 600 and not result.desync:
            pipe.finish()
        return
    if end.code == 250:
        result.clean = True
        result.replies.update(dict.fromkeys(accepted, Reply.parse(end.code, end.text)))
    elif end.code in NOT_UNDERSTOOD:
        # BDAT itself not understood by a server that offered CHUNKING: it read the chunk as
        # commands (what it says next cannot be paired), and the message was never judged —
        # a protocol error (deferred, never a bounce), and DATA to this peer from now on.
        result.desync = True
        _no_chunking(result.peer)
        why = f"protocol error: {end.code} {end.text[:200]} in reply to BDAT (CHUNKING offered)"
        result.replies.update(dict.fromkeys(accepted, Reply(451, PROTOCOL_ERROR, why)))
        return
    elif 400 <= end.code < 600:
        heard(result, end.code, end.text)
        result.replies.update(dict.fromkeys(accepted, _peer_reply(end.code, end.text)))
    else:
        result.desync = True
        why = f"protocol error: {end.code} {end.text[:200]} in reply to BDAT"
        result.replies.update(dict.fromkeys(accepted, Reply(451, PROTOCOL_ERROR, why)))
        return
    if not result.desync:
        pipe.finish()


# Replies to a well-formed BDAT after an accepted RCPT that say the command itself was not
# understood (RFC 5321 §4.2.3: syntax error, parameters, not implemented; 503: out of sequence).
NOT_UNDERSTOOD = frozenset({500, 501, 502, 503, 504})
NO_CHUNKING_FOR = 24 * 3600.0  # s: how long a peer that did not understand BDAT gets DATA
NO_CHUNKING_KEEP = 10_000  # peers remembered at most (the oldest are forgotten first)
_no_chunking_until: dict[tuple[str, int], float] = {}  # (address, port) → until (monotonic)


def _no_chunking(peer: Peer) -> None:
    """Remember that ``peer`` offers CHUNKING but does not understand BDAT (this process)."""
    key = (peer.address, peer.port)
    _no_chunking_until.pop(key, None)  # newest last: the oldest are dropped first
    _no_chunking_until[key] = time.monotonic() + NO_CHUNKING_FOR
    while len(_no_chunking_until) > NO_CHUNKING_KEEP:
        del _no_chunking_until[next(iter(_no_chunking_until))]


def chunking_for(peer: Peer) -> bool:
    """Whether BDAT may go to ``peer`` (not remembered as not understanding it)."""
    until = _no_chunking_until.get((peer.address, peer.port))
    return until is None or until <= time.monotonic()


def forget_chunking() -> None:
    """Forget every peer remembered by :func:`_no_chunking` (tests)."""
    _no_chunking_until.clear()


def _unsure(result: Attempt, recipients: Sequence[str], reply: Reply) -> None:
    """The chunk was written and its fate is unknown (RFC 1047): deferred, never final."""
    for rcpt in recipients:
        result.replies.setdefault(rcpt, reply)


async def _group_reply(
    pipe: pipelining.Pipeline, timeout: float, result: Attempt
) -> pipelining.RawReply:
    """The next reply to MAIL or RCPT; unreadable → next host (as a lost connection is when the
    commands go one by one)."""
    try:
        return await pipe.reply(timeout)
    except pipelining.Malformed as exc:
        result.desync = True
        raise NextHost(Reply(451, PROTOCOL_ERROR, f"invalid SMTP reply: {exc}")) from None
    except (TimeoutError, pipelining.ReplyError) as exc:
        raise NextHost(Reply(421, CONNECTION_DROPPED, text(exc))) from None


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
            await hooks.before_data(result.peer)
            await pipe.send(pipelining.message_data(body))
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
        return Reply(451, CONNECTION_DROPPED, f"connection lost during DATA: {text(exc)}")
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
                raise NextHost(Reply(550, "5.7.30", f"REQUIRETLS not supported by {host}"))
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
        raise NextHost(Reply(550, "5.6.7", why))
    return "ascii"


def heard(result: Attempt, code: int, message: str) -> None:
    """Note the destination's reply line (a real reply, not aiosmtplib's code -1) for the
    back-off patterns (services/deliver/shaping.py)."""
    if 200 <= code < 600:
        result.server_replies.append(f"{code} {' '.join(message.split())[:500]}")


def server_reply(exc: aiosmtplib.SMTPResponseException) -> Reply:
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


def text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip().rstrip(":")
