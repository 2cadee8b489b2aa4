"""Delivering webhook messages to a real HTTP receiver that verifies them with `standardwebhooks`.

No Celery here: `Deliverer` holds the plain functions the delivery task runs on its threads.
"""

from __future__ import annotations

import gzip
import itertools
import random
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from pydantic import SecretStr
from sqlalchemy import select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker
from structlog.testing import capture_logs

from models import (
    AccountStatus,
    AuditEvent,
    AuditEventType,
    WebhookDelivery,
    WebhookEndpoint,
)
from sandbox.webhook_receiver import Behaviour, WebhookReceiver
from tests.factories import make_account, make_organization
from worker.settings import Settings
from worker.webhooks import create_endpoint, replay_event, rotate_secret
from worker.webhooks import runner as runner_module
from worker.webhooks.claims import (
    CLAIM_LOCK,
    DeliveryClaim,
    Message,
    claim_due_deliveries,
    lease_seconds,
)
from worker.webhooks.connections import Connections
from worker.webhooks.delivery import Deliverer
from worker.webhooks.recording import Finished, Recorded, record_attempts
from worker.webhooks.runner import Runner
from worker.webhooks.sending import (
    AttemptKind,
    AttemptResult,
    escape_snippet,
    parse_retry_after,
)
from worker.webhooks.signing import SecretBox, generate_key, generate_secret


@pytest.fixture
def settings() -> Settings:
    """Fast retries, short timeouts, loopback allowed (the receiver is on 127.0.0.1)."""
    return Settings(
        webhook_secret_key=generate_key(),
        webhook_allow_private_networks=True,
        webhook_retry_schedule_seconds=(0.2, 0.2),
        webhook_read_timeout_seconds=1.0,
        webhook_connect_timeout_seconds=1.0,
    )


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    """A receiver on a free port of 127.0.0.1."""
    with WebhookReceiver(hang_seconds=3) as running:
        yield running


@pytest.fixture
def deliverer(scratch_sessions: sessionmaker[Session], settings: Settings) -> Iterator[Deliverer]:
    """The worker's delivery steps on the scratch database."""
    connections = Connections(settings)
    yield Deliverer(
        sessions=scratch_sessions,
        settings=settings,
        box=SecretBox.from_settings(settings),
        connections=connections,
        rng=random.Random(0),
    )
    connections.close()


def _subscribe(
    sessions: sessionmaker[Session], settings: Settings, url: str, *, events: int = 1
) -> tuple[uuid.UUID, str]:
    """An endpoint for `url` and `events` status changes of one account; (endpoint id, secret)."""
    with sessions.begin() as session:
        organization = make_organization(session)
        created = create_endpoint(
            session, organization_id=organization.id, url=url, settings=settings
        )
        account = make_account(session, organization=organization, status=AccountStatus.FAILED)
        session.add_all(
            AuditEvent(
                organization_id=organization.id,
                account_id=account.id,
                event_type=AuditEventType.STATUS_CHANGED,
                actor="worker",
                from_status=AccountStatus.PENDING,
                to_status=AccountStatus.FAILED,
                reason="AccessDenied",
                details={"error_message": "denied"},
            )
            for _ in range(events)
        )
    return created.endpoint.id, created.secret


def _delivery(sessions: sessionmaker[Session], endpoint_id: uuid.UUID) -> WebhookDelivery:
    with sessions() as session:
        return session.scalars(
            select(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint_id)
        ).one()


def _endpoint(sessions: sessionmaker[Session], endpoint_id: uuid.UUID) -> WebhookEndpoint:
    with sessions() as session:
        found = session.get(WebhookEndpoint, endpoint_id)
        assert found is not None
        return found


def _make_due(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        session.execute(
            text(
                "UPDATE webhook_deliveries SET next_attempt_at = now() "
                "WHERE next_attempt_at IS NOT NULL"
            )
        )


def _failing(
    sessions: sessionmaker[Session],
    *,
    since: str,
    last: str,
    endpoint_id: uuid.UUID | None = None,
) -> None:
    """Put an endpoint (or every one) in a failing streak that began `since` ago, its last
    failure `last` ago (PostgreSQL intervals, e.g. '6 days')."""
    with sessions.begin() as session:
        session.execute(
            text(
                "UPDATE webhook_endpoints SET failing_since = now() - CAST(:since AS interval),"
                " last_failure_at = now() - CAST(:last AS interval)"
                " WHERE CAST(:id AS uuid) IS NULL OR id = CAST(:id AS uuid)"
            ),
            {"since": since, "last": last, "id": endpoint_id},
        )


def test_a_message_arrives_signed_and_is_delivered_once(
    scratch_sessions: sessionmaker[Session],
    settings: Settings,
    receiver: WebhookReceiver,
    deliverer: Deliverer,
) -> None:
    """The receiver verifies the Standard Webhooks signature; the delivery is then done."""
    endpoint_id, secret = _subscribe(scratch_sessions, settings, receiver.url)
    receiver.secrets.append(secret)
    (recorded,) = deliverer.deliver_due()
    assert recorded is not None
    assert recorded.delivered
    assert deliverer.deliver_due() == []
    delivery = _delivery(scratch_sessions, endpoint_id)
    assert receiver.accepted_ids() == {delivery.message_id: 1}
    (received,) = receiver.accepted()
    assert received.payload == delivery.payload
    assert (delivery.attempts, delivery.last_status_code, delivery.next_attempt_at) == (
        1,
        204,
        None,
    )
    assert delivery.delivered_at is not None


def test_a_failing_receiver_gets_the_same_message_again_later(
    scratch_sessions: sessionmaker[Session],
    settings: Settings,
    receiver: WebhookReceiver,
    deliverer: Deliverer,
) -> None:
    """A 500 schedules the next attempt by the schedule (with jitter); it carries the same
    webhook-id and a fresh signature."""
    endpoint_id, secret = _subscribe(scratch_sessions, settings, receiver.url)
    receiver.secrets.append(secret)
    receiver.behaviour = Behaviour.ERROR
    # A retry 3 s away (not the fixture's 0.2 s), so "not due yet" holds on a loaded machine.
    deliverer.settings = settings.model_copy(update={"webhook_retry_schedule_seconds": (3.0, 3.0)})
    with capture_logs() as logs:
        (recorded,) = deliverer.deliver_due()
    returned = time.monotonic()
    assert recorded is not None
    assert recorded.result.status_code == 500
    assert recorded.next_attempt_in is not None
    assert 2.7 <= recorded.next_attempt_in <= 3.3
    assert [entry["event"] for entry in logs] == ["webhook.attempt_failed"]
    assert deliverer.deliver_due() == []  # not due yet
    receiver.behaviour = Behaviour.OK
    time.sleep(max(0.0, returned + recorded.next_attempt_in + 0.1 - time.monotonic()))
    (recorded,) = deliverer.deliver_due()
    assert recorded is not None
    assert recorded.delivered
    first, second = receiver.snapshot()
    assert (
        first.webhook_id == second.webhook_id == _delivery(scratch_sessions, endpoint_id).message_id
    )
    assert (first.answered, second.answered) == (500, 204)
    assert _endpoint(scratch_sessions, endpoint_id).failing_since is None


def test_a_delivery_is_given_up_after_the_last_retry(
    scratch_sessions: sessionmaker[Session],
    settings: Settings,
    receiver: WebhookReceiver,
    deliverer: Deliverer,
) -> None:
    """One attempt plus one per schedule entry, then given up with a warning."""
    endpoint_id, secret = _subscribe(scratch_sessions, settings, receiver.url)
    receiver.secrets.append(secret)
    receiver.behaviour = Behaviour.ERROR
    with capture_logs() as logs:
        for _ in range(3):
            _make_due(scratch_sessions)
            deliverer.deliver_due()
    _make_due(scratch_sessions)
    assert deliverer.deliver_due() == []
    delivery = _delivery(scratch_sessions, endpoint_id)
    assert (delivery.attempts, delivery.next_attempt_at) == (3, None)
    assert delivery.given_up_at is not None
    assert len(receiver.snapshot()) == 3
    assert [e["log_level"] for e in logs if e["event"] == "webhook.given_up"] == ["warning"]


def test_410_gone_disables_the_endpoint(
    scratch_sessions: sessionmaker[Session],
    settings: Settings,
    receiver: WebhookReceiver,
    deliverer: Deliverer,
) -> None:
    """The receiver's 410 disables its endpoint, gives up the rest and audits it."""
    endpoint_id, secret = _subscribe(scratch_sessions, settings, receiver.url, events=3)
    receiver.secrets.append(secret)
    receiver.behaviour = Behaviour.GONE
    claim_limit = settings.model_copy(update={"webhook_batch_size": 1})
    deliverer.settings = claim_limit
    with capture_logs() as logs:
        (recorded,) = deliverer.deliver_due()
    assert recorded is not None
    assert (recorded.result.kind, recorded.endpoint_disabled) == (AttemptKind.GONE, True)
    endpoint = _endpoint(scratch_sessions, endpoint_id)
    assert (endpoint.enabled, endpoint.disabled_reason) == (False, "the endpoint answered 410 Gone")
    deliverer.settings = settings
    assert deliverer.deliver_due() == []
    assert len(receiver.snapshot()) == 1
    with scratch_sessions() as session:
        disabled = session.scalars(
            select(AuditEvent).where(
                AuditEvent.event_type == AuditEventType.WEBHOOK_ENDPOINT_DISABLED
            )
        ).one()
    assert disabled.details == {"endpoint_id": str(endpoint_id)}
    assert [e["log_level"] for e in logs if e["event"] == "webhook.endpoint_disabled"] == [
        "warning"
    ]


def test_an_endpoint_failing_for_days_is_disabled(
    scratch_sessions: sessionmaker[Session],
    settings: Settings,
    receiver: WebhookReceiver,
    deliverer: Deliverer,
) -> None:
    """A failure when nothing succeeded for WEBHOOK_DISABLE_AFTER_SECONDS disables the endpoint."""
    endpoint_id, secret = _subscribe(scratch_sessions, settings, receiver.url)
    receiver.secrets.append(secret)
    receiver.behaviour = Behaviour.ERROR
    _failing(scratch_sessions, since="6 days", last="10 seconds", endpoint_id=endpoint_id)
    (recorded,) = deliverer.deliver_due()
    assert recorded is not None
    assert recorded.endpoint_disabled
    endpoint = _endpoint(scratch_sessions, endpoint_id)
    assert (endpoint.enabled, endpoint.disabled_reason) == (
        False,
        "no delivery succeeded for 5 days",
    )


def test_retry_after_is_honoured(
    scratch_sessions: sessionmaker[Session],
    settings: Settings,
    receiver: WebhookReceiver,
    deliverer: Deliverer,
) -> None:
    """A 429 with Retry-After: 30 waits 30 s, not the schedule's 0.2 s."""
    _subscribe(scratch_sessions, settings, receiver.url)
    receiver.behaviour = Behaviour.THROTTLE
    receiver.retry_after = "30"
    (recorded,) = deliverer.deliver_due()
    assert recorded is not None
    assert recorded.result.status_code == 429
    assert recorded.next_attempt_in == 30.0


def test_a_hanging_receiver_times_out(
    scratch_sessions: sessionmaker[Session],
    settings: Settings,
    receiver: WebhookReceiver,
    deliverer: Deliverer,
) -> None:
    """No answer within the read timeout is a failed attempt, retried later."""
    endpoint_id, _ = _subscribe(scratch_sessions, settings, receiver.url)
    receiver.behaviour = Behaviour.HANG
    receiver.hang_seconds = 10
    started = time.monotonic()
    (recorded,) = deliverer.deliver_due()
    assert time.monotonic() - started < 6  # the read timeout (1 s), not the 10 s hang
    assert recorded is not None
    assert recorded.result.kind is AttemptKind.FAILED
    assert recorded.result.error == "timeout: ReadTimeout"
    assert _delivery(scratch_sessions, endpoint_id).next_attempt_at is not None


def test_rotation_signs_with_both_secrets_during_the_grace_period(
    scratch_sessions: sessionmaker[Session],
    settings: Settings,
    receiver: WebhookReceiver,
    deliverer: Deliverer,
) -> None:
    """After a rotation a receiver that knows only the old secret, or only the new one, verifies."""
    endpoint_id, old = _subscribe(scratch_sessions, settings, receiver.url, events=2)
    with scratch_sessions.begin() as session:
        organization_id = _endpoint(scratch_sessions, endpoint_id).organization_id
        new = rotate_secret(
            session, endpoint_id, organization_id=organization_id, settings=settings
        )
    deliverer.settings = settings.model_copy(update={"webhook_batch_size": 1})
    receiver.secrets[:] = [old]
    deliverer.deliver_due()
    receiver.secrets[:] = [new]
    deliverer.deliver_due()
    assert [r.verified for r in receiver.snapshot()] == [True, True]
    receiver.secrets[:] = [generate_secret()]  # any other secret fails
    with scratch_sessions.begin() as session:
        session.execute(
            text("UPDATE webhook_deliveries SET next_attempt_at = now(), delivered_at = NULL")
        )
    deliverer.deliver_due()
    assert receiver.snapshot()[-1].verified is False


def test_an_address_that_became_private_is_not_connected_to(
    scratch_sessions: sessionmaker[Session],
    settings: Settings,
    receiver: WebhookReceiver,
    deliverer: Deliverer,
) -> None:
    """The check runs at every attempt on what the name resolves to then: `localhost` (a name
    that now resolves to loopback) is refused without a connection."""
    endpoint_id, secret = _subscribe(scratch_sessions, settings, receiver.url)
    receiver.secrets.append(secret)
    with scratch_sessions.begin() as session:
        session.execute(
            text("UPDATE webhook_endpoints SET url = :url WHERE id = :id"),
            {"url": f"https://localhost:{receiver.port}/webhooks", "id": endpoint_id},
        )
    deliverer.settings = settings.model_copy(update={"webhook_allow_private_networks": False})
    (recorded,) = deliverer.deliver_due()
    assert recorded is not None
    assert recorded.result.kind is AttemptKind.REFUSED
    assert "loopback" in (recorded.result.error or "")
    assert receiver.snapshot() == []


def test_the_connection_goes_to_the_address_that_was_checked(
    scratch_sessions: sessionmaker[Session],
    settings: Settings,
    receiver: WebhookReceiver,
    deliverer: Deliverer,
) -> None:
    """The request is sent to the address resolved and checked for this attempt (the host name
    only in the Host header), so a second DNS answer cannot redirect it: here a name no DNS
    knows reaches the receiver through the checked 127.0.0.1."""
    endpoint_id, secret = _subscribe(scratch_sessions, settings, receiver.url)
    receiver.secrets.append(secret)
    with scratch_sessions.begin() as session:
        session.execute(
            text("UPDATE webhook_endpoints SET url = :url WHERE id = :id"),
            {"url": f"http://hooks.invalid:{receiver.port}/webhooks", "id": endpoint_id},
        )
    deliverer.resolver = lambda host, port: ["127.0.0.1"] if host == "hooks.invalid" else []
    (recorded,) = deliverer.deliver_due()
    assert recorded is not None
    assert recorded.delivered
    (received,) = receiver.snapshot()
    assert (received.host, received.verified) == (f"hooks.invalid:{receiver.port}", True)


def test_claims_take_a_few_deliveries_per_endpoint_counting_those_in_flight(
    scratch_sessions: sessionmaker[Session], settings: Settings
) -> None:
    """A backlog on one endpoint never fills a claim: at most `per_endpoint` in flight each,
    counting the leases of earlier claims."""
    busy, _ = _subscribe(scratch_sessions, settings, "https://93.184.215.14/a", events=6)
    quiet, _ = _subscribe(scratch_sessions, settings, "https://93.184.215.14/b", events=1)
    with scratch_sessions.begin() as session:
        first = claim_due_deliveries(session, limit=100, per_endpoint=2, lease_seconds=60)
    with scratch_sessions.begin() as session:
        second = claim_due_deliveries(session, limit=100, per_endpoint=2, lease_seconds=60)
    assert sorted(m.endpoint_id == busy for m in first.messages) == [False, True, True]
    assert quiet in {m.endpoint_id for m in first.messages}
    assert second.messages == []


def _waiting_for_locks(
    sessions: sessionmaker[Session], *, advisory: bool, sessions_waiting: int = 1, timeout: float
) -> bool:
    """Whether `sessions_waiting` sessions of the database wait for a lock within `timeout`
    seconds: an advisory lock (the claims'), or else a row's."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with sessions() as session:
            waiting = session.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                    " AND (wait_event = 'advisory') = :advisory"
                ),
                {"advisory": advisory},
            )
        if waiting >= sessions_waiting:
            return True
        time.sleep(0.02)
    return False


def test_a_claim_waits_for_another_process_claim_and_counts_its_leases(
    scratch_sessions: sessionmaker[Session], settings: Settings
) -> None:
    """Two processes claiming at the same moment: the second claim waits for the first one's
    transaction, then counts its leases — it takes the next due deliveries within the endpoint's
    limit, instead of the same candidates (skipped, locked: an empty claim) or, under churn,
    more than the limit."""
    busy, _ = _subscribe(scratch_sessions, settings, "https://93.184.215.14/a", events=6)
    quiet, _ = _subscribe(scratch_sessions, settings, "https://93.184.215.14/b", events=1)

    def claim_elsewhere() -> DeliveryClaim:
        with scratch_sessions.begin() as session:
            return claim_due_deliveries(session, limit=2, per_endpoint=3, lease_seconds=60)

    with ThreadPoolExecutor(1) as pool:
        with scratch_sessions.begin() as session:
            first = claim_due_deliveries(session, limit=2, per_endpoint=3, lease_seconds=60)
            elsewhere = pool.submit(claim_elsewhere)
            waited = _waiting_for_locks(scratch_sessions, advisory=True, timeout=5)
        second = elsewhere.result(timeout=30)
    assert [m.endpoint_id for m in first.messages] == [busy, busy]
    # busy has one free slot left of 3; quiet's delivery is the next due.
    assert sorted(str(m.endpoint_id) for m in second.messages) == sorted([str(busy), str(quiet)])
    assert set(first.delivery_ids).isdisjoint(second.delivery_ids)
    assert waited


def test_response_text_is_cut_and_escaped() -> None:
    """A receiver's body is kept as a short snippet with control characters escaped."""
    assert escape_snippet("ok\x1b[31m\nred") == "ok\\x1b[31m\\nred"
    assert len(escape_snippet("x" * 5000)) == 201


def test_retry_after_reads_seconds_and_dates() -> None:
    """Seconds and HTTP dates are understood and capped at a day; nonsense is ignored."""
    now = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    assert parse_retry_after("120", now=now) == 120.0
    assert parse_retry_after("Tue, 01 Dec 2026 12:01:00 GMT", now=now) == 60.0
    assert parse_retry_after("99999999", now=now) == 86400.0
    assert parse_retry_after("soon", now=now) is None
    assert parse_retry_after("\N{SUPERSCRIPT TWO}", now=now) is None
    assert parse_retry_after("\N{ARABIC-INDIC DIGIT THREE}0", now=now) is None


def test_redirects_are_not_followed(
    scratch_sessions: sessionmaker[Session],
    settings: Settings,
    receiver: WebhookReceiver,
    deliverer: Deliverer,
) -> None:
    """A 3xx (here to the metadata service) is a failed attempt; the Location is not requested."""
    _subscribe(scratch_sessions, settings, receiver.url)
    receiver.behaviour = Behaviour.REDIRECT
    (recorded,) = deliverer.deliver_due()
    assert recorded is not None
    assert (recorded.result.kind, recorded.result.status_code) == (AttemptKind.FAILED, 302)
    assert len(receiver.snapshot()) == 1


def test_a_receiver_trickling_its_answer_is_cut_off_at_the_attempt_limit(
    scratch_sessions: sessionmaker[Session], settings: Settings, deliverer: Deliverer
) -> None:
    """A server sending a header byte every 0.2 s never trips the read timeout (5 s here, so a
    loaded machine's pauses do not trip it either); the attempt's hard limit (2 s) ends it
    anyway, well inside the delivery's lease."""
    deliverer.settings = settings.model_copy(
        update={"webhook_attempt_timeout_seconds": 2.0, "webhook_read_timeout_seconds": 5.0}
    )
    assert lease_seconds(deliverer.settings) > 2.0
    deliverer.connections = Connections(deliverer.settings)
    try:
        with WebhookReceiver(behaviour=Behaviour.TRICKLE, hang_seconds=20) as trickling:
            endpoint_id, _ = _subscribe(scratch_sessions, settings, trickling.url)
            started = time.monotonic()
            (recorded,) = deliverer.deliver_due()
            took = time.monotonic() - started
    finally:
        deliverer.connections.close()
    assert took < 10, f"the attempt took {took:.1f} s"
    assert recorded is not None
    assert recorded.result.kind is AttemptKind.FAILED
    assert recorded.result.error == "timeout: the attempt took longer than 2 s"
    delivery = _delivery(scratch_sessions, endpoint_id)
    assert (delivery.attempts, delivery.last_error) == (1, recorded.result.error)


def test_connections_are_not_reused_across_host_names(
    scratch_sessions: sessionmaker[Session], settings: Settings, deliverer: Deliverer
) -> None:
    """Two endpoints whose names resolve to one address get a connection each: a keep-alive
    connection made for one host (pooled by IP address) never carries the other's message."""
    with WebhookReceiver(keep_alive=True) as shared:
        first, secret_a = _subscribe(scratch_sessions, settings, shared.url)
        second, secret_b = _subscribe(scratch_sessions, settings, shared.url)
        shared.secrets.extend([secret_a, secret_b])
        with scratch_sessions.begin() as session:
            for endpoint_id, name in ((first, "a.invalid"), (second, "b.invalid")):
                session.execute(
                    text("UPDATE webhook_endpoints SET url = :url WHERE id = :id"),
                    {"url": f"http://{name}:{shared.port}/webhooks", "id": endpoint_id},
                )
        deliverer.resolver = lambda host, port: ["127.0.0.1"]
        recorded = deliverer.deliver_due()
        received = shared.snapshot()
    assert [r is not None and r.delivered for r in recorded] == [True, True]
    assert sorted(r.host.split(":")[0] for r in received) == ["a.invalid", "b.invalid"]
    assert received[0].peer_port != received[1].peer_port


def test_an_undecryptable_secret_disables_only_its_endpoint(
    scratch_sessions: sessionmaker[Session],
    settings: Settings,
    receiver: WebhookReceiver,
    deliverer: Deliverer,
) -> None:
    """A secret stored under a key the worker no longer has fails and disables its own endpoint
    ("secret unreadable"); the claim and every other endpoint's delivery go on."""
    old_key = settings.model_copy(update={"webhook_secret_key": SecretStr(generate_key())})
    lost, _ = _subscribe(scratch_sessions, old_key, receiver.url)
    fine, secret = _subscribe(scratch_sessions, settings, receiver.url)
    receiver.secrets.append(secret)
    with capture_logs() as logs:
        recorded = deliverer.deliver_due()
    outcomes = {r.result.kind: r.endpoint_disabled for r in recorded if r is not None}
    assert outcomes == {AttemptKind.DELIVERED: False, AttemptKind.UNSIGNABLE: True}
    assert _endpoint(scratch_sessions, lost).disabled_reason == "secret unreadable"
    assert _endpoint(scratch_sessions, fine).enabled
    assert _delivery(scratch_sessions, lost).given_up_at is not None
    assert receiver.accepted_ids() == {_delivery(scratch_sessions, fine).message_id: 1}
    assert [e["reason"] for e in logs if e["event"] == "webhook.endpoint_disabled"] == [
        "secret unreadable"
    ]


def test_secrets_stored_under_a_previous_key_still_sign(
    scratch_sessions: sessionmaker[Session],
    settings: Settings,
    receiver: WebhookReceiver,
    deliverer: Deliverer,
) -> None:
    """After the key changes, WEBHOOK_PREVIOUS_SECRET_KEYS decrypts the secrets stored before;
    rotating then stores the secrets under the new key."""
    old_settings = settings.model_copy(update={"webhook_secret_key": SecretStr(generate_key())})
    assert old_settings.webhook_secret_key is not None
    endpoint_id, secret = _subscribe(scratch_sessions, old_settings, receiver.url)
    receiver.secrets.append(secret)
    both = settings.model_copy(
        update={
            "webhook_previous_secret_keys": SecretStr(
                f"{generate_key()},{old_settings.webhook_secret_key.get_secret_value()}"
            )
        }
    )
    deliverer.box = SecretBox.from_settings(both)
    (recorded,) = deliverer.deliver_due()
    assert recorded is not None
    assert recorded.delivered
    organization_id = _endpoint(scratch_sessions, endpoint_id).organization_id
    with scratch_sessions.begin() as session:
        rotate_secret(session, endpoint_id, organization_id=organization_id, settings=both)
    endpoint = _endpoint(scratch_sessions, endpoint_id)
    new_key_only = SecretBox.from_settings(settings)
    new_key_only.decrypt(endpoint.secret_encrypted)
    assert endpoint.previous_secret_encrypted is not None
    assert new_key_only.decrypt(endpoint.previous_secret_encrypted) == secret


def test_rotating_an_unreadable_secret_keeps_no_previous_secret(
    scratch_sessions: sessionmaker[Session], settings: Settings, receiver: WebhookReceiver
) -> None:
    """The old secret, undecryptable with every configured key, is dropped: it could never
    sign, and keeping it would fail every attempt of the grace period."""
    old_key = settings.model_copy(update={"webhook_secret_key": SecretStr(generate_key())})
    endpoint_id, _ = _subscribe(scratch_sessions, old_key, receiver.url)
    organization_id = _endpoint(scratch_sessions, endpoint_id).organization_id
    with scratch_sessions.begin() as session:
        new = rotate_secret(
            session, endpoint_id, organization_id=organization_id, settings=settings
        )
    endpoint = _endpoint(scratch_sessions, endpoint_id)
    assert (endpoint.previous_secret_encrypted, endpoint.previous_secret_expires_at) == (None, None)
    assert SecretBox.from_settings(settings).decrypt(endpoint.secret_encrypted) == new


def test_a_retry_after_with_a_non_ascii_digit_is_a_recorded_failure(
    scratch_sessions: sessionmaker[Session],
    settings: Settings,
    receiver: WebhookReceiver,
    deliverer: Deliverer,
) -> None:
    """`Retry-After: ²` ("²".isdigit() is True, float() refuses it) is ignored: the attempt is
    recorded as a 429 on the normal schedule, not lost to an exception."""
    endpoint_id, _ = _subscribe(scratch_sessions, settings, receiver.url)
    receiver.behaviour = Behaviour.THROTTLE
    receiver.retry_after = "\N{SUPERSCRIPT TWO}"
    (recorded,) = deliverer.deliver_due()
    assert recorded is not None
    assert (recorded.result.status_code, recorded.result.retry_after_seconds) == (429, None)
    assert _delivery(scratch_sessions, endpoint_id).attempts == 1


def test_any_error_of_an_attempt_is_recorded_as_a_failure(
    scratch_sessions: sessionmaker[Session],
    settings: Settings,
    receiver: WebhookReceiver,
    deliverer: Deliverer,
) -> None:
    """An exception nobody foresaw inside the attempt (here from name resolution) becomes a
    failed attempt with its type, retried on the schedule, instead of an unrecorded crash."""
    endpoint_id, _ = _subscribe(scratch_sessions, settings, receiver.url)
    with scratch_sessions.begin() as session:
        session.execute(
            text("UPDATE webhook_endpoints SET url = :url WHERE id = :id"),
            {"url": f"http://hooks.invalid:{receiver.port}/webhooks", "id": endpoint_id},
        )

    def broken(host: str, port: int) -> list[str]:
        raise RuntimeError("resolver exploded")

    deliverer.resolver = broken
    with capture_logs() as logs:
        (recorded,) = deliverer.deliver_due()
    assert recorded is not None
    assert recorded.result.kind is AttemptKind.FAILED
    assert recorded.result.error == "internal error (RuntimeError)"
    assert recorded.next_attempt_in is not None
    assert "webhook.attempt_error" in [e["event"] for e in logs]


def test_a_compressed_answer_is_not_inflated(
    scratch_sessions: sessionmaker[Session],
    settings: Settings,
    receiver: WebhookReceiver,
    deliverer: Deliverer,
) -> None:
    """The request asks for `identity`; a gzip answer anyway is counted and kept as raw bytes,
    never decompressed (a small body can inflate to gigabytes)."""
    _subscribe(scratch_sessions, settings, receiver.url)
    receiver.behaviour = Behaviour.ERROR
    receiver.error_body = gzip.compress(b"A" * 1_000_000)
    receiver.error_encoding = "gzip"
    (recorded,) = deliverer.deliver_due()
    assert recorded is not None
    assert recorded.result.status_code == 500
    assert "AAAA" not in (recorded.result.error or "")
    assert [r.accept_encoding for r in receiver.snapshot()] == ["identity"]


def test_a_failure_long_after_the_last_one_starts_a_new_streak(
    scratch_sessions: sessionmaker[Session],
    settings: Settings,
    receiver: WebhookReceiver,
    deliverer: Deliverer,
) -> None:
    """An endpoint whose last failure was days ago (no events since) is not "failing for six
    days" at its next failure: the streak restarts instead of disabling it."""
    endpoint_id, _ = _subscribe(scratch_sessions, settings, receiver.url)
    receiver.behaviour = Behaviour.ERROR
    _failing(scratch_sessions, since="6 days", last="3 days", endpoint_id=endpoint_id)
    (recorded,) = deliverer.deliver_due()
    assert recorded is not None
    assert not recorded.endpoint_disabled
    endpoint = _endpoint(scratch_sessions, endpoint_id)
    assert endpoint.enabled
    assert endpoint.failing_since is not None
    assert endpoint.last_failure_at is not None
    assert endpoint.last_failure_at - endpoint.failing_since < timedelta(seconds=1)


def test_a_message_repr_shows_no_secret(
    scratch_sessions: sessionmaker[Session], settings: Settings
) -> None:
    """A message in a traceback or log line never carries its (encrypted) secrets."""
    _subscribe(scratch_sessions, settings, "https://93.184.215.14/a")
    with scratch_sessions.begin() as session:
        (message,) = claim_due_deliveries(
            session, limit=10, per_endpoint=10, lease_seconds=60
        ).messages
    assert message.stored_secrets
    assert all(repr(s) not in repr(message) for s in message.stored_secrets)
    assert "secret" not in repr(message)


def test_a_replay_of_a_delivery_in_flight_is_not_lost(
    scratch_sessions: sessionmaker[Session],
    settings: Settings,
    receiver: WebhookReceiver,
    deliverer: Deliverer,
) -> None:
    """Replaying a leased delivery takes the lease away: the attempt in flight records nothing
    (logged as a lost lease) and the replay is claimable at once."""
    endpoint_id, secret = _subscribe(scratch_sessions, settings, receiver.url)
    receiver.secrets.append(secret)
    claim = deliverer.claim(10)
    (message,) = claim.messages
    with scratch_sessions.begin() as session:
        event_id = session.scalar(text("SELECT max(id) FROM audit_events"))
        assert event_id is not None
        replay_event(session, event_id, organization_id=message.organization_id)
    with capture_logs() as logs:
        assert deliverer.deliver(message, claim.lease_id) is None
    assert [e["event"] for e in logs] == ["webhook.lease_lost"]
    (again,) = deliverer.deliver_due()
    assert again is not None
    assert again.delivered
    assert _delivery(scratch_sessions, endpoint_id).attempts == 1


def test_a_batch_of_results_is_recorded_in_one_statement(
    scratch_sessions: sessionmaker[Session],
    settings: Settings,
    deliverer: Deliverer,
) -> None:
    """Results of several endpoints are written together; one whose lease was lost is left
    alone; per endpoint, a success after a failure in the same batch ends the failing streak,
    a failure after a success starts a new one."""
    healed, _ = _subscribe(scratch_sessions, settings, "http://127.0.0.1:9/a", events=2)
    broken, _ = _subscribe(scratch_sessions, settings, "http://127.0.0.1:9/b", events=2)
    _failing(scratch_sessions, since="3 days", last="1 minute")
    claim = deliverer.claim(10)
    by_endpoint: dict[uuid.UUID, list[Message]] = {}
    for message in claim.messages:
        by_endpoint.setdefault(message.endpoint_id, []).append(message)
    failed = AttemptResult(AttemptKind.FAILED, status_code=500, error="boom")
    ok = AttemptResult(AttemptKind.DELIVERED, status_code=204)
    first_healed, second_healed = by_endpoint[healed]
    first_broken, second_broken = by_endpoint[broken]
    with scratch_sessions.begin() as session:  # a replay takes one lease away
        session.execute(
            text("UPDATE webhook_deliveries SET lease_id = gen_random_uuid() WHERE id = :id"),
            {"id": second_broken.delivery_id},
        )
    with capture_logs() as logs:
        recorded = deliverer.record(
            [
                Finished(first_healed, claim.lease_id, failed),
                Finished(first_broken, claim.lease_id, ok),
                Finished(second_healed, claim.lease_id, ok),
                Finished(second_broken, claim.lease_id, failed),
            ]
        )
    assert [r is not None and r.delivered for r in recorded] == [False, True, True, False]
    assert recorded[3] is None
    assert [e["event"] for e in logs].count("webhook.lease_lost") == 1
    assert _endpoint(scratch_sessions, healed).failing_since is None
    # broken's only recorded result was a success: its streak ended too.
    assert _endpoint(scratch_sessions, broken).failing_since is None
    with scratch_sessions() as session:
        attempts: dict[uuid.UUID, int] = dict(
            session.execute(
                text("SELECT id, attempts FROM webhook_deliveries WHERE lease_id IS NULL")
            ).all()
        )
    assert attempts == {
        first_healed.delivery_id: 1,
        second_healed.delivery_id: 1,
        first_broken.delivery_id: 1,
    }
    # A failure after a success in one batch starts a new streak (now), not the old one.
    _make_due(scratch_sessions)
    _failing(scratch_sessions, since="3 days", last="1 minute", endpoint_id=healed)
    with scratch_sessions.begin() as session:
        session.execute(
            text(
                "UPDATE webhook_deliveries SET next_attempt_at = now(), delivered_at = NULL"
                " WHERE endpoint_id = :id"
            ),
            {"id": healed},
        )
    claim = deliverer.claim(10)
    first, second = [m for m in claim.messages if m.endpoint_id == healed]
    deliverer.record(
        [Finished(first, claim.lease_id, ok), Finished(second, claim.lease_id, failed)]
    )
    streak = _endpoint(scratch_sessions, healed).failing_since
    assert streak is not None
    assert streak > datetime.now(UTC) - timedelta(minutes=1)


def test_two_processes_batches_of_the_same_endpoints_do_not_deadlock(
    scratch_sessions: sessionmaker[Session],
    settings: Settings,
    deliverer: Deliverer,
) -> None:
    """Two processes' recorders write batches of the same endpoints at once, their planners
    having chosen different joins: a nested loop (the endpoints in id order) and a hash join
    over a scan of the table (its physical order). Each batch locks its endpoints in id order
    whatever the plan, so neither waits for the other's locks in the opposite order: no
    deadlock, both batches written."""
    endpoints = sorted(
        _subscribe(scratch_sessions, settings, f"https://93.184.215.14/{n}", events=2)[0]
        for n in range(4)
    )
    first = endpoints[0]
    with scratch_sessions.begin() as session:
        # A new version of the first endpoint's row: now last in the table's physical order.
        session.execute(
            text("UPDATE webhook_endpoints SET description = 'moved' WHERE id = :id"),
            {"id": first},
        )
    claim = deliverer.claim(100)
    by_endpoint: dict[uuid.UUID, list[Message]] = {}
    for message in claim.messages:
        by_endpoint.setdefault(message.endpoint_id, []).append(message)
    failed = AttemptResult(AttemptKind.FAILED, status_code=500, error="boom")
    batches = [
        [Finished(by_endpoint[e][n], claim.lease_id, failed) for e in endpoints] for n in (0, 1)
    ]

    def record(batch: list[Finished], plan: str) -> None:
        with scratch_sessions.begin() as session:
            session.execute(text(plan))
            record_attempts(session, batch, settings=settings, rng=random.Random(0))

    with ThreadPoolExecutor(2) as pool, scratch_sessions() as holder:
        # A third transaction holds the first endpoint, so that both batches are under way
        # at once: the first waits for it, then the second.
        holder.execute(
            text("SELECT 1 FROM webhook_endpoints WHERE id = :id FOR NO KEY UPDATE"),
            {"id": first},
        )
        nested = pool.submit(record, batches[0], "SET LOCAL enable_hashjoin = off")
        assert _waiting_for_locks(scratch_sessions, advisory=False, timeout=10)
        hashed = pool.submit(record, batches[1], "SET LOCAL enable_nestloop = off")
        assert _waiting_for_locks(scratch_sessions, advisory=False, sessions_waiting=2, timeout=10)
        holder.commit()
        nested.result(timeout=30)
        hashed.result(timeout=30)
    with scratch_sessions() as session:
        attempts = session.scalars(text("SELECT attempts FROM webhook_deliveries")).all()
    assert attempts == [1] * 8


def test_a_warm_shutdown_records_the_attempts_in_flight(
    scratch_sessions: sessionmaker[Session],
    settings: Settings,
    deliverer: Deliverer,
) -> None:
    """Draining stops claiming, waits for the attempts in flight and records them."""
    slow = WebhookReceiver(behaviour=Behaviour.HANG, hang_seconds=0.5).start()
    try:
        endpoint_id, _ = _subscribe(scratch_sessions, settings, slow.url)
        runner = Runner(deliverer)
        assert runner.claim_and_submit() == 1
        runner.drain()
        assert runner.claim_and_submit() == 0
    finally:
        slow.stop()
    delivery = _delivery(scratch_sessions, endpoint_id)
    assert (delivery.attempts, delivery.lease_id) == (1, None)
    assert delivery.last_error is not None


def test_results_are_recorded_while_a_claim_waits(
    scratch_sessions: sessionmaker[Session],
    settings: Settings,
    deliverer: Deliverer,
) -> None:
    """The recorder writes results while a claim waits (here for another process's claim; or
    a slow database): a result waiting behind a claim could outlive its lease and be sent
    again."""
    quick = WebhookReceiver(behaviour=Behaviour.HANG, hang_seconds=0.3).start()
    slow = WebhookReceiver(behaviour=Behaviour.HANG, hang_seconds=3).start()
    try:
        _subscribe(scratch_sessions, settings, quick.url)
        slow_endpoint, _ = _subscribe(scratch_sessions, settings, slow.url)
        runner = Runner(deliverer)
        assert runner.claim_and_submit() == 2
        with scratch_sessions.begin() as other:
            other.execute(CLAIM_LOCK)  # another process's claim, in progress
            # quick's result (hung up on after 0.3 s) is recorded; the claim after it waits.
            assert _waiting_for_locks(scratch_sessions, advisory=True, timeout=10)
            # slow's attempt times out after 1 s: its result is recorded all the same.
            deadline = time.monotonic() + 5
            while _delivery(scratch_sessions, slow_endpoint).attempts == 0:
                assert time.monotonic() < deadline, "the result waits behind the claim"
                time.sleep(0.05)
        runner.drain()
    finally:
        quick.stop()
        slow.stop()


@pytest.mark.parametrize(("wait", "batches"), [(3.0, [3]), (0.5, [2, 1])])
def test_results_of_attempts_ending_together_are_recorded_together(
    scratch_sessions: sessionmaker[Session],
    deliverer: Deliverer,
    receiver: WebhookReceiver,
    monkeypatch: pytest.MonkeyPatch,
    *,
    wait: float,
    batches: list[int],
) -> None:
    """A finished attempt's result waits (up to _RECORD_WAIT_SECONDS) for those of the attempts
    still running: a claim's attempts are recorded in one statement. Here two answer at once and
    one fails after about 0.9 s (hung up on, or the fixture's 1 s read timeout): one batch when
    the wait covers it, two when it does not. The gaps are wide enough for a loaded machine."""
    monkeypatch.setattr(runner_module, "_RECORD_WAIT_SECONDS", wait)
    slow = WebhookReceiver(behaviour=Behaviour.HANG, hang_seconds=0.9).start()
    sizes: list[int] = []
    record = deliverer.record

    def counting(finished: list[Finished]) -> list[Recorded | None]:
        sizes.append(len(finished))
        return record(finished)

    monkeypatch.setattr(deliverer, "record", counting)
    try:
        _subscribe(scratch_sessions, deliverer.settings, receiver.url, events=2)
        _subscribe(scratch_sessions, deliverer.settings, slow.url)
        runner = Runner(deliverer)
        assert runner.claim_and_submit() == 3
        runner.drain()
    finally:
        slow.stop()
    assert sizes == batches


def test_a_batch_written_while_the_database_is_away_is_written_again(
    scratch_sessions: sessionmaker[Session],
    settings: Settings,
    deliverer: Deliverer,
    receiver: WebhookReceiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The recorder's write meets a connection the database dropped (a restart, a failover):
    it is made again on a fresh one, not left to the leases (which would send it again)."""
    endpoint_id, secret = _subscribe(scratch_sessions, settings, receiver.url)
    receiver.secrets.append(secret)
    record = deliverer.record
    calls: list[int] = []

    def dropped_once(batch: list[Finished]) -> list[Recorded | None]:
        calls.append(len(batch))
        if len(calls) == 1:
            raise OperationalError("UPDATE ...", None, psycopg.OperationalError("server closed"))
        return record(batch)

    monkeypatch.setattr(deliverer, "record", dropped_once)
    runner = Runner(deliverer)
    assert runner.claim_and_submit() == 1
    runner.drain()
    assert calls == [1, 1]
    delivery = _delivery(scratch_sessions, endpoint_id)
    assert (delivery.attempts, delivery.lease_id) == (1, None)
    assert delivery.delivered_at is not None
    assert len(receiver.accepted_ids()) == 1


def test_claims_are_paced_and_a_first_wish_is_served_at_once(
    deliverer: Deliverer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The claimer claims at most once per CLAIM_INTERVAL_SECONDS however often it is asked
    (each notification, each recorded batch): every wish made meanwhile is served by its next
    claim. After a quiet spell, a wish is served at once."""
    # An interval of a second, so that "at once" (under half of it) and "paced" (at least all
    # of it) stay apart even when a loaded machine wakes the claimer thread late.
    interval = 1.0
    monkeypatch.setattr(runner_module, "CLAIM_INTERVAL_SECONDS", interval)
    claims: list[float] = []

    def counting() -> int:
        claims.append(time.monotonic())
        return 0

    runner = Runner(deliverer)
    monkeypatch.setattr(runner, "claim_and_submit", counting)
    asked = time.monotonic()
    runner.want_claim()
    deadline = asked + 5
    while not claims:
        assert time.monotonic() < deadline, "the first wish was never served"
        time.sleep(0.005)
    assert claims[0] - asked < interval / 2  # at once, not after an interval
    until = time.monotonic() + 3 * interval
    while time.monotonic() < until:  # a wish every 5 ms for three intervals
        runner.want_claim()
        time.sleep(0.005)
    deadline = until + 10
    while claims[-1] < until - 0.05:  # the last wish is served
        assert time.monotonic() < deadline, f"the last interval's wishes were not served: {claims}"
        time.sleep(0.01)
    runner.drain()
    gaps = [later - earlier for earlier, later in itertools.pairwise(claims)]
    assert 3 <= len(claims) <= 5, claims  # about one per interval, not 600
    assert min(gaps) >= interval - 0.01
