"""scripts/run's embedded PostgreSQL and Redis, started as supervised children (the pieces
are scripts.services.postgres's and scripts.services.redis's), and the ports they use."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from scripts.runner.console import RunError
from scripts.runner.supervisor import POSTGRES_STOP, Child, Supervisor
from scripts.services import postgres, redis, shown_path
from scripts.services.ports import free_port, port_in_use

DEFAULT_PORTS = {"postgres": 55432, "redis": 56379, "sandbox": 55050}
PORT_VARIABLES = {
    "postgres": "VERIFIER_POSTGRES_PORT",
    "redis": "VERIFIER_REDIS_PORT",
    "sandbox": "VERIFIER_SANDBOX_PORT",
}
DATABASE_NAME = "verifier"
# Celery's Redis database for the app, and the one the test suite reserves (tests/conftest.py).
REDIS_DB, TEST_REDIS_DB = 0, 15

# How long to wait for each thing to come up. Generous: CI machines have 2 busy cores.
START_TIMEOUT = {"postgres": 60.0, "redis": 30.0, "sandbox": 120.0}


def resolve_port(kind: str, given: int) -> int:
    """The port to use for `kind`: the given one (checked to be free) or a free one for 0."""
    if given == 0:
        return free_port()
    if port_in_use(given):
        raise RunError(
            f"port {given} for the embedded {kind} is in use (another scripts/run?); set "
            f"{PORT_VARIABLES[kind]}=<port>, or 0 for any free port",
            exit_code=2,
        )
    return given


def port_from_environment(kind: str) -> int:
    variable = PORT_VARIABLES[kind]
    raw = os.environ.get(variable, "").strip()
    if not raw:
        return DEFAULT_PORTS[kind]
    if not raw.isdigit() or int(raw) > 65535:
        raise RunError(
            f"{variable} must be a port number (0 for any free port), not {raw!r}", exit_code=2
        )
    return int(raw)


@dataclass(frozen=True)
class Postgres:
    """The embedded server, once it accepts connections."""

    port: int
    child: Child

    def url(self, database: str = DATABASE_NAME) -> str:
        return postgres.url(self.port, database)


@dataclass(frozen=True)
class Embedded:
    """Starts the embedded servers of one run under its supervisor, data in `data_dir`.

    `ephemeral` trades durability for speed (no fsync, no Redis snapshots); `quiet` sends the
    servers' output to DATA_DIR/postgres.log and redis.log instead of the console.
    """

    supervisor: Supervisor
    data_dir: Path
    env: Mapping[str, str]
    ephemeral: bool = False
    quiet: bool = False

    def log_file(self, kind: str) -> Path | None:
        """Where `kind`'s output goes: None for the console."""
        return self.data_dir / f"{kind}.log" if self.quiet else None

    def postgres(self, port: int) -> Postgres:
        """Start PostgreSQL (initialising DATA_DIR/postgres the first time)."""
        supervisor, console = self.supervisor, self.supervisor.console
        bindir = postgres.server_bindir()
        account = postgres.server_account()
        pgdata = self.data_dir / "postgres"
        server_env = {**self.env, "LC_ALL": "C"}

        def initdb(argv: list[str]) -> None:
            console.say(f"creating a PostgreSQL data directory in {shown_path(pgdata)}")
            supervisor.run_once("initdb", argv, env=server_env, quiet=True, run_as=account)

        postgres.prepare(pgdata, bindir, account, initdb)
        console.say(f"starting PostgreSQL ({shown_path(bindir)}) on 127.0.0.1:{port}")
        child = supervisor.start(
            "postgres",
            postgres.server_argv(bindir, pgdata, port, ephemeral=self.ephemeral),
            env=server_env,
            stop_steps=POSTGRES_STOP,
            tier=0,
            run_as=account,
            log_file=self.log_file("postgres"),
        )
        server = Postgres(port, child)
        supervisor.wait_ready(
            child,
            lambda: postgres.reachable(server.url("postgres")) is None,
            what="PostgreSQL",
            timeout=START_TIMEOUT["postgres"],
        )
        postgres.ensure_database(server.url("postgres"), DATABASE_NAME)
        return server

    def redis(self, port: int) -> str:
        """Start redis-server on 127.0.0.1:`port`; returns the base URL (no database number)."""
        binary = redis.server_binary()
        directory = self.data_dir / "redis"
        directory.mkdir(exist_ok=True)
        self.supervisor.console.say(f"starting Redis ({shown_path(binary)}) on 127.0.0.1:{port}")
        # Snapshot on shutdown and every minute after a change: queued work survives a restart.
        argv = redis.server_argv(binary, port, directory, save="" if self.ephemeral else "60 1")
        log_file = self.log_file("redis")
        child = self.supervisor.start("redis", argv, env=self.env, tier=1, log_file=log_file)
        url = f"redis://127.0.0.1:{port}"
        self.supervisor.wait_ready(
            child,
            lambda: redis.reachable(f"{url}/{REDIS_DB}") is None,
            what="Redis",
            timeout=START_TIMEOUT["redis"],
        )
        return url
