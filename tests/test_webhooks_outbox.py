"""The outbox: deliveries created with their audit events, and the endpoint management calls."""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta

import psycopg
import pytest
from sqlalchemy import func, select, text, update
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from models import (
    AccountStatus,
    AuditEvent,
    AuditEventType,
    AwsAccount,
    Organization,
    WebhookDelivery,
    WebhookEndpoint,
    render_account_list_item,
)
from sandbox.standin import StsStandIn
from tests.factories import make_account, make_organization
from worker.chunk import verify_account
from worker.claims import claim_due_accounts
from worker.settings import Settings
from worker.sts.verifier import StsVerifier
from worker.verify import VerificationDeps
from worker.webhooks import (
    EVENT_TYPES,
    EndpointLimitError,
    EndpointNotFoundError,
    UnsafeUrlError,
    create_endpoint,
    disable,
    enable,
    list_deliveries,
    list_endpoints,
    replay_event,
    rotate_secret,
    send_test_event,
)
from worker.webhooks.signing import SecretBox, generate_key

STATUS_CHANGED = "account.status_changed"


@pytest.fixture
def settings() -> Settings:
    """Settings with a signing-secret key; private networks allowed (the test receiver's)."""
    return Settings(webhook_secret_key=generate_key(), webhook_allow_private_networks=True)


def _endpoint(
    session: Session,
    organization: Organization,
    settings: Settings,
    *,
    event_types: list[str] | None = None,
) -> WebhookEndpoint:
    created = create_endpoint(
        session,
        organization_id=organization.id,
        url="https://93.184.215.14/hook",
        settings=settings,
        event_types=event_types,
    )
    endpoint = session.get(WebhookEndpoint, created.endpoint.id)
    assert endpoint is not None
    return endpoint


def _status_event(account: AwsAccount, **fields: object) -> AuditEvent:
    return AuditEvent(
        organization_id=account.organization_id,
        account_id=account.id,
        event_type=AuditEventType.STATUS_CHANGED,
        actor="api:user:1",
        from_status=AccountStatus.PENDING,
        to_status=AccountStatus.FAILED,
        reason="AccessDenied",
        details={"error_message": "Role could not be assumed."},
        **fields,
    )


def _deliveries(session: Session) -> list[WebhookDelivery]:
    return list(session.scalars(select(WebhookDelivery).order_by(WebhookDelivery.created_at)))


def test_an_audit_event_creates_one_delivery_per_subscribed_endpoint(
    session: Session, settings: Settings
) -> None:
    """Each enabled endpoint of the event's organization that wants its type gets one delivery."""
    organization = make_organization(session)
    wants = _endpoint(session, organization, settings, event_types=[STATUS_CHANGED])
    also = _endpoint(session, organization, settings)
    _endpoint(session, organization, settings, event_types=["account.external_id_not_enforced"])
    off = _endpoint(session, organization, settings)
    disable(session, off.id, organization_id=organization.id, reason="test", actor="test")
    _endpoint(session, make_organization(session), settings)  # another organization's
    account = make_account(session, organization=organization, status=AccountStatus.FAILED)
    session.add(_status_event(account))
    session.flush()
    assert sorted(d.endpoint_id for d in _deliveries(session)) == sorted([wants.id, also.id])


def test_the_payload_is_the_api_account_with_the_change(
    session: Session, settings: Settings
) -> None:
    """`{type, timestamp, data}`: the API's list item plus errorMessage, from/to/reason; never
    the external ID."""
    organization = make_organization(session)
    _endpoint(session, organization, settings)
    account = make_account(session, organization=organization, status=AccountStatus.FAILED)
    event = _status_event(account)
    session.add(event)
    session.flush()
    session.refresh(account)
    session.refresh(event)
    (delivery,) = _deliveries(session)
    expected_account = {**render_account_list_item(account), "errorMessage": account.error_message}
    assert delivery.payload == {
        "type": STATUS_CHANGED,
        "timestamp": event.occurred_at.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "data": {
            "account": expected_account,
            "from": "pending",
            "to": "failed",
            "reason": "AccessDenied",
            "errorMessage": "Role could not be assumed.",
        },
    }
    assert account.external_id not in str(delivery.payload)


def test_an_organization_has_at_most_the_allowed_enabled_endpoints(session: Session) -> None:
    """WEBHOOK_MAX_ENDPOINTS_PER_ORGANIZATION bounds the fan-out: one more endpoint, or enabling
    a disabled one, is refused while the enabled ones fill it; disabled ones do not count, and
    other organizations are not affected."""
    settings = Settings(
        webhook_secret_key=generate_key(),
        webhook_allow_private_networks=True,
        webhook_max_endpoints_per_organization=2,
    )
    organization = make_organization(session)
    first = _endpoint(session, organization, settings)
    _endpoint(session, organization, settings)
    with pytest.raises(EndpointLimitError, match="at most 2"):
        _endpoint(session, organization, settings)
    _endpoint(session, make_organization(session), settings)  # another organization has room

    disable(session, first.id, organization_id=organization.id, reason="x", actor="api:user:1")
    third = _endpoint(session, organization, settings)
    with pytest.raises(EndpointLimitError):
        enable(session, first.id, organization_id=organization.id, settings=settings)
    disable(session, third.id, organization_id=organization.id, reason="x", actor="api:user:1")
    assert enable(session, first.id, organization_id=organization.id, settings=settings).enabled
    enabled = [e for e in list_endpoints(session, organization_id=organization.id) if e.enabled]
    assert len(enabled) == 2


def test_a_permissions_change_says_which_permissions_are_missing(
    session: Session, settings: Settings
) -> None:
    """`account.permissions_changed` carries what changed (the audit event's details, in the
    payload's camelCase): missing now, missing before (null on the first check), proven."""
    organization = make_organization(session)
    _endpoint(session, organization, settings)
    account = make_account(session, organization=organization, status=AccountStatus.CONNECTED)
    for before in (None, ["ec2:DescribeRegions"]):
        session.add(
            AuditEvent(
                organization_id=organization.id,
                account_id=account.id,
                event_type=AuditEventType.PERMISSIONS_CHANGED,
                actor="worker",
                reason="MissingPermissions",
                details={
                    "before": before,
                    "after": ["s3:ListAllMyBuckets"],
                    "proven": ["ec2:DescribeRegions", "iam:GetAccountSummary"],
                },
            )
        )
        session.flush()
    ordered = sorted(_deliveries(session), key=lambda d: d.event_id or 0)
    first, second = (d.payload["data"] for d in ordered)
    assert first["previouslyMissing"] is None
    assert second["previouslyMissing"] == ["ec2:DescribeRegions"]
    for data in (first, second):
        assert data["missingPermissions"] == ["s3:ListAllMyBuckets"]
        assert data["provenPermissions"] == ["ec2:DescribeRegions", "iam:GetAccountSummary"]
        assert data["reason"] == "MissingPermissions"
        assert data["account"]["id"] == str(account.id)


def test_a_rollback_leaves_no_delivery(
    scratch_sessions: sessionmaker[Session], settings: Settings
) -> None:
    """The delivery is part of the event's transaction: a rolled-back event announces nothing."""
    with scratch_sessions.begin() as session:
        organization = make_organization(session)
        _endpoint(session, organization, settings)
        account = make_account(session, organization=organization, status=AccountStatus.FAILED)
    with scratch_sessions() as session:
        session.add(_status_event(account))
        session.flush()
        assert len(_deliveries(session)) == 1
        session.rollback()
    with scratch_sessions() as session:
        assert _deliveries(session) == []


def test_a_second_delivery_of_one_event_to_one_endpoint_is_refused(
    session: Session, settings: Settings
) -> None:
    """The unique constraint on (event, endpoint) makes a duplicate impossible, whoever tries."""
    organization = make_organization(session)
    endpoint = _endpoint(session, organization, settings)
    account = make_account(session, organization=organization, status=AccountStatus.FAILED)
    event = _status_event(account)
    session.add(event)
    session.flush()
    with pytest.raises(IntegrityError), session.begin_nested():
        session.execute(
            text(
                "INSERT INTO webhook_deliveries (endpoint_id, event_id, event_type, payload) "
                "VALUES (:e, :i, 'account.status_changed', '{}')"
            ),
            {"e": endpoint.id, "i": event.id},
        )


@pytest.fixture
def verification(
    scratch_sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[[], VerificationDeps]]:
    """A verification context against a zero-latency STS stand-in."""
    with StsStandIn(median_ms=0, seed=5) as sts:
        monkeypatch.setenv("AWS_ENDPOINT_URL_STS", sts.endpoint_url)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAPLATFORMTESTKEY1")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret")

        def build() -> VerificationDeps:
            settings = Settings(sts_max_attempts=1, jitter_ratio=0)
            return VerificationDeps(
                sessions=scratch_sessions,
                verifier=StsVerifier(settings),
                circuit=None,
                settings=settings,
                rng=random.Random(0),
            )

        yield build


def test_the_worker_announces_the_status_changes_it_applies(
    scratch_sessions: sessionmaker[Session],
    settings: Settings,
    verification: Callable[[], VerificationDeps],
) -> None:
    """A verification that fails an account creates its delivery in the same commit; running
    the same lease again changes nothing and creates none."""
    with scratch_sessions.begin() as session:
        organization = make_organization(session)
        endpoint = _endpoint(session, organization, settings)
        account = make_account(
            session,
            organization=organization,
            aws_account_id="123456789012",
            role_arn="arn:aws:iam::123456789012:role/deny-Webhooks",
            role_changed_at=func.now() - timedelta(days=1),
        )
        session.execute(
            update(AwsAccount)
            .where(AwsAccount.id != account.id)
            .values(next_due_at=func.now() + timedelta(days=1))
        )
        claim = claim_due_accounts(session, limit=1, lease_seconds=60)
    ctx = verification()
    verify_account(ctx, account.id, claim.lease_id)
    verify_account(ctx, account.id, claim.lease_id)
    with scratch_sessions() as session:
        deliveries = _deliveries(session)
        assert [(d.endpoint_id, d.payload["data"]["to"]) for d in deliveries] == [
            (endpoint.id, "failed")
        ]
        event = session.scalars(
            select(AuditEvent).where(AuditEvent.event_type == AuditEventType.STATUS_CHANGED)
        ).one()
        assert deliveries[0].event_id == event.id


def test_an_endpoint_secret_is_encrypted_at_rest(session: Session, settings: Settings) -> None:
    """The secret is returned once; the row holds only a ciphertext the key decrypts."""
    organization = make_organization(session)
    created = create_endpoint(
        session, organization_id=organization.id, url="https://93.184.215.14/h", settings=settings
    )
    assert created.secret.startswith("whsec_")
    stored = session.get(WebhookEndpoint, created.endpoint.id)
    assert stored is not None
    assert created.secret.encode() not in stored.secret_encrypted
    assert created.secret.removeprefix("whsec_").encode() not in stored.secret_encrypted
    assert SecretBox.from_settings(settings).decrypt(stored.secret_encrypted) == created.secret
    assert created.secret not in str(created.endpoint.as_json())


def test_registration_refuses_unsafe_urls_and_unknown_types(session: Session) -> None:
    """Without private networks, a loopback URL and plain http are refused; so is an unknown
    event type."""
    organization = make_organization(session)
    strict = Settings(webhook_secret_key=generate_key())
    for url in ("https://127.0.0.1/h", "http://93.184.215.14/h", "https://localhost/h"):
        with pytest.raises(UnsafeUrlError):
            create_endpoint(session, organization_id=organization.id, url=url, settings=strict)
    with pytest.raises(ValueError, match="unknown event type"):
        create_endpoint(
            session,
            organization_id=organization.id,
            url="https://93.184.215.14/h",
            settings=strict,
            event_types=["account.deleted"],
        )
    assert list_endpoints(session, organization_id=organization.id) == []


def test_rotation_keeps_the_old_secret_for_the_grace_period(
    session: Session, settings: Settings
) -> None:
    """After a rotation both secrets are stored; with no grace only the new one."""
    organization = make_organization(session)
    endpoint = _endpoint(session, organization, settings)
    box = SecretBox.from_settings(settings)
    old = box.decrypt(endpoint.secret_encrypted)
    new = rotate_secret(session, endpoint.id, organization_id=organization.id, settings=settings)
    session.refresh(endpoint)
    assert box.decrypt(endpoint.secret_encrypted) == new
    assert endpoint.previous_secret_encrypted is not None
    assert box.decrypt(endpoint.previous_secret_encrypted) == old
    no_grace = settings.model_copy(update={"webhook_rotation_grace_seconds": 0})
    rotate_secret(session, endpoint.id, organization_id=organization.id, settings=no_grace)
    session.refresh(endpoint)
    assert endpoint.previous_secret_encrypted is None


def test_disable_records_an_audit_event_and_enable_resumes(
    session: Session, settings: Settings
) -> None:
    """Disabling gives up pending deliveries and is audited; enabling takes new events again."""
    organization = make_organization(session)
    endpoint = _endpoint(session, organization, settings)
    account = make_account(session, organization=organization, status=AccountStatus.FAILED)
    session.add(_status_event(account))
    session.flush()
    info = disable(
        session,
        endpoint.id,
        organization_id=organization.id,
        reason="customer asked",
        actor="api:user:7",
    )
    assert (info.enabled, info.disabled_reason) == (False, "customer asked")
    (delivery,) = _deliveries(session)
    session.refresh(delivery)
    assert (delivery.next_attempt_at, delivery.last_error) == (None, "endpoint disabled")
    audit = session.scalars(
        select(AuditEvent).where(AuditEvent.event_type == AuditEventType.WEBHOOK_ENDPOINT_DISABLED)
    ).one()
    assert audit.account_id is None
    assert audit.details == {"endpoint_id": str(endpoint.id)}
    assert enable(session, endpoint.id, organization_id=organization.id, settings=settings).enabled
    session.add(_status_event(account))
    session.flush()
    assert len(_deliveries(session)) == 2


def test_replay_resets_a_delivery_with_the_same_webhook_id(
    session: Session, settings: Settings
) -> None:
    """Replaying an event makes its delivery due again, keeping its id; a new endpoint gets one."""
    organization = make_organization(session)
    endpoint = _endpoint(session, organization, settings)
    account = make_account(session, organization=organization, status=AccountStatus.FAILED)
    event = _status_event(account)
    session.add(event)
    session.flush()
    (delivery,) = _deliveries(session)
    session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery.id)
        .values(next_attempt_at=None, delivered_at=func.now(), attempts=1)
    )
    later = _endpoint(session, organization, settings)
    ids = replay_event(session, event.id, organization_id=organization.id)
    assert sorted(ids) == sorted([delivery.message_id, _deliveries(session)[1].message_id])
    session.expire_all()
    again = session.get(WebhookDelivery, delivery.id)
    assert again is not None
    assert (again.attempts, again.delivered_at) == (0, None)
    assert again.next_attempt_at is not None
    assert {d.endpoint_id for d in _deliveries(session)} == {endpoint.id, later.id}
    with pytest.raises(EndpointNotFoundError):
        replay_event(session, 10**12, organization_id=organization.id)


def test_a_test_event_is_queued_for_one_endpoint(session: Session, settings: Settings) -> None:
    """`send_test_event` queues a `webhook.test` message with a fresh webhook-id."""
    organization = make_organization(session)
    endpoint = _endpoint(session, organization, settings)
    webhook_id = send_test_event(session, endpoint.id, organization_id=organization.id)
    (delivery,) = _deliveries(session)
    assert (delivery.message_id, delivery.event_type, delivery.event_id) == (
        webhook_id,
        "webhook.test",
        None,
    )
    assert delivery.payload["data"] == {"endpointId": str(endpoint.id)}
    with pytest.raises(EndpointNotFoundError):
        send_test_event(session, uuid.uuid4(), organization_id=organization.id)


def test_every_announced_type_is_an_account_event() -> None:
    """The requested-verification echo and endpoint events are not announced."""
    assert "account.status_changed" in EVENT_TYPES
    assert "account.external_id_not_enforced" in EVENT_TYPES
    assert "account.verification_requested" not in EVENT_TYPES
    assert not any("webhook" in t for t in EVENT_TYPES)


def test_an_endpoint_of_another_organization_is_not_found(
    session: Session, settings: Settings
) -> None:
    """Every call takes the caller's organization: another tenant's endpoint or event is
    "not found", its deliveries are not listed, and nothing of it changes."""
    mine = make_organization(session)
    theirs = make_organization(session)
    endpoint = _endpoint(session, theirs, settings)
    account = make_account(session, organization=theirs, status=AccountStatus.FAILED)
    event = _status_event(account)
    session.add(event)
    session.flush()
    calls: list[Callable[[], object]] = [
        lambda: rotate_secret(session, endpoint.id, organization_id=mine.id, settings=settings),
        lambda: disable(session, endpoint.id, organization_id=mine.id, reason="x", actor="x"),
        lambda: enable(session, endpoint.id, organization_id=mine.id, settings=settings),
        lambda: send_test_event(session, endpoint.id, organization_id=mine.id),
        lambda: replay_event(session, event.id, organization_id=mine.id),
        lambda: replay_event(
            session, event.id, organization_id=theirs.id, endpoint_id=uuid.uuid4()
        ),
    ]
    for call in calls:
        with pytest.raises(EndpointNotFoundError):
            call()
    assert list_deliveries(session, endpoint.id, organization_id=mine.id) == []
    assert len(list_deliveries(session, endpoint.id, organization_id=theirs.id)) == 1
    assert list_endpoints(session, organization_id=mine.id) == []
    session.refresh(endpoint)
    assert endpoint.enabled
    assert endpoint.previous_secret_encrypted is None


def test_an_endpoint_without_event_types_gets_types_added_later(
    session: Session, settings: Settings
) -> None:
    """No event types is stored as NULL, meaning every type: an account event type added by a
    later migration reaches the endpoint; `verification_requested` never does."""
    organization = make_organization(session)
    everything = _endpoint(session, organization, settings)
    assert everything.event_types is None
    # What a later migration adding a type does to the audit log's CHECK.
    session.execute(text("ALTER TABLE audit_events DROP CONSTRAINT ck_audit_events_event_type"))
    account = make_account(session, organization=organization, status=AccountStatus.FAILED)
    session.execute(
        text(
            "INSERT INTO audit_events (organization_id, account_id, event_type, actor, reason, "
            "details) VALUES (:org, :account, :type, 'test', 'test', '{}')"
        ),
        [
            {"org": organization.id, "account": account.id, "type": "permissions_changed"},
            {"org": organization.id, "account": account.id, "type": "verification_requested"},
        ],
    )
    assert [d.event_type for d in _deliveries(session)] == ["account.permissions_changed"]


def test_changing_an_endpoint_does_not_wait_for_a_transaction_creating_its_delivery(
    scratch_sessions: sessionmaker[Session], settings: Settings
) -> None:
    """A transaction recording an event holds FOR KEY SHARE on the endpoint (the delivery's
    foreign key); rotating the endpoint's secret meanwhile takes FOR NO KEY UPDATE, which does
    not conflict, instead of FOR UPDATE, which would wait for that transaction."""
    with scratch_sessions.begin() as setup:
        organization = make_organization(setup)
        endpoint = _endpoint(setup, organization, settings)
        account = make_account(setup, organization=organization, status=AccountStatus.FAILED)
        organization_id, endpoint_id, account_id = organization.id, endpoint.id, account.id
    with scratch_sessions.begin() as recording:
        recording.add(
            AuditEvent(
                organization_id=organization_id,
                account_id=account_id,
                event_type=AuditEventType.STATUS_CHANGED,
                actor="worker",
                from_status=AccountStatus.PENDING,
                to_status=AccountStatus.FAILED,
                reason="AccessDenied",
                details={},
            )
        )
        recording.flush()
        with scratch_sessions.begin() as rotating:
            rotating.execute(text("SET LOCAL lock_timeout = '2s'"))
            rotate_secret(rotating, endpoint_id, organization_id=organization_id, settings=settings)


def test_the_payload_function_refuses_dropping_a_column_it_reads(session: Session) -> None:
    """webhook_event_payload has a SQL-standard body whose dependencies PostgreSQL records:
    dropping a column it reads fails at the migration, not at every later audit INSERT."""
    with pytest.raises(DBAPIError) as caught, session.begin_nested():
        session.execute(text("ALTER TABLE aws_accounts DROP COLUMN alias"))
    assert isinstance(caught.value.orig, psycopg.errors.DependentObjectsStillExist)
