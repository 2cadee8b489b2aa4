"""Initial schema: organizations, aws_accounts, audit_events, and their triggers.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STATUSES = ("pending", "connected", "failed")

# Keeps the API-visible updated_at and the worker's role_changed_at true whoever writes the row
# (the API or the worker), and makes an edited role due at once.
TRACK_ACCOUNT_CHANGES = """
CREATE FUNCTION aws_accounts_track_changes() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF (NEW.role_arn, NEW.external_id, NEW.aws_account_id)
       IS DISTINCT FROM (OLD.role_arn, OLD.external_id, OLD.aws_account_id) THEN
        NEW.role_changed_at := now();
        NEW.last_outcome := NULL;
        NEW.last_error_code := NULL;
        NEW.consecutive_failures := 0;
        NEW.external_id_checked_at := NULL;
        -- Due at once, unless a verification holds a lease: its result will be discarded by the
        -- compare-and-set on the role details, and it makes the account due again itself.
        IF NEW.lease_id IS NULL THEN
            NEW.next_due_at := LEAST(NEW.next_due_at, now());
        END IF;
    END IF;
    IF (NEW.alias, NEW.aws_account_id, NEW.role_arn, NEW.external_id, NEW.status, NEW.error_message)
       IS DISTINCT FROM
       (OLD.alias, OLD.aws_account_id, OLD.role_arn, OLD.external_id, OLD.status, OLD.error_message)
       AND NEW.updated_at IS NOT DISTINCT FROM OLD.updated_at THEN
        NEW.updated_at := now();
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER aws_accounts_track_changes BEFORE UPDATE ON aws_accounts
    FOR EACH ROW EXECUTE FUNCTION aws_accounts_track_changes();
"""

APPEND_ONLY = """
CREATE FUNCTION audit_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_events is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'Record a new event instead of changing or removing one.';
END
$$;
CREATE TRIGGER audit_events_no_update_delete BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_append_only();
CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION audit_events_append_only();
"""


def _status(name: str) -> sa.Enum:
    return sa.Enum(*STATUSES, name=name, native_enum=False, create_constraint=True, length=16)


def upgrade() -> None:
    op.create_table(
        "organizations",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_organizations")),
    )
    op.create_table(
        "aws_accounts",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("organization_id", sa.Uuid(), nullable=False),
        sa.Column("alias", sa.String(length=255), nullable=False),
        sa.Column("aws_account_id", sa.String(length=12), nullable=False),
        sa.Column("role_arn", sa.String(length=2048), nullable=False),
        sa.Column("external_id", sa.String(length=1224), nullable=False),
        sa.Column("status", _status("status"), server_default="pending", nullable=False),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "role_changed_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "next_due_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("last_attempted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_verified_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("external_id_checked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "last_outcome",
            sa.Enum(
                "verified",
                "customer_must_fix",
                "transient",
                "platform_fault",
                name="last_outcome",
                native_enum=False,
                create_constraint=True,
                length=32,
            ),
            nullable=True,
        ),
        sa.Column("last_error_code", sa.String(length=128), nullable=True),
        sa.Column(
            "consecutive_failures", sa.Integer(), server_default=sa.text("0"), nullable=False
        ),
        sa.Column("lease_id", sa.Uuid(), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "(status = 'failed') = (error_message IS NOT NULL)",
            name=op.f("ck_aws_accounts_error_message_iff_failed"),
        ),
        sa.CheckConstraint(
            "aws_account_id ~ '^[0-9]{12}$'", name=op.f("ck_aws_accounts_aws_account_id_12_digits")
        ),
        sa.CheckConstraint(
            "(lease_id IS NULL) = (lease_expires_at IS NULL)",
            name=op.f("ck_aws_accounts_lease_complete"),
        ),
        sa.CheckConstraint(
            "consecutive_failures >= 0",
            name=op.f("ck_aws_accounts_consecutive_failures_non_negative"),
        ),
        sa.CheckConstraint(
            "length(alias) BETWEEN 1 AND 255", name=op.f("ck_aws_accounts_alias_length")
        ),
        sa.CheckConstraint(
            "length(external_id) BETWEEN 2 AND 1224",
            name=op.f("ck_aws_accounts_external_id_length"),
        ),
        sa.CheckConstraint(
            "length(role_arn) BETWEEN 20 AND 2048", name=op.f("ck_aws_accounts_role_arn_length")
        ),
        sa.ForeignKeyConstraint(
            ["organization_id"],
            ["organizations.id"],
            name=op.f("fk_aws_accounts_organization_id_organizations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_aws_accounts")),
        sa.UniqueConstraint("external_id", name=op.f("uq_aws_accounts_external_id")),
        sa.UniqueConstraint(
            "organization_id",
            "aws_account_id",
            name=op.f("uq_aws_accounts_organization_id_aws_account_id"),
        ),
    )
    op.create_index("ix_aws_accounts_next_due_at", "aws_accounts", ["next_due_at"], unique=False)
    op.create_table(
        "audit_events",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column(
            "occurred_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("organization_id", sa.Uuid(), nullable=False),
        sa.Column("account_id", sa.Uuid(), nullable=False),
        sa.Column(
            "event_type",
            sa.Enum(
                "status_changed",
                "verification_requested",
                "external_id_not_enforced",
                name="event_type",
                native_enum=False,
                create_constraint=True,
                length=64,
            ),
            nullable=False,
        ),
        sa.Column("actor", sa.String(length=255), nullable=False),
        sa.Column("correlation_id", sa.String(length=255), nullable=True),
        sa.Column("from_status", _status("from_status"), nullable=True),
        sa.Column("to_status", _status("to_status"), nullable=True),
        sa.Column("reason", sa.String(length=128), nullable=True),
        sa.Column(
            "details",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default="{}",
            nullable=False,
        ),
        sa.CheckConstraint(
            "event_type <> 'status_changed' OR (from_status IS NOT NULL AND to_status IS NOT NULL "
            "AND from_status <> to_status)",
            name=op.f("ck_audit_events_status_change_has_from_and_to"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_events")),
    )
    op.create_index(
        "ix_audit_events_account_id_occurred_at",
        "audit_events",
        ["account_id", "occurred_at"],
        unique=False,
    )
    op.create_index(
        op.f("ix_audit_events_organization_id"), "audit_events", ["organization_id"], unique=False
    )
    op.create_index(
        "ix_audit_events_recent_failures",
        "audit_events",
        ["reason", "occurred_at"],
        unique=False,
        postgresql_where=sa.text("event_type = 'status_changed' AND to_status = 'failed'"),
    )
    op.execute(TRACK_ACCOUNT_CHANGES)
    op.execute(APPEND_ONLY)


def downgrade() -> None:
    op.execute("DROP TRIGGER audit_events_no_truncate ON audit_events")
    op.execute("DROP TRIGGER audit_events_no_update_delete ON audit_events")
    op.execute("DROP FUNCTION audit_events_append_only()")
    op.execute("DROP TRIGGER aws_accounts_track_changes ON aws_accounts")
    op.execute("DROP FUNCTION aws_accounts_track_changes()")
    op.drop_index("ix_audit_events_recent_failures", table_name="audit_events")
    op.drop_index(op.f("ix_audit_events_organization_id"), table_name="audit_events")
    op.drop_index("ix_audit_events_account_id_occurred_at", table_name="audit_events")
    op.drop_table("audit_events")
    op.drop_index("ix_aws_accounts_next_due_at", table_name="aws_accounts")
    op.drop_table("aws_accounts")
    op.drop_table("organizations")
