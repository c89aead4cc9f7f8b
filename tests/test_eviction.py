"""An evicting Redis loses accepted mail, so no service starts on one: every command that runs a
service refuses (exit 1, naming ``maxmemory-policy``) unless the policy is ``noeviction``; when
``CONFIG`` is not permitted (managed Redis) it warns and starts."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import yaml

from services.common import eviction
from services.common.redisserver import EmbeddedRedis


@pytest.fixture(scope="module")
def evicting(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("lru"), maxmemory_policy="allkeys-lru")
    with server:
        yield server


@pytest.mark.parametrize("command", ["ingest", "policy", "deliver", "run"])
def test_no_service_starts_on_an_evicting_redis(
    evicting: EmbeddedRedis, tmp_path: Path, command: str
) -> None:
    config = tmp_path / "tlsrelay.yaml"
    settings = {
        "hostname": "relay.test",
        "redis_url": evicting.url,
        "data_dir": str(tmp_path / "var"),
        "metrics": {"ingest": None, "policy": None, "deliver": None},
    }
    config.write_text(yaml.safe_dump(settings))
    argv = [sys.executable, "-m", "services.cli", command, "--config", str(config)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1, (done.stdout, done.stderr)
    expected = (
        f"tlsrelay {command}: redis: maxmemory-policy is allkeys-lru; tlsrelay needs noeviction"
    )
    assert expected in done.stderr
    assert "listening" not in done.stdout and "consuming" not in done.stdout


def test_volatile_policies_are_refused_too(evicting: EmbeddedRedis) -> None:
    with redis.Redis(port=evicting.port) as client:
        client.config_set("maxmemory-policy", "volatile-ttl")
        try:
            with pytest.raises(eviction.EvictingRedis, match="maxmemory-policy is volatile-ttl"):
                eviction.check(client)
        finally:
            client.config_set("maxmemory-policy", "allkeys-lru")


def test_embedded_server_never_evicts(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path) as server, redis.Redis(port=server.port) as client:
        assert eviction.check(client) == "noeviction"


def test_config_not_permitted_warns_and_starts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with EmbeddedRedis(tmp_path) as server, redis.Redis(port=server.port) as admin:
        admin.acl_setuser("relay", enabled=True, passwords=["+pw"], keys=["*"],
                          commands=["+@all", "-config"])  # fmt: skip
        relay = redis.Redis(port=server.port, username="relay", password="pw")
        with relay as client, caplog.at_level(logging.WARNING, "tlsrelay.redis"):
            assert eviction.check(client) is None
    assert "cannot read maxmemory-policy" in caplog.text
    assert "tlsrelay needs noeviction" in caplog.text


@pytest.mark.parametrize(
    "version, ok",
    [("6.2.14", False), ("6.0", False), ("7.0.0", True), ("7.2.4", True), ("9.0.1", True),
     ("", True), ("unknown", True)],
)  # fmt: skip
def test_a_redis_older_than_7_is_refused(version: str, ok: bool) -> None:
    """The delivery claim needs SET with NX and GET (Redis 7.0); an unreadable version passes."""
    assert eviction.version_ok(version) is ok


def test_the_embedded_server_is_recent_enough(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path) as server, redis.Redis(port=server.port) as client:
        assert eviction.version_ok(str(client.info("server")["redis_version"]))
