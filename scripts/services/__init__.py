"""Processes and services for the tooling: one of each, shared by `scripts/run`, the benchmarks
and the tests.

- `process`: a child process in its own session (process group), optionally as another user and
  dying with its parent; stopping it (or its whole group) with a timeout; telling a live process
  from a recycled pid; its descendants.
- `usage`: CPU seconds and memory (RSS, PSS, peak) of a process tree, sampled with psutil, and
  the machine's CPU.
- `ports`: free ports, and whether something listens.
- `postgres`: PostgreSQL's server binaries, initdb and the server's command line, reachability,
  databases created and dropped.
- `redis`: the one redis-server binary rule, its command line, reachability, and `RedisServer`,
  a private server for tests.
- `standin`: the STS stand-in (`python -m sandbox.standin`) as a process of its own: its command
  line and the URL it prints once it listens.

URL spellings and masking are `worker.redact`'s (`mask_url`, `libpq_url`, `with_database`).

Only the standard library is imported at module level (psutil, psycopg and redis inside the
functions that need them): `scripts/run --help` works before the virtual environment exists.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

# The repository root: where children start (cwd) unless told otherwise.
ROOT = Path(__file__).resolve().parent.parent.parent


class ServiceError(Exception):
    """Something the operator has to know about; printed without a traceback.

    `exit_code` is what a command-line tool exits with: 2 for a problem found before anything
    started (a missing binary, a port in use), 1 otherwise.
    """

    def __init__(self, message: str, *, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def package_dir(name: str) -> Path | None:
    """Where an installed package lives, without importing it (pgserver's import has effects)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (a driver's error can run over many)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def shown_path(path: Path) -> str:
    """`path` relative to the current directory when it is below it: shorter to read."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def wait_until(
    predicate: Callable[[], T | None], *, timeout: float, interval: float = 0.2, what: str = ""
) -> T:
    """Poll until `predicate()` is truthy and return its value; TimeoutError after `timeout`
    seconds, naming `what` was awaited."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)
