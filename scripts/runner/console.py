"""scripts/run's terminal and signals: one writer for every child's lines, and stop signals
recorded to be acted on between steps."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from types import FrameType
from typing import TextIO

from scripts.services import ServiceError

# One error type for the operator, the services' own: printed without a traceback, with its
# exit status (2 for a problem found before anything started).
RunError = ServiceError


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
