"""Notify listeners when an account becomes due now, so it is dispatched within milliseconds.

A row inserted due now, or updated from not due (or leased) to due now (an edited role, made due
by `aws_accounts_track_changes`; a lease given back), sends a notification on the channel
`aws_accounts_due` when its transaction commits; beat listens and dispatches at once (see
worker/listener.py). The trigger fires for whoever writes, the API included. Identical
notifications of one transaction are delivered once, so a bulk insert costs one, and claims
(which set a lease) and applied results (due later) never send any: the WHEN clause keeps the
function from even being called for them.

Revision ID: 20261201_0002_notify
Revises: 0002
Create Date: 2026-12-01
"""

from collections.abc import Sequence

from alembic import op

revision: str = "20261201_0002_notify"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NOTIFY_DUE = """
CREATE FUNCTION aws_accounts_notify_due() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('aws_accounts_due', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER aws_accounts_notify_due_insert AFTER INSERT ON aws_accounts
    FOR EACH ROW
    WHEN (NEW.next_due_at <= now() AND NEW.lease_id IS NULL)
    EXECUTE FUNCTION aws_accounts_notify_due();
CREATE TRIGGER aws_accounts_notify_due_update AFTER UPDATE ON aws_accounts
    FOR EACH ROW
    WHEN (NEW.next_due_at <= now() AND NEW.lease_id IS NULL
          AND (OLD.next_due_at > now() OR OLD.lease_id IS NOT NULL))
    EXECUTE FUNCTION aws_accounts_notify_due();
"""


def upgrade() -> None:
    op.execute(NOTIFY_DUE)


def downgrade() -> None:
    op.execute("DROP TRIGGER aws_accounts_notify_due_update ON aws_accounts")
    op.execute("DROP TRIGGER aws_accounts_notify_due_insert ON aws_accounts")
    op.execute("DROP FUNCTION aws_accounts_notify_due()")
