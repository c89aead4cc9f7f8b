"""``make soak`` / ``python -m bench.soak``: many messages to mixed destinations while workers are
SIGKILLed, then an account of every message (issue #9).

The world (:func:`tests.world.make_world`): the embedded Redis, local DNS, ``tlsrelay ingest``,
``policy`` and ``deliver`` as real processes, and real SMTP sinks (:class:`tests.peers.Sink`) in
this process. The load (:mod:`bench.load`, its own process) sends ``--messages`` messages, message
*i* to ``r0@d<i mod 6>.bench.test``, one domain per behaviour (:data:`BEHAVIOURS`):

====  ==================  ==============================================  ==================
dom.  behaviour           destination                                     expected fate
====  ==================  ==============================================  ==================
d0    tls                 STARTTLS sink                                   delivered over TLS
d1    clear               sink without STARTTLS                           delivered in clear
d2    broken-handshake    STARTTLS offered, handshake broken              delivered in clear
d3    enforced-to-clear   a rule enforces TLS; the sink has no STARTTLS   bounced, never sent
d4    4xx-then-ok         STARTTLS; ``451`` to each message's first DATA  delivered over TLS
d5    5xx                 STARTTLS; ``550`` to DATA                       bounced
====  ==================  ==============================================  ==================

The sender's domain routes to a sixth sink that collects the bounces (RFC 3464 DSNs, matched to
the original by its ``X-Bench-Id`` in the returned headers). Enforced-to-clear mail defers
(4.7.10) until the soak's short ``delivery.max_queue_lifetime`` (``--lifetime``, 300 s) and then
bounces: it is counted as bounced, and must never reach its sink (any MAIL command there is
"enforced mail seen in clear"). Retries are shortened (``retry_schedule`` 1 s, then 120 s). A
4xx-then-ok message first tried only after its lifetime (the relay more than ``--lifetime``
behind) bounces, as configured: counted in ``unexpected_fate``, not a failure.

Kills: every ``--kill-every`` seconds (until ``--kills`` were made, or the queue is drained) one
process chosen at random among the policy and deliver workers (``--victims``: any, only ``main``
processes, only ``child`` ones) — a Celery pool process (SIGKILL;
the worker's pool replaces it, ``task_reject_on_worker_lost`` requeues its task) or a worker's
main process (SIGKILL to its process group, as when a container dies, then started again as its
supervisor would; its reserved tasks come back after ``celery.visibility_timeout``, here
``--visibility-timeout``). Each kill is logged in ``kills.jsonl`` in the work directory.

A Redis fault: ``--redis-kill-after`` seconds into the run (default 10; 0: never) the Redis server
is SIGKILLed once and started again at once on its AOF (``appendfsync everysec``: a process crash
loses nothing). Ingest answers ``451`` meanwhile (counted as refused); the workers reconnect, or
exit after ``celery.stall_after`` (here 15 s) and are started again. Reported as ``redis_kills``.

``--sentinel`` (``make soak-sentinel``): Redis is a master (the world's server), one replica and
one sentinel on loopback (:mod:`tests.redisha`; the master is declared down after 0.5 s), the
services reach it through ``redis_url: sentinel://...`` with ``redis_min_replicas``
``--min-replicas`` (1; 0 to compare). Instead of the restart, ``--failover-after`` seconds in
(default 10) the master is SIGKILLed; once the sentinel has promoted the replica, the old master
is started again as a replica of the new one (:class:`Failover`). Until that replica is in sync,
ingest answers ``451`` with ``redis_min_replicas: 1`` (one replica in all: none is left to
acknowledge). Reported under ``failover``: ``promoted_after`` and ``replica_back_after`` (s after
the kill), ``accepting_paused`` and ``delivering_paused`` (the longest pause in ``250`` replies
and in ``delivered`` trace events that began during the failover; None: none came after it) and
``accepted_after`` (``250`` replies after the replica was back).

The end: once the client is done, wait until no message is left in Redis (``tlsrelay:msg:*``,
bounces included), or every message left has had no task anywhere (not queued, not reserved in
kombu's ``unacked``, not deferred) for twice the visibility timeout, or ``--deadline`` seconds;
then report, per behaviour and in total:

- ``accepted``: ``250`` replies to the client; ``refused``: anything else.
- ``delivered``: accepted messages that arrived at their destination sink (unique ids).
- ``bounced``: accepted messages recorded bounced in their trace or whose DSN arrived
  (``dsn_received``; ``dsn_missing``: recorded but no DSN arrived).
- ``still_queued``: the others whose message is still in Redis; ``stuck``: those of them with no
  task anywhere, which no worker will ever take (``bounces_stuck``: the same for DSNs).
- ``lost`` = accepted − delivered − bounced − still queued (the three sets are disjoint;
  ``overlap`` counts any message in two): must be 0. A message delivered whose DSN says the
  destination may have it despite the bounce (a delivery interrupted while sending DATA, the
  retry then failed for good: services/deliver/dsn.py ``interrupted_note``) is counted in
  ``bounced_interrupted`` instead — the sender was told the truth, as with ``duplicates``.
- ``duplicates``: extra copies at the destination sinks (a worker killed after the final dot and
  before its reply was recorded — the RFC 1047 window; ``interrupted`` counts the deliveries the
  relay found interrupted so, from the traces).
- TLS: per outcome of the delivering attempt (from the traces: ``tls``, ``not_offered``,
  ``handshake_failed``, ``remembered_broken``, ...), all attempts per outcome, and what each sink
  saw (TLS or clear); ``tls_mismatches`` counts messages where the relay's account and the sink's
  differ; ``unexpected_channel`` those that arrived in clear where TLS was expected or the other
  way round. Traces, not the workers' Prometheus counters: a killed worker main restarts with fresh
  counters, the traces in Redis survive it.
- ``enforced_seen_in_clear``: MAIL commands received by the enforced domain's sink: must be 0.

Output: a readable table on stdout, then one JSON line (``--json-only``: the line alone).
Progress on stderr. Exit 0 when lost, stuck, enforced_seen_in_clear, tls_mismatches and overlap
are all 0 and the queue drained; 1 otherwise (the work directory is then kept, its path printed);
2 for bad options.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis

from bench import procstat
from bench.env import REPO, python_env
from bench.workload import Workload, bench_id
from services.common import queueing, spool
from services.common.redisserver import EmbeddedRedis
from services.deliver.dsn import MAY_HAVE_ARRIVED
from tests.peers import Sink
from tests.redisha import FAST_FAILOVER, Sentinel, online_replicas, replica_of
from tests.sinksmtp import Message
from tests.world import World, make_world, wait_until

ENFORCED_DOMAIN = "d3.bench.test"
SENDER_DOMAIN = "load.bench.test"  # bench.workload.SENDER's domain: where bounces go
TLS_OUTCOMES = frozenset({"tls", "tls_verified"})
STUCK_CHECK_MAX = 2000  # look for messages without a task when at most this many are left
RETRY_SCHEDULE = ["1s", "120s"]  # 4xx-then-ok is retried after 1 s; enforced every 2 minutes
_BENCH_ID = re.compile(rb"^X-Bench-Id:[ \t]*(\S+)", re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True)
class Behaviour:
    name: str
    sink: str  # key in World.sinks
    fate: str  # the expected one: "delivered" or "bounced"
    over_tls: bool | None  # how it should arrive (None: it should not arrive at all)


BEHAVIOURS = (
    Behaviour("tls", "tls", "delivered", True),
    Behaviour("clear", "plain", "delivered", False),
    Behaviour("broken-handshake", "broken", "delivered", False),
    Behaviour("enforced-to-clear", "enforced", "bounced", None),
    Behaviour("4xx-then-ok", "flaky", "delivered", True),
    Behaviour("5xx", "reject", "bounced", None),
)


def say(text: str) -> None:
    print(f"soak: {text}", file=sys.stderr, flush=True)


def bench_id_of(data: bytes) -> str | None:
    """The first ``X-Bench-Id`` in a message (in a DSN: the returned original headers')."""
    found = _BENCH_ID.search(data)
    return found.group(1).decode("ascii", "replace") if found else None


class TempfailFirst:
    """``data_reply`` for the 4xx-then-OK sink: ``451`` to a message's first DATA, then accept.
    Called in the sink's thread only."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def __call__(self, msg: Message) -> str | None:
        ident = bench_id_of(msg.data) or ""
        if ident in self.seen:
            return None
        self.seen.add(ident)
        return "451 4.3.0 soak: try again later"


def extra_sinks() -> dict[str, Sink]:
    return {
        "enforced": Sink("plain"),
        "flaky": Sink("starttls", data_reply=TempfailFirst()),
        "reject": Sink("starttls", data_reply="550 5.7.1 soak: refused"),
        "bounces": Sink("starttls"),
    }


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class Options:
    messages: int = 20_000
    size: int = 2048
    sessions: int = 20
    rate: float = 0.0
    kill_every: float = 3.0
    redis_kill_after: float = 10.0  # SIGKILL and restart Redis once, this far in (0: never)
    kills: int | None = None  # at most this many (None: until drained)
    victims: str = "any"  # "any", "main" (worker main processes) or "child" (pool processes)
    lifetime: float = 300.0
    visibility_timeout: float = 20.0
    deadline: float = 600.0
    policy_workers: int = 2
    deliver_workers: int = 4
    seed: int = 1
    workdir: Path | None = None
    json_only: bool = False
    sentinel: bool = False  # master + replica + sentinel; a failover instead of the restart
    failover_after: float = 10.0  # with sentinel: SIGKILL the master this far in
    min_replicas: int = 1  # with sentinel: redis_min_replicas

    def workload(self) -> Workload:
        return Workload(
            messages=self.messages,
            size=self.size,
            sessions=self.sessions,
            recipients=1,
            domains=len(BEHAVIOURS),
            rate=self.rate,
        )


def settings(options: Options, ha: Replicated | None = None) -> Any:
    """The soak's configuration over the test world's (``make_world``'s ``config``); with ``ha``
    (``--sentinel``), the world's Redis gets its replica and sentinel first and the services
    reach it through the sentinel, acknowledged by ``--min-replicas`` replicas."""

    def build(world: World) -> dict[str, Any]:
        replicated = {} if ha is None else {
            "redis_url": ha.start(world.redis),
            "redis_min_replicas": options.min_replicas,
        }  # fmt: skip
        routes = {
            f"d{index}.bench.test": world.sinks[b.sink].address_text
            for index, b in enumerate(BEHAVIOURS)
        }
        routes[SENDER_DOMAIN] = world.sinks["bounces"].address_text
        rule = {"name": "soak-enforced", "when": {"recipient_domain": ENFORCED_DOMAIN}}
        return {
            **replicated,
            "delivery": {
                "routes": routes,
                "retry_schedule": RETRY_SCHEDULE,
                "max_queue_lifetime": f"{options.lifetime:g}s",
                "delay_warning_after": 0,  # only bounces reach the sender's sink
                "concurrency": options.deliver_workers,
                # Lost tasks (a main process killed inside kombu's two-step take) come back
                # within two rescue sweeps: short here, so the soak sees them delivered.
                "rescue_interval": "3s",
                # At most half the visibility timeout (checked at start-up): a task ends first.
                "job_timeout": f"{options.visibility_timeout / 2:g}s",
            },
            "policy": {"concurrency": options.policy_workers},
            # A worker whose consumer stalled after the Redis restart is replaced soon.
            "celery": {
                "visibility_timeout": f"{options.visibility_timeout:g}s",
                "stall_after": "15s",
            },
            "rules": [{**rule, "tls": "enforced"}],
        }

    return build


# --------------------------------------------------------------------------- kills


@dataclass
class Killer:
    """SIGKILLs a random policy or deliver worker process; restarts a killed main (and any
    worker main that exited on its own, counted in ``restarts``: e.g. Celery gives up with
    "Could not start worker processes" when a pool process is killed while the pool starts)."""

    world: World
    rng: random.Random
    log: Path  # one JSON line per kill or restart: wall time, service, role, pid
    roles: tuple[str, ...] = ("main", "child")  # which processes may be chosen
    kills: Counter[str] = field(default_factory=Counter)  # "deliver child" → count
    restarts: int = 0
    redis_kills: int = 0

    def note(self, service: str, role: str, pid: int) -> None:
        line = {"at": round(time.time(), 3), "service": service, "role": role, "pid": pid}
        with self.log.open("a") as out:
            out.write(json.dumps(line) + "\n")

    def victims(self) -> list[tuple[str, str, int]]:
        out = []
        for service in ("policy", "deliver"):
            proc = self.world.procs.get(service)
            if proc is None or proc.poll() is not None:
                continue
            out.append((service, "main", proc.pid))
            out += [(service, "child", pid) for pid in procstat.descendants(proc.pid)]
        return [victim for victim in out if victim[1] in self.roles]

    def kill_one(self) -> None:
        victims = self.victims()
        if not victims:
            return
        service, role, pid = self.rng.choice(victims)
        self.note(service, role, pid)
        if role == "main":
            self.restart(service)
        else:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                return
        self.kills[f"{service} {role}"] += 1

    def restart(self, service: str) -> None:
        """SIGKILL the service's process group (what is left of it), then start it again."""
        proc = self.world.procs.pop(service)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        self.world.start_service(service)

    def kill_redis(self) -> None:
        """SIGKILL the Redis server, then start it again on its AOF (as its supervisor would)."""
        process = self.world.redis.process
        self.note("redis", "server", process.pid if process else 0)
        self.world.redis.stop(kill=True)
        self.world.redis.start()
        self.redis_kills += 1

    def keep_alive(self) -> None:
        """A worker main that exited by itself (e.g. the stall watchdog) is started again."""
        for service in ("policy", "deliver"):
            proc = self.world.procs.get(service)
            if proc is not None and proc.poll() is not None:
                self.note(service, f"exited {proc.returncode}", proc.pid)
                self.restart(service)
                self.restarts += 1
        ingest = self.world.procs["ingest"]
        if ingest.poll() is not None:
            raise RuntimeError(
                f"ingest exited with {ingest.returncode}: {self.world.log('ingest')}"
            )


# --------------------------------------------------------------------------- failover


@dataclass
class Replicated:
    """``--sentinel``: the world's Redis as master, one replica of it and one sentinel (quorum 1,
    :data:`tests.redisha.FAST_FAILOVER`: the master is declared down after 0.5 s)."""

    root: Path
    servers: dict[int, EmbeddedRedis] = field(default_factory=dict)  # port → server
    sentinel: Sentinel | None = None

    def start(self, master: EmbeddedRedis) -> str:
        """Start the replica and the sentinel; the ``redis_url`` of the services."""
        replica = replica_of(self.root / "replica", master)
        self.servers = {master.port: master, replica.port: replica}
        sentinel = self.sentinel = Sentinel(self.root / "sentinel", master.port, FAST_FAILOVER)
        wait_until(sentinel.replicas_known, 30, "the sentinel to know the replica")
        return sentinel.url

    def stop(self) -> None:
        """The replica and the sentinel (the world stops its own server)."""
        if self.sentinel is not None:
            self.sentinel.stop()
        for server in list(self.servers.values())[1:]:
            server.stop()


@dataclass
class Failover:
    """One failover, driven a step at a time from the soak's loop: :meth:`kill` SIGKILLs the
    master the sentinel names; :meth:`step` waits (without blocking) for the sentinel to name
    another one, then starts the old master again as a replica of the new one — what its
    supervisor does in a Sentinel deployment (a pod's start script asks the sentinels for the
    master and starts ``--replicaof`` it unless it is the master itself; left to itself, a
    returning old master would be a second master until the sentinel's next ``INFO``, up to
    10 s, converts it). The failover is over once the master the sentinel names has a replica
    in sync: ``redis_min_replicas: 1`` can be met, ingest answers ``250`` again. The sentinel
    may fail over more than once (on a loaded machine it has declared the new master down
    within a second of promoting it, and promoted the old one, just back): every master it
    names is counted in ``switches``. Times are ``time.monotonic()``; ``wall`` is the kill's
    ``time.time()`` (to compare with traces)."""

    ha: Replicated
    killer: Killer
    killed_at: float | None = None
    wall: float | None = None
    promoted_at: float | None = None
    rejoined_at: float | None = None
    old: int = 0  # ports: the master killed, the master the sentinel names now
    new: int = 0
    switches: int = 0  # masters the sentinel named after the kill (2+: it failed over again)

    def kill(self, now: float) -> None:
        assert self.ha.sentinel is not None
        self.old = self.ha.sentinel.master_port() or 0
        server = self.ha.servers[self.old]
        self.killer.note("redis", "master", server.process.pid if server.process else 0)
        server.stop(kill=True)
        self.killed_at, self.wall = now, time.time()
        self.killer.redis_kills += 1

    def step(self, now: float) -> None:
        if self.killed_at is None or self.rejoined_at is not None:
            return
        assert self.ha.sentinel is not None
        port = self.ha.sentinel.master_port()
        if port is None or port == (self.new or self.old):
            if self.promoted_at is not None and port and online_replicas(port) >= 1:
                self.rejoined_at = now
                say(f"the master has a replica in sync {now - self.killed_at:.1f}s after the kill")
            return
        self.new, self.switches = port, self.switches + 1
        say(f"the sentinel names {port} master {now - self.killed_at:.1f}s after the kill")
        if self.promoted_at is None:
            self.promoted_at = now
            say("old master started again as its replica")
            server = self.ha.servers[self.old]
            server.extra = ("--replicaof", "127.0.0.1", str(port))
            server.start()

    def account(self, accept_times: list[float], delivered_at: list[float]) -> dict[str, Any]:
        """The failover's timings, and how long it held mail up: the longest pause in ``250``
        replies (monotonic accept times) and in deliveries (wall times of ``delivered`` events)
        that began during the failover (:func:`pause`)."""
        if self.killed_at is None or self.wall is None:
            return {}
        over = self.rejoined_at

        def since(at: float | None) -> float | None:
            return None if at is None or self.killed_at is None else round(at - self.killed_at, 2)

        wall_over = None if over is None else self.wall + over - self.killed_at
        return {
            "promoted_after": since(self.promoted_at),
            "master_switches": self.switches,
            "replica_back_after": since(over),
            "accepted_after": sum(1 for t in accept_times if over is not None and t > over),
            "accepting_paused": pause(accept_times, self.killed_at, over),
            "delivering_paused": pause(delivered_at, self.wall, wall_over),
        }


def pause(times: list[float], start: float, end: float | None) -> float | None:
    """The longest gap between consecutive ``times`` that began between the last one before
    ``start`` and ``end`` (None: the end of the run); None when none came after ``start``."""
    ordered = sorted(times)
    before = [t for t in ordered if t <= start]
    series = [before[-1] if before else start] + [t for t in ordered if t > start]
    gaps = [b - a for a, b in itertools.pairwise(series) if end is None or a <= end]
    return round(max(gaps), 2) if gaps else None


# --------------------------------------------------------------------------- the run


def spooled(client: Any) -> set[str]:
    """Ids of the messages (originals and bounces) still in the spool."""
    prefix = len(spool.msg_key(""))
    return {key.decode()[prefix:] for key in client.scan_iter(match=spool.msg_key("*"), count=1000)}


def with_task(client: Any) -> set[str]:
    """Ids of the messages some task will work on: queued for a worker, reserved by one
    (kombu's ``unacked`` hash) or deferred."""
    raws = [
        *client.lrange(queueing.POLICY_LIST, 0, -1),
        *client.lrange(queueing.DELIVER_LIST, 0, -1),
    ]
    raws += [doc for doc in map(queueing.reserved, client.hvals(queueing.UNACKED)) if doc]
    ids: set[str] = set()
    for found in map(queueing.task_batch, raws):  # tasks carry batches of ids or jobs
        for item in found[1] if found else []:
            ids.add(item if isinstance(item, str) else item["id"])
    ids |= {json.loads(member)["id"] for member in client.zrange(spool.DEFERRED, 0, -1)}
    return ids


@dataclass
class Drain:
    """Watches the spool once the client is done: empty (drained), or every message left has
    had no task for ``patience`` seconds (stuck: no worker will ever take it)."""

    patience: float
    drained: bool = False
    stuck: set[str] = field(default_factory=set)
    since: float | None = None

    def over(self, client: Any, now: float) -> bool:
        left = spooled(client)
        self.drained = not left
        if self.drained or len(left) > STUCK_CHECK_MAX:
            self.since = None
            return self.drained
        stuck = left - with_task(client)
        if stuck != left:
            self.since = None
        elif self.since is None or stuck != self.stuck:
            self.since = now
        self.stuck = stuck
        return self.since is not None and now - self.since > self.patience


def start_load(
    world: World, workload: Workload, run_id: str, root: Path
) -> subprocess.Popen[bytes]:
    argv = [
        sys.executable, "-m", "bench.load", "--port", str(world.ingest_port),
        "--workload", json.dumps(workload.to_json()), "--run-id", run_id,
        "--out", str(root / "load.json"),
    ]  # fmt: skip
    with (root / "client.log").open("ab") as log:
        return subprocess.Popen(
            argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL, cwd=REPO, env=python_env()
        )


@dataclass
class Run:
    """What happened, the raw material of the report."""

    options: Options
    run_id: str
    load: dict[str, Any]
    kills: Counter[str]
    restarts: int
    redis_kills: int
    drained: bool
    seconds: float
    sinks: dict[str, Sink]
    traces: dict[str, list[dict[str, Any]]]  # queue id → events
    in_spool: set[str]  # queue ids whose message is still in Redis
    stuck: set[str]  # ids of messages in the spool with no task (originals and bounces)
    bounces_in_spool: int  # bounces (DSNs) still in the spool
    failover: Failover | None  # with --sentinel


def soak(options: Options, root: Path) -> Run:
    run_id = f"soak{int(time.time())}"
    rng = random.Random(options.seed)
    say(f"starting the world in {root}")
    with contextlib.ExitStack() as stack:
        ha = Replicated(root) if options.sentinel else None
        if ha is not None:
            stack.callback(ha.stop)  # after the world: its services stop first
        world = stack.enter_context(make_world(root, extra_sinks(), settings(options, ha)))
        roles = ("main", "child") if options.victims == "any" else (options.victims,)
        killer = Killer(world, rng, root / "kills.jsonl", roles)
        failover = Failover(ha, killer) if ha is not None else None
        started = time.monotonic()
        say(f"sending {options.messages} messages; a kill every {options.kill_every:g}s")
        load = start_load(world, options.workload(), run_id, root)
        next_kill, deadline, next_look = started + options.kill_every, None, started
        drain = Drain(patience=2 * options.visibility_timeout + 10)
        url = ha.sentinel.url if ha and ha.sentinel else world.redis.url
        client = stack.enter_context(contextlib.closing(spool.connect(url)))
        while True:
            now = time.monotonic()
            more = options.kills is None or sum(killer.kills.values()) < options.kills
            if more and now >= next_kill:
                killer.kill_one()
                next_kill = now + options.kill_every
            redis_fault(options, killer, failover, now - started)
            killer.keep_alive()
            if load.poll() is not None and deadline is None:
                deadline = now + options.deadline
                say(f"client done after {now - started:.0f}s; waiting for the queue to drain")
            failover_over = failover is None or failover.rejoined_at is not None
            if deadline is not None and now >= next_look:
                next_look = now + 2.0
                if (settled(drain, client, now) and failover_over) or now > deadline:
                    break
            time.sleep(0.1)  # a script's poll interval, not a test's synchronisation
        seconds = time.monotonic() - started
        why = "drained" if drain.drained else "stuck" if drain.since else "deadline reached"
        say(f"{why} after {seconds:.0f}s; counting")
        doc = json.loads((root / "load.json").read_text())
        queue_ids = [qid for _, _, qid in doc["accepted"] if qid]
        traces, in_spool = read_spool(client, queue_ids)
        left = spooled(client)
        stuck = left - with_task(client)
        return Run(
            options, run_id, doc, killer.kills, killer.restarts, killer.redis_kills,
            drain.drained, seconds,
            dict(world.sinks), traces, in_spool, stuck, len(left - in_spool), failover,
        )  # fmt: skip


def settled(drain: Drain, client: Any, now: float) -> bool:
    """:meth:`Drain.over`; not yet while Redis does not answer (a connection to a master that
    was killed fails once, then the client asks the sentinel again)."""
    try:
        return drain.over(client, now)
    except redis.RedisError as exc:
        say(f"Redis did not answer ({exc}); looking again")
        return False


def redis_fault(options: Options, killer: Killer, failover: Failover | None, at: float) -> None:
    """``at`` seconds into the run: the Redis restart when it is due, or with ``--sentinel``
    the failover (its kill when due, then its next step)."""
    if failover is None:
        if options.redis_kill_after and at >= options.redis_kill_after and not killer.redis_kills:
            say("SIGKILL to Redis; starting it again on its AOF")
            killer.kill_redis()
        return
    now = time.monotonic()
    if failover.killed_at is None and at >= options.failover_after:
        say("SIGKILL to the Redis master; the sentinel is to promote its replica")
        failover.kill(now)
    failover.step(now)


def read_spool(client: Any, queue_ids: list[str]) -> tuple[dict[str, Any], set[str]]:
    traces: dict[str, list[dict[str, Any]]] = {}
    in_spool: set[str] = set()
    for start in range(0, len(queue_ids), 1000):
        batch = queue_ids[start : start + 1000]
        with client.pipeline(transaction=False) as pipe:
            for qid in batch:
                pipe.lrange(spool.trace_key(qid), 0, -1)
                pipe.exists(spool.msg_key(qid))
            answers = pipe.execute()
        for index, qid in enumerate(batch):
            traces[qid] = [json.loads(e) for e in answers[2 * index]]
            if answers[2 * index + 1]:
                in_spool.add(qid)
    return traces, in_spool


# --------------------------------------------------------------------------- the report


def copies(messages: Iterable[Message]) -> dict[str, list[bool]]:
    """bench id → for each copy received, whether it came over TLS."""
    out: dict[str, list[bool]] = {}
    for msg in messages:
        ident = bench_id_of(msg.data)
        if ident is not None:
            out.setdefault(ident, []).append(msg.tls is not None)
    return out


_QUEUE_ID = re.compile(rb"^X-Tlsrelay-Queue-ID: ([0-9A-F]+)\r?$", re.MULTILINE)


def dsn_copies(messages: Iterable[Message], accepted: dict[str, str]) -> dict[str, list[bool]]:
    """:func:`copies` of the DSNs. A redacted DSN (about mail that required TLS) returns no
    headers, so no bench id: it is matched by the original's queue id, which every DSN names
    (``X-Tlsrelay-Queue-ID``)."""
    by_queue_id = {qid: ident for ident, qid in accepted.items()}
    out: dict[str, list[bool]] = {}
    for msg in messages:
        ident = bench_id_of(msg.data)
        if ident is None and (found := _QUEUE_ID.search(msg.data)):
            ident = by_queue_id.get(found.group(1).decode("ascii"))
        if ident is not None:
            out.setdefault(ident, []).append(msg.tls is not None)
    return out


def delivering_outcome(events: list[dict[str, Any]]) -> str | None:
    """The TLS outcome of the last attempt that got a 2xx reply (None: none did)."""
    for event in reversed(events):
        replies = event.get("replies") or {}
        if event["event"] == "attempt" and any(r.startswith("2") for r in replies.values()):
            return str(event["tls_outcome"])
    return None


def report(run: Run) -> dict[str, Any]:
    opts = run.options
    accepted = {ident: qid for ident, _, qid in run.load["accepted"] if qid}
    bounce_copies = dsn_copies(run.sinks["bounces"].messages, accepted)
    may_have = set(dsn_copies(  # the DSNs that say the destination may have the message
        (m for m in run.sinks["bounces"].messages if MAY_HAVE_ARRIVED.encode() in m.data), accepted
    ))  # fmt: skip
    rows, totals = [], Counter[str]()
    attempts, delivered_by = Counter[str](), Counter[str]()
    for index, behaviour in enumerate(BEHAVIOURS):
        ids = [bench_id(run.run_id, i) for i in range(index, opts.messages, len(BEHAVIOURS))]
        row = behaviour_row(
            run, behaviour, ids, accepted, bounce_copies, attempts, delivered_by, may_have
        )
        rows.append(row)
        totals.update({k: v for k, v in row.items() if isinstance(v, int)})
    (enforced,) = [run.sinks[b.sink] for b in BEHAVIOURS if b.name == "enforced-to-clear"]
    seen_in_clear = len(enforced.mail_commands)  # envelopes sent in clear, DATA or not
    result = {
        "messages": opts.messages,
        **{key: totals[key] for key in SUMMED},
        "enforced_seen_in_clear": seen_in_clear,
        "bounces_in_spool": run.bounces_in_spool,
        "bounces_stuck": len(run.stuck - set(accepted.values())),
        "stuck_ids": sorted(run.stuck)[:20],
        "drained": run.drained,
        "seconds": round(run.seconds, 1),
        "kills": sum(run.kills.values()),
        "kills_by_role": dict(sorted(run.kills.items())),
        "restarts": run.restarts,
        "redis_kills": run.redis_kills,
        "failover": failover_account(run),
        "delivered_by_tls_outcome": dict(sorted(delivered_by.items())),
        "attempts_by_tls_outcome": dict(sorted(attempts.items())),
        "behaviours": rows,
        "settings": {
            key: value
            for key, value in asdict(opts).items()
            if key not in ("messages", "workdir", "json_only")
        },
    }
    return result


def failover_account(run: Run) -> dict[str, Any] | None:
    """With ``--sentinel``: :meth:`Failover.account` over the accept times and the
    ``delivered`` events of the traces."""
    if run.failover is None:
        return None
    accept_times = [at for _, at, qid in run.load["accepted"] if qid]
    delivered_at = [
        float(e["at"])
        for events in run.traces.values()
        for e in events
        if e["event"] == "delivered"
    ]
    return {
        "redis_min_replicas": run.options.min_replicas,
        **run.failover.account(accept_times, delivered_at),
    }


SUMMED = (
    "accepted", "refused", "delivered", "bounced", "dsn_received", "dsn_missing", "still_queued",
    "lost", "stuck", "overlap", "bounced_interrupted", "duplicates", "interrupted",
    "unexpected_fate", "sink_tls",
    "sink_clear", "unexpected_channel", "relay_tls", "relay_clear", "tls_mismatches",
)  # fmt: skip


def behaviour_row(
    run: Run,
    behaviour: Behaviour,
    ids: list[str],
    accepted: dict[str, str],
    bounce_copies: dict[str, list[bool]],
    attempts: Counter[str],
    delivered_by: Counter[str],
    may_have: set[str],
) -> dict[str, Any]:
    """One behaviour's counts; adds its attempts and delivering outcomes to the two counters.
    ``may_have``: the messages whose DSN says the destination may have them (not counted as
    ``overlap`` unless their trace records a delivery)."""
    sink = run.sinks[behaviour.sink]
    arrived = copies(sink.messages)
    mine = [i for i in ids if i in accepted]
    delivered = {i for i in mine if i in arrived}
    recorded_bounce, relay_tls, relay_clear, mismatches, interrupted = set(), 0, 0, 0, 0
    recorded_delivery = set()
    for ident in mine:
        events = run.traces.get(accepted[ident], [])
        kinds = Counter(e["event"] for e in events)
        interrupted += kinds["interrupted"]
        if kinds["bounced"]:
            recorded_bounce.add(ident)
        if kinds["delivered"]:
            recorded_delivery.add(ident)
        attempts.update(str(e["tls_outcome"]) for e in events if e["event"] == "attempt")
        outcome = delivering_outcome(events)
        if ident in delivered:
            delivered_by[outcome or "unrecorded"] += 1
            relay_says_tls = outcome in TLS_OUTCOMES
            relay_tls += relay_says_tls
            relay_clear += not relay_says_tls
            mismatches += relay_says_tls != arrived[ident][0]
    dsn = {i for i in mine if i in bounce_copies}
    # The DSN's note excuses a delivered message's bounce only when the relay never recorded
    # the delivery: one recipient recorded delivered, then bounced, is a relay failure.
    excused = may_have - recorded_delivery
    bounced = (recorded_bounce | dsn) - delivered
    queued = {i for i in mine if accepted[i] in run.in_spool} - delivered - bounced
    stuck = {i for i in queued if accepted[i] in run.stuck}
    fates = {"delivered": delivered, "bounced": bounced}
    return {
        "behaviour": behaviour.name,
        "domain": f"d{BEHAVIOURS.index(behaviour)}.bench.test",
        "expected": behaviour.fate,
        "accepted": len(mine),
        "refused": len(ids) - len(mine),
        "delivered": len(delivered),
        "bounced": len(bounced),
        "dsn_received": len(dsn),
        "dsn_missing": len(recorded_bounce - dsn),
        "still_queued": len(queued),
        "stuck": len(stuck),
        "lost": len(mine) - len(delivered | bounced | queued),
        "overlap": len(delivered & (recorded_bounce | dsn) - excused),
        "bounced_interrupted": len(delivered & (recorded_bounce | dsn) & excused),
        "duplicates": sum(len(arrived[i]) - 1 for i in delivered),
        "interrupted": interrupted,
        "unexpected_fate": len(mine) - len(fates[behaviour.fate]) - len(queued),
        "sink_tls": sum(arrived[i][0] for i in delivered),
        "sink_clear": sum(not arrived[i][0] for i in delivered),
        "unexpected_channel": sum(arrived[i][0] is not behaviour.over_tls for i in delivered),
        "relay_tls": relay_tls,
        "relay_clear": relay_clear,
        "tls_mismatches": mismatches,
        "refused_at_sink": len({bench_id_of(m.data) for m in sink.rejected}),
    }


def failures(result: dict[str, Any]) -> list[str]:
    """Why the soak failed (empty: it passed)."""
    checks = {
        "lost": result["lost"],
        "stuck": result["stuck"] + result["bounces_stuck"],
        "enforced_seen_in_clear": result["enforced_seen_in_clear"],
        "tls_mismatches": result["tls_mismatches"],
        "overlap": result["overlap"],
    }
    out = [f"{name} = {value}" for name, value in checks.items() if value]
    if not result["drained"]:
        left = result["still_queued"] + result["bounces_in_spool"]
        out.append(f"the spool did not drain ({left} messages left, bounces included)")
    failover = result["failover"]
    if failover is not None and failover["replica_back_after"] is None:
        step = "promoted a replica" if failover["promoted_after"] is None else "got a replica back"
        out.append(f"the failover never {step}")
    return out


def table(r: dict[str, Any]) -> str:
    s = r["settings"]
    kills = ", ".join(f"{k} {v}" for k, v in r["kills_by_role"].items()) or "none"
    lines = [
        f"soak: {r['messages']} messages × {s['size']} B over {s['sessions']} sessions, "
        f"{len(BEHAVIOURS)} behaviours; {r['kills']} kills ({kills}), {r['restarts']} restarts, "
        f"Redis killed {r['redis_kills']}x; "
        f"{r['seconds']:.0f} s, {'drained' if r['drained'] else 'NOT drained'}",
        f"  accepted {r['accepted']}  delivered {r['delivered']}  bounced {r['bounced']} "
        f"(DSNs received {r['dsn_received']}, missing {r['dsn_missing']})  still queued "
        f"{r['still_queued']}  LOST {r['lost']}",
        f"  stuck (in the spool, no task anywhere): {r['stuck']} messages, "
        f"{r['bounces_stuck']} bounces (of {r['bounces_in_spool']} bounces left in the spool)",
        f"  duplicates {r['duplicates']} (interrupted deliveries in traces: {r['interrupted']}; "
        f"delivered and bounced saying it may have arrived: {r['bounced_interrupted']})"
        f"  refused {r['refused']}  unexpected fates {r['unexpected_fate']}, channels "
        f"{r['unexpected_channel']}",
        f"  enforced mail seen in clear {r['enforced_seen_in_clear']}  TLS mismatches "
        f"relay/sink {r['tls_mismatches']}",
        "  delivered by TLS outcome: "
        + ", ".join(f"{k} {v}" for k, v in r["delivered_by_tls_outcome"].items()),
        "  attempts by TLS outcome:  "
        + ", ".join(f"{k} {v}" for k, v in r["attempts_by_tls_outcome"].items()),
        *failover_lines(r["failover"]),
        "",
        f"  {'behaviour':<18} {'accepted':>8} {'deliv.':>7} {'bounced':>7} {'queued':>6} "
        f"{'lost':>4} {'dup':>4} {'sink TLS/clear':>15} {'relay TLS/clear':>16} {'mism.':>5}",
    ]
    for row in r["behaviours"]:
        lines.append(
            f"  {row['behaviour']:<18} {row['accepted']:>8} {row['delivered']:>7} "
            f"{row['bounced']:>7} {row['still_queued']:>6} {row['lost']:>4} "
            f"{row['duplicates']:>4} {row['sink_tls']:>7}/{row['sink_clear']:<7} "
            f"{row['relay_tls']:>8}/{row['relay_clear']:<7} {row['tls_mismatches']:>5}"
        )
    return "\n".join(lines)


def failover_lines(f: dict[str, Any] | None) -> list[str]:
    if f is None:
        return []

    def s(value: float | None) -> str:
        return "never" if value is None else f"{value:g} s"

    return [
        f"  failover (redis_min_replicas {f['redis_min_replicas']}): replica promoted after "
        f"{s(f['promoted_after'])} ({f['master_switches']} master switches), a replica in sync "
        f"again after {s(f['replica_back_after'])}; paused: accepting "
        f"{s(f['accepting_paused'])}, delivering {s(f['delivering_paused'])}; "
        f"{f['accepted_after']} accepted after it"
    ]


# --------------------------------------------------------------------------- command line


def parse(argv: Sequence[str] | None) -> Options:
    d = Options()
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    add = p.add_argument
    add("--messages", type=int, default=d.messages, help="messages (default %(default)s)")
    add("--size", type=int, default=d.size, help="bytes per message (default %(default)s)")
    add("--sessions", type=int, default=d.sessions, help="concurrent client sessions")
    add("--rate", type=float, default=d.rate, help="messages/s offered; 0: as fast as accepted")
    add("--kill-every", type=float, default=d.kill_every, help="seconds between kills")
    add("--redis-kill-after", type=float, default=d.redis_kill_after,
        help="s into the run: SIGKILL Redis once and restart it (AOF); 0: never")  # fmt: skip
    add("--kills", type=int, default=None, help="at most this many kills (default: no limit)")
    add(
        "--victims",
        choices=("any", "main", "child"),
        default=d.victims,
        help="kill any worker process, only worker main processes, or only pool processes",
    )
    add("--lifetime", type=float, default=d.lifetime, help="delivery.max_queue_lifetime, s")
    add("--visibility-timeout", type=float, default=d.visibility_timeout, help="celery's, s")
    add("--deadline", type=float, default=d.deadline, help="s after the client to drain")
    add("--policy-workers", type=int, default=d.policy_workers)
    add("--deliver-workers", type=int, default=d.deliver_workers)
    add("--seed", type=int, default=d.seed, help="random choice of the processes killed")
    add("--workdir", type=Path, default=None, help="keep logs and data here")
    add("--json-only", action="store_true", help="print only the JSON line")
    add(
        "--sentinel",
        action="store_true",
        help="Redis as master + replica + sentinel, a failover instead of the Redis restart",
    )
    add(
        "--failover-after",
        type=float,
        default=d.failover_after,
        help="with --sentinel: s into the run, SIGKILL the master (default %(default)s)",
    )
    add(
        "--min-replicas",
        type=int,
        default=d.min_replicas,
        help="with --sentinel: redis_min_replicas (default %(default)s; 0 to compare)",
    )
    args = p.parse_args(argv)
    bad = args.kill_every <= 0 or args.lifetime <= 0 or args.redis_kill_after < 0
    bad = bad or args.failover_after < 0 or args.min_replicas not in (0, 1)
    if args.messages < len(BEHAVIOURS) or bad:
        p.error(
            f"--messages must be at least {len(BEHAVIOURS)}; durations positive; "
            "--min-replicas 0 or 1 (the soak has one replica)"
        )
    return Options(**{k: v for k, v in vars(args).items()})


def main(argv: Sequence[str] | None = None) -> int:
    options = parse(argv)
    root = options.workdir or Path(tempfile.mkdtemp(prefix="tlsrelay-soak-"))
    result = report(soak(options, root))
    problems = failures(result)
    if not options.json_only:
        print(table(result))
    print(json.dumps(result), flush=True)
    if problems:
        say(f"FAILED: {'; '.join(problems)} (logs kept in {root})")
        return 1
    if options.workdir is None:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
