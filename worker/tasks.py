"""The Celery surface: the tasks' arguments turned into ids, the redelivery cap, and the hooks
that build and tear down the process's resources (`worker.resources`).

What a task does is elsewhere: claiming in `worker.dispatch`, sending in `worker.sending`, a
chunk's verifications in `worker.chunk` on the window of `worker.window`.
"""

from __future__ import annotations

from typing import Any

from celery import Task, signals

from worker import metrics
from worker.app import app
from worker.chunk import start_chunk
from worker.db import with_database_retry
from worker.dispatch import dispatch_due_accounts
from worker.fleet import remember_dispatch
from worker.logging import current_context, get_logger
from worker.messages import MIN_ACCOUNTS_LIMIT, RejectedMessageError, parse_chunk_message
from worker.queues import DISPATCH_QUEUE
from worker.resources import close_process_resources, open_process_resources, process_resources
from worker.sending import VERIFY_TASK, queued_verifications, send_verifications
from worker.settings import get_settings
from worker.verify import WORKER_ACTOR

log = get_logger("worker.tasks")


@signals.worker_process_init.connect
def _open_resources(**_: object) -> None:
    # A prefork child, as it starts: everything it shares between tasks is built here, once.
    open_process_resources()


@signals.worker_process_shutdown.connect
def _close_resources(**_: object) -> None:
    close_process_resources()


def _redelivered_too_often(task: Task) -> bool:
    """Count redeliveries of a message whose worker died; True past MAX_REDELIVERIES."""
    if not (task.request.delivery_info or {}).get("redelivered"):
        return False
    key = f"verifier:redeliveries:{task.request.id}"
    pipe = process_resources().redis.pipeline()
    pipe.incr(key)
    pipe.expire(key, 24 * 3600)
    count = int(pipe.execute()[0])
    return count > get_settings().max_redeliveries


@app.task(name="verifier.dispatch_due_accounts", queue=DISPATCH_QUEUE, acks_late=False)
def dispatch_due_accounts_task() -> dict[str, Any]:
    """Claim due accounts and enqueue their verification (run by beat)."""
    resources = process_resources()
    deps = resources.deps
    assert deps.circuit is not None  # noqa: S101 - a worker process always has one
    circuit = deps.circuit
    # Beat's listener dispatches as soon as the database is back after a restart, when this
    # process's pooled connections are dead: claim again on fresh ones, not at the next tick.
    report = with_database_retry(
        lambda: dispatch_due_accounts(
            sessions=deps.sessions,
            settings=deps.settings,
            send=send_verifications,
            queued=lambda: queued_verifications(resources.redis, deps.settings),
            circuit=circuit,
            verifier=deps.verifier,
        ),
        accounts=0,
    )
    metrics.record_dispatch(
        claimed=report.claimed, reclaimed=report.reclaimed, paused=report.paused
    )
    remember_dispatch(
        resources.redis, claimed=report.claimed, sent=report.sent, paused=report.paused
    )
    return {"claimed": report.claimed, "sent": report.sent, "paused": report.paused}


@app.task(bind=True, name=VERIFY_TASK)
def verify_accounts_task(
    self: Task,
    account_ids: object = None,
    lease_id: object = None,
    actor: object = WORKER_ACTOR,
    *extra_args: object,
    **extra_kwargs: object,
) -> dict[str, int]:
    """Verify a chunk of accounts leased together: read them, then hand them to the window.

    Returns once every account is in flight (or skipped); the last account checked writes the
    chunk's results in one transaction. A malformed or oversized message is refused (any
    arguments are accepted, so that even a wrong number of them is refused, not a traceback).
    """
    try:
        message = parse_chunk_message(
            account_ids,
            lease_id,
            actor,
            max_accounts=max(get_settings().dispatch_chunk_size, MIN_ACCOUNTS_LIMIT),
            extra_args=extra_args,
            extra_kwargs=extra_kwargs,
        )
    except RejectedMessageError as rejected:
        log.error(  # noqa: TRY400 - a refusal: the reason says it all, a traceback would not
            "task.rejected",
            reason=rejected.reason,
            accounts=rejected.accounts,
            example=rejected.example,
        )
        return {"rejected": rejected.accounts or 0}
    lease, ids = message.lease_id, message.account_ids
    if _redelivered_too_often(self):
        log.error("task.dropped", reason="redelivered too often", accounts=len(ids))
        return {"dropped": len(ids)}
    resources = process_resources()
    chunk = start_chunk(
        resources.deps,
        ids,
        lease,
        actor=message.actor,
        correlation_id=current_context().get("correlation_id"),
    )
    skipped = len(set(ids)) - len(chunk.attempts)
    return {**resources.window.hand_over(chunk, lease), "skipped": skipped}
