"""The throughput benchmark's figures: the JSON document (`summarize`), the issue's targets and
the table on stdout (`render_table`)."""

from __future__ import annotations

import math
import os
import platform
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

from scripts.benchmarks.baseline import SequentialResult
from scripts.benchmarks.common import percentile, rounded
from scripts.benchmarks.sampling import BROKER_PUBLISH_COMMANDS, PG_DATABASE_COLUMNS
from scripts.benchmarks.services import database_name
from scripts.benchmarks.trace import TraceResult
from scripts.services.usage import cpu_delta
from worker.redact import mask_url

if TYPE_CHECKING:
    from scripts.benchmarks.options import Options
    from scripts.benchmarks.throughput import WorkerRun

SCHEMA: Final = "account-verifier-bench/1"


def summarize(
    *,
    opts: Options,
    started_at: datetime,
    sequential: SequentialResult,
    sequential_sts: dict[str, Any],
    run: WorkerRun,
    trace: TraceResult | None,
    stats_loaded: bool,
    scratch: str,
) -> dict[str, Any]:
    """Every figure of the run, as the JSON document."""
    settings, before, after, lag = run.settings, run.before, run.after, run.lag
    verified, sts_stats = run.verified, run.sts_stats
    n = max(verified, 1)
    window = lag.get("max", math.nan)  # due -> last result committed, on the database's clock
    rate = verified / window if window and window > 0 else math.nan
    worker_cpu = after.worker.cpu_seconds - before.worker.cpu_seconds
    cpu_per = worker_cpu / n
    assume_calls = int(sts_stats.get("by_action", {}).get("AssumeRole", 0))
    calls_per = assume_calls / n
    throttled = int(sts_stats.get("throttled", 0))
    requests = int(sts_stats.get("requests", 0))
    mean_latency = sequential.mean_call_seconds
    # Verifications in flight: threads per process x prefork processes x `celery worker`s.
    processes = int(settings.worker_processes) or (os.cpu_count() or 1)
    concurrency = int(settings.worker_concurrency) * processes * opts.workers
    bounds: dict[str, float] = {
        "concurrency": concurrency / (calls_per * mean_latency) if calls_per else math.nan,
        "cpu": opts.cores / cpu_per if cpu_per > 0 else math.nan,
    }
    accepted_per = (assume_calls - int(sts_stats.get("throttled", 0))) / n
    if opts.rate_limit is not None and accepted_per > 0:
        # The stand-in's token bucket spends tokens on accepted requests only.
        bounds["sts_rate_limit"] = opts.rate_limit / accepted_per
    # The machine's ceiling (the issue's formula: concurrency and CPU), and the run's: the
    # worker's own STS budget is as hard a limit as a core. Once the worker is efficient it is
    # the budget that binds (at most the STS quota over STS calls per verification), and a
    # throughput at the budget is the worker doing all it is allowed to.
    machine = {k: bounds[k] for k in ("concurrency", "cpu") if not math.isnan(bounds[k])}
    machine_ceiling = min(machine.values()) if machine else math.nan
    budget = getattr(settings, "sts_rate_limit_per_second", None)
    budget_bound = budget / calls_per if budget and calls_per else None
    if budget_bound is not None:
        bounds["sts_budget"] = budget_bound
    finite = {k: v for k, v in bounds.items() if not math.isnan(v)}
    binding = min(finite, key=lambda k: finite[k]) if finite else None
    ceiling = finite[binding] if binding else math.nan
    busy = after.machine[0] - before.machine[0]
    total = after.machine[1] - before.machine[1]
    pg_delta = {k: run.pg_after[k] - run.pg_before[k] for k in PG_DATABASE_COLUMNS}
    own_transactions, tables = run.own_transactions, run.tables
    # The benchmark's own transactions in the scratch database: the seeds, ANALYZE, its polls.
    worker_commits = pg_delta["xact_commit"] - own_transactions
    redis_delta = {
        k: v - before.redis_commands.get(k, 0)
        for k, v in after.redis_commands.items()
        if v - before.redis_commands.get(k, 0) > 0
    }
    published = sum(redis_delta.get(c, 0) for c in BROKER_PUBLISH_COMMANDS)
    pg_cpu = cpu_delta(before.pg_cpu, after.pg_cpu)
    components = {
        "worker": worker_cpu,
        "beat": after.beat.cpu_seconds - before.beat.cpu_seconds,
        "postgresql_server": pg_cpu,
        "redis_server": after.redis_cpu - before.redis_cpu,
        "sts_standin": after.standin.cpu_seconds - before.standin.cpu_seconds,
        "benchmark_itself": after.bench_cpu - before.bench_cpu,
    }
    components["rest_of_machine"] = max(
        0.0, (after.machine[0] - before.machine[0]) - sum(components.values())
    )
    wall = after.at - before.at

    results: dict[str, Any] = {
        "schema": SCHEMA,
        "started_at": started_at.isoformat(),
        "finished_at": datetime.now(UTC).isoformat(),
        "completed": run.completed,
        "unverified": run.unverified,
        "host": {
            "cores": opts.cores,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "load_average": list(os.getloadavg()),
        },
        "config": {
            "accounts": opts.accounts,
            "sample": sequential.verifications,
            "median_ms": opts.median_ms,
            "latency_sigma": opts.latency_sigma,
            "rate_limit": opts.rate_limit,
            "concurrency": concurrency,
            "concurrency_is_default": opts.concurrency is None,
            "worker_processes": opts.workers,
            "dispatch_interval_seconds": settings.dispatch_interval_seconds,
            "dispatch_batch_size": settings.dispatch_batch_size,
            "dispatch_max_queued": settings.dispatch_max_queued,
            "permission_probes": ",".join(settings.permission_probes) or "none",
            "worker_env": opts.worker_env,
            "seed": opts.seed,
            "timeout_seconds": opts.timeout,
            "database": mask_url(scratch) if opts.keep else database_name(scratch),
            "redis_url": mask_url(opts.redis_url),
        },
        "worker": {
            "verified": verified,
            "window_seconds": rounded(window),
            "verifications_per_second": rounded(rate, 1),
            "ratio_to_sequential": rounded(rate / sequential.rate, 2),
            "lag_seconds": {k: rounded(lag.get(k)) for k in ("p50", "p90", "p99", "max")},
            "first_attempt_after_seconds": rounded(lag.get("first_started")),
            "cpu_seconds": rounded(worker_cpu),
            "cpu_ms_per_verification": rounded(cpu_per * 1000),
            "user_cpu_ms_per_verification": rounded(
                (after.worker.user_seconds - before.worker.user_seconds) / n * 1000
            ),
            "system_cpu_ms_per_verification": rounded(
                (after.worker.system_seconds - before.worker.system_seconds) / n * 1000
            ),
            "consumer_thread_cpu_ms_per_verification": rounded(
                (after.worker.main_thread_seconds - before.worker.main_thread_seconds) / n * 1000
            ),
            "beat_cpu_seconds": rounded(after.beat.cpu_seconds - before.beat.cpu_seconds),
            # Judged: the sampled peak of PSS summed over the worker's processes.
            "peak_pss_mb": rounded(run.peak_pss_mb, 1),
            "peak_rss_total_mb": rounded(run.peak_rss_total_mb, 1),
            # Each process's own peak (VmHWM), summed: an upper bound of peak_rss_total_mb.
            "rss_peaks_summed_mb": rounded(after.worker.hwm_mb, 1),
            "rss_mb_at_end": rounded(after.worker.rss_mb, 1),
            "pss_mb_at_end": rounded(after.worker.pss_mb, 1),
            "beat_peak_rss_mb": rounded(after.beat.hwm_mb, 1),
        },
        "sts": {
            "mean_call_ms": rounded(mean_latency * 1000),
            "expected_mean_call_ms": rounded(opts.median_ms * math.exp(opts.latency_sigma**2 / 2)),
            "assume_role_calls": assume_calls,
            "calls_per_verification": rounded(calls_per),
            "requests": requests,
            "throttled": throttled,
            "throttled_share": rounded(throttled / requests if requests else 0.0, 4),
            "by_outcome": sts_stats.get("by_outcome", {}),
            # The permission probes go to other services: they spend no STS budget.
            "probe_requests": int(sts_stats.get("probe_requests", 0)),
            "probe_calls_per_verification": rounded(int(sts_stats.get("probe_requests", 0)) / n),
            "standin_cpu_ms_per_verification": rounded(
                (after.standin.cpu_seconds - before.standin.cpu_seconds) / n * 1000
            ),
        },
        "ceiling": {
            "formula": "min(concurrency / (STS calls per verification x mean STS call), "
            "cores / worker CPU s per verification, worker STS budget / calls per verification"
            "[, stand-in rate limit / calls per verification])",
            "bounds": {k: rounded(v, 1) for k, v in bounds.items()},
            "binding": binding,
            "verifications_per_second": rounded(ceiling, 1),
            "fraction": rounded(rate / ceiling, 3),
            # Without the worker's STS budget: concurrency and CPU alone.
            "machine_verifications_per_second": rounded(machine_ceiling, 1),
            "machine_fraction": rounded(rate / machine_ceiling, 3),
            "gil_bound": rounded(1 / cpu_per if cpu_per > 0 else math.nan, 1),
            "worker_sts_budget_per_second": budget,
            "worker_sts_budget_bound": rounded(budget_bound, 1),
        },
        "sequential": {
            "verifications": sequential.verifications,
            "verified": sequential.verified,
            "verifications_per_second": rounded(sequential.rate, 2),
            "wall_seconds": rounded(sequential.wall_seconds),
            "cpu_ms_per_verification": rounded(
                sequential.cpu_seconds / max(sequential.verifications, 1) * 1000
            ),
            "call_ms": {
                "mean": rounded(mean_latency * 1000),
                "p50": rounded(percentile(sequential.call_ms, 0.5)),
                "p99": rounded(percentile(sequential.call_ms, 0.99)),
            },
            "sts_requests": int(sequential_sts.get("requests", 0)),
        },
        "database": {
            "measured_with": "pg_stat_database deltas of the scratch database, minus the "
            f"benchmark's own {own_transactions} transactions (seeds, ANALYZE, polls); "
            + (
                "pg_stat_statements is loaded but not read by this version"
                if stats_loaded
                else "pg_stat_statements is not in shared_preload_libraries, so statements "
                "are counted by the in-process trace"
            ),
            "commits_per_verification": rounded(worker_commits / n),
            "rollbacks_per_verification": rounded(pg_delta["xact_rollback"] / n),
            # Each new session is a new PostgreSQL backend (a fork, authentication, cold caches)
            # and a new client connection: a pool that keeps its connections opens few.
            "new_sessions": pg_delta["sessions"],
            "new_sessions_per_1000_verifications": rounded(pg_delta["sessions"] / n * 1000, 1),
            "rows_updated_per_verification": rounded(pg_delta["tup_updated"] / n),
            "audit_events_per_verification": rounded(
                tables.get("audit_events", {}).get("n_tup_ins", 0) / n
            ),
            "tables": tables,
            # The whole server, every database: see machine.cpu_ms_per_verification.
            "server_cpu_ms_per_verification": rounded(pg_cpu / n * 1000),
            "deltas": pg_delta,
        },
        "broker": {
            "measured_with": "Redis INFO commandstats deltas (server-wide); messages = "
            + "+".join(c.upper() for c in BROKER_PUBLISH_COMMANDS),
            "messages_per_verification": rounded(published / n),
            "commands_per_verification": rounded(sum(redis_delta.values()) / n, 2),
            "commands": dict(sorted(redis_delta.items(), key=lambda kv: -kv[1])),
            "other_clients_on_server": run.other_redis_clients,
            "redis_cpu_ms_per_verification": rounded(
                (after.redis_cpu - before.redis_cpu) / n * 1000
            ),
        },
        "machine": {
            "wall_seconds": rounded(wall),
            "cpu_busy_share": rounded(busy / total if total else math.nan),
            # Where the machine's CPU went, per verification. PostgreSQL and Redis are whole
            # servers and "rest" is everything else running: on a shared machine, others' work.
            "cpu_ms_per_verification": {k: rounded(v / n * 1000) for k, v in components.items()},
        },
    }
    if trace is not None:
        tn = max(trace.verifications, 1)
        results["database"]["trace"] = {
            "verifications": trace.verifications,
            "applied": trace.applied,
            "statements_per_verification": rounded(trace.statements / tn, 2),
            "transactions_per_verification": rounded(trace.transactions / tn, 2),
            "pool_checkouts_per_verification": rounded(trace.checkouts / tn, 2),
            # Each transaction is BEGIN .. COMMIT around its statements; each checkout pings.
            "round_trips_per_verification": rounded(
                (trace.statements + 2 * trace.transactions + trace.checkouts) / tn, 2
            ),
            "xact_commit_per_verification": rounded(trace.xact_commit / tn, 2),
            "statements_by_kind": trace.by_kind,
            "claim_statements_per_batch": trace.claim_statements,
            "claim_batch": trace.claim_batch,
            # The task body alone, one thread, no Celery consumer and no contention.
            "task_cpu_ms_per_verification": rounded(
                trace.cpu_seconds / max(trace.cpu_measured, 1) * 1000
            ),
        }
    results["targets"] = targets(results)
    return results


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets and whether this run met them."""
    w, c, d, b = results["worker"], results["ceiling"], results["database"], results["broker"]
    rows = [
        ("ratio to the sequential loop", w["ratio_to_sequential"], ">=", 30.0),
        ("fraction of the ceiling", c["fraction"], ">=", 0.70),
        ("database commits per verification", d["commits_per_verification"], "<=", 2.0),
        ("broker messages per verification", b["messages_per_verification"], "<=", 2.0),
        ("worker peak memory (MB)", w["peak_pss_mb"], "<=", 300.0),
    ]
    out = []
    for name, value, op, goal in rows:
        met = value is not None and (value >= goal if op == ">=" else value <= goal)
        out.append({"name": name, "value": value, "op": op, "target": goal, "met": met})
    return out


def _fmt(value: Any, spec: str = ",.1f", suffix: str = "", scale: float = 1.0) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int | float):
        return f"{value * scale:{spec}}{suffix}"
    return str(value)


Row = tuple[str, str, str, str]
_SHORT: Final = {
    "postgresql_server": "pg",
    "redis_server": "redis",
    "sts_standin": "sts",
    "benchmark_itself": "bench",
    "rest_of_machine": "rest",
}


def render_table(r: dict[str, Any]) -> str:
    """The one table of a run: metric, value, target, verdict."""
    cfg, w, s, c = r["config"], r["worker"], r["sequential"], r["ceiling"]
    sts, d, b = r["sts"], r["database"], r["broker"]
    target = {t["name"]: t for t in r["targets"]}
    cpu_split: dict[str, float | None] = r["machine"]["cpu_ms_per_verification"]

    def row(label: str, value: str, goal: str | None = None, *, pct: bool = False) -> Row:
        if goal is None:
            return (label, value, "", "")
        t = target[goal]
        shown = f"{t['target'] * 100:g}%" if pct else f"{t['target']:g}"
        return (label, value, f"{t['op']} {shown}", "ok" if t["met"] else "MISSED")

    bounds = ", ".join(f"{k} {_fmt(v)}" for k, v in c["bounds"].items())
    rows: list[Row] = [
        row("verifications/s, worker", _fmt(w["verifications_per_second"])),
        row("verifications/s, sequential boto3 loop", _fmt(s["verifications_per_second"], ",.2f")),
        row(
            "ratio to the sequential loop",
            _fmt(w["ratio_to_sequential"], ",.2f", "x"),
            "ratio to the sequential loop",
        ),
        row(f"ceiling, {c['binding']}-bound ({bounds})", _fmt(c["verifications_per_second"])),
        row(
            "throughput / ceiling",
            _fmt(c["fraction"], ".0f", "%", 100),
            "fraction of the ceiling",
            pct=True,
        ),
        row(
            "  throughput / machine ceiling (concurrency and CPU only)",
            _fmt(c["machine_fraction"], ".0f", "%", 100),
        ),
        row("  one-core (GIL) bound: 1 / CPU per verification", _fmt(c["gil_bound"])),
    ]
    if c.get("worker_sts_budget_bound") is not None:
        label = f"  worker STS budget bound ({c['worker_sts_budget_per_second']:g} calls/s)"
        rows.append(row(label, _fmt(c["worker_sts_budget_bound"])))
    rows += [
        row("STS calls per verification", _fmt(sts["calls_per_verification"], ".2f")),
        row(
            "probe calls per verification",
            f"{_fmt(sts.get('probe_calls_per_verification'), '.2f')} "
            f"(PERMISSION_PROBES={cfg.get('permission_probes')})",
        ),
        row("mean STS call, measured (ms)", _fmt(sts["mean_call_ms"], ".1f")),
        row("worker CPU per verification (ms)", _fmt(w["cpu_ms_per_verification"], ".2f")),
        row(
            "  in the consumer (main) thread (ms)",
            _fmt(w["consumer_thread_cpu_ms_per_verification"], ".2f"),
        ),
        row(
            "  user / system (ms)",
            f"{_fmt(w['user_cpu_ms_per_verification'], '.2f')} / "
            f"{_fmt(w['system_cpu_ms_per_verification'], '.2f')}",
        ),
        row(
            "DB commits per verification",
            _fmt(d["commits_per_verification"], ".2f"),
            "database commits per verification",
        ),
    ]
    trace = d.get("trace")
    if trace:
        rows += [
            row(
                "DB statements per verification (trace)",
                _fmt(trace["statements_per_verification"], ".2f"),
            ),
            row(
                "DB round trips per verification (trace)",
                _fmt(trace["round_trips_per_verification"], ".2f"),
            ),
            row(
                "task body CPU per verification, 1 thread (ms, trace)",
                _fmt(trace["task_cpu_ms_per_verification"], ".2f"),
            ),
        ]
    updated = _fmt(d["rows_updated_per_verification"], ".2f")
    audited = _fmt(d["audit_events_per_verification"], ".2f")
    lag = w["lag_seconds"]
    rows += [
        row("DB rows updated / audit events per verification", f"{updated} / {audited}"),
        row(
            "new DB sessions per 1000 verifications", _fmt(d["new_sessions_per_1000_verifications"])
        ),
        row(
            "broker messages per verification",
            _fmt(b["messages_per_verification"], ".2f"),
            "broker messages per verification",
        ),
        row("Redis commands per verification (all)", _fmt(b["commands_per_verification"], ".1f")),
        row(
            "lag due -> verified, p50 / p99 (s)",
            f"{_fmt(lag['p50'], '.1f')} / {_fmt(lag['p99'], '.1f')}",
        ),
        row(
            "worker peak memory, PSS: shared pages once (MB)",
            _fmt(w["peak_pss_mb"]),
            "worker peak memory (MB)",
        ),
        row("  peak RSS total, shared pages once per process (MB)", _fmt(w["peak_rss_total_mb"])),
        row("  each process's peak RSS, summed (MB)", _fmt(w["rss_peaks_summed_mb"])),
        row("STS calls throttled", _fmt(sts["throttled_share"], ".2f", "%", 100)),
        row(
            "machine CPU busy during the run", _fmt(r["machine"]["cpu_busy_share"], ".0f", "%", 100)
        ),
        row(
            "machine CPU per verification, all processes (ms)",
            _fmt(sum(v or 0.0 for v in cpu_split.values()), ".1f"),
        ),
    ]
    default = " (default)" if cfg["concurrency_is_default"] else ""
    if cfg.get("worker_processes", 1) > 1:
        default += f" in total over {cfg['worker_processes']} worker processes"
    title = (
        f"account-verifier benchmark: {w['verified']:,}/{cfg['accounts']:,} accounts verified; "
        f"STS median {cfg['median_ms']:g} ms, sigma {cfg['latency_sigma']:g}"
        + (f", rate limit {cfg['rate_limit']:g}/s" if cfg["rate_limit"] else "")
        + f"; concurrency {cfg['concurrency']}{default}; {r['host']['cores']} cores"
    )
    width = max(len(x[0]) for x in rows) + 2
    lines = [title, "", f"{'metric':<{width}}{'value':>14}  {'target':<9} verdict"]
    lines.append("-" * (width + 33))
    lines += [f"{a:<{width}}{v:>14}  {t:<9} {m}".rstrip() for a, v, t, m in rows]
    breakdown = ", ".join(f"{_SHORT.get(k, k)} {_fmt(v, '.1f')}" for k, v in cpu_split.items())
    lines.append(f"  of which (ms): {breakdown}")
    if b["other_clients_on_server"]:
        lines.append(
            f"note: {b['other_clients_on_server']} other connection(s) used this Redis server "
            "during the run; commandstats are server-wide, so broker figures may be inflated"
        )
    if not r["completed"]:
        lines.append("note: the run TIMED OUT; figures cover the accounts verified until then")
    return "\n".join(lines)
