"""The process's Redis client for the worker's own keys (the broker has its own connections)."""

from __future__ import annotations

import threading

import redis

from worker.settings import get_settings

_lock = threading.Lock()
_client: redis.Redis | None = None


def get_redis() -> redis.Redis:
    """A client with timeouts and retries, built on first use."""
    global _client  # noqa: PLW0603 - one connection pool per process
    if _client is None:
        with _lock:
            if _client is None:
                _client = redis.Redis.from_url(
                    get_settings().redis_url,
                    socket_timeout=5,
                    socket_connect_timeout=5,
                    health_check_interval=30,
                    retry_on_timeout=True,
                )
    return _client


def close_redis() -> None:
    """Close the client's connections (a process exiting, a test's teardown)."""
    global _client
    with _lock:
        client, _client = _client, None
    if client is not None:
        client.close()
