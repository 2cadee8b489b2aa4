"""Thin Celery tasks: turn arguments back into objects, call the plain functions, log."""

from __future__ import annotations

import contextvars
import functools
import random
import threading
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from celery import Task
from sqlalchemy.exc import DBAPIError

from worker.app import CORRELATION_HEADER, app
from worker.celeryconfig import DISPATCH_QUEUE, SCHEDULED_QUEUE
from worker.circuit import PlatformCircuit
from worker.db import session_factory
from worker.dispatch import dispatch_due_accounts
from worker.logging import current_context, get_logger, unbind_account_context
from worker.ratelimit import StsRateLimiter
from worker.redis_client import get_redis
from worker.settings import get_settings
from worker.sts import get_verifier
from worker.verify import WORKER_ACTOR, Verification, verify_account

log = get_logger("worker.tasks")

_lock = threading.Lock()
_context: Verification | None = None


def verification_context() -> Verification:
    """The worker process's sessions, STS client, circuit breaker and settings, built once."""
    global _context  # noqa: PLW0603 - one per process
    if _context is None:
        with _lock:
            if _context is None:
                settings = get_settings()
                _context = Verification(
                    sessions=session_factory(),
                    verifier=get_verifier(before_call=sts_rate_limiter().acquire),
                    circuit=platform_circuit(),
                    settings=settings,
                    rng=random.Random(),
                )
    return _context


@functools.cache
def sts_rate_limiter() -> StsRateLimiter:
    """The worker process's handle on the global STS budget."""
    return StsRateLimiter(get_redis(), rate_per_second=get_settings().sts_rate_limit_per_second)


@functools.cache
def platform_circuit() -> PlatformCircuit:
    """The worker process's view of the shared circuit breaker."""
    return PlatformCircuit(get_redis(), pause_seconds=get_settings().platform_pause_seconds)


def _redelivered_too_often(task: Task) -> bool:
    """Count redeliveries of a message whose worker died; True past MAX_REDELIVERIES."""
    if not (task.request.delivery_info or {}).get("redelivered"):
        return False
    key = f"verifier:redeliveries:{task.request.id}"
    pipe = get_redis().pipeline()
    pipe.incr(key)
    pipe.expire(key, 24 * 3600)
    count = int(pipe.execute()[0])
    return count > get_settings().max_redeliveries


def send_verifications(
    account_ids: Sequence[str],
    lease_id: str,
    *,
    queue: str = SCHEDULED_QUEUE,
    actor: str = WORKER_ACTOR,
    correlation_id: str | None = None,
) -> int:
    """Enqueue verifications, `DISPATCH_CHUNK_SIZE` accounts per message; returns messages sent.

    The correlation id travels in the message headers (the current one if none is given).
    """
    correlation_id = correlation_id or current_context().get("correlation_id")
    size = get_settings().dispatch_chunk_size
    sent = 0
    for start in range(0, len(account_ids), size):
        verify_accounts_task.apply_async(
            args=(list(account_ids[start : start + size]), lease_id),
            kwargs={"actor": actor} if actor != WORKER_ACTOR else None,
            queue=queue,
            headers={CORRELATION_HEADER: correlation_id} if correlation_id else None,
        )
        sent += 1
    return sent


def _queued_verifications() -> int:
    """Accounts waiting in the scheduled queue (messages times the chunk size, an upper bound)."""
    return int(get_redis().llen(SCHEDULED_QUEUE)) * get_settings().dispatch_chunk_size


@app.task(name="verifier.dispatch_due_accounts", queue=DISPATCH_QUEUE, acks_late=False)
def dispatch_due_accounts_task() -> dict[str, Any]:
    """Claim due accounts and enqueue their verification (run by beat)."""
    ctx = verification_context()
    report = dispatch_due_accounts(
        sessions=ctx.sessions,
        settings=ctx.settings,
        send=send_verifications,
        queued=_queued_verifications,
        circuit=platform_circuit(),
        verifier=ctx.verifier,
    )
    return {"claimed": report.claimed, "sent": report.sent, "paused": report.paused}


@functools.cache
def _executor() -> ThreadPoolExecutor:
    # Built on first use, so inside the prefork child that runs tasks, never in the parent.
    return ThreadPoolExecutor(
        max_workers=get_settings().worker_concurrency, thread_name_prefix="verify"
    )


def _verify_one(account_id: str, lease_id: str, actor: str, correlation_id: str | None) -> str:
    """One account of a chunk; an error is logged and left to the lease, never raised."""
    try:
        for attempt in (1, 2):
            try:
                return verify_account(
                    verification_context(),
                    uuid.UUID(account_id),
                    uuid.UUID(lease_id),
                    actor=actor,
                    correlation_id=correlation_id,
                ).value
            except DBAPIError as error:
                # A connection that died with a restarted server invalidates the pool; the
                # attempt is safe to repeat (lease and compare-and-set) on a fresh connection.
                if not error.connection_invalidated or attempt == 2:
                    raise
                log.warning("database.reconnecting", account_id=account_id)
    except Exception:
        # Its lease expires and the account is due again: nothing is lost.
        log.exception("verification.error", account_id=account_id)
    finally:
        # Account fields were bound in this copy of the task's context; drop them with it.
        unbind_account_context()
    return "error"


@app.task(bind=True, name="verifier.verify_accounts")
def verify_accounts_task(
    self: Task, account_ids: list[str], lease_id: str, actor: str = WORKER_ACTOR
) -> dict[str, int]:
    """Verify a chunk of accounts leased together, concurrently, and apply each outcome."""
    if _redelivered_too_often(self):
        log.error("task.dropped", reason="redelivered too often", accounts=len(account_ids))
        return {"dropped": len(account_ids)}
    correlation_id = current_context().get("correlation_id")
    # Each account runs in a copy of this task's logging context (task id, correlation id).
    futures = [
        _executor().submit(
            contextvars.copy_context().run, _verify_one, account_id, lease_id, actor, correlation_id
        )
        for account_id in account_ids
    ]
    counts: dict[str, int] = {}
    for future in futures:
        result = future.result()
        counts[result] = counts.get(result, 0) + 1
    return counts
