"""Room on every page of aws_accounts for in-place (HOT) updates of claimed rows.

A claim writes only the lease columns, none of them indexed; PostgreSQL can then update the row
without touching any index, provided the new version fits on the same page. A fillfactor of 90
keeps a tenth of each page free for that. Existing pages get the room as they are rewritten.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("ALTER TABLE aws_accounts SET (fillfactor = 90)")


def downgrade() -> None:
    op.execute("ALTER TABLE aws_accounts RESET (fillfactor)")
