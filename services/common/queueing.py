"""Celery task messages as plain Redis values, so a task can ride in our own Redis transaction.

Why: "250" must mean the message *and* its task are durable (CONVENTIONS §4), and a task must
never be enqueued for a message that was not stored. Celery's ``send_task`` is a separate Redis
round trip outside any transaction. Instead we build exactly the document kombu's Redis transport
would ``LPUSH`` (Celery task protocol 2, kombu virtual-channel envelope, base64 body) and push it
in the same ``MULTI``/``EXEC`` (or Lua script) as our own writes. Real Celery workers consume it;
the end-to-end tests prove the format.

Celery queues here use a direct exchange named like the queue, with routing key = queue name, so
the Redis list key is the queue name (priority 0) under kombu's ``global_keyprefix``, which is our
own ``tlsrelay:`` (:data:`KEY_PREFIX`): ``tlsrelay:policy``, ``tlsrelay:deliver``, and kombu's
``tlsrelay:unacked`` / ``tlsrelay:unacked_index`` — so tlsrelay can share a Redis database. kombu
prefixes inside its client; every direct reader or writer of those keys uses the names here.

Tasks carry batches (a list of message ids, a list of delivery jobs): the Celery hop costs a few
milliseconds of CPU per task, so one task per message would cap the relay (bench/README.md).
Payloads are ids and small job documents, never bodies.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

T = TypeVar("T")

KEY_PREFIX = "tlsrelay:"  # kombu's global_keyprefix: the same namespace as the spool's keys
QUEUE_POLICY = "policy"  # Celery queue names (kombu adds KEY_PREFIX to their Redis lists)
QUEUE_DELIVER = "deliver"
POLICY_LIST = KEY_PREFIX + QUEUE_POLICY  # the Redis lists we LPUSH task documents to
DELIVER_LIST = KEY_PREFIX + QUEUE_DELIVER
LISTS = {QUEUE_POLICY: POLICY_LIST, QUEUE_DELIVER: DELIVER_LIST}

TASK_CLASSIFY = "tlsrelay.policy.classify"
TASK_DELIVER = "tlsrelay.deliver.deliver"

ORIGIN = "tlsrelay"


def task_payload(
    task_name: str, args: list[Any], queue: str, task_id: str | None = None, retries: int = 0
) -> str:
    """The JSON string kombu's Redis transport stores for one Celery task (protocol 2);
    ``retries`` is how often this work already failed (the task sees ``request.retries``)."""
    task_id = task_id or str(uuid.uuid4())
    body = json.dumps(
        [args, {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    )
    headers: dict[str, Any] = {
        "lang": "py",
        "task": task_name,
        "id": task_id,
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": retries,
        "timelimit": [None, None],
        "root_id": task_id,
        "parent_id": None,
        "argsrepr": repr(args)[:200],
        "kwargsrepr": "{}",
        "origin": ORIGIN,
        "ignore_result": True,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
    }
    message = {
        "body": base64.b64encode(body.encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": headers,
        "properties": {
            "correlation_id": task_id,
            "reply_to": "",
            "delivery_mode": 2,
            "delivery_info": {"exchange": queue, "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    return json.dumps(message)


def classify_task(message_ids: list[str]) -> str:
    """The ``policy`` task for a batch of accepted messages (one ingest commit, see
    :class:`services.common.commit.Committer`)."""
    return task_payload(TASK_CLASSIFY, [message_ids], QUEUE_POLICY)


def domain_batches(items: Iterable[T], batch_max: int, domain: Callable[[T], str]) -> list[list[T]]:
    """``items`` grouped by ``domain(item)``, in order, in batches of at most ``batch_max``: one
    ``deliver`` task each, so one worker sends a domain's messages over one connection."""
    by_domain: dict[str, list[T]] = {}
    for item in items:
        by_domain.setdefault(domain(item), []).append(item)
    return [g[i : i + batch_max] for g in by_domain.values() for i in range(0, len(g), batch_max)]


def deliver_task(jobs: list[dict[str, Any]]) -> str:
    """The ``deliver`` task for a batch of (message, destination domain) jobs, all for one
    destination domain (so one worker delivers them over one reused connection)."""
    return task_payload(TASK_DELIVER, [jobs], QUEUE_DELIVER)


# kombu's Redis transport: tasks reserved by a worker and not yet acked (tag -> [message,
# exchange, routing key]), and when each was reserved (tag -> unix time).
UNACKED = KEY_PREFIX + "unacked"
UNACKED_INDEX = KEY_PREFIX + "unacked_index"


def task_batch(raw: bytes | str) -> tuple[str, list[Any]] | None:
    """(task name, its batch) of a task as stored in a queue list — or, given the first element
    of an ``unacked`` entry, as reserved; None for anything else. A bare id or job (a task from
    before batches) comes back as a batch of one."""
    try:
        message = json.loads(raw)
        (batch,), _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        name = message["headers"]["task"]
    except (ValueError, KeyError, TypeError):
        return None
    return name, batch if isinstance(batch, list) else [batch]


def reserved(raw: bytes | str) -> str | None:
    """The task document inside one value of kombu's ``unacked`` hash ([message, exchange,
    routing key]), as :func:`task_batch` reads it; None when it is not one."""
    try:
        entry = json.loads(raw)
        return json.dumps(entry[0])
    except (ValueError, KeyError, IndexError, TypeError):
        return None
