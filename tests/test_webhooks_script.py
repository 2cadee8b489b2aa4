"""`scripts/webhooks` as operators run it: a real subprocess on the scratch database."""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from models import AccountStatus, AuditEvent, AuditEventType, WebhookDelivery, WebhookEndpoint
from sandbox.webhook_receiver import register_in
from tests.factories import make_account, make_organization
from tests.processes import ROOT
from worker.settings import Settings
from worker.webhooks import create_endpoint, list_endpoints
from worker.webhooks.signing import SecretBox, generate_key

WEBHOOKS = str(ROOT / "scripts" / "webhooks")


def _run(database: str, key: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "DATABASE_URL": database,
        "WEBHOOK_SECRET_KEY": key,
        "WEBHOOK_ALLOW_PRIVATE_NETWORKS": "false",
    }
    return subprocess.run(
        [WEBHOOKS, *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def _json(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_an_operator_manages_an_endpoint_from_creation_to_replay(
    scratch_database: str, scratch_sessions: sessionmaker[Session]
) -> None:
    """create prints the secret once (stored encrypted), list/test/rotate/disable/enable/replay
    do what they say, each with --json."""
    key = generate_key()
    with scratch_sessions.begin() as session:
        organization = make_organization(session)
        account = make_account(session, organization=organization)
    created = _json(
        _run(
            scratch_database,
            key,
            "--json",
            "create",
            "--organization",
            str(organization.id),
            "--url",
            "https://93.184.215.14/hook",
        )
    )
    endpoint_id = created["endpoint"]["id"]
    assert created["secret"].startswith("whsec_")
    with scratch_sessions() as session:
        stored = session.get(WebhookEndpoint, created["endpoint"]["id"])
        assert stored is not None
        assert SecretBox(key).decrypt(stored.secret_encrypted) == created["secret"]
    listed = _json(
        _run(scratch_database, key, "--json", "list", "--organization", str(organization.id))
    )
    assert [e["id"] for e in listed["endpoints"]] == [endpoint_id]
    assert created["secret"] not in json.dumps(listed)
    test = _json(_run(scratch_database, key, "--json", "test", endpoint_id))
    assert test["webhookId"].startswith("msg_")
    rotated = _json(_run(scratch_database, key, "--json", "rotate", endpoint_id))
    assert rotated["secret"] != created["secret"]
    with scratch_sessions.begin() as session:
        event = AuditEvent(
            organization_id=organization.id,
            account_id=account.id,
            event_type=AuditEventType.STATUS_CHANGED,
            actor="test",
            from_status=AccountStatus.PENDING,
            to_status=AccountStatus.CONNECTED,
            reason="verified",
        )
        session.add(event)
    replayed = _json(_run(scratch_database, key, "--json", "replay", str(event.id)))
    with scratch_sessions() as session:
        delivery = session.scalars(
            select(WebhookDelivery).where(WebhookDelivery.event_id == event.id)
        ).one()
    assert replayed["webhookIds"] == [delivery.message_id]
    disabled = _json(_run(scratch_database, key, "--json", "disable", endpoint_id, "--reason", "x"))
    assert (disabled["endpoint"]["enabled"], disabled["endpoint"]["disabledReason"]) == (False, "x")
    text = _run(scratch_database, key, "list")
    assert text.returncode == 0
    assert "DISABLED (x)" in text.stdout
    assert _json(_run(scratch_database, key, "--json", "enable", endpoint_id))["endpoint"][
        "enabled"
    ]
    deliveries = _json(_run(scratch_database, key, "--json", "deliveries", endpoint_id))
    assert {d["eventType"] for d in deliveries["deliveries"]} == {
        "webhook.test",
        "account.status_changed",
    }


def test_refused_urls_and_unknown_ids_exit_2(
    scratch_database: str, scratch_sessions: sessionmaker[Session]
) -> None:
    """The metadata service's address and an unknown endpoint are errors with a message."""
    key = generate_key()
    with scratch_sessions.begin() as session:
        organization = make_organization(session)
    refused = _run(
        scratch_database,
        key,
        "create",
        "--organization",
        str(organization.id),
        "--url",
        "https://169.254.169.254/latest/meta-data/",
    )
    assert refused.returncode == 2
    assert "link-local" in refused.stderr
    unknown = _run(scratch_database, key, "rotate", "00000000-0000-0000-0000-000000000000")
    assert unknown.returncode == 2
    assert "no webhook endpoint" in unknown.stderr
    assert _run(scratch_database, key, "--help").returncode == 0


def test_the_demo_receiver_replaces_the_endpoint_of_an_earlier_run(session: Session) -> None:
    """Each `scripts/run` starts its receiver on a new port: registering it disables the earlier
    runs' demo endpoints (they would be retried for days), keeps other endpoints, and a second
    registration of the same URL gives the same endpoint a new secret."""
    settings = Settings(webhook_secret_key=generate_key(), webhook_allow_private_networks=True)
    organization = make_organization(session)
    other = create_endpoint(
        session, organization_id=organization.id, url="https://93.184.215.14/h", settings=settings
    )
    first = register_in(session, "http://127.0.0.1:40001/webhooks", organization.id, settings)
    second = register_in(session, "http://127.0.0.1:40002/webhooks", organization.id, settings)
    again = register_in(session, "http://127.0.0.1:40002/webhooks", organization.id, settings)

    shown = {e.url: e for e in list_endpoints(session, organization_id=organization.id)}
    assert len(shown) == 3
    old = shown["http://127.0.0.1:40001/webhooks"]
    assert not old.enabled
    assert old.disabled_reason == "replaced by a newer demo receiver"
    assert shown["http://127.0.0.1:40002/webhooks"].enabled
    assert shown[other.endpoint.url].enabled
    assert len({first, second, again}) == 3
    disabled = session.scalars(
        select(AuditEvent).where(AuditEvent.event_type == AuditEventType.WEBHOOK_ENDPOINT_DISABLED)
    ).all()
    assert [e.actor for e in disabled] == ["sandbox.webhook_receiver"]
