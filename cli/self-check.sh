#!/usr/bin/env bash
# The checks the Docker image runs at build time (CI runs them too, outside Docker): the task list, the task's XML,
# and a small detection on the bundled sample slide, all through slicer_cli_web's entrypoint as a DSA worker calls it.
set -euo pipefail
cd "$(dirname "$0")"
python=${PYTHON:-python}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
listing=$($python -m slicer_cli_web.cli_list_entrypoint --list_cli)
grep -q CellDetection <<< "$listing"
xml=$($python -m slicer_cli_web.cli_list_entrypoint CellDetection --xml)
grep -q outputCellAnnotationFile <<< "$xml"
$python -m slicer_cli_web.cli_list_entrypoint CellDetection ../detector/cellrcnn/data/CMU-1-Small-Region.svs \
    "$out/nuclei.anot" --outputDensityAnnotationFile "$out/density.anot" --analysis_roi 512,1024,768,768 \
    --device cpu > "$out/log"
grep -q '<filter-end>' "$out/log"
$python -c "import json, sys; d = json.load(open(sys.argv[1])); assert d['elements'], 'no nuclei found'; \
print('self-check: CellDetection found', len(d['elements']), 'nuclei in the sample region')" "$out/nuclei.anot"
