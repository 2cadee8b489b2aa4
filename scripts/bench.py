"""Throughput of the real worker against a latency-realistic STS stand-in (issue 8).

    scripts/bench [--accounts 20000] [--sample 200] [--median-ms 50] [--rate-limit R] ...
    scripts/bench claims --help        the due-accounts claim at 10k and 1M accounts

One run, in this order:

1. a scratch database (migrated with alembic) on the PostgreSQL of --database-url, a dedicated
   Redis database (--redis-url, flushed before and after) and the STS stand-in
   (`python -m sandbox.standin`: log-normal latency, seeded; --rate-limit passed through);
2. the naive alternative: a plain sequential `boto3.client("sts").assume_role(...)` loop over a
   sample of the accounts, with the second call without the external ID that a first
   verification makes (2 STS calls per verification, like the worker);
3. `celery -A worker worker` in its default configuration (environment only: no -P/-c) and
   `celery -A worker beat`; once the worker consumes, N `ok-...` accounts are seeded, all due at
   once, and the database is polled until every one has `last_verified_at` set;
4. a short in-process trace of the same task code (the chunk steps run in-process, and the
   dispatcher's claim) that counts SQL statements per verification;
5. one table on stdout, every figure as JSON (--json-out, default bench-results/<stamp>.json).

Everything started is stopped, and the scratch database dropped (unless --keep), on every exit,
Ctrl-C and SIGTERM included. Exit status: 0 done, 1 timed out or failed, 2 bad usage, 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Final, TypeVar

import psycopg
import redis

if TYPE_CHECKING:
    from scripts.bench_webhooks import WebhookBench

ROOT: Final = Path(__file__).resolve().parent.parent
VENV_BIN: Final = Path(sys.executable).parent
CELERY: Final = str(VENV_BIN / "celery")
SCHEMA: Final = "account-verifier-bench/1"
DEFAULT_ADMIN_URL: Final = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS_URL: Final = "redis://127.0.0.1:6379/11"
# Marks a Redis database as the benchmark's, so that it is never flushed while it holds
# somebody else's keys.
REDIS_MARKER: Final = "account-verifier-bench:owner"
# The sample of the sequential loop and the traced accounts use these fake platform credentials.
FAKE_KEY_ID: Final = "AKIABENCHMARKKEY0001"
FAKE_SECRET: Final = "benchmark-secret"  # noqa: S105 - a fake for the stand-in
SESSION_POLICY: Final = (
    '{"Version":"2012-10-17","Statement":[{"Effect":"Deny","Action":"*","Resource":"*"}]}'
)
CLK_TCK: Final = os.sysconf("SC_CLK_TCK")
PAGE_KB: Final = os.sysconf("SC_PAGE_SIZE") // 1024

T = TypeVar("T")


class BenchError(Exception):
    """Something the operator must fix or know; printed without a traceback."""


class Interrupted(BaseException):
    """SIGTERM, turned into an exception so that every `finally` runs."""


# --------------------------------------------------------------------------------------------
# Small helpers: URLs, /proc, formatting
# --------------------------------------------------------------------------------------------


def libpq_url(url: str) -> str:
    """`postgresql://...` for psycopg, whatever SQLAlchemy-style scheme `url` has."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in {"postgres", "postgresql", "postgresql+psycopg"}:
        raise BenchError(f"not a PostgreSQL URL: {url!r} (use postgresql://user@host:port/db)")
    return f"postgresql://{rest}"


def with_database(url: str, name: str) -> str:
    """`url` pointing at database `name` (query string kept)."""
    parts = urllib.parse.urlsplit(libpq_url(url))
    return urllib.parse.urlunsplit(parts._replace(path=f"/{name}"))


def database_name(url: str) -> str:
    """The database part of a PostgreSQL URL."""
    return urllib.parse.urlsplit(url).path.lstrip("/")


def masked(url: str) -> str:
    """A URL with its password hidden, for messages."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


@dataclass(frozen=True, slots=True)
class ProcSample:
    """CPU (self and waited-for children) and memory of one process, from /proc."""

    cpu_seconds: float
    rss_mb: float
    hwm_mb: float
    # Proportional set size: shared pages (a prefork parent's imports) counted once in total.
    pss_mb: float = 0.0
    user_seconds: float = 0.0
    system_seconds: float = 0.0
    # The main thread of the main process alone: Celery's consumer loop (the tasks run in the
    # pool's processes and their threads).
    main_thread_seconds: float = 0.0


def _read_one(pid: int) -> tuple[list[int], dict[str, float], int, list[int]] | None:
    """(utime stime cutime cstime ticks, memory, ppid, main-thread ticks) of one process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
        main = Path(f"/proc/{pid}/task/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may contain spaces: split after the last ")".
    fields = stat[stat.rindex(")") + 2 :].split()
    main_fields = main[main.rindex(")") + 2 :].split()
    memory = {}
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key in {"VmRSS", "VmHWM"}:
            memory[key] = int(value.split()[0]) / 1024
    ticks = [int(value) for value in fields[11:15]]
    return ticks, memory, int(fields[1]), [int(main_fields[11]), int(main_fields[12])]


def _pss_mb(pid: int) -> float:
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0.0
    for line in rollup.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != pid:
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
                found.append(int(entry.name))
    return found


class MemoryPeaks:
    """The worker's memory, sampled every `interval` seconds on a thread while it works.

    Two peaks of the total over the worker's processes (parent and prefork children): RSS,
    which counts the pages they share (the parent's imports, inherited at fork) once per
    process, and PSS, which splits each shared page between its sharers so that it counts
    once in the total, the memory the worker really occupies.
    """

    def __init__(self, pids: Sequence[int], interval: float = 0.5) -> None:
        self._pids = list(pids)
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-peaks", daemon=True)
        self.rss_mb = 0.0
        self.pss_mb = 0.0

    def __enter__(self) -> MemoryPeaks:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _sample(self) -> None:
        samples = [read_proc(pid) for pid in self._pids]
        present = [sample for sample in samples if sample is not None]
        self.rss_mb = max(self.rss_mb, sum(sample.rss_mb for sample in present))
        self.pss_mb = max(self.pss_mb, sum(sample.pss_mb for sample in present))

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()


def read_proc(pid: int) -> ProcSample | None:
    """CPU and memory of `pid` and its live children (a prefork worker's pool processes).

    CPU is utime+stime+cutime+cstime summed over the process and its children; memory is the
    sum of their VmRSS and VmHWM (the sum of peaks: an upper bound of the peak total). None once
    the process is gone.
    """
    own = _read_one(pid)
    if own is None:
        return None
    ticks, memory, _, main_ticks = own
    rss, hwm = memory.get("VmRSS", 0.0), memory.get("VmHWM", 0.0)
    pss = _pss_mb(pid)
    for child in _children(pid):
        sample = _read_one(child)
        if sample is None:
            continue
        ticks = [a + b for a, b in zip(ticks, sample[0], strict=True)]
        rss += sample[1].get("VmRSS", 0.0)
        hwm += sample[1].get("VmHWM", 0.0)
        pss += _pss_mb(child)
    return ProcSample(
        cpu_seconds=sum(ticks) / CLK_TCK,
        rss_mb=rss,
        hwm_mb=hwm,
        pss_mb=pss,
        user_seconds=(ticks[0] + ticks[2]) / CLK_TCK,
        system_seconds=(ticks[1] + ticks[3]) / CLK_TCK,
        main_thread_seconds=sum(main_ticks) / CLK_TCK,
    )


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    total = sum(values)
    idle = values[3] + values[4]  # idle + iowait
    return (total - idle) / CLK_TCK, total / CLK_TCK


def percentile(values: Sequence[float], share: float) -> float:
    """Linear-interpolated percentile (share in 0..1) of a non-empty sequence."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    position = (len(ordered) - 1) * share
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def rounded(value: float | None, digits: int = 3) -> float | None:
    """JSON-friendly rounding that keeps None and turns NaN into None."""
    if value is None or math.isnan(value) or math.isinf(value):
        return None
    return round(value, digits)


def _set_parent_death_signal() -> None:
    """In a child before exec: die with the benchmark even if it is SIGKILLed (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


# --------------------------------------------------------------------------------------------
# Child processes
# --------------------------------------------------------------------------------------------


class Child:
    """A child process in its own session, with stdout and stderr in files."""

    def __init__(
        self, name: str, args: Sequence[str], *, env: Mapping[str, str], log_dir: Path
    ) -> None:
        self.name = name
        self.stdout_path = log_dir / f"{name}.out"
        self.stderr_path = log_dir / f"{name}.err"
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.process = subprocess.Popen(
                list(args),
                cwd=ROOT,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                # Own session: a Ctrl-C in the terminal reaches only the benchmark, which then
                # stops its children in order.
                start_new_session=True,
                preexec_fn=_set_parent_death_signal,  # noqa: PLW1509 - no threads yet at fork
            )

    @property
    def pid(self) -> int:
        """The process id."""
        return self.process.pid

    def alive(self) -> bool:
        """Whether the process still runs."""
        return self.process.poll() is None

    def tail(self, lines: int = 15) -> str:
        """The last lines of stderr and stdout, for error messages."""
        out = []
        for path in (self.stderr_path, self.stdout_path):
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace").strip().splitlines()[-lines:]
                if text:
                    out.append(f"--- {path.name} ---\n" + "\n".join(text))
        return "\n".join(out) or "(no output)"

    def check_alive(self) -> None:
        """Raise with the process's last words if it has exited."""
        if not self.alive():
            raise BenchError(
                f"{self.name} exited with status {self.process.returncode}:\n{self.tail()}"
            )

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM to its process group, then SIGKILL if it does not exit in time."""
        if self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


def wait_for(predicate: Callable[[], T | None], *, timeout: float, what: str) -> T:
    """Poll `predicate` every 0.1 s until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)


def start_standin(
    *, median_ms: float, sigma: float, seed: int, rate_limit: float | None, log_dir: Path
) -> tuple[Child, str]:
    """`python -m sandbox.standin` on a free port; returns it and its URL."""
    args = [
        sys.executable,
        "-m",
        "sandbox.standin",
        "--median-ms",
        str(median_ms),
        "--latency-sigma",
        str(sigma),
        "--seed",
        str(seed),
    ]
    if rate_limit is not None:
        args += ["--rate-limit", str(rate_limit)]
    child = Child("sts-standin", args, env=os.environ, log_dir=log_dir)

    def url() -> str | None:
        child.check_alive()
        line = child.stdout_path.read_text().strip()
        return line if line.startswith("http://") else None

    return child, wait_for(url, timeout=30, what="the STS stand-in to print its URL")


class StandIn:
    """The stand-in's control endpoint."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def _call(self, method: str, path: str) -> dict[str, Any]:
        request = urllib.request.Request(f"{self.url}{path}", method=method, data=None)  # noqa: S310
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - our child
            data: dict[str, Any] = json.loads(response.read())
        return data

    def stats(self) -> dict[str, Any]:
        """Counters without the per-role breakdown (which grows with the account count)."""
        return self._call("GET", "/_standin/stats?roles=0")

    def reset(self) -> None:
        """Zero the counters."""
        self._call("POST", "/_standin/reset")


# --------------------------------------------------------------------------------------------
# PostgreSQL: scratch database, seeding, statistics
# --------------------------------------------------------------------------------------------


def create_scratch_database(admin_url: str, prefix: str) -> str:
    """Create an empty database next to `admin_url`'s; return its libpq URL."""
    name = f"{prefix}_{datetime.now(UTC):%Y%m%d%H%M%S}_{uuid.uuid4().hex[:6]}"
    try:
        with psycopg.connect(libpq_url(admin_url), autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.Error as error:
        raise BenchError(
            f"cannot create a scratch database on {masked(admin_url)}: {error}".strip()
        ) from None
    return with_database(admin_url, name)


def drop_scratch_database(admin_url: str, url: str) -> None:
    """Drop a database made by `create_scratch_database`, disconnecting its clients."""
    name = database_name(url)
    with psycopg.connect(libpq_url(admin_url), autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def migrate(url: str) -> None:
    """`alembic upgrade head` on `url`, as the API and the tests do."""
    from alembic import command  # noqa: PLC0415 - only the benchmarks need alembic
    from alembic.config import Config  # noqa: PLC0415

    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    config.attributes["configure_logger"] = False
    command.upgrade(config, "head")


@dataclass(frozen=True, slots=True)
class Account:
    """One seeded account: enough for the worker and for the sequential loop."""

    id: uuid.UUID
    organization_id: uuid.UUID
    aws_account_id: str
    role_arn: str
    external_id: str


def make_accounts(count: int, *, tag: str, per_org: int = 100) -> list[Account]:
    """`count` accounts whose role names (`ok-...`) make the stand-in succeed."""
    orgs = [uuid.uuid4() for _ in range(max(1, math.ceil(count / per_org)))]
    accounts = []
    for i in range(count):
        aws_id = f"{100_000_000_000 + i:012d}"
        accounts.append(
            Account(
                id=uuid.uuid4(),
                organization_id=orgs[i // per_org],
                aws_account_id=aws_id,
                role_arn=f"arn:aws:iam::{aws_id}:role/ok-bench-{i}",
                external_id=f"bench-{tag}-{i}",
            )
        )
    return accounts


def seed_accounts(
    url: str,
    accounts: Sequence[Account],
    *,
    due_now: bool = True,
    also: Callable[[psycopg.Cursor[Any]], None] | None = None,
) -> datetime:
    """COPY the accounts (status pending) in one transaction; return when they became due.

    They are due from the moment the COPY commits (before it, no dispatcher can see them), so
    that is the time returned and the one lags are measured from: the COPY's own seconds are
    not the worker's. `due_now=False` seeds them due in a year: kept out of the dispatcher's way
    (the trace).
    """
    with psycopg.connect(url) as conn:
        now = conn.execute("SELECT now()").fetchone()
        assert now is not None  # noqa: S101 - SELECT returns a row
        due: datetime = now[0]
        orgs = sorted({a.organization_id for a in accounts})
        with conn.cursor() as cur:
            with cur.copy("COPY organizations (id, name) FROM STDIN") as copy:
                for org in orgs:
                    copy.write_row((org, f"bench org {org.hex[:8]}"))
            columns = "id, organization_id, alias, aws_account_id, role_arn, external_id"
            with cur.copy(f"COPY aws_accounts ({columns}, next_due_at) FROM STDIN") as copy:
                for n, a in enumerate(accounts):
                    copy.write_row(
                        (
                            a.id,
                            a.organization_id,
                            f"bench account {n}",
                            a.aws_account_id,
                            a.role_arn,
                            a.external_id,
                            due if due_now else due.replace(year=due.year + 1),
                        )
                    )
            if also is not None:  # more rows in the same transaction (--webhooks' endpoints)
                also(cur)
        conn.commit()
        committed = conn.execute("SELECT now()").fetchone()
        assert committed is not None  # noqa: S101 - SELECT returns a row
    visible: datetime = committed[0]
    return visible


# pg_stat_database columns compared before and after the run.
PG_DATABASE_COLUMNS: Final = (
    "xact_commit",
    "xact_rollback",
    "tup_returned",
    "tup_fetched",
    "tup_inserted",
    "tup_updated",
    "tup_deleted",
    "blks_read",
    "blks_hit",
    "sessions",
)


def pg_database_stats(admin: psycopg.Connection[Any], name: str) -> dict[str, int]:
    """pg_stat_database counters of database `name`, read from another database."""
    columns = ", ".join(PG_DATABASE_COLUMNS)
    row = admin.execute(
        f"SELECT {columns} FROM pg_stat_database WHERE datname = %s", (name,)
    ).fetchone()
    if row is None:
        raise BenchError(f"no pg_stat_database row for {name}")
    return {column: int(value or 0) for column, value in zip(PG_DATABASE_COLUMNS, row, strict=True)}


def processes_cpu(command: str) -> dict[int, float]:
    """CPU seconds (children included) of every process of this machine named `command`.

    Used for the PostgreSQL server: a backend that exits is reaped by the postmaster, whose
    cutime/cstime then include it, so the sum over all `postgres` processes misses nothing.
    All its databases are included (on a shared machine, other people's work too).
    """
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if stat[stat.index("(") + 1 : stat.rindex(")")] != command:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        out[int(entry.name)] = sum(int(v) for v in fields[11:15]) / CLK_TCK
    return out


def cpu_delta(before: Mapping[int, float], after: Mapping[int, float]) -> float:
    """CPU used between two `processes_cpu` readings (processes gone since are in a parent's)."""
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())


def pg_stat_statements_loaded(admin: psycopg.Connection[Any]) -> bool:
    """Whether pg_stat_statements is in shared_preload_libraries (it needs to be, to count)."""
    row = admin.execute("SHOW shared_preload_libraries").fetchone()
    return row is not None and "pg_stat_statements" in str(row[0])


# --------------------------------------------------------------------------------------------
# Redis
# --------------------------------------------------------------------------------------------


def redis_db(url: str) -> int:
    """The database number of a redis:// URL (0 when absent)."""
    path = urllib.parse.urlsplit(url).path.strip("/")
    return int(path) if path.isdigit() else 0


def claim_redis_db(client: redis.Redis) -> None:
    """Make sure the database is empty or the benchmark's, then flush it and mark it ours."""
    size = int(client.dbsize())
    if size and not client.exists(REDIS_MARKER):
        raise BenchError(
            f"Redis database {client.connection_pool.connection_kwargs.get('db', 0)} holds "
            f"{size} keys that are not the benchmark's; pick an empty one with --redis-url"
        )
    client.flushdb()
    client.set(REDIS_MARKER, str(os.getpid()))


def redis_commandstats(client: redis.Redis) -> dict[str, int]:
    """Calls per command since the server started (server-wide: Redis has no per-db counts)."""
    info: dict[str, Any] = client.info("commandstats")
    out = {}
    for key, value in info.items():
        name = key.removeprefix("cmdstat_")
        if isinstance(value, dict):
            out[name] = int(value.get("calls", 0))
    return out


def redis_cpu_seconds(client: redis.Redis) -> float:
    """The Redis server's own CPU so far."""
    info: dict[str, Any] = client.info("cpu")
    return float(info.get("used_cpu_user", 0.0)) + float(info.get("used_cpu_sys", 0.0))


def other_redis_clients(client: redis.Redis, db: int) -> int:
    """Connections to other databases of the same server: they pollute commandstats."""
    clients: list[dict[str, Any]] = client.client_list()
    return sum(1 for c in clients if str(c.get("db")) != str(db))


def consumers(client: redis.Redis, db: int) -> int:
    """Connections to our database blocked in BRPOP: one per worker process that consumes."""
    clients: list[dict[str, Any]] = client.client_list()
    return sum(1 for c in clients if str(c.get("db")) == str(db) and c.get("cmd") == "brpop")


# Commands that put a message on the broker: kombu's Redis transport publishes a task with
# LPUSH and a broadcast (remote control, gossip) with PUBLISH.
BROKER_PUBLISH_COMMANDS: Final = ("lpush", "rpush", "publish")


# --------------------------------------------------------------------------------------------
# The sequential boto3 loop
# --------------------------------------------------------------------------------------------


@dataclass
class SequentialResult:
    """The naive alternative's figures."""

    verifications: int
    verified: int
    wall_seconds: float
    cpu_seconds: float
    call_ms: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        """Verifications per second."""
        return self.verifications / self.wall_seconds if self.wall_seconds > 0 else math.nan

    @property
    def mean_call_seconds(self) -> float:
        """Mean wall time of one STS call as one thread sees it."""
        return statistics.fmean(self.call_ms) / 1000 if self.call_ms else math.nan


def sequential_loop(accounts: Sequence[Account]) -> SequentialResult:
    """A plain boto3 loop: AssumeRole with the external ID, then without (it must be refused).

    The credentials and the endpoint come from the environment, as a plain script's would.
    """
    import boto3  # noqa: PLC0415 - the loop is the only boto3 user here
    import botocore.exceptions  # noqa: PLC0415

    client = boto3.client("sts")
    calls: list[float] = []
    verified = 0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for account in accounts:
        session_name = f"bench-{account.id.hex[:24]}"
        t0 = time.perf_counter()
        response = client.assume_role(
            RoleArn=account.role_arn,
            RoleSessionName=session_name,
            ExternalId=account.external_id,
            DurationSeconds=900,
            Policy=SESSION_POLICY,
        )
        t1 = time.perf_counter()
        ok = f":{account.aws_account_id}:" in response["AssumedRoleUser"]["Arn"]
        del response
        try:
            client.assume_role(
                RoleArn=account.role_arn,
                RoleSessionName=session_name + "-x",
                DurationSeconds=900,
                Policy=SESSION_POLICY,
            )
            enforced = False
        except botocore.exceptions.ClientError as error:
            enforced = error.response.get("Error", {}).get("Code") == "AccessDenied"
        t2 = time.perf_counter()
        calls += [(t1 - t0) * 1000, (t2 - t1) * 1000]
        verified += ok and enforced
    return SequentialResult(
        verifications=len(accounts),
        verified=verified,
        wall_seconds=time.perf_counter() - wall0,
        cpu_seconds=time.process_time() - cpu0,
        call_ms=calls,
    )


# --------------------------------------------------------------------------------------------
# The in-process trace: SQL statements per verification of the worker's own task code
# --------------------------------------------------------------------------------------------


@dataclass
class TraceResult:
    """What `count` in-process verifications sent to PostgreSQL."""

    verifications: int
    applied: int
    statements: int
    transactions: int
    checkouts: int
    xact_commit: int
    by_kind: dict[str, int]
    claim_statements: int
    claim_batch: int
    cpu_seconds: float
    cpu_measured: int


def wait_no_backends(admin: psycopg.Connection[Any], name: str, *, except_pid: int = 0) -> None:
    """Wait until no server process serves database `name`: each flushed its statistics.

    A backend flushes its counters to pg_stat_database when it exits (and at most once a
    second while idle); reading them before it is gone would miss its last transactions.
    """
    query = "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> %s"

    def gone() -> bool:
        row = admin.execute(query, (name, except_pid)).fetchone()
        return row is not None and int(row[0]) == 0

    with contextlib.suppress(BenchError):
        wait_for(gone, timeout=15, what=f"the connections to {name} to close")


def _verify_in_chunks(
    account_ids: Sequence[uuid.UUID], lease_id: uuid.UUID
) -> tuple[list[str], float, int]:
    """Verify leased accounts chunk by chunk as the worker's task does, on one thread.

    Returns each result, the CPU seconds spent and how many verifications that CPU covers (the
    first chunk builds clients and caches; the CPU figure leaves it out).
    """
    from worker.tasks import verification_context  # noqa: PLC0415 - reads the settings at import
    from worker.verify import (  # noqa: PLC0415
        apply_checked,
        check_account,
        read_attempts,
        report_applied,
    )

    ctx = verification_context()
    size = ctx.settings.dispatch_chunk_size
    chunks = [account_ids[i : i + size] for i in range(0, len(account_ids), size)]
    warmup = len(chunks[0]) if len(chunks) > 1 else 0
    results: list[str] = []
    cpu = 0.0
    for i, chunk in enumerate(chunks):
        started = time.process_time()
        with ctx.sessions.begin() as session:
            attempts = read_attempts(session, chunk, lease_id)
        checked = [check_account(ctx, attempt) for attempt in attempts]
        with ctx.sessions.begin() as session:
            applied = apply_checked(ctx, session, checked, actor="bench", correlation_id=None)
        results.extend(report_applied(result).value for result in applied)
        if i > 0 or not warmup:
            cpu += time.process_time() - started
    return results, cpu, len(account_ids) - warmup


def trace_verifications(
    admin: psycopg.Connection[Any], url: str, accounts: Sequence[Account], *, lease_seconds: int
) -> TraceResult:
    """Seed `accounts`, claim them as the dispatcher does and verify each, in this process.

    The same code as the worker (`claim_due_accounts`, then what `verify_accounts_task` runs for
    each chunk: `read_attempts`, `check_account` for each account, `apply_checked`, with the
    worker's context and chunk size), single-threaded, with
    SQLAlchemy's events counting statements, transactions and pool checkouts (each checkout
    is a `SELECT 1` pre-ping when the engine pings), and pg_stat_database counting what the
    server saw committed. The environment (DATABASE_URL, REDIS_URL, AWS_*) must point at the
    run's services already.
    """
    from sqlalchemy import Engine, event  # noqa: PLC0415
    from sqlalchemy.pool import Pool  # noqa: PLC0415

    from worker.claims import claim_due_accounts  # noqa: PLC0415
    from worker.db import dispose_engine, session_factory  # noqa: PLC0415
    from worker.logging import configure_logging  # noqa: PLC0415
    from worker.settings import get_settings  # noqa: PLC0415

    get_settings.cache_clear()
    configure_logging(get_settings(), stream=sys.stderr)
    counts: dict[str, int] = {"statements": 0, "commits": 0, "checkouts": 0}
    kinds: dict[str, int] = {}

    def on_statement(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        counts["statements"] += 1
        words = statement.split(None, 1)
        kind = words[0].upper() if words else "?"
        kinds[kind] = kinds.get(kind, 0) + 1

    listeners: list[tuple[Any, str, Callable[..., None]]] = [
        (Engine, "before_cursor_execute", on_statement),
        (Engine, "commit", lambda *_: counts.__setitem__("commits", counts["commits"] + 1)),
        (Pool, "checkout", lambda *_: counts.__setitem__("checkouts", counts["checkouts"] + 1)),
    ]
    seed_accounts(url, accounts)
    name = database_name(url)
    wait_no_backends(admin, name)
    before = pg_database_stats(admin, name)["xact_commit"]
    sessions = session_factory()
    for target, name_, listener in listeners:
        event.listen(target, name_, listener)
    try:
        with sessions.begin() as session:
            claim = claim_due_accounts(session, limit=len(accounts), lease_seconds=lease_seconds)
        claim_statements = counts["statements"]
        claim_commits = counts["commits"]
        for key in counts:
            counts[key] = 0
        kinds.clear()
        results, cpu, measured = _verify_in_chunks(claim.account_ids, claim.lease_id)
    finally:
        for target, name_, listener in listeners:
            event.remove(target, name_, listener)
        dispose_engine()
    wait_no_backends(admin, name)
    after = pg_database_stats(admin, name)["xact_commit"]
    return TraceResult(
        verifications=len(claim.account_ids),
        applied=sum(1 for r in results if r == "applied"),
        statements=counts["statements"],
        transactions=counts["commits"],
        checkouts=counts["checkouts"],
        xact_commit=after - before - claim_commits,
        by_kind=dict(sorted(kinds.items())),
        claim_statements=claim_statements,
        claim_batch=len(claim.account_ids),
        cpu_seconds=cpu,
        cpu_measured=measured,
    )


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def worker_environment(
    *,
    database_url: str,
    redis_url: str,
    sts_url: str,
    concurrency: int | None,
    dispatch_interval: float | None,
    extra: Mapping[str, str],
    log_dir: Path,
) -> dict[str, str]:
    """The worker's and beat's environment: ours minus every worker setting, plus the run's."""
    from worker.settings import Settings  # noqa: PLC0415

    setting_names = {name.upper() for name in Settings.model_fields} | {"AWS_DEFAULT_REGION"}
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("AWS_") and key not in setting_names
    }
    env.update(
        DATABASE_URL=database_url,
        REDIS_URL=redis_url,
        AWS_ENDPOINT_URL_STS=sts_url,
        # The stand-in answers the permission probes' services too.
        AWS_ENDPOINT_URL=sts_url,
        AWS_REGION="us-east-1",
        AWS_ACCESS_KEY_ID=FAKE_KEY_ID,
        AWS_SECRET_ACCESS_KEY=FAKE_SECRET,
        AWS_EC2_METADATA_DISABLED="true",
        LOG_LEVEL="WARNING",
        LOG_FORMAT="json",
        # Not a tuning knob: beat's schedule file must not be shared with another beat.
        BEAT_SCHEDULE_FILE=str(log_dir / "beat-schedule"),
    )
    if concurrency is not None:
        env["WORKER_CONCURRENCY"] = str(concurrency)
    if dispatch_interval is not None:
        env["DISPATCH_INTERVAL_SECONDS"] = str(dispatch_interval)
    env.update(extra)
    return env


@dataclass
class Progress:
    """The latest poll of the database."""

    verified: int = 0
    failed: int = 0
    transient: int = 0


class Poller:
    """One autocommit connection to the scratch database; counts its own transactions."""

    QUERY: Final = (
        "SELECT count(*) FILTER (WHERE last_verified_at IS NOT NULL),"
        " count(*) FILTER (WHERE status = 'failed'),"
        " count(*) FILTER (WHERE last_outcome = 'transient' AND last_verified_at IS NULL)"
        " FROM aws_accounts"
    )
    TABLES: Final = (
        "SELECT relname, n_tup_ins, n_tup_upd, n_tup_hot_upd, n_tup_del, seq_scan,"
        " coalesce(idx_scan, 0) FROM pg_stat_user_tables"
    )
    TABLE_COLUMNS: Final = (
        "n_tup_ins",
        "n_tup_upd",
        "n_tup_hot_upd",
        "n_tup_del",
        "seq_scan",
        "idx_scan",
    )

    def __init__(self, url: str) -> None:
        self.conn = psycopg.connect(url, autocommit=True)
        self.transactions = 0

    def poll(self) -> Progress:
        """Count verified, failed and transiently failing accounts."""
        row = self.conn.execute(self.QUERY).fetchone()
        self.transactions += 1
        assert row is not None  # noqa: S101 - an aggregate returns a row
        return Progress(int(row[0]), int(row[1]), int(row[2]))

    def table_stats(self) -> dict[str, dict[str, int]]:
        """pg_stat_user_tables counters per table."""
        rows = self.conn.execute(self.TABLES).fetchall()
        self.transactions += 1
        return {
            str(row[0]): dict(zip(self.TABLE_COLUMNS, (int(v or 0) for v in row[1:]), strict=True))
            for row in rows
        }

    def unverified(self) -> list[dict[str, Any]]:
        """The accounts not verified yet, grouped by what the worker last did with them."""
        rows = self.conn.execute(
            "SELECT status, last_outcome, last_error_code, lease_id IS NOT NULL, count(*)"
            " FROM aws_accounts WHERE last_verified_at IS NULL GROUP BY 1, 2, 3, 4"
            " ORDER BY 5 DESC"
        ).fetchall()
        self.transactions += 1
        keys = ("status", "last_outcome", "last_error_code", "leased", "count")
        return [dict(zip(keys, row, strict=True)) for row in rows]

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()


def table_deltas(
    before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]
) -> dict[str, dict[str, int]]:
    """Per-table counter increases between two `Poller.table_stats` readings."""
    return {
        table: {k: v - before.get(table, {}).get(k, 0) for k, v in counters.items()}
        for table, counters in sorted(after.items())
    }


@dataclass
class Sample:
    """Everything read at one instant of the run."""

    at: float
    worker: ProcSample
    beat: ProcSample
    standin: ProcSample
    machine: tuple[float, float]
    redis_commands: dict[str, int]
    redis_cpu: float
    pg_cpu: dict[int, float]
    bench_cpu: float


def take_sample(
    *,
    workers: Sequence[Child],
    beat: Child,
    standin: Child,
    broker: redis.Redis,
    admin: psycopg.Connection[Any],
    db_name: str,
) -> Sample:
    """CPU, memory and counters of every process of the run, now.

    With several worker processes, CPU and RSS are summed and the peak RSS is the largest one's.
    """
    samples = []
    for child in (*workers, beat, standin):
        sample = read_proc(child.pid)
        if sample is None:
            child.check_alive()
            raise BenchError(f"cannot read /proc/{child.pid} of {child.name}")
        samples.append(sample)
    worker_samples = samples[: len(workers)]
    return Sample(
        at=time.monotonic(),
        worker=ProcSample(
            cpu_seconds=sum(x.cpu_seconds for x in worker_samples),
            rss_mb=sum(x.rss_mb for x in worker_samples),
            hwm_mb=max(x.hwm_mb for x in worker_samples),
            pss_mb=sum(x.pss_mb for x in worker_samples),
            user_seconds=sum(x.user_seconds for x in worker_samples),
            system_seconds=sum(x.system_seconds for x in worker_samples),
            main_thread_seconds=sum(x.main_thread_seconds for x in worker_samples),
        ),
        beat=samples[-2],
        standin=samples[-1],
        machine=machine_cpu(),
        redis_commands=redis_commandstats(broker),
        redis_cpu=redis_cpu_seconds(broker),
        pg_cpu=processes_cpu("postgres"),
        bench_cpu=time.process_time(),
    )


def lag_and_window(url: str, due: datetime) -> dict[str, float]:
    """Lag from due to verified, and the run's window, from the database's own clock.

    "Verified" is when the result was committed: `updated_at`, which the schema's trigger sets
    in the applying transaction when the status moves pending -> connected (`last_verified_at`
    is when the attempt started; the later of the two is used).
    """
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            """
            WITH done AS (
                SELECT extract(epoch FROM greatest(last_verified_at, updated_at) - %(due)s) AS lag,
                       extract(epoch FROM last_verified_at - %(due)s) AS started
                FROM aws_accounts
                WHERE last_verified_at IS NOT NULL
            )
            SELECT count(*),
                   percentile_cont(0.5) WITHIN GROUP (ORDER BY lag),
                   percentile_cont(0.9) WITHIN GROUP (ORDER BY lag),
                   percentile_cont(0.99) WITHIN GROUP (ORDER BY lag),
                   max(lag), min(started)
            FROM done
            """,
            {"due": due},
        ).fetchone()
    assert row is not None  # noqa: S101 - an aggregate returns a row
    count, p50, p90, p99, last, first = row
    if not count:
        return {"count": 0}
    return {
        "count": int(count),
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "max": float(last),
        "first_started": float(first),
    }


def progress_line(
    history: Sequence[tuple[float, int]], progress: Progress, total: int, window: float
) -> str:
    """One progress line: verified so far, overall rate and the rate over the last `window` s."""
    start, now = history[0][0], history[-1][0]
    old = next((h for h in history if h[0] >= now - window), history[0])
    recent = (progress.verified - old[1]) / max(now - old[0], 1e-9)
    elapsed = now - start
    overall = progress.verified / elapsed if elapsed > 0 else 0.0
    share = progress.verified / total * 100 if total else 100.0
    extra = ""
    if progress.transient:
        extra += f"  transient {progress.transient:,}"
    if progress.failed:
        extra += f"  failed {progress.failed:,}"
    return (
        f"  [{elapsed:6.1f}s] verified {progress.verified:>{len(f'{total:,}')},}/{total:,} "
        f"({share:5.1f}%)  {overall:6.1f}/s overall, {recent:6.1f}/s lately{extra}"
    )


@dataclass
class Options:
    """Parsed command line."""

    accounts: int
    sample: int
    median_ms: float
    latency_sigma: float
    rate_limit: float | None
    concurrency: int | None
    dispatch_interval: float | None
    timeout: float
    keep: bool
    json_out: Path | None
    database_url: str
    redis_url: str
    seed: int
    trace: int
    progress_interval: float
    worker_env: dict[str, str]
    py_spy: Path | None
    cores: int
    workers: int
    webhooks: bool = False


@dataclass
class WorkerRun:
    """What phase 3 measured."""

    settings: Any
    before: Sample
    after: Sample
    pg_before: dict[str, int]
    pg_after: dict[str, int]
    tables: dict[str, dict[str, int]]
    own_transactions: int
    sts_stats: dict[str, Any]
    lag: dict[str, float]
    verified: int
    completed: bool
    other_redis_clients: int
    unverified: list[dict[str, Any]]
    # Sampled peaks of the worker's total memory (see MemoryPeaks).
    peak_rss_total_mb: float
    peak_pss_mb: float


class Bench:
    """One benchmark run: its services, its phases and their clean-up."""

    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.started_at = datetime.now(UTC)
        self.log_dir = Path(tempfile.mkdtemp(prefix="verifier-bench-"))
        self.children: list[Child] = []
        self.scratch: str | None = None
        self.admin: psycopg.Connection[Any] | None = None
        self.broker = redis.Redis.from_url(opts.redis_url, socket_timeout=10)
        self.broker_db = redis_db(opts.redis_url)
        self.succeeded = False
        self.keep_logs = False
        self.webhooks: WebhookBench | None = None
        if opts.webhooks:
            from scripts.bench_webhooks import WebhookBench  # noqa: PLC0415 - imports the worker

            self.webhooks = WebhookBench()
        self.webhook_results: dict[str, Any] | None = None

    # -- phases -------------------------------------------------------------------------------

    def execute(self) -> tuple[dict[str, Any], bool]:
        """Every phase in order; returns the results and whether every account was verified."""
        try:
            standin, control = self.prepare()
            accounts = make_accounts(self.opts.accounts + self.opts.trace, tag=uuid.uuid4().hex[:8])
            bench_accounts = accounts[: self.opts.accounts]
            sequential, sequential_sts = self.sequential(bench_accounts, control)
            run = self.worker_run(bench_accounts, standin, control)
            trace = self.trace(accounts[self.opts.accounts :], run.settings)
            assert self.admin is not None  # noqa: S101 - set by prepare()
            assert self.scratch is not None  # noqa: S101
            results = summarize(
                opts=self.opts,
                started_at=self.started_at,
                sequential=sequential,
                sequential_sts=sequential_sts,
                run=run,
                trace=trace,
                stats_loaded=pg_stat_statements_loaded(self.admin),
                scratch=self.scratch,
            )
            if self.webhook_results is not None:
                results["webhooks"] = self.webhook_results
            self.succeeded = True
            return results, run.completed
        finally:
            self.cleanup()

    def prepare(self) -> tuple[Child, StandIn]:
        """Redis database, scratch database and the STS stand-in; AWS_* for this process."""
        opts = self.opts
        try:
            claim_redis_db(self.broker)
        except redis.RedisError as error:
            raise BenchError(f"Redis at {masked(opts.redis_url)}: {error}") from None
        print(f"scratch database on {masked(opts.database_url)} ...", file=sys.stderr)
        self.scratch = create_scratch_database(opts.database_url, "verifier_bench")
        migrate(self.scratch)
        self.admin = psycopg.connect(libpq_url(opts.database_url), autocommit=True)
        standin, sts_url = start_standin(
            median_ms=opts.median_ms,
            sigma=opts.latency_sigma,
            seed=opts.seed,
            rate_limit=opts.rate_limit,
            log_dir=self.log_dir,
        )
        self.children.append(standin)
        # The sequential loop and the trace run in this process against the same stand-in.
        for key in [k for k in os.environ if k.startswith("AWS_")]:
            del os.environ[key]
        os.environ.update(
            AWS_ENDPOINT_URL_STS=sts_url,
            AWS_ENDPOINT_URL=sts_url,
            AWS_ACCESS_KEY_ID=FAKE_KEY_ID,
            AWS_SECRET_ACCESS_KEY=FAKE_SECRET,
            AWS_REGION="us-east-1",
            AWS_DEFAULT_REGION="us-east-1",
            AWS_EC2_METADATA_DISABLED="true",
        )
        return standin, StandIn(sts_url)

    def sequential(
        self, accounts: Sequence[Account], control: StandIn
    ) -> tuple[SequentialResult, dict[str, Any]]:
        """Phase 1: the plain boto3 loop over an evenly spread sample."""
        step = max(1, len(accounts) // self.opts.sample)
        sample = accounts[::step][: self.opts.sample]
        print(f"sequential boto3 loop over {len(sample)} accounts ...", file=sys.stderr)
        result = sequential_loop(sample)
        print(
            f"  {result.rate:.1f} verifications/s, mean STS call "
            f"{result.mean_call_seconds * 1000:.1f} ms",
            file=sys.stderr,
        )
        return result, control.stats()

    def start_services(self, sts_url: str) -> tuple[Any, list[Child], Child]:
        """`celery -A worker worker` (--workers of them) and `celery -A worker beat`.

        Returns once every worker consumes. With one worker (the default) its command line is
        exactly the operators' one; several get distinct --hostname values, nothing else.
        """
        opts = self.opts
        assert self.scratch is not None  # noqa: S101 - set by prepare()
        env = worker_environment(
            database_url=self.scratch,
            redis_url=opts.redis_url,
            sts_url=sts_url,
            concurrency=opts.concurrency,
            dispatch_interval=opts.dispatch_interval,
            extra={**opts.worker_env, **(self.webhooks.env() if self.webhooks else {})},
            log_dir=self.log_dir,
        )
        settings = settings_from(env)  # what the worker reads from the same environment
        print(
            f"starting {opts.workers} `celery worker`(s) "
            f"({settings.worker_processes or os.cpu_count()} processes x "
            f"{settings.worker_concurrency} threads"
            f"{'' if opts.concurrency is not None else ', the default'}) and beat ...",
            file=sys.stderr,
        )
        workers = []
        for i in range(opts.workers):
            args = [CELERY, "-A", "worker", "worker"]
            if opts.workers > 1:
                args += ["--hostname", f"bench{i + 1}@%h"]
            workers.append(Child(f"worker{i + 1}", args, env=env, log_dir=self.log_dir))
            self.children.append(workers[-1])
        beat = Child("beat", [CELERY, "-A", "worker", "beat"], env=env, log_dir=self.log_dir)
        self.children.append(beat)

        def consuming() -> bool:
            for child in (*workers, beat):
                child.check_alive()
            return consumers(self.broker, self.broker_db) >= len(workers)

        wait_for(consuming, timeout=120, what="the worker(s) to consume from Redis")
        return settings, workers, beat

    def worker_run(
        self, accounts: Sequence[Account], standin: Child, control: StandIn
    ) -> WorkerRun:
        """Phase 2: seed every account due now and wait until the worker verified them all."""
        opts, admin, scratch = self.opts, self.admin, self.scratch
        assert admin is not None  # noqa: S101 - set by prepare()
        assert scratch is not None  # noqa: S101
        db_name = database_name(scratch)
        settings, workers, beat = self.start_services(control.url)
        control.reset()
        other_clients = other_redis_clients(self.broker, self.broker_db)
        poller = Poller(scratch)
        tables_before = poller.table_stats()
        pg_before = pg_database_stats(admin, db_name)

        def sample() -> Sample:
            return take_sample(
                workers=workers,
                beat=beat,
                standin=standin,
                broker=self.broker,
                admin=admin,
                db_name=db_name,
            )

        before = sample()
        if self.webhooks is not None:
            self.webhooks.start()
        due = seed_accounts(
            scratch, accounts, also=self.webhooks.register if self.webhooks else None
        )
        with psycopg.connect(scratch, autocommit=True) as conn:
            conn.execute("ANALYZE aws_accounts")  # as after any bulk load
        own_transactions = 3  # the seed, its commit time and ANALYZE; the poller counts its own
        print(
            f"seeded {len(accounts):,} accounts, all due now; waiting for the worker ...",
            file=sys.stderr,
        )
        spy = start_py_spy(workers[0].pid, opts.py_spy) if opts.py_spy is not None else None
        with MemoryPeaks([worker.pid for worker in workers]) as memory:
            progress = self.wait(poller, [*workers, beat], len(accounts))
        after = sample()
        if spy is not None:
            stop_py_spy(spy)
        sts_stats = control.stats()
        other_clients = max(other_clients, other_redis_clients(self.broker, self.broker_db))
        unverified: list[dict[str, Any]] = []
        if progress.verified < len(accounts):
            unverified = poller.unverified()
            self.report_timeout(unverified, workers)
        if self.webhooks is not None:
            self.webhook_results = self.webhooks.measure(scratch, timeout=opts.timeout)
            delivered = sample()  # every delivery done: what verifying and announcing cost
            worker_cpu = delivered.worker.cpu_seconds - before.worker.cpu_seconds
            self.webhook_results["until_delivered"] = {
                "seconds": round(delivered.at - before.at, 1),
                "worker_cpu_ms_per_event": rounded(worker_cpu / len(accounts) * 1000),
                "postgresql_cpu_ms_per_event": rounded(
                    cpu_delta(before.pg_cpu, delivered.pg_cpu) / len(accounts) * 1000
                ),
            }
            self.webhooks.stop()
            print(f"webhooks: {self.webhook_results}", file=sys.stderr)
        beat.stop()
        for worker in workers:
            worker.stop()
        tables_after = poller.table_stats()
        own_transactions += poller.transactions
        poller.close()
        wait_no_backends(admin, db_name)
        return WorkerRun(
            settings=settings,
            before=before,
            after=after,
            pg_before=pg_before,
            pg_after=pg_database_stats(admin, db_name),
            tables=table_deltas(tables_before, tables_after),
            own_transactions=own_transactions,
            sts_stats=sts_stats,
            lag=lag_and_window(scratch, due),
            verified=progress.verified,
            completed=progress.verified >= len(accounts),
            other_redis_clients=other_clients,
            unverified=unverified,
            peak_rss_total_mb=memory.rss_mb,
            peak_pss_mb=memory.pss_mb,
        )

    def report_timeout(
        self, unverified: Sequence[dict[str, Any]], workers: Sequence[Child]
    ) -> None:
        """Say why accounts were left: what the database says and the worker's last lines."""
        self.keep_logs = True
        print(
            "accounts left unverified (status, last outcome, error, leased: count):",
            file=sys.stderr,
        )
        for group in unverified:
            print(
                f"  {group['status']}, {group['last_outcome']}, {group['last_error_code']}, "
                f"{'leased' if group['leased'] else 'not leased'}: {group['count']:,}",
                file=sys.stderr,
            )
        for worker in workers:
            print(f"{worker.name}'s last lines:\n{worker.tail(10)}", file=sys.stderr)

    def wait(self, poller: Poller, services: Sequence[Child], total: int) -> Progress:
        """Poll until every account is verified or the timeout passes; print progress."""
        opts = self.opts
        started = time.monotonic()
        last_print = started
        history: list[tuple[float, int]] = [(started, 0)]
        while True:
            for service in services:
                service.check_alive()
            progress = poller.poll()
            now = time.monotonic()
            history.append((now, progress.verified))
            done = progress.verified >= total
            if done or now > started + opts.timeout:
                line = progress_line(history, progress, total, opts.progress_interval)
                verdict = "done" if done else f"TIMED OUT after {opts.timeout:g}s"
                print(f"{line}  {verdict}", file=sys.stderr)
                return progress
            if now - last_print >= opts.progress_interval:
                line = progress_line(history, progress, total, opts.progress_interval)
                print(line, file=sys.stderr)
                last_print = now
            time.sleep(0.25 if total < 5000 else 1.0)

    def trace(self, accounts: Sequence[Account], settings: Any) -> TraceResult | None:
        """Phase 3: statements per verification, traced in this process."""
        if not accounts:
            return None
        assert self.admin is not None  # noqa: S101 - set by prepare()
        assert self.scratch is not None  # noqa: S101
        print(f"tracing {len(accounts)} verifications in-process ...", file=sys.stderr)
        os.environ.update(
            DATABASE_URL=self.scratch,
            REDIS_URL=self.opts.redis_url,
            LOG_LEVEL="WARNING",
            LOG_FORMAT="json",
            STS_MAX_ATTEMPTS=str(settings.sts_max_attempts),
        )
        return trace_verifications(
            self.admin, self.scratch, accounts, lease_seconds=settings.lease_seconds
        )

    def cleanup(self) -> None:
        """Stop every child, drop the scratch database (unless --keep), flush Redis."""
        with _no_interrupts():
            release_run(
                children=self.children,
                admin=self.admin,
                admin_url=self.opts.database_url,
                scratch=self.scratch,
                keep=self.opts.keep,
                broker=self.broker,
                log_dir=self.log_dir if self.succeeded and not self.keep_logs else None,
            )
            if not (self.succeeded and not self.keep_logs):
                print(f"logs of the processes kept in {self.log_dir}", file=sys.stderr)


def settings_from(env: Mapping[str, str]) -> Any:
    """The worker's settings object as the worker builds it from `env`."""
    from worker.settings import Settings, SettingsError, load_settings  # noqa: PLC0415

    saved = dict(os.environ)
    try:
        os.environ.clear()
        os.environ.update(env)
        settings: Settings = load_settings()
    except SettingsError as error:
        raise BenchError(f"the worker would refuse this environment: {error}") from None
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return settings


def release_run(
    *,
    children: Sequence[Child],
    admin: psycopg.Connection[Any] | None,
    admin_url: str,
    scratch: str | None,
    keep: bool,
    broker: redis.Redis,
    log_dir: Path | None,
) -> None:
    """What every benchmark leaves behind, released: its children stopped (last started first),
    its scratch database dropped (or named, with --keep), its Redis database flushed, and
    `log_dir` removed when given (a run that succeeded)."""
    for child in reversed(children):
        child.stop()
    if admin is not None:
        admin.close()
    if scratch is not None and not keep:
        from worker.db import dispose_engine  # noqa: PLC0415

        dispose_engine()
        try:
            drop_scratch_database(admin_url, scratch)
        except psycopg.Error as error:
            print(f"could not drop {database_name(scratch)}: {error}", file=sys.stderr)
    elif scratch is not None:
        print(f"kept the scratch database: {masked(scratch)}", file=sys.stderr)
    with contextlib.suppress(redis.RedisError):
        broker.flushdb()
    broker.close()
    if log_dir is not None:
        shutil.rmtree(log_dir, ignore_errors=True)


@contextlib.contextmanager
def _no_interrupts() -> Iterator[None]:
    """Clean-up must not be cut short by a second Ctrl-C or SIGTERM."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def start_py_spy(pid: int, output: Path) -> subprocess.Popen[bytes]:
    """Sample the worker with py-spy (collapsed stacks) until `stop_py_spy`."""
    binary = shutil.which("py-spy", path=str(VENV_BIN)) or shutil.which("py-spy")
    if binary is None:
        raise BenchError("--py-spy needs py-spy: .venv/bin/pip install py-spy")
    output.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [
            binary,
            "record",
            "--pid",
            str(pid),
            "--subprocesses",  # the prefork children, where verifications run
            "--rate",
            "100",
            "--nonblocking",
            "--format",
            "raw",
            "--output",
            str(output),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def stop_py_spy(process: subprocess.Popen[bytes]) -> None:
    """Stop sampling; py-spy writes its output on SIGINT."""
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def summarize(
    *,
    opts: Options,
    started_at: datetime,
    sequential: SequentialResult,
    sequential_sts: dict[str, Any],
    run: WorkerRun,
    trace: TraceResult | None,
    stats_loaded: bool,
    scratch: str,
) -> dict[str, Any]:
    """Every figure of the run, as the JSON document."""
    settings, before, after, lag = run.settings, run.before, run.after, run.lag
    verified, sts_stats = run.verified, run.sts_stats
    n = max(verified, 1)
    window = lag.get("max", math.nan)  # due -> last result committed, on the database's clock
    rate = verified / window if window and window > 0 else math.nan
    worker_cpu = after.worker.cpu_seconds - before.worker.cpu_seconds
    cpu_per = worker_cpu / n
    assume_calls = int(sts_stats.get("by_action", {}).get("AssumeRole", 0))
    calls_per = assume_calls / n
    throttled = int(sts_stats.get("throttled", 0))
    requests = int(sts_stats.get("requests", 0))
    mean_latency = sequential.mean_call_seconds
    # Verifications in flight: threads per process x prefork processes x `celery worker`s.
    processes = int(settings.worker_processes) or (os.cpu_count() or 1)
    concurrency = int(settings.worker_concurrency) * processes * opts.workers
    bounds: dict[str, float] = {
        "concurrency": concurrency / (calls_per * mean_latency) if calls_per else math.nan,
        "cpu": opts.cores / cpu_per if cpu_per > 0 else math.nan,
    }
    accepted_per = (assume_calls - int(sts_stats.get("throttled", 0))) / n
    if opts.rate_limit is not None and accepted_per > 0:
        # The stand-in's token bucket spends tokens on accepted requests only.
        bounds["sts_rate_limit"] = opts.rate_limit / accepted_per
    # The machine's ceiling (the issue's formula: concurrency and CPU), and the run's: the
    # worker's own STS budget is as hard a limit as a core. Once the worker is efficient it is
    # the budget that binds (at most the STS quota over STS calls per verification), and a
    # throughput at the budget is the worker doing all it is allowed to.
    machine = {k: bounds[k] for k in ("concurrency", "cpu") if not math.isnan(bounds[k])}
    machine_ceiling = min(machine.values()) if machine else math.nan
    budget = getattr(settings, "sts_rate_limit_per_second", None)
    budget_bound = budget / calls_per if budget and calls_per else None
    if budget_bound is not None:
        bounds["sts_budget"] = budget_bound
    finite = {k: v for k, v in bounds.items() if not math.isnan(v)}
    binding = min(finite, key=lambda k: finite[k]) if finite else None
    ceiling = finite[binding] if binding else math.nan
    busy = after.machine[0] - before.machine[0]
    total = after.machine[1] - before.machine[1]
    pg_delta = {k: run.pg_after[k] - run.pg_before[k] for k in PG_DATABASE_COLUMNS}
    own_transactions, tables = run.own_transactions, run.tables
    # The benchmark's own transactions in the scratch database: the seeds, ANALYZE, its polls.
    worker_commits = pg_delta["xact_commit"] - own_transactions
    redis_delta = {
        k: v - before.redis_commands.get(k, 0)
        for k, v in after.redis_commands.items()
        if v - before.redis_commands.get(k, 0) > 0
    }
    published = sum(redis_delta.get(c, 0) for c in BROKER_PUBLISH_COMMANDS)
    pg_cpu = cpu_delta(before.pg_cpu, after.pg_cpu)
    components = {
        "worker": worker_cpu,
        "beat": after.beat.cpu_seconds - before.beat.cpu_seconds,
        "postgresql_server": pg_cpu,
        "redis_server": after.redis_cpu - before.redis_cpu,
        "sts_standin": after.standin.cpu_seconds - before.standin.cpu_seconds,
        "benchmark_itself": after.bench_cpu - before.bench_cpu,
    }
    components["rest_of_machine"] = max(
        0.0, (after.machine[0] - before.machine[0]) - sum(components.values())
    )
    wall = after.at - before.at

    results: dict[str, Any] = {
        "schema": SCHEMA,
        "started_at": started_at.isoformat(),
        "finished_at": datetime.now(UTC).isoformat(),
        "completed": run.completed,
        "unverified": run.unverified,
        "host": {
            "cores": opts.cores,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "load_average": list(os.getloadavg()),
        },
        "config": {
            "accounts": opts.accounts,
            "sample": sequential.verifications,
            "median_ms": opts.median_ms,
            "latency_sigma": opts.latency_sigma,
            "rate_limit": opts.rate_limit,
            "concurrency": concurrency,
            "concurrency_is_default": opts.concurrency is None,
            "worker_processes": opts.workers,
            "dispatch_interval_seconds": settings.dispatch_interval_seconds,
            "dispatch_batch_size": settings.dispatch_batch_size,
            "dispatch_max_queued": settings.dispatch_max_queued,
            "permission_probes": ",".join(settings.permission_probes) or "none",
            "worker_env": opts.worker_env,
            "seed": opts.seed,
            "timeout_seconds": opts.timeout,
            "database": masked(scratch) if opts.keep else database_name(scratch),
            "redis_url": masked(opts.redis_url),
        },
        "worker": {
            "verified": verified,
            "window_seconds": rounded(window),
            "verifications_per_second": rounded(rate, 1),
            "ratio_to_sequential": rounded(rate / sequential.rate, 2),
            "lag_seconds": {k: rounded(lag.get(k)) for k in ("p50", "p90", "p99", "max")},
            "first_attempt_after_seconds": rounded(lag.get("first_started")),
            "cpu_seconds": rounded(worker_cpu),
            "cpu_ms_per_verification": rounded(cpu_per * 1000),
            "user_cpu_ms_per_verification": rounded(
                (after.worker.user_seconds - before.worker.user_seconds) / n * 1000
            ),
            "system_cpu_ms_per_verification": rounded(
                (after.worker.system_seconds - before.worker.system_seconds) / n * 1000
            ),
            "consumer_thread_cpu_ms_per_verification": rounded(
                (after.worker.main_thread_seconds - before.worker.main_thread_seconds) / n * 1000
            ),
            "beat_cpu_seconds": rounded(after.beat.cpu_seconds - before.beat.cpu_seconds),
            # Judged: the sampled peak of PSS summed over the worker's processes.
            "peak_pss_mb": rounded(run.peak_pss_mb, 1),
            "peak_rss_total_mb": rounded(run.peak_rss_total_mb, 1),
            # Each process's own peak (VmHWM), summed: an upper bound of peak_rss_total_mb.
            "rss_peaks_summed_mb": rounded(after.worker.hwm_mb, 1),
            "rss_mb_at_end": rounded(after.worker.rss_mb, 1),
            "pss_mb_at_end": rounded(after.worker.pss_mb, 1),
            "beat_peak_rss_mb": rounded(after.beat.hwm_mb, 1),
        },
        "sts": {
            "mean_call_ms": rounded(mean_latency * 1000),
            "expected_mean_call_ms": rounded(opts.median_ms * math.exp(opts.latency_sigma**2 / 2)),
            "assume_role_calls": assume_calls,
            "calls_per_verification": rounded(calls_per),
            "requests": requests,
            "throttled": throttled,
            "throttled_share": rounded(throttled / requests if requests else 0.0, 4),
            "by_outcome": sts_stats.get("by_outcome", {}),
            # The permission probes go to other services: they spend no STS budget.
            "probe_requests": int(sts_stats.get("probe_requests", 0)),
            "probe_calls_per_verification": rounded(int(sts_stats.get("probe_requests", 0)) / n),
            "standin_cpu_ms_per_verification": rounded(
                (after.standin.cpu_seconds - before.standin.cpu_seconds) / n * 1000
            ),
        },
        "ceiling": {
            "formula": "min(concurrency / (STS calls per verification x mean STS call), "
            "cores / worker CPU s per verification, worker STS budget / calls per verification"
            "[, stand-in rate limit / calls per verification])",
            "bounds": {k: rounded(v, 1) for k, v in bounds.items()},
            "binding": binding,
            "verifications_per_second": rounded(ceiling, 1),
            "fraction": rounded(rate / ceiling, 3),
            # Without the worker's STS budget: concurrency and CPU alone.
            "machine_verifications_per_second": rounded(machine_ceiling, 1),
            "machine_fraction": rounded(rate / machine_ceiling, 3),
            "gil_bound": rounded(1 / cpu_per if cpu_per > 0 else math.nan, 1),
            "worker_sts_budget_per_second": budget,
            "worker_sts_budget_bound": rounded(budget_bound, 1),
        },
        "sequential": {
            "verifications": sequential.verifications,
            "verified": sequential.verified,
            "verifications_per_second": rounded(sequential.rate, 2),
            "wall_seconds": rounded(sequential.wall_seconds),
            "cpu_ms_per_verification": rounded(
                sequential.cpu_seconds / max(sequential.verifications, 1) * 1000
            ),
            "call_ms": {
                "mean": rounded(mean_latency * 1000),
                "p50": rounded(percentile(sequential.call_ms, 0.5)),
                "p99": rounded(percentile(sequential.call_ms, 0.99)),
            },
            "sts_requests": int(sequential_sts.get("requests", 0)),
        },
        "database": {
            "measured_with": "pg_stat_database deltas of the scratch database, minus the "
            f"benchmark's own {own_transactions} transactions (seeds, ANALYZE, polls); "
            + (
                "pg_stat_statements is loaded but not read by this version"
                if stats_loaded
                else "pg_stat_statements is not in shared_preload_libraries, so statements "
                "are counted by the in-process trace"
            ),
            "commits_per_verification": rounded(worker_commits / n),
            "rollbacks_per_verification": rounded(pg_delta["xact_rollback"] / n),
            # Each new session is a new PostgreSQL backend (a fork, authentication, cold caches)
            # and a new client connection: a pool that keeps its connections opens few.
            "new_sessions": pg_delta["sessions"],
            "new_sessions_per_1000_verifications": rounded(pg_delta["sessions"] / n * 1000, 1),
            "rows_updated_per_verification": rounded(pg_delta["tup_updated"] / n),
            "audit_events_per_verification": rounded(
                tables.get("audit_events", {}).get("n_tup_ins", 0) / n
            ),
            "tables": tables,
            # The whole server, every database: see machine.cpu_ms_per_verification.
            "server_cpu_ms_per_verification": rounded(pg_cpu / n * 1000),
            "deltas": pg_delta,
        },
        "broker": {
            "measured_with": "Redis INFO commandstats deltas (server-wide); messages = "
            + "+".join(c.upper() for c in BROKER_PUBLISH_COMMANDS),
            "messages_per_verification": rounded(published / n),
            "commands_per_verification": rounded(sum(redis_delta.values()) / n, 2),
            "commands": dict(sorted(redis_delta.items(), key=lambda kv: -kv[1])),
            "other_clients_on_server": run.other_redis_clients,
            "redis_cpu_ms_per_verification": rounded(
                (after.redis_cpu - before.redis_cpu) / n * 1000
            ),
        },
        "machine": {
            "wall_seconds": rounded(wall),
            "cpu_busy_share": rounded(busy / total if total else math.nan),
            # Where the machine's CPU went, per verification. PostgreSQL and Redis are whole
            # servers and "rest" is everything else running: on a shared machine, others' work.
            "cpu_ms_per_verification": {k: rounded(v / n * 1000) for k, v in components.items()},
        },
    }
    if trace is not None:
        tn = max(trace.verifications, 1)
        results["database"]["trace"] = {
            "verifications": trace.verifications,
            "applied": trace.applied,
            "statements_per_verification": rounded(trace.statements / tn, 2),
            "transactions_per_verification": rounded(trace.transactions / tn, 2),
            "pool_checkouts_per_verification": rounded(trace.checkouts / tn, 2),
            # Each transaction is BEGIN .. COMMIT around its statements; each checkout pings.
            "round_trips_per_verification": rounded(
                (trace.statements + 2 * trace.transactions + trace.checkouts) / tn, 2
            ),
            "xact_commit_per_verification": rounded(trace.xact_commit / tn, 2),
            "statements_by_kind": trace.by_kind,
            "claim_statements_per_batch": trace.claim_statements,
            "claim_batch": trace.claim_batch,
            # The task body alone, one thread, no Celery consumer and no contention.
            "task_cpu_ms_per_verification": rounded(
                trace.cpu_seconds / max(trace.cpu_measured, 1) * 1000
            ),
        }
    results["targets"] = targets(results)
    return results


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets and whether this run met them."""
    w, c, d, b = results["worker"], results["ceiling"], results["database"], results["broker"]
    rows = [
        ("ratio to the sequential loop", w["ratio_to_sequential"], ">=", 30.0),
        ("fraction of the ceiling", c["fraction"], ">=", 0.70),
        ("database commits per verification", d["commits_per_verification"], "<=", 2.0),
        ("broker messages per verification", b["messages_per_verification"], "<=", 2.0),
        ("worker peak memory (MB)", w["peak_pss_mb"], "<=", 300.0),
    ]
    out = []
    for name, value, op, goal in rows:
        met = value is not None and (value >= goal if op == ">=" else value <= goal)
        out.append({"name": name, "value": value, "op": op, "target": goal, "met": met})
    return out


def _fmt(value: Any, spec: str = ",.1f", suffix: str = "", scale: float = 1.0) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int | float):
        return f"{value * scale:{spec}}{suffix}"
    return str(value)


Row = tuple[str, str, str, str]
_SHORT: Final = {
    "postgresql_server": "pg",
    "redis_server": "redis",
    "sts_standin": "sts",
    "benchmark_itself": "bench",
    "rest_of_machine": "rest",
}


def render_table(r: dict[str, Any]) -> str:
    """The one table of a run: metric, value, target, verdict."""
    cfg, w, s, c = r["config"], r["worker"], r["sequential"], r["ceiling"]
    sts, d, b = r["sts"], r["database"], r["broker"]
    target = {t["name"]: t for t in r["targets"]}
    cpu_split: dict[str, float | None] = r["machine"]["cpu_ms_per_verification"]

    def row(label: str, value: str, goal: str | None = None, *, pct: bool = False) -> Row:
        if goal is None:
            return (label, value, "", "")
        t = target[goal]
        shown = f"{t['target'] * 100:g}%" if pct else f"{t['target']:g}"
        return (label, value, f"{t['op']} {shown}", "ok" if t["met"] else "MISSED")

    bounds = ", ".join(f"{k} {_fmt(v)}" for k, v in c["bounds"].items())
    rows: list[Row] = [
        row("verifications/s, worker", _fmt(w["verifications_per_second"])),
        row("verifications/s, sequential boto3 loop", _fmt(s["verifications_per_second"], ",.2f")),
        row(
            "ratio to the sequential loop",
            _fmt(w["ratio_to_sequential"], ",.2f", "x"),
            "ratio to the sequential loop",
        ),
        row(f"ceiling, {c['binding']}-bound ({bounds})", _fmt(c["verifications_per_second"])),
        row(
            "throughput / ceiling",
            _fmt(c["fraction"], ".0f", "%", 100),
            "fraction of the ceiling",
            pct=True,
        ),
        row(
            "  throughput / machine ceiling (concurrency and CPU only)",
            _fmt(c["machine_fraction"], ".0f", "%", 100),
        ),
        row("  one-core (GIL) bound: 1 / CPU per verification", _fmt(c["gil_bound"])),
    ]
    if c.get("worker_sts_budget_bound") is not None:
        label = f"  worker STS budget bound ({c['worker_sts_budget_per_second']:g} calls/s)"
        rows.append(row(label, _fmt(c["worker_sts_budget_bound"])))
    rows += [
        row("STS calls per verification", _fmt(sts["calls_per_verification"], ".2f")),
        row(
            "probe calls per verification",
            f"{_fmt(sts.get('probe_calls_per_verification'), '.2f')} "
            f"(PERMISSION_PROBES={cfg.get('permission_probes')})",
        ),
        row("mean STS call, measured (ms)", _fmt(sts["mean_call_ms"], ".1f")),
        row("worker CPU per verification (ms)", _fmt(w["cpu_ms_per_verification"], ".2f")),
        row(
            "  in the consumer (main) thread (ms)",
            _fmt(w["consumer_thread_cpu_ms_per_verification"], ".2f"),
        ),
        row(
            "  user / system (ms)",
            f"{_fmt(w['user_cpu_ms_per_verification'], '.2f')} / "
            f"{_fmt(w['system_cpu_ms_per_verification'], '.2f')}",
        ),
        row(
            "DB commits per verification",
            _fmt(d["commits_per_verification"], ".2f"),
            "database commits per verification",
        ),
    ]
    trace = d.get("trace")
    if trace:
        rows += [
            row(
                "DB statements per verification (trace)",
                _fmt(trace["statements_per_verification"], ".2f"),
            ),
            row(
                "DB round trips per verification (trace)",
                _fmt(trace["round_trips_per_verification"], ".2f"),
            ),
            row(
                "task body CPU per verification, 1 thread (ms, trace)",
                _fmt(trace["task_cpu_ms_per_verification"], ".2f"),
            ),
        ]
    updated = _fmt(d["rows_updated_per_verification"], ".2f")
    audited = _fmt(d["audit_events_per_verification"], ".2f")
    lag = w["lag_seconds"]
    rows += [
        row("DB rows updated / audit events per verification", f"{updated} / {audited}"),
        row(
            "new DB sessions per 1000 verifications", _fmt(d["new_sessions_per_1000_verifications"])
        ),
        row(
            "broker messages per verification",
            _fmt(b["messages_per_verification"], ".2f"),
            "broker messages per verification",
        ),
        row("Redis commands per verification (all)", _fmt(b["commands_per_verification"], ".1f")),
        row(
            "lag due -> verified, p50 / p99 (s)",
            f"{_fmt(lag['p50'], '.1f')} / {_fmt(lag['p99'], '.1f')}",
        ),
        row(
            "worker peak memory, PSS: shared pages once (MB)",
            _fmt(w["peak_pss_mb"]),
            "worker peak memory (MB)",
        ),
        row("  peak RSS total, shared pages once per process (MB)", _fmt(w["peak_rss_total_mb"])),
        row("  each process's peak RSS, summed (MB)", _fmt(w["rss_peaks_summed_mb"])),
        row("STS calls throttled", _fmt(sts["throttled_share"], ".2f", "%", 100)),
        row(
            "machine CPU busy during the run", _fmt(r["machine"]["cpu_busy_share"], ".0f", "%", 100)
        ),
        row(
            "machine CPU per verification, all processes (ms)",
            _fmt(sum(v or 0.0 for v in cpu_split.values()), ".1f"),
        ),
    ]
    default = " (default)" if cfg["concurrency_is_default"] else ""
    if cfg.get("worker_processes", 1) > 1:
        default += f" in total over {cfg['worker_processes']} worker processes"
    title = (
        f"account-verifier benchmark: {w['verified']:,}/{cfg['accounts']:,} accounts verified; "
        f"STS median {cfg['median_ms']:g} ms, sigma {cfg['latency_sigma']:g}"
        + (f", rate limit {cfg['rate_limit']:g}/s" if cfg["rate_limit"] else "")
        + f"; concurrency {cfg['concurrency']}{default}; {r['host']['cores']} cores"
    )
    width = max(len(x[0]) for x in rows) + 2
    lines = [title, "", f"{'metric':<{width}}{'value':>14}  {'target':<9} verdict"]
    lines.append("-" * (width + 33))
    lines += [f"{a:<{width}}{v:>14}  {t:<9} {m}".rstrip() for a, v, t, m in rows]
    breakdown = ", ".join(f"{_SHORT.get(k, k)} {_fmt(v, '.1f')}" for k, v in cpu_split.items())
    lines.append(f"  of which (ms): {breakdown}")
    if b["other_clients_on_server"]:
        lines.append(
            f"note: {b['other_clients_on_server']} other connection(s) used this Redis server "
            "during the run; commandstats are server-wide, so broker figures may be inflated"
        )
    if not r["completed"]:
        lines.append("note: the run TIMED OUT; figures cover the accounts verified until then")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError("must be a positive number")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError("must be a number >= 0")
    return value


def _env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key or not key.replace("_", "").isalnum():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return key.upper(), value


def build_parser() -> argparse.ArgumentParser:
    """The command line of `scripts/bench`."""
    parser = argparse.ArgumentParser(
        prog="scripts/bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="The claim benchmark: scripts/bench claims --help. "
        "Targets (issue 8): >= 30x the sequential loop, >= 70%% of the ceiling, <= 2 database "
        "commits and <= 2 broker messages per verification, worker peak RSS <= 300 MB.",
    )
    add = parser.add_argument
    add("--accounts", type=_positive_int, default=20_000, help="accounts to verify (20000)")
    add("--sample", type=_positive_int, default=200, help="accounts of the sequential loop (200)")
    add("--median-ms", type=_non_negative_float, default=50.0, help="STS median latency (50)")
    add(
        "--latency-sigma",
        type=_non_negative_float,
        default=0.65,
        help="log-normal shape of the STS latency (0.65: p99 about 4.5x the median)",
    )
    add(
        "--rate-limit",
        type=_positive_float,
        default=None,
        help="STS requests/s above which the stand-in answers Throttling (default: none)",
    )
    add(
        "--concurrency",
        type=_positive_int,
        default=None,
        help="WORKER_CONCURRENCY for the worker (default: unset, the worker's default)",
    )
    add(
        "--dispatch-interval",
        type=_positive_float,
        default=None,
        help="DISPATCH_INTERVAL_SECONDS (default: unset, the worker's default)",
    )
    add(
        "--worker-env",
        type=_env_pair,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="another environment variable for worker and beat (repeatable), e.g. "
        "DISPATCH_MAX_QUEUED=5000; recorded in the results",
    )
    add(
        "--timeout",
        type=_positive_float,
        default=900.0,
        help="seconds to wait for every account after seeding (900)",
    )
    add(
        "--trace",
        type=_non_negative_int,
        default=75,
        help="verifications traced in-process to count SQL statements, in the worker's chunks "
        "(75: three chunks, the first one warming up; 0: none)",
    )
    add("--keep", action="store_true", help="keep the scratch database (its URL is printed)")
    add(
        "--json-out",
        type=Path,
        default=None,
        help="where to write the results (default bench-results/<UTC stamp>.json)",
    )
    add(
        "--database-url",
        default=os.environ.get("BENCH_DATABASE_URL", DEFAULT_ADMIN_URL),
        help="PostgreSQL server where the scratch database is created (env BENCH_DATABASE_URL; "
        f"default {DEFAULT_ADMIN_URL})",
    )
    add(
        "--redis-url",
        default=os.environ.get("BENCH_REDIS_URL", DEFAULT_REDIS_URL),
        help="Redis database used as the broker, flushed before and after; refused if it holds "
        f"other keys (env BENCH_REDIS_URL; default {DEFAULT_REDIS_URL})",
    )
    add("--seed", type=int, default=8, help="seed of the stand-in's latency (8)")
    add(
        "--progress-interval",
        type=_positive_float,
        default=5.0,
        help="seconds between progress lines (5)",
    )
    add(
        "--py-spy",
        type=Path,
        default=None,
        metavar="PATH",
        help="profile the worker with py-spy during the run (collapsed stacks to PATH)",
    )
    add(
        "--workers",
        type=_positive_int,
        default=1,
        help="worker processes to start (1: the default deployment; more shows how the "
        "throughput scales past one process's GIL; the ceiling counts all their threads)",
    )
    add(
        "--webhooks",
        action="store_true",
        help="an endpoint per organization (100 accounts each), all on a local receiver that "
        "verifies signatures; reports deliveries and event -> delivery latency",
    )
    add(
        "--cores",
        type=_positive_int,
        default=os.cpu_count() or 1,
        help="cores for the CPU ceiling (default: this machine's)",
    )
    return parser


def parse_options(argv: Sequence[str] | None) -> Options:
    """Parse and check the command line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        libpq_url(args.database_url)
    except BenchError as error:
        parser.error(f"--database-url: {error}")
    if not args.redis_url.startswith(("redis://", "rediss://", "unix://")):
        parser.error("--redis-url must start with redis://, rediss:// or unix://")
    return Options(
        accounts=args.accounts,
        sample=min(args.sample, args.accounts),
        median_ms=args.median_ms,
        latency_sigma=args.latency_sigma,
        rate_limit=args.rate_limit,
        concurrency=args.concurrency,
        dispatch_interval=args.dispatch_interval,
        timeout=args.timeout,
        keep=args.keep,
        json_out=args.json_out,
        database_url=args.database_url,
        redis_url=args.redis_url,
        seed=args.seed,
        trace=args.trace,
        progress_interval=args.progress_interval,
        worker_env=dict(args.worker_env),
        py_spy=args.py_spy,
        cores=args.cores,
        workers=args.workers,
        webhooks=args.webhooks,
    )


def write_json(results: dict[str, Any], path: Path | None) -> Path:
    """Write the results; the default path is bench-results/<UTC stamp>.json."""
    if path is None:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        path = ROOT / "bench-results" / f"{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")
    return path


def _raise_interrupted(signum: int, _frame: FrameType | None) -> None:
    raise Interrupted(signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the table, write the JSON."""
    opts = parse_options(argv)
    signal.signal(signal.SIGTERM, _raise_interrupted)
    # Explicitly: a shell starts background jobs with SIGINT ignored, and Python keeps that.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        results, completed = Bench(opts).execute()
    except BenchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Interrupted):
        print("interrupted; everything started was stopped", file=sys.stderr)
        return 130
    print(render_table(results))
    path = write_json(results, opts.json_out)
    print(f"\nresults: {path}")
    return 0 if completed else 1


if __name__ == "__main__":
    raise SystemExit(main())
