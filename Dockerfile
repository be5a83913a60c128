# DriftSched gateway image: slim, non-root, no build tools in the final stage.
#
#   docker build -t driftsched/gateway:0.1.0 .
#   docker run --rm -p 8000:8000 driftsched/gateway:0.1.0        # gateway + 2 simulator engines
#
# The same image runs the simulator engine (`driftsched sim-engine ...`) and the admin CLI
# (`driftsched tenants ...`). vLLM engines use the official vllm/vllm-openai image instead.
# Configuration: mount a YAML file at /etc/driftsched/driftsched.yaml (or point
# DRIFTSCHED_CONFIG elsewhere) and/or set DRIFTSCHED_<SECTION>__<KEY> variables; see
# docs/deployment.md. Lint: `hadolint Dockerfile` (tests/test_deploy.py runs it).

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# ---- build: install DriftSched and its dependencies into a virtualenv --------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/driftsched
COPY pyproject.toml README.md prompts_dataset.py ./
COPY proxy ./proxy
COPY adapters ./adapters
COPY policies ./policies
RUN /opt/driftsched/bin/pip install --no-cache-dir . \
    && find /opt/driftsched -name '__pycache__' -type d -prune -exec rm -rf {} +

# ---- runtime ---------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="driftsched-gateway" \
      org.opencontainers.image.description="OpenAI-compatible multi-tenant LLM gateway with drift-aware scheduling" \
      org.opencontainers.image.licenses="Apache-2.0"

RUN groupadd --system --gid 10001 driftsched \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/driftsched \
       --create-home --shell /usr/sbin/nologin driftsched

COPY --from=build /opt/driftsched /opt/driftsched
COPY config/driftsched.example.yaml /etc/driftsched/driftsched.yaml

ENV PATH=/opt/driftsched/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DRIFTSCHED_CONFIG=/etc/driftsched/driftsched.yaml \
    DRIFTSCHED_SERVER__HOST=0.0.0.0 \
    DRIFTSCHED_SERVER__PORT=8000

# the working directory holds what the gateway may write (engine logs of `pool: sim`,
# an estimator checkpoint if scheduler.estimator.path is relative)
WORKDIR /var/lib/driftsched
USER 10001:10001
EXPOSE 8000

# liveness of the HTTP server (readiness, /readyz, also needs Redis and one healthy engine).
# `sim-engine` containers answer /health instead: override the check there, as
# deploy/docker-compose.yml does.
HEALTHCHECK --interval=10s --timeout=4s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('DRIFTSCHED_SERVER__PORT', '8000'), timeout=3)"]

ENTRYPOINT ["driftsched"]
CMD ["serve"]
