"""Delivering in the worker: the Celery surface of `worker.webhooks.runner`.

Three things have deliveries claimed, all through `Runner.claim_and_submit`: beat's
`verifier.deliver_webhooks` task on its own queue (the schedule's floor: retries falling due); a
listener thread per worker process woken by PostgreSQL when a transaction that created
deliveries commits (an event reaches its endpoint in well under a second even while
verifications keep every process busy); and the recorder after each batch of results it writes.
The last two go through the process's claimer thread, at most one claim per
CLAIM_INTERVAL_SECONDS. A claim takes milliseconds, so a
slow or hanging endpoint never holds a worker process that verifications need; the HTTP attempts
run on WEBHOOK_CONCURRENCY threads, each bounded by its timeouts, at most
WEBHOOK_PER_ENDPOINT_LIMIT per endpoint at a time. A process that dies loses only leases, which
expire: the deliveries are attempted again with the same `webhook-id`; one leaving on a warm
shutdown finishes and records its attempts first.
"""

from __future__ import annotations

import threading
from typing import Any

from celery import signals

from worker.app import app
from worker.logging import get_logger
from worker.queues import WEBHOOKS_QUEUE
from worker.settings import get_settings
from worker.webhooks.runner import Runner, build_deliverer
from worker.webhooks.signing import SecretKeyError

log = get_logger("worker.webhooks")

_lock = threading.Lock()
_runner: Runner | None = None


def runner() -> Runner:
    """The process's delivery machinery (threads, pool, key, connections), built on first use."""
    global _runner  # noqa: PLW0603 - one per process
    if _runner is None:
        with _lock:
            if _runner is None:
                _runner = Runner(build_deliverer(get_settings()))
    return _runner


def claim_and_submit() -> int:
    """Claim as many due deliveries as this process has free delivery threads and start them."""
    return runner().claim_and_submit()


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


def _listen() -> None:
    try:
        listening = runner()
    except SecretKeyError as error:
        log.error("webhook.misconfigured", error=str(error))  # noqa: TRY400 - no traceback
        return
    listening.listen_forever()


@signals.worker_process_init.connect
def _start_listener(**_: Any) -> None:
    if get_settings().webhook_secret_key is None:
        return
    threading.Thread(target=_listen, name="webhook-listener", daemon=True).start()


@signals.worker_process_shutdown.connect
def _drain_on_exit(**_: Any) -> None:
    # A child leaving on a warm shutdown finishes and records its attempts in flight; a killed
    # one leaves them to their leases, which expire and make them due again.
    if _runner is not None:
        _runner.drain()
