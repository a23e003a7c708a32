#!/usr/bin/env bash
# Set up .venv with cellrcnn and everything it needs. torch/torchvision come unpinned from the registry (CUDA builds
# that also run on the CPU). histomicstk is installed without its declared requirements, which pull GDAL (it does not
# build without the system library); what cellrcnn uses of it needs only what setup.py lists.
#
# --with-girder also sets up .venv-girder: a Digital Slide Archive Girder server (Girder 3 with large_image,
# HistomicsUI, slicer_cli_web and girder_worker's Girder side on SecantusDB, and cellrcnn's plugin; no torch),
# which the tests start to check cellrcnn against real DSA parts. girder-worker<5 is the line whose Girder plugin
# works with Girder 3; without it slicer_cli_web cannot queue any task.
#
# --with-dsa also sets up the rest of a whole DSA on this machine (cellrcnn.devstack.local_dsa; `cellrcnn dsa up` starts it,
# tests/test_dsa.py and tests/test_histomicsui.py use it): Debian's docker.io, redis-server, chromium, mmdebstrap and
# busybox-static (installed with apt-get when missing, which needs root), HistomicsUI's web client built with
# `girder build`, Playwright, and the task image built from this checkout's Dockerfile (`cellrcnn dsa build`).
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q --no-deps 'histomicstk==1.4.0'
.venv/bin/python -m pip install -q -e '.[test]'
if [ "${1:-}" = "--with-girder" ] || [ "${1:-}" = "--with-dsa" ]; then
  [ -x .venv-girder/bin/python ] || python3 -m venv .venv-girder
  .venv-girder/bin/python -m pip install -q --upgrade pip
  .venv-girder/bin/python -m pip install -q 'girder>=3.2.18,<5' girder-client 'girder-large-image==1.35.6' \
    'girder-large-image-annotation==1.35.6' 'histomicsui==1.8.1' 'girder-slicer-cli-web==1.5.14' \
    'large-image[tiff,tifffile,pil]' 'secantusdb==0.7.0b3' 'girder-worker[girder]<5' redis
  # cellrcnn's own Girder plugin (plugin/, no torch); Girder loads every installed plugin.
  .venv-girder/bin/python -m pip install -q -e plugin/
fi
if [ "${1:-}" = "--with-dsa" ]; then
  missing=""
  for need in dockerd:docker.io redis-server:redis-server chromium:chromium mmdebstrap:mmdebstrap \
              busybox:busybox-static npm:npm; do
    command -v "${need%%:*}" >/dev/null || missing="$missing ${need#*:}"
  done
  [ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || missing="$missing fonts-dejavu-core"
  if [ -n "$missing" ]; then
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
      echo "install.sh: error: the local DSA needs these Debian packages:$missing (apt-get install them as root)" >&2
      exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $missing >/dev/null
  fi
  .venv/bin/python -m pip install -q -e '.[test,dsa]'
  # HistomicsUI's web client. Two fixes make its page render (without them it stays blank or shows Girder's welcome
  # page; docs/deploy.md):
  # 1. Girder's webpack config leaves everything under node_modules untranspiled, and `girder build` puts Girder's
  #    own @girder/core there: its exports stay read-only and large_image's `rest.restRequest = ...` throws. Let
  #    babel transpile @girder/core.
  # 2. npm would give HistomicsUI a nested Backbone of its own (a peer dependency of backbone.localstorage) whose
  #    router never starts, so /histomics#?image=ID never opens the slide: install peer dependencies the legacy way.
  webpack_config=$(.venv-girder/bin/python -c 'import girder, os; print(os.path.join(os.path.dirname(girder.__file__),
    "web_client", "grunt_tasks", "webpack.config.js"))')
  sed -i 's#exclude: /node_modules/$#exclude: /node_modules\\/(?!@girder\\/core\\/)/#' "$webpack_config"
  if [ ! -e .venv-girder/share/girder/static/built/girder_app.min.js ]; then
    (cd .venv-girder && npm_config_ignore_scripts=true npm_config_legacy_peer_deps=true \
      NODE_OPTIONS=--openssl-legacy-provider bin/girder build >build-web-client.log 2>&1) ||
      { tail -20 .venv-girder/build-web-client.log >&2; echo "install.sh: error: girder build failed" >&2; exit 1; }
  fi
  .venv/bin/cellrcnn dsa build
fi
