# syntax=docker/dockerfile:1
#
# codestream's two images, from one file (docs/DEPLOY.md, "Build the images"):
#
#   docker build --target gateway -t REGISTRY/codestream-gateway:0.1.0 .
#   docker build --target worker  -t REGISTRY/codestream-worker:0.1.0 .
#
# gateway: Python slim, the package without its `worker` extra: no torch, no CUDA (about 250 MB).
# worker:  NVIDIA's CUDA base image, torch (whose wheels carry the CUDA user-space libraries), the package
#          with its `worker` extra, and a C compiler: Triton builds its small kernel-launcher module at
#          first use. The NVIDIA driver comes from the node (NVIDIA container toolkit / device plugin).
#
# Both run as the numeric, non-root user 10001, with a read-only root filesystem in mind: every path
# written at run time (caches, /tmp) is an environment variable pointing at a volume the manifests
# mount. No model is baked in: it comes read-only from a volume (CODESTREAM_MODEL=/models/...), and
# HF_HUB_OFFLINE=1 makes a missing file an error instead of a download: nothing is fetched at run time.

ARG PYTHON_IMAGE=docker.io/library/python:3.12-slim-bookworm
# torch 2.13 from PyPI is built for CUDA 13: nodes need an NVIDIA driver >= 580. For an older driver,
# build with a cu12x torch (TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128) and a 12.x CUDA_IMAGE.
ARG CUDA_IMAGE=docker.io/nvidia/cuda:13.0.1-base-ubuntu24.04
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://pypi.org/simple

# ------------------------------------------------------------------------------------------------ wheel
# Build codestream's wheel once; both images install it (no sources, no build tools in them).
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY codestream ./codestream
COPY protos ./protos
COPY gateway ./gateway
COPY worker ./worker
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# ---------------------------------------------------------------------------------------------- gateway
FROM ${PYTHON_IMAGE} AS gateway
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/codestream \
    PATH=/opt/codestream/bin:$PATH
COPY --from=wheel /wheels /wheels
# The base dependencies only: grpcio, protobuf, redis, tokenizers, structlog, prometheus-client.
RUN python -m venv /opt/codestream \
    && pip install /wheels/codestream-*.whl \
    && rm -rf /wheels \
    && python -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is not None)" \
    && groupadd --gid 10001 codestream \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /var/cache/codestream \
       --shell /usr/sbin/nologin codestream
ENV HOME=/var/cache/codestream \
    XDG_CACHE_HOME=/var/cache/codestream \
    CODESTREAM_CACHE_DIR=/var/cache/codestream/codestream \
    HF_HOME=/var/cache/codestream/huggingface \
    HF_HUB_OFFLINE=1 \
    CODESTREAM_LOG_FORMAT=json
USER 10001:10001
EXPOSE 50051 9090
ENTRYPOINT ["codestream"]
CMD ["gateway"]

# ----------------------------------------------------------------------------------------------- worker
FROM ${CUDA_IMAGE} AS worker
ARG TORCH_VERSION
ARG TORCH_INDEX_URL
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/codestream \
    PATH=/opt/codestream/bin:$PATH
# Python 3.12 (Ubuntu 24.04's); gcc, libc headers and Python's headers for Triton's launcher module.
# Versions are the base image's distribution's current ones (pinning them breaks the build as soon as
# the archive moves on); rebuild the image to take security updates.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
COPY --from=wheel /wheels /wheels
# torch first, from its index (PyPI's build is CUDA 13), then codestream with its `worker` extra.
RUN python3 -m venv /opt/codestream \
    && pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
    && pip install "$(ls /wheels/codestream-*.whl)[worker]" \
    && rm -rf /wheels \
    && groupadd --gid 10001 codestream \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /var/cache/codestream \
       --shell /usr/sbin/nologin codestream
# The writable places (emptyDir volumes in the manifests): HOME, the XDG cache (torch, Hugging Face),
# Triton's kernel cache, codestream's own cache; /tmp is a volume too.
ENV HOME=/var/cache/codestream \
    XDG_CACHE_HOME=/var/cache/codestream \
    CODESTREAM_CACHE_DIR=/var/cache/codestream/codestream \
    HF_HOME=/var/cache/codestream/huggingface \
    TRITON_CACHE_DIR=/var/cache/codestream/triton \
    HF_HUB_OFFLINE=1 \
    CODESTREAM_LOG_FORMAT=json \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
EXPOSE 9090
ENTRYPOINT ["codestream"]
CMD ["worker"]
