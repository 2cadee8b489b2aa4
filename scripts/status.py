"""The fleet at a glance: accounts per status, the due backlog, leases, failures, the circuit
breaker, the STS budget, the queues and the last dispatch.

Examples:
  scripts/status
  scripts/status --organization 0b6c0f6e-... --organization 5aec288c-...
  scripts/status --json
  scripts/status --watch 5

Reads the database (one scan of the accounts table: well under a second at a million accounts)
and Redis; changes nothing. "Overdue" means due for longer than --overdue (default: the
connected accounts' cadence, CONNECTED_INTERVAL_SECONDS).

Exit codes: 0 shown; 2 bad usage; 3 the database or Redis cannot be reached.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import redis
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from models import Organization
from scripts import _cli
from scripts._cli import EXIT_OK, UnreachableError, UsageError, database_unreachable, table
from worker.db import session_factory
from worker.fleet import BrokerState, FleetSummary, read_broker_state, summarize_fleet
from worker.redact import escape_controls
from worker.settings import Settings

STATUSES = ("pending", "connected", "failed")


def _parser() -> argparse.ArgumentParser:
    parser = _cli.parser("scripts/status", __doc__)
    parser.add_argument(
        "--organization",
        action="append",
        default=[],
        metavar="UUID",
        help="only these organizations, each shown on its own (repeatable)",
    )
    parser.add_argument(
        "--overdue",
        type=float,
        default=None,
        metavar="SECONDS",
        help="count accounts due for longer than this (default CONNECTED_INTERVAL_SECONDS)",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument(
        "--watch",
        type=float,
        nargs="?",
        const=2.0,
        default=None,
        metavar="SECONDS",
        help="refresh every SECONDS (default 2) until Ctrl-C",
    )
    return parser


def _organizations(values: Sequence[str]) -> list[uuid.UUID]:
    found = []
    for value in values:
        try:
            found.append(uuid.UUID(value))
        except ValueError:
            raise UsageError(f"organization id {escape_controls(value)!r} is not a UUID") from None
    return found


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s ago"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    parts = [f"{days}d"] * bool(days) + [f"{hours}h"] * bool(hours) + [f"{minutes}m"]
    return " ".join(parts if days or hours else [*parts, f"{secs}s"]) + " ago"


def _duration(seconds: float) -> str:
    return _ago(seconds).removesuffix(" ago")


def collect(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    """Everything shown, as JSON-ready values."""
    organizations = _organizations(args.organization)
    overdue = settings.connected_interval_seconds if args.overdue is None else args.overdue
    if overdue < 0:
        raise UsageError("--overdue must not be negative")
    started = time.perf_counter()
    try:
        with session_factory()() as session:
            fleet = summarize_fleet(session, overdue_seconds=overdue, organizations=organizations)
            groups: list[tuple[uuid.UUID, str | None, FleetSummary]] = []
            if organizations:
                names = {
                    row.id: row.name
                    for row in session.execute(
                        select(Organization.id, Organization.name).where(
                            Organization.id.in_(organizations)
                        )
                    )
                }
                for organization in organizations:
                    groups.append(
                        (
                            organization,
                            names.get(organization),
                            summarize_fleet(
                                session, overdue_seconds=overdue, organizations=[organization]
                            ),
                        )
                    )
    except OperationalError as error:
        raise database_unreachable(settings, error) from None
    database_seconds = time.perf_counter() - started
    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=3, socket_timeout=3)
    try:
        broker = read_broker_state(client, ceiling_per_second=settings.sts_rate_limit_per_second)
    except redis.RedisError as error:
        raise UnreachableError(
            f"cannot reach Redis at {settings.redis_url_masked}: {error}"
        ) from None
    finally:
        client.close()
    report = {
        "at": datetime.now(UTC).isoformat(),
        "databaseSeconds": round(database_seconds, 3),
        "overdueSeconds": overdue,
        **_fleet_json(fleet),
        **_broker_json(broker),
        "stsRateCeilingPerSecond": settings.sts_rate_limit_per_second,
    }
    if organizations:
        report["organizations"] = [
            {"id": str(org), "name": name, **_fleet_json(summary)} for org, name, summary in groups
        ]
    return report


def _fleet_json(summary: FleetSummary) -> dict[str, Any]:
    return {
        "accounts": summary.total,
        "byStatus": {status: summary.by_status.get(status, 0) for status in STATUSES},
        "due": summary.due,
        "overdue": summary.overdue,
        "oldestDueSeconds": round(summary.oldest_due_seconds, 1) if summary.due else None,
        "leased": summary.leased,
        "leaseExpired": summary.lease_expired,
        "failures": [
            {"outcome": outcome, "errorCode": code, "accounts": count}
            for (outcome, code), count in sorted(
                summary.failures.items(), key=lambda item: (-item[1], item[0])
            )
        ],
    }


def _broker_json(state: BrokerState) -> dict[str, Any]:
    circuit = None
    if state.circuit is not None:
        circuit = {
            "errorCode": state.circuit.get("code"),
            "message": state.circuit.get("message"),
            "openedSeconds": round(time.time() - float(state.circuit.get("opened_at", 0)), 1),
        }
    last = state.last_dispatch
    return {
        "circuit": circuit,
        "stsRatePerSecond": round(state.sts_rate_per_second, 1),
        "queues": state.queues,
        "lastDispatch": None
        if last is None
        else {
            "seconds": round(time.time() - float(last.get("at", 0)), 1),
            "claimed": last.get("claimed"),
            "messages": last.get("messages"),
            "paused": last.get("paused"),
        },
    }


def _counts(report: dict[str, Any]) -> str:
    statuses = "   ".join(f"{s} {report['byStatus'][s]:,}" for s in STATUSES)
    return f"{report['accounts']:,}   {statuses}"


def _backlog_lines(report: dict[str, Any], overdue: float, indent: str = "") -> list[str]:
    oldest = report["oldestDueSeconds"]
    lines = [
        f"{indent}due now          {report['due']:,}"
        + (f"   oldest due for {_duration(oldest)}" if oldest is not None else ""),
        f"{indent}overdue > {_duration(overdue):<6} {report['overdue']:,}",
        f"{indent}under lease      {report['leased']:,}"
        + (f"   expired, not yet claimed again: {report['leaseExpired']:,}"),
    ]
    if report["failures"]:
        lines.append(f"{indent}not verified, by last error:")
        rows = [
            [f["outcome"], escape_controls(f["errorCode"]), f"{f['accounts']:,}"]
            for f in report["failures"][:15]
        ]
        lines += table(rows, right={2}, indent=f"{indent}  ")[0]
        if len(report["failures"]) > 15:
            lines.append(f"{indent}  ... {len(report['failures']) - 15} more (--json has all)")
    return lines


def render(report: dict[str, Any]) -> str:
    """The report as terminal lines (customer and AWS text escaped)."""
    lines = [
        f"account verifier   {report['at'][:19].replace('T', ' ')} UTC   "
        f"(database read in {report['databaseSeconds']:.2f}s)",
        "",
        f"accounts         {_counts(report)}",
        *_backlog_lines(report, report["overdueSeconds"]),
        "",
    ]
    circuit = report["circuit"]
    if circuit is None:
        lines.append("circuit breaker  closed")
    else:
        lines.append(
            f"circuit breaker  OPEN for {_duration(circuit['openedSeconds'])}: "
            f"{escape_controls(str(circuit['errorCode']))} "
            f"({escape_controls(str(circuit['message']))[:160]})"
        )
    rate, ceiling = report["stsRatePerSecond"], report["stsRateCeilingPerSecond"]
    lines.append(f"STS rate         {rate:g}/s of {ceiling:g}/s")
    lines.append(
        "queues           " + "   ".join(f"{q} {n:,}" for q, n in report["queues"].items())
    )
    last = report["lastDispatch"]
    if last is None:
        lines.append("last dispatch    none in the last day")
    else:
        what = "paused (circuit open)" if last["paused"] else f"claimed {last['claimed']:,}"
        lines.append(f"last dispatch    {_ago(last['seconds'])}: {what}")
    for organization in report.get("organizations", []):
        name = escape_controls(organization["name"] or "(unknown organization)")
        lines += ["", f"{name} ({organization['id']})"]
        lines.append(f"  accounts         {_counts(organization)}")
        lines += _backlog_lines(organization, report["overdueSeconds"], indent="  ")
    return "\n".join(lines)


def run(argv: Sequence[str] | None = None) -> int:
    """The command; returns the exit code."""
    args = _parser().parse_args(argv)
    if args.watch is not None and args.watch <= 0:
        raise UsageError("--watch must be positive")
    settings = _cli.load_settings("status")
    while True:
        report = collect(settings, args)
        if args.json:
            _cli.print_json(report, indent=None if args.watch else 2)
        else:
            if args.watch is not None and sys.stdout.isatty():
                print("\x1b[H\x1b[2J", end="")  # clear the screen
            print(render(report), flush=True)
        if args.watch is None:
            return EXIT_OK
        time.sleep(args.watch)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: maps errors to exit codes and messages."""
    return _cli.run_main("status", run, argv, say_interrupted=False)


if __name__ == "__main__":
    raise SystemExit(main())
