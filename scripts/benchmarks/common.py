"""What every benchmark of the package shares: its errors, its defaults, its command-line
pieces, its statistics and the way it runs (signals, exit status, the JSON file)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Final, TypeVar

from scripts.services import ROOT, wait_until
from worker.redact import libpq_url

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

VENV_BIN: Final = Path(sys.executable).parent
CELERY: Final = str(VENV_BIN / "celery")
DEFAULT_ADMIN_URL: Final = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS_URL: Final = "redis://127.0.0.1:6379/11"
# The sample of the sequential loop and the traced accounts use these fake platform credentials.
FAKE_KEY_ID: Final = "AKIABENCHMARKKEY0001"
FAKE_SECRET: Final = "benchmark-secret"  # noqa: S105 - a fake for the stand-in
POSTGRES_SCHEMES: Final = frozenset({"postgres", "postgresql", "postgresql+psycopg"})

T = TypeVar("T")
OptionsT = TypeVar("OptionsT", bound="DataclassInstance")


class BenchError(Exception):
    """Something the operator must fix or know; printed without a traceback."""


class Interrupted(BaseException):
    """SIGTERM, turned into an exception so that every `finally` runs."""


def percentile(values: Sequence[float], share: float) -> float:
    """Linear-interpolated percentile (share in 0..1) of a non-empty sequence."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    position = (len(ordered) - 1) * share
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def rounded(value: float | None, digits: int = 3) -> float | None:
    """JSON-friendly rounding that keeps None and turns NaN into None."""
    if value is None or math.isnan(value) or math.isinf(value):
        return None
    return round(value, digits)


def wait_for(predicate: Callable[[], T | None], *, timeout: float, what: str) -> T:
    """`scripts.services.wait_until` every 0.1 s, its timeout a BenchError (printed, no
    traceback)."""
    try:
        return wait_until(predicate, timeout=timeout, interval=0.1, what=what)
    except TimeoutError:
        raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}") from None


@contextlib.contextmanager
def no_interrupts() -> Iterator[None]:
    """Clean-up must not be cut short by a second Ctrl-C or SIGTERM."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError("must be a positive number")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError("must be a number >= 0")
    return value


def env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key or not key.replace("_", "").isalnum():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return key.upper(), value


def write_json(results: dict[str, Any], path: Path | None, *, prefix: str = "") -> Path:
    """Write the results; the default path is bench-results/<prefix><UTC stamp>.json."""
    if path is None:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        path = ROOT / "bench-results" / f"{prefix}{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")
    return path


def raise_interrupted(signum: int, _frame: FrameType | None) -> None:
    raise Interrupted(signum)


def postgres_url(url: str) -> str:
    """`postgresql://...` for psycopg, whatever SQLAlchemy-style scheme `url` has; BenchError
    when it is not a PostgreSQL URL."""
    scheme, sep, _ = url.partition("://")
    if not sep or scheme not in POSTGRES_SCHEMES:
        raise BenchError(f"not a PostgreSQL URL: {url!r} (use postgresql://user@host:port/db)")
    return libpq_url(url)


AddArgument = Callable[..., Any]


def add_standin_options(add: AddArgument) -> None:
    """--median-ms and --latency-sigma: the stand-in STS's latency."""
    add("--median-ms", type=non_negative_float, default=50.0, help="STS median latency (50)")
    add(
        "--latency-sigma",
        type=non_negative_float,
        default=0.65,
        help="log-normal shape of the STS latency (0.65: p99 about 4.5x the median)",
    )


def add_worker_env_option(add: AddArgument, *, example: str) -> None:
    """--worker-env NAME=VALUE (repeatable), with `example` in its help."""
    add(
        "--worker-env",
        type=env_pair,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="another environment variable for worker and beat (repeatable), e.g. "
        f"{example}; recorded in the results",
    )


def add_json_out_option(add: AddArgument, *, prefix: str = "") -> None:
    """--json-out PATH, whose default `write_json` makes with the same `prefix`."""
    add(
        "--json-out",
        type=Path,
        default=None,
        help=f"where to write the results (default bench-results/{prefix}<UTC stamp>.json)",
    )


def options_from(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None, options: type[OptionsT]
) -> OptionsT:
    """Parse and check the command line into the dataclass `options`, whose fields are named
    after the options (--worker-env's pairs become a dict)."""
    args = parser.parse_args(argv)
    check_service_options(parser, args)
    values = {field.name: getattr(args, field.name) for field in dataclasses.fields(options)}
    if "worker_env" in values:
        values["worker_env"] = dict(values["worker_env"])
    return options(**values)


def add_service_options(add: AddArgument) -> None:
    """--database-url and --redis-url: the servers a run creates its scratch databases on."""
    add(
        "--database-url",
        default=os.environ.get("BENCH_DATABASE_URL", DEFAULT_ADMIN_URL),
        help="PostgreSQL server where the scratch database is created (env BENCH_DATABASE_URL; "
        f"default {DEFAULT_ADMIN_URL})",
    )
    add(
        "--redis-url",
        default=os.environ.get("BENCH_REDIS_URL", DEFAULT_REDIS_URL),
        help="Redis database used as the broker, flushed before and after; refused if it holds "
        f"other keys (env BENCH_REDIS_URL; default {DEFAULT_REDIS_URL})",
    )


def check_service_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit with a usage error unless --database-url and --redis-url are what they must be."""
    try:
        postgres_url(args.database_url)
    except BenchError as error:
        parser.error(f"--database-url: {error}")
    if not args.redis_url.startswith(("redis://", "rediss://", "unix://")):
        parser.error("--redis-url must start with redis://, rediss:// or unix://")


def run_main(
    execute: Callable[[], tuple[dict[str, Any], bool]],
    render: Callable[[dict[str, Any]], str],
    json_out: Path | None,
    *,
    prefix: str = "",
) -> int:
    """Run a benchmark under the signals' rules, print its table, write its JSON.

    Exit status: 0 done, 1 failed or not complete, 130 Ctrl-C or SIGTERM.
    """
    signal.signal(signal.SIGTERM, raise_interrupted)
    # Explicitly: a shell starts background jobs with SIGINT ignored, and Python keeps that.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        results, completed = execute()
    except BenchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Interrupted):
        print("interrupted; everything started was stopped", file=sys.stderr)
        return 130
    print(render(results))
    path = write_json(results, json_out, prefix=prefix)
    print(f"\nresults: {path}")
    return 0 if completed else 1
