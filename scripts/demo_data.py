"""Create the demo organization and its accounts, one per way a connection can behave.

    python -m scripts.demo_data [--sandbox-url URL]

Inserts (or leaves as they are) the connections of `sandbox.demo` into DATABASE_URL, due at
once. With --sandbox-url, also creates their roles in a running sandbox STS, so a worker pointed
at it shows one connected account and four failed ones: a role that trusts someone else, one
that requires another external ID and one that does not exist (all three `AccessDenied`, with the
same message: STS does not say which), and one that does not require the external ID
(`ExternalIdNotEnforced`). Safe to run again: existing rows and roles are kept.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import OperationalError

from models import AwsAccount, Organization
from sandbox.demo import DEMO_CONNECTIONS, DEMO_ORGANIZATION_ID
from worker.db import session_factory
from worker.settings import get_settings_or_exit


def seed_demo_accounts() -> int:
    """Insert the demo organization and accounts; return how many accounts were new."""
    # Existing connections: past IAM's propagation window, so a broken one fails at once.
    role_changed_at = datetime.now(UTC) - timedelta(days=1)
    with session_factory().begin() as session:
        session.execute(
            insert(Organization)
            .values(id=DEMO_ORGANIZATION_ID, name="Demo organization")
            .on_conflict_do_nothing()
        )
        existing = set(session.scalars(select(AwsAccount.id)))
        new = [c for c in DEMO_CONNECTIONS if c.id not in existing]
        for connection in new:
            session.execute(
                insert(AwsAccount)
                .values(
                    id=connection.id,
                    organization_id=DEMO_ORGANIZATION_ID,
                    alias=connection.alias,
                    aws_account_id=connection.aws_account_id,
                    role_arn=connection.role_arn,
                    external_id=connection.external_id,
                    role_changed_at=role_changed_at,
                )
                .on_conflict_do_nothing()
            )
    return len(new)


def main(argv: list[str] | None = None) -> int:
    """Seed the database (and optionally the sandbox STS) with demo connections."""
    parser = argparse.ArgumentParser(
        prog="python -m scripts.demo_data",
        description=(__doc__ or "").strip().split("\n\n")[0],
    )
    parser.add_argument(
        "--sandbox-url", help="also create the roles in the sandbox STS at this URL"
    )
    args = parser.parse_args(argv)
    settings = get_settings_or_exit()
    if args.sandbox_url:
        from sandbox.demo import seed_demo_roles  # noqa: PLC0415 - needs the sandbox extra

        roles = seed_demo_roles(args.sandbox_url)
        print(f"created {len(roles)} demo roles in the sandbox STS at {args.sandbox_url}")
    try:
        added = seed_demo_accounts()
    except OperationalError as error:
        print(
            f"error: cannot reach the database at {settings.database_url_masked}: "
            f"{str(error.orig).strip().splitlines()[0] if error.orig else error}",
            file=sys.stderr,
        )
        return 3
    print(
        f"demo organization {DEMO_ORGANIZATION_ID}: {added} new account(s), "
        f"{len(DEMO_CONNECTIONS) - added} already there"
    )
    for connection in DEMO_CONNECTIONS:
        print(
            f"  {connection.id}  {connection.alias:<16} {connection.behaviour.value:<26} "
            f"shows {connection.shows}"
        )
    print("  (STS answers the three AccessDenied roles alike: their messages are the same)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
