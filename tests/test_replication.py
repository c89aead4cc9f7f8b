"""``redis_min_replicas``: ingest answers ``250`` only once that many replicas acknowledged the
commit (``WAIT`` after ``EXEC``), else ``451 4.3.0``. Real master, replica and sentinel (the
valkey binary) on loopback; ingest started through the command line.

The failover test SIGKILLs the master under load and lets Sentinel promote the replica; every
message answered ``250`` must then be on the new master with ``redis_min_replicas: 1``. With 0
the count of lost messages is only reported (asynchronous replication may lose the last writes).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import smtplib
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
import yaml

from services.common import commit, queueing, spool
from services.common.redisserver import EmbeddedRedis, free_port
from tests.redisha import FAST_FAILOVER, Sentinel, replica_of
from tests.test_batching import BODY, envelope, tasks, until
from tests.world import port_open, wait_until

TIMEOUT = "0.5s"  # redis_replica_timeout in these tests


@dataclass
class Ingest:
    root: Path
    redis_url: str
    min_replicas: int
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Ingest:
        config = self.root / "tlsrelay.yaml"
        settings = {
            "hostname": "relay.test",
            "redis_url": self.redis_url,
            "redis_min_replicas": self.min_replicas,
            "redis_replica_timeout": TIMEOUT,
            "data_dir": str(self.root / "var"),
            "ingest": {"listen": f"127.0.0.1:{self.port}"},
            "metrics": {"ingest": None, "policy": None, "deliver": None},
        }
        config.write_text(yaml.safe_dump(settings))
        log = (self.root / "ingest.log").open("ab")
        argv = [sys.executable, "-m", "services.cli", "ingest", "--config", str(config)]
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        log.close()

        def listening() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.log()
            return port_open("127.0.0.1", self.port)

        wait_until(listening, 20, "ingest to listen")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log(self) -> str:
        return (self.root / "ingest.log").read_text(errors="replace")[-3000:]

    def send(self, subject: str) -> tuple[int, str]:
        """(code, text) of the DATA reply; (0, error) when the session failed."""
        try:
            with smtplib.SMTP("127.0.0.1", self.port, timeout=30) as client:
                client.ehlo("client.test")
                client.mail("s@origin.test")
                client.rcpt("r@dest.test")
                code, text = client.data(f"Subject: {subject}\r\n\r\nbody\r\n".encode())
        except (smtplib.SMTPException, OSError) as exc:
            return 0, str(exc)
        return code, text.decode()


def queued_id(text: str) -> str:
    return text.rsplit(" ", 1)[1]


@pytest.fixture
def master(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis(tmp_path / "master") as server:
        yield server


def test_250_only_once_the_replica_has_the_message(master: EmbeddedRedis, tmp_path: Path) -> None:
    replica = replica_of(tmp_path / "replica", master)
    try:
        with Ingest(tmp_path, master.url, 1) as ingest, redis.Redis(port=replica.port) as copy:
            code, text = ingest.send("replicated")
            assert code == 250, text
            assert copy.exists(spool.msg_key(queued_id(text))), "250 before the replica had it"

            assert replica.process is not None
            replica.process.send_signal(signal.SIGSTOP)  # the replica stops acknowledging
            try:
                code, text = ingest.send("not replicated")
                assert (code, text[:5]) == (451, "4.3.0"), text
            finally:
                replica.process.send_signal(signal.SIGCONT)

            def accepted_again() -> bool:
                return ingest.send("after")[0] == 250

            wait_until(accepted_again, 20, "250 again once the replica acknowledges")
    finally:
        replica.stop()


def test_a_timer_s_policy_task_counts_as_sent_once_the_replica_has_it(
    master: EmbeddedRedis, tmp_path: Path
) -> None:
    """Under load a commit leaves its policy task to a timer (``ingest.task_window``). With
    ``redis_min_replicas`` the timer's push must be acknowledged as a commit is: a failover
    right after an unacknowledged LPUSH would drop the task and leave its messages (answered
    250) to the rescue sweep. Not acknowledged → sent again after the back-off, acknowledged
    then; a second copy on the master is harmless (the policy task is idempotent)."""
    replica = replica_of(tmp_path / "replica", master)
    first, second = envelope("r@dest.test"), envelope("r@dest.test")

    async def run() -> list[float]:
        client = spool.connect_async(master.url)
        try:
            committer = commit.Committer(
                client, spool.TRACE_TTL, 0.5, 100, lambda: 1, min_replicas=1,
                replica_timeout=0.2, task_window=0.3, task_max=10,
            )  # fmt: skip
            await committer.accept(first, BODY)  # no load yet: its own task, acknowledged
            await committer.accept(second, BODY)  # loaded: its task waits for the timer
            assert committer._untasked == [second.id]
            assert replica.process is not None
            replica.process.send_signal(signal.SIGSTOP)  # before the timer's push (0.3 s)
            try:
                await until(lambda: committer._retry > 0 and not committer._writes)
                assert committer._untasked == [second.id]  # not acknowledged: still waiting
            finally:
                replica.process.send_signal(signal.SIGCONT)
            retried = [committer._retry]
            await until(lambda: not committer._untasked and not committer._writes, timeout=10)
            return [*retried, committer._retry]
        finally:
            await client.aclose()

    try:
        retries = asyncio.run(run())
        with redis.Redis(port=replica.port) as copy:
            named = tasks(copy, queueing.POLICY_LIST)
    finally:
        replica.stop()
    assert retries == [commit.RETRY_FIRST, 0.0], retries
    # the first message's task, then the second's twice: the unacknowledged push, the retry
    assert named == [[first.id], [second.id], [second.id]], named


@dataclass
class Load:
    """SMTP clients sending in a loop; the ids answered 250."""

    ingest: Ingest
    clients: int = 4
    accepted: list[str] = field(default_factory=list)
    refused: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Load:
        for n in range(self.clients):
            thread = threading.Thread(target=self._send, args=(n,), daemon=True)
            thread.start()
            self.threads.append(thread)
        return self

    def _send(self, n: int) -> None:
        i = 0
        while not self.stop.is_set():
            i += 1
            code, text = self.ingest.send(f"load {n}-{i}")
            if code == 250:
                self.accepted.append(queued_id(text))
            else:
                self.refused += 1

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)


@pytest.mark.parametrize("min_replicas", [1, 0])
def test_failover_under_load(tmp_path: Path, min_replicas: int) -> None:
    with contextlib.ExitStack() as stack:
        master = stack.enter_context(EmbeddedRedis(tmp_path / "master"))
        replica = replica_of(tmp_path / "replica", master)
        stack.callback(replica.stop)
        sentinel = Sentinel(tmp_path / "sentinel", master.port, FAST_FAILOVER)
        stack.callback(sentinel.stop)
        ingest = stack.enter_context(Ingest(tmp_path, sentinel.url, min_replicas))
        with Load(ingest) as load:

            def accepted(at_least: int) -> Callable[[], bool]:
                return lambda: len(load.accepted) >= at_least

            def promoted() -> bool:
                return sentinel.master_port() == replica.port

            wait_until(accepted(30), 30, "mail accepted before the fault")
            assert master.process is not None
            os.kill(master.process.pid, signal.SIGKILL)
            before = len(load.accepted)
            wait_until(promoted, 30, "the promotion")
            if min_replicas == 0:  # no replica is left: only then is anything accepted again
                wait_until(accepted(before + 1), 30, "mail accepted again")
        with redis.Redis(port=replica.port) as new_master:
            lost = [i for i in load.accepted if not new_master.exists(spool.trace_key(i))]
        print(  # the report asked for: what a failover costs without WAIT
            f"\nfailover with redis_min_replicas {min_replicas}: {len(load.accepted)} accepted "
            f"({before} before the kill), {load.refused} refused, {len(lost)} lost"
        )
        if min_replicas:
            assert lost == [], f"{len(lost)} messages answered 250 are not on the new master"
