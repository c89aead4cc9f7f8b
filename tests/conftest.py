"""Fixtures shared by the test modules: a real Redis-compatible server per module, and a
STARTTLS sink on loopback (a module that needs another kind defines its own ``sink``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from services.common.redisserver import EmbeddedRedis
from tests.peers import Sink


@pytest.fixture(scope="module")
def valkey(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    """A throw-away server (no persistence) that tests may stop and start on the same port."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("valkey"), appendonly=False)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def store(valkey: EmbeddedRedis) -> Iterator[redis.Redis]:
    """A client on an empty database."""
    with redis.Redis.from_url(valkey.url) as client:
        client.flushall()
        yield client


@pytest.fixture
def sink() -> Iterator[Sink]:
    """A STARTTLS sink (tests/peers.py) for one test."""
    with Sink("starttls") as server:
        yield server
