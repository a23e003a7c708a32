#!/usr/bin/env bash
# Set up .venv with cellrcnn and everything it needs. torch/torchvision come unpinned from the registry (CUDA builds
# that also run on the CPU). histomicstk is installed without its declared requirements, which pull GDAL (it does not
# build without the system library); what cellrcnn uses of it needs only what setup.py lists.
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q --no-deps 'histomicstk==1.4.0'
.venv/bin/python -m pip install -q -e '.[test]'
