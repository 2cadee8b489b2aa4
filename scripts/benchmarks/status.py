"""`scripts/status` at a million accounts (issue 16: target under a second).

    scripts/bench status [--accounts 1000000] [--due-share 0.01] [--churn 0.05] [--repeat 7]

A scratch database seeded like `scripts/bench claims` (mixed statuses, --due-share due now),
VACUUM ANALYZE, then --churn of the rows updated to failed *without* a VACUUM afterwards (in
production the visibility map is never fresh). Then the real command, `scripts/status --json`,
runs --repeat times as a new process each time, as an operator runs it: the median wall time
(Python start and imports included) and the database time it reports are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence

import psycopg

from scripts.benchmarks.claims import Scenario, scratch_database, seed
from scripts.benchmarks.common import DEFAULT_ADMIN_URL, DEFAULT_REDIS_URL
from scripts.services import ROOT

STATUS = str(ROOT / "scripts" / "status")
TARGET_SECONDS = 1.0
CHURN_SQL = (
    "UPDATE aws_accounts SET status = 'failed', error_message = 'Could not assume role',"
    " last_outcome = 'customer_must_fix', last_error_code = 'AccessDenied'"
    " WHERE random() < %(churn)s"
)


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="scripts/bench status",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    parser.add_argument("--accounts", type=int, default=1_000_000, help="accounts (1000000)")
    parser.add_argument("--due-share", type=float, default=0.01, help="share due now (0.01)")
    parser.add_argument("--churn", type=float, default=0.05, help="share updated after (0.05)")
    parser.add_argument("--repeat", type=int, default=7, help="runs of scripts/status (7)")
    # The servers scripts/bench makes sure of (BENCH_DATABASE_URL, BENCH_REDIS_URL): status only
    # reads Redis, so its database there is left as it is.
    parser.add_argument(
        "--database-url",
        default=os.environ.get("BENCH_DATABASE_URL", DEFAULT_ADMIN_URL),
        help=f"PostgreSQL server (env BENCH_DATABASE_URL; default {DEFAULT_ADMIN_URL})",
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("BENCH_REDIS_URL", DEFAULT_REDIS_URL),
        help=f"Redis read by status, read only (env BENCH_REDIS_URL; default {DEFAULT_REDIS_URL})",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Seed, churn, time the command; exit 1 when a run of it fails."""
    args = build_parser().parse_args(argv)
    if args.accounts < 1 or args.repeat < 1 or not 0 < args.due_share <= 1:
        build_parser().error("--accounts and --repeat must be positive, --due-share in (0, 1]")
    scenario = Scenario(accounts=args.accounts, due_share=args.due_share)
    print(f"{scenario.label}: seeding ...", file=sys.stderr)
    with scratch_database(args.database_url, keep=False) as url:
        seed(url, scenario)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(CHURN_SQL, {"churn": args.churn})
        env = {**os.environ, "DATABASE_URL": url, "REDIS_URL": args.redis_url}
        walls: list[float] = []
        database: list[float] = []
        for _ in range(args.repeat):
            started = time.perf_counter()
            run = subprocess.run(
                [STATUS, "--json"], env=env, capture_output=True, text=True, check=False
            )
            walls.append(time.perf_counter() - started)
            if run.returncode != 0:
                print(run.stderr[-2000:], file=sys.stderr)
                return 1
            database.append(float(json.loads(run.stdout)["databaseSeconds"]))
    wall = statistics.median(walls)
    verdict = "met" if wall < TARGET_SECONDS else "NOT met"
    print(f"scripts/status --json at {scenario.label}, {args.churn:.0%} churned after VACUUM")
    print(f"  wall, median of {args.repeat} (s)      {wall:.3f}   target < 1: {verdict}")
    print(f"  database, median (s)          {statistics.median(database):.3f}")
    print(f"  wall, every run (s)           {' '.join(f'{w:.2f}' for w in walls)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
