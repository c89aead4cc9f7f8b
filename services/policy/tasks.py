"""The ``policy`` Celery task: load the message facts, call ``decide``, enqueue deliveries.

Idempotent: a message that already has decisions is not classified again (a task redelivered after
a worker crash would otherwise enqueue its deliveries twice). A message that is gone (already
final) is ignored. Redis errors propagate: the task is not acknowledged and runs again later.
"""

from __future__ import annotations

import logging

import redis
from celery import Celery

from services.common import queueing, spool
from services.common.config import Config
from services.policy.decide import MessageFacts, Ruleset, decide

log = logging.getLogger("tlsrelay.policy")


class PolicyService:
    def __init__(self, config: Config, redis_url: str) -> None:
        self.config = config
        self.redis_url = redis_url
        self.ruleset = Ruleset()
        self._client: redis.Redis | None = None

    @property
    def client(self) -> redis.Redis:
        if self._client is None:  # per process: created after the prefork fork
            self._client = spool.connect(self.redis_url)
        return self._client

    def classify(self, message_id: str) -> None:
        envelope = spool.load_envelope(self.client, message_id)
        if envelope is None or spool.is_classified(self.client, message_id):
            log.info("skip %s: gone or already classified", message_id)
            return
        decisions = decide(MessageFacts(envelope=envelope), self.ruleset)
        spool.record_classification(self.client, envelope, decisions)
        log.info("classified %s: %s", message_id, [d.to_json() for d in decisions])


def register(app: Celery, service: PolicyService) -> None:
    @app.task(name=queueing.TASK_CLASSIFY)  # type: ignore[untyped-decorator]
    def classify(message_id: str) -> None:
        service.classify(message_id)
