"""Redis commands per delivered message (issue #20 item 4): a guard on the deliver hot path.

A batch of one-recipient messages is delivered by the deliver code of a worker process (as in
tests/test_batching.py, against a real valkey and a real SMTP sink on loopback), and the Redis
commands it issued are counted with ``INFO commandstats`` (commands a Lua script calls count
too: Redis does the work). The budget is what the path costs today; a change that adds commands
per message must raise it knowingly (bench/README.md, "Redis commands per message"). Counts, not
times: nothing here depends on the machine's speed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from services.common.redisserver import EmbeddedRedis
from tests.peers import Sink
from tests.test_batching import deliver, queue_jobs, routed

JOBS = 10
# measured: 20.1 (24.1 before the claim script and the reads were trimmed); 21.2 with traffic
# shaping, whose connection lease (one script call taking it, one giving it back, about ten
# commands inside them, per connection) is shared here by only the 10 jobs of one session;
# 24.6 with the posture counts (tlsrelay posture: one script call riding in the recording
# transaction, three commands inside it — ten before its columns were packed into one field).
# 24.7 with the site's line (one EXISTS in the lease script while a site has none).
BUDGET_PER_JOB = 25
# With lanes (delivery.sessions_per_process, issue #20 item 1) the 10 jobs share 5 sessions: 5
# connection leases (about ten commands each, taken and given back) and 5 lane starts whose
# first job has no in-flight mark riding on an earlier recording (one SET, one claim call of its
# own): 24.4 before the posture counts; 27.6 with them, 27.7 with the site's line (its EXISTS
# in each of the 5 leases, less 4 of the 5 writes of the site's entry in the list of sites seen,
# now written once a minute per process). Under load sessions outlive the batch, so the
# per-message cost is the one above; this guards that lanes add nothing per message beyond
# their sessions.
BUDGET_PER_JOB_LANES = 28
# A connection's setup (HELLO, CLIENT SETINFO) is not per message: the lanes' Redis calls run in
# a thread each (services/deliver/offload.py), so a process opens up to one connection per lane
# (and one for the batch's reads), kept in its pool for its lifetime. Counted apart, bounded.
CONNECTION_SETUP = ("hello", "client|setinfo", "auth", "select")


def commandstats(store: redis.Redis) -> dict[str, int]:
    info = store.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in info.items()}


@pytest.fixture
def sink() -> Iterator[Sink]:
    with Sink("plain") as server:
        yield server


@pytest.mark.parametrize(("lanes", "budget"), [(1, BUDGET_PER_JOB), (5, BUDGET_PER_JOB_LANES)])
def test_a_delivered_message_costs_a_bounded_number_of_redis_commands(
    tmp_path: Path, valkey: EmbeddedRedis, store: redis.Redis, sink: Sink, lanes: int, budget: int
) -> None:
    config = routed(tmp_path, valkey, "count.test", sink.address_text, sessions_per_process=lanes)
    jobs = queue_jobs(store, "count.test", JOBS)
    before = commandstats(store)
    outcomes = deliver(config, store, jobs)
    after = commandstats(store)
    assert all(o is not None and len(o.delivered) == 1 for o in outcomes)
    calls = {c: n - before.get(c, 0) for c, n in after.items() if c != "info"}
    calls = {c: n for c, n in calls.items() if n}
    setup = {c: calls.pop(c) for c in CONNECTION_SETUP if c in calls}
    assert setup.get("client|setinfo", 0) <= 2 * (lanes + 1), setup  # name and version each
    per_job = sum(calls.values()) / JOBS
    assert per_job <= budget, sorted(calls.items())
    # The batch's first read leaves in-flight marks to the claims (one GET each, in the claim
    # script, and one in the release): no third.
    assert calls.get("get", 0) <= 2 * JOBS, calls
