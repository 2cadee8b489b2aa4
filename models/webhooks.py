"""Webhook endpoints of organizations and the deliveries (an outbox) of audit events to them.

Deliveries are created by a trigger on `audit_events` (migration 0005) in the transaction that
records the event, one per event and subscribed endpoint: see docs/webhooks.md.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ARRAY,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base


class WebhookEndpoint(Base):
    """A customer's HTTPS endpoint and the event types it wants."""

    __tablename__ = "webhook_endpoints"
    __table_args__ = (
        CheckConstraint("length(url) BETWEEN 8 AND 2048", name="url_length"),
        CheckConstraint(
            "enabled OR (disabled_reason IS NOT NULL AND disabled_at IS NOT NULL)",
            name="disabled_has_reason",
        ),
        CheckConstraint(
            "(previous_secret_encrypted IS NULL) = (previous_secret_expires_at IS NULL)",
            name="previous_secret_complete",
        ),
        # The fan-out trigger's lookup: the enabled endpoints of the event's organization.
        Index(
            "ix_webhook_endpoints_organization_id_enabled",
            "organization_id",
            postgresql_where=text("enabled"),
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    organization_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("organizations.id", ondelete="CASCADE")
    )
    url: Mapped[str] = mapped_column(String(2048))
    description: Mapped[str | None] = mapped_column(String(255))
    # Webhook event types, e.g. {account.status_changed}; NULL: every type, including types
    # added after the endpoint was registered.
    event_types: Mapped[list[str] | None] = mapped_column(ARRAY(String(64)))
    enabled: Mapped[bool] = mapped_column(Boolean, default=True, server_default=text("true"))
    disabled_reason: Mapped[str | None] = mapped_column(String(255))
    disabled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The `whsec_...` signing secret, encrypted with WEBHOOK_SECRET_KEY (Fernet): a copy of the
    # database alone does not reveal it.
    secret_encrypted: Mapped[bytes] = mapped_column(LargeBinary)
    # The secret before the last rotation keeps signing until it expires (several signatures).
    previous_secret_encrypted: Mapped[bytes | None] = mapped_column(LargeBinary)
    previous_secret_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Since when no delivery has succeeded (NULL: the last attempt succeeded, or none yet).
    failing_since: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The last failed attempt: a failure long after it starts a new streak (see delivery.py).
    last_failure_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class WebhookDelivery(Base):
    """One message to one endpoint: created with its audit event, retried until it is delivered
    or given up."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        # Exactly one delivery per event and endpoint, whoever inserts (NULL event: test events).
        UniqueConstraint("event_id", "endpoint_id"),
        CheckConstraint("(lease_id IS NULL) = (lease_expires_at IS NULL)", name="lease_complete"),
        CheckConstraint(
            "(next_attempt_at IS NULL) = (delivered_at IS NOT NULL OR given_up_at IS NOT NULL)",
            name="pending_iff_not_finished",
        ),
        # The claim (worker/webhooks/claims.py): endpoints with pending deliveries (a skip scan)
        # and each one's oldest due deliveries; pending deliveries only.
        Index(
            "ix_webhook_deliveries_endpoint_id_next_attempt_at",
            "endpoint_id",
            "next_attempt_at",
            postgresql_where=text("next_attempt_at IS NOT NULL"),
        ),
        # The claim's count of each endpoint's deliveries in flight: leased rows only.
        Index(
            "ix_webhook_deliveries_endpoint_id_leased",
            "endpoint_id",
            postgresql_where=text("lease_id IS NOT NULL"),
        ),
        Index("ix_webhook_deliveries_endpoint_id_created_at", "endpoint_id", "created_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, server_default=func.gen_random_uuid())
    endpoint_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("webhook_endpoints.id", ondelete="CASCADE")
    )
    # The audit event announced; no foreign key, like the audit log's own rows.
    event_id: Mapped[int | None] = mapped_column(BigInteger)
    event_type: Mapped[str] = mapped_column(String(64))
    # The exact message, `{type, timestamp, data}`, fixed when the event was recorded.
    payload: Mapped[dict[str, Any]] = mapped_column(JSONB)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    next_attempt_at: Mapped[datetime | None] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    last_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_status_code: Mapped[int | None] = mapped_column(SmallInteger)
    # Why the last attempt failed, or the start of the response body: short and escaped.
    last_error: Mapped[str | None] = mapped_column(Text)
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    given_up_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    # A claim by a delivery task, like the accounts' leases (worker/claims.py).
    lease_id: Mapped[uuid.UUID | None] = mapped_column()
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    @property
    def message_id(self) -> str:
        """The `webhook-id` header: the same on every attempt, the receiver's idempotency key."""
        return message_id(self.id)


def message_id(delivery_id: uuid.UUID) -> str:
    """The `webhook-id` of a delivery (no `.`: the signed content is `id.timestamp.body`)."""
    return f"msg_{delivery_id.hex}"
