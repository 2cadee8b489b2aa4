"""Celery's configuration, derived from the settings object. Loaded lazily by `worker.app`."""

from __future__ import annotations

import os

from kombu.entity import Exchange, Queue

# The queues' names and order (worker.queues: a module that loads nothing).
from worker.queues import DISPATCH_QUEUE, QUEUES, SCHEDULED_QUEUE, WEBHOOKS_QUEUE
from worker.settings import get_settings_or_exit

_settings = get_settings_or_exit()

broker_url = _settings.redis_url
broker_connection_retry_on_startup = True
broker_connection_max_retries = None  # keep trying across a Redis restart
broker_transport_options = {
    "queue_order_strategy": "priority",
    # Longer than any lease: a message restored after its worker died finds the lease gone
    # (expired and re-claimed) and is skipped. The worker uses no countdowns or ETAs.
    "visibility_timeout": max(3600, 2 * _settings.lease_seconds),
    "socket_timeout": 10,
    "socket_connect_timeout": 5,
    "socket_keepalive": True,
    "retry_on_timeout": True,
    "health_check_interval": 25,
}
broker_heartbeat = 0

# One direct exchange per queue, so a message reaches exactly the queue it is sent to.
task_queues = tuple(Queue(name, Exchange(name, type="direct"), routing_key=name) for name in QUEUES)
task_default_queue = SCHEDULED_QUEUE
task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
task_ignore_result = True
result_backend = None
task_acks_late = True
task_reject_on_worker_lost = True
task_soft_time_limit = _settings.verify_time_limit_seconds
# The hard limit kills a stuck child well before its leases expire, so its accounts come back.
task_time_limit = (_settings.verify_time_limit_seconds + _settings.lease_seconds) // 2
task_track_started = False
task_send_sent_event = False
worker_send_task_events = False

# One process per core (prefork), each verifying a message's chunk of accounts on a thread pool:
# a verification waits on STS for almost all its life, and one interpreter's lock would cap a
# single process at one core. `celery -A worker worker` starts exactly this.
worker_pool = "prefork"
worker_concurrency = _settings.worker_processes or os.cpu_count() or 1
# One message waiting per process: a requested re-verification is never stuck behind a
# reserved backlog.
worker_prefetch_multiplier = 1
worker_hijack_root_logger = False
worker_redirect_stdouts = False
worker_cancel_long_running_tasks_on_connection_loss = False
worker_enable_remote_control = True

beat_schedule_filename = _settings.beat_schedule_file
beat_schedule = {
    "dispatch-due-accounts": {
        "task": "verifier.dispatch_due_accounts",
        "schedule": _settings.dispatch_interval_seconds,
        # A dispatch that could not run in time is pointless: the next one is coming.
        "options": {"queue": DISPATCH_QUEUE, "expires": _settings.dispatch_interval_seconds * 2},
    },
}
if _settings.webhook_secret_key is not None:  # no key, no webhooks: no ticks either
    beat_schedule["deliver-webhooks"] = {
        "task": "verifier.deliver_webhooks",
        "schedule": _settings.webhook_dispatch_interval_seconds,
        "options": {
            "queue": WEBHOOKS_QUEUE,
            "expires": _settings.webhook_dispatch_interval_seconds * 2,
        },
    }
