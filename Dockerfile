# syntax=docker/dockerfile:1.7
#
# Two images from one list of pins (pyproject.toml), one target each:
#
#   docker build --target api -t fgd-service-api:0.1.0 .
#       the REST service (uvicorn service.main:app) and the MLflow server; no torch
#   docker build --target ray -t fgd-service-ray:0.1.0 .
#       a Ray node, head or worker: Ray, torch (CPU build) and the workers
#
# A CUDA Ray node: the Ray image's GPU variant and a CUDA build of torch, e.g.
#   docker build --target ray --build-arg RAY_VARIANT=gpu \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
#       -t fgd-service-ray-gpu:0.1.0 .
#
# The versions below are checked against pyproject.toml, docker-compose.yml and deploy/k8s by
# tests/test_deploy_versions.py.

ARG PYTHON_VERSION=3.11
ARG RAY_VERSION=2.60.0
ARG RAY_PY=py311
# cpu, or gpu / cuXXX (a rayproject/ray tag suffix)
ARG RAY_VARIANT=cpu
ARG FGD_VERSION=0.1.0
ARG PIP_VERSION=25.3

# --- the pinned requirements of each target, read from pyproject.toml ------------------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS requirements
WORKDIR /src
COPY pyproject.toml ./
COPY deploy/docker/requirements.py deploy/docker/
RUN python deploy/docker/requirements.py api > requirements-api.txt \
    && python deploy/docker/requirements.py ray > requirements-ray.txt

# --- the project's source, installed with --no-deps by both targets ---------------------------
FROM scratch AS source
COPY pyproject.toml README.md /src/
COPY fgd_core /src/fgd_core
COPY workers /src/workers
COPY service /src/service
COPY fgd_cli /src/fgd_cli

# --- api: the service and the MLflow server (torch-free) --------------------------------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS api
ARG FGD_VERSION
ARG PIP_VERSION
LABEL org.opencontainers.image.title="fgd-service-api" \
      org.opencontainers.image.version="${FGD_VERSION}"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FGD_HOME=/fgd
# uid 1000, group users (100): the same owner as the Ray image's `ray` user, so both write
# the shared data volume.
RUN useradd --uid 1000 --gid 100 --create-home --shell /usr/sbin/nologin fgd \
    && mkdir -p /fgd/data \
    && chown -R 1000:100 /fgd
COPY --from=requirements /src/requirements-api.txt /tmp/requirements.txt
RUN pip install --upgrade "pip==${PIP_VERSION}" \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt
COPY --from=source /src /tmp/src
RUN pip install --no-deps /tmp/src && rm -rf /tmp/src
USER 1000:100
WORKDIR /home/fgd
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
CMD ["uvicorn", "service.main:app", "--host", "0.0.0.0", "--port", "8000"]

# --- ray: a Ray node (head or worker) with torch and the workers ------------------------------
FROM rayproject/ray:${RAY_VERSION}-${RAY_PY}-${RAY_VARIANT} AS ray
ARG FGD_VERSION
ARG PIP_VERSION
# torch==X matches X+cpu / X+cu128 from this index: a local version sorts above the plain one.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
LABEL org.opencontainers.image.title="fgd-service-ray" \
      org.opencontainers.image.version="${FGD_VERSION}"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FGD_HOME=/fgd
USER root
# g++ builds the native FGD loss kernels on first use (fgd.compile; about a second, cached in
# $FGD_HOME/cache/native); without it that path falls back to torch.compile, then eager.
# Mount points owned by `ray` (uid 1000): a fresh named volume takes this ownership.
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /fgd/data /tmp/ray \
    && chown -R 1000:100 /fgd /tmp/ray
USER ray
COPY --from=requirements --chown=1000:100 /src/requirements-ray.txt /tmp/requirements.txt
RUN pip install --upgrade "pip==${PIP_VERSION}" \
    && pip install --extra-index-url "${TORCH_INDEX_URL}" -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt
COPY --from=source --chown=1000:100 /src /tmp/src
RUN pip install --no-deps /tmp/src && rm -rf /tmp/src
WORKDIR /home/ray
EXPOSE 6379 8265 10001 52365
# The raylet of this node, through its dashboard agent (a head or a worker alike).
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:52365/api/local_raylet_healthz', timeout=4)"]
