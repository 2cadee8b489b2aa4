"""Permission probes: what the role was shown to be allowed, and the permissions_changed event.

Three nullable columns on aws_accounts (NULL until the first probe; adding them rewrites no
rows), and `permissions_changed` added to the event types the audit log's constraint accepts.

Revision ID: 20261201_0006_permissions
Revises: 20261201_0005_webhooks
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "20261201_0006_permissions"
down_revision: str | None = "20261201_0005_webhooks"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

EVENT_TYPES = (
    "status_changed",
    "verification_requested",
    "external_id_not_enforced",
    "webhook_endpoint_disabled",
)
NEW_EVENT_TYPES = ("permissions_changed",)
CONSTRAINT = "ck_audit_events_event_type"


def _event_type_check(types: Sequence[str]) -> None:
    listed = ", ".join(f"'{name}'" for name in types)
    op.drop_constraint(op.f(CONSTRAINT), "audit_events", type_="check")
    # op.f: the name is final (the naming convention would prefix it again).
    op.create_check_constraint(op.f(CONSTRAINT), "audit_events", f"event_type IN ({listed})")


def upgrade() -> None:
    op.add_column(
        "aws_accounts",
        sa.Column("permissions_checked_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.add_column(
        "aws_accounts", sa.Column("permissions_proven", postgresql.ARRAY(sa.Text()), nullable=True)
    )
    op.add_column(
        "aws_accounts", sa.Column("permissions_missing", postgresql.ARRAY(sa.Text()), nullable=True)
    )
    _event_type_check(EVENT_TYPES + NEW_EVENT_TYPES)


def downgrade() -> None:
    # Refused by PostgreSQL while the append-only log holds a permissions_changed event: the
    # history is not rewritten to make a downgrade possible.
    _event_type_check(EVENT_TYPES)
    op.drop_column("aws_accounts", "permissions_missing")
    op.drop_column("aws_accounts", "permissions_proven")
    op.drop_column("aws_accounts", "permissions_checked_at")
