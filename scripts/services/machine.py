"""The machine's own PostgreSQL and Redis, for `scripts/test` and `scripts/bench` (through
scripts/_lib.sh): is the server of a URL reachable, and if not, is it a local one this machine
has installed but stopped, which is then started.

    python -m scripts.services.machine postgres URL        exit 0 when reachable (started if
    python -m scripts.services.machine redis URL           need be), else 3 with an error
    python -m scripts.services.machine --try postgres URL  the same, but exit 1 and say nothing

PostgreSQL is started with Debian's pg_ctlcluster (the first installed version's `main`
cluster); Redis as the machine's redis-server (never the embedded extra's copy: that one belongs
to `scripts/run`), daemonized, on 127.0.0.1 at the URL's port, without persistence.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from scripts.services.ports import port_open, wait_port
from scripts.services.redis import machine_server_binary

DEFAULT_PORTS = {"postgres": 5432, "redis": 6379}
NAMES = {"postgres": "PostgreSQL", "redis": "Redis"}
LOCAL = {"127.0.0.1", "localhost", "::1"}
CLUSTERS = Path("/etc/postgresql")


def _step(text: str) -> None:
    print(f"\n==> {text}", file=sys.stderr, flush=True)


def _start_postgres(port: int) -> bool:
    versions = sorted(CLUSTERS.iterdir()) if CLUSTERS.is_dir() else []
    pg_ctlcluster = shutil.which("pg_ctlcluster")
    if not pg_ctlcluster or not versions:
        return False
    _step("starting the machine's PostgreSQL")
    # A failure here (e.g. "already running", on another port) means: not this URL's server.
    started = subprocess.run(
        [pg_ctlcluster, "--skip-systemctl-redirect", versions[0].name, "main", "start"],
        check=False,
    )
    return started.returncode == 0 and wait_port(port, timeout=30)


def _start_redis(port: int) -> bool:
    binary = machine_server_binary()
    if binary is None:
        return False
    _step("starting the machine's Redis")
    argv = [str(binary), "--daemonize", "yes", "--bind", "127.0.0.1", "--port", str(port)]
    subprocess.run([*argv, "--save", "", "--appendonly", "no"], check=False)
    return wait_port(port, timeout=30)


def reach(kind: str, url: str) -> bool:
    """Whether `kind`'s server at `url` takes connections, after starting the machine's own
    when the URL is local and it is installed but stopped."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or DEFAULT_PORTS[kind]
    if port_open(port, host, timeout=1):
        return True
    if host not in LOCAL:
        return False
    return _start_postgres(port) if kind == "postgres" else _start_redis(port)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.services.machine")
    parser.add_argument("--try", dest="quiet", action="store_true", help="exit 1, say nothing")
    parser.add_argument("kind", choices=sorted(DEFAULT_PORTS))
    parser.add_argument("url")
    args = parser.parse_args(argv)
    if reach(args.kind, args.url):
        return 0
    if args.quiet:
        return 1
    parts = urlsplit(args.url)
    where = f"{parts.hostname or '127.0.0.1'}:{parts.port or DEFAULT_PORTS[args.kind]}"
    print(f"error: {NAMES[args.kind]} is not reachable at {where}", file=sys.stderr)
    return 3


if __name__ == "__main__":
    sys.exit(main())
