"""The worker process's resources, built in one place once per process and torn down in one.

Sessions (the process's engine, `worker.db`), the Redis client for the worker's own keys
(`worker.redis_client`), the STS budget with the verifier whose hooks spend it, the circuit
breaker, the stall counters and the verification window. A prefork child builds them when it
starts (`worker_process_init`, connected in `worker.tasks`); a solo or threads pool, the
benchmark's trace and the tests build them on first use. `close_process_resources` drains the
window and closes the connections (`worker_process_shutdown`, or a test's teardown).

One thing is kept in the parent instead, before the pool forks, and is not a resource of this
module: the permission probes' requests (`worker.sts.client.preload_probe_calls`, at
`worker_init` in `worker.app`; built by a short-lived child process, `worker.sts.probe_preload`).
They are plain data and an HTTP session with no connection open yet, so nothing live crosses
the fork; no process of the worker loads a service model. A child that finds one missing builds
it on first use.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass

import redis

from worker.circuit import PlatformCircuit
from worker.db import dispose_engine, session_factory
from worker.logging import get_logger
from worker.ratelimit import StsRateLimiter
from worker.redis_client import close_redis, get_redis
from worker.settings import Settings, get_settings
from worker.stall import StallWatch
from worker.sts.verifier import StsVerifier
from worker.verify import VerificationDeps
from worker.window import VerificationWindow

log = get_logger("worker.resources")


@dataclass(frozen=True, slots=True)
class ProcessResources:
    """Everything a worker process shares between its tasks and threads."""

    deps: VerificationDeps
    redis: redis.Redis
    limiter: StsRateLimiter
    window: VerificationWindow


def build_resources(settings: Settings) -> ProcessResources:
    """The process's resources for `settings`; nothing connects until first used."""
    client = get_redis()
    limiter = StsRateLimiter(
        client,
        rate_per_second=settings.sts_rate_limit_per_second,
        requested_share=settings.sts_requested_share,
    )
    deps = VerificationDeps(
        sessions=session_factory(),
        verifier=StsVerifier(settings, before_call=limiter.acquire, on_throttled=limiter.throttled),
        circuit=PlatformCircuit(client, pause_seconds=settings.platform_pause_seconds),
        settings=settings,
        rng=random.Random(),
        stall=StallWatch(
            client,
            window_seconds=settings.stall_window_seconds,
            min_verifications=settings.stall_min_verifications,
        ),
    )
    window = VerificationWindow(settings.worker_concurrency, client)
    return ProcessResources(deps=deps, redis=client, limiter=limiter, window=window)


_lock = threading.Lock()
_resources: ProcessResources | None = None


def process_resources() -> ProcessResources:
    """This process's resources: built by `open_process_resources`, or now on first use."""
    return _resources or open_process_resources()


def open_process_resources() -> ProcessResources:
    """Build the process's resources unless they are built already (a prefork child at start;
    in the parent never, so that no thread pool or socket crosses a fork)."""
    global _resources  # noqa: PLW0603 - the one place a process keeps them
    with _lock:
        if _resources is None:
            _resources = build_resources(get_settings())
        return _resources


def close_process_resources() -> None:
    """Finish what is in flight, then close the database and Redis connections.

    A child leaving on a warm shutdown finishes what it accepted; a killed one leaves its
    accounts to their leases, which expire and make them due again.
    """
    global _resources
    with _lock:
        resources, _resources = _resources, None
    if resources is not None:
        log.info("worker.draining")
        resources.window.drain()
    dispose_engine()
    close_redis()
