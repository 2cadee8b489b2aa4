"""Child processes: started in a session (process group) of their own, stopped with a timeout.

Own session: a Ctrl-C in the terminal reaches only the tool that started them, which then stops
its children in a safe order instead of all of them at once; and the group's id is the child's
pid, so its own children (a prefork worker's pool, PostgreSQL's backends) can be stopped with it.

    process = spawn([...], env=env, stdout=log, stderr=subprocess.STDOUT, die_with_parent=True)
    ...
    terminate(process, timeout=15, group=True)   # SIGTERM to the group, SIGKILL if it lingers

A pid alone can be recycled: `start_time(pid)` (the kernel's, through psutil) names one process,
and `is_same(pid, started)` tells whether that process still runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from scripts.services import ROOT

# What Popen accepts for stdin, stdout and stderr.
Target = int | IO[bytes] | IO[str] | None


@dataclass(frozen=True)
class RunAs:
    """An unprivileged account to run a child as (PostgreSQL refuses root)."""

    name: str
    uid: int
    gid: int


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the parent dies, even by SIGKILL (Linux only)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def spawn(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    stdout: Target = None,
    stderr: Target = None,
    stdin: Target = subprocess.DEVNULL,
    cwd: Path = ROOT,
    run_as: RunAs | None = None,
    die_with_parent: bool = False,
) -> subprocess.Popen[bytes]:
    """Start `argv` in a session of its own; OSError when it cannot be started.

    `die_with_parent` asks the kernel to kill the child when this process dies (a benchmark
    killed with SIGKILL leaves nothing behind). It runs code between fork and exec, which is
    safe only while this process has no other threads: leave it off in threaded callers.
    """
    return subprocess.Popen(
        list(argv),
        cwd=cwd,
        env=dict(env),
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        start_new_session=True,
        user=run_as.uid if run_as else None,
        group=run_as.gid if run_as else None,
        extra_groups=[] if run_as else None,
        preexec_fn=_die_with_parent if die_with_parent else None,  # noqa: PLW1509 - see above
    )


def signal_group(pid: int, signum: int) -> None:
    """Send `signum` to the process group led by `pid` (a `spawn`ed child's), if any is left.

    The group's id stays reserved while any member lives, so this cannot hit an unrelated group.
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signum)


def kill_group(pid: int) -> None:
    """SIGKILL everything left in the process group led by `pid`."""
    signal_group(pid, signal.SIGKILL)


def terminate(
    process: subprocess.Popen[bytes],
    timeout: float = 15.0,
    *,
    group: bool = False,
    signum: int = signal.SIGTERM,
) -> int:
    """Stop `process`: `signum`, then SIGKILL if it has not exited after `timeout` seconds.

    With `group`, the signals go to its whole process group, and whatever of the group is left
    once it has exited is killed (what it started goes too); without, only the process itself is
    signalled. Returns its exit status (negative: the signal that ended it).
    """
    if process.poll() is None:
        if group:
            signal_group(process.pid, signum)
        else:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signum)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            if group:
                kill_group(process.pid)
            else:
                process.kill()
            process.wait(timeout=10)
    if group:
        kill_group(process.pid)
    return process.returncode


def start_time(pid: int) -> float | None:
    """When `pid` started (seconds since the epoch, from the kernel); None when it is gone."""
    import psutil  # noqa: PLC0415 - not needed for --help

    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return None


def is_same(pid: int, started: float | None) -> bool:
    """Whether the process `start_time(pid)` once returned `started` for still runs."""
    return started is not None and start_time(pid) == started


def descendants(pid: int) -> dict[int, float | None]:
    """Every live process below `pid` (children, grandchildren...) with its start time."""
    import psutil  # noqa: PLC0415

    try:
        below = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return {}
    return {child.pid: start_time(child.pid) for child in below}
