"""Manage organizations' webhook endpoints: the calls the API makes, for operators.

Examples:
  webhooks create --organization 0b6c... --url https://hooks.example.com/verifier
  webhooks list --organization 0b6c... --json
  webhooks deliveries ENDPOINT_ID
  webhooks test ENDPOINT_ID
  webhooks rotate ENDPOINT_ID
  webhooks disable ENDPOINT_ID --reason "customer asked"
  webhooks enable ENDPOINT_ID
  webhooks replay EVENT_ID [--endpoint ENDPOINT_ID]
  webhooks new-key

An operator's tool: it acts on any organization's endpoint, looking up the organization of
the endpoint (or event) given (the API's calls always take the caller's organization).

`create` and `rotate` print the signing secret once: it is stored encrypted with
WEBHOOK_SECRET_KEY and cannot be shown again. After `rotate` the old secret keeps signing for
WEBHOOK_ROTATION_GRACE_SECONDS. `test` and `replay` queue messages that the worker delivers.

Exit codes: 0 done; 2 bad usage, an unknown id or a refused URL; 3 the database cannot be
reached.
"""

from __future__ import annotations

import argparse
import getpass
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from scripts import _cli
from scripts._cli import EXIT_OK, UsageError, database_unreachable, table
from worker.db import session_factory
from worker.redact import escape_controls
from worker.settings import Settings
from worker.webhooks import (
    EVENT_TYPES,
    DeliveryInfo,
    EndpointInfo,
    EndpointNotFoundError,
    SecretKeyError,
    UnsafeUrlError,
    create_endpoint,
    disable,
    enable,
    list_deliveries,
    list_endpoints,
    operator_endpoint_organization,
    operator_event_organization,
    operator_list_all_endpoints,
    replay_event,
    rotate_secret,
    send_test_event,
)
from worker.webhooks.signing import generate_key


def _uuid(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a UUID") from None


def _parser() -> argparse.ArgumentParser:
    parser = _cli.parser("webhooks", __doc__)
    parser.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    create = commands.add_parser("create", help="register an endpoint; prints its secret once")
    create.add_argument("--organization", type=_uuid, required=True, metavar="UUID")
    create.add_argument("--url", required=True)
    create.add_argument(
        "--event-type",
        action="append",
        choices=EVENT_TYPES,
        dest="event_types",
        help="wanted event type (repeat; default: all)",
    )
    create.add_argument("--description")
    listing = commands.add_parser("list", help="endpoints (of one organization)")
    listing.add_argument("--organization", type=_uuid, metavar="UUID")
    deliveries = commands.add_parser("deliveries", help="an endpoint's latest deliveries")
    deliveries.add_argument("endpoint", type=_uuid)
    deliveries.add_argument("--limit", type=int, default=20)
    for name, text in (
        ("test", "queue a webhook.test message"),
        ("rotate", "new signing secret; prints it once"),
        ("enable", "deliver again (new events)"),
    ):
        commands.add_parser(name, help=text).add_argument("endpoint", type=_uuid)
    disabling = commands.add_parser("disable", help="stop delivering (audited)")
    disabling.add_argument("endpoint", type=_uuid)
    disabling.add_argument("--reason", default="disabled by an operator")
    replay = commands.add_parser("replay", help="deliver an audit event again")
    replay.add_argument("event", type=int, metavar="EVENT_ID")
    replay.add_argument("--endpoint", type=_uuid, help="only to this endpoint")
    commands.add_parser("new-key", help="print a new WEBHOOK_SECRET_KEY")
    return parser


def _actor() -> str:
    return f"script:webhooks:{getpass.getuser()}"


def _endpoint_lines(endpoints: Sequence[EndpointInfo]) -> list[str]:
    rows = [
        [
            str(e.id),
            "enabled" if e.enabled else f"DISABLED ({escape_controls(str(e.disabled_reason))})",
            escape_controls(e.url),
            "[all]" if e.event_types is None else f"[{', '.join(e.event_types)}]",
        ]
        for e in endpoints
    ]
    return table(rows)[0] or ["no endpoint"]


def _delivery_lines(deliveries: Sequence[DeliveryInfo]) -> list[str]:
    rows = [
        [
            d.webhook_id,
            d.event_type,
            f"attempts {d.attempts}",
            "delivered"
            if d.delivered_at
            else "given up"
            if d.given_up_at
            else f"next {d.next_attempt_at:%Y-%m-%d %H:%M:%S}"
            if d.next_attempt_at
            else "?",
            f"last {d.last_status_code}" if d.last_status_code else "",
            escape_controls(d.last_error) if d.last_error else "",
        ]
        for d in deliveries
    ]
    return table(rows)[0] or ["no delivery"]


def _act(session: Session, args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    """Run the command; returns what --json prints (and the text lines under "lines")."""
    command = args.command
    endpoint_id: uuid.UUID | None = getattr(args, "endpoint", None)
    # The operator's path: the organization is looked up, not given by a caller.
    organization_id = (
        operator_endpoint_organization(session, endpoint_id) if endpoint_id is not None else None
    )
    if command == "create":
        created = create_endpoint(
            session,
            organization_id=args.organization,
            url=args.url,
            settings=settings,
            event_types=args.event_types,
            description=args.description,
        )
        return {
            "endpoint": created.endpoint.as_json(),
            "secret": created.secret,
            "lines": [
                *_endpoint_lines([created.endpoint]),
                f"signing secret (shown once): {created.secret}",
            ],
        }
    if command == "list":
        endpoints = (
            operator_list_all_endpoints(session)
            if args.organization is None
            else list_endpoints(session, organization_id=args.organization)
        )
        return {"endpoints": [e.as_json() for e in endpoints], "lines": _endpoint_lines(endpoints)}
    if command == "deliveries":
        assert organization_id is not None  # noqa: S101 - the argument is required
        found = list_deliveries(
            session, args.endpoint, organization_id=organization_id, limit=args.limit
        )
        return {"deliveries": [d.as_json() for d in found], "lines": _delivery_lines(found)}
    if command == "replay":
        ids = replay_event(
            session,
            args.event,
            organization_id=operator_event_organization(session, args.event),
            endpoint_id=args.endpoint,
        )
        return {
            "webhookIds": ids,
            "lines": [f"queued {i}" for i in ids] or ["no enabled endpoint wants this event"],
        }
    if organization_id is None:
        raise UsageError(f"unknown command {command}")
    if command == "test":
        webhook_id = send_test_event(session, args.endpoint, organization_id=organization_id)
        return {"webhookId": webhook_id, "lines": [f"queued {webhook_id}"]}
    if command == "rotate":
        secret = rotate_secret(
            session, args.endpoint, organization_id=organization_id, settings=settings
        )
        grace = settings.webhook_rotation_grace_seconds
        return {
            "secret": secret,
            "previousSecretValidSeconds": grace,
            "lines": [
                f"new signing secret (shown once): {secret}",
                f"the previous secret keeps signing for {grace} s",
            ],
        }
    if command == "disable":
        info = disable(
            session,
            args.endpoint,
            organization_id=organization_id,
            reason=args.reason,
            actor=_actor(),
        )
        return {"endpoint": info.as_json(), "lines": _endpoint_lines([info])}
    if command == "enable":
        info = enable(session, args.endpoint, organization_id=organization_id, settings=settings)
        return {"endpoint": info.as_json(), "lines": _endpoint_lines([info])}
    raise UsageError(f"unknown command {command}")


def run(argv: Sequence[str] | None = None, *, out: Callable[[str], None] = print) -> int:
    """The command; returns the exit code."""
    args = _parser().parse_args(argv)
    if args.command == "new-key":
        key = generate_key()
        if args.json:
            _cli.print_json({"key": key}, indent=None, out=out)
        else:
            out(key)
        return EXIT_OK
    settings = _cli.load_settings("webhooks", stack_env=False)
    try:
        with session_factory().begin() as session:
            result = _act(session, args, settings)
    except OperationalError as error:
        raise database_unreachable(settings, error) from None
    except (EndpointNotFoundError, UnsafeUrlError, SecretKeyError, ValueError) as error:
        raise UsageError(str(error)) from None
    lines = result.pop("lines")
    if args.json:
        _cli.print_json(result, out=out)
    else:
        for line in lines:
            out(line)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: maps errors to exit codes and messages."""
    return _cli.run_main("webhooks", run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
