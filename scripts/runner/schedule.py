"""What the worker is about to do with the accounts, and how to reach the stack from another
terminal: scripts/run's last lines before it waits."""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from scripts.runner.console import Console
from scripts.services import ROOT, shown_path
from worker.redact import libpq_url

# The demo organization (sandbox.demo; a test keeps it equal), named in the re-verify hint.
DEMO_ORGANIZATION_ID = "279507b0-a68e-5d5f-8683-601f1537bf4c"


@dataclass(frozen=True)
class Schedule:
    """The accounts as the worker is about to find them."""

    total: int
    due: int  # due and not leased: the worker's first claim takes them (worker/claims.py)
    leased: int  # queued or being verified under a live lease
    statuses: list[tuple[str, int]]
    next_due_in: float | None  # seconds until the earliest of the others falls due
    next_due_at: str | None  # the same as a UTC clock time


def account_schedule(database_url: str) -> Schedule | None:
    """Count the accounts due now and find when the next of the others is; None if unreadable."""
    import psycopg  # noqa: PLC0415

    # "Due" as the dispatcher's claim (worker/claims.py) has it.
    query = """
        SELECT count(*),
               count(*) FILTER (WHERE next_due_at <= now() AND NOT leased),
               count(*) FILTER (WHERE leased),
               extract(epoch FROM min(next_due_at) FILTER (WHERE next_due_at > now()
                                                             AND NOT leased) - now()),
               to_char(min(next_due_at) FILTER (WHERE next_due_at > now() AND NOT leased)
                       AT TIME ZONE 'UTC', 'HH24:MI:SS "UTC"')
          FROM (SELECT next_due_at, coalesce(lease_expires_at > now(), false) AS leased
                  FROM aws_accounts) AS accounts
    """
    try:
        with psycopg.connect(libpq_url(database_url), connect_timeout=5) as connection:
            row = connection.execute(query).fetchone()
            statuses = connection.execute(
                "SELECT status::text, count(*) FROM aws_accounts GROUP BY 1 ORDER BY 1"
            ).fetchall()
    except psycopg.Error:
        return None
    assert row is not None  # noqa: S101 - an aggregate always returns a row
    total, due, leased, next_in, next_at = row
    return Schedule(
        total=total,
        due=due,
        leased=leased,
        statuses=[(str(status), int(count)) for status, count in statuses],
        next_due_in=float(next_in) if next_in is not None else None,
        next_due_at=next_at,
    )


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def describe_schedule(schedule: Schedule) -> str:
    """What the worker will do with the accounts, in one sentence."""
    if schedule.total == 0:
        return "no accounts yet: the worker verifies each one within seconds of its creation."
    parts = []
    if schedule.due:
        parts.append(
            f"{schedule.due} of {schedule.total} account(s) due now: the worker verifies them "
            "within seconds (watch for account.status_changed)"
        )
    if schedule.leased:
        parts.append(f"{schedule.leased} queued or being verified already")
    others = schedule.total - schedule.due - schedule.leased
    if others and schedule.next_due_in is not None:
        when = f"{schedule.next_due_at} (in {_duration(schedule.next_due_in)})"
        if parts:
            parts.append(f"the other {others} are not due before {when}")
        else:
            statuses = ", ".join(f"{count} {status}" for status, count in schedule.statuses)
            parts.append(
                f"{schedule.total} account(s) ({statuses}), none due: verified on an "
                f"earlier run, so nothing happens until the next check, due at {when}"
            )
    return "; ".join(parts) + "."


def print_next_steps(
    console: Console,
    schedule: Schedule | None,
    stack_file: Path,
    left_out: Sequence[str],
    *,
    sandbox: bool,
) -> None:
    """What the worker is about to do, and how to re-verify now from another terminal."""
    if schedule is not None:
        console.say(describe_schedule(schedule))
    if sandbox:
        console.say(
            "to re-verify the demo accounts now: "
            f"scripts/reverify --organization {DEMO_ORGANIZATION_ID} --yes --wait"
        )
    else:
        console.say(
            "to re-verify accounts now: scripts/reverify --status failed --yes --wait "
            "(scripts/reverify --help)"
        )
    urls = [name for name in left_out if not name.startswith("AWS_")]
    note = (
        f". Not in it: {' and '.join(urls)} (a password); with them set as here, "
        "`scripts/run exec -- scripts/reverify ...` adds the rest"
        if urls
        else ""
    )
    # Another terminal finds the file by itself only where it looks by default.
    where = (
        ""
        if stack_file.parent == ROOT / ".data"
        else f" with VERIFIER_DATA_DIR={shlex.quote(str(stack_file.parent))}"
    )
    console.say(
        f"from another terminal{where}, scripts/reverify reaches this stack by itself and "
        f"`scripts/run exec -- COMMAND` runs any command in its environment "
        f"({shown_path(stack_file)}, removed at stop){note}"
    )
    console.say("the fleet at a glance: scripts/status [--watch] (it finds this stack too)")
