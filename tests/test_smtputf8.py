"""Internationalised addresses (RFC 6531): ingest takes them under SMTPUTF8; delivery passes
SMTPUTF8 on and sends the addresses in UTF-8 where the destination offers it — one command at a
time and in a PIPELINING group alike — and where it does not, the host refuses it permanently
(5.6.7, RFC 6531 §3.4) without a MAIL command: never a retry loop on an encoding error.
Real Redis, real SMTP peers on loopback."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis

from services.common import spool
from services.common.model import Decision, Envelope, TlsMode, new_message_id
from services.common.redisserver import EmbeddedRedis
from tests.badpeers import BadPeer
from tests.peers import Sink
from tests.test_batching import deliver, routed

BODY = b"Subject: gr\xc3\xbc\xc3\x9fe\r\n\r\nHallo.\r\n"
RECIPIENT = "j\u00fcrgen@x.test"
SENDER = "m\u00fcller@origin.test"


def queued(store: redis.Redis) -> dict[str, object]:
    """A stored message from and to a non-ASCII address, accepted with SMTPUTF8: its job."""
    envelope = Envelope(
        new_message_id(), SENDER, (RECIPIENT,), received_at=time.time(),
        mail_options=("SMTPUTF8",),
    )  # fmt: skip
    with store.pipeline(transaction=True) as pipe:
        spool.stage_message(pipe, envelope, BODY, spool.TRACE_TTL)
        pipe.execute()
    decision = Decision(domain="x.test", tls=TlsMode.OPPORTUNISTIC)
    return {"id": envelope.id, "domain": "x.test", "recipients": [RECIPIENT],
            "decision": decision.to_json(), "attempt": 1}  # fmt: skip


@pytest.mark.parametrize("pipelining", [False, True], ids=["one_by_one", "pipelined"])
def test_a_non_ascii_address_goes_in_utf8_to_a_host_offering_smtputf8(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis, pipelining: bool
) -> None:
    extensions = ("PIPELINING",) if pipelining else ()
    with Sink("plain", extensions=extensions) as sink:
        config = routed(tmp_path, valkey, "x.test", sink.address_text)
        (outcome,) = deliver(config, store, [queued(store)])
        assert outcome is not None and set(outcome.delivered) == {RECIPIENT}, outcome
        (message,) = sink.messages
    assert message.smtp_utf8 and message.mail_from == SENDER
    assert message.rcpt_tos == [RECIPIENT]


def test_a_host_without_smtputf8_refuses_a_non_ascii_address_permanently(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis
) -> None:
    with BadPeer("refuse_first_data") as peer:  # a normal session; EHLO offers no SMTPUTF8
        config = routed(tmp_path, valkey, "x.test", peer.address_text)
        (outcome,) = deliver(config, store, [queued(store)])
        assert peer.replies == [], "no MAIL command was sent"
    assert outcome is not None and not outcome.deferred, outcome
    (reply,) = outcome.bounced.values()
    assert (reply.code, reply.status) == (550, "5.6.7"), reply
    assert "SMTPUTF8" in reply.text
