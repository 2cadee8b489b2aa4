"""The STS stand-in (`python -m sandbox.standin`) as a process of its own: its command line, and
the URL it prints on its first line of output once it listens. The benchmarks and the fault
suite start it this way:

    process = spawn(standin.argv(median_ms=20, seed=9), env=os.environ, stdout=log)
    url = wait_until(lambda: standin.printed_url(log_path), timeout=15, what="the stand-in")

With port 0 (the default) the stand-in binds a free port itself: no race for it with another
process between choosing the port and listening on it.
"""

from __future__ import annotations

import sys
from pathlib import Path


def argv(
    *,
    median_ms: float,
    seed: int,
    latency_sigma: float | None = None,
    rate_limit: float | None = None,
    port: int = 0,
) -> list[str]:
    """`python -m sandbox.standin` with these knobs (the stand-in's defaults for those left
    None)."""
    args = [sys.executable, "-m", "sandbox.standin", "--median-ms", str(median_ms)]
    if latency_sigma is not None:
        args += ["--latency-sigma", str(latency_sigma)]
    args += ["--seed", str(seed)]
    if rate_limit is not None:
        args += ["--rate-limit", str(rate_limit)]
    if port:
        args += ["--port", str(port)]
    return args


def printed_url(output: Path) -> str | None:
    """The URL the stand-in printed to `output` (its stdout, perhaps with its stderr), if it has
    yet."""
    try:
        text = output.read_text(errors="replace")
    except OSError:
        return None
    # A line is complete once its newline is there: the URL is never read half-written.
    lines = text.splitlines(keepends=True)
    return next(
        (line.strip() for line in lines if line.startswith("http://") and line.endswith("\n")),
        None,
    )
