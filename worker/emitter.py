"""Getting events out, exactly once, in order: the per-request event log, fencing, publishing, acks.

One Lua script per engine step does, atomically, for every event of the step:
  - fence it: the request's state hash holds the current attempt (bumped by a worker that reclaims the
    job) and the last seq logged; an event from an older attempt is refused (a worker that was paused
    past its lease and woke up cannot write into a stream someone else now continues), and an event whose
    seq is already logged is skipped (a retried emit after a lost reply);
  - append it to the request's event log (a stream whose ids are `<seq>-0`, capped, with a TTL): what
    gateways repair gaps from and what Resume reads, through any gateway;
  - add it to the batch for its gateway's channel;
then publishes one EventBatch per gateway and acknowledges (XACK + XDEL) the jobs whose final event went
out. A job is therefore acknowledged only once its final event is in the log.

EventBatch is `repeated GenerateEvent events = 2`; in protobuf's encoding a repeated field is just its
entries one after another (tag 0x12, length, bytes), so the script builds each gateway's batch by
concatenating entries, without parsing anything.
"""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis

from protos.keys import Keys

# KEYS[1] = jobs stream; then per event i: KEYS[2i] = state hash, KEYS[2i+1] = event log.
# ARGV = n, ttl_s, group, log_maxlen, then per event: attempt, seq, event bytes, channel, entry id or "".
# Returns the indices (0-based) of fenced events.
EMIT_LUA = """
local function varint(n)
  local out = {}
  while n >= 128 do
    out[#out + 1] = string.char(n % 128 + 128)
    n = math.floor(n / 128)
  end
  out[#out + 1] = string.char(n)
  return table.concat(out)
end
local n, ttl, group, maxlen = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], ARGV[4]
local batches, order, fenced = {}, {}, {}
for i = 0, n - 1 do
  local a = 5 + i * 5
  local attempt, seq = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  local event, channel, entry = ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
  local state, log = KEYS[2 + i * 2], KEYS[3 + i * 2]
  local current = redis.call('HMGET', state, 'attempt', 'seq')
  local cur_attempt, cur_seq = tonumber(current[1] or '0'), tonumber(current[2] or '0')
  if attempt < cur_attempt then
    fenced[#fenced + 1] = i
  else
    if seq > cur_seq then
      redis.call('XADD', log, 'MAXLEN', maxlen, seq .. '-0', 'e', event)
      redis.call('HSET', state, 'attempt', attempt, 'seq', seq)
      if batches[channel] == nil then
        batches[channel] = {}
        order[#order + 1] = channel
      end
      local b = batches[channel]
      b[#b + 1] = '\\18' .. varint(#event) .. event
    end
    redis.call('EXPIRE', state, ttl)
    redis.call('EXPIRE', log, ttl)
    if entry ~= '' then
      -- pcall: after a Redis restart without persistence the group and entry may be gone; the events
      -- must still go out.
      redis.pcall('XACK', KEYS[1], group, entry)
      redis.pcall('XDEL', KEYS[1], entry)
    end
  end
end
for _, channel in ipairs(order) do
  redis.call('PUBLISH', channel, table.concat(batches[channel]))
end
return fenced
"""

# KEYS[1] = state hash. ARGV = attempt, ttl_s. Raises the attempt (never lowers it); returns the last seq
# logged, or -1 if a newer attempt already owns the request.
CLAIM_LUA = """
local current = redis.call('HMGET', KEYS[1], 'attempt', 'seq')
local attempt = tonumber(ARGV[1])
if tonumber(current[1] or '0') > attempt then
  return -1
end
redis.call('HSET', KEYS[1], 'attempt', attempt)
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
return tonumber(current[2] or '0')
"""


@dataclass
class Emission:
    request_id: str
    attempt: int
    seq: int
    event: bytes
    channel: str
    entry_id: bytes | None  # the job's stream entry, when this is its final event


class Emitter:
    def __init__(self, redis: Redis, keys: Keys, log_ttl_s: int, log_maxlen: int = 100_000) -> None:
        self.redis = redis
        self.keys = keys
        self.log_ttl_s = log_ttl_s
        self.log_maxlen = log_maxlen
        self._emit = redis.register_script(EMIT_LUA)
        self._claim = redis.register_script(CLAIM_LUA)

    async def emit(self, emissions: list[Emission]) -> list[Emission]:
        """Log, publish and acknowledge; returns the emissions that were fenced (their attempt is stale)."""
        if not emissions:
            return []
        keys = [self.keys.jobs]
        args: list[bytes | str | int] = [len(emissions), self.log_ttl_s, self.keys.worker_group, self.log_maxlen]
        for e in emissions:
            keys += [self.keys.attempt(e.request_id), self.keys.event_log(e.request_id)]
            args += [e.attempt, e.seq, e.event, e.channel, e.entry_id or b""]
        fenced = await self._emit(keys=keys, args=args)
        return [emissions[int(i)] for i in fenced]

    async def claim(self, request_id: str, attempt: int) -> int:
        """Make `attempt` the request's current attempt; returns the last seq logged (-1: a newer attempt
        owns it already)."""
        return int(await self._claim(keys=[self.keys.attempt(request_id)], args=[attempt, self.log_ttl_s]))
