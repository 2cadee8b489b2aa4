"""Accounts that become due are dispatched at once: the notifying trigger, beat's listener, and
the whole path through real `celery beat` and `celery worker` processes."""

from __future__ import annotations

import json
import threading
import time
import uuid
from base64 import b64decode
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
import redis
from alembic import command
from sqlalchemy import create_engine, select, update
from sqlalchemy.orm import Session, sessionmaker

from models import AccountStatus, AwsAccount
from sandbox.standin import StsStandIn
from tests.conftest import alembic_config, create_scratch_database, drop_scratch_database
from tests.factories import make_account, make_organization
from tests.processes import running, service_env, start_beat, start_worker, wait_until
from worker.app import app
from worker.claims import claim_due_accounts, release_leases
from worker.listener import (
    CHANNEL,
    DISPATCH_TASK,
    DueAccountsListener,
    listen_conninfo,
    listen_for_due_accounts,
)
from worker.queues import DISPATCH_QUEUE
from worker.settings import Settings

# Long enough for a notification sent at commit to arrive on a loaded machine; only the tests
# that expect none wait for all of it.
DELIVERY_SECONDS = 2.0


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    """A migrated database for this module, whose transactions really commit (a notification
    is only sent at commit)."""
    url = create_scratch_database("verifier_listener")
    command.upgrade(alembic_config(url), "head")
    yield url
    drop_scratch_database(url)


@pytest.fixture(scope="module")
def sessions(database: str) -> Iterator[sessionmaker[Session]]:
    """Sessions on the module's database."""
    engine = create_engine(f"postgresql+psycopg://{database.partition('://')[2]}")
    yield sessionmaker(engine, expire_on_commit=False)
    engine.dispose()


class Notifications:
    """A connection listening on the trigger's channel, as beat's listener does."""

    def __init__(self, url: str) -> None:
        self.conn = psycopg.connect(url, autocommit=True)
        self.conn.execute(f"LISTEN {CHANNEL}")

    def count(self) -> int:
        """Notifications received within DELIVERY_SECONDS."""
        return sum(1 for _ in self.conn.notifies(timeout=DELIVERY_SECONDS))

    def first(self) -> bool:
        """Whether one arrives within DELIVERY_SECONDS (returns at the first)."""
        return any(True for _ in self.conn.notifies(timeout=DELIVERY_SECONDS, stop_after=1))


@pytest.fixture
def notifications(database: str) -> Iterator[Notifications]:
    """A listening connection with nothing pending."""
    listening = Notifications(database)
    listening.count()  # drop anything an earlier test's commits left
    yield listening
    listening.conn.close()


def _insert(sessions: sessionmaker[Session], count: int = 1, **fields: object) -> list[uuid.UUID]:
    with sessions.begin() as session:
        organization = make_organization(session)
        return [make_account(session, organization=organization, **fields).id for _ in range(count)]


LATER = datetime.now(UTC) + timedelta(days=1)


def test_an_inserted_due_account_notifies(
    sessions: sessionmaker[Session], notifications: Notifications
) -> None:
    """A row inserted due now (the default) sends one notification when it commits."""
    _insert(sessions)
    assert notifications.count() == 1


def test_a_bulk_insert_notifies_once(
    sessions: sessionmaker[Session], notifications: Notifications
) -> None:
    """Fifty rows in one transaction are one notification: one dispatch claims them all."""
    _insert(sessions, 50)
    assert notifications.count() == 1


def test_an_account_due_later_does_not_notify(
    sessions: sessionmaker[Session], notifications: Notifications
) -> None:
    """A row inserted due tomorrow is the periodic dispatch's business."""
    _insert(sessions, next_due_at=LATER)
    assert notifications.count() == 0


def test_claims_and_applied_results_do_not_notify(
    sessions: sessionmaker[Session], notifications: Notifications
) -> None:
    """The dispatcher's claim (a lease) and a result applied (due later, lease cleared) are the
    worker's own writes at scale: they send nothing."""
    (account_id,) = _insert(sessions)
    assert notifications.first()
    with sessions.begin() as session:
        claim = claim_due_accounts(session, limit=10_000, lease_seconds=60)
    assert account_id in claim.account_ids
    with sessions.begin() as session:
        session.execute(
            update(AwsAccount)
            .where(AwsAccount.id == account_id)
            .values(lease_id=None, lease_expires_at=None, next_due_at=LATER)
        )
    assert notifications.count() == 0


def test_an_edited_role_notifies(
    sessions: sessionmaker[Session], notifications: Notifications
) -> None:
    """Editing the role of an account due tomorrow makes it due now (the change-tracking
    trigger), and that is announced."""
    (account_id,) = _insert(sessions, next_due_at=LATER)
    assert notifications.count() == 0
    with sessions.begin() as session:
        account = session.get_one(AwsAccount, account_id)
        account.role_arn = f"arn:aws:iam::{account.aws_account_id}:role/Edited"
    assert notifications.count() == 1


def test_a_lease_given_back_due_now_notifies(
    sessions: sessionmaker[Session], notifications: Notifications
) -> None:
    """Accounts a full window gives back, due at once, are announced for any process to take."""
    (account_id,) = _insert(sessions)
    with sessions.begin() as session:
        claim = claim_due_accounts(session, limit=10_000, lease_seconds=60)
    assert notifications.count() == 1  # the insert only
    with sessions.begin() as session:
        release_leases(session, [account_id], claim.lease_id, due_in_seconds=0)
    assert notifications.count() == 1


class Wakes:
    """A wake-up callback that counts its calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.called = threading.Event()

    def __call__(self) -> None:
        self.calls += 1
        self.called.set()

    def wait(self) -> bool:
        """Wait for the next call (generously)."""
        woke = self.called.wait(timeout=30)
        self.called.clear()
        return woke


def _listener(database: str, wake: Wakes) -> DueAccountsListener:
    listener = DueAccountsListener(listen_conninfo(Settings(database_url=database)), wake).start()
    assert listener.listening.wait(timeout=30)
    return listener


def test_the_listener_wakes_when_an_account_becomes_due(
    database: str, sessions: sessionmaker[Session]
) -> None:
    """An insert committed by anyone (here: the test, as the API) wakes the listener."""
    wake = Wakes()
    listener = _listener(database, wake)
    try:
        _insert(sessions)
        assert wake.wait()
    finally:
        listener.stop()


def test_the_listener_reconnects_after_its_connection_is_cut(
    database: str, sessions: sessionmaker[Session]
) -> None:
    """Its backend terminated (as by a database restart), the listener connects again, wakes
    once for what it may have missed, and hears the next insert."""
    wake = Wakes()
    listener = _listener(database, wake)
    try:
        with psycopg.connect(database, autocommit=True) as admin:
            terminated = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE application_name = 'account-verifier-listener' AND datname = %s",
                (database.rpartition("/")[2],),
            ).fetchone()
        assert terminated == (1,)
        assert wake.wait(), "the wake-up on reconnecting"
        assert listener.listening.wait(timeout=30)
        _insert(sessions)
        assert wake.wait(), "the wake-up for the insert"
    finally:
        listener.stop()


def _dispatches(broker: redis.Redis) -> list[str]:
    messages = [json.loads(raw) for raw in broker.lrange(DISPATCH_QUEUE, 0, -1)]
    return [str(message["headers"]["task"]) for message in messages]


def test_beat_sends_one_dispatch_while_one_is_waiting(
    database: str, sessions: sessionmaker[Session], broker: redis.Redis
) -> None:
    """A notification sends the dispatch task to its queue; more notifications while that
    message still waits send nothing more (it will claim their rows too)."""
    listener = listen_for_due_accounts(app, Settings(database_url=database))
    try:
        assert listener.listening.wait(timeout=30)
        _insert(sessions)
        wait_until(lambda: _dispatches(broker), timeout=30, what="a dispatch message")
        for _ in range(3):
            _insert(sessions)
        time.sleep(DELIVERY_SECONDS)  # their notifications arrive and are handled
        assert _dispatches(broker) == [DISPATCH_TASK]
        body = json.loads(b64decode(json.loads(broker.lrange(DISPATCH_QUEUE, 0, 0)[0])["body"]))
        assert body[0] == []  # no arguments: the ordinary dispatch
    finally:
        listener.stop()


@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_an_inserted_account_is_verified_without_waiting_for_beats_tick(
    scratch_database: str,
    scratch_sessions: sessionmaker[Session],
    broker: redis.Redis,
    redis_url: str,
    tmp_path: Path,
) -> None:
    """With beat's periodic dispatch an hour apart, an account the API inserts (without
    requesting a verification) is still verified: beat's listener dispatched it."""
    with StsStandIn(median_ms=5, seed=4) as sts:
        env = service_env(
            database_url=scratch_database,
            redis_url=redis_url,
            sts_url=sts.endpoint_url,
            DISPATCH_INTERVAL_SECONDS="3600",
        )
        worker, beat = start_worker(env, tmp_path), start_beat(env, tmp_path)
        with running(worker, beat):
            wait_until(lambda: beat.events("listener.listening"), timeout=60, what="listening")
            wait_until(lambda: worker.events("worker.ready"), timeout=60, what="worker ready")
            (account_id,) = _insert(scratch_sessions)

            def status() -> AccountStatus | None:
                with scratch_sessions() as session:
                    return session.scalar(
                        select(AwsAccount.status).where(AwsAccount.id == account_id)
                    )

            # Far less than the hour beat's tick would take; generous for a loaded machine.
            wait_until(lambda: status() is AccountStatus.CONNECTED, timeout=60, what="connected")
