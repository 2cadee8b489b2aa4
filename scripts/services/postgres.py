"""PostgreSQL for the tooling: the server binaries, a data directory made once, the server's
command line, reachability, and databases created and dropped.

The bootstrap `scripts/run` does (each step here, the supervision of the server in
scripts/runner/servers.py):

    bindir = server_bindir()                  # pgserver's binaries, else the machine's
    account = server_account()                # `nobody` when this is root: postgres refuses root
    prepare(pgdata, bindir, account, run)     # initdb the first time (`run` runs its argv)
    ... start server_argv(bindir, pgdata, port) as a child, as `account` ...
    wait until reachable(url(port, "postgres")) is None
    ensure_database(url(port, "postgres"), "verifier")

pgserver's own API (`pgserver.get_server(pgdata)`) does not fit: it listens on a Unix socket
only (no TCP port for the worker's DATABASE_URL), starts the server detached through `pg_ctl`
(no output to prefix, no ordered stop, nothing stops it after a SIGKILL of the tool), gives
`pg_ctl start` a fixed 10 s, and as root creates a system user `pgserver` with useradd. Its
binaries are used, nothing else.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

from scripts.services import ServiceError, first_line, package_dir, shown_path
from scripts.services.process import RunAs
from worker.redact import libpq_url, with_database

# Where Debian and Ubuntu install PostgreSQL servers (a fallback when pgserver is missing).
SYSTEM_POSTGRES_ROOT = Path("/usr/lib/postgresql")
USER = "postgres"


def url(port: int, database: str) -> str:
    """The URL of `database` on an embedded server (trust authentication, user postgres)."""
    return f"postgresql://{USER}@127.0.0.1:{port}/{database}"


def server_bindir() -> Path:
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
    raise ServiceError(
        "no PostgreSQL server to embed: the `embedded` extra (pgserver) is not installed in this "
        "environment and no PostgreSQL is installed on the machine. pgserver ships wheels for "
        "Linux x86_64 and macOS with Python 3.11-3.12; elsewhere set DATABASE_URL (or "
        "TEST_DATABASE_URL for scripts/test) to a PostgreSQL you run",
        exit_code=2,
    )


def server_account() -> RunAs | None:
    """Who runs PostgreSQL: this user, or `nobody` when this is root (postgres refuses root)."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam("nobody")
    except KeyError:
        raise ServiceError(
            "PostgreSQL refuses to run as root and this machine has no `nobody` user to run it "
            "as; run scripts/run as an ordinary user",
            exit_code=2,
        ) from None
    return RunAs("nobody", entry.pw_uid, entry.pw_gid)


def check_reachable_by(path: Path, account: RunAs) -> None:
    """Fail clearly when `account` could not enter every directory on the way to `path`."""
    for directory in [path, *path.parents]:
        if not directory.exists():
            continue
        mode = directory.stat().st_mode
        if directory.stat().st_uid != account.uid and not mode & stat.S_IXOTH:
            raise ServiceError(
                f"PostgreSQL runs as `{account.name}` because scripts/run runs as root, and "
                f"`{account.name}` cannot enter {directory} (mode {stat.filemode(mode)}). Run as "
                f"an ordinary user, `chmod o+x {directory}`, or set VERIFIER_DATA_DIR elsewhere",
                exit_code=2,
            )


def prepare(
    pgdata: Path,
    bindir: Path,
    account: RunAs | None,
    run_initdb: Callable[[list[str]], None],
    *,
    ephemeral: bool = False,
) -> bool:
    """Make sure `pgdata` is a PostgreSQL data directory; True when it was created now.

    initdb (run by `run_initdb`, as `account`) writes into a scratch directory renamed into place
    once complete: an initdb interrupted by Ctrl-C leaves no half-made data directory behind to
    trip the next run. `ephemeral`: without waiting for the files to reach the disk.
    """
    if account:
        check_reachable_by(pgdata.parent, account)
        check_reachable_by(bindir, account)
    if (pgdata / "PG_VERSION").exists():
        return False
    if pgdata.exists():
        raise ServiceError(
            f"{shown_path(pgdata)} holds no PostgreSQL data directory; delete it to start over",
            exit_code=2,
        )
    partial = pgdata.with_name(pgdata.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(mode=0o700)
    if account:
        os.chown(partial, account.uid, account.gid)
    run_initdb(
        [
            str(bindir / "initdb"),
            f"--pgdata={partial}",
            f"--username={USER}",
            "--auth=trust",
            "--encoding=UTF8",
            # The C locale exists everywhere; a slim container may have no other one.
            "--locale=C",
            *(["--no-sync"] if ephemeral else []),
        ]
    )
    partial.rename(pgdata)
    return True


def server_argv(bindir: Path, pgdata: Path, port: int, *, ephemeral: bool = False) -> list[str]:
    """`postgres` on 127.0.0.1:`port`, TCP only; `ephemeral`: no durability, for test data."""
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
    return argv


def reachable(database_url: str, *, timeout: int = 2) -> str | None:
    """None when a connection to `database_url` works, else the reason it does not."""
    import psycopg  # noqa: PLC0415 - not needed for `scripts/run --help`

    try:
        with psycopg.connect(libpq_url(database_url), connect_timeout=timeout):
            return None
    except psycopg.Error as exc:
        return first_line(exc)


def ensure_database(admin_url: str, name: str) -> None:
    """Create database `name` on `admin_url`'s server unless it exists."""
    import psycopg  # noqa: PLC0415
    from psycopg import sql  # noqa: PLC0415

    with psycopg.connect(libpq_url(admin_url), autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone()
        if not exists:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def create_database(admin_url: str, name: str, *, template: str | None = None) -> str:
    """Create the empty database `name` on `admin_url`'s server, or a copy of the database
    `template` there (which nobody may be connected to); returns its libpq URL."""
    import psycopg  # noqa: PLC0415
    from psycopg import sql  # noqa: PLC0415

    statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if template is not None:
        statement += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
    with psycopg.connect(libpq_url(admin_url), autocommit=True, connect_timeout=5) as conn:
        conn.execute(statement)
    return with_database(admin_url, name)


def drop_database(admin_url: str, database_url: str) -> None:
    """Drop the database of `database_url` (on `admin_url`'s server), disconnecting its clients."""
    import psycopg  # noqa: PLC0415
    from psycopg import sql  # noqa: PLC0415

    name = database_url.rpartition("/")[2].partition("?")[0]
    with psycopg.connect(libpq_url(admin_url), autocommit=True, connect_timeout=5) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
