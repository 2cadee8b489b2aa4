"""The account exactly as the public API documents it (`GET /api/accounts[/{id}]`)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TypedDict

from models.account import AwsAccount


class AccountListItem(TypedDict):
    """An element of `data.accounts` in `GET /api/accounts`."""

    id: str
    alias: str
    awsAccountId: str
    status: str
    createdAt: str
    updatedAt: str


class AccountDetail(TypedDict):
    """`data` in `GET /api/accounts/{id}`."""

    id: str
    alias: str
    awsAccountId: str
    roleArn: str
    externalId: str
    status: str
    errorMessage: str | None
    createdAt: str
    updatedAt: str


def format_timestamp(moment: datetime) -> str:
    """ISO 8601 in UTC with milliseconds and `Z`, e.g. `2026-01-15T10:30:00.000Z`."""
    if moment.tzinfo is None:
        raise ValueError("naive datetimes are ambiguous; the schema stores timezone-aware ones")
    utc = moment.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


def render_account_list_item(account: AwsAccount) -> AccountListItem:
    """Render an account as a list item of `GET /api/accounts`."""
    return {
        "id": str(account.id),
        "alias": account.alias,
        "awsAccountId": account.aws_account_id,
        "status": account.status.value,
        "createdAt": format_timestamp(account.created_at),
        "updatedAt": format_timestamp(account.updated_at),
    }


def render_account_detail(account: AwsAccount) -> AccountDetail:
    """Render an account as the detail of `GET /api/accounts/{id}`."""
    return {
        "id": str(account.id),
        "alias": account.alias,
        "awsAccountId": account.aws_account_id,
        "roleArn": account.role_arn,
        "externalId": account.external_id,
        "status": account.status.value,
        "errorMessage": account.error_message,
        "createdAt": format_timestamp(account.created_at),
        "updatedAt": format_timestamp(account.updated_at),
    }
