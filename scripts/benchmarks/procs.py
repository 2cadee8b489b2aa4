"""The benchmarks' children (`Child`: a `scripts.services.process.spawn`ed process with its
output in files, whose last lines explain a failure) and py-spy.

What the children cost (CPU, memory, the machine's CPU) is `scripts.services.usage`'s.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from scripts.benchmarks.common import VENV_BIN, BenchError
from scripts.services.process import spawn, terminate


class Child:
    """A child process in its own session, with stdout and stderr in files; it dies with the
    benchmark, even one killed with SIGKILL."""

    def __init__(
        self, name: str, args: Sequence[str], *, env: Mapping[str, str], log_dir: Path
    ) -> None:
        self.name = name
        self.stdout_path = log_dir / f"{name}.out"
        self.stderr_path = log_dir / f"{name}.err"
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            # Own session: a Ctrl-C in the terminal reaches only the benchmark, which then stops
            # its children in order. No threads run yet when the benchmarks start children.
            self.process = spawn(args, env=env, stdout=out, stderr=err, die_with_parent=True)

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
        terminate(self.process, timeout, group=True)


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
