"""The ``policy`` Celery task: load the message facts, call ``decide``, enqueue deliveries.

A task carries a batch of message ids (one ingest commit); its decisions and deliveries are
written in one transaction, all or nothing. Idempotent: a message that already has decisions is
not classified again (a task redelivered after a worker crash would otherwise enqueue its
deliveries twice), checked again under ``WATCH`` in the writing transaction, so two copies of a
task running at the same time queue one set of deliveries (``spool.record_classifications``).
A message that is gone (already final) is ignored. The body is read from
Redis only when a rule looks at content (``Ruleset.needs_content``). Anything that raises (a Redis
error, ``WRONGTYPE`` included) parks the task for a retry with backoff (services/common/retry.py):
never dropped, never a hot loop.

Rules reload on SIGHUP (replacing Celery's handler, which re-execs the worker and so would turn a
bad file into a dead service): the main process re-reads the config file; a bad file is logged
("rules reload failed, keeping the old rules: ...") and changes nothing; a good one bumps a
generation counter in shared memory (created before the prefork pool forks). Each pool process
compares it before its next task and then loads the rules from the file itself; if that fails
(the file changed again in between) it keeps its rules and logs the error. The handler is
installed on ``worker_ready``; a SIGHUP before that (while connecting to the broker) still has
Celery's meaning.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
from collections.abc import Iterator
from types import FrameType

import redis
from celery import Celery, Task
from celery.signals import worker_ready

from services.common import metrics, queueing, retry, spool
from services.common.config import Config, load_config
from services.common.model import Envelope
from services.policy.decide import Ruleset, decide
from services.policy.facts import facts_from_message

log = logging.getLogger("tlsrelay.policy")


class PolicyService:
    def __init__(self, config: Config, redis_url: str) -> None:
        self.config = config
        self.redis_url = redis_url
        self.ruleset = Ruleset.from_config(config)
        # Shared memory read by the pool processes (forked after this, they inherit it). Only
        # the main process writes it, so no lock: a reader killed mid-read cannot wedge others.
        self.generation = multiprocessing.Value("i", 0, lock=False)
        self._seen = 0  # the generation this process's ruleset belongs to
        self._client: redis.Redis | None = None

    @property
    def client(self) -> redis.Redis:
        if self._client is None:  # per process: created after the prefork fork
            self._client = spool.connect(self.redis_url)
        return self._client

    def classify(self, message_ids: list[str]) -> None:
        """Classify a batch (one ingest commit): one pipelined read, ``decide`` per message, one
        transaction that stores every decision and enqueues the deliveries."""
        self.refresh()
        ruleset = self.ruleset
        loaded = spool.load_unclassified(self.client, message_ids)
        classified = [
            (envelope, decide(facts_from_message(envelope, raw, ruleset), ruleset))
            for envelope, raw in self._with_bodies(loaded, ruleset.needs_content)
        ]
        recorded = set(
            spool.record_classifications(
                self.client,
                classified,
                self.config.trace_ttl,
                batch_max=self.config.delivery.batch_max,
                message_ids=message_ids,
            )
        )
        for envelope, decisions in classified:
            if envelope.id in recorded:
                metrics.decisions(decisions)
                log.info("classified %s: %s", envelope.id, [d.to_json() for d in decisions])
        if len(recorded) < len(message_ids):
            log.info("skipped %d of %d: gone or already classified",
                     len(message_ids) - len(recorded), len(message_ids))  # fmt: skip

    def _with_bodies(
        self, loaded: list[Envelope], needed: bool
    ) -> Iterator[tuple[Envelope, bytes | None]]:
        """Each envelope with its body when a rule needs content (read a few megabytes at a
        time, never a whole batch of bodies at once), else with None."""
        if not needed:
            yield from ((envelope, None) for envelope in loaded)
            return
        for chunk in spool.budgeted([e.size for e in loaded]):
            envelopes = [loaded[i] for i in chunk]
            bodies = spool.load_bodies(self.client, [e.id for e in envelopes])
            yield from zip(envelopes, bodies, strict=True)

    def _load(self) -> Ruleset:
        return Ruleset.from_config(load_config(self.config.source))

    def reload(self) -> bool:
        """Main process, on SIGHUP: validate the file; publish a new generation if it is good."""
        try:
            ruleset = self._load()
        except Exception as exc:  # ConfigError, or anything else: never take the worker down
            log.error("rules reload failed, keeping the old rules: %s", exc)
            return False
        self.generation.value += 1
        self._seen = self.generation.value
        self.ruleset = ruleset  # processes forked from now on start with it
        log.info("rules reloaded: %d rules", len(ruleset.rules))
        return True

    def refresh(self) -> None:
        """Pool process, before each task: load the rules again if a reload was published."""
        current = self.generation.value
        if current == self._seen:
            return
        self._seen = current
        try:
            self.ruleset = self._load()
        except Exception as exc:
            log.error("rules reload failed in this worker process, keeping its rules: %s", exc)
            return
        log.info("rules reloaded in this worker process: %d rules", len(self.ruleset.rules))


def register(app: Celery, service: PolicyService) -> None:
    @app.task(name=queueing.TASK_CLASSIFY, bind=True)  # type: ignore[untyped-decorator]
    def classify(task: Task, message_ids: list[str] | str) -> None:
        # A bare id: a task queued before tasks carried batches.
        ids = [message_ids] if isinstance(message_ids, str) else message_ids
        try:
            service.classify(ids)
        except Exception as exc:  # parked for a retry, never dropped (common/retry.py)
            retry.failed(
                service.client, queueing.TASK_CLASSIFY, ids, task.request.retries or 0, exc
            )

    @worker_ready.connect(weak=False)  # type: ignore[untyped-decorator]
    def handle_sighup(**_: object) -> None:
        # worker_ready runs in the main process after Celery installed its own SIGHUP handler.
        def on_sighup(signum: int, frame: FrameType | None) -> None:
            service.reload()

        signal.signal(signal.SIGHUP, on_sighup)
