"""``make bench-backlog`` / ``python -m bench.backlog``: peak memory of every process while a
backlog of ``--messages`` (50 000) messages is queued and then worked off (issues #8 and #9).

Contract measured: a backlog does not make ingest or the workers run out of memory — bodies stay
in Redis, not in worker memory; peak RSS per worker process under ``--limit-mb`` (150 MB).

Steps:

1. The embedded Redis and ``tlsrelay ingest`` alone (:class:`bench.relay.TlsRelay` with
   production settings; no policy or deliver worker is running, so nothing is consumed).
2. The load client (:mod:`bench.load`) sends the messages (one domain, routed to the STARTTLS
   listener of :mod:`bench.sink`); they wait in Redis: the ``policy`` queue's length and Redis's
   ``used_memory`` are read when the client is done.
3. ``tlsrelay policy`` and ``tlsrelay deliver`` are started and work the backlog off, until every
   message has arrived at the sink or ``--deadline`` seconds passed.

Throughout, every ``--sample`` seconds, the peak RSS (``VmHWM``, :mod:`bench.procstat`) of every
process of every service is read and the highest value per process kept — pool processes
included, also those recycled meanwhile (``worker_max_tasks_per_child``) — with the longest the
``deliver`` queue got.

Then the rescue sweep's cost with a large deferred set (issue #16): ``--deferred`` (200 000)
entries in a fresh Redis and a retried job waiting with its old acceptance time (the case that
used to make every sweep read everything); the median of 5 sweeps, in milliseconds
(``sweep_ms``), and the bytes one sweep reads from Redis (``sweep_bytes``).

Output: a table, then one JSON line (``--json-only``: the line alone). Exit 0 when every message
arrived and no policy/deliver process went over ``--limit-mb``; 1 otherwise (or when a process
died); 2 for bad options.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import yaml

from bench import procstat
from bench.env import REPO, python_env
from bench.measure import SinkProcess
from bench.relay import TargetError, TlsRelay, wait_listening
from bench.workload import Workload
from services.common import spool

WORKERS = ("policy", "deliver")


def say(text: str) -> None:
    print(f"backlog: {text}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def ingest_only(relay: TlsRelay) -> Iterator[TlsRelay]:
    """Redis and ingest running, the workers not yet (``relay.start_worker`` starts them)."""
    relay.root.mkdir(parents=True, exist_ok=True)
    relay.redis.start()
    try:
        relay.config_path.write_text(yaml.safe_dump(relay.config(), sort_keys=False))
        relay._start("ingest")
        ingest = relay.procs["ingest"]
        wait_listening(relay.smtp_port, lambda: ingest.poll() is None, "tlsrelay ingest")
        yield relay
    finally:
        relay.stop()


@dataclass
class Peaks:
    """Highest VmHWM seen per process (kB), with its service and role."""

    kb: dict[int, tuple[str, str, int]] = field(default_factory=dict)  # pid → service, role, kB

    def sample(self, pids: dict[str, int]) -> None:
        for service, pid in pids.items():
            for mem in procstat.peak_rss(pid):
                seen = self.kb.get(mem.pid)
                if seen is None or mem.peak_kb > seen[2]:
                    self.kb[mem.pid] = (service, mem.role, mem.peak_kb)

    def by_service(self) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {}
        for pid, (service, role, kb) in sorted(self.kb.items()):
            out.setdefault(service, []).append({"pid": pid, "role": role, "mb": _mb(kb)})
        return out

    def max_mb(self, services: Sequence[str]) -> float:
        return _mb(max((kb for s, _, kb in self.kb.values() if s in services), default=0))


def _mb(kb: int) -> float:
    return round(kb / 1024, 1)


@dataclass
class Backlog:
    """Raw material of the report."""

    messages: int
    accepted: int
    refused: int
    backlog: int  # the policy queue's length when the client was done
    redis_used_mb: float  # Redis's used_memory then
    deliver_queue_max: int
    delivered: int
    load_seconds: float
    drain_seconds: float
    peaks: Peaks


def run(args: argparse.Namespace, root: Path) -> Backlog:
    workload = Workload(messages=args.messages, size=args.size, sessions=args.sessions)
    peaks = Peaks()
    with SinkProcess(root / "sink.log") as sink:
        routes = {"d0.bench.test": f"127.0.0.1:{sink.tls_port}"}
        relay = TlsRelay(root / "tlsrelay", routes, args.policy_workers, args.deliver_workers)
        with ingest_only(relay), contextlib.closing(redis.Redis.from_url(relay.redis.url)) as db:
            say(f"queueing {args.messages} messages with no worker running")
            started = time.monotonic()
            doc = send(relay, workload, root, peaks, args.sample)
            loaded = time.monotonic()
            backlog = int(db.zcard(spool.WAITING_POLICY))  # messages (tasks carry batches)
            used = _mb(int(db.info("memory")["used_memory"]) // 1024)
            say(f"{backlog} messages queued ({used} MB in Redis); starting the workers")
            base = sink.stats()["messages"]
            for name in WORKERS:
                relay._start(name)
            longest, arrived = 0, 0
            deadline = time.monotonic() + args.deadline
            while arrived < len(doc["accepted"]) and time.monotonic() < deadline:
                relay.check_alive()
                peaks.sample(relay.processes())
                longest = max(longest, int(db.zcard(spool.WAITING_DELIVER)))
                arrived = sink.stats()["messages"] - base
                time.sleep(args.sample)
            peaks.sample(relay.processes())
            drained = time.monotonic()
    return Backlog(
        args.messages, len(doc["accepted"]), len(doc["failed"]), backlog, used, longest,
        arrived, loaded - started, drained - loaded, peaks,
    )  # fmt: skip


def send(
    relay: TlsRelay, workload: Workload, root: Path, peaks: Peaks, every: float
) -> dict[str, Any]:
    """The load client as a child process, sampling ingest's and Redis's memory meanwhile."""
    out = root / "load.json"
    argv = [
        sys.executable, "-m", "bench.load", "--port", str(relay.smtp_port),
        "--workload", json.dumps(workload.to_json()), "--run-id", "backlog", "--out", str(out),
    ]  # fmt: skip
    with (root / "client.log").open("ab") as log:
        client = subprocess.Popen(
            argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL, cwd=REPO, env=python_env()
        )
    while client.poll() is None:
        relay.check_alive()
        peaks.sample(relay.processes())
        time.sleep(every)
    if client.returncode != 0:
        raise TargetError(f"the load client failed (exit {client.returncode})")
    doc: dict[str, Any] = json.loads(out.read_text())
    return doc


def report(b: Backlog, limit_mb: float) -> dict[str, Any]:
    worst = b.peaks.max_mb(WORKERS)
    return {
        "messages": b.messages,
        "accepted": b.accepted,
        "refused": b.refused,
        "backlog": b.backlog,
        "redis_used_mb": b.redis_used_mb,
        "deliver_queue_max": b.deliver_queue_max,
        "delivered": b.delivered,
        "lost": b.accepted - b.delivered,
        "load_seconds": round(b.load_seconds, 1),
        "drain_seconds": round(b.drain_seconds, 1),
        "drain_msgs_per_s": round(b.delivered / b.drain_seconds, 1) if b.drain_seconds else 0.0,
        "peak_rss_mb": b.peaks.by_service(),
        "worker_max_rss_mb": worst,
        "ingest_max_rss_mb": b.peaks.max_mb(["ingest"]),
        "limit_mb": limit_mb,
        "within_limit": worst < limit_mb,
    }


def table(r: dict[str, Any]) -> str:
    lines = [
        f"backlog: {r['accepted']} of {r['messages']} messages accepted in "
        f"{r['load_seconds']:.0f} s with no worker running; {r['backlog']} queued, Redis "
        f"used_memory {r['redis_used_mb']:.0f} MB",
        f"  workers started: {r['delivered']} delivered in {r['drain_seconds']:.0f} s "
        f"({r['drain_msgs_per_s']:.0f} msg/s), lost {r['lost']}; deliver queue up to "
        f"{r['deliver_queue_max']}",
        f"  peak RSS per process (VmHWM, MB; limit {r['limit_mb']:g} for policy/deliver): "
        f"worst worker {r['worker_max_rss_mb']:.1f}"
        f" — {'within' if r['within_limit'] else 'OVER'} the limit",
    ]
    for service, procs in r["peak_rss_mb"].items():
        text = ", ".join(f"{p['role']}[{p['pid']}] {p['mb']:.1f}" for p in procs)
        lines.append(f"    {service:<8} {text}")
    return "\n".join(lines)


def sweep_cost(root: Path, deferred: int) -> dict[str, float]:
    """Median time and bytes read of a rescue sweep with ``deferred`` deferred entries."""
    from services.common import queueing
    from services.common.model import new_message_id
    from services.common.redisserver import EmbeddedRedis
    from services.deliver import rescue

    server = EmbeddedRedis(root / "sweep-redis", appendonly=False)
    server.start()
    try:
        with redis.Redis.from_url(server.url) as db:
            for start in range(0, deferred, 10_000):
                with db.pipeline(transaction=False) as pipe:
                    for i in range(start, min(deferred, start + 10_000)):
                        doc = {"id": new_message_id(), "domain": f"d{i % 500}.example"}
                        pipe.zadd(spool.DEFERRED, {json.dumps(doc): time.time() + 3600})
                    pipe.execute()
            retried = new_message_id()
            db.zadd(spool.WAITING_DELIVER, {f"{retried} d.example": time.time() - 86400})
            job = {"id": retried, "domain": "d.example"}
            db.lpush(queueing.DELIVER_LIST, queueing.deliver_task([job]))
            times, sent = [], 0
            for _ in range(5):
                db.delete(rescue.LOCK)
                before = int(db.client_info()["tot-net-out"])
                started = time.perf_counter()
                rescue.sweep(db, time.time(), 60.0, 30.0, 50)
                times.append((time.perf_counter() - started) * 1000)
                sent = int(db.client_info()["tot-net-out"]) - before
    finally:
        server.stop()
    return {"sweep_ms": round(sorted(times)[2], 2), "sweep_bytes": sent}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.backlog", description=__doc__.split("\n")[0])
    add = p.add_argument
    add("--messages", type=int, default=50_000, help="backlog size (default %(default)s)")
    add("--size", type=int, default=2048, help="bytes per message (default %(default)s)")
    add("--sessions", type=int, default=20, help="concurrent client sessions")
    add("--policy-workers", type=int, default=None, help="policy.concurrency (default: 2)")
    add("--deliver-workers", type=int, default=None, help="delivery.concurrency (default: 2)")
    add("--limit-mb", type=float, default=150.0, help="peak RSS limit per worker process")
    add("--deadline", type=float, default=1800.0, help="seconds for the workers to drain it")
    add("--sample", type=float, default=0.5, help="seconds between memory samples")
    add("--workdir", type=Path, default=None, help="keep logs and data here")
    add("--json-only", action="store_true", help="print only the JSON line")
    add("--deferred", type=int, default=200_000, help="deferred entries for the sweep measure")
    add("--sweep-only", action="store_true", help="only measure the rescue sweep")
    args = p.parse_args(argv)
    if args.messages < 1 or args.sample <= 0:
        p.error("--messages must be positive, --sample too")
    root = args.workdir or Path(tempfile.mkdtemp(prefix="tlsrelay-backlog-"))
    root.mkdir(parents=True, exist_ok=True)
    if args.sweep_only:
        print(json.dumps(sweep_cost(root, args.deferred)), flush=True)
        return 0
    try:
        result = report(run(args, root), args.limit_mb)
        result.update(sweep_cost(root, args.deferred))
    except TargetError as exc:
        say(f"{exc} (logs kept in {root})")
        return 1
    if not args.json_only:
        print(table(result))
    print(json.dumps(result), flush=True)
    if result["lost"] or not result["within_limit"]:
        say(f"FAILED: lost {result['lost']}, worst worker {result['worker_max_rss_mb']} MB "
            f"(logs kept in {root})")  # fmt: skip
        return 1
    if args.workdir is None:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
