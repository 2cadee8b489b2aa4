"""scripts/run's children: each in its own process group with its output prefixed on the
console, remembered on disk (for the next run after a SIGKILL), stopped in order."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Required, TypedDict, Unpack

from scripts.runner.console import Console, RunError, Signals, StopRequested, error
from scripts.services import shown_path
from scripts.services.process import RunAs, is_same, kill_group, spawn, start_time

ONE_SHOT_TIMEOUT = 300.0


# Stop steps per kind of child: (signal, seconds to wait for exit). SIGKILL of the whole process
# group follows the last step. PostgreSQL: SIGINT is its "fast" shutdown (disconnect, checkpoint),
# SIGQUIT its "immediate" one (crash recovery on the next start, nothing committed is lost).
# Celery: SIGTERM is the warm shutdown (finish running tasks), SIGQUIT the cold one.
StopSteps = tuple[tuple[signal.Signals, float], ...]
POSTGRES_STOP: StopSteps = ((signal.SIGINT, 30.0), (signal.SIGQUIT, 5.0))
CELERY_STOP: StopSteps = ((signal.SIGTERM, 30.0), (signal.SIGQUIT, 5.0))
DEFAULT_STOP: StopSteps = ((signal.SIGTERM, 15.0),)


class ChildOptions(TypedDict, total=False):
    """`Supervisor.start`'s keywords: `Child`'s but the console."""

    env: Required[Mapping[str, str]]
    tier: Required[int]
    stop_steps: StopSteps
    run_as: RunAs | None
    watch_for: str | None
    log_file: Path | None


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
            self.process = spawn(
                argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, run_as=run_as
            )
        except OSError as exc:
            if self._log:
                self._log.close()
            raise RunError(f"cannot start {name} ({argv[0]}): {exc.strerror}") from None
        self.start_time = start_time(self.process.pid)
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
        kill_group(self.pid)

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
            if not is_same(pid, started):
                continue  # gone, or the pid now belongs to someone else
            console.say(f"stopping {entry['name']} (pid {pid}), left running by a killed run")
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, int(entry["signal"]))
            deadline = time.monotonic() + 20
            while is_same(pid, started) and time.monotonic() < deadline:
                time.sleep(0.1)
            if is_same(pid, started):  # still the same process: no more asking
                kill_group(pid)
        self.path.unlink(missing_ok=True)


class Supervisor:
    """Starts children, waits on them, and stops all of them, highest tier first."""

    def __init__(self, console: Console, signals: Signals, registry: Registry) -> None:
        self.console = console
        self.signals = signals
        self.registry = registry
        self.children: list[Child] = []

    def start(self, name: str, argv: Sequence[str], **options: Unpack[ChildOptions]) -> Child:
        """Start a child (unless a stop was requested) and remember it until it is stopped."""
        self.signals.check()
        child = Child(name, argv, console=self.console, **options)
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


def outcome(console: Console, run: Callable[[], int]) -> int:
    """`run()`'s exit status; a stop signal or a RunError on the way becomes the exit status."""
    try:
        return run()
    except StopRequested as stop:
        console.say(f"{stop} received: stopping")
        return 128 + stop.signum
    except RunError as failure:
        error(str(failure))
        return failure.exit_code
