#!/usr/bin/env bash
# Set up .venv with cellrcnn and everything it needs. torch/torchvision come unpinned from the registry (CUDA builds
# that also run on the CPU). histomicstk is installed without its declared requirements, which pull GDAL (it does not
# build without the system library); what cellrcnn uses of it needs only what setup.py lists.
#
# --with-girder also sets up .venv-girder: a Digital Slide Archive Girder server (Girder 3 with large_image,
# HistomicsUI, slicer_cli_web and girder_worker's Girder side on SecantusDB, and cellrcnn's plugin; no torch),
# which the tests start to check cellrcnn against real DSA parts. girder-worker<5 is the line whose Girder plugin
# works with Girder 3; without it slicer_cli_web cannot queue any task.
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q --no-deps 'histomicstk==1.4.0'
.venv/bin/python -m pip install -q -e '.[test]'
if [ "${1:-}" = "--with-girder" ]; then
  [ -x .venv-girder/bin/python ] || python3 -m venv .venv-girder
  .venv-girder/bin/python -m pip install -q --upgrade pip
  .venv-girder/bin/python -m pip install -q 'girder>=3.2.18,<5' girder-client 'girder-large-image==1.35.6' \
    'girder-large-image-annotation==1.35.6' 'histomicsui==1.8.1' 'girder-slicer-cli-web==1.5.14' \
    'large-image[tiff,tifffile,pil]' 'secantusdb==0.7.0b3' 'girder-worker[girder]<5'
  # cellrcnn's own Girder plugin (plugin/, no torch); Girder loads every installed plugin.
  .venv-girder/bin/python -m pip install -q -e plugin/
fi
