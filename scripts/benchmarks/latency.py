"""Time to verdict (issue 13): how long a customer waits, idle and under a sweep, and how soon a
row inserted without a request starts.

    scripts/bench latency [--requests 100] [--inserts 100] [--sweep 20000] [--median-ms 50] ...

One run, in this order:

1. a scratch database (migrated with alembic), a dedicated Redis database (flushed before and
   after) and the STS stand-in, as `scripts/bench` makes them;
2. `celery -A worker worker` and `celery -A worker beat` in their default configuration (plus
   any --worker-env);
3. idle, requested: --requests accounts, one at a time, each inserted and requested in one
   transaction as the API does (`worker.requests.request_verification` with the API's
   session). Measured per account, on the database's clock: from the commit to the attempt
   starting (`last_attempted_at`) and to the status leaving `pending` (its `status_changed`
   audit event);
4. idle, insert-only: --inserts accounts inserted without a request, one at a time, measured
   the same way (beat's listener, or its next tick, has to notice them);
5. idle cost: --idle-seconds with nothing due: the CPU of the worker and beat, and the
   database's transactions per second (what the listener, or a shorter
   DISPATCH_INTERVAL_SECONDS, costs while nothing happens);
6. under a sweep: --sweep accounts seeded due at once; once it is under way, --requests more
   requested verifications one at a time, as in 3. Only those whose verdict came before the
   sweep's last account count;
7. one table on stdout, every figure as JSON (--json-out, default
   bench-results/latency-<stamp>.json).

Targets: under-sweep p99 within 1.5x of the idle p99; insert-only time to verdict p50 <= 250 ms.
Accounts are new (`pending`), so each verification makes two STS calls, as the sweep's do.
Everything started is stopped and the scratch database dropped (unless --keep), on every exit.
Exit status: 0 done, 1 failed or timed out, 2 bad usage, 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import psycopg

from scripts.benchmarks.common import (
    BenchError,
    add_json_out_option,
    add_service_options,
    add_standin_options,
    add_worker_env_option,
    no_interrupts,
    non_negative_float,
    options_from,
    percentile,
    positive_float,
    positive_int,
    rounded,
    run_main,
    wait_for,
)
from scripts.benchmarks.procs import Child
from scripts.benchmarks.sampling import pg_database_stats
from scripts.benchmarks.seeding import make_accounts, seed_accounts
from scripts.benchmarks.services import Stack, database_name
from scripts.services.usage import sample_tree

SCHEMA: Final = "account-verifier-bench-latency/1"
RATIO_TARGET: Final = 1.5
INSERT_TARGET_MS: Final = 250.0
WARM_UP: Final = 5  # requests and inserts not measured: the processes' first calls
REQUESTED_BY: Final = "bench:latency"
VERDICT_TIMEOUT: Final = 60.0  # seconds one account may take before the run fails


@dataclass
class Options:
    """Parsed command line."""

    requests: int
    inserts: int
    sweep: int
    median_ms: float
    latency_sigma: float
    seed: int
    idle_seconds: float
    timeout: float
    worker_env: dict[str, str]
    database_url: str
    redis_url: str
    json_out: Path | None
    keep: bool


@dataclass(frozen=True, slots=True)
class Timing:
    """One account's wait, in seconds from the commit that made it due or requested it."""

    start: float  # to the worker reading it (`last_attempted_at`)
    verdict: float  # to the status leaving `pending`
    verdict_at: datetime


def summary(timings: Sequence[Timing]) -> dict[str, Any]:
    """Count, p50, p99 and max of the waits, in milliseconds."""

    def stats(values: list[float]) -> dict[str, float | None]:
        return {
            "p50": rounded(percentile(values, 0.5) * 1000, 1),
            "p99": rounded(percentile(values, 0.99) * 1000, 1),
            "max": rounded(max(values) * 1000, 1) if values else None,
        }

    return {
        "count": len(timings),
        "start_ms": stats([t.start for t in timings]),
        "verdict_ms": stats([t.verdict for t in timings]),
    }


class Api:
    """What the benchmark does as the API: insert accounts, and request their verification."""

    def __init__(self, url: str) -> None:
        from sqlalchemy import create_engine  # noqa: PLC0415 - after the environment is set
        from sqlalchemy.orm import sessionmaker  # noqa: PLC0415

        self.engine = create_engine(f"postgresql+psycopg://{url.partition('://')[2]}")
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.poll = psycopg.connect(url, autocommit=True)
        self.accounts = iter(make_accounts(1_000_000, tag=f"latency-{uuid.uuid4().hex[:8]}"))
        self.organization = uuid.uuid4()
        with self.sessions.begin() as session:
            from models import Organization  # noqa: PLC0415

            session.add(Organization(id=self.organization, name="bench latency"))

    def create(self, *, request: bool) -> tuple[uuid.UUID, datetime]:
        """Insert a pending account (and request it); returns its id and the commit time."""
        from sqlalchemy import func, select  # noqa: PLC0415

        from models import AwsAccount  # noqa: PLC0415
        from worker.requests import request_verification  # noqa: PLC0415

        account = next(self.accounts)
        session = self.sessions()
        try:
            session.begin()
            session.add(
                AwsAccount(
                    id=account.id,
                    organization_id=self.organization,
                    alias="bench latency",
                    aws_account_id=account.aws_account_id,
                    role_arn=account.role_arn,
                    external_id=account.external_id,
                )
            )
            session.flush()
            if request:
                request_verification([account.id], requested_by=REQUESTED_BY, session=session)
            # The database's clock, read last before the commit: the wait includes the commit.
            committed = session.execute(select(func.clock_timestamp())).scalar_one()
            session.commit()
        finally:
            session.close()
        stamp: datetime = committed
        return account.id, stamp

    def wait_verdict(self, account_id: uuid.UUID, committed: datetime) -> Timing:
        """Poll until the account has left `pending`; read its times from the database."""
        deadline = time.monotonic() + VERDICT_TIMEOUT
        while True:
            row = self.poll.execute(
                "SELECT a.last_attempted_at, e.occurred_at FROM aws_accounts a"
                " JOIN audit_events e ON e.account_id = a.id"
                "  AND e.event_type = 'status_changed' AND e.from_status = 'pending'"
                " WHERE a.id = %s",
                (account_id,),
            ).fetchone()
            if row is not None:
                attempted, verdict = row
                return Timing(
                    start=(attempted - committed).total_seconds(),
                    verdict=(verdict - committed).total_seconds(),
                    verdict_at=verdict,
                )
            if time.monotonic() > deadline:
                raise BenchError(
                    f"account {account_id} still pending {VERDICT_TIMEOUT:.0f}s after its commit"
                )
            time.sleep(0.01)

    def one(self, *, request: bool, rng: random.Random) -> Timing:
        """One account, alone: create it, wait for its verdict, then a short random pause (so
        that arrivals do not line up with beat's tick)."""
        timing = self.wait_verdict(*self.create(request=request))
        time.sleep(rng.uniform(0.05, 0.25))
        return timing

    def close(self) -> None:
        """Close the connections."""
        self.poll.close()
        self.engine.dispose()


class LatencyBench:
    """One run: services, phases, clean-up."""

    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.started_at = datetime.now(UTC)
        self.stack = Stack(
            opts.database_url, opts.redis_url, keep=opts.keep, log_prefix="verifier-bench-latency-"
        )
        self.api: Api | None = None
        self.rng = random.Random(opts.seed)
        self.succeeded = False

    def execute(self) -> tuple[dict[str, Any], bool]:
        """Every phase in order; returns the results (and True: a run that ends is complete)."""
        try:
            return self._phases(), True
        finally:
            self.cleanup()

    def _phases(self) -> dict[str, Any]:
        opts = self.opts
        standin, sts_url = self.stack.prepare(
            database_prefix="verifier_latency",
            median_ms=opts.median_ms,
            sigma=opts.latency_sigma,
            seed=opts.seed,
            rate_limit=None,
        )
        scratch = self.stack.scratch
        assert scratch is not None  # noqa: S101 - set by prepare()
        env, settings = self.stack.worker_environment(sts_url, extra=opts.worker_env)
        worker, beat = self.start_services(env, listening=settings.dispatch_on_notify)
        self.api = api = self.as_the_api(scratch, opts.redis_url)

        print("warming up ...", file=sys.stderr)
        for _ in range(WARM_UP):
            api.one(request=True, rng=self.rng)
            api.one(request=False, rng=self.rng)
        print(f"idle: {opts.requests} requested verifications, one at a time ...", file=sys.stderr)
        idle = [api.one(request=True, rng=self.rng) for _ in range(opts.requests)]
        print(f"idle: {opts.inserts} accounts inserted without a request ...", file=sys.stderr)
        inserted = [api.one(request=False, rng=self.rng) for _ in range(opts.inserts)]
        idle_cost = self.idle_cost(worker, beat, scratch)
        under_sweep, sweep = self.under_sweep(api, scratch, settings)
        for child in (beat, worker, standin):
            child.check_alive()
        results = self.results(
            settings,
            idle=idle,
            inserted=inserted,
            under_sweep=under_sweep,
            sweep=sweep,
            idle_cost=idle_cost,
        )
        self.succeeded = True
        return results

    def start_services(self, env: dict[str, str], *, listening: bool) -> tuple[Child, Child]:
        """`celery -A worker worker` and `celery -A worker beat`; returns once the worker
        consumes (and beat listens, when it is to)."""
        print("starting `celery worker` and `celery beat` ...", file=sys.stderr)
        workers, beat = self.stack.start_celery(
            env,
            ["worker"],
            what="the worker to consume and beat to listen",
            ready=self.listener_up if listening else None,
        )
        return workers[0], beat

    def listener_up(self) -> bool:
        """Whether beat's listener is connected to the scratch database."""
        admin, scratch = self.stack.admin, self.stack.scratch
        assert admin is not None  # noqa: S101 - set by prepare()
        assert scratch is not None  # noqa: S101
        row = admin.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE application_name = 'account-verifier-listener' AND datname = %s",
            (database_name(scratch),),
        ).fetchone()
        return row is not None and row[0] >= 1

    def as_the_api(self, scratch: str, redis_url: str) -> Api:
        """Point this process's worker modules at the run's services, as the API's are."""
        os.environ.update(
            DATABASE_URL=scratch, REDIS_URL=redis_url, LOG_LEVEL="WARNING", LOG_FORMAT="json"
        )
        from worker.logging import configure_logging  # noqa: PLC0415 - after the environment
        from worker.settings import get_settings  # noqa: PLC0415

        get_settings.cache_clear()
        configure_logging(get_settings(), stream=sys.stderr)
        return Api(scratch)

    def idle_cost(self, worker: Child, beat: Child, scratch: str) -> dict[str, Any]:
        """CPU of worker and beat, and the database's transactions, while nothing is due."""
        admin = self.stack.admin
        assert admin is not None  # noqa: S101 - set by prepare()
        seconds = self.opts.idle_seconds
        print(f"idle cost: {seconds:g}s with nothing due ...", file=sys.stderr)
        name = database_name(scratch)
        worker_before, beat_before = sample_tree(worker.pid), sample_tree(beat.pid)
        commits_before = pg_database_stats(admin, name)["xact_commit"]
        time.sleep(seconds)
        worker_after, beat_after = sample_tree(worker.pid), sample_tree(beat.pid)
        commits = pg_database_stats(admin, name)["xact_commit"] - commits_before
        if (
            not seconds
            or worker_before is None
            or worker_after is None
            or beat_before is None
            or beat_after is None
        ):
            return {"seconds": seconds}
        return {
            "seconds": seconds,
            "worker_cpu_percent": rounded(
                100 * (worker_after.cpu_seconds - worker_before.cpu_seconds) / seconds, 2
            ),
            "beat_cpu_percent": rounded(
                100 * (beat_after.cpu_seconds - beat_before.cpu_seconds) / seconds, 2
            ),
            "database_commits_per_second": rounded(commits / seconds, 2),
        }

    def under_sweep(
        self, api: Api, scratch: str, settings: Any
    ) -> tuple[list[Timing], dict[str, Any]]:
        """Seed the sweep; once under way, requested verifications one at a time."""
        opts = self.opts
        accounts = make_accounts(opts.sweep, tag=f"sweep-{uuid.uuid4().hex[:8]}")
        seeded = seed_accounts(scratch, accounts, analyze=True)
        ids = [a.id for a in accounts]
        print(f"seeded a sweep of {opts.sweep:,} accounts, all due now ...", file=sys.stderr)

        def verified() -> int:
            row = api.poll.execute(
                "SELECT count(*) FROM aws_accounts WHERE id = ANY(%s) AND status <> 'pending'",
                (ids,),
            ).fetchone()
            return int(row[0]) if row else 0

        under_way = max(1, opts.sweep // 100)
        wait_for(lambda: verified() >= under_way, timeout=opts.timeout, what="the sweep to start")
        print(f"under the sweep: {opts.requests} requested verifications ...", file=sys.stderr)
        first = verified()
        started = time.monotonic()
        timings = [api.one(request=True, rng=self.rng) for _ in range(opts.requests)]
        elapsed = time.monotonic() - started
        done = verified()
        left = opts.sweep - done
        end = None
        if not left:
            row = api.poll.execute(
                "SELECT max(last_verified_at) FROM aws_accounts WHERE id = ANY(%s)", (ids,)
            ).fetchone()
            end = row[0] if row else None
        during = [t for t in timings if end is None or t.verdict_at <= end]
        print(
            f"  {len(during)} of {len(timings)} verdicts came during the sweep "
            f"({left:,} of its accounts left at the end)",
            file=sys.stderr,
        )
        return during, {
            "accounts": opts.sweep,
            "seeded_at": seeded.isoformat(),
            "verified_before_requests": first,
            "left_after_requests": left,
            "requests_measured": len(timings),
            "verifications_per_second_meanwhile": rounded((done - first) / elapsed, 1),
            "sts_rate_limit_per_second": settings.sts_rate_limit_per_second,
            "sts_requested_share": settings.sts_requested_share,
        }

    def results(
        self,
        settings: Any,
        *,
        idle: list[Timing],
        inserted: list[Timing],
        under_sweep: list[Timing],
        sweep: dict[str, Any],
        idle_cost: dict[str, Any],
    ) -> dict[str, Any]:
        """Every figure, and the targets."""
        opts = self.opts
        idle_s, sweep_s, insert_s = summary(idle), summary(under_sweep), summary(inserted)
        idle_p99 = idle_s["verdict_ms"]["p99"]
        sweep_p99 = sweep_s["verdict_ms"]["p99"]
        ratio = sweep_p99 / idle_p99 if idle_p99 and sweep_p99 else None
        insert_p50 = insert_s["verdict_ms"]["p50"]
        return {
            "schema": SCHEMA,
            "started_at": self.started_at.isoformat(),
            "finished_at": datetime.now(UTC).isoformat(),
            "config": {
                "requests": opts.requests,
                "inserts": opts.inserts,
                "sweep": opts.sweep,
                "median_ms": opts.median_ms,
                "latency_sigma": opts.latency_sigma,
                "seed": opts.seed,
                "worker_env": opts.worker_env,
                "dispatch_interval_seconds": settings.dispatch_interval_seconds,
                "dispatch_on_notify": settings.dispatch_on_notify,
                "database": database_name(self.stack.scratch or ""),
            },
            "idle": idle_s,
            "under_sweep": {**sweep_s, "sweep": sweep},
            "insert_only": insert_s,
            "idle_cost": idle_cost,
            "ratio_of_p99s": rounded(ratio, 2),
            "targets": [
                {
                    "name": "under-sweep p99 / idle p99",
                    "target": RATIO_TARGET,
                    "value": rounded(ratio, 2),
                    "met": ratio is not None and ratio <= RATIO_TARGET,
                },
                {
                    "name": "insert-only time to verdict p50 (ms)",
                    "target": INSERT_TARGET_MS,
                    "value": insert_p50,
                    "met": insert_p50 is not None and insert_p50 <= INSERT_TARGET_MS,
                },
            ],
        }

    def cleanup(self) -> None:
        """Stop every child, drop the scratch database (unless --keep), flush Redis."""
        with no_interrupts():
            if self.api is not None:
                self.api.close()
            self.stack.release(remove_logs=self.succeeded and not self.opts.keep)


def render_table(r: dict[str, Any]) -> str:
    """The run's table: figure, value, target."""

    def waits(part: dict[str, Any], key: str) -> str:
        s = part[key]
        return f"{_ms(s['p50'])} / {_ms(s['p99'])} (max {_ms(s['max'])}, n={part['count']})"

    target = {t["name"]: t for t in r["targets"]}
    ratio, insert = (
        target["under-sweep p99 / idle p99"],
        target["insert-only time to verdict p50 (ms)"],
    )
    sweep = r["under_sweep"]["sweep"]
    cost = r["idle_cost"]
    cfg = r["config"]
    rows = [
        ("time to verdict, idle: p50 / p99 (ms)", waits(r["idle"], "verdict_ms"), ""),
        ("  to the attempt starting", waits(r["idle"], "start_ms"), ""),
        (
            f"time to verdict under a {sweep['accounts']:,}-account sweep (ms)",
            waits(r["under_sweep"], "verdict_ms"),
            "",
        ),
        ("  to the attempt starting", waits(r["under_sweep"], "start_ms"), ""),
        (
            "  the sweep meanwhile (verifications/s)",
            f"{sweep['verifications_per_second_meanwhile']}",
            "",
        ),
        ("ratio of p99s, under sweep / idle", f"{ratio['value']}", _goal(ratio, "<=")),
        ("insert-only: time to verdict (ms)", waits(r["insert_only"], "verdict_ms"), ""),
        ("  to the attempt starting (pickup)", waits(r["insert_only"], "start_ms"), ""),
        ("  insert-only verdict p50 (ms)", f"{insert['value']}", _goal(insert, "<=")),
        (
            "idle cost: worker / beat CPU, database commits/s",
            f"{cost.get('worker_cpu_percent')} % / {cost.get('beat_cpu_percent')} %, "
            f"{cost.get('database_commits_per_second')}",
            "",
        ),
        (
            "dispatch: on notify / interval (s)",
            f"{cfg['dispatch_on_notify']} / {cfg['dispatch_interval_seconds']:g}",
            "",
        ),
    ]
    width = max(len(label) for label, _, _ in rows)
    value_width = max(len(value) for _, value, _ in rows)
    lines = ["time to verdict (scripts/bench latency)", ""]
    for label, value, goal in rows:
        lines.append(f"{label:<{width}}  {value:<{value_width}}  {goal}".rstrip())
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


def _goal(target: dict[str, Any], op: str) -> str:
    verdict = "met" if target["met"] else "NOT met"
    return f"target {op} {target['target']:g}: {verdict}"


def build_parser() -> argparse.ArgumentParser:
    """The command line of `scripts/bench latency`."""
    parser = argparse.ArgumentParser(
        prog="scripts/bench latency",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add(
        "--requests",
        type=positive_int,
        default=100,
        help="requested verifications measured idle, and again under the sweep (100)",
    )
    add("--inserts", type=positive_int, default=100, help="insert-only accounts measured (100)")
    add("--sweep", type=positive_int, default=20_000, help="accounts of the sweep (20000)")
    add_standin_options(add)
    add("--seed", type=int, default=13, help="seed of the stand-in's latency and the pauses (13)")
    add(
        "--idle-seconds",
        type=non_negative_float,
        default=10.0,
        help="seconds with nothing due, to measure what waiting costs (10)",
    )
    add(
        "--timeout",
        type=positive_float,
        default=600.0,
        help="seconds to wait for the sweep to get under way (600)",
    )
    add_worker_env_option(add, example="DISPATCH_ON_NOTIFY=false DISPATCH_INTERVAL_SECONDS=0.2")
    add(
        "--keep",
        action="store_true",
        help="keep the scratch database and the processes' logs (their places are printed)",
    )
    add_json_out_option(add, prefix="latency-")
    add_service_options(add)
    return parser


def parse_options(argv: Sequence[str] | None) -> Options:
    """Parse and check the command line."""
    return options_from(build_parser(), argv, Options)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the table, write the JSON."""
    opts = parse_options(argv)
    return run_main(LatencyBench(opts).execute, render_table, opts.json_out, prefix="latency-")


if __name__ == "__main__":
    raise SystemExit(main())
