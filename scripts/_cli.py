"""What the operator commands (`scripts/reverify`, `scripts/status`, `scripts/webhooks`) share.

Their argument parser (description and epilog from the module docstring), exit codes and the
errors behind them, the settings with the running `scripts/run`'s stack and logging on stderr,
JSON on stdout, and tables: customer text is escaped (`worker.redact.escape_controls`) by the
caller before it is measured, widths are terminal columns, and a table can be cut to the
terminal's width. Light on purpose: `scripts/status` must not load Celery or boto3.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import unicodedata
from collections.abc import Callable, Collection, Sequence

from sqlalchemy.exc import OperationalError

from scripts.stack_env import apply_stack_env
from worker.logging import configure_logging
from worker.settings import Settings, get_settings_or_exit

EXIT_OK, EXIT_USAGE, EXIT_UNREACHABLE = 0, 2, 3
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """Bad arguments or unknown ids (exit code 2); the message says which."""


class UnreachableError(Exception):
    """The database, Redis or the broker did not answer (exit code 3); the message names it,
    password masked."""


def parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """A parser whose description is `doc`'s first paragraph and whose epilog is the rest."""
    paragraphs = (doc or "").split("\n\n")
    return argparse.ArgumentParser(
        prog=prog,
        description=paragraphs[0],
        epilog="\n\n".join(paragraphs[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def database_unreachable(settings: Settings, error: OperationalError) -> UnreachableError:
    """The error to raise when the database does not answer: its masked URL and the first line
    of the driver's message."""
    return UnreachableError(
        f"cannot reach the database at {settings.database_url_masked}: "
        + (str(error.orig).strip().splitlines() or ["no answer"])[0]
    )


def load_settings(prog: str, *, stack_env: bool = True) -> Settings:
    """The settings (exit 2 when they are wrong), with logging of errors only, on stderr.

    With `stack_env`, a running `scripts/run`'s stack is used when DATABASE_URL is not set
    (`scripts.stack_env`), which is said on stderr. On a terminal log lines are in console form
    whatever LOG_FORMAT says: JSON lines are for the services' collectors, not for a person
    reading the command's output.
    """
    if stack_env:
        stack_file = apply_stack_env()
        if stack_file is not None:
            print(
                f"{prog}: using the running scripts/run's settings: {stack_file}", file=sys.stderr
            )
    settings = get_settings_or_exit()
    log_format = "console" if sys.stderr.isatty() else settings.log_format
    configure_logging(
        settings.model_copy(update={"log_level": "ERROR", "log_format": log_format}),
        stream=sys.stderr,
    )
    return settings


def run_main(
    prog: str,
    run: Callable[[Sequence[str] | None], int],
    argv: Sequence[str] | None,
    *,
    say_interrupted: bool = True,
) -> int:
    """Run a command's `run(argv)`, mapping its errors to exit codes and a line on stderr."""
    try:
        return run(argv)
    except UsageError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except UnreachableError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:
        if say_interrupted:
            print(f"\n{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def print_json(
    payload: object, *, indent: int | None = 2, out: Callable[[str], None] | None = None
) -> None:
    """`payload` as JSON on stdout (or through `out`), flushed: --json output."""
    text = json.dumps(payload, indent=indent)
    if out is None:
        print(text, flush=True)
    else:
        out(text)


def display_width(text: str) -> int:
    """Columns `text` takes on a terminal: East Asian wide characters two, combining ones none."""
    return sum(
        0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1
        for c in text
    )


def cut(text: str, width: int) -> str:
    """`text` if it fits in `width` columns, else as much as fits followed by an ellipsis."""
    if display_width(text) <= width:
        return text
    kept, used = [], 0
    for char in text:
        used += display_width(char)
        if used > width - 1:
            break
        kept.append(char)
    return "".join(kept) + "…"


def fit_width(*, wide: bool) -> int | None:
    """The width to fit tables to: the terminal's; None (nothing cut) with --wide or when stdout
    is not a terminal (a file or a pipe keeps every character)."""
    if wide or not sys.stdout.isatty():
        return None
    return shutil.get_terminal_size().columns


def table(
    rows: Sequence[Sequence[str]],
    *,
    right: Collection[int] = (),
    fit: int | None = None,
    min_last: int = 20,
    indent: str = "",
) -> tuple[list[str], bool]:
    """Rows of cells as aligned lines, two spaces apart, and whether a cell was cut.

    Every column is padded to its widest cell, on the right (or on the left for the indexes in
    `right`), but for the last unless it is in `right`: it is left as it is, or with `fit` (a
    terminal's width) cut to the room the others leave it, never below `min_last` columns (a
    narrower terminal wraps the line instead).
    """
    if not rows:
        return [], False
    last = len(rows[0]) - 1
    padded_columns = last + 1 if last in right else last
    widths = [max(display_width(row[i]) for row in rows) for i in range(padded_columns)]
    room = None if fit is None else max(min_last, fit - sum(widths) - 2 * len(widths) - len(indent))
    lines, was_cut = [], False
    for row in rows:
        cells = []
        for index, cell in enumerate(row):
            if index < padded_columns:
                space = " " * (widths[index] - display_width(cell))
                cells.append(space + cell if index in right else cell + space)
            elif room is not None:
                shown = cut(cell, room)
                was_cut = was_cut or shown != cell
                cells.append(shown)
            else:
                cells.append(cell)
        lines.append((indent + "  ".join(cells)).rstrip())
    return lines, was_cut
