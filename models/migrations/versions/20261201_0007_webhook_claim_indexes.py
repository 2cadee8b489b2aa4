"""Webhook delivery claims whose cost does not grow with the backlog.

The claim (worker/webhooks/claims.py) finds the endpoints with pending deliveries by a skip scan
of (endpoint_id, next_attempt_at), reads each endpoint's oldest due deliveries from the front of
its range, and counts each endpoint's deliveries in flight from an index of the leased rows only
(a few per endpoint). The index on next_attempt_at alone is no longer used.

Revision ID: 20261201_0007_webhook_claims
Revises: 20261201_0006_permissions
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "20261201_0007_webhook_claims"
down_revision: str | None = "20261201_0006_permissions"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_webhook_deliveries_endpoint_id_next_attempt_at",
        "webhook_deliveries",
        ["endpoint_id", "next_attempt_at"],
        unique=False,
        postgresql_where=sa.text("next_attempt_at IS NOT NULL"),
    )
    op.create_index(
        "ix_webhook_deliveries_endpoint_id_leased",
        "webhook_deliveries",
        ["endpoint_id"],
        unique=False,
        postgresql_where=sa.text("lease_id IS NOT NULL"),
    )
    op.drop_index("ix_webhook_deliveries_next_attempt_at", table_name="webhook_deliveries")


def downgrade() -> None:
    op.create_index(
        "ix_webhook_deliveries_next_attempt_at",
        "webhook_deliveries",
        ["next_attempt_at"],
        unique=False,
        postgresql_where=sa.text("next_attempt_at IS NOT NULL"),
    )
    op.drop_index("ix_webhook_deliveries_endpoint_id_leased", table_name="webhook_deliveries")
    op.drop_index(
        "ix_webhook_deliveries_endpoint_id_next_attempt_at", table_name="webhook_deliveries"
    )
