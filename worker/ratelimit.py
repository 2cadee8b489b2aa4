"""A global STS request budget shared by every worker process through Redis.

STS allows 600 requests per second per calling account and region, shared by AssumeRole and
everything else. Each worker taking "its share" would make adding workers a throttling storm;
instead every STS call reserves a slot in one Redis token bucket and waits for its turn.

The configured rate is a ceiling, not a promise: the platform's other STS callers spend the same
quota. When STS answers Throttling anyway, the shared rate is cut (multiplicatively, once per
second at most however many calls saw it) and then regained a little every second (additively),
so all workers together settle just under what STS actually grants instead of hammering it.

Requested verifications (a customer waiting for a verdict) do not queue behind a sweep's calls.
Every call is charged to the one shared bucket, but a requested call may instead take a slot of
a small reserve lane (`requested_share` of the rate, one second's worth banked) when that comes
sooner than its turn in the shared queue. The sweep yields: each requested call pushes every later
scheduled reservation back by one slot, so over time all calls together still keep to the rate.
Scheduled calls already waiting keep their slots, so while requested calls jump ahead the rate
can briefly exceed the budget, by at most the reserve lane's share.

A scheduled call does not ask Redis for its own slot: each process books its sweep's slots a few
at a time, one Redis call for as many as the process used in the last `BATCH_SECONDS` (at most a
`BATCH_SECONDS` share of the budget), and hands them out in order, each call sleeping until its
slot is due. Every slot is charged to the shared bucket when booked, so the budget holds exactly
as with one reservation per call; a slot nobody took within `STALE_SECONDS` of its time is
dropped (charged and unused: the fleet goes a little slower, never faster), as are the booked
slots of a process that hears STS throttle. Requested calls still reserve one by one.
"""

from __future__ import annotations

import collections
import threading
import time
from contextvars import ContextVar
from typing import Any

import redis

from worker import metrics
from worker.logging import get_logger

log = get_logger("worker.ratelimit")

KEY = "verifier:sts-rate"
DOWN_COOLDOWN_SECONDS = 10.0
# On Throttling: the rate times CUT_FACTOR, at most once per CUT_INTERVAL_SECONDS, never below
# FLOOR_SHARE of the ceiling; then RECOVERY_SHARE of the ceiling regained per second.
CUT_FACTOR = 0.7
CUT_INTERVAL_SECONDS = 1.0
FLOOR_SHARE = 0.05
RECOVERY_SHARE = 0.02
# Default share of the rate reserved for requested verifications ahead of scheduled ones.
REQUESTED_SHARE = 0.1
# A process books its scheduled calls' slots for about this long of its own recent demand in one
# Redis call (at most this long of the whole budget), and drops a booked slot not taken within
# STALE_SECONDS of its time.
BATCH_SECONDS = 0.05
STALE_SECONDS = 0.1

# Whether the STS calls made in this context are for a requested verification: set by the
# verification task for its accounts (each runs in a copy of the task's context), read by
# `acquire`, which the STS client calls without knowing which account it works for.
REQUESTED_LANE: ContextVar[bool] = ContextVar("sts_requested_lane", default=False)

# Reserve ARGV[5] tokens (one unless a process books several), letting the bucket go negative:
# the caller sleeps until its reservation is due (no retry loop, no thundering herd). Time comes
# from Redis, so worker clocks do not matter. The bucket holds at most one second's worth at the
# current rate. Every call is charged to it; a requested call (ARGV[4] == '1') whose turn in it is
# not now may instead take a slot of the reserve lane (refilled at `share` of the rate, one
# second's worth banked) if that comes sooner. Returns the first token's wait, the rate and the
# tokens there were before these: token i (from 0) is due (i + 1 - before) / rate from now.
_RESERVE = """
local ceiling = tonumber(ARGV[1])
local recovery = tonumber(ARGV[2])
local share = tonumber(ARGV[3])
local requested = ARGV[4] == '1'
local count = tonumber(ARGV[5]) or 1
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts', 'rate', 'reserve')
local rate = tonumber(state[3]) or ceiling
local ts = tonumber(state[2]) or now
rate = math.min(ceiling, rate + (now - ts) * recovery)
local burst = math.max(1, rate)
local tokens = tonumber(state[1]) or burst
local before = math.min(burst, tokens + (now - ts) * rate)
tokens = before - count
local lane = math.max(1, rate * share)
local reserve = tonumber(state[4]) or lane
reserve = math.min(lane, reserve + (now - ts) * lane)
local wait = 0
if before < 1 then wait = (1 - before) / rate end
if requested and wait > 0 then
    local own = 0
    if reserve < 1 then own = (1 - reserve) / lane end
    if own < wait then
        reserve = reserve - 1
        wait = own
    end
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now), 'rate', tostring(rate),
    'reserve', tostring(reserve))
redis.call('EXPIRE', KEYS[1], 60)
return {tostring(wait), tostring(rate), tostring(before)}
"""

# STS said Throttling: cut the shared rate, and spend whatever the bucket had banked. Returns the
# new rate, or '' when another call already cut it within the interval.
_THROTTLED = """
local ceiling = tonumber(ARGV[1])
local factor = tonumber(ARGV[2])
local floor = tonumber(ARGV[3])
local interval = tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'rate', 'cut', 'tokens', 'reserve')
local cut = tonumber(state[2]) or 0
if now - cut < interval then return '' end
local rate = math.max(floor, (tonumber(state[1]) or ceiling) * factor)
local tokens = math.min(0, tonumber(state[3]) or 0)
local reserve = math.min(0, tonumber(state[4]) or 0)
redis.call('HSET', KEYS[1], 'rate', tostring(rate), 'cut', tostring(now))
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'reserve', tostring(reserve))
redis.call('EXPIRE', KEYS[1], 60)
return tostring(rate)
"""


class StsRateLimiter:
    """`acquire()` blocks until this call may go to STS under the shared rate; `throttled()`
    tells every worker that STS wants less. Thread-safe: one per process."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        rate_per_second: float,
        requested_share: float = REQUESTED_SHARE,
    ) -> None:
        self._redis = client
        self._rate = rate_per_second
        self._requested_share = requested_share
        self._reserve: Any = client.register_script(_RESERVE)
        self._throttled: Any = client.register_script(_THROTTLED)
        self._down_until = 0.0
        # The scheduled calls' booked slots (monotonic times, in order) and this process's
        # demand for them (calls per second), measured between bookings.
        self._booked: collections.deque[float] = collections.deque()
        self._booking = threading.Lock()
        self._max_batch = max(1, int(rate_per_second * BATCH_SECONDS))
        self._demand = 0.0
        self._taken = 0
        self._booked_at: float | None = None

    def acquire(self) -> float:
        """Take a slot (a booked one, or one reserved now in the requested lane if
        `REQUESTED_LANE` is set in this context) and sleep until it is due; returns the seconds
        waited."""
        wait = self.reserve(requested=True) if REQUESTED_LANE.get() else self._take_booked()
        if wait > 0:
            metrics.record_token_wait(wait)
            time.sleep(wait)
        return wait

    def reserve(self, *, requested: bool = False) -> float:
        """Reserve a slot without waiting for it: the seconds until it is due (one Redis call)."""
        answer = self._reserve_slots(1, requested=requested)
        return 0.0 if answer is None else answer[0]

    def _reserve_slots(self, count: int, *, requested: bool) -> tuple[float, float, float] | None:
        """Reserve `count` slots (one Redis call): the first one's wait, the rate and the tokens
        before them; None when Redis is away (fail open)."""
        if time.monotonic() < self._down_until:
            return None
        try:
            answer = self._reserve(
                keys=[KEY],
                args=[
                    self._rate,
                    self._rate * RECOVERY_SHARE,
                    self._requested_share,
                    "1" if requested else "0",
                    count,
                ],
            )
        except redis.RedisError as error:
            self._unavailable(error)
            return None
        wait, rate, before = (float(part) for part in answer)
        return wait, rate, before

    def _take_booked(self) -> float:
        """A scheduled call's slot: the next booked one, booking more first if none is left;
        the seconds until it is due (0 when Redis is away)."""
        with self._booking:
            now = time.monotonic()
            while self._booked and self._booked[0] < now - STALE_SECONDS:
                self._booked.popleft()  # nobody needed it in time: charged, and left unused
            if not self._booked:
                self._book(now)
            if not self._booked:
                return 0.0
            self._taken += 1
            due = self._booked.popleft()
        return max(0.0, due - time.monotonic())

    def _book(self, now: float) -> None:
        """Book as many slots as this process took in the last BATCH_SECONDS (one at least)."""
        if self._booked_at is not None and now > self._booked_at:
            recent = self._taken / (now - self._booked_at)
            # The latest interval counts for half: a sweep's ramp is followed within a few
            # bookings, an idle spell forgotten as fast.
            self._demand = recent if self._demand == 0 else (self._demand + recent) / 2
        self._booked_at, self._taken = now, 0
        count = max(1, min(self._max_batch, int(self._demand * BATCH_SECONDS)))
        answer = self._reserve_slots(count, requested=False)
        if answer is None:
            return
        _, rate, before = answer
        at = time.monotonic()
        self._booked.extend(at + max(0.0, (n + 1 - before) / rate) for n in range(count))

    def throttled(self) -> float | None:
        """STS answered Throttling: cut the shared rate. Returns the new rate, or None if it was
        just cut (by this or another worker) or Redis is away."""
        with self._booking:
            # Booked at the old rate: those calls would not slow down until the next booking.
            self._booked.clear()
        if time.monotonic() < self._down_until:
            return None
        try:
            answer = self._throttled(
                keys=[KEY],
                args=[self._rate, CUT_FACTOR, self._rate * FLOOR_SHARE, CUT_INTERVAL_SECONDS],
            )
        except redis.RedisError as error:
            self._unavailable(error)
            return None
        if not answer:
            return None
        rate = float(answer)
        metrics.record_rate_cut()
        log.warning(
            "ratelimit.throttled",
            rate_per_second=round(rate, 1),
            ceiling_per_second=self._rate,
            action="STS throttled us: every worker slows down, then speeds up again",
        )
        return rate

    def _unavailable(self, error: redis.RedisError) -> None:
        # Fail open: STS's own throttling (a transient outcome) still protects the quota, and
        # verification must not stop because the limiter's store is away. Stop asking Redis for
        # a while, so each call does not wait for a connection timeout.
        self._down_until = time.monotonic() + DOWN_COOLDOWN_SECONDS
        log.warning(
            "ratelimit.unavailable", error=str(error), retry_in_seconds=DOWN_COOLDOWN_SECONDS
        )
