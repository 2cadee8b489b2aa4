"""Factories for rows: each test states only what matters to it."""

from __future__ import annotations

import itertools
import uuid
from typing import Any

from sqlalchemy.orm import Session

from models import AccountStatus, AwsAccount, Organization

_counter = itertools.count(1)


def next_aws_account_id() -> str:
    """A fresh 12-digit AWS account id."""
    return f"{100_000_000_000 + next(_counter) * 7919 % 900_000_000_000:012d}"


def make_organization(session: Session, **fields: Any) -> Organization:
    """Insert and return an organization."""
    organization = Organization(name=fields.pop("name", f"Org {next(_counter)}"), **fields)
    session.add(organization)
    session.flush()
    return organization


def make_account(
    session: Session, *, organization: Organization | None = None, **fields: Any
) -> AwsAccount:
    """Insert and return a pending account with a valid role ARN and a unique external ID."""
    if organization is None and "organization_id" not in fields:
        organization = make_organization(session)
    aws_account_id = fields.pop("aws_account_id", next_aws_account_id())
    status = fields.pop("status", AccountStatus.PENDING)
    account = AwsAccount(
        organization_id=fields.pop("organization_id", organization.id if organization else None),
        alias=fields.pop("alias", "Production"),
        aws_account_id=aws_account_id,
        role_arn=fields.pop("role_arn", f"arn:aws:iam::{aws_account_id}:role/VerifierRole"),
        external_id=fields.pop("external_id", f"ext-{uuid.uuid4()}"),
        status=status,
        error_message=fields.pop(
            "error_message",
            "Role could not be assumed." if status == AccountStatus.FAILED else None,
        ),
        **fields,
    )
    session.add(account)
    session.flush()
    return account


def unique_aws_account_id() -> str:
    """A random 12-digit AWS account id, unique enough to keep sandbox roles apart."""
    return f"{uuid.uuid4().int % 10**12:012d}"


def make_sandbox_account(
    session: Session,
    endpoint_url: str,
    *,
    organization: Organization,
    trusted: str | None = None,
    enforce_external_id: bool = True,
    permissions: tuple[str, ...] | None = None,
    **fields: Any,
) -> AwsAccount:
    """An account whose role exists in the sandbox STS at `endpoint_url`.

    The role trusts `trusted` (default: the platform) and requires the account's external ID
    unless `enforce_external_id` is False. `trusted=""` creates no role at all. `permissions`
    are the actions its policy allows (default: what the permission probes check; () none).
    """
    from sandbox.moto_sts import (  # noqa: PLC0415
        PLATFORM_PRINCIPAL_ARN,
        SCANNER_ACTIONS,
        create_customer_role,
    )

    aws_id = fields.pop("aws_account_id", unique_aws_account_id())
    external_id = fields.pop("external_id", f"ext-{uuid.uuid4().hex}")
    role_name = fields.pop("role_name", f"Role{uuid.uuid4().hex[:8]}")
    principal = PLATFORM_PRINCIPAL_ARN if trusted is None else trusted
    if principal:
        create_customer_role(
            endpoint_url,
            aws_id,
            role_name,
            principal,
            external_id if enforce_external_id else None,
            permissions=SCANNER_ACTIONS if permissions is None else permissions,
        )
    return make_account(
        session,
        organization=organization,
        aws_account_id=aws_id,
        role_arn=f"arn:aws:iam::{aws_id}:role/{role_name}",
        external_id=external_id,
        **fields,
    )
