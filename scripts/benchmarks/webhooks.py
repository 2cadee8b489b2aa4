"""`scripts/bench --webhooks`: an endpoint per organization, all pointing at one local receiver.

Every seeded account's first status change (pending -> connected) is then announced to its
organization's endpoint. The receiver (a thread of the bench process) verifies each signature
with `standardwebhooks`; after the run the bench waits for every delivery and reports how many
arrived, duplicates by webhook-id, and the event -> delivery latency (audit event's time to the
delivery's `delivered_at`, both the database's clock).
"""

from __future__ import annotations

import time
from typing import Any

import psycopg

from models.webhooks import message_id
from sandbox.webhook_receiver import Received, WebhookReceiver
from scripts.benchmarks.common import percentile, rounded
from worker.webhooks.signing import SecretBox, generate_key, generate_secret


class WebhookBench:
    """The receiver, the key and the secret shared by every endpoint of a bench run."""

    def __init__(self) -> None:
        self.key = generate_key()
        self.secret = generate_secret()
        # HTTP/1.1 keep-alive, as most real servers: the worker keeps its connection.
        self.receiver = WebhookReceiver(secrets=[self.secret], keep_alive=True)

    def env(self) -> dict[str, str]:
        """For worker and beat: the key, and loopback allowed (the receiver's)."""
        return {"WEBHOOK_SECRET_KEY": self.key, "WEBHOOK_ALLOW_PRIVATE_NETWORKS": "true"}

    def start(self) -> None:
        """Start receiving."""
        self.receiver.start()

    def stop(self) -> None:
        """Stop receiving."""
        self.receiver.stop()

    def register(self, cursor: psycopg.Cursor[Any]) -> None:
        """One endpoint per organization (inside the seed's transaction, before any is due)."""
        cursor.execute(
            "INSERT INTO webhook_endpoints (id, organization_id, url, event_types, "
            "secret_encrypted) SELECT gen_random_uuid(), id, %s, %s, %s FROM organizations",
            (
                self.receiver.url,
                ["account.status_changed"],
                SecretBox(self.key).encrypt(self.secret),
            ),
        )

    def measure(self, url: str, *, timeout: float) -> dict[str, Any]:
        """Wait (up to `timeout`) for every delivery to finish; the figures."""
        query = (
            "SELECT count(*), count(*) FILTER (WHERE d.next_attempt_at IS NULL),"
            " count(*) FILTER (WHERE d.delivered_at IS NOT NULL),"
            " percentile_cont(0.5) WITHIN GROUP"
            "  (ORDER BY extract(epoch FROM d.delivered_at - e.occurred_at)),"
            " percentile_cont(0.99) WITHIN GROUP"
            "  (ORDER BY extract(epoch FROM d.delivered_at - e.occurred_at)),"
            " (SELECT count(*) FROM audit_events WHERE event_type = 'status_changed')"
            " FROM webhook_deliveries AS d JOIN audit_events AS e ON e.id = d.event_id"
        )
        deadline = time.monotonic() + timeout
        with psycopg.connect(url, autocommit=True) as conn:
            while True:
                row = conn.execute(query).fetchone()
                assert row is not None  # noqa: S101 - an aggregate returns a row
                total, finished, delivered, p50, p99, events = row
                if (total == events and finished == total) or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            received = _receipt_latencies(conn, self.receiver.accepted())
        accepted = self.receiver.accepted_ids()
        return {
            "status_changes": events,
            "deliveries": total,
            "delivered": delivered,
            "received_verified": len(accepted),
            "duplicates": sum(n - 1 for n in accepted.values()),
            "unverified": sum(1 for r in self.receiver.snapshot() if not r.verified),
            "event_to_delivery_p50_seconds": None if p50 is None else round(p50, 3),
            "event_to_delivery_p99_seconds": None if p99 is None else round(p99, 3),
            # When the receiver had the message: what the customer sees (delivered_at is later,
            # by the answer, the batch's record and its commit).
            "event_to_receipt_p50_seconds": rounded(percentile(received, 0.5)),
            "event_to_receipt_p99_seconds": rounded(percentile(received, 0.99)),
        }


def _receipt_latencies(conn: psycopg.Connection[Any], accepted: list[Received]) -> list[float]:
    """Seconds from each audit event to the receiver's first acceptance of its message (the
    same machine's clock: the database's and the receiver's)."""
    first: dict[str, float] = {}
    for item in accepted:
        first[item.webhook_id] = min(item.at, first.get(item.webhook_id, item.at))
    rows = conn.execute(
        "SELECT d.id, extract(epoch FROM e.occurred_at)"
        " FROM webhook_deliveries AS d JOIN audit_events AS e ON e.id = d.event_id"
    ).fetchall()
    return sorted(
        first[message_id(delivery_id)] - float(occurred)
        for delivery_id, occurred in rows
        if message_id(delivery_id) in first
    )
