"""Sending verification messages: a chunk of account ids and their lease, by the task's name.

Used by the dispatcher and by `request_verification`; the task that receives the messages is in
`worker.tasks`, which nothing here imports. Importing this module loads the Celery app and its
configuration (which reads the settings, and exits on invalid ones).
"""

from __future__ import annotations

from collections.abc import Sequence

import redis

from worker.app import CORRELATION_HEADER, app
from worker.logging import current_context
from worker.queues import SCHEDULED_QUEUE
from worker.settings import Settings, get_settings
from worker.verify import WORKER_ACTOR

VERIFY_TASK = "verifier.verify_accounts"


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
        app.send_task(
            VERIFY_TASK,
            args=(list(account_ids[start : start + size]), lease_id),
            kwargs={"actor": actor} if actor != WORKER_ACTOR else None,
            queue=queue,
            headers={CORRELATION_HEADER: correlation_id} if correlation_id else None,
        )
        sent += 1
    return sent


def queued_verifications(client: redis.Redis, settings: Settings) -> int:
    """Accounts waiting in the scheduled queue (messages times the chunk size, an upper bound)."""
    return int(client.llen(SCHEDULED_QUEUE)) * settings.dispatch_chunk_size
