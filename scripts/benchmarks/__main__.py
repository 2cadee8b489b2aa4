"""`python -m scripts.benchmarks`: the throughput benchmark (`scripts/bench`)."""

from scripts.benchmarks.throughput import main

raise SystemExit(main())
