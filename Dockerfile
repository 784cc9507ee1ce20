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
# --model is required: without it (and with --tenants) the server refuses to start and says so.
# `--model embedded` serves the tiny built-in test model explicitly: random weights, answers are
# noise; for smoke tests only.
#
# Build args: PYTHON_IMAGE (any image with python3.11+ and pip on PATH) and TORCH_INDEX (a
# package index with torch==TORCH_VERSION and its dependencies). scripts/docker_smoke.sh builds
# and runs this file with a debootstrap base image and a loopback index serving the torch wheel.

ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

# HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE: models come from /models only; nothing reaches a network.
# LORASERVE_CACHE: where `--model embedded` (the random-weight test model) is built (writable).
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
# Every folder pyproject.toml maps into the one `loraserve` package (tests/packaging checks the
# list); a non-editable install, so nothing is read from /src at run time.
COPY loraserve ./loraserve
COPY server ./server
COPY adapters ./adapters
COPY client ./client
COPY bench ./bench
COPY finetune ./finetune
COPY testing ./testing
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

# Asks the standard gRPC health service on the host and port the server was started with (it
# reads PID 1's command line, so `docker run ... --port 6000` is followed; --port 0 too).
# Plain-text only: a server started with TLS needs a probe that presents its CA instead.
# start-period leaves time to load the base model.
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-m", "loraserve.server.healthcheck"]

ENTRYPOINT ["loraserve", "serve", "--host", "0.0.0.0", "--data-dir", "/data"]
# Mount the tenants file (hashed API keys) at /config/tenants.toml, e.g. -v /srv/loraserve:/config:ro.
CMD ["--tenants", "/config/tenants.toml"]
