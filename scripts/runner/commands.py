"""`scripts/run services` (the embedded servers alone, optionally around a command) and
`scripts/run exec` (a command in the running stack's environment)."""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence

from scripts import stack_env
from scripts.runner import VENV_BIN
from scripts.runner.console import Console, RunError, Signals
from scripts.runner.servers import REDIS_DB, TEST_REDIS_DB, Embedded, resolve_port
from scripts.runner.stack import KEPT_AWS_VARIABLES, child_environment, data_dir_from
from scripts.runner.supervisor import Registry, Supervisor, locked_data_dir, outcome
from scripts.services import shown_path


def run_exec(args: argparse.Namespace) -> int:
    """`scripts/run exec -- COMMAND`: the command, in the running stack's environment."""
    if not args.command:
        raise RunError("say which command: scripts/run exec -- COMMAND [ARGS...]", exit_code=2)
    data_dir = data_dir_from(args)
    found = stack_env.read_stack_env(data_dir)
    if found is None:
        raise RunError(
            f"no scripts/run is running on {shown_path(data_dir)} (no live "
            f"{shown_path(data_dir / stack_env.FILE_NAME)}): start scripts/run first, or name its "
            "data directory with --data-dir or VERIFIER_DATA_DIR",
            exit_code=2,
        )
    _, values = found
    env = dict(os.environ)
    if any(name.startswith("AWS_") and name not in KEPT_AWS_VARIABLES for name in values):
        # The stack's own AWS settings (the sandbox's): none of the shell's may mix in.
        env = {k: v for k, v in env.items() if not k.startswith("AWS_") or k in KEPT_AWS_VARIABLES}
    env.update(values)
    env["PATH"] = venv_on_path(env)
    try:
        os.execvpe(args.command[0], args.command, env)  # noqa: S606 - the operator's command
    except OSError as exc:
        raise RunError(f"cannot run {args.command[0]}: {exc.strerror}", exit_code=2) from None
    return 0  # not reached: exec replaced this process


def venv_on_path(env: Mapping[str, str]) -> str:
    """PATH with the virtual environment's bin first: celery, alembic and reverify by name."""
    return os.pathsep.join([str(VENV_BIN), *filter(None, [env.get("PATH")])])


# --- services only --------------------------------------------------------------------------------


def run_services(args: argparse.Namespace, console: Console, signals: Signals) -> int:
    """`scripts/run services`: embedded PostgreSQL and/or Redis, optionally around a command."""
    data_dir = data_dir_from(args)
    wanted = set(args.only or ["postgres", "redis"])
    # With a command, the servers' logs would mix with its output: they go to files instead.
    quiet = bool(args.command)
    exported: dict[str, str] = {}

    def serve(supervisor: Supervisor, ports: dict[str, int]) -> int:
        env = child_environment(data_dir)
        embedded = Embedded(supervisor, data_dir, env, ephemeral=args.ephemeral, quiet=quiet)
        if "postgres" in wanted:
            postgres = embedded.postgres(ports["postgres"])
            exported.update(DATABASE_URL=postgres.url(), TEST_DATABASE_URL=postgres.url("postgres"))
            log = embedded.log_file("postgres")
            console.say(
                f"embedded PostgreSQL: {postgres.url()} (data in "
                f"{shown_path(data_dir / 'postgres')}"
                + (f", log in {shown_path(log)})" if log else ")")
            )
            if not args.no_migrate:
                supervisor.run_once(
                    "migrate",
                    [str(VENV_BIN / "alembic"), "upgrade", "head"],
                    env={**embedded.env, "DATABASE_URL": postgres.url()},
                    quiet=quiet,
                )
        if "redis" in wanted:
            base = embedded.redis(ports["redis"])
            exported.update(
                REDIS_URL=f"{base}/{REDIS_DB}", TEST_REDIS_URL=f"{base}/{TEST_REDIS_DB}"
            )
            log = embedded.log_file("redis")
            console.say(
                f"embedded Redis: {base}/{REDIS_DB}"
                + (f" (log in {shown_path(log)})" if log else "")
            )
        if args.command:
            env = {**os.environ, **exported}
            env["PATH"] = venv_on_path(env)
            return run_command(args.command, env, signals, console)
        for key, value in exported.items():
            console.say(f"export {key}={value}")
        console.say("Ctrl-C stops them")
        supervisor.watch()
        return 0

    with locked_data_dir(data_dir):
        registry = Registry(data_dir / "run-children.json")
        registry.stop_leftovers(console)
        ports = {kind: resolve_port(kind, getattr(args, f"{kind}_port")) for kind in wanted}
        supervisor = Supervisor(console, signals, registry)
        try:
            return outcome(console, functools.partial(serve, supervisor, ports))
        finally:
            supervisor.stop_all()


def run_command(
    command: Sequence[str], env: Mapping[str, str], signals: Signals, console: Console
) -> int:
    """Run `command` on the terminal as it is (colours, no prefix) and return its exit status.

    It has a process group of its own and gets each stop signal scripts/run receives, once: the
    terminal's Ctrl-C reaches only scripts/run, so pytest sees one KeyboardInterrupt, not two.
    """
    try:
        process = subprocess.Popen(list(command), env=dict(env), process_group=0)
    except OSError as exc:
        raise RunError(f"cannot run {command[0]}: {exc.strerror}") from None
    forwarded = 0
    while process.poll() is None:
        if signals.first is not None and signals.count > forwarded:
            forwarded = signals.count
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signals.first)
        time.sleep(0.1)
    if process.returncode < 0:
        console.say(f"{command[0]} was stopped by {signal.Signals(-process.returncode).name}")
        return 128 - process.returncode
    return process.returncode
