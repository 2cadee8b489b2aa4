"""A global STS request budget shared by every worker process through Redis.

STS allows 600 requests per second per calling account and region, shared by AssumeRole and
everything else. Each worker taking "its share" would make adding workers a throttling storm;
instead every STS call reserves a slot in one Redis token bucket and waits for its turn.
"""

from __future__ import annotations

import time
from typing import Any

import redis

from worker.logging import get_logger

log = get_logger("worker.ratelimit")

KEY = "verifier:sts-rate"
DOWN_COOLDOWN_SECONDS = 10.0

# Reserve one token, letting the bucket go negative: the caller sleeps until its reservation is
# due (no retry loop, no thundering herd). Time comes from Redis, so worker clocks do not matter.
_RESERVE = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1]) or burst
local ts = tonumber(state[2]) or now
tokens = math.min(burst, tokens + (now - ts) * rate) - 1
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('EXPIRE', KEYS[1], 60)
if tokens >= 0 then return '0' end
return tostring(-tokens / rate)
"""


class StsRateLimiter:
    """`acquire()` blocks until this call may go to STS under the shared rate."""

    def __init__(self, client: redis.Redis, *, rate_per_second: float) -> None:
        self._redis = client
        self._rate = rate_per_second
        self._burst = max(1.0, rate_per_second)  # at most one second's worth at once
        self._script: Any = client.register_script(_RESERVE)
        self._down_until = 0.0

    def acquire(self) -> float:
        """Reserve a slot and sleep until it is due; returns the seconds waited."""
        if time.monotonic() < self._down_until:
            return 0.0
        try:
            wait = float(self._script(keys=[KEY], args=[self._rate, self._burst]))
        except redis.RedisError as error:
            # Fail open: STS's own throttling (a transient outcome) still protects the quota,
            # and verification must not stop because the limiter's store is away. Stop asking
            # Redis for a while, so each call does not wait for a connection timeout.
            self._down_until = time.monotonic() + DOWN_COOLDOWN_SECONDS
            log.warning(
                "ratelimit.unavailable", error=str(error), retry_in_seconds=DOWN_COOLDOWN_SECONDS
            )
            return 0.0
        if wait > 0:
            time.sleep(wait)
        return wait
