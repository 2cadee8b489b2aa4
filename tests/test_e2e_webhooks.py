"""End to end: real worker and beat deliver status changes to real HTTP receivers that verify
every signature with `standardwebhooks`."""

from __future__ import annotations

import os
import signal
import statistics
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from models import AuditEvent, AuditEventType, WebhookDelivery, WebhookEndpoint
from sandbox.moto_sts import SandboxSts
from sandbox.webhook_receiver import Behaviour, WebhookReceiver
from tests.factories import make_organization, make_sandbox_account
from tests.processes import free_port, running, service_env, start_beat, start_worker, wait_until
from worker.settings import Settings
from worker.webhooks import create_endpoint
from worker.webhooks.signing import generate_key

pytestmark = pytest.mark.e2e

LONG_AGO = datetime(2026, 1, 1, tzinfo=UTC)
DENYING_PRINCIPAL = "arn:aws:iam::999988887777:root"


@dataclass(frozen=True)
class Stack:
    """The services a test's worker and beat use, and the WEBHOOK_SECRET_KEY they share with the
    test (which registers endpoints)."""

    sts_url: str
    database: str
    redis_url: str
    sessions: sessionmaker[Session]
    key: str

    def env(self, **extra: str) -> dict[str, str]:
        """Worker and beat environment: fast retries, short timeouts, loopback allowed."""
        webhooks = {
            "WEBHOOK_SECRET_KEY": self.key,
            "WEBHOOK_ALLOW_PRIVATE_NETWORKS": "true",
            "WEBHOOK_RETRY_SCHEDULE_SECONDS": "[1, 1, 1, 1, 1, 1, 1, 1, 1]",
            "WEBHOOK_CONNECT_TIMEOUT_SECONDS": "1",
            "WEBHOOK_READ_TIMEOUT_SECONDS": "1",
            "WEBHOOK_DISPATCH_INTERVAL_SECONDS": "0.2",
        }
        return service_env(
            database_url=self.database,
            redis_url=self.redis_url,
            sts_url=self.sts_url,
            **{**webhooks, **extra},
        )


@pytest.fixture
def stack(
    sandbox: SandboxSts,
    scratch_database: str,
    scratch_sessions: sessionmaker[Session],
    clean_redis: str,
) -> Stack:
    """PostgreSQL, Redis, the sandbox STS and a fresh WEBHOOK_SECRET_KEY."""
    return Stack(
        sandbox.endpoint_url, scratch_database, clean_redis, scratch_sessions, generate_key()
    )


def _register(stack: Stack, organization_id: uuid.UUID, url: str) -> tuple[uuid.UUID, str]:
    settings = Settings(webhook_secret_key=stack.key, webhook_allow_private_networks=True)
    with stack.sessions.begin() as session:
        created = create_endpoint(
            session, organization_id=organization_id, url=url, settings=settings
        )
    return created.endpoint.id, created.secret


def _webhook_ids(sessions: sessionmaker[Session], endpoint_id: uuid.UUID) -> set[str]:
    with sessions() as session:
        return {
            d.message_id
            for d in session.scalars(
                select(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint_id)
            )
        }


def _deliveries(sessions: sessionmaker[Session], endpoint_id: uuid.UUID) -> list[WebhookDelivery]:
    with sessions() as session:
        return list(
            session.scalars(
                select(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint_id)
            )
        )


def test_every_status_change_arrives_once_per_endpoint(stack: Stack, tmp_path: Path) -> None:
    """A sweep's status changes reach two endpoints exactly once each (by webhook-id), one of
    them after answering 500 for a while; the payloads match the audit log."""
    steady = WebhookReceiver().start()
    flaky = WebhookReceiver(behaviour=Behaviour.ERROR).start()
    with stack.sessions.begin() as session:
        organization = make_organization(session)
        ids = [
            make_sandbox_account(
                session,
                stack.sts_url,
                organization=organization,
                trusted=DENYING_PRINCIPAL if n % 2 else None,
                role_changed_at=LONG_AGO,
            ).id
            for n in range(8)
        ]
    steady_id, secret = _register(stack, organization.id, steady.url)
    steady.secrets.append(secret)
    flaky_id, secret = _register(stack, organization.id, flaky.url)
    flaky.secrets.append(secret)
    env = stack.env()
    try:
        with running(start_worker(env, tmp_path), start_beat(env, tmp_path)):
            wait_until(
                lambda: len(steady.accepted_ids()) == 8,
                timeout=90,
                what="8 status changes at the steady receiver",
            )
            wait_until(lambda: len(flaky.snapshot()) >= 8, timeout=60, what="failed attempts")
            flaky.behaviour = Behaviour.OK
            wait_until(
                lambda: len(flaky.accepted_ids()) == 8,
                timeout=60,
                what="8 status changes at the flaky receiver after its recovery",
            )
            with stack.sessions() as session:
                events = list(
                    session.scalars(
                        select(AuditEvent).where(
                            AuditEvent.event_type == AuditEventType.STATUS_CHANGED,
                            AuditEvent.account_id.in_(ids),
                        )
                    )
                )
    finally:
        steady.stop()
        flaky.stop()
    assert len(events) == 8
    assert set(steady.accepted_ids().values()) == {1}
    assert set(flaky.accepted_ids().values()) == {1}
    assert set(steady.accepted_ids()) == _webhook_ids(stack.sessions, steady_id)
    assert set(flaky.accepted_ids()) == _webhook_ids(stack.sessions, flaky_id)
    assert all(r.verified for r in steady.snapshot() + flaky.snapshot())
    announced = {
        (r.payload["data"]["account"]["id"], r.payload["data"]["to"])
        for r in steady.accepted()
        if r.payload is not None
    }
    assert announced == {(str(e.account_id), e.to_status.value) for e in events if e.to_status}
    # The failed attempts were retried with the same webhook-id.
    assert {r.webhook_id for r in flaky.snapshot() if r.answered == 500} <= set(
        flaky.accepted_ids()
    )
    occurred = {str(e.account_id): e.occurred_at.timestamp() for e in events}
    latencies = sorted(
        r.at - occurred[r.payload["data"]["account"]["id"]]
        for r in steady.accepted()
        if r.payload is not None
    )
    print(  # noqa: T201 - the figure the lead reads with -s
        f"\nevent -> delivery: p50 {statistics.median(latencies):.3f} s, "
        f"max {latencies[-1]:.3f} s over {len(latencies)} events"
    )


def test_down_gone_and_hanging_receivers(stack: Stack, tmp_path: Path) -> None:
    """A receiver that is down gets the message once it is up, a hanging one after it stops
    hanging (same webhook-id), and one answering 410 is disabled with an audit event and a
    warning line."""
    down_port = free_port()
    hanging = WebhookReceiver(behaviour=Behaviour.HANG, hang_seconds=5).start()
    gone = WebhookReceiver(behaviour=Behaviour.GONE).start()
    with stack.sessions.begin() as session:
        organization = make_organization(session)
        make_sandbox_account(
            session, stack.sts_url, organization=organization, role_changed_at=LONG_AGO
        )
    down_id, down_secret = _register(
        stack, organization.id, f"http://127.0.0.1:{down_port}/webhooks"
    )
    hanging_id, secret = _register(stack, organization.id, hanging.url)
    hanging.secrets.append(secret)
    gone_id, secret = _register(stack, organization.id, gone.url)
    gone.secrets.append(secret)
    env = stack.env()
    down: WebhookReceiver | None = None
    try:
        with running(worker := start_worker(env, tmp_path), start_beat(env, tmp_path)):
            wait_until(
                lambda: (
                    all(d.attempts >= 2 for d in _deliveries(stack.sessions, down_id))
                    and len(hanging.snapshot()) >= 2
                ),
                timeout=90,
                what="retries to the receivers that are down and hanging",
            )
            down = WebhookReceiver(port=down_port, secrets=[down_secret]).start()
            hanging.behaviour = Behaviour.OK
            wait_until(
                lambda: len(down.accepted_ids()) == 1 and len(hanging.accepted_ids()) == 1,
                timeout=60,
                what="both delivered",
            )
            wait_until(
                lambda: worker.events("webhook.endpoint_disabled"), timeout=30, what="log line"
            )
    finally:
        hanging.stop()
        gone.stop()
        if down is not None:
            down.stop()
    assert set(down.accepted_ids()) == _webhook_ids(stack.sessions, down_id)
    hung_ids = {r.webhook_id for r in hanging.snapshot()}
    assert hung_ids == set(hanging.accepted_ids()) == _webhook_ids(stack.sessions, hanging_id)
    assert len(gone.snapshot()) == 1
    with stack.sessions() as session:
        endpoint = session.get(WebhookEndpoint, gone_id)
        assert endpoint is not None
        assert (endpoint.enabled, endpoint.disabled_reason) == (
            False,
            "the endpoint answered 410 Gone",
        )
        disabled = session.scalars(
            select(AuditEvent).where(
                AuditEvent.event_type == AuditEventType.WEBHOOK_ENDPOINT_DISABLED
            )
        ).one()
    assert disabled.details == {"endpoint_id": str(gone_id)}
    (line,) = worker.events("webhook.endpoint_disabled")
    assert line["level"] == "warning"


def test_a_killed_worker_loses_no_message(stack: Stack, tmp_path: Path) -> None:
    """SIGKILL (the whole worker) while a delivery is in flight: once its lease expires another
    worker delivers it with the same webhook-id."""
    receiver = WebhookReceiver(behaviour=Behaviour.HANG, hang_seconds=60).start()
    with stack.sessions.begin() as session:
        organization = make_organization(session)
        make_sandbox_account(
            session, stack.sts_url, organization=organization, role_changed_at=LONG_AGO
        )
    endpoint_id, secret = _register(stack, organization.id, receiver.url)
    receiver.secrets.append(secret)
    # A read timeout longer than the test waits: the kill, not a timeout, ends the attempt. The
    # attempt's limit sets the lease (8 + 16 s) the second worker waits out.
    env = stack.env(WEBHOOK_READ_TIMEOUT_SECONDS="4", WEBHOOK_ATTEMPT_TIMEOUT_SECONDS="8")
    try:
        beat = start_beat(env, tmp_path)
        first = start_worker(env, tmp_path, name="first")
        with running(beat, first):
            wait_until(receiver.snapshot, timeout=90, what="the first attempt")
            os.killpg(first.process.pid, signal.SIGKILL)
            first.process.wait(timeout=10)
            (in_flight,) = _deliveries(stack.sessions, endpoint_id)
            assert in_flight.lease_id is not None
            assert in_flight.attempts == 0
            receiver.behaviour = Behaviour.OK
            second = start_worker(env, tmp_path, name="second")
            with running(second):
                wait_until(receiver.accepted_ids, timeout=60, what="delivery after the kill")
    finally:
        receiver.stop()
    first_attempt, *later = receiver.snapshot()
    assert receiver.accepted_ids() == {first_attempt.webhook_id: 1}
    assert first_attempt.webhook_id == in_flight.message_id
    assert later


def test_a_hanging_endpoint_delays_neither_verifications_nor_other_endpoints(
    stack: Stack, tmp_path: Path
) -> None:
    """While one organization's endpoint hangs on every request, another organization's
    accounts are verified and announced as usual."""
    hanging = WebhookReceiver(behaviour=Behaviour.HANG, hang_seconds=60).start()
    steady = WebhookReceiver().start()
    with stack.sessions.begin() as session:
        slow_org, fast_org = make_organization(session), make_organization(session)
        for _ in range(6):
            make_sandbox_account(
                session, stack.sts_url, organization=slow_org, role_changed_at=LONG_AGO
            )
        fast = [
            make_sandbox_account(
                session, stack.sts_url, organization=fast_org, role_changed_at=LONG_AGO
            ).id
            for _ in range(6)
        ]
    _, secret = _register(stack, slow_org.id, hanging.url)
    hanging.secrets.append(secret)
    _, secret = _register(stack, fast_org.id, steady.url)
    steady.secrets.append(secret)
    # Attempts to the hanging endpoint last the whole test: its threads stay busy.
    env = stack.env(
        WEBHOOK_READ_TIMEOUT_SECONDS="50",
        WEBHOOK_ATTEMPT_TIMEOUT_SECONDS="60",
        WEBHOOK_CONCURRENCY="8",
        WEBHOOK_PER_ENDPOINT_LIMIT="4",
    )
    try:
        with running(start_worker(env, tmp_path), start_beat(env, tmp_path)):
            wait_until(
                lambda: len(steady.accepted_ids()) == 6,
                timeout=90,
                what="the steady endpoint's six messages",
            )
            in_flight = len(hanging.snapshot())
            # Its hanging requests end unanswered: the worker's warm shutdown has no attempt
            # left to wait for (its read timeout is 50 s).
            hanging.stop()
    finally:
        hanging.stop()
        steady.stop()
    assert {r.payload["data"]["account"]["id"] for r in steady.accepted() if r.payload} == {
        str(i) for i in fast
    }
    # The hanging endpoint holds at most its per-endpoint share of the delivery threads.
    assert 1 <= in_flight <= 4
