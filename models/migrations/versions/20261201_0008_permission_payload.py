"""Webhook payloads of permissions_changed say what changed: the permissions missing now, those
missing before (null on the first check) and those proven, from the audit event's details.

Revision ID: 20261201_0008_permission_payload
Revises: 20261201_0007_webhook_claims
Create Date: 2026-12-01
"""

from collections.abc import Sequence

from alembic import op

revision: str = "20261201_0008_permission_payload"
down_revision: str | None = "20261201_0007_webhook_claims"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The account part is 0005's, unchanged (tests compare it with models.api's rendering).
_HEAD = """
CREATE OR REPLACE FUNCTION webhook_event_payload(e audit_events) RETURNS jsonb
LANGUAGE sql STABLE
BEGIN ATOMIC
SELECT jsonb_build_object(
    'type', 'account.' || e.event_type,
    'timestamp', to_char(e.occurred_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'),
    'data', jsonb_build_object(
        'account', coalesce(
            (SELECT jsonb_build_object(
                 'id', a.id,
                 'alias', a.alias,
                 'awsAccountId', a.aws_account_id,
                 'status', a.status,
                 'errorMessage', a.error_message,
                 'createdAt',
                 to_char(a.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'),
                 'updatedAt',
                 to_char(a.updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'))
               FROM aws_accounts AS a WHERE a.id = e.account_id),
            jsonb_build_object('id', e.account_id)),
        'reason', e.reason)
    || CASE WHEN e.event_type = 'status_changed' THEN jsonb_build_object(
           'from', e.from_status,
           'to', e.to_status,
           'errorMessage', e.details -> 'error_message')"""

_PERMISSIONS = """
            WHEN e.event_type = 'permissions_changed' THEN jsonb_build_object(
           'missingPermissions', coalesce(e.details -> 'after', '[]'::jsonb),
           'previouslyMissing', coalesce(e.details -> 'before', 'null'::jsonb),
           'provenPermissions', coalesce(e.details -> 'proven', '[]'::jsonb))"""

_TAIL = """
       ELSE '{}'::jsonb END);
END;
"""


def upgrade() -> None:
    op.execute(_HEAD + _PERMISSIONS + _TAIL)


def downgrade() -> None:
    op.execute(_HEAD + _TAIL)
