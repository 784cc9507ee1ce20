# loraserve: one frozen base model, many tenants' LoRA adapters, over gRPC.
#
# CPU image (default):
#   docker build -t loraserve .
# CUDA image: same file, a CUDA build of torch (its wheels bundle the CUDA runtime; run with
# the NVIDIA container toolkit, `docker run --gpus all ...`):
#   docker build -t loraserve:cuda --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
#
# Run (the server refuses non-loopback binds without a tenants file, hence --tenants):
#   docker run -p 50051:50051 -p 9400:9400 \
#     -v /srv/models:/models:ro -v loraserve-data:/data -v /srv/loraserve:/config:ro \
#     loraserve --tenants /config/tenants.toml --model /models/<checkpoint-dir>
# Arguments after the image name replace CMD and are appended to the ENTRYPOINT's
# `loraserve serve --host 0.0.0.0 --data-dir /data`; `loraserve serve --help` lists them all.
# Without --model the server loads its embedded tiny default model.

ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

# HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE: models come from /models only; nothing reaches a network.
# LORASERVE_CACHE: where the embedded default model is built on first start (a writable volume).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HOME=/tmp/huggingface \
    LORASERVE_CACHE=/data/cache

# torch first, from its own index, so `pip install .` below finds it satisfied and does not
# pull the (much larger) default CUDA wheel from PyPI.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY loraserve ./loraserve
COPY server ./server
COPY adapters ./adapters
COPY client ./client
RUN pip install . && rm -rf /src

# Non-root; only /data (uploaded adapters) is written. /models and /config are read-only inputs.
RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin loraserve \
    && mkdir -p /models /data /config \
    && chown loraserve:loraserve /data
USER loraserve
WORKDIR /data

VOLUME ["/models", "/data"]
# 50051: gRPC API (+ grpc.health.v1); 9400: Prometheus /metrics.
EXPOSE 50051 9400

# Asks the standard gRPC health service, with what the image already has (no extra binaries).
# Plain-text only: a server started with TLS needs a probe that presents its CA instead.
# start-period leaves time to load the base model.
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; r = g.HealthStub(grpc.insecure_channel('127.0.0.1:50051')).Check(h.HealthCheckRequest(), timeout=4); sys.exit(0 if r.status == h.HealthCheckResponse.SERVING else 1)"]

ENTRYPOINT ["loraserve", "serve", "--host", "0.0.0.0", "--data-dir", "/data"]
# Mount the tenants file (hashed API keys) at /config/tenants.toml, e.g. -v /srv/loraserve:/config:ro.
CMD ["--tenants", "/config/tenants.toml"]
