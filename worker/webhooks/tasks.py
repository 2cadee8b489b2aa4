"""Delivering in the worker: claims hand due deliveries to this process's delivery threads.

Three things claim, all through `claim_and_submit`: beat's `verifier.deliver_webhooks` task on
its own queue (the schedule's floor: retries falling due), a listener thread per worker process
woken by PostgreSQL when a transaction that created deliveries commits (an event reaches its
endpoint in well under a second even while verifications keep every process busy), and each
finished attempt (a burst to one endpoint drains at its concurrency limit, not once per tick).
A claim takes milliseconds, so a slow or hanging endpoint never holds a worker process that
verifications need; the HTTP attempts run on WEBHOOK_CONCURRENCY threads, each bounded by its
timeouts, at most WEBHOOK_PER_ENDPOINT_LIMIT per endpoint at a time. A process that dies loses
only leases, which expire: the deliveries are attempted again with the same `webhook-id`.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import psycopg
from celery import signals

from worker.app import app
from worker.db import session_factory
from worker.logging import get_logger
from worker.queues import WEBHOOKS_QUEUE
from worker.settings import get_settings
from worker.webhooks.delivery import Deliverer, Message, build_client
from worker.webhooks.signing import SecretBox, SecretKeyError

log = get_logger("worker.webhooks")

_lock = threading.Lock()
_deliverer: Deliverer | None = None
_pool: ThreadPoolExecutor | None = None
_in_flight = 0
_claiming = threading.Lock()


def deliverer() -> Deliverer:
    """The process's deliverer (sessions, key, HTTP client), built on first use."""
    global _deliverer, _pool  # noqa: PLW0603 - one per process
    if _deliverer is None:
        with _lock:
            if _deliverer is None:
                settings = get_settings()
                _pool = ThreadPoolExecutor(
                    settings.webhook_concurrency, thread_name_prefix="webhook"
                )
                _deliverer = Deliverer(
                    sessions=session_factory(),
                    settings=settings,
                    box=SecretBox.from_settings(settings),
                    client=build_client(settings),
                    rng=random.Random(),
                )
    return _deliverer


def _done(_: Future[Any]) -> None:
    global _in_flight  # noqa: PLW0603
    with _lock:
        _in_flight -= 1


def _attempt(delivery: Deliverer, message: Message, lease_id: uuid.UUID) -> None:
    try:
        delivery.deliver(message, lease_id)
    except Exception:
        # A thread's error must be logged, not lost; the lease makes the delivery due again.
        log.exception("webhook.attempt_error", delivery_id=str(message.delivery_id))
    # A finished attempt frees a slot of its endpoint: claim again at once rather than at the
    # next tick, or a burst to one endpoint would drain at WEBHOOK_PER_ENDPOINT_LIMIT per tick.
    # One claim at a time per process; a thread that finds one running leaves it to that one.
    if _claiming.acquire(blocking=False):
        try:
            _claim_locked()
        except Exception:
            log.exception("webhook.claim_error")
        finally:
            _claiming.release()


@app.task(name="verifier.deliver_webhooks", queue=WEBHOOKS_QUEUE, acks_late=False)
def deliver_webhooks_task() -> dict[str, Any]:
    """Claim as many due deliveries as this process has free delivery threads (run by beat)."""
    if get_settings().webhook_secret_key is None:
        return {"claimed": 0, "reason": "WEBHOOK_SECRET_KEY not set"}
    try:
        return {"claimed": claim_and_submit()}
    except SecretKeyError as error:
        log.error("webhook.misconfigured", error=str(error))  # noqa: TRY400 - no traceback
        return {"claimed": 0}


NOTIFY_CHANNEL = "webhook_deliveries"
# Notifications arriving this close together are served by one claim.
_COALESCE_SECONDS = 0.05
# Without notifications, a claim this often anyway (retries falling due; a missed notification
# while the listener reconnected). Beat's task does the same, through the queue.
_IDLE_CLAIM_SECONDS = 5.0


def claim_and_submit() -> int:
    """Claim as many due deliveries as this process has free delivery threads and start them."""
    with _claiming:
        return _claim_locked()


def _claim_locked() -> int:
    global _in_flight  # noqa: PLW0603
    delivery = deliverer()
    with _lock:
        # The finishing attempt that may be calling still counts: its thread is busy until now.
        room = delivery.settings.webhook_concurrency - _in_flight
    claim = delivery.claim(min(room, delivery.settings.webhook_batch_size))
    assert _pool is not None  # noqa: S101 - built with the deliverer
    for message in claim.messages:
        with _lock:
            _in_flight += 1
        _pool.submit(_attempt, delivery, message, claim.lease_id).add_done_callback(_done)
    return len(claim.messages)


def _listen_forever() -> None:
    """LISTEN for new deliveries (notified when their transaction commits) and claim them at
    once: the event reaches its endpoint without waiting for beat's next tick, and without a
    worker process free to take the task while verifications keep every process busy."""
    url = get_settings().database_url.replace("postgresql+psycopg://", "postgresql://", 1)
    while True:
        try:
            with psycopg.connect(
                url, autocommit=True, connect_timeout=5, application_name="webhook-listener"
            ) as conn:
                conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                claim_and_submit()
                while True:
                    notified = any(
                        True for _ in conn.notifies(timeout=_IDLE_CLAIM_SECONDS, stop_after=1)
                    )
                    if notified:
                        time.sleep(_COALESCE_SECONDS)
                        for _ in conn.notifies(timeout=0):
                            pass
                    claim_and_submit()
        except Exception:  # the listener must outlive a database restart
            log.warning("webhook.listener_reconnecting", retry_in_seconds=5, exc_info=True)
            time.sleep(5)


@signals.worker_process_init.connect
def _start_listener(**_: Any) -> None:
    if get_settings().webhook_secret_key is None:
        return
    threading.Thread(target=_listen_forever, name="webhook-listener", daemon=True).start()
