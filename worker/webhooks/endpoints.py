"""Managing webhook endpoints: the calls the API and `scripts/webhooks` make.

Every function takes the caller's session and never commits; deliveries it creates are picked
up by the worker's next claim once the caller's transaction commits.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from models import AuditEventType, Organization, WebhookDelivery, WebhookEndpoint, format_timestamp
from models.webhooks import message_id
from worker.settings import Settings
from worker.webhooks.addresses import resolve_allowed
from worker.webhooks.delivery import disable_endpoint
from worker.webhooks.signing import SecretBox, generate_secret

# The audit events announced to endpoints, as webhook event types. `verification_requested` is
# the caller's own action and endpoint events are about the endpoints themselves.
_NOT_ANNOUNCED = {AuditEventType.VERIFICATION_REQUESTED, AuditEventType.WEBHOOK_ENDPOINT_DISABLED}
EVENT_TYPES = tuple(f"account.{t.value}" for t in AuditEventType if t not in _NOT_ANNOUNCED)
TEST_EVENT_TYPE = "webhook.test"


class EndpointNotFoundError(LookupError):
    """No endpoint (or event) with that id."""


@dataclass(frozen=True, slots=True)
class EndpointInfo:
    """An endpoint as shown to its owner: never the secret."""

    id: uuid.UUID
    organization_id: uuid.UUID
    url: str
    description: str | None
    event_types: list[str]
    enabled: bool
    disabled_reason: str | None
    failing_since: datetime | None
    previous_secret_expires_at: datetime | None
    created_at: datetime

    @classmethod
    def of(cls, endpoint: WebhookEndpoint) -> EndpointInfo:
        """The public view of a row."""
        return cls(
            id=endpoint.id,
            organization_id=endpoint.organization_id,
            url=endpoint.url,
            description=endpoint.description,
            event_types=list(endpoint.event_types),
            enabled=endpoint.enabled,
            disabled_reason=endpoint.disabled_reason,
            failing_since=endpoint.failing_since,
            previous_secret_expires_at=endpoint.previous_secret_expires_at,
            created_at=endpoint.created_at,
        )

    def as_json(self) -> dict[str, Any]:
        """The API's camelCase shape."""
        return {
            "id": str(self.id),
            "organizationId": str(self.organization_id),
            "url": self.url,
            "description": self.description,
            "eventTypes": self.event_types,
            "enabled": self.enabled,
            "disabledReason": self.disabled_reason,
            "failingSince": _timestamp(self.failing_since),
            "previousSecretExpiresAt": _timestamp(self.previous_secret_expires_at),
            "createdAt": _timestamp(self.created_at),
        }


def _timestamp(moment: datetime | None) -> str | None:
    return None if moment is None else format_timestamp(moment)


@dataclass(frozen=True, slots=True)
class CreatedEndpoint:
    """A new endpoint and its signing secret, shown this once."""

    endpoint: EndpointInfo
    secret: str


def _event_types(wanted: list[str] | None) -> list[str]:
    if not wanted:
        return list(EVENT_TYPES)
    unknown = sorted(set(wanted) - set(EVENT_TYPES))
    if unknown:
        raise ValueError(
            f"unknown event type(s) {', '.join(unknown)}; known: {', '.join(EVENT_TYPES)}"
        )
    return sorted(set(wanted))


def create_endpoint(
    session: Session,
    *,
    organization_id: uuid.UUID,
    url: str,
    settings: Settings,
    event_types: list[str] | None = None,
    description: str | None = None,
) -> CreatedEndpoint:
    """Register an endpoint for an organization; returns it with its secret (shown only now).

    Raises UnsafeUrlError for a URL the worker must not call (checked again at every attempt),
    ValueError for unknown event types, EndpointNotFoundError for an unknown organization.
    """
    resolve_allowed(url, allow_private=settings.webhook_allow_private_networks)
    types = _event_types(event_types)
    if session.get(Organization, organization_id) is None:
        raise EndpointNotFoundError(f"no organization {organization_id}")
    secret = generate_secret()
    endpoint = WebhookEndpoint(
        organization_id=organization_id,
        url=url,
        description=description,
        event_types=types,
        secret_encrypted=SecretBox.from_settings(settings).encrypt(secret),
    )
    session.add(endpoint)
    session.flush()
    session.refresh(endpoint)
    return CreatedEndpoint(endpoint=EndpointInfo.of(endpoint), secret=secret)


def list_endpoints(
    session: Session, *, organization_id: uuid.UUID | None = None
) -> list[EndpointInfo]:
    """An organization's endpoints (every endpoint without one), oldest first."""
    query = select(WebhookEndpoint).order_by(WebhookEndpoint.created_at, WebhookEndpoint.id)
    if organization_id is not None:
        query = query.where(WebhookEndpoint.organization_id == organization_id)
    return [EndpointInfo.of(e) for e in session.scalars(query)]


def _endpoint(session: Session, endpoint_id: uuid.UUID) -> WebhookEndpoint:
    endpoint = session.get(WebhookEndpoint, endpoint_id, with_for_update=True)
    if endpoint is None:
        raise EndpointNotFoundError(f"no webhook endpoint {endpoint_id}")
    return endpoint


def disable(session: Session, endpoint_id: uuid.UUID, *, reason: str, actor: str) -> EndpointInfo:
    """Stop delivering to an endpoint (its pending deliveries are given up; audited)."""
    _endpoint(session, endpoint_id)
    disable_endpoint(session, endpoint_id, reason=reason, actor=actor)
    return _refreshed(session, endpoint_id)


def enable(session: Session, endpoint_id: uuid.UUID) -> EndpointInfo:
    """Deliver to an endpoint again (new events only; `replay_event` resends old ones)."""
    endpoint = _endpoint(session, endpoint_id)
    endpoint.enabled = True
    endpoint.disabled_reason = None
    endpoint.disabled_at = None
    endpoint.failing_since = None
    session.flush()
    return _refreshed(session, endpoint_id)


def _refreshed(session: Session, endpoint_id: uuid.UUID) -> EndpointInfo:
    endpoint = _endpoint(session, endpoint_id)
    session.refresh(endpoint)
    return EndpointInfo.of(endpoint)


def rotate_secret(session: Session, endpoint_id: uuid.UUID, *, settings: Settings) -> str:
    """A new signing secret, returned once; the old one keeps signing (a second signature) for
    WEBHOOK_ROTATION_GRACE_SECONDS so the receiver can switch without losing a message."""
    endpoint = _endpoint(session, endpoint_id)
    box = SecretBox.from_settings(settings)
    secret = generate_secret()
    grace = settings.webhook_rotation_grace_seconds
    if grace > 0:
        expires = session.scalar(text("SELECT now() + make_interval(secs => :s)"), {"s": grace})
        endpoint.previous_secret_encrypted = endpoint.secret_encrypted
        endpoint.previous_secret_expires_at = expires
    else:
        endpoint.previous_secret_encrypted = None
        endpoint.previous_secret_expires_at = None
    endpoint.secret_encrypted = box.encrypt(secret)
    session.flush()
    return secret


def send_test_event(session: Session, endpoint_id: uuid.UUID) -> str:
    """Queue a `webhook.test` message to one endpoint (even a disabled one's URL is not called:
    the endpoint must be enabled); returns its `webhook-id`."""
    endpoint = _endpoint(session, endpoint_id)
    if not endpoint.enabled:
        raise ValueError("the endpoint is disabled; enable it first")
    delivery_id = session.scalar(
        text(
            """
            INSERT INTO webhook_deliveries (endpoint_id, event_type, payload)
            VALUES (:endpoint_id, CAST(:type AS text), jsonb_build_object(
                'type', CAST(:type AS text),
                'timestamp',
                to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'),
                'data', jsonb_build_object('endpointId', CAST(:endpoint_id AS text))))
            RETURNING id
            """
        ),
        {"endpoint_id": endpoint_id, "type": TEST_EVENT_TYPE},
    )
    assert delivery_id is not None  # noqa: S101 - INSERT ... RETURNING returns the row
    return message_id(delivery_id)


def replay_event(
    session: Session, event_id: int, *, endpoint_id: uuid.UUID | None = None
) -> list[str]:
    """Deliver an audit event again, now: to one endpoint, or to every enabled endpoint of its
    organization that wants its type; returns the `webhook-id`s.

    An existing delivery is reset (same `webhook-id` and message: the receiver's idempotency key
    still recognises it); an endpoint that never had one gets a new delivery, rendered now.
    """
    exists = session.scalar(text("SELECT 1 FROM audit_events WHERE id = :id"), {"id": event_id})
    if exists is None:
        raise EndpointNotFoundError(f"no audit event {event_id}")
    if endpoint_id is not None:
        _endpoint(session, endpoint_id)
    ids = session.scalars(
        text(
            """
            INSERT INTO webhook_deliveries (endpoint_id, event_id, event_type, payload)
            SELECT w.id, e.id, 'account.' || e.event_type, webhook_event_payload(e)
              FROM audit_events AS e
              JOIN webhook_endpoints AS w
                ON w.organization_id = e.organization_id
               AND w.enabled
               AND (w.id = CAST(:endpoint_id AS uuid)
                    OR CAST(:endpoint_id AS uuid) IS NULL
                       AND 'account.' || e.event_type = ANY (w.event_types))
             WHERE e.id = :event_id AND e.account_id IS NOT NULL
            ON CONFLICT (event_id, endpoint_id) DO UPDATE
               SET next_attempt_at = now(), attempts = 0, delivered_at = NULL, given_up_at = NULL,
                   last_error = NULL, last_status_code = NULL
            RETURNING id
            """
        ),
        {"event_id": event_id, "endpoint_id": endpoint_id},
    ).all()
    return [message_id(i) for i in ids]


@dataclass(frozen=True, slots=True)
class DeliveryInfo:
    """One delivery as an operator sees it."""

    webhook_id: str
    event_id: int | None
    event_type: str
    attempts: int
    last_status_code: int | None
    last_error: str | None
    next_attempt_at: datetime | None
    delivered_at: datetime | None
    given_up_at: datetime | None

    def as_json(self) -> dict[str, Any]:
        """camelCase, like the API."""
        return {
            "webhookId": self.webhook_id,
            "eventId": self.event_id,
            "eventType": self.event_type,
            "attempts": self.attempts,
            "lastStatusCode": self.last_status_code,
            "lastError": self.last_error,
            "nextAttemptAt": _timestamp(self.next_attempt_at),
            "deliveredAt": _timestamp(self.delivered_at),
            "givenUpAt": _timestamp(self.given_up_at),
        }


def list_deliveries(
    session: Session, endpoint_id: uuid.UUID, *, limit: int = 50
) -> list[DeliveryInfo]:
    """An endpoint's latest deliveries, newest first."""
    rows = session.scalars(
        select(WebhookDelivery)
        .where(WebhookDelivery.endpoint_id == endpoint_id)
        .order_by(WebhookDelivery.created_at.desc(), WebhookDelivery.id)
        .limit(limit)
    )
    return [
        DeliveryInfo(
            webhook_id=d.message_id,
            event_id=d.event_id,
            event_type=d.event_type,
            attempts=d.attempts,
            last_status_code=d.last_status_code,
            last_error=d.last_error,
            next_attempt_at=d.next_attempt_at,
            delivered_at=d.delivered_at,
            given_up_at=d.given_up_at,
        )
        for d in rows
    ]
