# The account verifier's image: celery worker and beat, the migrations, the sandbox STS and the
# operator scripts. docker-compose.yml runs the whole stack from it; on its own:
#
#   docker build -t account-verifier .
#   docker run --rm -e DATABASE_URL=... -e REDIS_URL=... account-verifier             # the worker
#   docker run --rm -e DATABASE_URL=... account-verifier alembic upgrade head          # migrations
#
# No dev tools (pytest, mypy, ruff) and no embedded servers: only the runtime and the `sandbox`
# extra, which the sandbox STS service of docker-compose.yml needs.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LOG_FORMAT=json

WORKDIR /app

# Dependencies first, read from pyproject.toml alone, so that this (slow) layer is rebuilt only
# when they change, not on every source edit.
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['sandbox']))" \
        > /tmp/requirements.txt \
    && pip install --requirement /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The project itself. alembic.ini and models/migrations stay in /app: `alembic upgrade head` runs
# from here, as it does from a checkout.
COPY README.md alembic.ini ./
COPY models ./models
COPY worker ./worker
COPY sandbox ./sandbox
COPY scripts ./scripts
RUN pip install --no-deps . \
    && groupadd --system --gid 10001 verifier \
    && useradd --system --no-create-home --uid 10001 --gid 10001 verifier

# Never root: the worker holds AWS credentials and talks to customers' accounts. Numeric, so that
# runtimes enforcing "non-root" (Kubernetes runAsNonRoot) can check it.
USER 10001:10001

CMD ["celery", "-A", "worker", "worker", "--hostname", "worker@%h"]
