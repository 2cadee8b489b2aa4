"""Smoke tests of the benchmarks: they run at tiny sizes, print their table, write their JSON.

No figure is asserted: timings depend on the machine, and these runs are far too small to mean
anything. What is checked is that the commands work, report every documented figure, and clean
up after themselves (scratch database dropped, broker database emptied).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.parse
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from tests.conftest import ADMIN_URL, TEST_REDIS_URL

ROOT = Path(__file__).resolve().parent.parent
# The benchmark flushes its Redis database: never the one the other tests use.
BENCH_REDIS_URL = urllib.parse.urlunsplit(
    urllib.parse.urlsplit(TEST_REDIS_URL)._replace(path="/14")
)

RESULT_KEYS = {
    "schema",
    "started_at",
    "finished_at",
    "completed",
    "host",
    "config",
    "worker",
    "sts",
    "ceiling",
    "sequential",
    "database",
    "broker",
    "machine",
    "targets",
}
WORKER_KEYS = {
    "verified",
    "verifications_per_second",
    "ratio_to_sequential",
    "lag_seconds",
    "cpu_ms_per_verification",
    "peak_pss_mb",
    "peak_rss_total_mb",
}


def _run(args: list[str], *, timeout: float) -> subprocess.CompletedProcess[str]:
    completed = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if completed.returncode != 0:
        pytest.fail(
            f"{' '.join(args)} exited {completed.returncode}\n"
            f"--- stdout ---\n{completed.stdout}\n--- stderr ---\n{completed.stderr}"
        )
    return completed


def _database_exists(name: str) -> bool:
    base = f"postgresql://{ADMIN_URL.partition('://')[2]}"
    with psycopg.connect(base, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_database WHERE datname = %s", (name,))
        return bool(row.fetchone() == (1,))


def test_help_documents_both_benchmarks() -> None:
    """`--help` of both commands works without any service and names the key options."""
    bench = _run(["-m", "scripts.benchmarks", "--help"], timeout=30).stdout
    for option in (
        "--accounts",
        "--sample",
        "--median-ms",
        "--rate-limit",
        "--concurrency",
        "--timeout",
        "--keep",
        "--json-out",
        "scripts/bench claims",
    ):
        assert option in bench
    claims = _run(["-m", "scripts.benchmarks.claims", "--help"], timeout=30).stdout
    for option in ("--sizes", "--due-shares", "--repeat", "--limit"):
        assert option in claims


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_throughput_bench_runs_and_reports_every_figure(tmp_path: Path) -> None:
    """A tiny run completes, prints the table and writes the JSON with every documented key."""
    out = tmp_path / "bench.json"
    options = [
        ("--accounts", "100"),
        ("--sample", "10"),
        ("--median-ms", "5"),
        ("--trace", "5"),
        ("--timeout", "60"),
        ("--progress-interval", "2"),
        ("--database-url", ADMIN_URL),
        ("--redis-url", BENCH_REDIS_URL),
        ("--json-out", str(out)),
        # A smoke test on a shared machine: an account that meets a hiccup (a transient
        # outcome, a failed task) is retried within seconds, not after the defaults' 30 s retry
        # or 300 s lease.
        ("--worker-env", "TRANSIENT_RETRY_INITIAL_SECONDS=1"),
        ("--worker-env", "PENDING_RETRY_SECONDS=1"),
        ("--worker-env", "VERIFY_TIME_LIMIT_SECONDS=10"),
        ("--worker-env", "LEASE_SECONDS=15"),
        ("--worker-env", "DISPATCH_INTERVAL_SECONDS=0.5"),
    ]
    completed = _run(
        ["-m", "scripts.benchmarks", *(part for pair in options for part in pair)], timeout=110
    )
    for label in (
        "verifications/s, worker",
        "verifications/s, sequential boto3 loop",
        "ratio to the sequential loop",
        "throughput / ceiling",
        "worker CPU per verification (ms)",
        "DB commits per verification",
        "broker messages per verification",
        "lag due -> verified, p50 / p99 (s)",
        "worker peak memory, PSS: shared pages once (MB)",
        "peak RSS total, shared pages once per process (MB)",
        "throughput / machine ceiling (concurrency and CPU only)",
        "STS calls throttled",
        "probe calls per verification",
    ):
        assert label in completed.stdout
    results: dict[str, Any] = json.loads(out.read_text())
    assert results.keys() >= RESULT_KEYS
    assert results["worker"].keys() >= WORKER_KEYS
    assert results["completed"] is True
    assert results["worker"]["verified"] == 100
    assert results["sequential"]["verified"] == 10
    assert results["config"]["concurrency_is_default"] is True
    assert results["config"]["worker_env"]["LEASE_SECONDS"] == "15"
    assert results["sts"]["throttled"] == 0
    # Probes are on by default: each account's first success probes its four permissions, on
    # the stand-in's other services (counted apart from STS requests).
    assert results["config"]["permission_probes"] == (
        "iam:GetAccountSummary,ec2:DescribeRegions,s3:ListAllMyBuckets,cloudtrail:DescribeTrails"
    )
    assert results["sts"]["probe_calls_per_verification"] >= 4
    assert results["database"]["trace"]["verifications"] == 5
    assert {t["name"] for t in results["targets"]} == {
        "ratio to the sequential loop",
        "fraction of the ceiling",
        "database commits per verification",
        "broker messages per verification",
        "worker peak memory (MB)",
    }
    assert results["ceiling"]["bounds"].keys() == {"concurrency", "cpu", "sts_budget"}
    assert not _database_exists(results["config"]["database"])
    assert redis.Redis.from_url(BENCH_REDIS_URL).dbsize() == 0


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_claims_bench_runs_and_explains(tmp_path: Path) -> None:
    """The claim benchmark at 1,000 accounts prints its table and plans and writes its JSON."""
    out = tmp_path / "claims.json"
    completed = _run(
        [
            "-m",
            "scripts.benchmarks.claims",
            "--sizes",
            "1000",
            "--due-shares",
            "0.01,1",
            "--repeat",
            "3",
            "--database-url",
            ADMIN_URL,
            "--json-out",
            str(out),
        ],
        timeout=110,
    )
    assert "due-accounts claim" in completed.stdout
    assert "EXPLAIN (ANALYZE, BUFFERS)" in completed.stdout
    results: dict[str, Any] = json.loads(out.read_text())
    assert {"schema", "limit", "target_ms", "scenarios"} <= results.keys()
    first, everything = results["scenarios"]
    assert (first["accounts"], first["due_share"]) == (1000, 0.01)
    assert everything["due_rows"] == 1000
    assert everything["claimed"] == 500  # the batch size: the claim takes no more
    assert first["claimed"] == first["due_rows"]  # fewer due than the batch: all of them
    for scenario in (first, everything):
        assert scenario["repeat"] == 3
        assert scenario["explain"]
        assert all("Execution Time" in plan for plan in scenario["explain"])


@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_latency_bench_runs_and_reports_every_figure(tmp_path: Path) -> None:
    """A tiny `scripts/bench latency` run completes, prints its table and writes its JSON with
    every figure of issue 13, and cleans up."""
    out = tmp_path / "latency.json"
    options = [
        ("--requests", "3"),
        ("--inserts", "3"),
        ("--sweep", "200"),
        ("--median-ms", "5"),
        ("--idle-seconds", "1"),
        ("--database-url", ADMIN_URL),
        ("--redis-url", BENCH_REDIS_URL),
        ("--json-out", str(out)),
        ("--worker-env", "TRANSIENT_RETRY_INITIAL_SECONDS=1"),
        ("--worker-env", "PENDING_RETRY_SECONDS=1"),
    ]
    help_text = _run(["-m", "scripts.benchmarks.latency", "--help"], timeout=30).stdout
    for option in ("--requests", "--inserts", "--sweep", "--idle-seconds", "--worker-env"):
        assert option in help_text
    completed = _run(
        ["-m", "scripts.benchmarks.latency", *(part for pair in options for part in pair)],
        timeout=230,
    )
    for label in (
        "time to verdict, idle: p50 / p99 (ms)",
        "time to verdict under a 200-account sweep (ms)",
        "ratio of p99s, under sweep / idle",
        "insert-only: time to verdict (ms)",
        "to the attempt starting (pickup)",
        "idle cost: worker / beat CPU, database commits/s",
    ):
        assert label in completed.stdout
    results: dict[str, Any] = json.loads(out.read_text())
    assert {"idle", "under_sweep", "insert_only", "idle_cost", "ratio_of_p99s", "targets"} <= set(
        results
    )
    assert results["idle"]["count"] == 3
    assert results["insert_only"]["count"] == 3
    assert results["idle"]["verdict_ms"].keys() == {"p50", "p99", "max"}
    assert results["under_sweep"]["sweep"]["requests_measured"] == 3
    assert {t["name"] for t in results["targets"]} == {
        "under-sweep p99 / idle p99",
        "insert-only time to verdict p50 (ms)",
    }
    assert not _database_exists(results["config"]["database"])
    assert redis.Redis.from_url(BENCH_REDIS_URL).dbsize() == 0


@pytest.mark.timeout(120)
def test_status_bench_times_the_real_command() -> None:
    """`scripts/bench status` seeds a scratch database, runs `scripts/status --json` and prints
    its median wall and database times against the target (tiny size: no figure is judged)."""
    result = _run(
        [
            "-m",
            "scripts.benchmarks.status",
            "--accounts",
            "500",
            "--repeat",
            "1",
            "--database-url",
            ADMIN_URL,
            "--redis-url",
            TEST_REDIS_URL,  # read only
        ],
        timeout=100,
    )
    assert "scripts/status --json at 500 accounts" in result.stdout, result.stderr[-2000:]
    assert re.search(
        r"wall, median of 1 \(s\)\s+\d+\.\d{3}\s+target < 1: (met|NOT met)", result.stdout
    )
    assert re.search(r"database, median \(s\)\s+\d+\.\d{3}", result.stdout)
