"""Start-up checks: the worker and beat reach their services before they say they are running.

Without them Celery starts anyway: the broker connection is retried forever, and the database is
first used by a task. A wrong or unreachable `DATABASE_URL` gave a worker that logged
`worker.ready`, answered its health check and then failed every task with a traceback. Now each
process tries its services at start-up, waits a little for one that is still starting (a
container starting alongside it), and otherwise exits with a line that names the variable and
shows the URL with its password masked.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import redis
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from worker.db import build_engine
from worker.logging import get_logger
from worker.settings import Settings

log = get_logger("worker.startup")

# Exit status of a worker or beat that could not reach a service (the same as `reverify`'s).
EXIT_UNREACHABLE = 3

_FIRST_DELAY, _MAX_DELAY = 0.5, 5.0


class ServiceUnreachableError(Exception):
    """A service could not be reached in time; the message names its variable."""

    def __init__(self, service: Service, reason: str) -> None:
        super().__init__(
            f"cannot reach {service.name} ({service.variable}={service.url}): {reason}"
        )
        self.service = service
        self.reason = reason


class _RefusedError(Exception):
    """The service answered, and said no (a wrong Redis password): not worth waiting for."""


@dataclass(frozen=True, slots=True)
class Service:
    """One service a process needs, and how to try it."""

    name: str
    variable: str
    url: str  # masked
    check: Callable[[], None]  # raises when the service cannot be used


def _check_database(settings: Settings) -> None:
    # A throw-away engine: this runs in the parent process, before the pool forks, and the
    # children must not inherit its connections.
    # Every failure is waited for, a wrong password too: psycopg gives no SQLSTATE for a refused
    # connection, and telling "no such database" from "starting up" by the server's (localized)
    # text would be fragile. `startup.waiting` shows the reason at the first attempt anyway.
    engine = build_engine(settings)
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    finally:
        engine.dispose()


def _check_redis(settings: Settings) -> None:
    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=5, socket_timeout=5)
    try:
        client.ping()
    except (redis.AuthenticationError, redis.ResponseError) as error:
        raise _RefusedError(_first_line(error)) from None
    finally:
        client.close()


def database(settings: Settings) -> Service:
    """The PostgreSQL database of `DATABASE_URL`."""
    return Service(
        "the database",
        "DATABASE_URL",
        settings.database_url_masked,
        lambda: _check_database(settings),
    )


def broker(settings: Settings) -> Service:
    """The Redis of `REDIS_URL` (broker, circuit breaker, rate limit)."""
    return Service("Redis", "REDIS_URL", settings.redis_url_masked, lambda: _check_redis(settings))


def _first_line(error: BaseException | None) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _reason(error: Exception) -> str:
    if isinstance(error, DBAPIError):
        return _first_line(error.orig)
    return _first_line(error) if str(error) else type(error).__name__


def wait_for_services(
    services: Sequence[Service],
    *,
    timeout: float,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Try each service until it answers, for `timeout` seconds in all; raise
    `ServiceUnreachableError` for the first one that does not (at once if it refused)."""
    deadline = time.monotonic() + timeout
    for service in services:
        delay = _FIRST_DELAY
        while True:
            try:
                service.check()
                break
            except _RefusedError as error:
                raise ServiceUnreachableError(service, str(error)) from None
            except (DBAPIError, redis.RedisError, OSError) as error:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ServiceUnreachableError(service, _reason(error)) from None
                wait = min(delay, left)
                log.warning(
                    "startup.waiting",
                    service=service.name,
                    variable=service.variable,
                    url=service.url,
                    error=_reason(error),
                    retry_in_seconds=round(wait, 1),
                )
                sleep(wait)
                delay = min(delay * 2, _MAX_DELAY)


def require_services(settings: Settings, *, process: str, database_needed: bool) -> None:
    """For the worker and beat: wait for their services, or log why not and exit (status 3)."""
    services = [database(settings)] if database_needed else []
    services.append(broker(settings))
    started = time.monotonic()
    try:
        wait_for_services(services, timeout=settings.startup_timeout_seconds)
    except ServiceUnreachableError as error:
        log.critical(
            "startup.unreachable",
            process=process,
            service=error.service.name,
            variable=error.service.variable,
            url=error.service.url,
            error=error.reason,
            waited_seconds=round(time.monotonic() - started, 1),
            action=f"exiting: check {error.service.variable} and that the service is up",
        )
        raise SystemExit(EXIT_UNREACHABLE) from None
