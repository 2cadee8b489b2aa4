"""Processes dying and doubling: a worker (or one of its pool children) SIGKILLed mid-sweep, beat
SIGKILLed mid-sweep, two beats at once.

Real `celery -A worker worker` and `celery -A worker beat` processes, a private Redis, a scratch
database on the machine's PostgreSQL, and the STS stand-in as a process.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
from sqlalchemy import func, select

from models import AccountStatus, AwsAccount
from tests.faults.fleet import Fleet, Planned
from tests.faults.harness import (
    StandInProcess,
    beat_ticks,
    kill_group,
    log_events,
    running,
    wait_started,
)
from tests.faults.invariants import check_invariants, wait_for
from tests.processes import Service, start_beat, start_worker, wait_until

pytestmark = pytest.mark.faults


def _attempted(fleet: Fleet) -> dict[str, object]:
    """label -> when it was last attempted, for the accounts attempted so far."""
    return {
        fleet.accounts[account_id].label: row.last_attempted_at
        for account_id, row in fleet.rows().items()
        if row.last_attempted_at is not None
    }


def _live_leases(fleet: Fleet) -> int:
    with fleet.sessions() as session:
        count = session.scalar(
            select(func.count()).where(
                AwsAccount.id.in_(list(fleet.accounts)),
                AwsAccount.lease_id.is_not(None),
                AwsAccount.lease_expires_at > func.now(),
            )
        )
    return int(count or 0)


@pytest.mark.timeout(150)
def test_worker_killed_mid_sweep_loses_nothing(
    services_env: Callable[..., dict[str, str]],
    fleet: Fleet,
    standin: StandInProcess,
    tmp_path: Path,
) -> None:
    """SIGKILL with verifications in flight: after their leases expire a new worker finishes
    them, each status change recorded once."""
    standin.configure(median_ms=150)
    fleet.add_mix(copies=3)
    total = len(fleet.accounts)
    env = services_env(WORKER_CONCURRENCY="2")
    beat = start_beat(env, tmp_path)
    first = start_worker(env, tmp_path, name="first")
    with running(beat, first):
        wait_until(
            lambda: 3 <= fleet.settled_count() <= total - 8,
            timeout=60,
            interval=0.05,
            what="a sweep under way",
        )
        kill_group(first)  # the worker and its prefork children, as when its host dies
        assert _live_leases(fleet), "the killed worker held leases"
        assert not fleet.settled()
        second = start_worker(env, tmp_path, name="second")
        with running(second):
            wait_for(fleet, timeout=60)
            check_invariants(
                fleet, services=[beat, second], workers=[first, second], exact_logs=False
            )


def _children(service: Service) -> list[int]:
    """The process ids of a service's direct children (a prefork worker's pool)."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if int(fields[1]) == service.process.pid:
            children.append(int(entry.name))
    return children


@pytest.mark.timeout(150)
def test_worker_pool_child_killed_mid_chunk(
    services_env: Callable[..., dict[str, str]],
    fleet: Fleet,
    standin: StandInProcess,
    tmp_path: Path,
) -> None:
    """SIGKILL of one prefork child (as the OOM killer might) with accounts in flight: they come
    back when their leases expire (20 s here), none is changed twice, and the worker replaces
    the child and goes on."""
    standin.configure(median_ms=300)
    fleet.add_mix(copies=3)
    total = len(fleet.accounts)
    env = services_env(
        WORKER_CONCURRENCY="2",
        DISPATCH_CHUNK_SIZE="8",
        VERIFY_TIME_LIMIT_SECONDS="10",
        LEASE_SECONDS="20",
    )
    worker, beat = start_worker(env, tmp_path), start_beat(env, tmp_path)
    with running(worker, beat):
        wait_started(workers=[worker])
        children = _children(worker)
        if not children:
            pytest.skip("the worker runs no pool children (thread pool): nothing to kill")
        wait_until(
            lambda: 2 <= fleet.settled_count() <= total - 10,
            timeout=60,
            interval=0.05,
            what="a sweep under way",
        )
        os.kill(children[0], signal.SIGKILL)
        wait_for(fleet, timeout=60)
        assert worker.process.poll() is None
        assert _children(worker), "the killed child was not replaced"
        # The child may have committed a change it never got to log.
        check_invariants(fleet, services=[worker, beat], workers=[worker], exact_logs=False)


@pytest.mark.timeout(150)
def test_warm_shutdown_writes_the_accounts_in_flight(
    services_env: Callable[..., dict[str, str]],
    fleet: Fleet,
    standin: StandInProcess,
    tmp_path: Path,
) -> None:
    """SIGTERM while STS answers are outstanding: the worker writes every result it accepted
    before it exits, so no account is left to wait for its lease."""
    # Answers slower than the worker's own shutdown takes, so only a drain can wait for them;
    # and slow enough that stopping beat and checking the database fit before they arrive on a
    # loaded machine.
    standin.configure(median_ms=5000, latency_sigma=0)
    planned = [fleet.add(f"ok-Drain{n}") for n in range(6)]
    env = services_env(
        WORKER_PROCESSES="1",
        WORKER_CONCURRENCY="8",
        DISPATCH_CHUNK_SIZE="8",
        STS_READ_TIMEOUT_SECONDS="15",
        VERIFY_TIME_LIMIT_SECONDS="30",
        LEASE_SECONDS="600",
    )
    worker, beat = start_worker(env, tmp_path), start_beat(env, tmp_path)
    with running(worker, beat):
        wait_until(
            lambda: standin.stats()["by_action"].get("AssumeRole", 0) >= len(planned),
            timeout=60,
            interval=0.02,
            what="every account's first STS call under way",
        )
        beat.stop()
        assert fleet.settled_count() == 0, "nothing is written before the answers arrive"
        assert worker.stop(timeout=60) == 0
        rows = fleet.rows()
        assert [(rows[p.id].status, rows[p.id].lease_id) for p in planned] == [
            (AccountStatus.CONNECTED, None)
        ] * len(planned)
        assert log_events(worker, "worker.draining")


@pytest.mark.timeout(150)
def test_a_full_window_gives_accounts_back_instead_of_waiting_out_the_time_limit(
    services_env: Callable[..., dict[str, str]],
    fleet: Fleet,
    standin: StandInProcess,
    tmp_path: Path,
) -> None:
    """STS so slow that a process's window does not move: the accounts that found no room are
    released, due at once, and still verified exactly once each."""
    standin.configure(median_ms=1500, latency_sigma=0)
    planned = [fleet.add(f"ok-Crowd{n}") for n in range(3)]
    env = services_env(
        WORKER_PROCESSES="1",
        WORKER_CONCURRENCY="1",
        DISPATCH_CHUNK_SIZE="3",
        STS_READ_TIMEOUT_SECONDS="10",
        VERIFY_TIME_LIMIT_SECONDS="2",  # one second of waiting for a slot
        LEASE_SECONDS="600",  # only a release can bring the deferred accounts back in time
    )
    worker, beat = start_worker(env, tmp_path), start_beat(env, tmp_path)
    with running(worker, beat):
        wait_for(fleet, timeout=90)
        assert log_events(worker, "verification.deferred")
        assert not log_events(worker, "verification.error")
        rows = fleet.rows()
        assert [rows[p.id].status for p in planned] == [AccountStatus.CONNECTED] * len(planned)
        # Two calls each (AssumeRole, the enforcement check): no account was verified twice.
        assert [standin.calls_for(p.role_arn) for p in planned] == [2] * len(planned)


@pytest.mark.timeout(150)
def test_beat_killed_mid_sweep_then_restarted(
    services_env: Callable[..., dict[str, str]],
    fleet: Fleet,
    standin: StandInProcess,
    tmp_path: Path,
) -> None:
    """SIGKILL of beat stops new claims (what was claimed finishes); a beat started on the
    schedule file the killed one left behind resumes the sweep."""
    standin.configure(median_ms=100)
    fleet.add_mix(copies=3)
    total = len(fleet.accounts)
    env = services_env(
        WORKER_CONCURRENCY="2",
        DISPATCH_BATCH_SIZE="2",
        DISPATCH_MAX_QUEUED="2",
    )
    worker = start_worker(env, tmp_path)
    with running(worker):
        beat = start_beat(env, tmp_path, name="beat")
        with running(beat):
            wait_until(
                lambda: 3 <= fleet.settled_count() <= total - 8,
                timeout=60,
                interval=0.05,
                what="a sweep under way",
            )
            kill_group(beat)
        # What was claimed before the kill drains; then nothing more may happen.
        wait_until(lambda: _live_leases(fleet) == 0, timeout=30, what="in-flight work to drain")
        # Dispatches sent just before the kill expire after 1 s; on a loaded machine the last
        # ones may still be taken a little later. Wait for a quiet second, then check that
        # nothing more happens for two.
        last_seen = [_attempted(fleet)]
        changed_at = [time.monotonic()]

        def quiet_for_a_second() -> bool:
            now = _attempted(fleet)
            if now != last_seen[0]:
                last_seen[0], changed_at[0] = now, time.monotonic()
            return time.monotonic() - changed_at[0] >= 1.0

        wait_until(quiet_for_a_second, timeout=30, interval=0.1, what="the last dispatches")
        before = _attempted(fleet)
        time.sleep(2)
        assert _attempted(fleet) == before, "verifications went on with no beat running"
        assert not fleet.settled()
        revived = start_beat(env, tmp_path, name="beat")  # same schedule file
        with running(revived):
            wait_for(fleet, timeout=60)
            check_invariants(fleet, services=[worker, revived], workers=[worker], exact_logs=True)


def _expected_sts_calls(planned: Planned) -> int | None:
    """AssumeRole calls one verification per needed attempt makes; None: keeps retrying."""
    if planned.transient:
        return None
    label = planned.label
    if label.startswith("flaky1"):
        return 1 + 2  # one InternalFailure, then AssumeRole and the external-ID check
    if label.startswith("deny") and planned.initial is AccountStatus.CONNECTED:
        return 2  # the refusal, then the confirming re-attempt
    if label.startswith("deny"):
        return 1
    return 2  # ok and noext: AssumeRole, then AssumeRole without the external ID


def _dispatched_more_than(beat: Service, count: int) -> bool:
    return beat_ticks(beat) > count


@pytest.mark.timeout(150)
def test_two_beats_never_verify_an_account_twice(
    services_env: Callable[..., dict[str, str]],
    fleet: Fleet,
    standin: StandInProcess,
    tmp_path: Path,
) -> None:
    """Two beats (and two workers) at once: twice the dispatches, each account still verified
    exactly as often as its behaviour needs, each change recorded once."""
    standin.configure(median_ms=30)
    env = services_env(
        DISPATCH_BATCH_SIZE="3",
        # No lease may expire under a slow machine: a re-claim after expiry is a legitimate
        # second verification, not the double dispatch this test looks for.
        LEASE_SECONDS="30",
    )
    services = (
        start_worker(env, tmp_path, name="worker-a"),
        start_worker(env, tmp_path, name="worker-b"),
        # DEBUG: Celery logs each dispatch a beat sends at that level.
        start_beat({**env, "LOG_LEVEL": "DEBUG"}, tmp_path, name="beat-a"),
        start_beat({**env, "LOG_LEVEL": "DEBUG"}, tmp_path, name="beat-b"),
    )
    with running(*services):
        wait_started(workers=services[:2], beats=services[2:])
        planned = fleet.add_mix(copies=3)
        wait_for(fleet, timeout=60)
        # Both beats keep dispatching (a sweep can settle in fewer ticks than this on a fast
        # run): the counts below are then taken after many more double dispatches, not fewer.
        for beat in services[2:]:
            wait_until(
                partial(_dispatched_more_than, beat, 5),
                timeout=30,
                what=f"{beat.name} to dispatch more than five times",
            )
        calls = {p.label: standin.calls_for(p.role_arn) for p in planned}
        wrong = {
            p.label: (calls[p.label], expected)
            for p in planned
            if (expected := _expected_sts_calls(p)) is not None and calls[p.label] != expected
        }
        assert not wrong, f"accounts verified more (or less) than once: {wrong}"
        check_invariants(fleet, services=services, workers=services[:2], exact_logs=True)
