"""Redis commands packed in C (services/common/redispack.py): the bytes on the wire are those
redis-py would send, for any command of strings, bytes, integers and floats; what hiredis does
not take goes redis-py's way (packed, or its DataError); a real Redis answers the clients of
``spool.connect`` as before, a transaction included."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st
from redis._parsers.encoders import Encoder
from redis.connection import PythonRespSerializer

from services.common import redispack, spool
from services.common.redisserver import EmbeddedRedis

FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None)
ENCODER = Encoder("utf-8", "strict", False)  # type: ignore[no-untyped-call]
REDIS_PY = PythonRespSerializer(redispack.BUFFER_CUTOFF, ENCODER.encode)  # pure Python
arguments = st.one_of(
    st.text(max_size=40),
    st.binary(max_size=40),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False),
)
names = st.sampled_from(
    ["SET", "HSET", b"ZADD", "SCRIPT LOAD", b"CLIENT SETINFO", "EVALSHA", "CONFIG\tGET",
     "A \u2003B", b"X\tY Z", "", "  LEADING"]
)  # fmt: skip


def redis_py(*args: object) -> bytes:
    """What redis-py's own (Python) packer sends."""
    return wire(REDIS_PY.pack(*args))  # type: ignore[no-untyped-call]


def wire(pieces: list[bytes]) -> bytes:
    return b"".join(bytes(p) for p in pieces)


@FUZZ
@given(name=names, args=st.lists(arguments, max_size=8))
def test_the_bytes_are_those_redis_py_sends(name: str | bytes, args: list[object]) -> None:
    assert wire(redispack.Packer().pack(name, *args)) == redis_py(name, *args)


@pytest.mark.parametrize("odd", [memoryview(b"view"), bytearray(b"array"), b"x" * 70_000])
def test_what_hiredis_does_not_take_goes_redis_pys_way(odd: object) -> None:
    """Packed as redis-py packs it — or refused as it refuses it (a bytearray, before
    redis-py 8)."""

    def outcome(pack: Callable[[], bytes]) -> bytes | type[Exception]:
        try:
            return pack()
        except redis.DataError as exc:
            return type(exc)

    ours = outcome(lambda: wire(redispack.Packer().pack("SET", "key", odd)))
    assert ours == outcome(lambda: redis_py("SET", "key", odd))


@pytest.mark.parametrize("bad", [True, None, object()])
def test_a_value_redis_py_refuses_is_refused_as_it_does(bad: object) -> None:
    with pytest.raises(redis.DataError):
        redispack.Packer().pack("SET", "key", bad)


@pytest.fixture
def client(valkey: EmbeddedRedis) -> Iterator[redis.Redis]:
    connected = spool.connect(valkey.url)
    try:
        yield connected
    finally:
        connected.close()


def test_a_real_redis_answers_the_packed_commands(client: redis.Redis) -> None:
    """Through ``spool.connect``'s client (the packer is in its connections): plain commands,
    a script, a transaction with a float score, UTF-8 and binary values."""
    assert isinstance(client.connection_pool.connection_kwargs["command_packer"], redispack.Packer)
    client.set("k", "é")
    assert client.get("k") == "é".encode()
    sha = client.script_load("return ARGV[1]")
    assert client.evalsha(sha, 0, b"\x00\xff") == b"\x00\xff"
    with client.pipeline(transaction=True) as pipe:
        pipe.zadd("z", {"m": 0.1})
        pipe.hset("h", mapping={"a": 1, "b": 2.5})
        pipe.zscore("z", "m")
        pipe.hgetall("h")
        replies = pipe.execute()
    assert replies[2] == 0.1 and replies[3] == {b"a": b"1", b"b": b"2.5"}


@pytest.mark.parametrize(
    ("query", "value"), [("?encoding=latin-1", "é"), ("?encoding_errors=replace", "é\ud800")]
)
def test_a_url_with_an_encoding_of_its_own_is_packed_by_redis_py(query: str, value: str) -> None:
    """``redis_url: redis://…?encoding=latin-1``: the asynchronous clients (ingest) encode
    ``str`` arguments with it; hiredis would send UTF-8, so the synchronous ones (deliver,
    policy) would write other bytes for the same key or value. Those go redis-py's way."""
    client = spool.connect(f"redis://127.0.0.1:1/0{query}")
    try:
        ours = client.connection_pool.make_connection()
        theirs = redis.Redis.from_url(f"redis://127.0.0.1:1/0{query}").connection_pool
        packed = wire(ours.pack_command("SET", "k", value))  # type: ignore[no-untyped-call]
        expected = theirs.make_connection().pack_command("SET", "k", value)  # type: ignore[no-untyped-call]
        assert packed == wire(expected)
        assert "command_packer" not in client.connection_pool.connection_kwargs
    finally:
        client.close()
