"""Throughput of the real worker against a latency-realistic STS stand-in (issue 8).

    scripts/bench [--accounts 20000] [--sample 200] [--median-ms 50] [--rate-limit R] ...
    scripts/bench claims --help        the due-accounts claim at 10k and 1M accounts

One run, in this order:

1. a scratch database (migrated with alembic) on the PostgreSQL of --database-url, a dedicated
   Redis database (--redis-url, flushed before and after) and the STS stand-in
   (`python -m sandbox.standin`: log-normal latency, seeded; --rate-limit passed through);
2. the naive alternative: a plain sequential `boto3.client("sts").assume_role(...)` loop over a
   sample of the accounts, with the second call without the external ID that a first
   verification makes (2 STS calls per verification, like the worker);
3. `celery -A worker worker` in its default configuration (environment only: no -P/-c) and
   `celery -A worker beat`; once the worker consumes, N `ok-...` accounts are seeded, all due at
   once, and the database is polled until every one has `last_verified_at` set;
4. a short in-process trace of the same task code (the chunk steps run in-process, and the
   dispatcher's claim) that counts SQL statements per verification;
5. one table on stdout, every figure as JSON (--json-out, default bench-results/<stamp>.json).

Everything started is stopped, and the scratch database dropped (unless --keep), on every exit,
Ctrl-C and SIGTERM included. Exit status: 0 done, 1 timed out or failed, 2 bad usage, 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from scripts.benchmarks.common import (
    add_json_out_option,
    add_service_options,
    add_standin_options,
    add_worker_env_option,
    non_negative_int,
    options_from,
    positive_float,
    positive_int,
)


@dataclass
class Options:
    """Parsed command line."""

    accounts: int
    sample: int
    median_ms: float
    latency_sigma: float
    rate_limit: float | None
    concurrency: int | None
    dispatch_interval: float | None
    timeout: float
    keep: bool
    json_out: Path | None
    database_url: str
    redis_url: str
    seed: int
    trace: int
    progress_interval: float
    worker_env: dict[str, str]
    py_spy: Path | None
    cores: int
    workers: int
    webhooks: bool = False


def build_parser() -> argparse.ArgumentParser:
    """The command line of `scripts/bench`."""
    parser = argparse.ArgumentParser(
        prog="scripts/bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="The claim benchmark: scripts/bench claims --help. "
        "Targets (issue 8): >= 30x the sequential loop, >= 70%% of the ceiling, <= 2 database "
        "commits and <= 2 broker messages per verification, worker peak RSS <= 300 MB.",
    )
    add = parser.add_argument
    add("--accounts", type=positive_int, default=20_000, help="accounts to verify (20000)")
    add("--sample", type=positive_int, default=200, help="accounts of the sequential loop (200)")
    add_standin_options(add)
    add(
        "--rate-limit",
        type=positive_float,
        default=None,
        help="STS requests/s above which the stand-in answers Throttling (default: none)",
    )
    add(
        "--concurrency",
        type=positive_int,
        default=None,
        help="WORKER_CONCURRENCY for the worker (default: unset, the worker's default)",
    )
    add(
        "--dispatch-interval",
        type=positive_float,
        default=None,
        help="DISPATCH_INTERVAL_SECONDS (default: unset, the worker's default)",
    )
    add_worker_env_option(add, example="DISPATCH_MAX_QUEUED=5000")
    add(
        "--timeout",
        type=positive_float,
        default=900.0,
        help="seconds to wait for every account after seeding (900)",
    )
    add(
        "--trace",
        type=non_negative_int,
        default=75,
        help="verifications traced in-process to count SQL statements, in the worker's chunks "
        "(75: three chunks, the first one warming up; 0: none)",
    )
    add("--keep", action="store_true", help="keep the scratch database (its URL is printed)")
    add_json_out_option(add)
    add_service_options(add)
    add("--seed", type=int, default=8, help="seed of the stand-in's latency (8)")
    add(
        "--progress-interval",
        type=positive_float,
        default=5.0,
        help="seconds between progress lines (5)",
    )
    add(
        "--py-spy",
        type=Path,
        default=None,
        metavar="PATH",
        help="profile the worker with py-spy during the run (collapsed stacks to PATH)",
    )
    add(
        "--workers",
        type=positive_int,
        default=1,
        help="worker processes to start (1: the default deployment; more shows how the "
        "throughput scales past one process's GIL; the ceiling counts all their threads)",
    )
    add(
        "--webhooks",
        action="store_true",
        help="an endpoint per organization (100 accounts each), all on a local receiver that "
        "verifies signatures; reports deliveries and event -> delivery latency",
    )
    add(
        "--cores",
        type=positive_int,
        default=os.cpu_count() or 1,
        help="cores for the CPU ceiling (default: this machine's)",
    )
    return parser


def parse_options(argv: Sequence[str] | None) -> Options:
    """Parse and check the command line."""
    opts = options_from(build_parser(), argv, Options)
    return dataclasses.replace(opts, sample=min(opts.sample, opts.accounts))
