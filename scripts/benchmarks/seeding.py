"""The accounts a run verifies: made up (`make_accounts`, roles the stand-in accepts) and COPied
into the scratch database, due now or in a year (`seed_accounts`)."""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg


@dataclass(frozen=True, slots=True)
class Account:
    """One seeded account: enough for the worker and for the sequential loop."""

    id: uuid.UUID
    organization_id: uuid.UUID
    aws_account_id: str
    role_arn: str
    external_id: str


def make_accounts(count: int, *, tag: str, per_org: int = 100) -> list[Account]:
    """`count` accounts whose role names (`ok-...`) make the stand-in succeed."""
    orgs = [uuid.uuid4() for _ in range(max(1, math.ceil(count / per_org)))]
    accounts = []
    for i in range(count):
        aws_id = f"{100_000_000_000 + i:012d}"
        accounts.append(
            Account(
                id=uuid.uuid4(),
                organization_id=orgs[i // per_org],
                aws_account_id=aws_id,
                role_arn=f"arn:aws:iam::{aws_id}:role/ok-bench-{i}",
                external_id=f"bench-{tag}-{i}",
            )
        )
    return accounts


def seed_accounts(
    url: str,
    accounts: Sequence[Account],
    *,
    due_now: bool = True,
    analyze: bool = False,
    also: Callable[[psycopg.Cursor[Any]], None] | None = None,
) -> datetime:
    """COPY the accounts (status pending) in one transaction; return when they became due.

    They are due from the moment the COPY commits (before it, no dispatcher can see them), so
    that is the time returned and the one lags are measured from: the COPY's own seconds are
    not the worker's. `due_now=False` seeds them due in a year: kept out of the dispatcher's way
    (the trace). `analyze=True` runs ANALYZE on the table afterwards (as after any bulk load),
    in a transaction of its own.
    """
    with psycopg.connect(url) as conn:
        now = conn.execute("SELECT now()").fetchone()
        assert now is not None  # noqa: S101 - SELECT returns a row
        due: datetime = now[0]
        orgs = sorted({a.organization_id for a in accounts})
        with conn.cursor() as cur:
            with cur.copy("COPY organizations (id, name) FROM STDIN") as copy:
                for org in orgs:
                    copy.write_row((org, f"bench org {org.hex[:8]}"))
            columns = "id, organization_id, alias, aws_account_id, role_arn, external_id"
            with cur.copy(f"COPY aws_accounts ({columns}, next_due_at) FROM STDIN") as copy:
                for n, a in enumerate(accounts):
                    copy.write_row(
                        (
                            a.id,
                            a.organization_id,
                            f"bench account {n}",
                            a.aws_account_id,
                            a.role_arn,
                            a.external_id,
                            due if due_now else due.replace(year=due.year + 1),
                        )
                    )
            if also is not None:  # more rows in the same transaction (--webhooks' endpoints)
                also(cur)
        conn.commit()
        committed = conn.execute("SELECT now()").fetchone()
        assert committed is not None  # noqa: S101 - SELECT returns a row
    visible: datetime = committed[0]
    if analyze:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("ANALYZE aws_accounts")
    return visible
