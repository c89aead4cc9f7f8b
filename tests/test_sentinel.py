"""Redis Sentinel: ``redis_url: sentinel://host:port/master/db`` works for every service — a real
sentinel (the valkey binary in sentinel mode) watching the world's Redis; mail flows through it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from services.common.celeryapp import settings
from services.common.config import Config
from services.common.spool import SentinelUrl
from tests.redisha import Sentinel
from tests.world import World, make_world, message


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


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("sentinel")
    started: list[Sentinel] = []

    def via_sentinel(world: World) -> dict[str, Any]:
        started.append(Sentinel(root / "sentinel", world.redis.port))
        return {"redis_url": started[0].url}

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
