"""The benchmarks, on real PostgreSQL and Redis (`scripts/bench` runs them).

Each run's job has its module:

- options: the throughput benchmark's command line (`scripts/bench`, `python -m scripts.benchmarks`)
- throughput: its run, phase by phase
- common: what every benchmark shares (errors, defaults, option pieces, statistics, `run_main`)
- services: the run's services, started and released in one place (`Stack`)
- procs: the child processes (on scripts.services, which also measures them) and py-spy
- seeding: the accounts made up and COPied in
- baseline: the sequential boto3 loop the worker is compared with
- sampling: what is read while the worker works (processes, PostgreSQL, Redis, progress)
- trace: SQL statements per verification, traced in-process
- report: the figures, the targets and the table

and the other benchmarks: latency (`scripts/bench latency`), claims (`scripts/bench claims`),
status (`scripts/bench status`), sts (`python -m scripts.benchmarks.sts`), webhooks
(`scripts/bench --webhooks`) and webhook claims (`python -m scripts.benchmarks.webhook_claims`).
"""
