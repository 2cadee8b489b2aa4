"""The Celery app: `celery -A worker worker` and `celery -A worker beat`."""

from __future__ import annotations

import logging
import sys
from functools import cached_property
from typing import Any

import celery.apps.beat
import celery.apps.worker
from celery import Celery, signals

from worker import beat_health, health, liveness, metrics
from worker.logging import bind_context, clear_context, configure_logging, get_logger
from worker.settings import get_settings_or_exit
from worker.startup import require_services


class VerifierCelery(Celery):  # type: ignore[misc]
    """Celery whose worker and beat print no banner when the logs are JSON lines.

    The banner is plain text on stdout; in production every stdout line must parse as JSON.
    """

    @cached_property
    def Worker(self) -> Any:  # noqa: N802 - Celery's attribute name
        return self.subclass_with_self("worker.app:QuietWorker")

    @cached_property
    def Beat(self) -> Any:  # noqa: N802
        return self.subclass_with_self("worker.app:QuietBeat")


def _banner_wanted() -> bool:
    settings = get_settings_or_exit()
    return settings.log_format == "console" or (
        settings.log_format == "auto" and sys.stdout.isatty()
    )


class QuietWorker(celery.apps.worker.Worker):  # type: ignore[misc]
    """The worker, quiet unless logging to a console."""

    def on_before_init(self, quiet: bool = False, **kwargs: Any) -> None:
        super().on_before_init(quiet=quiet or not _banner_wanted(), **kwargs)

    def install_platform_tweaks(self, worker: Any) -> None:
        super().install_platform_tweaks(worker)
        if not _banner_wanted():
            # Celery prints its shutdown notices ("worker: Warm shutdown") straight to stdout
            # from its signal handlers; send them through logging so they are JSON too.
            celery.apps.worker.safe_say = _say_through_logging


def _say_through_logging(message: str, _stream: Any = None) -> None:
    logging.getLogger("celery.apps.worker").warning(message.strip())


class QuietBeat(celery.apps.beat.Beat):  # type: ignore[misc]
    """Beat, quiet unless logging to a console."""

    def __init__(self, *args: Any, quiet: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, quiet=quiet or not _banner_wanted(), **kwargs)


app = VerifierCelery("worker", include=["worker.tasks", "worker.webhooks.tasks"])
app.config_from_object("worker.celeryconfig")

log = get_logger("worker.app")

# Not "correlation_id": that name is the AMQP property Celery fills with the task id.
CORRELATION_HEADER = "x_correlation_id"
DISPATCH_TASK = "verifier.dispatch_due_accounts"


@signals.setup_logging.connect
def _setup_logging(**_: Any) -> None:
    # Connecting to this signal stops Celery from configuring logging itself.
    configure_logging(get_settings_or_exit())


@signals.celeryd_init.connect
def _early_logging(**_: Any) -> None:
    # The worker warns about its privileges before `setup_logging`; configure now so that
    # warning is a JSON line too.
    configure_logging(get_settings_or_exit())


@signals.worker_init.connect
def _check_services(**_: Any) -> None:
    # In the parent process, before the pool starts: a worker that cannot reach its database or
    # Redis exits naming the variable, instead of saying `worker.ready` and failing every task.
    require_services(get_settings_or_exit(), process="worker", database_needed=True)


@signals.worker_init.connect
def _preload_probe_calls(**_: Any) -> None:
    # In the parent process, before the pool forks: the permission probes' requests are kept
    # here once (built by a short-lived child process), so the pool's processes share them and
    # no process of the worker loads the services' models (the per-process resources are built
    # after the fork, by worker.resources). A failure is theirs to meet again (a platform fault
    # naming the service), not a reason to stop the worker.
    settings = get_settings_or_exit()
    if not settings.permission_probes:
        return
    from worker.sts.client import preload_probe_calls  # noqa: PLC0415 - boto3 where probes run

    try:
        preload_probe_calls(settings)
    except Exception as error:  # noqa: BLE001 - see above
        log.warning("worker.probe_preload_failed", error=type(error).__name__)


@signals.worker_ready.connect
def _worker_ready(sender: Any = None, **_: Any) -> None:
    settings = get_settings_or_exit()
    log.info(
        "worker.ready",
        database_url=settings.database_url_masked,
        redis_url=settings.redis_url_masked,
        pool=app.conf.worker_pool,
        processes=app.conf.worker_concurrency,
        threads_per_process=settings.worker_concurrency,
        chunk_size=settings.dispatch_chunk_size,
        aws_region=settings.aws_region,
    )


@signals.beat_init.connect
def _beat_init(**_: Any) -> None:
    settings = get_settings_or_exit()
    # Beat only sends messages (the dispatch task runs in a worker): Redis is all it needs.
    require_services(settings, process="beat", database_needed=False)
    log.info(
        "beat.started",
        redis_url=settings.redis_url_masked,
        dispatch_interval_seconds=settings.dispatch_interval_seconds,
    )
    if settings.dispatch_on_notify:
        from worker.listener import listen_for_due_accounts  # noqa: PLC0415 - beat only

        listen_for_due_accounts(app, settings)


@signals.task_prerun.connect
def _bind_task_context(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    clear_context()
    request = task.request if task is not None else None
    bind_context(
        task_id=task_id,
        task_name=getattr(task, "name", None),
        retries=getattr(request, "retries", 0),
        correlation_id=(request.get(CORRELATION_HEADER) if request is not None else None)
        or task_id,
    )


@signals.task_postrun.connect
def _clear_task_context(**_: Any) -> None:
    clear_context()


# --- metrics and health (worker.metrics, worker.health): only with METRICS_PORT set ------------

app.steps["consumer"].add(liveness.LoopHeartbeat)


@signals.celeryd_init.connect
def _start_metrics(**_: Any) -> None:
    # The worker's main process, before its pool exists: the children inherit multiprocess mode.
    settings = get_settings_or_exit()
    if settings.metrics_port is not None:
        health.start_worker_endpoint(settings)


@signals.worker_process_shutdown.connect
def _forget_process(pid: int | None = None, **_: Any) -> None:
    if pid is not None:
        metrics.forget_process(pid)


@signals.task_prerun.connect
def _task_started(task_id: str | None = None, **_: Any) -> None:
    metrics.task_started(task_id)


@signals.task_postrun.connect
def _task_finished(
    task_id: str | None = None, task: Any = None, state: str | None = None, **_: Any
) -> None:
    metrics.task_finished(task_id, getattr(task, "name", "unknown"), state)


@signals.beat_init.connect
def _start_beat_metrics(**_: Any) -> None:
    settings = get_settings_or_exit()
    if settings.metrics_port is not None:
        signals.before_task_publish.connect(_beat_tick, weak=False)
        signals.after_task_publish.connect(_beat_sent, weak=False)
        health.start_beat_endpoint(settings)


def _beat_tick(sender: str | None = None, **_: Any) -> None:
    if sender == DISPATCH_TASK:
        beat_health.beat_tick(sent=False)


def _beat_sent(sender: str | None = None, **_: Any) -> None:
    if sender == DISPATCH_TASK:
        beat_health.beat_tick(sent=True)
