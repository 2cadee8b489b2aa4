"""An endpoint's deliveries as an operator or the API lists them."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from models import WebhookDelivery, WebhookEndpoint
from worker.webhooks.endpoints import optional_timestamp


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
            "nextAttemptAt": optional_timestamp(self.next_attempt_at),
            "deliveredAt": optional_timestamp(self.delivered_at),
            "givenUpAt": optional_timestamp(self.given_up_at),
        }


def list_deliveries(
    session: Session, endpoint_id: uuid.UUID, *, organization_id: uuid.UUID, limit: int = 50
) -> list[DeliveryInfo]:
    """An endpoint's latest deliveries, newest first (none for another organization's)."""
    rows = session.scalars(
        select(WebhookDelivery)
        .join(WebhookEndpoint, WebhookEndpoint.id == WebhookDelivery.endpoint_id)
        .where(
            WebhookDelivery.endpoint_id == endpoint_id,
            WebhookEndpoint.organization_id == organization_id,
        )
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
