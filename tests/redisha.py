"""Redis high availability on loopback: replicas and a Sentinel, all the embedded valkey binary.

Used by the replication and Sentinel tests and by the soak's ``--sentinel`` (``bench/soak.py``),
which imports test helpers as it imports :mod:`tests.world`.

- :func:`replica_of` starts an :class:`EmbeddedRedis` as a replica of a master and waits until
  its link is up (the initial sync done).
- :class:`Sentinel` starts one sentinel (quorum 1) monitoring ``mymaster`` and waits until it
  knows its master; it answers who the master is now and how many replicas it knows.
- :func:`online_replicas` says how many replicas a server has in sync (what ``WAIT`` can count).

Every wait is a condition with a deadline (:func:`tests.world.wait_until`): a server that does
not sync, or a sentinel that does not answer, fails with what was awaited.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import redis

from services.common.redisserver import EmbeddedRedis, binary_path, free_port
from tests.world import wait_until

MASTER_NAME = "mymaster"
# A failover within about a second of the master's death: it is declared down after 0.5 s
# without a reply (the default is 30 s), and a failover that stalls is retried after 5 s.
FAST_FAILOVER = (
    f"sentinel down-after-milliseconds {MASTER_NAME} 500\n"
    f"sentinel failover-timeout {MASTER_NAME} 5000\n"
)


def online_replicas(port: int) -> int:
    """Replicas of the server on ``port`` whose link is up (``state=online``); 0 if it does not
    answer."""
    try:
        with redis.Redis(port=port, socket_timeout=2, socket_connect_timeout=1) as client:
            info: dict[str, Any] = client.info("replication")
    except redis.RedisError:
        return 0
    slaves = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)]
    return sum(1 for slave in slaves if slave.get("state") == "online")


def replica_of(root: Path, master: EmbeddedRedis) -> EmbeddedRedis:
    """A new server replicating ``master``, started and in sync."""
    replica = EmbeddedRedis(root, extra=("--replicaof", "127.0.0.1", str(master.port)))
    replica.start()
    with redis.Redis(port=replica.port, decode_responses=True) as client:

        def linked() -> bool:
            info: dict[str, Any] = client.info("replication")
            return bool(info.get("master_link_status") == "up")

        wait_until(linked, 20, "the replica to sync")
    return replica


class Sentinel:
    """One sentinel process watching the master on ``master_port`` (quorum 1, so this one
    sentinel may fail over alone). ``settings``: more lines of its config (e.g.
    :data:`FAST_FAILOVER`). Its log is ``sentinel.log`` under ``root``."""

    def __init__(self, root: Path, master_port: int, settings: str = "") -> None:
        self.port = free_port()
        root.mkdir(parents=True, exist_ok=True)
        self.conf = root / "sentinel.conf"  # the sentinel rewrites it as it learns
        self.conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {root}\nlogfile {root / 'sentinel.log'}\n"
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 1\n{settings}"
        )
        self.proc = subprocess.Popen(
            [str(binary_path()), str(self.conf), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(self.master_port, 20, "the sentinel to know its master")

    @property
    def url(self) -> str:
        """The tlsrelay ``redis_url`` that reaches the master through this sentinel (db 0)."""
        return f"sentinel://127.0.0.1:{self.port}/{MASTER_NAME}/0"

    def _ask(self, *command: str) -> Any:
        with redis.Redis(
            port=self.port, socket_timeout=2, socket_connect_timeout=1, decode_responses=True
        ) as client:
            return client.execute_command("SENTINEL", *command)

    def master_port(self) -> int | None:
        """The port of the master as this sentinel names it now (None: no answer)."""
        try:
            address = self._ask("get-master-addr-by-name", MASTER_NAME)
        except redis.RedisError:
            return None
        return int(address[1]) if address else None

    def replicas_known(self) -> int:
        """Replicas of the master this sentinel knows and does not consider down."""
        try:
            replicas = self._ask("replicas", MASTER_NAME)
        except redis.RedisError:
            return 0
        flags = [
            str(r["flags"] if isinstance(r, dict) else r[r.index("flags") + 1]) for r in replicas
        ]
        return sum(1 for f in flags if "down" not in f and "disconnected" not in f)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
