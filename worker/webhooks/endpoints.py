"""Managing webhook endpoints: the calls the API and `scripts/webhooks` make.

Every function takes the caller's session and never commits; deliveries it creates are picked
up by the worker's next claim once the caller's transaction commits. Every function acting on
endpoints, deliveries or events takes the caller's `organization_id` and finds nothing of another
organization: an id from another tenant is "not found". Operators' tools (`scripts/webhooks`)
look the organization up first with `operator_endpoint_organization` /
`operator_event_organization`, whose names say they bypass that scoping.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from models import AuditEventType, Organization, WebhookEndpoint, format_timestamp
from models.webhooks import message_id
from worker.settings import Settings
from worker.webhooks.addresses import normalized_url, resolve_allowed
from worker.webhooks.recording import disable_endpoint
from worker.webhooks.signing import SecretBox, SecretKeyError, generate_secret

# The audit events announced to endpoints, as webhook event types. `verification_requested` is
# the caller's own action and endpoint events are about the endpoints themselves (the fan-out
# trigger of migration 0005 leaves the same two out for endpoints that want every type).
_NOT_ANNOUNCED = {AuditEventType.VERIFICATION_REQUESTED, AuditEventType.WEBHOOK_ENDPOINT_DISABLED}
EVENT_TYPES = tuple(f"account.{t.value}" for t in AuditEventType if t not in _NOT_ANNOUNCED)
TEST_EVENT_TYPE = "webhook.test"


class EndpointLimitError(ValueError):
    """The organization already has as many enabled endpoints as it may."""


class EndpointNotFoundError(LookupError):
    """No endpoint (or event) with that id."""


@dataclass(frozen=True, slots=True)
class EndpointInfo:
    """An endpoint as shown to its owner: never the secret."""

    id: uuid.UUID
    organization_id: uuid.UUID
    url: str
    description: str | None
    event_types: list[str] | None  # None: every type, including those added later
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
            event_types=None if endpoint.event_types is None else list(endpoint.event_types),
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
            "failingSince": optional_timestamp(self.failing_since),
            "previousSecretExpiresAt": optional_timestamp(self.previous_secret_expires_at),
            "createdAt": optional_timestamp(self.created_at),
        }


def optional_timestamp(moment: datetime | None) -> str | None:
    """The API's timestamp form, or None."""
    return None if moment is None else format_timestamp(moment)


@dataclass(frozen=True, slots=True)
class CreatedEndpoint:
    """A new endpoint and its signing secret, shown this once."""

    endpoint: EndpointInfo
    secret: str


def _event_types(wanted: list[str] | None) -> list[str] | None:
    if not wanted:
        return None  # every type, also those added after the endpoint was registered
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
    No `event_types` (or an empty list) subscribes to every type, present and future.
    The URL is stored as httpx normalizes it (an international host name in punycode), the
    form every attempt reads.
    """
    allow_private = settings.webhook_allow_private_networks
    url = normalized_url(url, allow_private=allow_private)
    resolve_allowed(
        url, allow_private=allow_private, timeout=settings.webhook_connect_timeout_seconds
    )
    types = _event_types(event_types)
    _check_room(session, organization_id, settings)
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


def list_endpoints(session: Session, *, organization_id: uuid.UUID) -> list[EndpointInfo]:
    """An organization's endpoints, oldest first."""
    query = (
        select(WebhookEndpoint)
        .where(WebhookEndpoint.organization_id == organization_id)
        .order_by(WebhookEndpoint.created_at, WebhookEndpoint.id)
    )
    return [EndpointInfo.of(e) for e in session.scalars(query)]


def operator_list_all_endpoints(session: Session) -> list[EndpointInfo]:
    """Every organization's endpoints, oldest first: for operators' tools only, never the API."""
    query = select(WebhookEndpoint).order_by(WebhookEndpoint.created_at, WebhookEndpoint.id)
    return [EndpointInfo.of(e) for e in session.scalars(query)]


def operator_endpoint_organization(session: Session, endpoint_id: uuid.UUID) -> uuid.UUID:
    """The organization an endpoint belongs to: for operators' tools only, never the API."""
    found = session.scalar(
        select(WebhookEndpoint.organization_id).where(WebhookEndpoint.id == endpoint_id)
    )
    if found is None:
        raise EndpointNotFoundError(f"no webhook endpoint {endpoint_id}")
    return found


def operator_event_organization(session: Session, event_id: int) -> uuid.UUID:
    """The organization of an audit event: for operators' tools only, never the API."""
    found = session.scalar(
        text("SELECT organization_id FROM audit_events WHERE id = :id"), {"id": event_id}
    )
    if found is None:
        raise EndpointNotFoundError(f"no audit event {event_id}")
    return uuid.UUID(str(found))


def _endpoint(
    session: Session, endpoint_id: uuid.UUID, organization_id: uuid.UUID
) -> WebhookEndpoint:
    # FOR NO KEY UPDATE, not FOR UPDATE: a transaction inserting a delivery for this endpoint
    # (the trigger, with an audit event) holds FOR KEY SHARE on it through the foreign key, which
    # FOR UPDATE would wait for and FOR NO KEY UPDATE does not.
    endpoint = session.scalars(
        select(WebhookEndpoint)
        .where(
            WebhookEndpoint.id == endpoint_id,
            WebhookEndpoint.organization_id == organization_id,
        )
        .with_for_update(key_share=True)
    ).one_or_none()
    if endpoint is None:
        raise EndpointNotFoundError(f"no webhook endpoint {endpoint_id}")
    return endpoint


def disable(
    session: Session,
    endpoint_id: uuid.UUID,
    *,
    organization_id: uuid.UUID,
    reason: str,
    actor: str,
) -> EndpointInfo:
    """Stop delivering to an endpoint (its pending deliveries are given up; audited)."""
    _endpoint(session, endpoint_id, organization_id)
    disable_endpoint(session, endpoint_id, reason=reason, actor=actor)
    return _refreshed(session, endpoint_id, organization_id)


def enable(
    session: Session, endpoint_id: uuid.UUID, *, organization_id: uuid.UUID, settings: Settings
) -> EndpointInfo:
    """Deliver to an endpoint again (new events only; `replay_event` resends old ones).
    Raises EndpointLimitError if the organization has no room for another enabled endpoint."""
    endpoint = _endpoint(session, endpoint_id, organization_id)
    if not endpoint.enabled:
        _check_room(session, organization_id, settings)
    endpoint.enabled = True
    endpoint.disabled_reason = None
    endpoint.disabled_at = None
    endpoint.failing_since = None
    endpoint.last_failure_at = None
    session.flush()
    return _refreshed(session, endpoint_id, organization_id)


def _check_room(session: Session, organization_id: uuid.UUID, settings: Settings) -> None:
    """Refuse another enabled endpoint beyond WEBHOOK_MAX_ENDPOINTS_PER_ORGANIZATION: each one
    adds an INSERT per event to the verification's transaction. The organization's row is locked
    (FOR NO KEY UPDATE), so two registrations at once cannot both take the last place."""
    found = session.scalars(
        select(Organization.id)
        .where(Organization.id == organization_id)
        .with_for_update(key_share=True)
    ).one_or_none()
    if found is None:
        raise EndpointNotFoundError(f"no organization {organization_id}")
    enabled = session.scalar(
        select(func.count())
        .select_from(WebhookEndpoint)
        .where(WebhookEndpoint.organization_id == organization_id, WebhookEndpoint.enabled)
    )
    limit = settings.webhook_max_endpoints_per_organization
    if (enabled or 0) >= limit:
        raise EndpointLimitError(
            f"organization {organization_id} already has {enabled} enabled webhook endpoints "
            f"(at most {limit}: WEBHOOK_MAX_ENDPOINTS_PER_ORGANIZATION); disable one first"
        )


def _refreshed(
    session: Session, endpoint_id: uuid.UUID, organization_id: uuid.UUID
) -> EndpointInfo:
    endpoint = _endpoint(session, endpoint_id, organization_id)
    session.refresh(endpoint)
    return EndpointInfo.of(endpoint)


def rotate_secret(
    session: Session, endpoint_id: uuid.UUID, *, organization_id: uuid.UUID, settings: Settings
) -> str:
    """A new signing secret, returned once; the old one keeps signing (a second signature) for
    WEBHOOK_ROTATION_GRACE_SECONDS so the receiver can switch without losing a message.

    An old secret that no configured key decrypts is dropped rather than kept: it could never
    sign, and keeping it would make every attempt of the grace period fail. Rotating is how an
    endpoint disabled with "secret unreadable" gets a usable secret again.
    """
    endpoint = _endpoint(session, endpoint_id, organization_id)
    box = SecretBox.from_settings(settings)
    secret = generate_secret()
    grace = settings.webhook_rotation_grace_seconds
    try:
        box.decrypt(endpoint.secret_encrypted)
        old_readable = True
    except SecretKeyError:
        old_readable = False
    if grace > 0 and old_readable:
        expires = session.scalar(text("SELECT now() + make_interval(secs => :s)"), {"s": grace})
        # Re-encrypted with the current key, so the previous keys can be retired.
        endpoint.previous_secret_encrypted = box.encrypt(box.decrypt(endpoint.secret_encrypted))
        endpoint.previous_secret_expires_at = expires
    else:
        endpoint.previous_secret_encrypted = None
        endpoint.previous_secret_expires_at = None
    endpoint.secret_encrypted = box.encrypt(secret)
    session.flush()
    return secret


def send_test_event(session: Session, endpoint_id: uuid.UUID, *, organization_id: uuid.UUID) -> str:
    """Queue a `webhook.test` message to one endpoint (even a disabled one's URL is not called:
    the endpoint must be enabled); returns its `webhook-id`."""
    endpoint = _endpoint(session, endpoint_id, organization_id)
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
    session: Session,
    event_id: int,
    *,
    organization_id: uuid.UUID,
    endpoint_id: uuid.UUID | None = None,
) -> list[str]:
    """Deliver an audit event again, now: to one endpoint, or to every enabled endpoint of its
    organization that wants its type; returns the `webhook-id`s.

    An existing delivery is reset (same `webhook-id` and message: the receiver's idempotency key
    still recognises it); an endpoint that never had one gets a new delivery, rendered now.
    """
    exists = session.scalar(
        text("SELECT 1 FROM audit_events WHERE id = :id AND organization_id = :organization_id"),
        {"id": event_id, "organization_id": organization_id},
    )
    if exists is None:
        raise EndpointNotFoundError(f"no audit event {event_id}")
    if endpoint_id is not None:
        _endpoint(session, endpoint_id, organization_id)
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
                       AND (w.event_types IS NULL
                            AND e.event_type <> 'verification_requested'
                            OR 'account.' || e.event_type = ANY (w.event_types)))
             WHERE e.id = :event_id AND e.account_id IS NOT NULL
               AND e.organization_id = :organization_id
            ON CONFLICT (event_id, endpoint_id) DO UPDATE
               SET next_attempt_at = now(), attempts = 0, delivered_at = NULL, given_up_at = NULL,
                   last_error = NULL, last_status_code = NULL,
                   -- An attempt in flight must not record over the replay: clearing its lease
                   -- makes its result "lease lost", and the replay is claimable at once.
                   lease_id = NULL, lease_expires_at = NULL
            RETURNING id
            """
        ),
        {"event_id": event_id, "endpoint_id": endpoint_id, "organization_id": organization_id},
    ).all()
    return [message_id(i) for i in ids]
