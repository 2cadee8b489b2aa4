"""The database itself refuses rows the API could never show."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
from sqlalchemy import Connection, delete, func, select, text, update
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session

from models import AccountStatus, AuditEvent, AuditEventType, AwsAccount
from tests.factories import make_account, make_organization
from worker.claims import CLAIM_DUE


def _refused(session: Session, constraint: str) -> None:
    with pytest.raises(IntegrityError, match=constraint):
        session.flush()
    session.rollback()


def test_eleven_digit_aws_account_id_is_refused(session: Session) -> None:
    """An AWS account id must be exactly 12 digits."""
    with pytest.raises(IntegrityError, match="ck_aws_accounts_aws_account_id_12_digits"):
        make_account(session, aws_account_id="12345678901")


def test_non_digit_aws_account_id_is_refused(session: Session) -> None:
    """Letters in an AWS account id are refused even at the right length."""
    with pytest.raises(IntegrityError, match="ck_aws_accounts_aws_account_id_12_digits"):
        make_account(session, aws_account_id="12345678901a")


def test_failed_without_error_message_is_refused(session: Session) -> None:
    """A failed account must say why."""
    with pytest.raises(IntegrityError, match="ck_aws_accounts_error_message_iff_failed"):
        make_account(session, status=AccountStatus.FAILED, error_message=None)


def test_connected_with_error_message_is_refused(session: Session) -> None:
    """Only a failed account carries an error message."""
    with pytest.raises(IntegrityError, match="ck_aws_accounts_error_message_iff_failed"):
        make_account(session, status=AccountStatus.CONNECTED, error_message="stale")


def test_unknown_status_is_refused_by_the_database(connection: Connection) -> None:
    """A status outside the three documented ones is refused even when written as raw SQL."""
    organization_id = connection.execute(
        text("INSERT INTO organizations (id, name) VALUES (gen_random_uuid(), 'o') RETURNING id")
    ).scalar_one()
    with pytest.raises(IntegrityError, match="ck_aws_accounts_status"):
        connection.execute(
            text(
                "INSERT INTO aws_accounts (id, organization_id, alias, aws_account_id, role_arn,"
                " external_id, status) VALUES (gen_random_uuid(), :org, 'a', '123456789012',"
                " 'arn:aws:iam::123456789012:role/R', 'ext-1', 'disconnected')"
            ),
            {"org": organization_id},
        )


def test_duplicate_connection_is_refused(session: Session) -> None:
    """One connection per (organization, AWS account)."""
    organization = make_organization(session)
    make_account(session, organization=organization, aws_account_id="123456789012")
    with pytest.raises(IntegrityError, match="uq_aws_accounts_organization_id_aws_account_id"):
        make_account(session, organization=organization, aws_account_id="123456789012")


def test_same_aws_account_in_two_organizations_is_allowed(session: Session) -> None:
    """Two organizations may each connect the same AWS account."""
    make_account(session, aws_account_id="123456789012")
    make_account(session, aws_account_id="123456789012")
    count = session.scalar(select(func.count()).where(AwsAccount.aws_account_id == "123456789012"))
    assert count == 2


def test_duplicate_external_id_is_refused(session: Session) -> None:
    """External IDs are unique across all connections."""
    make_account(session, external_id="shared-external-id")
    with pytest.raises(IntegrityError, match="uq_aws_accounts_external_id"):
        make_account(session, external_id="shared-external-id")


def test_half_a_lease_is_refused(session: Session) -> None:
    """A lease has both an id and an expiry, or neither."""
    account = make_account(session)
    account.lease_expires_at = datetime.now(UTC)
    _refused(session, "ck_aws_accounts_lease_complete")


def _audit_event(session: Session) -> AuditEvent:
    account = make_account(session)
    event = AuditEvent(
        organization_id=account.organization_id,
        account_id=account.id,
        event_type=AuditEventType.VERIFICATION_REQUESTED,
        actor="test",
    )
    session.add(event)
    session.flush()
    return event


def test_updating_an_audit_event_is_refused(session: Session) -> None:
    """The database refuses UPDATE on audit events."""
    event = _audit_event(session)
    with pytest.raises(DBAPIError, match="audit_events is append-only: UPDATE"):
        session.execute(update(AuditEvent).where(AuditEvent.id == event.id).values(actor="x"))


def test_deleting_an_audit_event_is_refused(session: Session) -> None:
    """The database refuses DELETE on audit events."""
    event = _audit_event(session)
    with pytest.raises(DBAPIError, match="audit_events is append-only: DELETE"):
        session.execute(delete(AuditEvent).where(AuditEvent.id == event.id))


def test_truncating_audit_events_is_refused(session: Session) -> None:
    """The database refuses TRUNCATE on audit events."""
    _audit_event(session)
    with pytest.raises(DBAPIError, match="audit_events is append-only: TRUNCATE"):
        session.execute(text("TRUNCATE audit_events"))


def test_status_change_event_needs_from_and_to(session: Session) -> None:
    """A status_changed event names both statuses, and they differ."""
    account = make_account(session)
    session.add(
        AuditEvent(
            organization_id=account.organization_id,
            account_id=account.id,
            event_type=AuditEventType.STATUS_CHANGED,
            actor="worker",
            from_status=AccountStatus.PENDING,
            to_status=AccountStatus.PENDING,
        )
    )
    _refused(session, "ck_audit_events_status_change_has_from_and_to")


def test_timestamps_are_timezone_aware(connection: Connection) -> None:
    """Every timestamp column is `timestamp with time zone`."""
    kinds = connection.execute(
        text(
            "SELECT table_name, column_name, data_type FROM information_schema.columns"
            " WHERE table_schema = 'public' AND data_type LIKE 'timestamp%'"
        )
    ).all()
    assert kinds, "the schema has timestamp columns"
    assert {row.data_type for row in kinds} == {"timestamp with time zone"}


def test_the_dispatcher_claim_uses_the_index(session: Session, connection: Connection) -> None:
    """The claim is an index range scan on next_due_at, then a TID scan: no table scan."""
    for _ in range(50):
        make_account(session)
    connection.execute(text("ANALYZE aws_accounts"))
    connection.execute(text("SET LOCAL enable_seqscan = off"))
    plan = "\n".join(
        connection.execute(
            text("EXPLAIN " + CLAIM_DUE.text),
            {"lease_id": uuid.uuid4(), "lease_seconds": 60, "limit": 100},
        ).scalars()
    )
    assert "ix_aws_accounts_next_due_at" in plan
    assert "Tid Scan" in plan
    assert "Seq Scan" not in plan


def test_updated_at_moves_when_a_visible_field_changes(session: Session) -> None:
    """A status change moves updated_at; the worker's bookkeeping does not."""
    account = make_account(session)
    old = datetime(2020, 1, 1, tzinfo=UTC)
    session.execute(update(AwsAccount).where(AwsAccount.id == account.id).values(updated_at=old))
    session.execute(
        update(AwsAccount)
        .where(AwsAccount.id == account.id)
        .values(consecutive_failures=3, next_due_at=func.now())
    )
    assert session.scalar(select(AwsAccount.updated_at).where(AwsAccount.id == account.id)) == old
    session.execute(
        update(AwsAccount).where(AwsAccount.id == account.id).values(status=AccountStatus.CONNECTED)
    )
    moved = session.scalar(select(AwsAccount.updated_at).where(AwsAccount.id == account.id))
    assert moved is not None
    assert moved > old


def test_editing_the_role_makes_the_account_due_and_forgets_its_history(
    session: Session,
) -> None:
    """A new role ARN resets the failure history and makes the account due at once."""
    account = make_account(session, consecutive_failures=4, last_error_code="AccessDenied")
    future = datetime(2099, 1, 1, tzinfo=UTC)
    session.execute(
        update(AwsAccount).where(AwsAccount.id == account.id).values(next_due_at=future)
    )
    session.execute(
        update(AwsAccount)
        .where(AwsAccount.id == account.id)
        .values(role_arn=f"arn:aws:iam::{account.aws_account_id}:role/Renamed")
    )
    session.refresh(account)
    assert account.next_due_at < future
    assert (account.consecutive_failures, account.last_error_code) == (0, None)


def test_every_audit_event_type_passes_the_database_check(session: Session) -> None:
    """Each AuditEventType value can be written: a migration whose CHECK list drops one (or
    a new type without a migration) fails here, not in production."""
    account = make_account(session)
    for event_type in AuditEventType:
        with session.begin_nested():
            session.add(
                AuditEvent(
                    organization_id=account.organization_id,
                    account_id=account.id,
                    event_type=event_type,
                    actor="test",
                    from_status=AccountStatus.PENDING,
                    to_status=AccountStatus.CONNECTED,
                    reason="test",
                    details={},
                )
            )
            session.flush()
