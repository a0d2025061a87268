# radnode container image. docs/operations.md ("Docker") explains how to run it.
#
# CPU image (the default):
#   docker build -t radnode .
# GPU worker image: a CUDA runtime base and CUDA torch wheels, e.g.
#   docker build -t radnode:cuda \
#     --build-arg BASE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124 .
# Any Debian or Ubuntu base works: python3.11 is installed from apt where it is missing.
ARG BASE=python:3.11-slim-bookworm

# -- build: a virtual environment with radnode and its pinned dependencies ---------
FROM ${BASE} AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# hadolint ignore=DL3008
RUN if ! command -v python3.11 >/dev/null; then \
      apt-get update \
      && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
 && python3.11 -m venv /opt/venv
WORKDIR /src
# Dependencies first, in their own layer: rebuilt only when the pins change, not on
# every source edit. Torch comes from TORCH_INDEX_URL (CPU wheels by default, so the
# CPU image does not carry gigabytes of CUDA libraries); constraints.txt pins it.
COPY pyproject.toml constraints.txt ./
RUN python3.11 -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
 && /opt/venv/bin/pip install --extra-index-url "${TORCH_INDEX_URL}" \
      -c constraints.txt -r /tmp/requirements.txt
COPY README.md ./
COPY service ./service
COPY dicom_nodes ./dicom_nodes
RUN /opt/venv/bin/pip install --no-deps -c constraints.txt .

# -- runtime: the environment, the bundles, an unprivileged user -----------------------
FROM ${BASE}
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN if ! command -v python3.11 >/dev/null; then \
      apt-get update \
      && apt-get install -y --no-install-recommends python3.11 \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
 && groupadd --system --gid 10001 radnode \
 && useradd --system --uid 10001 --gid radnode --home-dir /data --shell /usr/sbin/nologin radnode \
 && mkdir -p /data /models \
 && chown radnode:radnode /data

COPY --from=build /opt/venv /opt/venv
# Shipped bundles; a named volume on /models starts with them, a bind mount replaces
# them. Owned by root: radnode reads bundles, never writes them.
COPY models /models
# deepbet's published networks for models/mr_brain_extraction, fetched and SHA-256
# checked at build time (never at run time); see that bundle's model card.
RUN /opt/venv/bin/python /models/mr_brain_extraction/scripts/install_weights.py

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    RADNODE_NODE__DATA_DIR=/data \
    RADNODE_MODELS__DIR=/models \
    RADNODE_HTTP__HOST=0.0.0.0 \
    RADNODE_HTTP__PORT=8080

LABEL org.opencontainers.image.title="radnode" \
      org.opencontainers.image.description="DICOM AI node: receives studies from a PACS, runs MONAI pipelines, sends standard results back" \
      org.opencontainers.image.licenses="Apache-2.0"

USER 10001:10001
WORKDIR /data
# /data: spool, study index, queue and results. Keep it on a persistent volume: a
# C-STORE Success is a promise that the instance is kept.
# /models: MONAI bundles (their configs run Python: mount only trusted ones, read-only).
VOLUME ["/data", "/models"]
# 11112: DICOM, Storage SCP and Verification SCP (node.port).
# 8080: HTTP, /healthz /readyz /metrics /api (http.port); publish to the ops network only.
EXPOSE 11112 8080
# Liveness with the Python already in the image (no curl): urlopen raises, and so
# exits non-zero, on a refused connection, a timeout or any non-2xx answer.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('RADNODE_HTTP__PORT', '8080'), timeout=4)"]
ENTRYPOINT ["radnode"]
CMD ["serve"]
