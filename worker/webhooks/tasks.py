"""The delivery task: claim due deliveries and hand them to this process's delivery threads.

The task itself only claims (milliseconds), so a slow or hanging endpoint never holds a worker
process that verifications need; the HTTP attempts run on a thread pool of the process, each
bounded by its timeouts, at most WEBHOOK_PER_ENDPOINT_LIMIT per endpoint at a time. A process that
dies loses only leases, which expire: the deliveries are attempted again with the same
`webhook-id`.
"""

from __future__ import annotations

import random
import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from worker.app import app
from worker.celeryconfig import WEBHOOKS_QUEUE
from worker.db import session_factory
from worker.logging import get_logger
from worker.settings import get_settings
from worker.webhooks.delivery import Deliverer, build_client
from worker.webhooks.signing import SecretBox, SecretKeyError

log = get_logger("worker.webhooks")

_lock = threading.Lock()
_deliverer: Deliverer | None = None
_pool: ThreadPoolExecutor | None = None
_in_flight = 0


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


def _attempt(delivery: Deliverer, delivery_id: uuid.UUID, lease_id: uuid.UUID) -> None:
    try:
        delivery.deliver(delivery_id, lease_id)
    except Exception:
        # A thread's error must be logged, not lost; the lease makes the delivery due again.
        log.exception("webhook.attempt_error", delivery_id=str(delivery_id))


@app.task(name="verifier.deliver_webhooks", queue=WEBHOOKS_QUEUE, acks_late=False)
def deliver_webhooks_task() -> dict[str, Any]:
    """Claim as many due deliveries as this process has free delivery threads (run by beat)."""
    global _in_flight  # noqa: PLW0603
    if get_settings().webhook_secret_key is None:
        return {"claimed": 0, "reason": "WEBHOOK_SECRET_KEY not set"}
    try:
        delivery = deliverer()
    except SecretKeyError as error:
        log.error("webhook.misconfigured", error=str(error))  # noqa: TRY400 - no traceback
        return {"claimed": 0}
    with _lock:
        room = delivery.settings.webhook_concurrency - _in_flight
    claim = delivery.claim(min(room, delivery.settings.webhook_batch_size))
    assert _pool is not None  # noqa: S101 - built with the deliverer
    for delivery_id in claim.delivery_ids:
        with _lock:
            _in_flight += 1
        _pool.submit(_attempt, delivery, delivery_id, claim.lease_id).add_done_callback(_done)
    return {"claimed": len(claim.delivery_ids)}
