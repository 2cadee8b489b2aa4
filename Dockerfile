# The account verifier's images, from the lock files in requirements/ (every package pinned with
# its hash), so an image built next month holds what this one does.
#
#   production (the default target): celery worker and beat, the migrations and the operator
#     commands (`python -m scripts.reverify`, `scripts.status`, `scripts.webhooks`). The runtime
#     only: no sandbox, no moto, no benchmarks, no dev tools.
#   sandbox: production plus the sandbox STS and the demo-data script, for docker-compose.yml's
#     local stack only.
#
#   docker build -t account-verifier .
#   docker run --rm -e DATABASE_URL=... -e REDIS_URL=... account-verifier             # the worker
#   docker run --rm -e DATABASE_URL=... account-verifier alembic upgrade head          # migrations
FROM python:3.12-slim AS runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LOG_FORMAT=json

WORKDIR /app

# Dependencies first, from the lock alone, so that this (slow) layer is rebuilt only when they
# change, not on every source edit.
COPY requirements/production.txt requirements/production.txt
RUN pip install --require-hashes --requirement requirements/production.txt

# The project itself (the wheel holds models and worker only). alembic.ini and models/migrations
# stay in /app: `alembic upgrade head` runs from here, as it does from a checkout.
COPY pyproject.toml README.md alembic.ini ./
COPY models ./models
COPY worker ./worker
# The operator commands (python -m scripts.reverify / status / webhooks), not the dev tooling.
COPY scripts/__init__.py scripts/_cli.py scripts/reverify.py scripts/stack_env.py \
     scripts/status.py scripts/webhooks.py ./scripts/
RUN pip install --no-deps . \
    && groupadd --system --gid 10001 verifier \
    && useradd --system --no-create-home --uid 10001 --gid 10001 verifier

# Never root: the worker holds AWS credentials and talks to customers' accounts. Numeric, so that
# runtimes enforcing "non-root" (Kubernetes runAsNonRoot) can check it.
USER 10001:10001

CMD ["celery", "-A", "worker", "worker", "--hostname", "worker@%h"]


# The local stack's sandbox STS and demo data (docker-compose.yml): never deployed.
FROM runtime AS sandbox
USER root
COPY requirements/sandbox.txt requirements/sandbox.txt
RUN pip install --require-hashes --requirement requirements/sandbox.txt
COPY sandbox ./sandbox
COPY scripts/demo_data.py ./scripts/
USER 10001:10001


# Last, so that a plain `docker build` makes the production image.
FROM runtime AS production
