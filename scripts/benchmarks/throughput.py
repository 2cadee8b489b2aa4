"""The throughput benchmark's run (`scripts/bench`): its phases in order, on a `Stack`.

Its command line and what it does are told in scripts/benchmarks/options.py.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from scripts.benchmarks.baseline import SequentialResult, sequential_loop
from scripts.benchmarks.common import rounded, run_main
from scripts.benchmarks.options import Options, parse_options
from scripts.benchmarks.procs import Child, start_py_spy, stop_py_spy
from scripts.benchmarks.report import render_table, summarize
from scripts.benchmarks.sampling import (
    Poller,
    Progress,
    Sample,
    lag_and_window,
    other_redis_clients,
    pg_database_stats,
    pg_stat_statements_loaded,
    progress_line,
    table_deltas,
    take_sample,
    wait_no_backends,
)
from scripts.benchmarks.seeding import Account, make_accounts, seed_accounts
from scripts.benchmarks.services import Stack, StandIn, database_name, standin_aws_env
from scripts.benchmarks.trace import TraceResult, trace_verifications
from scripts.services.usage import MemoryPeaks, cpu_delta

if TYPE_CHECKING:
    from scripts.benchmarks.webhooks import WebhookBench


@dataclass
class WorkerRun:
    """What phase 3 measured."""

    settings: Any
    before: Sample
    after: Sample
    pg_before: dict[str, int]
    pg_after: dict[str, int]
    tables: dict[str, dict[str, int]]
    own_transactions: int
    sts_stats: dict[str, Any]
    lag: dict[str, float]
    verified: int
    completed: bool
    other_redis_clients: int
    unverified: list[dict[str, Any]]
    # Sampled peaks of the worker's total memory (see MemoryPeaks).
    peak_rss_total_mb: float
    peak_pss_mb: float


class Bench:
    """One benchmark run: its services, its phases and their clean-up."""

    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.started_at = datetime.now(UTC)
        self.stack = Stack(
            opts.database_url, opts.redis_url, keep=opts.keep, log_prefix="verifier-bench-"
        )
        self.succeeded = False
        self.keep_logs = False
        self.webhooks: WebhookBench | None = None
        if opts.webhooks:
            from scripts.benchmarks.webhooks import WebhookBench  # noqa: PLC0415 - imports the worker

            self.webhooks = WebhookBench()
        self.webhook_results: dict[str, Any] | None = None

    # -- phases -------------------------------------------------------------------------------

    def execute(self) -> tuple[dict[str, Any], bool]:
        """Every phase in order; returns the results and whether every account was verified."""
        try:
            standin, control = self.prepare()
            accounts = make_accounts(self.opts.accounts + self.opts.trace, tag=uuid.uuid4().hex[:8])
            bench_accounts = accounts[: self.opts.accounts]
            sequential, sequential_sts = self.sequential(bench_accounts, control)
            run = self.worker_run(bench_accounts, standin, control)
            trace = self.trace(accounts[self.opts.accounts :], run.settings)
            admin, scratch = self.stack.admin, self.stack.scratch
            assert admin is not None  # noqa: S101 - set by prepare()
            assert scratch is not None  # noqa: S101
            results = summarize(
                opts=self.opts,
                started_at=self.started_at,
                sequential=sequential,
                sequential_sts=sequential_sts,
                run=run,
                trace=trace,
                stats_loaded=pg_stat_statements_loaded(admin),
                scratch=scratch,
            )
            if self.webhook_results is not None:
                results["webhooks"] = self.webhook_results
            self.succeeded = True
            return results, run.completed
        finally:
            self.cleanup()

    def prepare(self) -> tuple[Child, StandIn]:
        """Redis database, scratch database and the STS stand-in; AWS_* for this process."""
        opts = self.opts
        standin, sts_url = self.stack.prepare(
            database_prefix="verifier_bench",
            median_ms=opts.median_ms,
            sigma=opts.latency_sigma,
            seed=opts.seed,
            rate_limit=opts.rate_limit,
        )
        # The sequential loop and the trace run in this process against the same stand-in.
        for key in [k for k in os.environ if k.startswith("AWS_")]:
            del os.environ[key]
        os.environ.update(standin_aws_env(sts_url), AWS_DEFAULT_REGION="us-east-1")
        return standin, StandIn(sts_url)

    def sequential(
        self, accounts: Sequence[Account], control: StandIn
    ) -> tuple[SequentialResult, dict[str, Any]]:
        """Phase 1: the plain boto3 loop over an evenly spread sample."""
        step = max(1, len(accounts) // self.opts.sample)
        sample = accounts[::step][: self.opts.sample]
        print(f"sequential boto3 loop over {len(sample)} accounts ...", file=sys.stderr)
        result = sequential_loop(sample)
        print(
            f"  {result.rate:.1f} verifications/s, mean STS call "
            f"{result.mean_call_seconds * 1000:.1f} ms",
            file=sys.stderr,
        )
        return result, control.stats()

    def start_services(self, sts_url: str) -> tuple[Any, list[Child], Child]:
        """`celery -A worker worker` (--workers of them) and `celery -A worker beat`.

        Returns once every worker consumes. With one worker (the default) its command line is
        exactly the operators' one; several get distinct --hostname values, nothing else.
        """
        opts = self.opts
        env, settings = self.stack.worker_environment(
            sts_url,
            concurrency=opts.concurrency,
            dispatch_interval=opts.dispatch_interval,
            extra={**opts.worker_env, **(self.webhooks.env() if self.webhooks else {})},
        )
        print(
            f"starting {opts.workers} `celery worker`(s) "
            f"({settings.worker_processes or os.cpu_count()} processes x "
            f"{settings.worker_concurrency} threads"
            f"{'' if opts.concurrency is not None else ', the default'}) and beat ...",
            file=sys.stderr,
        )
        workers, beat = self.stack.start_celery(
            env,
            [f"worker{i + 1}" for i in range(opts.workers)],
            what="the worker(s) to consume from Redis",
        )
        return settings, workers, beat

    def worker_run(
        self, accounts: Sequence[Account], standin: Child, control: StandIn
    ) -> WorkerRun:
        """Phase 2: seed every account due now and wait until the worker verified them all."""
        opts, admin, scratch, broker = (
            self.opts,
            self.stack.admin,
            self.stack.scratch,
            self.stack.broker,
        )
        assert admin is not None  # noqa: S101 - set by prepare()
        assert scratch is not None  # noqa: S101
        db_name = database_name(scratch)
        settings, workers, beat = self.start_services(control.url)
        control.reset()
        other_clients = other_redis_clients(broker, self.stack.broker_db)
        poller = Poller(scratch)
        tables_before = poller.table_stats()
        pg_before = pg_database_stats(admin, db_name)

        def sample() -> Sample:
            return take_sample(
                workers=workers,
                beat=beat,
                standin=standin,
                broker=broker,
                admin=admin,
                db_name=db_name,
            )

        before = sample()
        if self.webhooks is not None:
            self.webhooks.start()
        due = seed_accounts(
            scratch,
            accounts,
            analyze=True,
            also=self.webhooks.register if self.webhooks else None,
        )
        own_transactions = 3  # the seed, its commit time and ANALYZE; the poller counts its own
        print(
            f"seeded {len(accounts):,} accounts, all due now; waiting for the worker ...",
            file=sys.stderr,
        )
        spy = start_py_spy(workers[0].pid, opts.py_spy) if opts.py_spy is not None else None
        with MemoryPeaks([worker.pid for worker in workers]) as memory:
            progress = self.wait(poller, [*workers, beat], len(accounts))
        after = sample()
        if spy is not None:
            stop_py_spy(spy)
        sts_stats = control.stats()
        other_clients = max(other_clients, other_redis_clients(broker, self.stack.broker_db))
        unverified: list[dict[str, Any]] = []
        if progress.verified < len(accounts):
            unverified = poller.unverified()
            self.report_timeout(unverified, workers)
        if self.webhooks is not None:
            self.webhook_results = self.webhooks.measure(scratch, timeout=opts.timeout)
            delivered = sample()  # every delivery done: what verifying and announcing cost
            worker_cpu = delivered.worker.cpu_seconds - before.worker.cpu_seconds
            self.webhook_results["until_delivered"] = {
                "seconds": round(delivered.at - before.at, 1),
                "worker_cpu_ms_per_event": rounded(worker_cpu / len(accounts) * 1000),
                "postgresql_cpu_ms_per_event": rounded(
                    cpu_delta(before.pg_cpu, delivered.pg_cpu) / len(accounts) * 1000
                ),
            }
            self.webhooks.stop()
            print(f"webhooks: {self.webhook_results}", file=sys.stderr)
        beat.stop()
        for worker in workers:
            worker.stop()
        tables_after = poller.table_stats()
        own_transactions += poller.transactions
        poller.close()
        wait_no_backends(admin, db_name)
        return WorkerRun(
            settings=settings,
            before=before,
            after=after,
            pg_before=pg_before,
            pg_after=pg_database_stats(admin, db_name),
            tables=table_deltas(tables_before, tables_after),
            own_transactions=own_transactions,
            sts_stats=sts_stats,
            lag=lag_and_window(scratch, due),
            verified=progress.verified,
            completed=progress.verified >= len(accounts),
            other_redis_clients=other_clients,
            unverified=unverified,
            peak_rss_total_mb=memory.rss_mb,
            peak_pss_mb=memory.pss_mb,
        )

    def report_timeout(
        self, unverified: Sequence[dict[str, Any]], workers: Sequence[Child]
    ) -> None:
        """Say why accounts were left: what the database says and the worker's last lines."""
        self.keep_logs = True
        print(
            "accounts left unverified (status, last outcome, error, leased: count):",
            file=sys.stderr,
        )
        for group in unverified:
            print(
                f"  {group['status']}, {group['last_outcome']}, {group['last_error_code']}, "
                f"{'leased' if group['leased'] else 'not leased'}: {group['count']:,}",
                file=sys.stderr,
            )
        for worker in workers:
            print(f"{worker.name}'s last lines:\n{worker.tail(10)}", file=sys.stderr)

    def wait(self, poller: Poller, services: Sequence[Child], total: int) -> Progress:
        """Poll until every account is verified or the timeout passes; print progress."""
        opts = self.opts
        started = time.monotonic()
        last_print = started
        history: list[tuple[float, int]] = [(started, 0)]
        while True:
            for service in services:
                service.check_alive()
            progress = poller.poll()
            now = time.monotonic()
            history.append((now, progress.verified))
            done = progress.verified >= total
            if done or now > started + opts.timeout:
                line = progress_line(history, progress, total, opts.progress_interval)
                verdict = "done" if done else f"TIMED OUT after {opts.timeout:g}s"
                print(f"{line}  {verdict}", file=sys.stderr)
                return progress
            if now - last_print >= opts.progress_interval:
                line = progress_line(history, progress, total, opts.progress_interval)
                print(line, file=sys.stderr)
                last_print = now
            time.sleep(0.25 if total < 5000 else 1.0)

    def trace(self, accounts: Sequence[Account], settings: Any) -> TraceResult | None:
        """Phase 3: statements per verification, traced in this process."""
        if not accounts:
            return None
        admin, scratch = self.stack.admin, self.stack.scratch
        assert admin is not None  # noqa: S101 - set by prepare()
        assert scratch is not None  # noqa: S101
        print(f"tracing {len(accounts)} verifications in-process ...", file=sys.stderr)
        os.environ.update(
            DATABASE_URL=scratch,
            REDIS_URL=self.opts.redis_url,
            LOG_LEVEL="WARNING",
            LOG_FORMAT="json",
            STS_MAX_ATTEMPTS=str(settings.sts_max_attempts),
        )
        return trace_verifications(admin, scratch, accounts, lease_seconds=settings.lease_seconds)

    def cleanup(self) -> None:
        """Stop every child, drop the scratch database (unless --keep), flush Redis."""
        self.stack.release(remove_logs=self.succeeded and not self.keep_logs)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the table, write the JSON."""
    opts = parse_options(argv)
    return run_main(Bench(opts).execute, render_table, opts.json_out)


if __name__ == "__main__":
    raise SystemExit(main())
