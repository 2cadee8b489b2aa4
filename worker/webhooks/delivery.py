"""Delivering webhook messages: claim due deliveries, send one signed POST each, record the results.

The steps live in their own modules — claiming (`claims`), sending (`sending`), recording
(`recording`) — and `Deliverer` holds what a worker process needs to run them: sessions, the
secrets' key, the HTTP connections. The HTTP request happens outside any transaction; results are
recorded in batches, each only if its lease is still the attempt's own.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from worker.logging import get_logger
from worker.settings import Settings
from worker.webhooks.addresses import Resolver
from worker.webhooks.claims import DeliveryClaim, Message, claim_due_deliveries, lease_seconds
from worker.webhooks.connections import Connections
from worker.webhooks.recording import Finished, Recorded, record_attempts
from worker.webhooks.sending import AttemptKind, AttemptResult, post_signed, signed_headers
from worker.webhooks.signing import SecretBox, SecretKeyError

log = get_logger("worker.webhooks")


@dataclass
class Deliverer:
    """Everything a worker process needs to deliver: sessions, key, connections, settings."""

    sessions: sessionmaker[Session]
    settings: Settings
    box: SecretBox
    connections: Connections
    rng: random.Random
    resolver: Resolver | None = None

    def deliver(self, message: Message, lease_id: uuid.UUID) -> Recorded | None:
        """One attempt of one leased delivery; None if the lease was lost meanwhile (logged)."""
        (recorded,) = self.record([Finished(message, lease_id, self.attempt(message))])
        return recorded

    def record(self, finished: Sequence[Finished]) -> list[Recorded | None]:
        """Record finished attempts in one transaction (one statement, plus the rare endpoint
        disabling); None for each whose lease was lost meanwhile (logged)."""
        with self.sessions.begin() as session:
            recorded = record_attempts(session, finished, settings=self.settings, rng=self.rng)
        for item, outcome in zip(finished, recorded, strict=True):
            if outcome is None:
                # Another attempt holds the delivery now (the lease expired or a replay reset
                # it): its result is the one recorded.
                log.warning(
                    "webhook.lease_lost",
                    delivery_id=str(item.message.delivery_id),
                    endpoint_id=str(item.message.endpoint_id),
                    organization_id=str(item.message.organization_id),
                    outcome=item.result.kind.value,
                    status_code=item.result.status_code,
                )
        return recorded

    def attempt(self, message: Message) -> AttemptResult:
        """Sign and send one message; every error becomes a failed result, never an exception
        (an exception would leave the delivery leased and retried, unrecorded, forever)."""
        try:
            secrets = [self.box.decrypt(stored) for stored in message.stored_secrets]
        except SecretKeyError as error:
            return AttemptResult(AttemptKind.UNSIGNABLE, error=str(error))
        try:
            body = message.body()
            return post_signed(
                self.connections,
                message.url,
                body=body,
                headers=signed_headers(message.message_id, body, secrets),
                allow_private=self.settings.webhook_allow_private_networks,
                resolver=self.resolver,
                time_limit=self.settings.webhook_attempt_timeout_seconds,
            )
        except Exception as error:
            log.exception("webhook.attempt_error", delivery_id=str(message.delivery_id))
            return AttemptResult(
                AttemptKind.FAILED, error=f"internal error ({type(error).__name__})"
            )

    def claim(self, limit: int) -> DeliveryClaim:
        """Lease due deliveries (its own short transaction)."""
        with self.sessions.begin() as session:
            return claim_due_deliveries(
                session,
                limit=limit,
                per_endpoint=self.settings.webhook_per_endpoint_limit,
                lease_seconds=lease_seconds(self.settings),
            )

    def deliver_due(self) -> list[Recorded | None]:
        """Claim due deliveries, attempt each, one after the other, and record them together
        (scripts and tests; the worker attempts them concurrently)."""
        claim = self.claim(self.settings.webhook_batch_size)
        return self.record([Finished(m, claim.lease_id, self.attempt(m)) for m in claim.messages])
