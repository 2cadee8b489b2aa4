"""structlog, configured once per process for the worker, beat and the scripts.

Every line, ours or a library's (Celery, kombu, botocore), goes through one pipeline: context
variables, level, logger name, a UTC timestamp, secret redaction, then JSON (production) or the
console renderer (a terminal, or LOG_FORMAT=console). Celery is told not to touch logging at all;
its records reach the root logger's single handler like any other library's.
"""

from __future__ import annotations

import functools
import logging
import re
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from worker.redact import escape_controls, mask_external_id, scrub_text
from worker.settings import Settings

__all__ = ["configure_logging", "get_logger", "redact_secrets"]

# Keys whose values are never shown, whatever they hold.
_SECRET_KEY = re.compile(
    r"(pass(word|wd)?|secret|session_?token|security_?token|credentials?|access_?key|"
    r"authorization|api_?key|private_?key)$",
    re.IGNORECASE,
)
_EXTERNAL_ID_KEY = re.compile(r"external_?id$", re.IGNORECASE)
_MAX_DEPTH = 4


_PLAIN, _SECRET, _EXTERNAL_ID = 0, 1, 2


@functools.lru_cache(maxsize=1024)
def _key_kind(key: str) -> int:
    """What a key's name says about its value, decided once per name (every line of a kind
    carries the same keys)."""
    if _SECRET_KEY.search(key):
        return _SECRET
    return _EXTERNAL_ID if _EXTERNAL_ID_KEY.search(key) else _PLAIN


def _redact_value(key: str, value: Any, depth: int) -> Any:
    kind = _key_kind(key)
    if kind == _SECRET:
        return "***"
    if isinstance(value, str):
        return mask_external_id(value) if kind == _EXTERNAL_ID else scrub_text(value)
    if value is None or isinstance(value, int | float):
        return value
    if depth < _MAX_DEPTH and isinstance(value, Mapping):
        return {str(k): _redact_value(str(k), v, depth + 1) for k, v in value.items()}
    if depth < _MAX_DEPTH and isinstance(value, list | tuple):
        return [_redact_value(key, v, depth + 1) for v in value]
    return value


def redact_secrets(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """Mask external IDs and drop anything that looks like a credential or a URL password."""
    for key in list(event_dict):
        event_dict[key] = _redact_value(key, event_dict[key], 0)
    return event_dict


def _scrub_rendered_exception(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    # Exceptions are rendered to text late in the chain; scrub that text too.
    exception = event_dict.get("exception")
    if isinstance(exception, str):
        event_dict["exception"] = scrub_text(exception)
    return event_dict


def _escape_for_terminal(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    # The console renderer prints strings as they are (JSON escapes control characters by
    # itself): customer text in a value (an alias, a role ARN, AWS's message) must not drive the
    # operator's terminal, nor start a line that looks like another log line. A rendered
    # traceback keeps its line breaks.
    for key, value in event_dict.items():
        if isinstance(value, str):
            lines = value.split("\n") if key in {"exception", "stack"} else [value]
            event_dict[key] = "\n".join(escape_controls(line) for line in lines)
    return event_dict


def _drop_color_message(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    event_dict.pop("color_message", None)
    return event_dict


class _RoutineDispatchToDebug(logging.Filter):
    """Celery's per-message lines for the dispatch task (sent, received, succeeded every few
    seconds) become DEBUG: at INFO they would bury the lines that matter. `dispatch.claimed`
    still says at INFO whenever a dispatch claimed something."""

    _LOGGERS = frozenset({"celery.worker.strategy", "celery.app.trace", "celery.beat"})
    _MARKERS = ("verifier.dispatch_due_accounts", "dispatch-due-accounts")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO or record.name not in self._LOGGERS:
            return True
        message = record.getMessage()
        if not any(marker in message for marker in self._MARKERS):
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger().isEnabledFor(logging.DEBUG)


def _use_console(settings: Settings, stream: TextIO) -> bool:
    if settings.log_format == "auto":
        return stream.isatty()
    return settings.log_format == "console"


def shared_processors() -> list[Processor]:
    """The processors every record goes through, structlog's and the standard library's."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.ExtraAdder(),
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _drop_color_message,
        redact_secrets,
        structlog.processors.StackInfoRenderer(),
    ]


def configure_logging(settings: Settings, *, stream: TextIO | None = None) -> None:
    """Route structlog and the standard library through one handler on stdout."""
    stream = stream or sys.stdout
    console = _use_console(settings, stream)
    renderer: Processor = (
        structlog.dev.ConsoleRenderer(colors=stream.isatty())
        if console
        else structlog.processors.JSONRenderer()
    )
    final: list[Processor] = [structlog.stdlib.ProcessorFormatter.remove_processors_meta]
    if not console:
        final.append(structlog.processors.format_exc_info)
    final += [_scrub_rendered_exception, *([_escape_for_terminal] if console else []), renderer]
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared_processors(),
        processors=final,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    handler.addFilter(_RoutineDispatchToDebug())
    handler.set_name("account-verifier")
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(settings.log_level)
    # Python warnings (Celery's "running as root", deprecations) become log records too.
    logging.captureWarnings(True)
    # Libraries that are chatty at INFO say nothing an operator acts on.
    for noisy in ("botocore", "boto3", "urllib3", "kombu", "amqp"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared_processors(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A structlog logger named like a standard-library one (`worker.tasks`)."""
    logger: structlog.stdlib.BoundLogger = structlog.stdlib.get_logger(name)
    return logger


def bind_context(**values: Any) -> None:
    """Bind values to every line logged by this thread until `clear_context`."""
    structlog.contextvars.bind_contextvars(**values)


ACCOUNT_KEYS = ("account_id", "organization_id", "aws_account_id")


def unbind_account_context() -> None:
    """Forget the account fields (the task's own context stays)."""
    structlog.contextvars.unbind_contextvars(*ACCOUNT_KEYS)


def clear_context() -> None:
    """Forget what `bind_context` bound (at the end of a task)."""
    structlog.contextvars.clear_contextvars()


def current_context() -> MutableMapping[str, Any]:
    """What is bound now (used to carry the correlation id into sub-tasks)."""
    return structlog.contextvars.get_contextvars()
