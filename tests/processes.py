"""Real processes for tests: celery worker and beat with their stdout kept, and private
redis-servers (the session's own, and the fault suite's per test).

Processes, ports and servers are scripts.services' (the same code as `scripts/run` and the
benchmarks'); the names tests import from here are re-exported below.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from scripts import services
from scripts.services import ROOT, package_dir
from scripts.services.ports import free_port, port_open
from scripts.services.process import spawn, terminate
from scripts.services.redis import RedisServer
from scripts.services.redis import find_server_binary as redis_server_binary

__all__ = [
    "CELERY",
    "ROOT",
    "RedisServer",
    "Service",
    "free_port",
    "package_dir",
    "port_open",
    "redis_server_binary",
    "running",
    "service_env",
    "start_beat",
    "start_worker",
    "stop_all",
    "terminate",
    "wait_until",
]
CELERY = str(Path(sys.executable).parent / "celery")


def wait_until(
    predicate: Callable[..., Any], *, timeout: float, interval: float = 0.2, what: str = ""
) -> Any:
    """`scripts.services.wait_until`, typed loosely: tests pass lambdas with default arguments
    (`lambda beat=beat: ...`), whose type mypy cannot infer against a generic callable."""
    return services.wait_until(predicate, timeout=timeout, interval=interval, what=what)


def service_env(*, database_url: str, redis_url: str, sts_url: str, **extra: str) -> dict[str, str]:
    """Environment for worker and beat: the test services and fast cadences."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("AWS_", "PYTEST", "DATABASE_URL", "REDIS_URL"))
    }
    env.update(
        DATABASE_URL=database_url,
        REDIS_URL=redis_url,
        AWS_ENDPOINT_URL_STS=sts_url,
        # The permission probes' services (IAM, EC2, S3, CloudTrail) are served there too.
        AWS_ENDPOINT_URL=sts_url,
        AWS_REGION="us-east-1",
        AWS_ACCESS_KEY_ID="AKIASANDBOXPLATFORM0",
        AWS_SECRET_ACCESS_KEY="sandbox-platform-secret",
        AWS_EC2_METADATA_DISABLED="true",
        LOG_FORMAT="json",
        LOG_LEVEL="INFO",
        DISPATCH_INTERVAL_SECONDS="0.5",
        PENDING_RETRY_SECONDS="1",
        CONFIRM_DELAY_SECONDS="1",
        TRANSIENT_RETRY_INITIAL_SECONDS="1",
        PLATFORM_PAUSE_SECONDS="1",
        STS_MAX_ATTEMPTS="1",
        WORKER_CONCURRENCY="8",
    )
    env.update(extra)
    return env


class Service:
    """One child process (its own session) whose stdout goes to a file that tests read as JSON
    lines."""

    def __init__(self, name: str, args: list[str], env: Mapping[str, str], log_dir: Path):
        self.name = name
        stamp = time.monotonic_ns()
        self.log_path = log_dir / f"{name}-{stamp}.log"
        self.stderr_path = log_dir / f"{name}-{stamp}.stderr"
        self._log = self.log_path.open("w")
        self._stderr = self.stderr_path.open("w")
        self.process = spawn(args, env=env, stdout=self._log, stderr=self._stderr, stdin=None)

    def output(self) -> str:
        """Everything the process wrote to stdout so far."""
        return self.log_path.read_text()

    def errors(self) -> str:
        """Everything the process wrote to stderr so far."""
        return self.stderr_path.read_text()

    def records(self) -> list[dict[str, Any]]:
        """Every line parsed as JSON (raises on a line that is not JSON)."""
        return [json.loads(line) for line in self.output().splitlines() if line.strip()]

    def events(self, name: str) -> list[dict[str, Any]]:
        """The JSON lines whose `event` is `name`."""
        return [r for r in self.records() if r.get("event") == name]

    def kill(self) -> None:
        """SIGKILL, as the OOM killer or a lost machine would."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self, timeout: float = 15) -> int:
        """SIGTERM (warm shutdown), then SIGKILL if it does not exit in time."""
        terminate(self.process, timeout)
        self._log.close()
        self._stderr.close()
        return self.process.returncode


def start_worker(env: Mapping[str, str], log_dir: Path, name: str = "worker") -> Service:
    """`celery -A worker worker`, as operators run it."""
    return Service(
        name, [CELERY, "-A", "worker", "worker", "--hostname", f"{name}@%h"], env, log_dir
    )


def start_beat(env: Mapping[str, str], log_dir: Path, name: str = "beat") -> Service:
    """`celery -A worker beat`, with its schedule file in the test's directory."""
    beat_env = {**env, "BEAT_SCHEDULE_FILE": str(log_dir / f"{name}-schedule")}
    return Service(name, [CELERY, "-A", "worker", "beat"], beat_env, log_dir)


def stop_all(services: Sequence[Service], timeout: float = 15) -> None:
    """`Service.stop` for each, their warm shutdowns overlapping: SIGTERM to all first, then
    each is waited for (and SIGKILLed if it does not exit within `timeout`)."""
    for service in services:
        if service.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                service.process.send_signal(signal.SIGTERM)
    for service in services:
        with contextlib.suppress(subprocess.TimeoutExpired):
            service.process.wait(timeout=timeout)
        service.stop(timeout=0)  # SIGKILL if it is still running; closes its output files


@contextmanager
def running(*services: Service) -> Iterator[tuple[Service, ...]]:
    """Stop every service at the end, whatever happened (all at once: `stop_all`)."""
    try:
        yield services
    finally:
        stop_all(services)
