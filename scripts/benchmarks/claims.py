"""The dispatcher's due-accounts claim at 10,000 and 1,000,000 accounts (issue 8).

    scripts/bench claims [--sizes 10000,1000000] [--due-shares 0.01,1] [--repeat 30] ...

For every size and share of due accounts: a scratch database (migrated with alembic) seeded
server-side with `INSERT ... SELECT FROM generate_series` (statuses mixed like production:
mostly connected, some pending and failed; the due ones due over the last hour, the others over
the next six), then VACUUM ANALYZE. Then `worker.claims.claim_due_accounts(limit=500)`, the
dispatcher's own claim, runs inside a transaction that is rolled back, --repeat times after a
warm-up; the median wall time is reported with the server's execution time and the plan of
EXPLAIN (ANALYZE, BUFFERS) of the exact statement(s) it sent. Target: <= 10 ms at 1,000,000.

The repetitions are rolled back, so each leaves dead row versions behind (the claim's UPDATE
is never HOT: it changes the indexed next_due_at); after 30 repetitions of 500 rows that is at
most 1.5% of a 1,000,000-row table, and the index entries of those versions point past "now".
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import psycopg
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session

from scripts.benchmarks.common import (
    DEFAULT_ADMIN_URL,
    BenchError,
    add_json_out_option,
    percentile,
    positive_int,
    postgres_url,
    rounded,
    write_json,
)
from scripts.benchmarks.services import create_scratch_database, migrate
from scripts.services import postgres
from worker.claims import claim_due_accounts
from worker.redact import mask_url

SCHEMA: Final = "account-verifier-bench-claims/1"
TARGET_MS: Final = 10.0
TARGET_SIZE: Final = 1_000_000
ACCOUNTS_PER_ORG: Final = 1000

# Server-side seed: %(n)s accounts, a %(due)s share of them due. Deterministic (setseed).
SEED_SQL: Final = f"""
SELECT setseed(0.42);
INSERT INTO organizations (id, name)
SELECT md5('org-' || o)::uuid, 'bench org ' || o
FROM generate_series(0, (%(n)s - 1) / {ACCOUNTS_PER_ORG}) AS o;
INSERT INTO aws_accounts (
    id, organization_id, alias, aws_account_id, role_arn, external_id,
    status, error_message, last_outcome, last_error_code, consecutive_failures,
    last_attempted_at, last_verified_at, external_id_checked_at, next_due_at
)
SELECT
    md5('acct-' || g)::uuid,
    md5('org-' || ((g - 1) / {ACCOUNTS_PER_ORG}))::uuid,
    'bench account ' || g,
    lpad(g::text, 12, '0'),
    'arn:aws:iam::' || lpad(g::text, 12, '0') || ':role/ok-bench-' || g,
    'bench-ext-' || g,
    s.status,
    CASE WHEN s.status = 'failed' THEN
        'AWS refused to let the platform assume role arn:aws:iam::' || lpad(g::text, 12, '0')
        || ':role/ok-bench-' || g || '. Make sure the role exists, trusts the platform and '
        || 'requires this external ID.'
    END,
    CASE s.status WHEN 'connected' THEN 'verified' WHEN 'failed' THEN 'customer_must_fix' END,
    CASE WHEN s.status = 'failed' THEN 'AccessDenied' END,
    CASE WHEN s.status = 'failed' THEN 3 ELSE 0 END,
    CASE WHEN s.status <> 'pending' THEN now() - interval '6 hours' END,
    CASE WHEN s.status = 'connected' THEN now() - interval '6 hours' END,
    CASE WHEN s.status = 'connected' THEN now() - interval '6 hours' END,
    CASE WHEN random() < %(due)s
        THEN now() - random() * interval '1 hour'
        ELSE now() + interval '1 minute' + random() * interval '6 hours'
    END
FROM generate_series(1, %(n)s) AS g
CROSS JOIN LATERAL (
    SELECT CASE WHEN g %% 20 = 0 THEN 'failed' WHEN g %% 20 = 1 THEN 'pending'
                ELSE 'connected' END AS status
) AS s;
"""


@dataclass
class Scenario:
    """One size and due share, and what was measured on it."""

    accounts: int
    due_share: float
    due_rows: int = 0
    seed_seconds: float = 0.0
    claimed: int = 0
    wall_ms: list[float] = field(default_factory=list)
    server_ms: list[float] = field(default_factory=list)
    plans: list[str] = field(default_factory=list)
    statements: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        """E.g. "1,000,000 accounts, 1% due"."""
        return f"{self.accounts:,} accounts, {self.due_share * 100:g}% due"

    def to_json(self) -> dict[str, Any]:
        """The scenario as JSON-ready values."""
        return {
            "accounts": self.accounts,
            "due_share": self.due_share,
            "due_rows": self.due_rows,
            "seed_seconds": rounded(self.seed_seconds, 2),
            "claimed": self.claimed,
            "repeat": len(self.wall_ms),
            "wall_ms": {
                "median": rounded(statistics.median(self.wall_ms)) if self.wall_ms else None,
                "p90": rounded(percentile(self.wall_ms, 0.9)),
                "min": rounded(min(self.wall_ms, default=math.nan)),
                "max": rounded(max(self.wall_ms, default=math.nan)),
            },
            "server_execution_ms": [rounded(ms) for ms in self.server_ms],
            "statements": self.statements,
            "explain": self.plans,
        }


@contextmanager
def scratch_database(admin_url: str, *, keep: bool) -> Iterator[str]:
    """A migrated scratch database, dropped afterwards unless `keep`."""
    url = create_scratch_database(admin_url, "verifier_bench_claims")
    try:
        migrate(url)
        yield url
    finally:
        if keep:
            print(f"kept the scratch database: {mask_url(url)}", file=sys.stderr)
        else:
            postgres.drop_database(admin_url, url)


def seed(url: str, scenario: Scenario) -> None:
    """Seed the accounts server-side, then VACUUM ANALYZE (a table after a bulk load)."""
    started = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        with conn.transaction():
            for statement in SEED_SQL.split(";\n"):
                if statement.strip():
                    conn.execute(statement, {"n": scenario.accounts, "due": scenario.due_share})
        conn.execute("VACUUM ANALYZE aws_accounts, organizations")
        row = conn.execute(
            "SELECT count(*) FROM aws_accounts WHERE next_due_at <= now()"
        ).fetchone()
    scenario.due_rows = int(row[0]) if row else 0
    scenario.seed_seconds = time.perf_counter() - started


def _captured(engine: Engine) -> tuple[list[tuple[str, Any]], Any]:
    statements: list[tuple[str, Any]] = []

    def capture(_c: Any, _cur: Any, statement: str, parameters: Any, *_: Any) -> None:
        statements.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", capture)
    return statements, capture


def measure(url: str, scenario: Scenario, *, limit: int, repeat: int, warmup: int) -> None:
    """Time the claim (rolled back) `repeat` times; EXPLAIN (ANALYZE, BUFFERS) what it sends."""
    engine = create_engine(f"postgresql+psycopg://{url.partition('://')[2]}")
    try:
        with Session(engine) as session:
            session.connection()  # connect (and BEGIN) outside the timed part
            session.rollback()
            for i in range(warmup + repeat):
                started = time.perf_counter()
                claim = claim_due_accounts(session, limit=limit, lease_seconds=300)
                elapsed = (time.perf_counter() - started) * 1000
                session.rollback()
                if i >= warmup:
                    scenario.wall_ms.append(elapsed)
                scenario.claimed = len(claim.account_ids)
            statements, capture = _captured(engine)
            claim_due_accounts(session, limit=limit, lease_seconds=300)
            session.rollback()
            event.remove(engine, "before_cursor_execute", capture)
            for statement, parameters in statements:
                plan = explain(session, statement, parameters)
                session.rollback()
                scenario.statements.append(statement)
                scenario.plans.append(plan)
                scenario.server_ms.append(execution_ms(plan))
    finally:
        engine.dispose()


def explain(session: Session, statement: str, parameters: Any) -> str:
    """EXPLAIN (ANALYZE, BUFFERS) of one statement as the driver sent it."""
    result = session.connection().exec_driver_sql(
        "EXPLAIN (ANALYZE, BUFFERS) " + statement, parameters
    )
    return "\n".join(str(row[0]) for row in result)


def execution_ms(plan: str) -> float:
    """The "Execution Time" line of an EXPLAIN ANALYZE plan."""
    for line in reversed(plan.splitlines()):
        if line.strip().startswith("Execution Time:"):
            return float(line.split(":")[1].split()[0])
    return math.nan


def render(scenarios: Sequence[Scenario], *, limit: int, explain_plans: bool) -> str:
    """The table, and the plans."""
    header = (
        f"{'accounts':>10} {'due':>6} {'due rows':>10} {'claimed':>8} {'median ms':>10} "
        f"{'p90 ms':>8} {'min ms':>8} {'server ms':>10}  target"
    )
    lines = [
        f"due-accounts claim: worker.claims.claim_due_accounts(limit={limit}), rolled back, "
        f"{len(scenarios[0].wall_ms) if scenarios else 0} runs each",
        "",
        header,
        "-" * len(header),
    ]
    for s in scenarios:
        median = statistics.median(s.wall_ms) if s.wall_ms else math.nan
        goal = ""
        if s.accounts >= TARGET_SIZE:
            goal = f"<= {TARGET_MS:g} ms " + ("ok" if median <= TARGET_MS else "MISSED")
        lines.append(
            f"{s.accounts:>10,} {s.due_share * 100:>5g}% {s.due_rows:>10,} {s.claimed:>8,} "
            f"{median:>10.2f} {percentile(s.wall_ms, 0.9):>8.2f} {min(s.wall_ms):>8.2f} "
            f"{sum(s.server_ms):>10.2f}  {goal}".rstrip()
        )
    lines.append("")
    lines.append(
        "median/p90/min: wall time of the call in this process (statement round trip included); "
        "server ms: EXPLAIN ANALYZE's Execution Time"
    )
    if explain_plans:
        for s in scenarios:
            for statement, plan in zip(s.statements, s.plans, strict=True):
                lines += ["", f"== {s.label}: EXPLAIN (ANALYZE, BUFFERS)", statement.strip(), ""]
                lines += [f"  {line}" for line in plan.splitlines()]
    return "\n".join(lines)


def _sizes(text: str) -> list[int]:
    try:
        values = [int(part.replace("_", "")) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected sizes like 10000,1000000, got {text!r}"
        ) from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("sizes must be positive")
    return values


def _shares(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected shares like 0.01,1, got {text!r}") from None
    if not values or any(not 0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError("shares must be in (0, 1]")
    return values


def build_parser() -> argparse.ArgumentParser:
    """The command line of `scripts/bench claims`."""
    parser = argparse.ArgumentParser(
        prog="scripts/bench claims",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    add = parser.add_argument
    add(
        "--sizes",
        type=_sizes,
        default=[10_000, 1_000_000],
        help="account counts, comma-separated (10000,1000000)",
    )
    add(
        "--due-shares",
        type=_shares,
        default=[0.01, 1.0],
        help="shares of due accounts, comma-separated (0.01,1: '1%% due' and 'all due')",
    )
    add("--limit", type=positive_int, default=500, help="the claim's batch size (500)")
    add("--repeat", type=positive_int, default=30, help="timed runs per scenario (30)")
    add("--warmup", type=int, default=3, help="untimed runs first (3)")
    add("--no-explain", action="store_true", help="do not print the plans (still in the JSON)")
    add("--keep", action="store_true", help="keep the scratch databases")
    add_json_out_option(add, prefix="claims-")
    add(
        "--database-url",
        default=os.environ.get("BENCH_DATABASE_URL", DEFAULT_ADMIN_URL),
        help="PostgreSQL server for the scratch databases (env BENCH_DATABASE_URL; "
        f"default {DEFAULT_ADMIN_URL})",
    )
    return parser


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Run every scenario, print the table and the plans, write the JSON."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        postgres_url(args.database_url)
    except BenchError as error:
        parser.error(f"--database-url: {error}")
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    started_at = datetime.now(UTC)
    scenarios: list[Scenario] = []
    try:
        for size in args.sizes:
            for share in args.due_shares:
                scenario = Scenario(accounts=size, due_share=share)
                print(f"{scenario.label}: seeding ...", file=sys.stderr)
                with scratch_database(args.database_url, keep=args.keep) as url:
                    seed(url, scenario)
                    print(
                        f"  seeded in {scenario.seed_seconds:.1f}s ({scenario.due_rows:,} due); "
                        "timing the claim ...",
                        file=sys.stderr,
                    )
                    measure(
                        url,
                        scenario,
                        limit=args.limit,
                        repeat=args.repeat,
                        warmup=max(0, args.warmup),
                    )
                scenarios.append(scenario)
    except BenchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except psycopg.Error as error:
        print(f"error: PostgreSQL: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; the scratch database was dropped", file=sys.stderr)
        return 130
    print(render(scenarios, limit=args.limit, explain_plans=not args.no_explain))
    results = {
        "schema": SCHEMA,
        "started_at": started_at.isoformat(),
        "finished_at": datetime.now(UTC).isoformat(),
        "limit": args.limit,
        "target_ms": TARGET_MS,
        "target_accounts": TARGET_SIZE,
        "scenarios": [s.to_json() for s in scenarios],
    }
    print(f"\nresults: {write_json(results, args.json_out, prefix='claims-')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
