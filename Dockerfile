# syntax=docker/dockerfile:1
# The gateway image (helm/novagate runs it); docs/operations.md#image. Two targets (BuildKit, Docker's
# default builder, builds only the stages a target needs):
#   docker build -t novagate .                       production: Amazon Nova Sonic (engine bedrock), no
#                                                    local speech stack
#   docker build --target demo -t novagate:demo .    + novagate[local]: the offline engine and its speech
#                                                    models (the venv: 377 MB production, 794 MB demo)
# Not built by the test suite (no Docker engine on CI): tests/test_packaging.py reads this file.
#
# The base image (both FROM lines) is pinned by tag here; operators pin it by digest as well
# (FROM python:3.12-slim@sha256:<digest>, e.g. with Renovate or Dependabot) and rebuild for its security updates.

# -- builder: the novagate wheel (web app inside as package data), installed with its dependencies into
# /opt/venv. Every dependency comes as a binary wheel (--only-binary): no compiler, here or later.
FROM python:3.12-slim AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protocol protocol
COPY gateway gateway
COPY web web
# The venv has no pip of its own: the base image's pip installs into it (--python).
RUN --mount=type=cache,target=/root/.cache/pip \
    pip wheel --no-deps --wheel-dir /wheels . \
 && python -m venv --without-pip /opt/venv \
 && pip --python /opt/venv/bin/python install --only-binary=:all: /wheels/novagate-*.whl

# -- builder-demo: the same venv with the `local` extra (pocketsphinx, espeak-ng, faster-whisper, hibari).
# pocketsphinx 5.1.1 has no CPython 3.12 wheel: it is compiled here (C, CMake), and only the venv leaves.
FROM builder AS builder-demo
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake ninja-build \
 && rm -rf /var/lib/apt/lists/*
RUN --mount=type=cache,target=/root/.cache/pip \
    whl=$(ls /wheels/novagate-*.whl) \
 && pip --python /opt/venv/bin/python install --only-binary=:all: --no-binary=pocketsphinx "${whl}[local]"

# -- runtime: what both targets share. Only /opt/venv is copied in (below): no source tree, no wheels,
# no pip cache, no build tools.
FROM python:3.12-slim AS runtime
RUN groupadd --gid 10001 novagate \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin novagate
# The root filesystem may be read-only (helm/novagate): everything written is under /tmp (an emptyDir
# there): the server secret when NOVAGATE_SECRET is not given, the SQLite history of the demo, and the
# private directory the worker supervisor makes for prometheus_client (PROMETHEUS_MULTIPROC_DIR, under
# TMPDIR: set per run by the gateway, never here). HOME=/tmp for any library's cache.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    TMPDIR=/tmp \
    NOVAGATE_SECRET_FILE=/tmp/novagate-secret \
    NOVAGATE_SQLITE_PATH=/tmp/novagate.db
# Not /tmp: worker processes are `python -c ...`, which puts the working directory on sys.path.
WORKDIR /
USER 10001:10001
EXPOSE 8000
# Liveness, as the chart's livenessProbe: /healthz (exempt from the Host check), by Python (no curl here).
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-I", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('NOVAGATE_PORT', '8000'), timeout=4)"]
# Bound to 0.0.0.0, the gateway needs NOVAGATE_ALLOWED_HOSTS (the names clients use to reach it): set it at run time.
ENTRYPOINT ["novagate"]
CMD ["serve", "--host", "0.0.0.0"]

# -- demo: the offline local engine (docs/local-engine.md), SQLite history under /tmp
FROM runtime AS demo
COPY --from=builder-demo /opt/venv /opt/venv
ENV NOVAGATE_ENGINE=local

# -- production (the default target, last): Nova Sonic on Bedrock, without the `local` extra. The chart
# sets NOVAGATE_ENGINE=bedrock and NOVAGATE_STORE=agent-runtime; the gateway checks AWS credentials at start.
FROM runtime AS production
COPY --from=builder /opt/venv /opt/venv
ENV NOVAGATE_ENGINE=bedrock
