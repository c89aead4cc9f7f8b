"""Redis Sentinel: ``redis_url: sentinel://host:port/master/db`` works for every service — a real
sentinel (the valkey binary in sentinel mode) watching the world's Redis; mail flows through it."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from services.common.celeryapp import settings
from services.common.config import Config
from services.common.redisserver import binary_path, free_port
from services.common.spool import SentinelUrl
from tests.world import World, make_world, message, wait_until


@pytest.mark.parametrize(
    ("url", "parsed"),
    [
        ("sentinel://s1:26379/mymaster", SentinelUrl((("s1", 26379),), "mymaster", 0, None)),
        (
            "sentinel://:p%40ss@s1:26379,s2:26380/mymaster/3",
            SentinelUrl((("s1", 26379), ("s2", 26380)), "mymaster", 3, "p@ss"),
        ),
        ("redis://127.0.0.1:6379/0", None),
    ],
)
def test_sentinel_urls(url: str, parsed: SentinelUrl | None) -> None:
    assert SentinelUrl.parse(url) == parsed


def test_bad_sentinel_url() -> None:
    with pytest.raises(ValueError, match="expected sentinel://"):
        SentinelUrl.parse("sentinel://s1:26379")


def test_kombu_gets_every_sentinel_and_the_master_name() -> None:
    url = "sentinel://:pw@s1:26379,s2:26380/mymaster/2"
    conf = settings(Config(), url)
    assert conf["broker_url"] == "sentinel://:pw@s1:26379/2;sentinel://:pw@s2:26380/2"
    options = conf["broker_transport_options"]
    assert options["master_name"] == "mymaster"
    assert options["sentinel_kwargs"] == {"password": "pw"}


class Sentinel:
    def __init__(self, root: Path, master_port: int, settings: str = "") -> None:
        self.port = free_port()
        root.mkdir(parents=True, exist_ok=True)
        self.conf = root / "sentinel.conf"
        self.conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {root}\n"
            f"sentinel monitor mymaster 127.0.0.1 {master_port} 1\n{settings}"
        )
        self.proc = subprocess.Popen(
            [str(binary_path()), str(self.conf), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=1, decode_responses=True)
        wait_until(lambda: self._master(client), 20, "the sentinel to know its master")
        client.close()

    def _master(self, client: redis.Redis) -> Any:
        try:
            return client.execute_command(  # type: ignore[no-untyped-call]
                "SENTINEL", "get-master-addr-by-name", "mymaster"
            )
        except redis.RedisError:
            return None

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("sentinel")
    started: list[Sentinel] = []

    def via_sentinel(world: World) -> dict[str, Any]:
        started.append(Sentinel(root / "sentinel", world.redis.port))
        return {"redis_url": f"sentinel://127.0.0.1:{started[0].port}/mymaster/0"}

    try:
        with make_world(root / "world", config=via_sentinel) as w:
            yield w
    finally:
        for sentinel in started:
            sentinel.stop()


def test_mail_flows_through_a_sentinel_managed_redis(world: World) -> None:
    message_id = world.send(["s@tls.test"], message("via sentinel"))
    sink = world.sinks["tls"]
    sink.wait_for(lambda: any(b"via sentinel" in m.data for m in sink.messages), 30)
    world.wait_completed(message_id)
