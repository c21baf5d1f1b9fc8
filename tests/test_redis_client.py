"""The gateway's and worker's Redis client: redis-py's, with hiredis packing commands."""

from __future__ import annotations

import pytest
from redis.asyncio.connection import Connection

from codestream.redis_client import HiredisPackedConnection, connect

ARGS = [
    ("EVALSHA", "ab" * 20, 2, "codestream:jobs", "codestream:attempt:t:é", b"\x00\xffjob bytes", 0, -3, 1795679554474),
    ("SET", "k", 1.5, "EX", 60),
    ("CONFIG GET", "maxmemory"),
    ("XADD", "s", "*", "job", b"x" * 10_000),
]


@pytest.mark.parametrize("args", ARGS)
def test_hiredis_packs_commands_as_redis_py_does(args: tuple) -> None:
    python_packed = b"".join(Connection().pack_command(*args))
    assert b"".join(HiredisPackedConnection().pack_command(*args)) == python_packed


async def test_the_client_round_trips_through_a_real_server(redis_url: str) -> None:
    redis = connect(redis_url)
    try:
        assert isinstance(redis.connection_pool.make_connection(), HiredisPackedConnection)
        await redis.set("test-redis-client:k", "é€", ex=60)
        assert (await redis.get("test-redis-client:k")).decode() == "é€"
        assert await redis.eval("return {ARGV[1], tonumber(ARGV[2]) + 1}", 0, b"\x00\xff", 41) == [b"\x00\xff", 42]
    finally:
        await redis.delete("test-redis-client:k")
        await redis.aclose()


async def test_an_embedded_server_on_a_unix_socket_keeps_its_path_across_a_restart() -> None:
    from codestream.redis_client import HiredisPackedUnixConnection
    from codestream.redis_server import EmbeddedRedis

    server = EmbeddedRedis(unix_socket=True)
    try:
        url = server.start()
        assert url.startswith("unix://") and url == server.url
        redis = connect(url)
        assert isinstance(redis.connection_pool.make_connection(), HiredisPackedUnixConnection)
        await redis.set("k", "before", ex=60)
        assert await redis.get("k") == b"before"
        await redis.aclose()
        server.stop()  # (nothing is kept on disk: the key goes with the server)
        assert server.start() == url, "a restarted server must be found where its clients look"
        redis = connect(url)
        assert await redis.get("k") is None
        await redis.aclose()
        tcp = connect(server.tcp_url)
        assert await tcp.ping()
        await tcp.aclose()
    finally:
        server.close()
