"""Logs: one JSON pipeline for structlog and the standard library, with secrets removed."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from worker.logging import (
    bind_context,
    clear_context,
    configure_logging,
    get_logger,
    redact_secrets,
)
from worker.settings import Settings


@contextlib.contextmanager
def configured(settings: Settings) -> Iterator[io.StringIO]:
    """Logging configured by `configure_logging` into a buffer; restored afterwards."""
    stream = io.StringIO()
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    configure_logging(settings, stream=stream)
    try:
        yield stream
    finally:
        clear_context()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved_handlers:
            root.addHandler(handler)
        root.setLevel(saved_level)
        logging.captureWarnings(False)
        structlog.reset_defaults()


@pytest.fixture
def json_stream() -> Iterator[io.StringIO]:
    """JSON logs at DEBUG into a buffer."""
    with configured(Settings(log_format="json", log_level="DEBUG")) as stream:
        yield stream


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_structlog_and_stdlib_lines_are_the_same_json(json_stream: io.StringIO) -> None:
    """A structlog event and a plain logging record both come out as JSON with the same keys."""
    get_logger("worker.test").info("verification.completed", outcome="verified")
    logging.getLogger("celery.worker.strategy").info("Task %s received", "abc")
    ours, celery = _lines(json_stream)
    for line in (ours, celery):
        assert {"event", "level", "logger", "timestamp"} <= set(line)
        assert str(line["timestamp"]).endswith("Z")
    assert ours["outcome"] == "verified"
    assert celery["event"] == "Task abc received"
    assert celery["logger"] == "celery.worker.strategy"


def test_bound_context_reaches_stdlib_records_and_is_cleared(json_stream: io.StringIO) -> None:
    """Task context appears on every line while bound, including Celery's, and not after."""
    bind_context(task_id="t-1", correlation_id="c-1")
    logging.getLogger("celery.app.trace").info("Task succeeded")
    clear_context()
    logging.getLogger("celery.app.trace").info("next")
    during, after = _lines(json_stream)
    assert (during["task_id"], during["correlation_id"]) == ("t-1", "c-1")
    assert "task_id" not in after
    assert "correlation_id" not in after


def test_secrets_never_reach_the_output(json_stream: io.StringIO) -> None:
    """Passwords in URLs, AWS keys, tokens and external IDs are masked or dropped."""
    log = get_logger("worker.test")
    log.info(
        "worker.ready",
        database_url="postgresql://app:db-pass-123@db/main",
        aws_secret_access_key="wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        session_token="FwoGZXIvYXdzEXAMPLETOKEN",
        external_id="abc123-def456-ghi789",
        detail="calling with AKIAIOSFODNN7EXAMPLE",
    )
    logging.getLogger("kombu").warning("lost redis://:redis-pass-456@cache:6379/0")
    output = json_stream.getvalue()
    for secret in (
        "db-pass-123",
        "wJalrXUtnFEMI",
        "FwoGZXIvYXdzEXAMPLETOKEN",
        "abc123-def456-ghi789",
        "AKIAIOSFODNN7EXAMPLE",
        "redis-pass-456",
    ):
        assert secret not in output
    ours = _lines(json_stream)[0]
    assert ours["database_url"] == "postgresql://app:***@db/main"
    assert ours["external_id"] == "abc***89"


def test_secrets_in_exceptions_are_scrubbed(json_stream: io.StringIO) -> None:
    """A traceback quoting a URL with a password does not leak it."""
    try:
        raise ConnectionError("cannot reach postgresql://app:tb-secret@db/main")
    except ConnectionError:
        get_logger("worker.test").exception("dispatch.send_failed")
    assert "tb-secret" not in json_stream.getvalue()
    assert "postgresql://app:***@db/main" in json_stream.getvalue()


def test_redaction_walks_nested_values() -> None:
    """Nested dictionaries and lists are redacted too."""
    event = redact_secrets(
        None, "info", {"event": "x", "config": {"password": "p", "urls": ["redis://:q@h"]}}
    )
    assert event["config"] == {"password": "***", "urls": ["redis://:***@h"]}


def test_log_level_is_honoured() -> None:
    """LOG_LEVEL=WARNING drops info lines."""
    with configured(Settings(log_format="json", log_level="WARNING")) as stream:
        get_logger("worker.test").info("quiet")
        get_logger("worker.test").warning("loud")
    assert [line["event"] for line in _lines(stream)] == ["loud"]


def test_console_format_is_not_json() -> None:
    """LOG_FORMAT=console renders readable lines."""
    with configured(Settings(log_format="console")) as stream:
        get_logger("worker.test").info("verification.completed", outcome="verified")
    line = stream.getvalue().strip()
    assert "verification.completed" in line
    assert "outcome=verified" in line
    assert not line.startswith("{")


def test_console_lines_escape_control_characters() -> None:
    """In console form a value's terminal controls (and line breaks) are shown escaped."""
    with configured(Settings(log_format="console")) as stream:
        get_logger("worker.test").warning("account.status_changed", alias="A\x1b[2J\nB")
    line = stream.getvalue()
    assert "alias=A\\x1b[2J\\x0aB" in line
    assert "\x1b" not in line
    assert line.count("\n") == 1


def test_routine_dispatch_lines_are_debug(json_stream: io.StringIO) -> None:
    """Celery's every-few-seconds dispatch lines are DEBUG; other task lines stay INFO."""
    trace = logging.getLogger("celery.app.trace")
    trace.info("Task verifier.dispatch_due_accounts[abc] succeeded in 0.01s: {}")
    trace.info("Task verifier.verify_accounts[def] succeeded in 0.2s: 'applied'")
    dispatch, verify = _lines(json_stream)
    assert dispatch["level"] == "debug"
    assert verify["level"] == "info"


def test_routine_dispatch_lines_are_dropped_at_info() -> None:
    """At LOG_LEVEL=INFO the dispatch chatter does not appear at all."""
    with configured(Settings(log_format="json", log_level="INFO")) as stream:
        logging.getLogger("celery.beat").info("Scheduler: Sending due task dispatch-due-accounts")
        logging.getLogger("celery.beat").info("beat: Starting...")
    assert [line["event"] for line in _lines(stream)] == ["beat: Starting..."]
