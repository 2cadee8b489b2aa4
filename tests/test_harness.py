"""The test harness itself: what a test session may touch on the machine."""

from __future__ import annotations

import os
from pathlib import Path

import redis


def test_the_session_redis_is_a_private_server_of_its_own(redis_url: str) -> None:
    """Each test session talks to a redis-server it started itself, never a shared one, so two
    runs on one machine cannot flush or read each other's keys."""
    client = redis.Redis.from_url(redis_url)
    try:
        server_pid = int(client.info("server")["process_id"])
    finally:
        client.close()
    status = Path(f"/proc/{server_pid}/status").read_text()
    parent = next(line for line in status.splitlines() if line.startswith("PPid:"))
    assert int(parent.split()[1]) == os.getpid()
