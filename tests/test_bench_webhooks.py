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
