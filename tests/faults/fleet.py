"""A test's accounts, each with the status its STS behaviour implies.

The STS stand-in picks a role's behaviour from the role name's prefix (`ok…` answers, `deny…`
refuses, `throttle…` is throttled, …), so the final status of every account is known when it is
inserted: `Fleet.add("deny-1", initial=CONNECTED)` expects `failed` by `AccessDenied`.
"""

from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session, sessionmaker

from models import AccountStatus, AwsAccount, Organization
from sandbox.standin import role_behaviour

# Long before any test: outside every IAM propagation grace window.
LONG_AGO = datetime(2026, 1, 1, tzinfo=UTC)

CONNECTS = frozenset({"ok", "flaky", "regiondisabled"})
# behaviour -> the reason of the status change to failed
FAILS = {"deny": "AccessDenied", "noext": "ExternalIdNotEnforced", "otheracct": "IdentityMismatch"}
# Transient (throttle, 5xx, reset, garbage) and platform-side behaviours change no status.
UNCHANGED = frozenset(
    {
        "throttle",
        "error500",
        "error503",
        "reset",
        "garbage",
        "expiredtoken",
        "invalidtoken",
        "badsignature",
    }
)

_serial = itertools.count(1)


@dataclass
class Planned:
    """One account and what must become of it."""

    id: uuid.UUID
    label: str
    aws_account_id: str
    role_arn: str
    external_id: str
    initial: AccountStatus
    expected: AccountStatus
    # The reason of the status change the account must end with (None: no change expected).
    reason: str | None
    # Whether the account is only ever answered with transient or platform faults.
    transient: bool = False
    deleted: bool = False


def expected_outcome(role_name: str, initial: AccountStatus) -> tuple[AccountStatus, str | None]:
    """The final status a role name implies for an account starting at `initial`, and the reason
    of the change that gets it there (None if its status must not change)."""
    behaviour, _ = role_behaviour(role_name)
    if behaviour in CONNECTS:
        final = AccountStatus.CONNECTED
        return final, (None if initial is final else "verified")
    if behaviour in FAILS:
        final = AccountStatus.FAILED
        return final, (None if initial is final else FAILS[behaviour])
    if behaviour in UNCHANGED:
        return initial, None
    raise ValueError(f"role {role_name!r}: say what to expect (behaviour {behaviour!r})")


def unique_aws_account_id() -> str:
    """A 12-digit AWS account id unlikely to repeat within a test."""
    return f"{uuid.uuid4().int % 10**12:012d}"


class Fleet:
    """The accounts of one test, in one organization, and their expected end states."""

    def __init__(self, sessions: sessionmaker[Session], name: str = "Fault suite") -> None:
        self.sessions = sessions
        with sessions.begin() as session:
            organization = Organization(name=name)
            session.add(organization)
            session.flush()
            self.organization_id = organization.id
        self.accounts: dict[uuid.UUID, Planned] = {}

    # -- building ---------------------------------------------------------------------------------

    def add(
        self,
        role_name: str,
        *,
        initial: AccountStatus = AccountStatus.PENDING,
        expected: AccountStatus | None = None,
        reason: str | None = None,
        role_arn: str | None = None,
        aws_account_id: str | None = None,
        external_id: str | None = None,
        alias: str | None = None,
        transient: bool | None = None,
        **fields: Any,
    ) -> Planned:
        """Insert an account whose role is named `role_name` (or whose ARN is `role_arn`)."""
        if expected is None:
            expected, reason = expected_outcome(role_name, initial)
        if transient is None:
            transient = role_behaviour(role_name)[0] in UNCHANGED
        aws_account_id = aws_account_id or unique_aws_account_id()
        role_arn = role_arn or f"arn:aws:iam::{aws_account_id}:role/{role_name}"
        external_id = external_id or f"ext-{uuid.uuid4().hex}"
        values: dict[str, Any] = {
            "organization_id": self.organization_id,
            "alias": alias or f"{role_name} #{next(_serial)}",
            "aws_account_id": aws_account_id,
            "role_arn": role_arn,
            "external_id": external_id,
            "status": initial,
            "error_message": (
                "Could not assume the role (seeded)." if initial is AccountStatus.FAILED else None
            ),
            "role_changed_at": LONG_AGO,
            **fields,
        }
        with self.sessions.begin() as session:
            account = AwsAccount(**values)
            session.add(account)
            session.flush()
            account_id = account.id
        planned = Planned(
            id=account_id,
            label=role_name,
            aws_account_id=aws_account_id,
            role_arn=role_arn,
            external_id=external_id,
            initial=initial,
            expected=expected,
            reason=reason,
            transient=transient,
        )
        self.accounts[account_id] = planned
        return planned

    def add_mix(self, copies: int = 1) -> list[Planned]:
        """A spread of behaviours in every starting status: the default population of a test.

        Per copy: 4 that connect, 3 that fail, 3 that only ever meet transient faults.
        """
        added = []
        for n in range(copies):
            for status in AccountStatus:
                added.append(self.add(f"ok-{status.value}-{n}", initial=status))
            added.append(self.add(f"flaky1-{n}"))
            added.append(self.add(f"deny-pending-{n}"))
            added.append(self.add(f"deny-connected-{n}", initial=AccountStatus.CONNECTED))
            added.append(self.add(f"noext-{n}"))
            added.append(self.add(f"throttle-connected-{n}", initial=AccountStatus.CONNECTED))
            added.append(self.add(f"error500-pending-{n}"))
            added.append(self.add(f"error503-failed-{n}", initial=AccountStatus.FAILED))
        return added

    def _check_in_flight(self, session: Session, account_id: uuid.UUID) -> None:
        """Lock the row and make sure a verification holds it and has not applied anything."""
        row = session.execute(
            select(AwsAccount.lease_id, AwsAccount.last_attempted_at)
            .where(AwsAccount.id == account_id)
            .with_for_update()
        ).one()
        in_flight = row.lease_id is not None and row.last_attempted_at is None
        assert in_flight, (
            f"{self.accounts[account_id].label} is no longer in flight (the machine is too slow "
            "for this test's timing)"
        )

    def forget(self, account_id: uuid.UUID, *, in_flight: bool = False) -> None:
        """Delete the account's row, as the API does when a customer removes a connection.
        With `in_flight`, first check that a verification of it is under way."""
        with self.sessions.begin() as session:
            if in_flight:
                self._check_in_flight(session, account_id)
            session.execute(delete(AwsAccount).where(AwsAccount.id == account_id))
        self.accounts[account_id].deleted = True

    def edit(self, account_id: uuid.UUID, *, in_flight: bool = False, **values: Any) -> None:
        """Change an account's row as the API would (the trigger does the rest). With
        `in_flight`, first check that a verification of it is under way."""
        with self.sessions.begin() as session:
            if in_flight:
                self._check_in_flight(session, account_id)
            session.execute(update(AwsAccount).where(AwsAccount.id == account_id).values(**values))

    # -- reading ----------------------------------------------------------------------------------

    def live(self) -> list[Planned]:
        return [p for p in self.accounts.values() if not p.deleted]

    def rows(self) -> dict[uuid.UUID, AwsAccount]:
        """The accounts' rows as they are now."""
        with self.sessions() as session:
            rows = session.scalars(
                select(AwsAccount).where(AwsAccount.id.in_(list(self.accounts)))
            ).all()
        return {row.id: row for row in rows}

    def statuses(self) -> dict[uuid.UUID, AccountStatus]:
        return {account_id: row.status for account_id, row in self.rows().items()}

    def pending_work(self) -> list[str]:
        """Accounts not yet at their expected status or never attempted, as readable lines."""
        rows = self.rows()
        waiting = []
        for planned in self.live():
            row = rows.get(planned.id)
            if row is None:
                waiting.append(f"{planned.label}: row missing")
            elif row.status is not planned.expected or row.last_attempted_at is None:
                waiting.append(
                    f"{planned.label}: {row.status.value} (want {planned.expected.value}), "
                    f"attempted={row.last_attempted_at is not None}, "
                    f"last={row.last_error_code}"
                )
        return waiting

    def settled(self) -> bool:
        """Every live account is attempted and at its expected status."""
        return not self.pending_work()

    def settled_count(self) -> int:
        rows = self.rows()
        return sum(
            1
            for p in self.live()
            if p.id in rows
            and rows[p.id].status is p.expected
            and rows[p.id].last_attempted_at is not None
        )
