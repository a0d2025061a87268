# radnode — CPU image by default. For a CUDA worker image:
#   docker build --build-arg BASE=nvidia/cuda:12.4.1-runtime-ubuntu22.04 ...
# (the base must provide python3.11; torch then comes from the CUDA wheel index).
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    RADNODE_NODE__DATA_DIR=/data \
    RADNODE_HTTP__HOST=0.0.0.0

WORKDIR /opt/radnode
COPY pyproject.toml constraints.txt README.md ./
COPY service ./service
COPY dicom_nodes ./dicom_nodes
COPY models ./models
RUN pip install -c constraints.txt . \
 && useradd --system --uid 10001 --home-dir /data radnode \
 && mkdir -p /data && chown radnode /data

USER radnode
VOLUME ["/data"]
# 11112: DICOM (Storage SCP, Verification SCP); 8080: health, metrics, status API
EXPOSE 11112 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD python -c "import socket; socket.create_connection(('127.0.0.1', 11112), 3).close()"
ENTRYPOINT ["radnode"]
CMD ["serve"]
