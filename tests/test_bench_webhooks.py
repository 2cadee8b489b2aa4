"""Smoke test of `scripts/bench --webhooks` at a tiny size: it works, no figure is asserted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ADMIN_URL
from tests.test_bench import BENCH_REDIS_URL, _run


@pytest.mark.e2e
@pytest.mark.timeout(150)
def test_the_bench_delivers_a_webhook_per_status_change(tmp_path: Path) -> None:
    """With an endpoint per organization every status change is delivered once, verified."""
    out = tmp_path / "bench.json"
    options = [
        ("--accounts", "200"),
        ("--sample", "5"),
        ("--median-ms", "5"),
        ("--trace", "0"),
        ("--timeout", "90"),
        ("--database-url", ADMIN_URL),
        ("--redis-url", BENCH_REDIS_URL),
        ("--json-out", str(out)),
        ("--worker-env", "TRANSIENT_RETRY_INITIAL_SECONDS=1"),
        ("--worker-env", "VERIFY_TIME_LIMIT_SECONDS=10"),
        ("--worker-env", "LEASE_SECONDS=15"),
        ("--worker-env", "DISPATCH_INTERVAL_SECONDS=0.5"),
    ]
    _run(
        ["-m", "scripts.benchmarks", "--webhooks", *(part for pair in options for part in pair)],
        timeout=140,
    )
    results: dict[str, Any] = json.loads(out.read_text())
    webhooks = results["webhooks"]
    assert webhooks["status_changes"] == 200
    assert webhooks["deliveries"] == webhooks["delivered"] == 200
    assert webhooks["received_verified"] == 200
    assert (webhooks["duplicates"], webhooks["unverified"]) == (0, 0)
    assert webhooks["event_to_delivery_p50_seconds"] is not None
    assert webhooks["event_to_receipt_p50_seconds"] is not None


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_the_webhook_claims_bench_runs_both_variants(tmp_path: Path) -> None:
    """A tiny `python -m scripts.benchmarks.webhook_claims` prints its table and writes its
    JSON, a row per number of claimers and variant; no figure is asserted but the claim's
    size, which holds with one claimer whatever the machine."""
    out = tmp_path / "webhook-claims.json"
    options = [
        ("--claimers", "1,2"),
        ("--repeat", "3"),
        ("--rounds", "2"),
        ("--deliveries", "500"),
        ("--endpoints", "10"),
        ("--database-url", ADMIN_URL),
        ("--json-out", str(out)),
    ]
    completed = _run(
        ["-m", "scripts.benchmarks.webhook_claims", *(part for pair in options for part in pair)],
        timeout=110,
    )
    assert "deliveries/claim" in completed.stdout
    results: dict[str, Any] = json.loads(out.read_text())
    rows = {(row["claimers"], row["variant"]): row for row in results["results"]}
    assert set(rows) == {(1, "lock"), (1, "no_lock"), (2, "lock"), (2, "no_lock")}
    assert all(row["claims"] == claimers * 3 for (claimers, _), row in rows.items())
    assert (
        rows[1, "lock"]["deliveries_per_claim"] == rows[1, "no_lock"]["deliveries_per_claim"] == 64
    )
    assert rows[2, "lock"]["deliveries_per_claim"] == 64  # one after the other: each a full claim
