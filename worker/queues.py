"""The queues' names, in the order the worker reads them (kombu's "priority" strategy: always the
first non-empty one). A module of its own so `worker.fleet` and `scripts/status` can list them
without loading Celery's configuration (worker.celeryconfig declares them)."""

from __future__ import annotations

# Dispatch is tiny and must never wait behind a backlog.
DISPATCH_QUEUE = "verifier.dispatch"
# Beat's webhook delivery claims: tiny tasks (the HTTP attempts run on threads of the process),
# ahead of verifications so retries are not stuck behind a backlog.
WEBHOOKS_QUEUE = "verifier.webhooks"
# Requested re-verifications jump ahead of scheduled ones.
REQUESTED_QUEUE = "verifier.requested"
SCHEDULED_QUEUE = "verifier.scheduled"

QUEUES = (DISPATCH_QUEUE, WEBHOOKS_QUEUE, REQUESTED_QUEUE, SCHEDULED_QUEUE)
