"""``make bench-sessions`` / ``python -m bench.sessions``: deliver worker memory with many delivery
sessions in flight (issue #20: with 1 000 sessions in flight, RSS under 150 MB per process).

Shape: ``--processes`` deliver processes (``delivery.concurrency``) × ``--sessions`` lanes each
(``delivery.sessions_per_process``), every lane over its own STARTTLS session to the sink, which
is ``--rtt`` away through the delay line (:mod:`bench.delayline`): a new session takes about 9
round trips (connect, greeting, EHLO, STARTTLS, handshake, EHLO, the pipelined group, the
message), so a long round trip holds every session open at once. ``--clear``: to the sink's
listener without STARTTLS instead (what the sessions cost without TLS).

Steps:

1. The sink (:mod:`bench.sink`, behind its delay line), the embedded Redis, ``tlsrelay ingest`` and
   ``tlsrelay policy`` (:class:`bench.relay.TlsRelay`, production settings but for the limits
   raised for the shape: ``delivery.sessions_per_process``, ``delivery.batch_max`` = sessions,
   so that one task fills every lane of a process; the site's connection limit
   ``delivery.shaping.default.connections`` = processes × sessions; ``ingest.batch_max``,
   ``ingest.batch_window`` (1 s) and ``ingest.max_connections`` for as many client sessions
   sending at once). No deliver worker yet.
2. The load client sends ``--rounds`` × processes × sessions messages of ``--size`` bytes over
   processes × sessions client sessions, all connected before any sends (``connect_first``):
   they send together, ingest's group commit writes a commit of (nearly) a message from every
   session, and policy splits each into deliver tasks of ``batch_max`` jobs. Once policy has
   classified them all, the queued deliver tasks are put largest first (only their order
   changes) and counted (``task_jobs``, in the order they will be taken). When ingest could not
   take a message from every client session within its 1 s window (a busy machine), a commit,
   and so a task, falls short; taken first, it would split the opening of the sessions over two
   tasks (fewer handshakes at once, a lower peak). ``first_tasks_full``: the first task of every
   process holds as many jobs as it has lanes, so that all its sessions open together; a run
   without it does not measure the shape (run it again, or with more ``--rounds``).
3. ``tlsrelay deliver`` starts and works the queue off. Every ``--sample`` seconds: the sessions
   open at the sink (the sink counts them, TLS or not), and per deliver process (pool children
   included) ``VmRSS``, ``VmHWM`` and its open sockets. *At the peak*: per process, the highest
   ``VmRSS`` while the most sessions were open at the sink (``sink_sessions_peak_at_s``: when
   that many were first open).
4. When every message has arrived (or ``--deadline``): ``VmHWM`` of every deliver process once
   more (the peak over the whole run), and the arrivals matched by ``X-Bench-Id``. Every sample
   is written to ``samples.jsonl`` in the work directory (``[seconds, open at the sink,
   {pid: [VmRSS kB, VmHWM kB, sockets]}]``).

File descriptors: the sink's process holds 3 per session (the delay line's two ends, the sink's
own), a deliver process 1, ingest and the client 1 per client session. The soft
``RLIMIT_NOFILE`` of this process is raised to its hard limit before anything starts (every
child inherits it); when even that is too low for the shape, the run stops (exit 2) saying so.

Output: a table, then one JSON line (``--json-only``: the line alone). Exit 0 when every message
arrived and every deliver process stayed under ``--limit-mb`` (150); 1 otherwise, or when a relay
process died (logs kept); 2 for bad options.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import resource
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
from bench.run import overrides_of, parse_rtt
from bench.sink import Arrival
from bench.workload import Workload
from services.common import queueing, spool

DOMAIN = "d0.bench.test"
FDS_PER_SESSION = 3  # the sink's process: the delay line's two sockets and the sink's own
FD_MARGIN = 256


def say(text: str) -> None:
    print(f"sessions: {text}", file=sys.stderr, flush=True)


def raise_nofile(needed: int) -> int:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit (children inherit it); the new soft
    limit. :class:`ValueError` when even the hard limit is below ``needed``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise ValueError(
            f"this shape needs about {needed} open files in one process, the hard limit "
            f"(ulimit -Hn) is {hard}: raise it, or use fewer sessions"
        )
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def shape_settings(processes: int, sessions: int) -> dict[str, Any]:
    """The settings a shape needs, besides the defaults (``--set`` may override any)."""
    total = processes * sessions
    return {
        "delivery.concurrency": processes,
        "delivery.sessions_per_process": sessions,
        "delivery.batch_max": sessions,
        "delivery.shaping.default.connections": total,
        "ingest.batch_max": total,
        "ingest.batch_window": 1.0,
        "ingest.max_connections": total + 100,
    }


@dataclass
class Process:
    """One deliver process as sampled."""

    pid: int
    role: str
    hwm_kb: int = 0
    rss_at_peak_kb: int = 0
    sockets_at_peak: int = 0
    sockets_max: int = 0


@dataclass
class Samples:
    """The sessions open at the sink and every deliver process's memory, sample by sample. At the
    peak: per process, the highest VmRSS among the samples with the most sessions open at the
    sink (the handshakes of sessions the sink already counts may still be under way)."""

    peak_open: int = -1
    peak_at: float = 0.0
    processes: dict[int, Process] = field(default_factory=dict)
    # every sample: seconds, sessions open at the sink, {pid: (VmRSS kB, VmHWM kB, sockets)}
    timeline: list[tuple[float, int, dict[int, tuple[int, int, int]]]] = field(default_factory=list)

    def take(self, deliver_pid: int, open_now: int, at: float) -> None:
        members = procstat.peak_rss(deliver_pid)
        now = {m.pid: (m.role, m.peak_kb, vm_rss_kb(m.pid), sockets(m.pid)) for m in members}
        for pid, (role, hwm, _, socks) in now.items():
            proc = self.processes.setdefault(pid, Process(pid, role))
            proc.hwm_kb = max(proc.hwm_kb, hwm)
            proc.sockets_max = max(proc.sockets_max, socks)
        self.timeline.append(
            (round(at, 2), open_now, {p: (v[2], v[1], v[3]) for p, v in now.items()})
        )
        if open_now > self.peak_open:  # a new peak: what was noted at the old one goes
            self.peak_open, self.peak_at = open_now, at
            for proc in self.processes.values():
                proc.rss_at_peak_kb = proc.sockets_at_peak = 0
        if open_now == self.peak_open:  # while the most sessions are open: the highest RSS
            for pid, (_, _, rss, socks) in now.items():
                proc = self.processes[pid]
                if rss > proc.rss_at_peak_kb:
                    proc.rss_at_peak_kb, proc.sockets_at_peak = rss, socks

    def final(self, deliver_pid: int) -> None:
        for member in procstat.peak_rss(deliver_pid):
            proc = self.processes.setdefault(member.pid, Process(member.pid, member.role))
            proc.hwm_kb = max(proc.hwm_kb, member.peak_kb)


def vm_rss_kb(pid: int) -> int:
    try:
        lines = (procstat.PROC / str(pid) / "status").read_text().splitlines()
    except OSError:
        return 0
    return next((int(line.split()[1]) for line in lines if line.startswith("VmRSS:")), 0)


def sockets(pid: int) -> int:
    """Open sockets of ``pid`` (its SMTP sessions, and a few Redis connections)."""
    count = 0
    with contextlib.suppress(OSError):
        for fd in (procstat.PROC / str(pid) / "fd").iterdir():
            with contextlib.suppress(OSError):
                count += fd.readlink().name.startswith("socket:")
    return count


@contextlib.contextmanager
def without_deliver(relay: TlsRelay) -> Iterator[TlsRelay]:
    """Redis, ingest and policy running; ``relay._start("deliver")`` starts the deliver worker."""
    relay.root.mkdir(parents=True, exist_ok=True)
    relay.redis.start()
    try:
        relay.config_path.write_text(yaml.safe_dump(relay.config(), sort_keys=False))
        relay._start("ingest")
        relay._start("policy")
        ingest = relay.procs["ingest"]
        wait_listening(relay.smtp_port, lambda: ingest.poll() is None, "tlsrelay ingest")
        yield relay
    finally:
        relay.stop()


def largest_first(db: redis.Redis) -> list[int]:
    """Put the queued ``deliver`` tasks in the order largest first (the deliver worker is not
    running yet: nothing else reads the list) and return their sizes in jobs, in the order they
    will be taken. kombu pushes on the left and pops on the right; a task is kombu's JSON
    envelope, its body base64-encoded JSON ``[args, kwargs, embed]``."""
    raws = db.lrange(queueing.DELIVER_LIST, 0, -1)
    tasks = sorted(((_jobs(raw), raw) for raw in raws), key=lambda task: task[0])
    with db.pipeline(transaction=True) as pipe:
        pipe.delete(queueing.DELIVER_LIST)
        if tasks:
            pipe.rpush(queueing.DELIVER_LIST, *(raw for _, raw in tasks))
        pipe.execute()
    return [size for size, _ in reversed(tasks)]


def _jobs(raw: bytes | str) -> int:
    args = json.loads(base64.b64decode(json.loads(raw)["body"]))[0]
    jobs = args[0] if args else []
    return len(jobs) if isinstance(jobs, list) else 1


def send(relay: TlsRelay, workload: Workload, root: Path) -> dict[str, Any]:
    out = root / "load.json"
    argv = [
        sys.executable, "-m", "bench.load", "--port", str(relay.smtp_port),
        "--workload", json.dumps(workload.to_json()), "--run-id", "sessions", "--out", str(out),
    ]  # fmt: skip
    with (root / "client.log").open("ab") as log:
        code = subprocess.run(
            argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL, cwd=REPO, env=python_env()
        ).returncode
    if code != 0:
        raise TargetError(f"the load client failed (exit {code})")
    doc: dict[str, Any] = json.loads(out.read_text())
    return doc


def wait_classified(db: redis.Redis, relay: TlsRelay, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while db.zcard(spool.WAITING_POLICY) or db.llen(queueing.POLICY_LIST):
        relay.check_alive()
        if time.monotonic() > deadline:
            raise TargetError(f"policy did not classify the messages within {timeout:.0f} s")
        time.sleep(0.1)


def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    total = args.processes * args.sessions
    messages = args.messages or args.rounds * total
    workload = Workload(
        messages=messages, size=args.size, sessions=min(total, messages), connect_first=True
    )
    settings = {**shape_settings(args.processes, args.sessions), **overrides_of(args)}
    with SinkProcess(root / "sink.log", args.rtt) as sink:
        routes = {DOMAIN: f"127.0.0.1:{sink.plain_port if args.clear else sink.tls_port}"}
        relay = TlsRelay(root / "tlsrelay", routes, overrides=settings)
        say(f"starting tlsrelay ingest and policy (logs in {relay.root})")
        with (
            without_deliver(relay),
            contextlib.closing(redis.Redis.from_url(relay.redis.url)) as db,
        ):
            say(f"queueing {messages} messages over {workload.sessions} client sessions")
            doc = send(relay, workload, root)
            wait_classified(db, relay, args.deadline)
            sizes = largest_first(db)
            say(f"{len(doc['accepted'])} accepted, {len(sizes)} deliver tasks of at most "
                f"{max(sizes, default=0)} jobs; starting deliver")  # fmt: skip
            run = deliver(relay, sink, len(doc["accepted"]), args.sample, args.deadline)
            arrivals = sink.arrivals(root / "arrivals.jsonl")
    with (root / "samples.jsonl").open("w") as out:  # for a closer look (--workdir)
        out.writelines(json.dumps(sample) + "\n" for sample in run.samples.timeline)
    return report(args, workload, settings, doc, sizes, run, arrivals)


@dataclass
class Run:
    """The deliver phase as sampled."""

    samples: Samples
    before: dict[str, int]  # the sink's counters when deliver started
    after: dict[str, int]
    seconds: float


def deliver(relay: TlsRelay, sink: SinkProcess, expected: int, every: float, limit: float) -> Run:
    """Start the deliver worker and sample until ``expected`` messages arrived (or ``limit``
    seconds passed)."""
    samples = Samples()
    before = after = sink.mark()
    started = time.monotonic()
    relay._start("deliver")
    pid = relay.procs["deliver"].pid
    while time.monotonic() - started < limit:
        relay.check_alive()
        after = sink.stats()
        samples.take(pid, after["open"], time.monotonic() - started)
        if after["messages"] - before["messages"] >= expected:
            break
        time.sleep(every)
    samples.final(pid)
    return Run(samples, before, after, time.monotonic() - started)


def report(
    args: argparse.Namespace,
    workload: Workload,
    settings: dict[str, Any],
    doc: dict[str, Any],
    sizes: list[int],
    run: Run,
    arrivals: Sequence[Arrival],
) -> dict[str, Any]:
    accepted = {ident for ident, _, _ in doc["accepted"]}
    seen: dict[str, int] = {}
    for arrival in arrivals:
        if arrival.id is not None and arrival.id in accepted:
            seen[arrival.id] = seen.get(arrival.id, 0) + 1
    samples, before, after = run.samples, run.before, run.after
    procs = sorted(samples.processes.values(), key=lambda p: (p.role != "main", p.pid))
    rows: list[dict[str, Any]] = [
        {
            "pid": p.pid,
            "role": p.role,
            "peak_mb": _mb(p.hwm_kb),
            "at_peak_mb": _mb(p.rss_at_peak_kb),
            "sockets_at_peak": p.sockets_at_peak,
            "sockets_max": p.sockets_max,
        }
        for p in procs
    ]
    worst = max((p.hwm_kb for p in procs), default=0) / 1024
    return {
        "processes": args.processes,
        "sessions_per_process": args.sessions,
        "rtt_ms": round(args.rtt * 1000, 1),
        "tls": not args.clear,
        "messages": workload.messages,
        "size": workload.size,
        "client_sessions": workload.sessions,
        "settings": settings,
        "accepted": len(accepted),
        "refused": len(doc["failed"]),
        "deliver_tasks": len(sizes),
        "task_jobs_max": max(sizes, default=0),
        "task_jobs": sizes,
        "first_tasks_full": _first_full(sizes, args.processes, args.sessions),
        "delivered": len(seen),
        "lost": workload.messages - len(seen),
        "duplicates": sum(n - 1 for n in seen.values()),
        "deliver_seconds": round(run.seconds, 1),
        "sink_sessions_peak": after["peak_open"],
        "sink_sessions_peak_at_s": round(samples.peak_at, 1),
        "sink_connections": after["connections"] - before["connections"],
        "tls_handshakes": after["handshakes"] - before["handshakes"],
        "deliver_rss_mb": rows,
        "deliver_max_rss_mb": round(worst, 1),
        "limit_mb": args.limit_mb,
        "within_limit": worst < args.limit_mb,
    }


def _first_full(sizes: list[int], processes: int, sessions: int) -> bool:
    """Whether the first task of every process fills its lanes: then all the sessions of the
    shape open together (else the opening was split over tasks: fewer handshakes at once)."""
    return len(sizes) >= processes and all(size == sessions for size in sizes[:processes])


def _mb(kb: int) -> float:
    return round(kb / 1024, 1)


def table(r: dict[str, Any]) -> str:
    first = "full" if r["first_tasks_full"] else "NOT full: the sessions did not all open together"
    lines = [
        f"sessions in flight: {r['processes']} deliver process(es) × {r['sessions_per_process']} "
        f"sessions{'' if r['tls'] else ' in clear'}, RTT {r['rtt_ms']:g} ms, "
        f"{r['messages']} messages × {r['size']} B",
        f"  queued in {r['deliver_tasks']} deliver tasks (≤ {r['task_jobs_max']} jobs; the first "
        f"per process {first}); "
        f"delivered {r['delivered']} in {r['deliver_seconds']} s, lost {r['lost']}, "
        f"duplicates {r['duplicates']}",
        f"  sessions open at the sink: peak {r['sink_sessions_peak']} "
        f"(sampled peak at {r['sink_sessions_peak_at_s']} s); {r['sink_connections']} "
        f"connections, {r['tls_handshakes']} TLS handshakes",
        f"  deliver RSS per process (MB; limit {r['limit_mb']:g}): "
        f"worst peak {r['deliver_max_rss_mb']} — "
        f"{'within' if r['within_limit'] else 'OVER'} the limit",
    ]
    for p in r["deliver_rss_mb"]:
        lines.append(
            f"    {p['role']:<12} pid {p['pid']:<8} peak (VmHWM) {p['peak_mb']:>7} "
            f"at the peak (VmRSS) {p['at_peak_mb']:>7}  sockets {p['sockets_at_peak']}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sessions", description=__doc__)
    add = parser.add_argument
    add("--processes", type=int, default=1, help="deliver processes (default %(default)s)")
    add("--sessions", type=int, default=1000, help="sessions per process (default %(default)s)")
    add("--rounds", type=int, default=2, help="messages per session (default %(default)s)")
    add("--messages", type=int, default=0, help="messages (default: rounds × all sessions)")
    add("--size", type=int, default=2048, help="bytes per message (default %(default)s)")
    add("--rtt", type=parse_rtt, default=1.0, metavar="TIME",
        help="round trip between the relay and the sink (default 1s)")  # fmt: skip
    add("--clear", action="store_true", help="to the sink's listener without STARTTLS")
    add("--sample", type=float, default=0.2, help="seconds between samples")
    add("--limit-mb", type=float, default=150.0, help="RSS limit per deliver process")
    add("--deadline", type=float, default=300.0, help="seconds for the deliveries")
    add("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="another tlsrelay setting (value in YAML); repeatable")  # fmt: skip
    add("--workdir", type=Path, default=None, help="keep logs and data here")
    add("--json-only", action="store_true", help="print only the JSON line")
    args = parser.parse_args(argv)
    if args.processes < 1 or args.sessions < 1 or args.rounds < 1 or args.messages < 0:
        parser.error("--processes, --sessions and --rounds must be at least 1")
    try:
        overrides_of(args)
        total = args.processes * args.sessions
        raise_nofile(FDS_PER_SESSION * total + FD_MARGIN)
    except ValueError as exc:
        parser.error(str(exc))
    root = args.workdir or Path(tempfile.mkdtemp(prefix="tlsrelay-sessions-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        result = run(args, root)
    except TargetError as exc:
        say(f"{exc} (logs kept in {root})")
        return 1
    failed = result["lost"] or not result["within_limit"]
    if args.workdir is None and not failed:
        shutil.rmtree(root, ignore_errors=True)
    if not args.json_only:
        print(table(result))
    print(json.dumps(result), flush=True)
    if result["lost"]:
        say(f"{result['lost']} messages did not arrive (logs in {root})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
