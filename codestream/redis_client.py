"""The asyncio Redis client of the gateway and the worker: redis-py's, with commands packed by hiredis.

redis-py's asyncio connection packs each command in Python, argument by argument; its sync connection packs
with hiredis (already installed as redis-py's reply parser). For the admission script's 24 arguments, on
every request's way to its first token, that is 27-37 µs against 11-12 µs (`python -m benchmarks.hop_costs`,
on a development machine). These connection classes make the asyncio ones pack as the sync one does;
everything else is redis-py's own."""

from __future__ import annotations

from redis.asyncio import Redis
from redis.asyncio.connection import Connection, ConnectionPool, SSLConnection, UnixDomainSocketConnection
from redis.connection import HiredisRespSerializer
from redis.utils import HIREDIS_AVAILABLE


class HiredisPacking:
    _serializer = HiredisRespSerializer()

    def pack_command(self, *args) -> list[bytes]:
        return self._serializer.pack(*args)


class HiredisPackedConnection(HiredisPacking, Connection):
    pass


class HiredisPackedSSLConnection(HiredisPacking, SSLConnection):
    pass


class HiredisPackedUnixConnection(HiredisPacking, UnixDomainSocketConnection):
    pass


PACKED = {
    Connection: HiredisPackedConnection,
    SSLConnection: HiredisPackedSSLConnection,
    UnixDomainSocketConnection: HiredisPackedUnixConnection,
}


def connect(url: str, **kwargs) -> Redis:
    """A client for `url` (redis://, rediss://, unix://), as `Redis.from_url` makes it, packing with hiredis."""
    pool = ConnectionPool.from_url(url, **kwargs)
    if HIREDIS_AVAILABLE:
        pool.connection_class = PACKED.get(pool.connection_class, pool.connection_class)
    return Redis.from_pool(pool)
