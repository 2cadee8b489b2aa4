"""The in-process trace: SQL statements per verification of the worker's own task code."""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from scripts.benchmarks.sampling import pg_database_stats, wait_no_backends
from scripts.benchmarks.seeding import Account, seed_accounts
from scripts.benchmarks.services import database_name


@dataclass
class TraceResult:
    """What `count` in-process verifications sent to PostgreSQL."""

    verifications: int
    applied: int
    statements: int
    transactions: int
    checkouts: int
    xact_commit: int
    by_kind: dict[str, int]
    claim_statements: int
    claim_batch: int
    cpu_seconds: float
    cpu_measured: int


def _verify_in_chunks(
    account_ids: Sequence[uuid.UUID], lease_id: uuid.UUID
) -> tuple[list[str], float, int]:
    """Verify leased accounts chunk by chunk as the worker's task does, on one thread.

    Returns each result, the CPU seconds spent and how many verifications that CPU covers (the
    first chunk builds clients and caches; the CPU figure leaves it out).
    """
    from worker.chunk import verify_chunk  # noqa: PLC0415 - boto3 only when needed
    from worker.resources import process_resources  # noqa: PLC0415

    deps = process_resources().deps
    size = deps.settings.dispatch_chunk_size
    chunks = [account_ids[i : i + size] for i in range(0, len(account_ids), size)]
    warmup = len(chunks[0]) if len(chunks) > 1 else 0
    results: list[str] = []
    cpu = 0.0
    for i, chunk in enumerate(chunks):
        started = time.process_time()
        done = verify_chunk(deps, chunk, lease_id, actor="bench")
        results.extend(result.value for result in done.values())
        if i > 0 or not warmup:
            cpu += time.process_time() - started
    return results, cpu, len(account_ids) - warmup


def trace_verifications(
    admin: psycopg.Connection[Any], url: str, accounts: Sequence[Account], *, lease_seconds: int
) -> TraceResult:
    """Seed `accounts`, claim them as the dispatcher does and verify each, in this process.

    The same code as the worker (`claim_due_accounts`, then `worker.chunk`'s steps for each
    chunk, as `verify_accounts_task` runs them, with the worker's resources and chunk size), on
    this thread instead of the window's, with
    SQLAlchemy's events counting statements, transactions and pool checkouts (each checkout
    is a `SELECT 1` pre-ping when the engine pings), and pg_stat_database counting what the
    server saw committed. The environment (DATABASE_URL, REDIS_URL, AWS_*) must point at the
    run's services already.
    """
    from sqlalchemy import Engine, event  # noqa: PLC0415
    from sqlalchemy.pool import Pool  # noqa: PLC0415

    from worker.claims import claim_due_accounts  # noqa: PLC0415
    from worker.db import session_factory  # noqa: PLC0415
    from worker.logging import configure_logging  # noqa: PLC0415
    from worker.resources import close_process_resources  # noqa: PLC0415
    from worker.settings import get_settings  # noqa: PLC0415

    get_settings.cache_clear()
    configure_logging(get_settings(), stream=sys.stderr)
    counts: dict[str, int] = {"statements": 0, "commits": 0, "checkouts": 0}
    kinds: dict[str, int] = {}

    def on_statement(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        counts["statements"] += 1
        words = statement.split(None, 1)
        kind = words[0].upper() if words else "?"
        kinds[kind] = kinds.get(kind, 0) + 1

    listeners: list[tuple[Any, str, Callable[..., None]]] = [
        (Engine, "before_cursor_execute", on_statement),
        (Engine, "commit", lambda *_: counts.__setitem__("commits", counts["commits"] + 1)),
        (Pool, "checkout", lambda *_: counts.__setitem__("checkouts", counts["checkouts"] + 1)),
    ]
    seed_accounts(url, accounts)
    name = database_name(url)
    wait_no_backends(admin, name)
    before = pg_database_stats(admin, name)["xact_commit"]
    sessions = session_factory()
    for target, name_, listener in listeners:
        event.listen(target, name_, listener)
    try:
        with sessions.begin() as session:
            claim = claim_due_accounts(session, limit=len(accounts), lease_seconds=lease_seconds)
        claim_statements = counts["statements"]
        claim_commits = counts["commits"]
        for key in counts:
            counts[key] = 0
        kinds.clear()
        results, cpu, measured = _verify_in_chunks(claim.account_ids, claim.lease_id)
    finally:
        for target, name_, listener in listeners:
            event.remove(target, name_, listener)
        close_process_resources()
    wait_no_backends(admin, name)
    after = pg_database_stats(admin, name)["xact_commit"]
    return TraceResult(
        verifications=len(claim.account_ids),
        applied=sum(1 for r in results if r == "applied"),
        statements=counts["statements"],
        transactions=counts["commits"],
        checkouts=counts["checkouts"],
        xact_commit=after - before - claim_commits,
        by_kind=dict(sorted(kinds.items())),
        claim_statements=claim_statements,
        claim_batch=len(claim.account_ids),
        cpu_seconds=cpu,
        cpu_measured=measured,
    )
