"""The benchmarks' processes: children started and stopped (`Child`), their CPU and memory read
from /proc (`read_proc`, `MemoryPeaks`, `processes_cpu`, `machine_cpu`), and py-spy."""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from scripts.benchmarks.common import ROOT, VENV_BIN, BenchError

CLK_TCK: Final = os.sysconf("SC_CLK_TCK")


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


def _set_parent_death_signal() -> None:
    """In a child before exec: die with the benchmark even if it is SIGKILLed (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


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
