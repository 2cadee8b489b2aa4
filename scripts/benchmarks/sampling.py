"""What a run reads while the worker works: the processes' CPU and memory, PostgreSQL's and
Redis's counters (`take_sample`), the scratch database's progress (`Poller`) and, at the end,
the lag from due to verified (`lag_and_window`)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import psycopg
import redis

from scripts.benchmarks.common import BenchError, wait_for
from scripts.benchmarks.procs import Child
from scripts.services.usage import TreeSample, machine_cpu, processes_cpu, sample_tree

PG_DATABASE_COLUMNS: Final = (
    "xact_commit",
    "xact_rollback",
    "tup_returned",
    "tup_fetched",
    "tup_inserted",
    "tup_updated",
    "tup_deleted",
    "blks_read",
    "blks_hit",
    "sessions",
)


def pg_database_stats(admin: psycopg.Connection[Any], name: str) -> dict[str, int]:
    """pg_stat_database counters of database `name`, read from another database."""
    columns = ", ".join(PG_DATABASE_COLUMNS)
    row = admin.execute(
        f"SELECT {columns} FROM pg_stat_database WHERE datname = %s", (name,)
    ).fetchone()
    if row is None:
        raise BenchError(f"no pg_stat_database row for {name}")
    return {column: int(value or 0) for column, value in zip(PG_DATABASE_COLUMNS, row, strict=True)}


def pg_stat_statements_loaded(admin: psycopg.Connection[Any]) -> bool:
    """Whether pg_stat_statements is in shared_preload_libraries (it needs to be, to count)."""
    row = admin.execute("SHOW shared_preload_libraries").fetchone()
    return row is not None and "pg_stat_statements" in str(row[0])


def redis_commandstats(client: redis.Redis) -> dict[str, int]:
    """Calls per command since the server started (server-wide: Redis has no per-db counts)."""
    info: dict[str, Any] = client.info("commandstats")
    out = {}
    for key, value in info.items():
        name = key.removeprefix("cmdstat_")
        if isinstance(value, dict):
            out[name] = int(value.get("calls", 0))
    return out


def redis_cpu_seconds(client: redis.Redis) -> float:
    """The Redis server's own CPU so far."""
    info: dict[str, Any] = client.info("cpu")
    return float(info.get("used_cpu_user", 0.0)) + float(info.get("used_cpu_sys", 0.0))


def other_redis_clients(client: redis.Redis, db: int) -> int:
    """Connections to other databases of the same server: they pollute commandstats."""
    clients: list[dict[str, Any]] = client.client_list()
    return sum(1 for c in clients if str(c.get("db")) != str(db))


# Commands that put a message on the broker: kombu's Redis transport publishes a task with
# LPUSH and a broadcast (remote control, gossip) with PUBLISH.
BROKER_PUBLISH_COMMANDS: Final = ("lpush", "rpush", "publish")


def wait_no_backends(admin: psycopg.Connection[Any], name: str, *, except_pid: int = 0) -> None:
    """Wait until no server process serves database `name`: each flushed its statistics.

    A backend flushes its counters to pg_stat_database when it exits (and at most once a
    second while idle); reading them before it is gone would miss its last transactions.
    """
    query = "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> %s"

    def gone() -> bool:
        row = admin.execute(query, (name, except_pid)).fetchone()
        return row is not None and int(row[0]) == 0

    with contextlib.suppress(BenchError):
        wait_for(gone, timeout=15, what=f"the connections to {name} to close")


@dataclass
class Progress:
    """The latest poll of the database."""

    verified: int = 0
    failed: int = 0
    transient: int = 0


class Poller:
    """One autocommit connection to the scratch database; counts its own transactions."""

    QUERY: Final = (
        "SELECT count(*) FILTER (WHERE last_verified_at IS NOT NULL),"
        " count(*) FILTER (WHERE status = 'failed'),"
        " count(*) FILTER (WHERE last_outcome = 'transient' AND last_verified_at IS NULL)"
        " FROM aws_accounts"
    )
    TABLES: Final = (
        "SELECT relname, n_tup_ins, n_tup_upd, n_tup_hot_upd, n_tup_del, seq_scan,"
        " coalesce(idx_scan, 0) FROM pg_stat_user_tables"
    )
    TABLE_COLUMNS: Final = (
        "n_tup_ins",
        "n_tup_upd",
        "n_tup_hot_upd",
        "n_tup_del",
        "seq_scan",
        "idx_scan",
    )

    def __init__(self, url: str) -> None:
        self.conn = psycopg.connect(url, autocommit=True)
        self.transactions = 0

    def poll(self) -> Progress:
        """Count verified, failed and transiently failing accounts."""
        row = self.conn.execute(self.QUERY).fetchone()
        self.transactions += 1
        assert row is not None  # noqa: S101 - an aggregate returns a row
        return Progress(int(row[0]), int(row[1]), int(row[2]))

    def table_stats(self) -> dict[str, dict[str, int]]:
        """pg_stat_user_tables counters per table."""
        rows = self.conn.execute(self.TABLES).fetchall()
        self.transactions += 1
        return {
            str(row[0]): dict(zip(self.TABLE_COLUMNS, (int(v or 0) for v in row[1:]), strict=True))
            for row in rows
        }

    def unverified(self) -> list[dict[str, Any]]:
        """The accounts not verified yet, grouped by what the worker last did with them."""
        rows = self.conn.execute(
            "SELECT status, last_outcome, last_error_code, lease_id IS NOT NULL, count(*)"
            " FROM aws_accounts WHERE last_verified_at IS NULL GROUP BY 1, 2, 3, 4"
            " ORDER BY 5 DESC"
        ).fetchall()
        self.transactions += 1
        keys = ("status", "last_outcome", "last_error_code", "leased", "count")
        return [dict(zip(keys, row, strict=True)) for row in rows]

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()


def table_deltas(
    before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]
) -> dict[str, dict[str, int]]:
    """Per-table counter increases between two `Poller.table_stats` readings."""
    return {
        table: {k: v - before.get(table, {}).get(k, 0) for k, v in counters.items()}
        for table, counters in sorted(after.items())
    }


@dataclass
class Sample:
    """Everything read at one instant of the run."""

    at: float
    worker: TreeSample
    beat: TreeSample
    standin: TreeSample
    machine: tuple[float, float]
    redis_commands: dict[str, int]
    redis_cpu: float
    pg_cpu: dict[int, float]
    bench_cpu: float


def take_sample(
    *,
    workers: Sequence[Child],
    beat: Child,
    standin: Child,
    broker: redis.Redis,
    admin: psycopg.Connection[Any],
    db_name: str,
) -> Sample:
    """CPU, memory and counters of every process of the run, now.

    With several worker processes, CPU and RSS are summed and the peak RSS is the largest one's.
    """
    samples = []
    for child in (*workers, beat, standin):
        sample = sample_tree(child.pid)
        if sample is None:
            child.check_alive()
            raise BenchError(f"cannot read /proc/{child.pid} of {child.name}")
        samples.append(sample)
    worker_samples = samples[: len(workers)]
    return Sample(
        at=time.monotonic(),
        worker=TreeSample(
            cpu_seconds=sum(x.cpu_seconds for x in worker_samples),
            rss_mb=sum(x.rss_mb for x in worker_samples),
            hwm_mb=max(x.hwm_mb for x in worker_samples),
            pss_mb=sum(x.pss_mb for x in worker_samples),
            user_seconds=sum(x.user_seconds for x in worker_samples),
            system_seconds=sum(x.system_seconds for x in worker_samples),
            main_thread_seconds=sum(x.main_thread_seconds for x in worker_samples),
        ),
        beat=samples[-2],
        standin=samples[-1],
        machine=machine_cpu(),
        redis_commands=redis_commandstats(broker),
        redis_cpu=redis_cpu_seconds(broker),
        pg_cpu=processes_cpu("postgres"),
        bench_cpu=time.process_time(),
    )


def lag_and_window(url: str, due: datetime) -> dict[str, float]:
    """Lag from due to verified, and the run's window, from the database's own clock.

    "Verified" is when the result was committed: `updated_at`, which the schema's trigger sets
    in the applying transaction when the status moves pending -> connected (`last_verified_at`
    is when the attempt started; the later of the two is used).
    """
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            """
            WITH done AS (
                SELECT extract(epoch FROM greatest(last_verified_at, updated_at) - %(due)s) AS lag,
                       extract(epoch FROM last_verified_at - %(due)s) AS started
                FROM aws_accounts
                WHERE last_verified_at IS NOT NULL
            )
            SELECT count(*),
                   percentile_cont(0.5) WITHIN GROUP (ORDER BY lag),
                   percentile_cont(0.9) WITHIN GROUP (ORDER BY lag),
                   percentile_cont(0.99) WITHIN GROUP (ORDER BY lag),
                   max(lag), min(started)
            FROM done
            """,
            {"due": due},
        ).fetchone()
    assert row is not None  # noqa: S101 - an aggregate returns a row
    count, p50, p90, p99, last, first = row
    if not count:
        return {"count": 0}
    return {
        "count": int(count),
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "max": float(last),
        "first_started": float(first),
    }


def progress_line(
    history: Sequence[tuple[float, int]], progress: Progress, total: int, window: float
) -> str:
    """One progress line: verified so far, overall rate and the rate over the last `window` s."""
    start, now = history[0][0], history[-1][0]
    old = next((h for h in history if h[0] >= now - window), history[0])
    recent = (progress.verified - old[1]) / max(now - old[0], 1e-9)
    elapsed = now - start
    overall = progress.verified / elapsed if elapsed > 0 else 0.0
    share = progress.verified / total * 100 if total else 100.0
    extra = ""
    if progress.transient:
        extra += f"  transient {progress.transient:,}"
    if progress.failed:
        extra += f"  failed {progress.failed:,}"
    return (
        f"  [{elapsed:6.1f}s] verified {progress.verified:>{len(f'{total:,}')},}/{total:,} "
        f"({share:5.1f}%)  {overall:6.1f}/s overall, {recent:6.1f}/s lately{extra}"
    )
