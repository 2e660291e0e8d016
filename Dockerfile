# syntax=docker/dockerfile:1
# One image for every segcore pipeline step: the `segcore` CLI, the library, the Kubeflow
# components/pipelines and the kfp SDK the pipelines are compiled with (a compiled step runs
# `python3 -m kfp.dsl.executor_main ...` in this image). The CPU build of torch by default; a
# CUDA build for GPU nodes with TORCH_VARIANT (a wheel flavour of download.pytorch.org/whl).
#
#   docker build -t segcore .                       # torch CPU wheel from TORCH_INDEX_URL
#   docker build --build-arg TORCH_VARIANT=cu128 -t segcore:cu128 .   # CUDA 12.8 torch, for GPU steps
#   docker build --build-context wheels=DIR -t segcore .   # torch wheel(s) handed in from DIR
#   scripts/build_image.sh                          # buildah + podman, no Docker engine (see there)
#
# Layers go from the least to the most often changed: venv + torch, the dependencies listed in
# pyproject.toml, then the source (installed with --no-deps), so editing code rebuilds only the last.

ARG BASE_IMAGE=python:3.11-slim-bookworm

# Optional local wheels (e.g. torch-2.13.0+cpu): replace this empty stage with
# `--build-context wheels=DIR`. pip weighs them with TORCH_INDEX_URL's and PyPI's; a `+cpu`
# build sorts above PyPI's plain (CUDA) one of the same version.
FROM scratch AS wheels

FROM ${BASE_IMAGE}

ARG BASE_IMAGE
# TORCH_VARIANT: cpu (default, what CI builds and smoke-tests) or a CUDA flavour (cu126, cu128, ...)
# for GPU nodes. TORCH_INDEX_URL: an extra index for that build (empty: none, torch must then come
# from the wheels context). The build checks that torch is the variant asked for: PyPI's plain
# Linux torch is a CUDA build, and a CPU image must not ship it by accident (nor the reverse).
ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}

LABEL org.opencontainers.image.title="segcore" \
      org.opencontainers.image.description="Semantic segmentation MLOps: Lite-HRNet training, evaluation, export and Kubeflow pipeline steps (torch ${TORCH_VARIANT})" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SEGCORE_TORCH_VARIANT=${TORCH_VARIANT}

# 1. virtualenv + torch: the biggest layer, changes only with TORCH_VERSION / _VARIANT / _INDEX_URL.
RUN --mount=type=bind,from=wheels,target=/tmp/wheels \
    python3 -m venv "$VIRTUAL_ENV" \
    && PIP_EXTRA_INDEX_URL="$TORCH_INDEX_URL" \
        pip install --no-cache-dir --progress-bar off --find-links /tmp/wheels "torch==${TORCH_VERSION}" \
    && python3 -c "import os, torch; v = os.environ['SEGCORE_TORCH_VARIANT']; assert (torch.version.cuda is None) == (v == 'cpu'), f'torch {torch.__version__} is not a {v} build'"

# 2. the runtime dependencies from pyproject.toml (kfp pinned to the version that compiles the
#    pipelines), without the source: rebuilt only when pyproject.toml changes.
COPY pyproject.toml /tmp/segcore/pyproject.toml
RUN --mount=type=bind,from=wheels,target=/tmp/wheels \
    python3 -c "import tomllib; print('\n'.join(tomllib.load(open('/tmp/segcore/pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && PIP_EXTRA_INDEX_URL="$TORCH_INDEX_URL" \
        pip install --no-cache-dir --progress-bar off --find-links /tmp/wheels -r /tmp/requirements.txt \
    && python3 -c "import os, torch; v = os.environ['SEGCORE_TORCH_VARIANT']; assert (torch.version.cuda is None) == (v == 'cpu'), f'torch {torch.__version__} is not a {v} build'" \
    && rm /tmp/requirements.txt

# Non-root user (numeric, so Kubernetes' runAsNonRoot can verify it). HOME and the folders the
# Kubeflow launcher stages artifacts in (/gcs, /minio, /s3, /oci) are writable by it and by group
# 0, for clusters that run images under an arbitrary UID.
RUN groupadd --gid 10001 segcore \
    && useradd --uid 10001 --gid 10001 --no-log-init --home-dir /home/segcore --shell /bin/sh segcore \
    && install -d -o 10001 -g 0 -m 2775 /home/segcore /gcs /minio /s3 /oci

# 3. the source: segcore + components + pipelines, no dependency resolution.
COPY README.md /tmp/segcore/README.md
COPY segcore /tmp/segcore/segcore
COPY components /tmp/segcore/components
COPY pipelines /tmp/segcore/pipelines
RUN pip install --no-cache-dir --no-deps /tmp/segcore \
    && pip check \
    && rm -rf /tmp/segcore

ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"

USER 10001:10001
ENV HOME=/home/segcore
WORKDIR /home/segcore
CMD ["segcore", "--help"]
