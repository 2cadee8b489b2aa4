"""Client CPU per verification against a zero-latency local STS stand-in.

    .venv/bin/python -m scripts.benchmarks.sts [--count 2000] [--warmup 200] [--transport T]

The stand-in runs as a separate process, so the figures are the worker-side cost alone: our
checks, botocore's signing, serialization, HTTP and XML parsing. Target: under 3 ms per
verification. The last figure adds the four permission probes (the stand-in answers them too),
so the difference is the CPU of one probe set. `--transport botocore` sends the signed calls
through botocore's own HTTP session (urllib3) instead of `worker.sts.transport`, the worker's
http.client sender, for comparison.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from scripts.benchmarks.common import BenchError
from scripts.benchmarks.services import standin_aws_env, start_standin
from worker.permissions import DEFAULT_PROBES
from worker.settings import Settings
from worker.sts import transport
from worker.sts.outcome import RoleDetails
from worker.sts.verifier import StsVerifier


def _measure(
    sts: StsVerifier, details: list[RoleDetails], *, check: bool, probe: tuple[str, ...] = ()
) -> tuple[float, float]:
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for item in details:
        outcome = sts.verify(item, check_external_id=check, probe=probe)
        if not outcome.verified:
            raise SystemExit(f"unexpected outcome: {outcome.code}: {outcome.message}")
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    return cpu / len(details) * 1000, wall / len(details) * 1000


def main(argv: list[str] | None = None) -> int:
    """Print CPU ms per verification, with and without the external-ID check."""
    parser = argparse.ArgumentParser(
        prog="python -m scripts.benchmarks.sts", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--count", type=int, default=2000, help="verifications per figure")
    parser.add_argument("--warmup", type=int, default=200, help="untimed verifications first")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the median is reported")
    parser.add_argument(
        "--transport",
        choices=("http.client", "botocore"),
        default="http.client",
        help="the signed calls' HTTP client: the worker's (http.client) or botocore's (urllib3)",
    )
    args = parser.parse_args(argv)
    if args.transport == "botocore":
        # The calls are built (and their sessions wrapped, or not) on first use, below.
        transport.ENABLED = False
    if args.count < 1 or args.warmup < 0 or args.rounds < 1:
        parser.error("--count and --rounds must be positive, --warmup not negative")
    log_dir = tempfile.TemporaryDirectory(prefix="verifier-bench-sts-")
    try:
        standin, url = start_standin(
            median_ms=0, sigma=0, seed=1, rate_limit=None, log_dir=Path(log_dir.name)
        )
    except BenchError as error:
        log_dir.cleanup()
        raise SystemExit(f"the STS stand-in did not start: {error}") from None
    try:
        os.environ.update(standin_aws_env(url))
        sts = StsVerifier(Settings(sts_max_attempts=1))
        details = [
            RoleDetails(
                uuid.uuid4(), "123456789012", "arn:aws:iam::123456789012:role/ok-B", "ext-1"
            )
            for _ in range(args.count)
        ]
        _measure(sts, details[: args.warmup] or details[:1], check=True, probe=DEFAULT_PROBES)
        print(f"{'figure':<56}{'median':>10}  rounds")
        for check, probe, label in (
            (False, (), "AssumeRole only (1 STS call)"),
            (True, (), "with external-ID check (2 calls)"),
            (True, DEFAULT_PROBES, "with the check and 4 probes (2+4)"),
        ):
            rounds = [_measure(sts, details, check=check, probe=probe) for _ in range(args.rounds)]
            cpu = [r[0] for r in rounds]
            wall = [r[1] for r in rounds]
            print(
                f"{'CPU ms/verification, ' + label:<56}{statistics.median(cpu):>10.3f}  "
                + " ".join(f"{c:.3f}" for c in cpu)
            )
            print(
                f"{'wall ms/verification, ' + label:<56}{statistics.median(wall):>10.3f}  "
                + " ".join(f"{w:.3f}" for w in wall)
            )
    finally:
        standin.stop()
        log_dir.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
