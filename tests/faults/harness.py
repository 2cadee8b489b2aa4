"""Processes the fault suite starts, breaks and restarts: Redis, PostgreSQL, the STS stand-in.

Every service here is private to one test (its own port, its own directory), so restarting it
mid-test disturbs nobody else on the machine: not other engineers' test runs, not CI. The
machine's own PostgreSQL and Redis are never restarted.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from scripts.services import ServiceError, postgres, standin
from scripts.services.process import kill_group as kill_process_group
from scripts.services.process import spawn
from tests.processes import (
    Service,
    free_port,
    service_env,
    terminate,
    wait_until,
)
from tests.processes import running as _running

# --------------------------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------------------------


def postgres_bindir() -> Path | None:
    """The PostgreSQL server binaries `scripts/run` uses (scripts.services.postgres); None if
    none is installed."""
    try:
        return postgres.server_bindir()
    except ServiceError:
        return None


class PrivatePostgres:
    """A throw-away PostgreSQL cluster on a free port, which a test may restart at will: the
    bootstrap of scripts.services.postgres, the server a child of this process.

    PostgreSQL refuses to run as root, so as root it runs as `nobody` (as under `scripts/run`).
    """

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="faults-pg-"))
        self.root.chmod(0o755)  # `nobody` must reach the data directory inside
        self.data = self.root / "data"
        self.logfile = self.root / "postgres.log"
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        try:
            self.account = postgres.server_account()
            postgres.prepare(self.data, bindir, self.account, self._initdb, ephemeral=True)
        except BaseException:
            shutil.rmtree(self.root, ignore_errors=True)
            raise

    def _initdb(self, argv: list[str]) -> None:
        initdb = spawn(
            argv,
            env={**os.environ, "LC_ALL": "C"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            run_as=self.account,
        )
        _, errors = initdb.communicate(timeout=60)
        if initdb.returncode:
            raise RuntimeError(f"initdb exited with {initdb.returncode}: {errors.decode().strip()}")

    def url(self, database: str = "postgres") -> str:
        return postgres.url(self.port, database)

    def start(self) -> None:
        argv = postgres.server_argv(self.bindir, self.data, self.port, ephemeral=True)
        with self.logfile.open("ab") as log:
            self.process = spawn(
                [*argv, "-c", "max_connections=100"],
                env={**os.environ, "LC_ALL": "C"},
                stdout=log,
                stderr=subprocess.STDOUT,
                run_as=self.account,
            )
        wait_until(
            lambda: postgres.reachable(self.url()) is None,
            timeout=30,
            what=f"PostgreSQL to accept connections (log: {self.logfile})",
        )

    def stop(self, mode: str = "fast") -> None:
        """Shut the server down: `fast` (SIGINT: every connection is cut, a checkpoint) or
        `immediate` (SIGQUIT: crash recovery on the next start)."""
        if self.process is not None:
            signum = signal.SIGQUIT if mode == "immediate" else signal.SIGINT
            terminate(self.process, timeout=30, signum=signum)
            self.process = None

    def restart(self, *, down_seconds: float) -> None:
        """A fast shutdown (every connection is cut), some downtime, then start again."""
        self.stop("fast")
        time.sleep(down_seconds)
        self.start()

    def destroy(self) -> None:
        """Stop whatever runs and remove every file; safe to call twice."""
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# The STS stand-in, as a process of its own
# --------------------------------------------------------------------------------------------


class StandInProcess:
    """`python -m sandbox.standin` on a free port, steered through its control endpoint."""

    def __init__(self, directory: Path, *, median_ms: float = 20, seed: int = 9) -> None:
        log_path = directory / f"standin-{time.monotonic_ns()}.log"
        self._log = log_path.open("wb")
        self.process = spawn(
            standin.argv(median_ms=median_ms, seed=seed),
            env=os.environ,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        try:
            self.url: str = wait_until(
                lambda: standin.printed_url(log_path),
                timeout=15,
                what=f"the STS stand-in to listen (log: {log_path})",
            )
        except BaseException:
            self.stop()
            raise
        self.port = int(self.url.rpartition(":")[2])

    def _request(self, method: str, path: str, payload: object = None) -> dict[str, Any]:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(  # noqa: S310 - a local http:// URL of our own
            self.url + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
            answer: dict[str, Any] = json.loads(response.read())
            return answer

    def config(self) -> dict[str, Any]:
        return self._request("GET", "/_standin/config")

    def configure(self, **knobs: object) -> dict[str, Any]:
        """Change knobs, e.g. `configure(force_error="Throttling", force_ratio=0.8)`."""
        return self._request("POST", "/_standin/config", knobs)

    def stats(self) -> dict[str, Any]:
        return self._request("GET", "/_standin/stats")

    def calls_for(self, role_arn: str) -> int:
        """How many AssumeRole calls named this role ARN."""
        by_role: dict[str, int] = self.stats()["by_role"]
        return by_role.get(role_arn, 0)

    def stop(self) -> None:
        terminate(self.process)
        self._log.close()


# --------------------------------------------------------------------------------------------
# Worker and beat settings for the fault suite
# --------------------------------------------------------------------------------------------

# Leases short enough that a dead worker's accounts are due again within seconds; STS timeouts
# short enough that a hanging STS is a timeout, not a hang; transient retries capped at 2 s so
# a fault window's backoff does not outlast the test; failed accounts backed off for the rest of
# the test (so each is verified a known number of times).
FAST = {
    "PENDING_GRACE_SECONDS": "0",
    "LEASE_SECONDS": "6",
    "VERIFY_TIME_LIMIT_SECONDS": "4",
    "STS_CONNECT_TIMEOUT_SECONDS": "1",
    "STS_READ_TIMEOUT_SECONDS": "1",
    "TRANSIENT_RETRY_INITIAL_SECONDS": "1",
    "TRANSIENT_RETRY_MAX_SECONDS": "2",
    "FAILED_BACKOFF_INITIAL_SECONDS": "600",
    "PLATFORM_PAUSE_SECONDS": "1",
    "CONFIRM_DELAY_SECONDS": "1",
    "WORKER_CONCURRENCY": "4",
    # Accounts per verification message, where the worker sends chunks (one wave of threads).
    "DISPATCH_CHUNK_SIZE": "4",
}


def fault_env(*, database_url: str, redis_url: str, sts_url: str, **extra: str) -> dict[str, str]:
    """service_env with the fault suite's cadences, then `extra`."""
    return service_env(
        database_url=database_url, redis_url=redis_url, sts_url=sts_url, **{**FAST, **extra}
    )


def log_records(service: Service) -> list[dict[str, Any]]:
    """The JSON lines a service wrote; tolerant of a last line cut short by SIGKILL."""
    records = []
    for line in service.output().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def log_events(service: Service, name: str) -> list[dict[str, Any]]:
    """The JSON lines of a service whose `event` is `name`."""
    return [r for r in log_records(service) if r.get("event") == name]


def beat_ticks(beat: Service) -> int:
    """How many dispatches a beat has sent (Celery logs each at DEBUG: run it with
    LOG_LEVEL=DEBUG)."""
    return sum(
        1
        for r in log_records(beat)
        if str(r.get("event", "")).startswith("Scheduler: Sending due task")
    )


def wait_started(
    *, workers: Sequence[Service] = (), beats: Sequence[Service] = (), timeout: float = 60
) -> None:
    """Wait until every worker is ready and every beat has sent a dispatch (start-up takes
    seconds on a loaded machine; a test about two of something needs both running)."""
    for worker in workers:
        wait_until(
            functools.partial(log_events, worker, "worker.ready"),
            timeout=timeout,
            what=f"{worker.name} to be ready",
        )
    for beat in beats:
        wait_until(
            functools.partial(beat_ticks, beat),
            timeout=timeout,
            what=f"{beat.name} to dispatch",
        )


def kill_group(service: Service) -> None:
    """SIGKILL a service with every process it started (a prefork worker's children too), as
    when its container or machine dies."""
    kill_process_group(service.process.pid)  # its own session: pgid == pid
    service.process.wait(timeout=10)


@contextmanager
def running(*services: Service) -> Iterator[tuple[Service, ...]]:
    """tests.processes.running, and then no process of theirs left behind (a prefork child
    orphaned by a SIGKILLed parent would otherwise outlive the test)."""
    try:
        with _running(*services):
            yield services
    finally:
        for service in services:
            kill_process_group(service.process.pid)
