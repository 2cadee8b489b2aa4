"""Thin Celery tasks: turn arguments back into objects, call the plain functions, log."""

from __future__ import annotations

import functools
import random
import threading
import uuid
from typing import Any

from celery import Task

from worker.app import CORRELATION_HEADER, app
from worker.celeryconfig import DISPATCH_QUEUE, SCHEDULED_QUEUE
from worker.circuit import PlatformCircuit
from worker.db import session_factory
from worker.dispatch import dispatch_due_accounts
from worker.logging import current_context, get_logger
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


def send_verification(
    account_id: str,
    lease_id: str,
    *,
    queue: str = SCHEDULED_QUEUE,
    actor: str = WORKER_ACTOR,
    correlation_id: str | None = None,
) -> None:
    """Enqueue one verification, carrying the correlation id in the message headers."""
    correlation_id = correlation_id or current_context().get("correlation_id")
    verify_account_task.apply_async(
        args=(account_id, lease_id),
        kwargs={"actor": actor} if actor != WORKER_ACTOR else None,
        queue=queue,
        headers={CORRELATION_HEADER: correlation_id} if correlation_id else None,
    )


def _queued_verifications() -> int:
    client = get_redis()
    pipe = client.pipeline()
    for queue in (SCHEDULED_QUEUE,):
        pipe.llen(queue)
    return sum(int(n) for n in pipe.execute())


@app.task(name="verifier.dispatch_due_accounts", queue=DISPATCH_QUEUE, acks_late=False)
def dispatch_due_accounts_task() -> dict[str, Any]:
    """Claim due accounts and enqueue their verification (run by beat)."""
    ctx = verification_context()
    report = dispatch_due_accounts(
        sessions=ctx.sessions,
        settings=ctx.settings,
        send=send_verification,
        queued=_queued_verifications,
        circuit=platform_circuit(),
        verifier=ctx.verifier,
    )
    return {"claimed": report.claimed, "sent": report.sent, "paused": report.paused}


@app.task(bind=True, name="verifier.verify_account")
def verify_account_task(
    self: Task, account_id: str, lease_id: str, actor: str = WORKER_ACTOR
) -> str:
    """Verify one leased account and apply the outcome."""
    if _redelivered_too_often(self):
        log.error("task.dropped", reason="redelivered too often", account_id=account_id)
        return "dropped"
    correlation_id = current_context().get("correlation_id")
    result = verify_account(
        verification_context(),
        uuid.UUID(account_id),
        uuid.UUID(lease_id),
        actor=actor,
        correlation_id=correlation_id,
    )
    return result.value
