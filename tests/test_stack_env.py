"""DATA_DIR/stack.env: how other terminals reach the stack `scripts/run` is running."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from scripts import stack_env

SANDBOX_STACK = {
    "DATABASE_URL": "postgresql://postgres@127.0.0.1:55432/verifier",
    "REDIS_URL": "redis://127.0.0.1:56379/0",
    "AWS_ENDPOINT_URL_STS": "http://127.0.0.1:55050",
    "AWS_ENDPOINT_URL": "http://127.0.0.1:55050",
    "AWS_ACCESS_KEY_ID": "AKIASANDBOXPLATFORM0",
    "AWS_SECRET_ACCESS_KEY": "sandbox-dummy-secret",
    "AWS_CONFIG_FILE": os.devnull,
    "LOG_FORMAT": "console",
}


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A data directory that `default_data_dir` finds, as VERIFIER_DATA_DIR names it."""
    monkeypatch.setenv("VERIFIER_DATA_DIR", str(tmp_path))
    return tmp_path


def publish(data_dir: Path, stack: dict[str, str], given: dict[str, str], pid: int) -> Path:
    values, left_out = stack_env.stack_values(stack, given)
    return stack_env.write_stack_env(data_dir, values, left_out=left_out, owner_pid=pid)


def test_the_file_is_private_and_holds_what_another_terminal_needs(data_dir: Path) -> None:
    """Mode 0600 from creation; the stack's URLs and sandbox settings, nothing else."""
    path = publish(data_dir, SANDBOX_STACK, {}, os.getpid())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    found = stack_env.read_stack_env(data_dir)
    assert found is not None
    assert found[1] == {k: v for k, v in SANDBOX_STACK.items() if k != "LOG_FORMAT"}


def test_secrets_the_operator_gave_are_never_written(data_dir: Path) -> None:
    """A URL with a password, or real AWS credentials, stay in the operator's environment."""
    given = {
        "DATABASE_URL": "postgresql://app:hunter2@db.internal/app",
        "AWS_ACCESS_KEY_ID": "AKIAREALKEY000000000",
        "AWS_SECRET_ACCESS_KEY": "real-secret",
        "AWS_REGION": "eu-west-1",
        "REDIS_URL": "redis://127.0.0.1:6379/0",
    }
    path = publish(data_dir, dict(given), given, os.getpid())
    text = path.read_text()
    for secret in ("hunter2", "AKIAREALKEY000000000", "real-secret"):
        assert secret not in text
    found = stack_env.read_stack_env(data_dir)
    assert found is not None
    assert found[1] == {"REDIS_URL": "redis://127.0.0.1:6379/0", "AWS_REGION": "eu-west-1"}
    assert "DATABASE_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY" in text


def test_the_file_of_a_run_that_is_gone_is_ignored(data_dir: Path) -> None:
    """A scripts/run killed with SIGKILL leaves the file; its URLs lead nowhere."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    publish(data_dir, SANDBOX_STACK, {}, gone.pid)
    assert stack_env.read_stack_env(data_dir) is None
    assert stack_env.apply_stack_env({}) is None


def test_values_round_trip_through_shell_quoting(data_dir: Path) -> None:
    """`sh` can source the file, and reading it gives back exactly what was written."""
    odd = {"DATABASE_URL": "postgresql://postgres@127.0.0.1:1/db name's", "REDIS_URL": "redis://x"}
    path = publish(data_dir, odd, {}, os.getpid())
    found = stack_env.read_stack_env(data_dir)
    assert found is not None
    assert found[1] == odd
    shell = subprocess.run(
        ["sh", "-c", f'. "{path}" && printf %s "$DATABASE_URL"'],
        capture_output=True,
        text=True,
        check=True,
    )
    assert shell.stdout == odd["DATABASE_URL"]


def test_reverify_takes_the_file_only_for_what_the_environment_leaves_unset(
    data_dir: Path,
) -> None:
    """No DATABASE_URL: the stack's settings fill the gaps; whatever is set wins."""
    publish(data_dir, SANDBOX_STACK, {}, os.getpid())
    environ = {"REDIS_URL": "redis://mine:6379/3"}
    assert stack_env.apply_stack_env(environ) == data_dir / "stack.env"
    assert environ["REDIS_URL"] == "redis://mine:6379/3"
    assert environ["DATABASE_URL"] == SANDBOX_STACK["DATABASE_URL"]
    assert environ["AWS_ENDPOINT_URL_STS"] == SANDBOX_STACK["AWS_ENDPOINT_URL_STS"]
    # The permission probes' services (reverify --inline) go to the sandbox too.
    assert environ["AWS_ENDPOINT_URL"] == SANDBOX_STACK["AWS_ENDPOINT_URL"]


def test_an_explicit_database_url_means_the_file_is_not_read(data_dir: Path) -> None:
    """DATABASE_URL set says which system is meant: nothing of the stack mixes in."""
    publish(data_dir, SANDBOX_STACK, {}, os.getpid())
    environ = {"DATABASE_URL": "postgresql://elsewhere/db"}
    assert stack_env.apply_stack_env(environ) is None
    assert environ == {"DATABASE_URL": "postgresql://elsewhere/db"}


def test_an_environment_with_its_own_aws_takes_none_of_the_sandboxs(data_dir: Path) -> None:
    """AWS_PROFILE next to the sandbox's keys would be neither: AWS settings come as a whole."""
    publish(data_dir, SANDBOX_STACK, {}, os.getpid())
    environ = {"AWS_PROFILE": "platform"}
    stack_env.apply_stack_env(environ)
    assert environ["DATABASE_URL"] == SANDBOX_STACK["DATABASE_URL"]
    assert not {"AWS_ACCESS_KEY_ID", "AWS_ENDPOINT_URL_STS", "AWS_CONFIG_FILE"} & set(environ)


def test_removed_means_gone(data_dir: Path) -> None:
    """scripts/run removes the file when it stops; removing twice is harmless."""
    path = publish(data_dir, SANDBOX_STACK, {}, os.getpid())
    stack_env.remove_stack_env(data_dir)
    stack_env.remove_stack_env(data_dir)
    assert not path.exists()
    assert stack_env.read_stack_env(data_dir) is None
