"""An index that answers "how many accounts per status, and why not verified" without reading
the table: `scripts/status` and the worker's fleet gauges count it with an index-only scan
(about a quarter of the time of a sequential scan at a million accounts).

The worker's writes of a result change `next_due_at`, which is indexed already, so they were
never in-place (HOT) updates: this index adds one entry to a write that already updates one.
The dispatcher's claim changes only the lease columns and stays in place. Built CONCURRENTLY:
writes go on while it is built.

Revision ID: 20261201_0004_status
Revises: 20261201_0005_webhooks
Create Date: 2026-12-01
"""

from collections.abc import Sequence

from alembic import op

revision: str = "20261201_0004_status"
down_revision: str | None = "20261201_0005_webhooks"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEX = "ix_aws_accounts_status_outcome"


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.create_index(
            INDEX,
            "aws_accounts",
            ["status", "last_outcome", "last_error_code"],
            postgresql_concurrently=True,
            if_not_exists=True,
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index(INDEX, table_name="aws_accounts", postgresql_concurrently=True)
