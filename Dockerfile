# syntax=docker/dockerfile:1
#
# synclock image: docker build -t synclock:local .
#
# The builder turns the project and its dependencies into wheels; the runtime stage
# installs them from that folder alone (no network, no compiler) and runs as an
# unprivileged user. Nothing secret goes in here: Redis and Postgres URLs and the
# admin tokens arrive at run time (docker-compose.yml, deploy/k8s/).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
RUN python -m pip wheel --wheel-dir /wheels .

FROM ${PYTHON_IMAGE} AS runtime
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python -m pip install --no-index --find-links=/wheels synclock \
    && groupadd --system --gid 10001 synclock \
    && useradd --system --uid 10001 --gid synclock --no-create-home \
       --home-dir /var/lib/synclock --shell /usr/sbin/nologin synclock \
    && install -d -o synclock -g synclock -m 0750 /var/lib/synclock

# Where a generated admin token would be kept (unused when SYNCLOCK_ADMIN_TOKENS is
# set). Docker copies this folder's owner into a fresh named volume.
ENV SYNCLOCK_DATA_DIR=/var/lib/synclock \
    SYNCLOCK_LOG_FORMAT=json
VOLUME ["/var/lib/synclock"]
WORKDIR /var/lib/synclock

# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
EXPOSE 8080

# Ready means Redis and Postgres both answer (GET /readyz); an error status or a
# refused connection makes urlopen raise, and the check exits non-zero.
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/readyz', timeout=4)"]

# Exec form: synclock is PID 1 and gets SIGTERM itself. It stops listening, lets a
# running sync finish for up to SYNCLOCK_SHUTDOWN_TIMEOUT (20s), then exits, so give
# it a longer stop timeout (docker-compose.yml: stop_grace_period).
ENTRYPOINT ["synclock"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8080"]
