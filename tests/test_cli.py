"""`scripts/_cli.py`: the operator commands' shared tables, widths and error mapping."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from scripts._cli import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    UnreachableError,
    UsageError,
    cut,
    display_width,
    run_main,
    table,
)


def test_widths_are_terminal_columns() -> None:
    """Wide characters take two columns, combining ones none; a cut ends in an ellipsis."""
    assert display_width("ab") == 2
    assert display_width("日本") == 4
    assert display_width("e\u0301") == 1
    assert cut("日本語です", 5) == "日本…"
    assert cut("short", 5) == "short"


def test_table_pads_columns_and_leaves_the_last_alone() -> None:
    """Columns are padded to their widest cell (wide characters counted twice), two spaces apart;
    the last is neither padded nor cut without a width to fit."""
    lines, was_cut = table([["ID", "NAME", "NOTE"], ["1", "日本", "x" * 50], ["22", "a", ""]])
    assert lines == ["ID  NAME  NOTE", "1   日本  " + "x" * 50, "22  a"]
    assert not was_cut


def test_table_right_aligns_and_indents() -> None:
    lines, _ = table([["transient", "1"], ["customer_must_fix", "1,234"]], right={1}, indent="  ")
    assert lines == ["  transient              1", "  customer_must_fix  1,234"]


def test_table_cuts_the_last_column_to_fit_but_never_below_its_minimum() -> None:
    rows = [["a", "x" * 40], ["bb", "short"]]
    lines, was_cut = table(rows, fit=20, min_last=5)
    assert lines == ["a   " + "x" * 15 + "…", "bb  short"]
    assert was_cut
    narrow, _ = table(rows, fit=6, min_last=10)
    assert narrow[0] == "a   " + "x" * 9 + "…"


@pytest.mark.parametrize(
    ("raised", "code", "message"),
    [
        (UsageError("bad --flag"), EXIT_USAGE, "tool: error: bad --flag"),
        (UnreachableError("cannot reach x"), EXIT_UNREACHABLE, "tool: error: cannot reach x"),
        (KeyboardInterrupt(), EXIT_INTERRUPTED, "tool: interrupted"),
    ],
)
def test_run_main_maps_errors_to_exit_codes(
    raised: BaseException, code: int, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    def run(argv: Sequence[str] | None) -> int:
        raise raised

    assert run_main("tool", run, []) == code
    assert capsys.readouterr().err.strip() == message


def test_run_main_returns_what_run_returns(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main("tool", lambda argv: EXIT_OK, None) == EXIT_OK
    assert run_main("tool", lambda argv: 4, None) == 4
    assert capsys.readouterr().err == ""
