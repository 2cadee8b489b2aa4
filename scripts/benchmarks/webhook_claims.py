"""The webhook claim with claimers at the same moment, with and without the claims' lock.

    python -m scripts.benchmarks.webhook_claims [--claimers 1,2,4,8] [--repeat 20]
        [--rounds 11] [--deliveries 10000] [--endpoints 100] [--database-url URL]
        [--json-out PATH]

A scratch database (migrated with alembic) holds `--deliveries` due deliveries spread evenly
over `--endpoints` endpoints, then VACUUM ANALYZE. For each number of claimers (one thread and
connection each, started together) every claimer claims `--repeat` times in a row, each claim in
a transaction that is rolled back, so every claim sees the same backlog: with the lock,
`worker.webhooks.claims.claim_due_deliveries` (the worker's claim: the lock, then the claim
statement); without, the claim statement alone. Limit 64 and 16 per endpoint (the worker's
defaults). Rounds alternate the two, so both share the machine's noise; the first round warms
up. Reported for each: the claim's wall time (median, p90, max; the wait for the lock included)
and the deliveries per claim — without the lock, claims at the same moment pick the same
candidates and skip the rows another one locked, so each gets fewer.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
import uuid
from typing import Any, Final

import psycopg
from sqlalchemy import create_engine
from sqlalchemy.orm import Session, sessionmaker

from scripts.benchmarks.common import (
    DEFAULT_ADMIN_URL,
    add_json_out_option,
    percentile,
    positive_int,
    postgres_url,
    rounded,
    run_main,
)
from scripts.benchmarks.services import create_scratch_database, migrate
from scripts.services import postgres
from worker.redact import mask_url
from worker.webhooks.claims import CLAIM_DUE_DELIVERIES, claim_due_deliveries

SCHEMA: Final = "account-verifier-bench-webhook-claims/1"
LIMIT: Final = 64
PER_ENDPOINT: Final = 16
VARIANTS: Final = ("lock", "no_lock")

# Server-side seed: %(endpoints)s endpoints (one organization each), %(deliveries)s due
# deliveries spread evenly over them, each a millisecond older than the next.
SEED_SQL: Final = (
    """
    INSERT INTO organizations (id, name)
    SELECT md5('org-' || g)::uuid, 'bench org ' || g FROM generate_series(1, %(endpoints)s) AS g
    """,
    """
    INSERT INTO webhook_endpoints (id, organization_id, url, secret_encrypted)
    SELECT md5('endpoint-' || g)::uuid, md5('org-' || g)::uuid,
           'https://93.184.215.14/hooks/' || g, '\\x00'
      FROM generate_series(1, %(endpoints)s) AS g
    """,
    """
    INSERT INTO webhook_deliveries (endpoint_id, event_type, payload, next_attempt_at)
    SELECT md5('endpoint-' || (g %% %(endpoints)s + 1))::uuid, 'account.status_changed',
           '{}'::jsonb, now() - g * interval '1 millisecond'
      FROM generate_series(1, %(deliveries)s) AS g
    """,
)


def claim(session: Session, variant: str) -> int:
    """One claim (rolled back by the caller); the deliveries it leased."""
    if variant == "lock":
        claimed = claim_due_deliveries(
            session, limit=LIMIT, per_endpoint=PER_ENDPOINT, lease_seconds=60
        )
        return len(claimed.messages)
    rows = session.execute(
        CLAIM_DUE_DELIVERIES,
        {
            "lease_id": uuid.uuid4(),
            "lease_seconds": 60,
            "limit": LIMIT,
            "per_endpoint": PER_ENDPOINT,
        },
    ).all()
    return len(rows)


def run_round(
    sessions: sessionmaker[Session], variant: str, claimers: int, repeat: int
) -> list[tuple[float, int]]:
    """`claimers` threads claiming `repeat` times each, started together: (ms, deliveries)."""
    measured: list[tuple[float, int]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(claimers)

    def claimer() -> None:
        mine: list[tuple[float, int]] = []
        with sessions() as session:
            session.connection()  # connected before the start
            session.rollback()
            barrier.wait()
            for _ in range(repeat):
                start = time.perf_counter()
                count = claim(session, variant)
                session.rollback()
                mine.append(((time.perf_counter() - start) * 1000, count))
        with lock:
            measured.extend(mine)

    threads = [threading.Thread(target=claimer) for _ in range(claimers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return measured


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Seed a scratch database, run the rounds, drop the database; the figures."""
    admin_url = postgres_url(args.database_url)
    url = create_scratch_database(admin_url, "verifier_bench_webhook_claims")
    try:
        migrate(url)
        with psycopg.connect(url, autocommit=True) as connection:
            for statement in SEED_SQL:
                connection.execute(
                    statement.encode(),
                    {"endpoints": args.endpoints, "deliveries": args.deliveries},
                )
            connection.execute("VACUUM ANALYZE")
        engine = create_engine(
            f"postgresql+psycopg://{url.partition('://')[2]}", pool_size=max(args.claimers)
        )
        results: list[dict[str, Any]] = []
        try:
            sessions = sessionmaker(engine)
            for claimers in args.claimers:
                runs: dict[str, list[tuple[float, int]]] = {v: [] for v in VARIANTS}
                for round_ in range(args.rounds):
                    for variant in VARIANTS:
                        measured = run_round(sessions, variant, claimers, args.repeat)
                        if round_:
                            runs[variant].extend(measured)
                results.extend(figures(claimers, v, runs[v]) for v in VARIANTS)
        finally:
            engine.dispose()
    finally:
        postgres.drop_database(admin_url, url)
    return {
        "schema": SCHEMA,
        "database": mask_url(admin_url),
        "deliveries": args.deliveries,
        "endpoints": args.endpoints,
        "limit": LIMIT,
        "per_endpoint": PER_ENDPOINT,
        "results": results,
    }


def figures(claimers: int, variant: str, measured: list[tuple[float, int]]) -> dict[str, Any]:
    """One variant's figures at one number of claimers."""
    wall = sorted(ms for ms, _ in measured)
    return {
        "claimers": claimers,
        "variant": variant,
        "claims": len(measured),
        "wall_ms": {
            "median": rounded(statistics.median(wall)) if wall else None,
            "p90": rounded(percentile(wall, 0.9)) if wall else None,
            "max": rounded(max(wall)) if wall else None,
        },
        "deliveries_per_claim": (
            rounded(statistics.mean(count for _, count in measured), 1) if measured else None
        ),
    }


def render(results: dict[str, Any]) -> str:
    """The figures as a table."""
    lines = [
        f"{results['deliveries']:,} due deliveries over {results['endpoints']} endpoints, "
        f"claims of {results['limit']} (at most {results['per_endpoint']} per endpoint)",
        "claimers  variant   median ms    p90 ms    max ms  deliveries/claim",
    ]
    for row in results["results"]:
        wall = row["wall_ms"]
        lines.append(
            f"{row['claimers']:>8}  {row['variant']:<8} {wall['median']:>10} {wall['p90']:>9}"
            f" {wall['max']:>9}  {row['deliveries_per_claim']:>16}"
        )
    return "\n".join(lines)


def claimer_counts(text: str) -> list[int]:
    """`1,2,4` -> [1, 2, 4]."""
    return [positive_int(part) for part in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m scripts.benchmarks.webhook_claims",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    add = parser.add_argument
    add("--claimers", type=claimer_counts, default=[1, 2, 4, 8], help="default: 1,2,4,8")
    add("--repeat", type=positive_int, default=20, help="claims per claimer and round")
    add("--rounds", type=positive_int, default=11, help="rounds, the first a warm-up")
    add("--deliveries", type=positive_int, default=10_000)
    add("--endpoints", type=positive_int, default=100)
    add("--database-url", default=DEFAULT_ADMIN_URL, help="a PostgreSQL server's admin URL")
    add_json_out_option(add, prefix="webhook-claims-")
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error("--rounds: at least 2 (the first one warms up)")
    return run_main(lambda: (measure(args), True), render, args.json_out, prefix="webhook-claims-")


if __name__ == "__main__":
    sys.exit(main())
