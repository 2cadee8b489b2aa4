"""`scripts/run`: the whole stack (services, migrations, sandbox and demo data, worker and beat),
the rule that picks the sandbox or real AWS, and the summary of what runs where."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from scripts import stack_env
from scripts.runner import VENV_BIN
from scripts.runner.console import Console, RunError, Signals
from scripts.runner.schedule import account_schedule, print_next_steps
from scripts.runner.servers import REDIS_DB, START_TIMEOUT, Embedded, resolve_port
from scripts.runner.supervisor import (
    CELERY_STOP,
    Child,
    Registry,
    Supervisor,
    locked_data_dir,
    outcome,
)
from scripts.services import postgres, redis, shown_path
from scripts.services.ports import free_port
from scripts.stack_env import REAL_AWS_VARIABLES
from worker.redact import mask_url

# What the sandbox STS accepts as the platform's credentials (sandbox.moto_sts; a test keeps these
# equal). Copied rather than imported: importing the sandbox imports moto, which takes seconds.
SANDBOX_ACCESS_KEY_ID = "AKIASANDBOXPLATFORM0"
SANDBOX_SECRET_ACCESS_KEY = "sandbox-dummy-secret"  # noqa: S105 - the sandbox accepts any secret
SANDBOX_PRINCIPAL_ARN = "arn:aws:iam::111122223333:user/verifier"

# Kept in sandbox mode: where the worker thinks it is does not change who answers.
KEPT_AWS_VARIABLES = ("AWS_REGION", "AWS_DEFAULT_REGION")


@dataclass(frozen=True)
class AwsChoice:
    """Whether the worker talks to the sandbox STS, and why."""

    sandbox: bool
    reason: str


def choose_aws(env: Mapping[str, str], *, force_sandbox: bool = False) -> AwsChoice:
    """The documented rule: any AWS endpoint or credential variable set means real AWS."""
    if force_sandbox:
        return AwsChoice(sandbox=True, reason="--sandbox given")
    given = [name for name in REAL_AWS_VARIABLES if env.get(name)]
    if given:
        return AwsChoice(sandbox=False, reason="set in the environment: " + ", ".join(given))
    return AwsChoice(sandbox=True, reason="no AWS endpoint or credentials in the environment")


def sandbox_environment(env: Mapping[str, str], endpoint_url: str) -> dict[str, str]:
    """`env` with the AWS settings replaced by the sandbox's."""
    cleaned = {
        key: value
        for key, value in env.items()
        if not key.startswith("AWS_") or key in KEPT_AWS_VARIABLES
    }
    cleaned.update(
        AWS_ENDPOINT_URL_STS=endpoint_url,
        # The permission probes' services (IAM, EC2, S3, CloudTrail) are served there too.
        AWS_ENDPOINT_URL=endpoint_url,
        AWS_ACCESS_KEY_ID=SANDBOX_ACCESS_KEY_ID,
        AWS_SECRET_ACCESS_KEY=SANDBOX_SECRET_ACCESS_KEY,
        # Nothing from ~/.aws (a profile's region or endpoint) and no instance metadata lookups.
        AWS_CONFIG_FILE=os.devnull,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
        AWS_EC2_METADATA_DISABLED="true",
    )
    cleaned.setdefault("PLATFORM_PRINCIPAL_ARN", SANDBOX_PRINCIPAL_ARN)
    return cleaned


def child_environment(data_dir: Path) -> dict[str, str]:
    """What every child inherits: this environment, unbuffered, console logs by default."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"  # lines reach the console as they are written
    env.setdefault("LOG_FORMAT", "console")
    env.setdefault("BEAT_SCHEDULE_FILE", str(data_dir / "celerybeat-schedule"))
    return env


def data_dir_from(args: argparse.Namespace) -> Path:
    if args.data_dir:
        return Path(args.data_dir).expanduser().resolve()
    return stack_env.default_data_dir()


# What print_summary shows: (what, where, how), one row per thing started or used.
Summary = list[tuple[str, str, str]]


def run_stack(args: argparse.Namespace, console: Console, signals: Signals) -> int:
    """`scripts/run`: services, migrations, sandbox and demo data, worker and beat."""
    data_dir = data_dir_from(args)
    aws = choose_aws(os.environ, force_sandbox=args.sandbox)
    given_database = os.environ.get("DATABASE_URL", "").strip() or None
    given_redis = os.environ.get("REDIS_URL", "").strip() or None
    with locked_data_dir(data_dir):
        registry = Registry(data_dir / "run-children.json")
        # Before the port checks: a killed run's leftovers hold exactly these ports.
        registry.stop_leftovers(console)
        postgres_port = None if given_database else resolve_port("postgres", args.postgres_port)
        redis_port = None if given_redis else resolve_port("redis", args.redis_port)
        sandbox_port = resolve_port("sandbox", args.sandbox_port) if aws.sandbox else None
        supervisor = Supervisor(console, signals, registry)

        def run() -> int:
            embedded = Embedded(supervisor, data_dir, child_environment(data_dir))
            summary: Summary = []
            env = dict(embedded.env)
            database_url = use_server(embedded, "postgres", postgres_port, summary)
            redis_url = use_server(embedded, "redis", redis_port, summary)
            env.update(DATABASE_URL=database_url, REDIS_URL=redis_url)
            supervisor.run_once("migrate", [str(VENV_BIN / "alembic"), "upgrade", "head"], env=env)
            if sandbox_port is not None:
                env = use_sandbox(supervisor, sandbox_port, env, summary, aws)
                env = use_webhook_receiver(supervisor, data_dir, env, summary)
            else:
                endpoint = os.environ.get("AWS_ENDPOINT_URL_STS") or "AWS STS"
                summary.append(("STS", mask_url(endpoint), f"real AWS ({aws.reason})"))
            # Read before the worker starts: what it is about to do, not what it already did.
            schedule = account_schedule(database_url)
            stack_file, left_out = publish_stack_env(data_dir, env)
            celery = str(VENV_BIN / "celery")
            for name, argv in (
                ("worker", [celery, "-A", "worker", "worker", "--hostname", "worker@%h"]),
                ("beat", [celery, "-A", "worker", "beat"]),
            ):
                # Each serves /metrics, /healthz and /readyz on a port of its own.
                metrics = {"METRICS_PORT": str(free_port()), "METRICS_ADDRESS": "127.0.0.1"}
                child = supervisor.start(
                    name, argv, env={**env, **metrics}, tier=10, stop_steps=CELERY_STOP
                )
                summary.append((name, " ".join(["celery", *argv[1:4]]), f"pid {child.pid}"))
                endpoint = f"http://127.0.0.1:{metrics['METRICS_PORT']}"
                summary.append((f"{name} health", f"{endpoint}/metrics", "/healthz, /readyz"))
            print_summary(console, summary, data_dir)
            print_next_steps(
                console, schedule, stack_file, left_out, sandbox=sandbox_port is not None
            )
            supervisor.watch()
            return 0

        try:
            code = outcome(console, run)
        finally:
            # First: other terminals must not aim at a stack that is going away.
            stack_env.remove_stack_env(data_dir)
            supervisor.stop_all()
    console.say(f"stopped; the data stays in {shown_path(data_dir)}")
    return code


# Per server: the variable that replaces it, its name in the summary, the probe of a given URL.
GIVEN = {
    "postgres": ("DATABASE_URL", "PostgreSQL", postgres.reachable),
    "redis": ("REDIS_URL", "Redis", redis.reachable),
}


def use_server(embedded: Embedded, kind: str, port: int | None, summary: Summary) -> str:
    """DATABASE_URL or REDIS_URL as given (port None), or the embedded server's URL."""
    variable, label, probe = GIVEN[kind]
    if port is None:
        url = checked_external(variable, probe)
        summary.append((label, mask_url(url), f"from {variable}"))
        return url
    if kind == "postgres":
        url = embedded.postgres(port).url()
    else:
        url = f"{embedded.redis(port)}/{REDIS_DB}"
    summary.append((label, url, f"embedded, data in {shown_path(embedded.data_dir / kind)}"))
    return url


def use_sandbox(
    supervisor: Supervisor, port: int, env: Mapping[str, str], summary: Summary, aws: AwsChoice
) -> dict[str, str]:
    """Start the sandbox STS, seed the demo accounts; returns the environment pointing at it."""
    endpoint = f"http://127.0.0.1:{port}"
    sandbox_env = sandbox_environment(env, endpoint)
    start_sandbox(supervisor, port, sandbox_env)
    supervisor.run_once(
        "demo",
        [sys.executable, "-m", "scripts.demo_data", "--sandbox-url", endpoint],
        env=sandbox_env,
    )
    summary.append(
        (
            "STS",
            endpoint,
            f"sandbox STS with the demo accounts ({aws.reason}; "
            f"access key id {SANDBOX_ACCESS_KEY_ID}, any secret)",
        )
    )
    return sandbox_env


def checked_external(variable: str, probe: Callable[..., str | None]) -> str:
    """The URL in `variable`, once a connection to it works."""
    url = os.environ[variable].strip()
    reason = probe(url, timeout=5)
    if reason:
        raise RunError(f"cannot reach {variable} ({mask_url(url)}): {reason}")
    return url


def use_webhook_receiver(
    supervisor: Supervisor, data_dir: Path, env: Mapping[str, str], summary: Summary
) -> dict[str, str]:
    """Start the demo's webhook receiver, registered for the demo organization; returns the
    environment that lets the worker deliver to it (docs/webhooks.md)."""
    from sandbox.webhook_receiver import demo_environment  # noqa: PLC0415 - needs the venv

    receiver_env = {**env, **demo_environment(data_dir, env)}
    port = free_port()
    receiver = supervisor.start(
        "webhooks",
        [sys.executable, "-m", "sandbox.webhook_receiver", "--port", str(port)],
        env=receiver_env,
        tier=2,
        watch_for="webhook receiver listening on",
    )
    supervisor.wait_ready(
        receiver,
        receiver.ready.is_set,
        what="the webhook receiver",
        timeout=START_TIMEOUT["sandbox"],
    )
    summary.append(
        ("webhooks", f"http://127.0.0.1:{port}/webhooks", "demo receiver, checks signatures")
    )
    return receiver_env


def start_sandbox(supervisor: Supervisor, port: int, env: Mapping[str, str]) -> Child:
    """`python -m sandbox serve`, ready once it prints that it is listening."""
    sandbox = supervisor.start(
        "sandbox",
        [sys.executable, "-m", "sandbox", "serve", "--port", str(port)],
        env=env,
        tier=2,
        watch_for="sandbox STS listening on",
    )
    supervisor.wait_ready(
        sandbox, sandbox.ready.is_set, what="the sandbox STS", timeout=START_TIMEOUT["sandbox"]
    )
    return sandbox


def print_summary(console: Console, rows: Summary, data_dir: Path) -> None:
    """Say plainly what runs where (passwords masked)."""
    width = max(len(url) for _, url, _ in rows)
    console.say("started:")
    for name, url, note in rows:
        console.say(f"  {name:<11} {url:<{width}}  {note}")
    console.say(f"Ctrl-C stops everything; the data stays in {shown_path(data_dir)}.")


def publish_stack_env(data_dir: Path, env: Mapping[str, str]) -> tuple[Path, list[str]]:
    """Write the stack's settings for other terminals; returns the file and what it left out."""
    values, left_out = stack_env.stack_values(env, os.environ)
    path = stack_env.write_stack_env(data_dir, values, left_out=left_out, owner_pid=os.getpid())
    return path, left_out
