"""End to end: the real prefork worker's and beat's /metrics, /healthz and /readyz, scraped while
they work, against the STS stand-in, PostgreSQL and Redis."""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis
from alembic import command
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from models import AccountStatus, AuditEvent, AuditEventType, AwsAccount
from tests.conftest import alembic_config
from tests.faults.fleet import Fleet
from tests.faults.harness import (
    PrivatePostgres,
    StandInProcess,
    fault_env,
    kill_group,
    running,
)
from tests.processes import ROOT, RedisServer, free_port, start_beat, start_worker, wait_until

pytestmark = pytest.mark.e2e

QUEUES = ("verifier.dispatch", "verifier.requested", "verifier.scheduled")


def get(url: str) -> tuple[int, str]:
    """GET a URL of ours: (HTTP status, body); a refused connection is status 0."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - local http
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError:
        return 0, ""


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of /metrics, keyed by (sample name, labels)."""
    status, body = get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200, body
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


def total(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], metric: str, **labels: str
) -> float:
    """The sum of a metric's samples whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == metric and wanted <= ls)


def verifications_by_process(directory: Path) -> dict[str, float]:
    """Each process's own `verifier_verifications_total`, read from its counter file (the pid is
    in the file's name)."""
    found: dict[str, float] = {}
    for path in directory.glob("counter_*.db"):
        values = MmapedDict.read_all_values_from_file(str(path))  # type: ignore[no-untyped-call]
        found[path.stem.rpartition("_")[2]] = sum(
            value for key, value, _, _ in values if json.loads(key)[0] == "verifier_verifications"
        )
    return found


def _quiet(fleet: Fleet, client: redis.Redis, standin: StandInProcess) -> bool:
    """No lease held, no message queued, and STS saw nothing new for a second."""
    with fleet.sessions() as session:
        leased = session.scalar(
            select(func.count()).select_from(AwsAccount).where(AwsAccount.lease_id.is_not(None))
        )
    if leased or any(client.llen(queue) for queue in QUEUES):
        return False
    before = standin.stats()["requests"]
    time.sleep(1.0)
    return bool(standin.stats()["requests"] == before)


@pytest.mark.timeout(240)
def test_counters_add_up_to_what_sts_saw_and_the_database_holds(
    scratch_database: str,
    scratch_sessions: sessionmaker[Session],
    private_redis: RedisServer,
    standin: StandInProcess,
    tmp_path: Path,
) -> None:
    """Two prefork processes' counters, summed on the one endpoint of the main process, equal the
    stand-in's request counts and the audit trail, exactly; beat serves its own."""
    fleet = Fleet(scratch_sessions)
    labels = [f"ok-{n}" for n in range(24)] + [f"deny-{n}" for n in range(6)]
    labels += [f"noext-{n}" for n in range(3)] + [f"throttle-{n}" for n in range(3)]
    for label in labels:
        fleet.add(label)
    # Connected accounts refused: each held once (confirming), then failed at its re-attempt.
    for n in range(2):
        fleet.add(f"deny-connected-{n}", initial=AccountStatus.CONNECTED)
    multiproc = tmp_path / "prometheus"
    multiproc.mkdir()
    (multiproc / "counter_4242.db").write_bytes(b"left over from a previous run")
    worker_port, beat_port = free_port(), free_port()
    env = fault_env(
        database_url=scratch_database,
        redis_url=private_redis.url,
        sts_url=standin.url,
        WORKER_PROCESSES="2",
        METRICS_DATABASE_INTERVAL_SECONDS="1",
        PROMETHEUS_MULTIPROC_DIR=str(multiproc),
    )
    worker = start_worker({**env, "METRICS_PORT": str(worker_port)}, tmp_path)
    beat = start_beat({**env, "METRICS_PORT": str(beat_port)}, tmp_path)
    client = redis.Redis.from_url(private_redis.url)
    with running(worker, beat):
        # Mid-sweep: the endpoint answers and counts what is done so far.
        wait_until(
            lambda: (
                get(f"http://127.0.0.1:{worker_port}/metrics")[0] == 200
                and total(scrape(worker_port), "verifier_verifications_total") > 0
            ),
            timeout=90,
            what="verifications counted mid-sweep",
        )
        # Mid-sweep, what is counted has happened: never more requests than STS has seen.
        mid_sweep = scrape(worker_port)
        assert total(mid_sweep, "verifier_sts_requests_total") <= standin.stats()["requests"]
        wait_until(fleet.settled, timeout=120, what="every account at its status")
        assert get(f"http://127.0.0.1:{beat_port}/healthz")[0] == 200
        assert get(f"http://127.0.0.1:{beat_port}/readyz")[0] == 200
        beat_samples = scrape(beat_port)
        beat.stop()
        # Nothing more is dispatched: once what is in flight is written, every count is final.
        wait_until(lambda: _quiet(fleet, client, standin), timeout=60, what="the worker idle")
        time.sleep(1.2)  # the fleet gauges are at most a second old
        samples = scrape(worker_port)
        stats = standin.stats()
        with scratch_sessions() as session:
            transitions = Counter(
                (str(e.from_status), str(e.to_status))
                for e in session.scalars(
                    select(AuditEvent).where(AuditEvent.event_type == AuditEventType.STATUS_CHANGED)
                )
            )
            statuses = Counter(str(s) for s in session.scalars(select(AwsAccount.status)))
        assert worker.process.poll() is None

    # Both prefork processes verified, each in files of its own, and the one endpoint showed
    # their sum; the stale file was wiped at start.
    assert not (multiproc / "counter_4242.db").exists()
    by_process = verifications_by_process(multiproc)
    assert str(worker.process.pid) in by_process  # the main process's (it verifies nothing)
    verifying = {pid: n for pid, n in by_process.items() if n > 0}
    assert len(verifying) >= 2, by_process
    assert sum(verifying.values()) == total(samples, "verifier_verifications_total")
    assert total(mid_sweep, "verifier_verifications_total") <= sum(verifying.values())

    # What the stand-in saw, request by request.
    assert total(samples, "verifier_sts_requests_total") == stats["requests"]
    for action, count in stats["by_action"].items():
        assert total(samples, "verifier_sts_requests_total", operation=action) == count
    assert (
        total(samples, "verifier_sts_request_duration_seconds_count", result="throttled")
        == stats["throttled"]
    )
    # Every request was answered, and the answers add up by result.
    assert total(samples, "verifier_sts_request_duration_seconds_count") == stats["requests"]
    assert total(samples, "verifier_sts_request_duration_seconds_count", result="ok") == stats[
        "by_outcome"
    ].get("Success", 0)
    assert total(
        samples, "verifier_sts_request_duration_seconds_count", result="access_denied"
    ) == stats["by_outcome"].get("AccessDenied", 0)
    throttle_calls = sum(n for arn, n in stats["by_role"].items() if "/throttle-" in arn)
    assert throttle_calls >= 3
    assert (
        total(samples, "verifier_verifications_total", outcome="transient", error_code="Throttling")
        == throttle_calls
    )

    # What the database holds: each account verified once (the throttled ones every time).
    assert (
        total(samples, "verifier_verifications_total", outcome="verified", error_code="none") == 24
    )
    assert total(samples, "verifier_verifications_total", error_code="AccessDenied") == 6 + 2 * 2
    assert total(samples, "verifier_verifications_total", error_code="ExternalIdNotEnforced") == 3
    counted = {
        (dict(ls)["from_status"], dict(ls)["to_status"]): v
        for (n, ls), v in samples.items()
        if n == "verifier_status_transitions_total"
    }
    assert counted == dict(transitions)
    assert transitions == {
        ("pending", "connected"): 24,
        ("pending", "failed"): 9,
        ("connected", "failed"): 2,
    }
    # No grace window here (PENDING_GRACE_SECONDS=0) and no wave: the two confirmations only.
    assert total(samples, "verifier_holds_total", hold="confirming") == 2
    assert total(samples, "verifier_holds_total") == 2
    for status in ("pending", "connected", "failed"):
        assert total(samples, "verifier_accounts", status=status) == statuses[status]
    assert total(samples, "verifier_accounts_leased") == 0

    # Every account claimed was verified, discarded or skipped: none unaccounted for.
    accounted = sum(
        total(samples, name)
        for name in (
            "verifier_verifications_total",
            "verifier_verifications_discarded_total",
            "verifier_verifications_skipped_total",
            "verifier_verifications_deferred_total",
            "verifier_verification_errors_total",
        )
    )
    assert accounted == total(samples, "verifier_dispatch_claimed_total")
    assert total(samples, "verifier_verification_lag_seconds_count") == total(
        samples, "verifier_verifications_total"
    )
    assert total(samples, "celery_task_succeeded_total", name="verifier.verify_accounts") > 0
    assert total(samples, "verifier_dispatch_runs_total", result="claimed") > 0
    assert total(samples, "verifier_dispatch_last_run_timestamp_seconds") > time.time() - 60
    # The throttled answers cut the shared rate (at most once per cut interval).
    assert 1 <= total(samples, "verifier_sts_rate_cuts_total") <= stats["throttled"]
    assert total(samples, "verifier_platform_circuit_open") == 0
    assert total(samples, "celery_queue_length") == 0
    assert total(samples, "verifier_sts_rate_ceiling_per_second") > 0
    assert total(beat_samples, "verifier_beat_dispatches_sent_total") > 0

    # The README's table names every metric either process serves.
    readme = (ROOT / "README.md").read_text()
    served = {name for name, _ in samples} | {name for name, _ in beat_samples}
    for name in served:
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        assert f"`{base}`" in readme, name


def _readiness(port: int) -> tuple[int, dict[str, Any]]:
    status, body = get(f"http://127.0.0.1:{port}/readyz")
    return status, (json.loads(body) if body else {})


# "Within seconds": readiness is checked at most once a second, a check is cut off after 3 s,
# and the circuit breaker opens at the first verification refused (the test's account is due
# again every second or two). Generous for a loaded machine, far below what an orchestrator or an
# alert would wait.
READINESS_WITHIN_SECONDS = 15.0


def _wait_ready(
    port: int,
    ready: bool,
    *,
    what: str,
    liveness: list[int],
    timings: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Poll /readyz until it says `ready`, checking /healthz at every poll; returns the checks.
    With `timings`, the seconds it took are recorded under `what`."""
    answer: dict[str, Any] = {}

    def reached() -> bool:
        nonlocal answer
        liveness.append(get(f"http://127.0.0.1:{port}/healthz")[0])
        status, answer = _readiness(port)
        return (status == 200) is ready and status != 0

    started = time.monotonic()
    wait_until(reached, timeout=60, interval=0.5, what=what)
    if timings is not None:
        timings[what] = round(time.monotonic() - started, 1)
    checks: dict[str, Any] = answer.get("checks", {})
    return checks


@pytest.mark.timeout(300)
def test_readiness_follows_the_database_redis_and_platform_credentials(
    private_postgres: PrivatePostgres,
    private_redis: RedisServer,
    standin: StandInProcess,
    tmp_path: Path,
) -> None:
    """Readiness turns false within seconds when PostgreSQL or Redis stops or the platform's
    credentials are refused, and true again after; liveness stays true all along."""
    postgres = private_postgres
    import psycopg  # noqa: PLC0415

    with psycopg.connect(postgres.url(), autocommit=True) as conn:
        conn.execute('CREATE DATABASE "verifier"')
    url = postgres.url("verifier")
    command.upgrade(alembic_config(url), "head")
    engine = create_engine(f"postgresql+psycopg://{url.partition('://')[2]}")
    fleet = Fleet(sessionmaker(engine))
    # Always due again within seconds: every turn asks STS, so bad credentials show at once.
    fleet.add("throttle-readiness")
    engine.dispose()
    port = free_port()
    env = fault_env(
        database_url=url,
        redis_url=private_redis.url,
        sts_url=standin.url,
        METRICS_PORT=str(port),
        # The throttled account makes every verification transient with one code: the
        # fleet-wide stall (tested on its own below) is kept out of this test.
        STALL_MIN_VERIFICATIONS="1000000",
    )
    env["WORKER_PROCESSES"] = "2"
    liveness: list[int] = []
    beat = start_beat({**env, "METRICS_PORT": str(free_port())}, tmp_path)
    with running(start_worker(env, tmp_path), beat) as (worker, _beat):
        wait_until(
            lambda: get(f"http://127.0.0.1:{port}/healthz")[0] == 200,
            timeout=60,
            what="the worker's endpoint to answer",
        )
        checks = _wait_ready(port, True, what="ready after start", liveness=liveness)
        assert checks == {
            "database": "ok",
            "redis": "ok",
            "platform": "ok",
            "verification": "ok",
        }

        # Each outage starts once its service is down (stop() returns when the process has
        # exited), and each recovery once it is back; `timings` has how long readiness took.
        timings: dict[str, float] = {}
        postgres.stop()
        checks = _wait_ready(
            port, False, what="not ready without PostgreSQL", liveness=liveness, timings=timings
        )
        assert checks["database"].startswith("failed"), checks
        postgres.start()
        _wait_ready(
            port, True, what="ready with PostgreSQL back", liveness=liveness, timings=timings
        )

        private_redis.stop()
        checks = _wait_ready(
            port, False, what="not ready without Redis", liveness=liveness, timings=timings
        )
        assert checks["redis"].startswith("failed"), checks
        time.sleep(3)  # the consumer reconnecting for a while: still alive
        liveness.append(get(f"http://127.0.0.1:{port}/healthz")[0])
        private_redis.start()
        _wait_ready(port, True, what="ready with Redis back", liveness=liveness, timings=timings)

        standin.configure(platform_credentials_valid=False)
        checks = _wait_ready(
            port, False, what="not ready with bad credentials", liveness=liveness, timings=timings
        )
        assert checks["platform"].startswith("circuit open"), checks
        # The trip is counted by the process that opened the breaker, with the refusal's code.
        wait_until(
            lambda: total(scrape(port), "verifier_platform_circuit_open") == 1,
            timeout=10,
            what="the circuit breaker's gauge",
        )
        open_samples = scrape(port)
        standin.configure(platform_credentials_valid=True)
        _wait_ready(
            port, True, what="ready with credentials back", liveness=liveness, timings=timings
        )
        assert worker.process.poll() is None
    assert set(liveness) == {200}, Counter(liveness)
    slow = {what: took for what, took in timings.items() if took > READINESS_WITHIN_SECONDS}
    assert not slow, f"over {READINESS_WITHIN_SECONDS}s: {slow} (all: {timings})"
    trips = total(open_samples, "verifier_platform_circuit_trips_total")
    assert trips >= 1
    assert (
        total(
            open_samples, "verifier_platform_circuit_trips_total", error_code="InvalidClientTokenId"
        )
        == trips
    )


@pytest.mark.timeout(240)
def test_leases_of_a_killed_worker_are_counted_when_claimed_again(
    scratch_database: str,
    scratch_sessions: sessionmaker[Session],
    private_redis: RedisServer,
    standin: StandInProcess,
    tmp_path: Path,
) -> None:
    """A worker killed with leases held: the next worker claims exactly those accounts again
    once the leases expire, and counts each one as a re-claimed lease."""
    standin.configure(median_ms=300)
    fleet = Fleet(scratch_sessions)
    for n in range(24):
        fleet.add(f"ok-{n}")
    env = fault_env(
        database_url=scratch_database,
        redis_url=private_redis.url,
        sts_url=standin.url,
        METRICS_DATABASE_INTERVAL_SECONDS="1",
    )
    port = free_port()
    beat = start_beat(env, tmp_path)
    # Metrics are off without METRICS_PORT: a PROMETHEUS_MULTIPROC_DIR in the environment is
    # neither wiped nor written to while the first worker verifies.
    untouched = tmp_path / "metrics-off"
    untouched.mkdir()
    (untouched / "counter_4242.db").write_bytes(b"not the first worker's")
    first = start_worker(
        {**env, "PROMETHEUS_MULTIPROC_DIR": str(untouched)}, tmp_path, name="first"
    )
    with running(beat, first):

        def leased() -> int:
            with scratch_sessions() as session:
                return int(
                    session.scalar(
                        select(func.count())
                        .select_from(AwsAccount)
                        .where(AwsAccount.lease_id.is_not(None))
                    )
                    or 0
                )

        wait_until(lambda: leased() >= 4, timeout=60, interval=0.05, what="leases held")
        kill_group(first)
        assert [path.name for path in untouched.iterdir()] == ["counter_4242.db"]
        # The messages still queued go too (as with a Redis that lost them): each account leased
        # now comes back only through its lease.
        redis.Redis.from_url(private_redis.url).delete(*QUEUES)
        held = leased()
        second = start_worker({**env, "METRICS_PORT": str(port)}, tmp_path, name="second")
        with running(second):
            wait_until(fleet.settled, timeout=120, what="every account verified")
            wait_until(
                lambda: (
                    total(scrape(port), "verifier_leases_expired") == 0
                    and total(scrape(port), "verifier_accounts_leased") == 0
                ),
                timeout=30,
                what="no lease left",
            )
            samples = scrape(port)
    assert held >= 4
    assert total(samples, "verifier_leases_reclaimed_total") == held


@pytest.mark.timeout(240)
def test_readiness_says_stalled_while_every_verification_fails_the_same_way(
    scratch_database: str,
    scratch_sessions: sessionmaker[Session],
    private_redis: RedisServer,
    standin: StandInProcess,
    tmp_path: Path,
) -> None:
    """While STS answers every call with one transient error (the fleet-wide
    `verification.stalled` condition) the worker is not ready; once verifications succeed again
    and the window has moved on, it is; liveness stays true."""
    fleet = Fleet(scratch_sessions)
    for n in range(3):
        fleet.add(f"ok-{n}")
    standin.configure(force_error="ServiceUnavailable", force_ratio=1.0)
    port = free_port()
    env = fault_env(
        database_url=scratch_database,
        redis_url=private_redis.url,
        sts_url=standin.url,
        METRICS_PORT=str(port),
        STALL_WINDOW_SECONDS="5",
        STALL_MIN_VERIFICATIONS="3",
    )
    beat = start_beat({**env, "METRICS_PORT": str(free_port())}, tmp_path)
    liveness: list[int] = []
    with running(start_worker(env, tmp_path), beat):
        wait_until(
            lambda: get(f"http://127.0.0.1:{port}/healthz")[0] == 200,
            timeout=60,
            what="the worker's endpoint to answer",
        )
        checks = _wait_ready(port, False, what="not ready while stalled", liveness=liveness)
        assert checks["verification"].startswith("stalled"), checks
        assert "ServiceUnavailable" in checks["verification"]
        assert total(scrape(port), "verifier_verification_stalled") == 1
        standin.configure(force_error=None)
        _wait_ready(port, True, what="ready once verifications succeed", liveness=liveness)
        assert total(scrape(port), "verifier_verification_stalled") == 0
        wait_until(fleet.settled, timeout=60, what="every account verified")
    assert set(liveness) == {200}, Counter(liveness)
