"""Webhook endpoints and deliveries; a trigger on audit_events creates the deliveries.

The trigger is the transactional outbox: whoever records an audit event (the worker's chunk
write, the API, a script) creates its deliveries in the same statement's transaction, one
INSERT ... SELECT per audit INSERT statement, so a rollback creates none. The unique constraint
on (event_id, endpoint_id) makes a second delivery of one event to one endpoint impossible.

Revision ID: 20261201_0005_webhooks
Revises: 20261201_0002_notify
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "20261201_0005_webhooks"
down_revision: str | None = "20261201_0002_notify"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_EVENT_TYPES = ("status_changed", "verification_requested", "external_id_not_enforced")
NEW_EVENT_TYPES = (*OLD_EVENT_TYPES, "webhook_endpoint_disabled")

# The message announcing an audit event: the account in the API's list-item shape plus
# errorMessage (never the external ID), timestamps formatted like models.api.format_timestamp
# (tests compare the two renderings). Also used to replay an event to a new endpoint.
# A SQL-standard body (BEGIN ATOMIC, PostgreSQL 14+) is parsed at creation and records its
# dependencies: dropping or retyping a column it reads is refused instead of breaking every
# audit INSERT (and with it every verification) at run time.
EVENT_PAYLOAD = """
CREATE FUNCTION webhook_event_payload(e audit_events) RETURNS jsonb LANGUAGE sql STABLE
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
           'errorMessage', e.details -> 'error_message')
       ELSE '{}'::jsonb END);
END;
"""

# One INSERT ... SELECT per audit INSERT statement, whatever the number of events in it, and a
# notification for the workers' listeners (worker/webhooks/runner.py) when it inserted any.
# NULL event_types means every type; `verification_requested` (the requester's own action) is
# never announced, and endpoint events have no account.
ENQUEUE_WEBHOOKS = """
CREATE FUNCTION audit_events_enqueue_webhooks() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO webhook_deliveries (endpoint_id, event_id, event_type, payload)
    SELECT w.id, e.id, 'account.' || e.event_type, webhook_event_payload(e)
      FROM new_events AS e
      JOIN webhook_endpoints AS w
        ON w.organization_id = e.organization_id
       AND w.enabled
       AND (w.event_types IS NULL AND e.event_type <> 'verification_requested'
            OR 'account.' || e.event_type = ANY (w.event_types))
     WHERE e.account_id IS NOT NULL
    ON CONFLICT (event_id, endpoint_id) DO NOTHING;
    IF FOUND THEN
        -- Delivered to listening workers only if the transaction commits (one per transaction:
        -- PostgreSQL folds identical notifications), so they claim the new deliveries at once.
        PERFORM pg_notify('webhook_deliveries', '');
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER audit_events_enqueue_webhooks AFTER INSERT ON audit_events
    REFERENCING NEW TABLE AS new_events
    FOR EACH STATEMENT EXECUTE FUNCTION audit_events_enqueue_webhooks();
"""


def _event_type_check(types: Sequence[str]) -> None:
    op.drop_constraint(op.f("ck_audit_events_event_type"), "audit_events", type_="check")
    listed = ", ".join(f"'{t}'" for t in types)
    op.create_check_constraint(
        op.f("ck_audit_events_event_type"), "audit_events", sa.text(f"event_type IN ({listed})")
    )


def upgrade() -> None:
    _event_type_check(NEW_EVENT_TYPES)
    op.alter_column("audit_events", "account_id", existing_type=sa.Uuid(), nullable=True)
    op.create_check_constraint(
        op.f("ck_audit_events_account_id_unless_webhook_event"),
        "audit_events",
        sa.text("account_id IS NOT NULL OR event_type = 'webhook_endpoint_disabled'"),
    )
    op.create_table(
        "webhook_endpoints",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("organization_id", sa.Uuid(), nullable=False),
        sa.Column("url", sa.String(length=2048), nullable=False),
        sa.Column("description", sa.String(length=255), nullable=True),
        sa.Column("event_types", postgresql.ARRAY(sa.String(length=64)), nullable=True),
        sa.Column("enabled", sa.Boolean(), server_default=sa.text("true"), nullable=False),
        sa.Column("disabled_reason", sa.String(length=255), nullable=True),
        sa.Column("disabled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("secret_encrypted", sa.LargeBinary(), nullable=False),
        sa.Column("previous_secret_encrypted", sa.LargeBinary(), nullable=True),
        sa.Column("previous_secret_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("failing_since", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_failure_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "length(url) BETWEEN 8 AND 2048", name=op.f("ck_webhook_endpoints_url_length")
        ),
        sa.CheckConstraint(
            "enabled OR (disabled_reason IS NOT NULL AND disabled_at IS NOT NULL)",
            name=op.f("ck_webhook_endpoints_disabled_has_reason"),
        ),
        sa.CheckConstraint(
            "(previous_secret_encrypted IS NULL) = (previous_secret_expires_at IS NULL)",
            name=op.f("ck_webhook_endpoints_previous_secret_complete"),
        ),
        sa.ForeignKeyConstraint(
            ["organization_id"],
            ["organizations.id"],
            name=op.f("fk_webhook_endpoints_organization_id_organizations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_endpoints")),
    )
    op.create_index(
        "ix_webhook_endpoints_organization_id_enabled",
        "webhook_endpoints",
        ["organization_id"],
        unique=False,
        postgresql_where=sa.text("enabled"),
    )
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.Uuid(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("endpoint_id", sa.Uuid(), nullable=False),
        sa.Column("event_id", sa.BigInteger(), nullable=True),
        sa.Column("event_type", sa.String(length=64), nullable=False),
        sa.Column("payload", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column(
            "next_attempt_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=True,
        ),
        sa.Column("last_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_status_code", sa.SmallInteger(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("given_up_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("lease_id", sa.Uuid(), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "(lease_id IS NULL) = (lease_expires_at IS NULL)",
            name=op.f("ck_webhook_deliveries_lease_complete"),
        ),
        sa.CheckConstraint(
            "(next_attempt_at IS NULL) = (delivered_at IS NOT NULL OR given_up_at IS NOT NULL)",
            name=op.f("ck_webhook_deliveries_pending_iff_not_finished"),
        ),
        sa.ForeignKeyConstraint(
            ["endpoint_id"],
            ["webhook_endpoints.id"],
            name=op.f("fk_webhook_deliveries_endpoint_id_webhook_endpoints"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_deliveries")),
        sa.UniqueConstraint(
            "event_id", "endpoint_id", name=op.f("uq_webhook_deliveries_event_id_endpoint_id")
        ),
    )
    op.create_index(
        "ix_webhook_deliveries_next_attempt_at",
        "webhook_deliveries",
        ["next_attempt_at"],
        unique=False,
        postgresql_where=sa.text("next_attempt_at IS NOT NULL"),
    )
    op.create_index(
        "ix_webhook_deliveries_endpoint_id_created_at",
        "webhook_deliveries",
        ["endpoint_id", "created_at"],
        unique=False,
    )
    op.execute(EVENT_PAYLOAD)
    op.execute(ENQUEUE_WEBHOOKS)


def downgrade() -> None:
    op.execute("DROP TRIGGER audit_events_enqueue_webhooks ON audit_events")
    op.execute("DROP FUNCTION audit_events_enqueue_webhooks()")
    op.execute("DROP FUNCTION webhook_event_payload(audit_events)")
    op.drop_index("ix_webhook_deliveries_endpoint_id_created_at", table_name="webhook_deliveries")
    op.drop_index("ix_webhook_deliveries_next_attempt_at", table_name="webhook_deliveries")
    op.drop_table("webhook_deliveries")
    op.drop_index("ix_webhook_endpoints_organization_id_enabled", table_name="webhook_endpoints")
    op.drop_table("webhook_endpoints")
    # Events about endpoints have no account and no place in the old schema; the audit log is
    # append-only, so they are kept by refusing to downgrade while any exist.
    op.drop_constraint(
        op.f("ck_audit_events_account_id_unless_webhook_event"), "audit_events", type_="check"
    )
    op.alter_column("audit_events", "account_id", existing_type=sa.Uuid(), nullable=False)
    _event_type_check(OLD_EVENT_TYPES)
