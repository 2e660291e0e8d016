# syntax=docker/dockerfile:1
# One image for every segcore pipeline step: the `segcore` CLI, the library, the Kubeflow
# components/pipelines and the kfp SDK the pipelines are compiled with (a compiled step runs
# `python3 -m kfp.dsl.executor_main ...` in this image). CPU only.
#
#   docker build -t segcore .                       # torch CPU wheel from TORCH_INDEX_URL
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
# TORCH_INDEX_URL: an extra index for torch's CPU build (empty: none, torch must then come from
# the wheels context; PyPI's Linux torch is the CUDA build and the build fails rather than ship it).
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

LABEL org.opencontainers.image.title="segcore" \
      org.opencontainers.image.description="Semantic segmentation MLOps: Lite-HRNet training, evaluation, export and Kubeflow pipeline steps (CPU)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# 1. virtualenv + CPU torch: the biggest layer, changes only with TORCH_VERSION / TORCH_INDEX_URL.
RUN --mount=type=bind,from=wheels,target=/tmp/wheels \
    python3 -m venv "$VIRTUAL_ENV" \
    && PIP_EXTRA_INDEX_URL="$TORCH_INDEX_URL" \
        pip install --no-cache-dir --progress-bar off --find-links /tmp/wheels "torch==${TORCH_VERSION}" \
    && python3 -c "import torch; assert torch.version.cuda is None, 'not a CPU torch: ' + torch.__version__"

# 2. the runtime dependencies from pyproject.toml (kfp pinned to the version that compiles the
#    pipelines), without the source: rebuilt only when pyproject.toml changes.
COPY pyproject.toml /tmp/segcore/pyproject.toml
RUN --mount=type=bind,from=wheels,target=/tmp/wheels \
    python3 -c "import tomllib; print('\n'.join(tomllib.load(open('/tmp/segcore/pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && PIP_EXTRA_INDEX_URL="$TORCH_INDEX_URL" \
        pip install --no-cache-dir --progress-bar off --find-links /tmp/wheels -r /tmp/requirements.txt \
    && python3 -c "import torch; assert torch.version.cuda is None, 'not a CPU torch: ' + torch.__version__" \
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
