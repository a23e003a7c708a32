# The cellrcnn task image for the Digital Slide Archive: slicer_cli_web's entrypoint over cli/, with the bundled model.
#
#   docker build -t cellrcnn .
#   docker run --rm cellrcnn --list_cli
#   docker run --rm --gpus all -v /data:/data cellrcnn CellDetection /data/slide.svs /data/nuclei.anot
#
# BASE_IMAGE: any Debian-like image with Python 3.10+ and python3-venv (default: the official python:3.11-slim).
# Where Docker Hub cannot be reached, a base made from Debian packages stands in:
#   mmdebstrap --variant=minbase --include=python3,python3-venv,python3-dev,ca-certificates bookworm base.tar
#   docker import base.tar cellrcnn-base && docker build --build-arg BASE_IMAGE=cellrcnn-base -t cellrcnn .
# A site whose package index sits behind its own certificate authority passes that bundle as a build secret
# (DOCKER_BUILDKIT=1 docker build --secret id=ca_bundle,src=/etc/ssl/certs/ca-certificates.crt ...); it is used for
# the install only and is not kept in the image.
#
# Every Python package but torch comes at the version image-constraints.txt pins (pip reads it as PIP_CONSTRAINT).
# torch comes unpinned from PyPI: its Linux wheels are CUDA builds that carry their own CUDA libraries, so the image
# needs only the host's NVIDIA driver (which girder_worker mounts because of the label below) and falls back to the
# CPU where there is no GPU.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

LABEL com.nvidia.volumes.needed="nvidia_driver"
LABEL org.opencontainers.image.title="cellrcnn" \
      org.opencontainers.image.description="Faster R-CNN cell detection for whole-slide images (DSA task)" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PATH=/opt/cellrcnn/.venv/bin:$PATH

WORKDIR /opt/cellrcnn
COPY . /opt/cellrcnn
# pylibtiff (large-image[tiff]) has no wheel: it compiles against libtiff, so the compiler is there for the install
# and removed after it (libtiff stays: the compiled module loads it)
RUN --mount=type=secret,id=ca_bundle \
    if [ -s /run/secrets/ca_bundle ]; then export PIP_CERT=/run/secrets/ca_bundle \
        SSL_CERT_FILE=/run/secrets/ca_bundle REQUESTS_CA_BUNDLE=/run/secrets/ca_bundle; fi \
    && apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev libtiff6 \
    && PIP_CONSTRAINT=/opt/cellrcnn/image-constraints.txt ./install.sh && cli/self-check.sh \
    && apt-get purge -y --auto-remove gcc libc6-dev && rm -rf /var/lib/apt/lists/* /root/.cache

# The tasks run as a user of their own, not root: girder_worker makes its temporary volumes writable by any user,
# and nothing in /opt/cellrcnn needs writing at run time.
RUN useradd --system --create-home --home-dir /home/cellrcnn --uid 10001 --user-group cellrcnn
USER cellrcnn
WORKDIR /opt/cellrcnn/cli
ENTRYPOINT ["python", "-m", "slicer_cli_web.cli_list_entrypoint"]
