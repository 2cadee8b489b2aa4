"""What processes cost: CPU seconds and memory of a process tree, and the machine's CPU (psutil).

For the benchmarks, which measure a worker (a parent and its prefork children) and beat:

    before = sample_tree(worker.pid)               # None once the process is gone
    with MemoryPeaks([worker.pid]) as memory:      # sampled on a thread while it works
        ...
    after = sample_tree(worker.pid)
    cpu = after.cpu_seconds - before.cpu_seconds   # children that exited are in cutime/cstime
    peak = memory.pss_mb                           # the tree's total, shared pages counted once

    pg_before = processes_cpu("postgres")          # every process of that name on the machine
    ...
    pg_seconds = cpu_delta(pg_before, processes_cpu("postgres"))
    busy, total = machine_cpu()
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import psutil

_MB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class TreeSample:
    """CPU and memory of a process and its live descendants, summed."""

    # user+system of each process and of its exited, waited-for children (cutime, cstime).
    cpu_seconds: float = 0.0
    user_seconds: float = 0.0
    system_seconds: float = 0.0
    rss_mb: float = 0.0
    # Proportional set size: pages shared by the tree (a prefork parent's imports, inherited at
    # fork) split between their sharers, so that the total counts each once.
    pss_mb: float = 0.0
    # The sum of each process's own peak RSS (VmHWM): an upper bound of the tree's peak total.
    hwm_mb: float = 0.0
    # The main thread of the root process alone: Celery's consumer loop (the tasks run in the
    # pool's processes and their threads).
    main_thread_seconds: float = 0.0

    def __add__(self, other: TreeSample) -> TreeSample:
        return TreeSample(
            *(getattr(self, f.name) + getattr(other, f.name) for f in fields(TreeSample))
        )


def _peak_rss_mb(pid: int) -> float:
    """VmHWM, the kernel's peak RSS of `pid` (Linux; psutil does not report it), else 0."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _one(process: psutil.Process, *, root: bool) -> TreeSample | None:
    import psutil  # noqa: PLC0415 - not needed for `scripts/run --help`

    try:
        with process.oneshot():
            times = process.cpu_times()
            memory = process.memory_full_info()
            main = 0.0
            if root:
                own = [t for t in process.threads() if t.id == process.pid]
                main = sum(t.user_time + t.system_time for t in own)
    except psutil.Error:
        return None
    user = times.user + times.children_user
    system = times.system + times.children_system
    return TreeSample(
        cpu_seconds=user + system,
        user_seconds=user,
        system_seconds=system,
        rss_mb=memory.rss / _MB,
        pss_mb=getattr(memory, "pss", memory.rss) / _MB,
        hwm_mb=_peak_rss_mb(process.pid),
        main_thread_seconds=main,
    )


def sample_tree(pid: int) -> TreeSample | None:
    """CPU and memory of `pid` and every live process below it; None once `pid` is gone."""
    import psutil  # noqa: PLC0415

    try:
        root = psutil.Process(pid)
        below = root.children(recursive=True)
    except psutil.Error:
        return None
    total = _one(root, root=True)
    if total is None:
        return None
    for child in below:
        sample = _one(child, root=False)
        if sample is not None:  # it exited meanwhile: its CPU is in its parent's cutime
            total += sample
    return total


class MemoryPeaks:
    """The peak total memory of some process trees, sampled every `interval` seconds on a thread.

    Two peaks of the total over the trees: RSS, which counts the pages processes share once per
    process, and PSS, which splits each shared page between its sharers so that it counts once,
    the memory they really occupy.
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
        self.sample()

    def sample(self) -> None:
        """Take one sample now."""
        present = [s for s in map(sample_tree, self._pids) if s is not None]
        self.rss_mb = max(self.rss_mb, sum(sample.rss_mb for sample in present))
        self.pss_mb = max(self.pss_mb, sum(sample.pss_mb for sample in present))

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.sample()


def processes_cpu(name: str) -> dict[int, float]:
    """CPU seconds (waited-for children included) of every process on the machine named `name`.

    For a server such as PostgreSQL: a backend that exits is reaped by the postmaster, whose
    children's times then include it, so the sum over all `postgres` processes misses nothing.
    Every process of that name counts (on a shared machine, other people's too).
    """
    import psutil  # noqa: PLC0415

    found = {}
    for process in psutil.process_iter(["name", "cpu_times"]):
        times = process.info["cpu_times"]
        if process.info["name"] == name and times is not None:
            found[process.pid] = (
                times.user + times.system + times.children_user + times.children_system
            )
    return found


def cpu_delta(before: Mapping[int, float], after: Mapping[int, float]) -> float:
    """CPU used between two `processes_cpu` readings (processes gone since are in a parent's)."""
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, all cores together."""
    import psutil  # noqa: PLC0415

    times = psutil.cpu_times()
    total = sum(times) - getattr(times, "guest", 0.0) - getattr(times, "guest_nice", 0.0)
    idle = times.idle + getattr(times, "iowait", 0.0)
    return total - idle, total
