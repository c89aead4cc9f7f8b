"""A deliver run killed after its outcome was recorded and before the message was finished (two
transactions: ``record``, then ``_finish_if_final``): its task comes back (``acks_late``), finds
every recipient final, and must finish the message — else the message stays in the spool forever
(found by ``make soak``: 16 of 20 000 messages delivered, never completed).

Real Redis (the ``store`` fixture); the Deliverer's own code; the crash is the state it leaves.
"""

from __future__ import annotations

import asyncio
import json
import time

import redis

from services.common import spool
from services.common.config import Config
from services.common.model import Decision, Envelope, new_message_id
from services.deliver.batch import Deliverer


def test_a_rerun_finishes_a_message_whose_recipients_were_all_recorded(
    store: redis.Redis,
) -> None:
    envelope = Envelope(
        id=new_message_id(), sender="s@origin.test", recipients=("a@d.test",),
        received_at=time.time(),
    )  # fmt: skip
    with store.pipeline(transaction=True) as pipe:
        spool.stage_message(pipe, envelope, b"Subject: x\r\n\r\nbody\r\n", spool.TRACE_TTL)
        pipe.execute()
    # What `record` committed before the worker died: the recipient is final.
    state = {"state": "delivered", "reply": "250 2.0.0 OK", "at": time.time()}
    store.hset(spool.rcpt_key(envelope.id), "a@d.test", json.dumps(state))
    job = {
        "id": envelope.id, "domain": "d.test", "recipients": ["a@d.test"], "attempt": 1,
        "decision": Decision(domain="d.test").to_json(),
    }  # fmt: skip

    outcome = asyncio.run(Deliverer(Config(hostname="relay.test"), store).run(job))

    assert outcome is None, "nothing is sent again"
    assert not store.exists(spool.msg_key(envelope.id)), "the message stayed in the spool"
    assert spool.read_trace(store, envelope.id)[-1]["event"] == "completed"
