"""AWS account connections: what the API documents plus the worker's scheduling state."""

from __future__ import annotations

import enum
import uuid
from datetime import datetime

from sqlalchemy import (
    ARRAY,
    CheckConstraint,
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base


class AccountStatus(enum.StrEnum):
    """The three statuses the public API documents."""

    PENDING = "pending"
    CONNECTED = "connected"
    FAILED = "failed"


class OutcomeKind(enum.StrEnum):
    """The class of a verification attempt's outcome (docs/design.md, "Four classes of outcome")."""

    VERIFIED = "verified"
    CUSTOMER_MUST_FIX = "customer_must_fix"
    TRANSIENT = "transient"
    PLATFORM_FAULT = "platform_fault"


def _enum_values(enum_cls: type[enum.Enum]) -> list[str]:
    return [str(member.value) for member in enum_cls]


class AwsAccount(Base):
    """One connection between an organization and an AWS account through an IAM role."""

    __tablename__ = "aws_accounts"
    __table_args__ = (
        CheckConstraint(r"aws_account_id ~ '^[0-9]{12}$'", name="aws_account_id_12_digits"),
        # The API shows errorMessage exactly when the status is failed.
        CheckConstraint(
            "(status = 'failed') = (error_message IS NOT NULL)",
            name="error_message_iff_failed",
        ),
        CheckConstraint("length(alias) BETWEEN 1 AND 255", name="alias_length"),
        CheckConstraint("length(role_arn) BETWEEN 20 AND 2048", name="role_arn_length"),
        CheckConstraint("length(external_id) BETWEEN 2 AND 1224", name="external_id_length"),
        CheckConstraint("consecutive_failures >= 0", name="consecutive_failures_non_negative"),
        # A lease is an id and an expiry, or nothing.
        CheckConstraint("(lease_id IS NULL) = (lease_expires_at IS NULL)", name="lease_complete"),
        UniqueConstraint("organization_id", "aws_account_id"),
        UniqueConstraint("external_id"),
        # Serves the dispatcher's "due now, oldest first" claim as an index range scan.
        Index("ix_aws_accounts_next_due_at", "next_due_at"),
        # Free room per page so a claim (lease columns only) updates rows in place (migration
        # 0002).
        {"postgresql_with": {"fillfactor": 90}},
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    # Indexed by the (organization_id, aws_account_id) unique constraint, which leads with it.
    organization_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("organizations.id", ondelete="CASCADE")
    )
    alias: Mapped[str] = mapped_column(String(255))
    aws_account_id: Mapped[str] = mapped_column(String(12))
    role_arn: Mapped[str] = mapped_column(String(2048))
    external_id: Mapped[str] = mapped_column(String(1224))
    status: Mapped[AccountStatus] = mapped_column(
        Enum(
            AccountStatus,
            name="status",
            native_enum=False,
            create_constraint=True,
            length=16,
            values_callable=_enum_values,
            validate_strings=True,
        ),
        default=AccountStatus.PENDING,
        server_default=AccountStatus.PENDING.value,
    )
    error_message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    # Maintained by a trigger (see the initial migration) whenever a field the API shows changes,
    # so the worker's bookkeeping never moves the customer-visible updatedAt.
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    # --- the worker's state -------------------------------------------------------------------
    # When the role details (ARN, external ID, account id) were last set. The pending grace window
    # for IAM propagation counts from here. Maintained by the same trigger.
    role_changed_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    # Set by each applied result (and to now by a requested claim); a scheduled claim leaves it
    # alone, the lease below keeps a claimed account from being claimed again.
    next_due_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    last_attempted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_verified_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # When the role was last shown to refuse an AssumeRole without the external ID.
    external_id_checked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The permission probes (docs/permissions.md): when they last gave a verdict, which probed
    # permissions the role was shown to have, and which it was refused (empty: none missing).
    permissions_checked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    permissions_proven: Mapped[list[str] | None] = mapped_column(ARRAY(Text))
    permissions_missing: Mapped[list[str] | None] = mapped_column(ARRAY(Text))
    last_outcome: Mapped[OutcomeKind | None] = mapped_column(
        Enum(
            OutcomeKind,
            name="last_outcome",
            native_enum=False,
            create_constraint=True,
            length=32,
            values_callable=_enum_values,
            validate_strings=True,
        )
    )
    last_error_code: Mapped[str | None] = mapped_column(String(128))
    consecutive_failures: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    # A claim: while lease_expires_at is in the future nobody else claims the account, and only a
    # result carrying lease_id is applied. The dispatcher's claim sets these two columns only (a
    # requested one also makes the account due now): "due" means next_due_at has passed and no
    # live lease holds the account, so an account whose worker died is due again once its lease
    # expires, found by the same index scan.
    lease_id: Mapped[uuid.UUID | None] = mapped_column()
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
