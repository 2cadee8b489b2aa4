"""The append-only audit log of what happened to account connections."""

from __future__ import annotations

import enum
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    Enum,
    Identity,
    Index,
    String,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from models.account import AccountStatus, _enum_values
from models.base import Base


class AuditEventType(enum.StrEnum):
    """Stable, documented event types; consumers (the API, other services) switch on these."""

    STATUS_CHANGED = "status_changed"
    VERIFICATION_REQUESTED = "verification_requested"
    EXTERNAL_ID_NOT_ENFORCED = "external_id_not_enforced"
    # About a webhook endpoint, not an account (account_id is NULL): docs/webhooks.md.
    WEBHOOK_ENDPOINT_DISABLED = "webhook_endpoint_disabled"
    # The set of probed permissions the role lacks changed; details hold "before" and "after".
    PERMISSIONS_CHANGED = "permissions_changed"


def _status_enum(name: str) -> Enum:
    return Enum(
        AccountStatus,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=16,
        values_callable=_enum_values,
        validate_strings=True,
    )


class AuditEvent(Base):
    """One event; the database refuses UPDATE, DELETE and TRUNCATE on this table.

    No foreign keys on purpose: the history of an account outlives the account (and its
    organization), and a cascade could never delete from an append-only table anyway.
    """

    __tablename__ = "audit_events"
    __table_args__ = (
        CheckConstraint(
            "event_type <> 'status_changed' "
            "OR (from_status IS NOT NULL AND to_status IS NOT NULL AND from_status <> to_status)",
            name="status_change_has_from_and_to",
        ),
        CheckConstraint(
            "account_id IS NOT NULL OR event_type = 'webhook_endpoint_disabled'",
            name="account_id_unless_webhook_event",
        ),
        Index("ix_audit_events_account_id_occurred_at", "account_id", "occurred_at"),
        # Serves the wave guard's "how many accounts failed with this code lately" without
        # scanning the whole history.
        Index(
            "ix_audit_events_recent_failures",
            "reason",
            "occurred_at",
            postgresql_where=text("event_type = 'status_changed' AND to_status = 'failed'"),
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    occurred_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    organization_id: Mapped[uuid.UUID] = mapped_column(index=True)
    # NULL only for events about a webhook endpoint (a CHECK says so). Typed as never NULL on
    # purpose: every reader of account events filters by an account event type first.
    account_id: Mapped[uuid.UUID] = mapped_column(nullable=True)
    event_type: Mapped[AuditEventType] = mapped_column(
        Enum(
            AuditEventType,
            name="event_type",
            native_enum=False,
            create_constraint=True,
            length=64,
            values_callable=_enum_values,
            validate_strings=True,
        )
    )
    # Who caused it: "worker" for scheduled verification, or the requester ("api:user:42", ...).
    actor: Mapped[str] = mapped_column(String(255))
    correlation_id: Mapped[str | None] = mapped_column(String(255))
    from_status: Mapped[AccountStatus | None] = mapped_column(_status_enum("from_status"))
    to_status: Mapped[AccountStatus | None] = mapped_column(_status_enum("to_status"))
    # Machine-readable cause: "verified", an AWS error code, or a local check's code.
    reason: Mapped[str | None] = mapped_column(String(128))
    details: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict, server_default="{}")
