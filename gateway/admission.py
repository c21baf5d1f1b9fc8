"""Admission and enqueueing in one atomic step in Redis, shared by all gateways.

One Lua script decides whether a request may enter and, if so, enqueues it: the limits are checked and
the job added in the same round trip that enqueueing needs anyway, so admission costs no extra latency and
two gateways can never both take the last slot.

Limits (0 turns one off):
- in flight across the deployment (queued or running), in requests and in tokens (prompt + max_new_tokens):
  the bounded queue;
- per tenant (API key's tenant): requests in flight, and a token bucket of tokens per second with a burst.
A rejected request gets RESOURCE_EXHAUSTED with a retry hint. Entries carry the request's deadline as their
score, so a gateway that dies without releasing them leaks nothing past the deadlines. Every gateway of a
deployment must have the same limits: each records in Redis only what its own limits count.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from redis.asyncio import Redis

from protos.keys import DEADLINE_SLACK_S, JOB_FIELD, Keys

# Both scripts' clean-up (registered in front of each): a request's tokens off the total, and the entries
# past their deadlines (a gateway that died without releasing them) out of the in-flight set, its token
# counts and the tenant's set.
SWEEP_LUA = """
local function uncount(tokens, id)
  local counted = redis.call('HGET', tokens, id)
  if counted then
    redis.call('HINCRBY', tokens, '_total', -tonumber(counted))
    redis.call('HDEL', tokens, id)
  end
end
local function sweep(inflight, tokens, tenant, now)
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', inflight, '-inf', now)) do
    uncount(tokens, id)
  end
  redis.call('ZREMRANGEBYSCORE', inflight, '-inf', now)
  redis.call('ZREMRANGEBYSCORE', tenant, '-inf', now)
end
"""

# KEYS: jobs, attached, claim, inflight, inflight tokens, tenant inflight, tenant bucket, the request's attempt hash
# ARGV: job, gateway id, ttl s, has claim (0/1), now ms, request id, deadline ms, tokens,
#       max requests, max tokens, tenant max concurrency, tenant rate (tokens/s), tenant burst
# Returns {admitted (0/1), reason, retry after ms}.
#
# It runs on every request's way to its first token, so it does only what the limits that are on need: the
# in-flight set only with a request or token limit, the token counts only with a token limit, the tenant's set
# only with a tenant limit. Entries past their deadline (a gateway that died without releasing them) are swept
# only when a limit would refuse (they must not keep anyone out) and by every release (so they never pile up).
ENQUEUE_LUA = """
local now, rid, deadline, tokens = tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[7]), tonumber(ARGV[8])
local max_requests, max_tokens = tonumber(ARGV[9]), tonumber(ARGV[10])
local tenant_max, rate, burst = tonumber(ARGV[11]), tonumber(ARGV[12]), tonumber(ARGV[13])
local function over_limit()
  if max_requests > 0 and redis.call('ZCARD', KEYS[4]) >= max_requests then
    return {0, 'queue', 1000}
  end
  if max_tokens > 0 and tonumber(redis.call('HGET', KEYS[5], '_total') or '0') + tokens > max_tokens then
    return {0, 'queue_tokens', 1000}
  end
  if tenant_max > 0 and redis.call('ZCARD', KEYS[6]) >= tenant_max then
    return {0, 'concurrency', 1000}
  end
  return nil
end
local refusal = over_limit()
if refusal then
  sweep(KEYS[4], KEYS[5], KEYS[6], now)
  refusal = over_limit()
  if refusal then
    return refusal
  end
end
local level = nil
if rate > 0 then
  if tokens > burst then
    return {0, 'too_large', 0}
  end
  local bucket = redis.call('HMGET', KEYS[7], 'level', 'ts')
  level = tonumber(bucket[1] or burst)
  level = math.min(burst, level + (now - tonumber(bucket[2] or now)) * rate / 1000)
  if level < tokens then
    return {0, 'rate', math.ceil((tokens - level) * 1000 / rate)}
  end
end
-- A client-chosen id is taken while its request is in flight (the claim) and while its events are kept (the
-- attempt hash lives as long as the event log): a new job under it would be fenced and deduplicated against
-- the old one's events.
if ARGV[4] == '1' then
  if redis.call('EXISTS', KEYS[8]) == 1 or not redis.call('SET', KEYS[3], '1', 'NX', 'EX', ARGV[3]) then
    return {0, 'exists', 0}
  end
end
if level ~= nil then
  redis.call('HSET', KEYS[7], 'level', level - tokens, 'ts', now)
  redis.call('PEXPIRE', KEYS[7], math.ceil(burst * 1000 / rate) + 60000)
end
if max_requests > 0 or max_tokens > 0 then
  redis.call('ZADD', KEYS[4], deadline, rid)
end
if max_tokens > 0 then
  redis.call('HSET', KEYS[5], rid, tokens)
  redis.call('HINCRBY', KEYS[5], '_total', tokens)
end
if tenant_max > 0 then
  redis.call('ZADD', KEYS[6], deadline, rid)
  redis.call('PEXPIRE', KEYS[6], deadline - now + 60000)
end
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3])
redis.call('XADD', KEYS[1], '*', 'job', ARGV[1])
return {1, '', 0}
"""

# KEYS: inflight, inflight tokens, tenant inflight. ARGV: request id, now ms.
# Releases the request's entries (those its gateway's limits made), then sweeps the entries past their deadline.
RELEASE_LUA = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
uncount(KEYS[2], ARGV[1])
sweep(KEYS[1], KEYS[2], KEYS[3], ARGV[2])
return 1
"""

REASONS = {
    "queue": "the service has {max_requests} requests in flight (its limit)",
    "queue_tokens": "the service has its limit of {max_tokens} tokens in flight",
    "concurrency": "this API key has {tenant_max} requests in flight (its limit)",
    "rate": "this API key is over its rate of {rate} tokens/s",
    "too_large": "the request ({tokens} tokens) exceeds this API key's burst of {burst} tokens",
}


@dataclass(frozen=True)
class Limits:
    max_requests: int = 0
    max_tokens: int = 0
    tenant_max_concurrency: int = 0
    tenant_tokens_per_s: float = 0.0
    tenant_token_burst: int = 0


@dataclass
class Verdict:
    admitted: bool
    reason: str = ""  # "exists", or a key of REASONS
    message: str = ""
    retry_after_ms: int = 0


class Admission:
    def __init__(self, redis: Redis, keys: Keys, limits: Limits, gateway_id: str) -> None:
        self.redis = redis
        self.keys = keys
        self.limits = limits
        self.gateway_id = gateway_id
        self._enqueue = redis.register_script(SWEEP_LUA + ENQUEUE_LUA)
        self._release = redis.register_script(SWEEP_LUA + RELEASE_LUA)

    async def enqueue(
        self, request_id: str, tenant: str, job: bytes, tokens: int, deadline: float, claim: bool
    ) -> Verdict:
        """Admit and enqueue the job, or say why not. `claim`: the client chose the id (must be new)."""
        keys, limits = self.keys, self.limits
        ttl = max(1, int(deadline - time.time()) + DEADLINE_SLACK_S)
        burst = limits.tenant_token_burst or int(10 * limits.tenant_tokens_per_s)
        admitted, reason, retry = await self._enqueue(
            keys=[keys.jobs, keys.attached(request_id), keys.request_claim(request_id), keys.inflight,
                  keys.inflight_tokens, keys.tenant_inflight(tenant), keys.tenant_bucket(tenant),
                  keys.attempt(request_id)],
            args=[job, self.gateway_id, ttl, int(claim), int(time.time() * 1000), request_id, int(deadline * 1000),
                  tokens, limits.max_requests, limits.max_tokens, limits.tenant_max_concurrency,
                  limits.tenant_tokens_per_s, burst],
        )  # fmt: skip
        reason = reason.decode() if isinstance(reason, bytes) else reason
        if admitted:
            return Verdict(True)
        facts = {**limits.__dict__, "tenant_max": limits.tenant_max_concurrency,
                 "rate": limits.tenant_tokens_per_s, "burst": burst, "tokens": tokens}  # fmt: skip
        return Verdict(False, reason, REASONS.get(reason, reason).format(**facts), int(retry))

    async def release(self, request_id: str, tenant: str) -> None:
        keys = self.keys
        await self._release(
            keys=[keys.inflight, keys.inflight_tokens, keys.tenant_inflight(tenant)],
            args=[request_id, int(time.time() * 1000)],
        )


assert JOB_FIELD == b"job"  # the script writes the field by name
