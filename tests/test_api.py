"""The account as the public API documents it, field for field."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from models import (
    AccountStatus,
    AwsAccount,
    format_timestamp,
    render_account_detail,
    render_account_list_item,
)
from tests.factories import make_organization

# The examples documented in docs/api.md, verbatim.
DOCUMENTED_DETAIL = json.loads(
    """
{
  "id": "550e8400-e29b-41d4-a716-446655440000",
  "alias": "Production",
  "awsAccountId": "123456789012",
  "roleArn": "arn:aws:iam::123456789012:role/FeguraRole-abc123",
  "externalId": "abc123-def456-ghi789",
  "status": "connected",
  "errorMessage": null,
  "createdAt": "2026-01-15T10:30:00.000Z",
  "updatedAt": "2026-01-15T10:30:00.000Z"
}
"""
)
DOCUMENTED_LIST_ITEM = json.loads(
    """
{
  "id": "550e8400-e29b-41d4-a716-446655440000",
  "alias": "Production",
  "awsAccountId": "123456789012",
  "status": "connected",
  "createdAt": "2026-01-15T10:30:00.000Z",
  "updatedAt": "2026-01-15T10:30:00.000Z"
}
"""
)


@pytest.fixture
def documented_account(session: Session) -> AwsAccount:
    """The documented example stored in and read back from the database."""
    organization = make_organization(session)
    moment = datetime(2026, 1, 15, 10, 30, tzinfo=UTC)
    account = AwsAccount(
        id=uuid.UUID("550e8400-e29b-41d4-a716-446655440000"),
        organization_id=organization.id,
        alias="Production",
        aws_account_id="123456789012",
        role_arn="arn:aws:iam::123456789012:role/FeguraRole-abc123",
        external_id="abc123-def456-ghi789",
        status=AccountStatus.CONNECTED,
        created_at=moment,
        updated_at=moment,
    )
    session.add(account)
    session.flush()
    session.expunge_all()
    return session.scalars(select(AwsAccount).where(AwsAccount.id == account.id)).one()


def test_detail_matches_the_documented_example(documented_account: AwsAccount) -> None:
    """`GET /api/accounts/{id}` renders exactly the documented JSON, key order included."""
    rendered = render_account_detail(documented_account)
    assert json.dumps(rendered) == json.dumps(DOCUMENTED_DETAIL)


def test_list_item_matches_the_documented_example(documented_account: AwsAccount) -> None:
    """A list item renders exactly the documented JSON."""
    rendered = render_account_list_item(documented_account)
    assert json.dumps(rendered) == json.dumps(DOCUMENTED_LIST_ITEM)


def test_timestamps_are_utc_with_milliseconds() -> None:
    """Any timezone becomes UTC, truncated to milliseconds, with Z."""
    moment = datetime(2026, 1, 15, 12, 30, 0, 123987, tzinfo=timezone(timedelta(hours=2)))
    assert format_timestamp(moment) == "2026-01-15T10:30:00.123Z"


def test_naive_timestamps_are_rejected() -> None:
    """A naive datetime cannot be rendered: its timezone is unknown."""
    with pytest.raises(ValueError, match="naive"):
        format_timestamp(datetime(2026, 1, 15))  # noqa: DTZ001 - the point of the test
