# The cellrcnn task image for the Digital Slide Archive: slicer_cli_web's entrypoint over cli/, with the bundled model.
#
#   docker build -t cellrcnn .
#   docker run --rm cellrcnn --list_cli
#   docker run --rm --gpus all -v /data:/data cellrcnn CellDetection /data/slide.svs /data/nuclei.anot
#
# torch comes unpinned from PyPI: its Linux wheels are CUDA builds that carry their own CUDA libraries, so the image
# needs only the host's NVIDIA driver (which girder_worker mounts because of the label below) and falls back to the
# CPU where there is no GPU.
FROM python:3.11-slim

LABEL com.nvidia.volumes.needed="nvidia_driver"
LABEL org.opencontainers.image.title="cellrcnn" \
      org.opencontainers.image.description="Faster R-CNN cell detection for whole-slide images (DSA task)" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PATH=/opt/cellrcnn/.venv/bin:$PATH

WORKDIR /opt/cellrcnn
COPY . /opt/cellrcnn
RUN ./install.sh && cli/self-check.sh

WORKDIR /opt/cellrcnn/cli
ENTRYPOINT ["python", "-m", "slicer_cli_web.cli_list_entrypoint"]
