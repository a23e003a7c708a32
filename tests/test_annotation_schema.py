"""Our DSA documents against the real large_image annotation JSON schema (the only schema check: no hand-copied
subset of it elsewhere).

The schema lives in the Girder plugin ``girder-large-image-annotation`` (``AnnotationSchema.annotationSchema``,
validated server-side with a jsonschema Draft6Validator). The plugin runs in the DSA's Girder environment, without
torch, not in cellrcnn's: the schema is read from the Girder environment the real-server tests use
(``cellrcnn.devstack.local_girder.girder_python()``: ``CELLRCNN_GIRDER_PYTHON``, else the checkout's
``.venv-girder``), or
from this environment when the plugin is importable here. Without either (an optional install) the module is
skipped. jsonschema is required (girder-slicer-cli-web, in setup.py, needs it).
"""

import copy
import json
import subprocess

import jsonschema
import numpy as np
import pytest

from cellrcnn.annotation import detections_to_annotation
from cellrcnn.density import density_annotation
from cellrcnn.devstack.local_girder import girder_python
from cellrcnn.nuclei_map import nuclei_map_annotation
from cellrcnn.nuclei_pixelmap import pixelmap_annotation
from cellrcnn.tissue import TissueMask
from cellrcnn.tissue_outline import tissue_outline_annotation


def _annotation_schema():
    try:
        from girder_large_image_annotation.models.annotation import AnnotationSchema
        return AnnotationSchema.annotationSchema
    except ImportError:
        python, why_not = girder_python()
        if python is None:
            pytest.skip(f'girder_large_image_annotation is not installed here: {why_not}', allow_module_level=True)
        code = ('import json; from girder_large_image_annotation.models.annotation import AnnotationSchema; '
                'print(json.dumps(AnnotationSchema.annotationSchema))')
        out = subprocess.run([python, '-c', code], capture_output=True, text=True, check=True, timeout=120)
        return json.loads(out.stdout.strip().splitlines()[-1])


VALIDATOR = jsonschema.Draft6Validator(_annotation_schema())

BOXES = np.array([[10, 20, 30, 50], [100.25, 200.5, 112.75, 211], [0, 0, 5, 5]], dtype=np.float32)
SCORES = np.array([0.98766, 0.5, 0.123456], dtype=np.float32)


def validate(doc):
    VALIDATOR.validate(doc)
    # What the server receives is JSON: it must survive a round trip unchanged.
    round_trip = json.loads(json.dumps(doc, allow_nan=False))
    assert round_trip == doc
    VALIDATOR.validate(round_trip)


def density_doc(**kwargs):
    boxes = np.array([[10, 10, 20, 20], [500, 300, 520, 330], [505, 305, 515, 315]])
    return density_annotation(boxes, (1000, 600), 0.5, cell_size_um=50, **kwargs)


def test_rectangle_annotation_is_valid():
    validate(detections_to_annotation(BOXES, SCORES))
    validate(detections_to_annotation(BOXES, SCORES, labels=[1, 2, 'tumor'], name='x',
                                      attributes={'model': 'm.pt', 'params': {'a': 1}},
                                      fill_color='rgba(0,255,0,0.25)', line_color='#00ff00'))


def test_point_annotation_is_valid():
    validate(detections_to_annotation(BOXES, SCORES, element_type='point'))
    validate(detections_to_annotation(BOXES, SCORES, element_type='point', line_color='#ff0000',
                                      fill_color='rgba(255,0,0,0.5)'))


def test_empty_annotation_is_valid():
    validate(detections_to_annotation(np.zeros((0, 4)), []))


@pytest.mark.parametrize('kwargs', [{}, {'scale_with_zoom': False}, {'interpretation': 'contour'},
                                    {'max_density': 1234.5}])
def test_density_annotation_is_valid(kwargs):
    doc = density_doc(**kwargs)
    validate(doc)
    el = doc['elements'][0]
    # The server computes the element's bounding box from origin, dx, dy, gridWidth.
    assert len(el['origin']) == 3 and el['dx'] > 0 and el['dy'] > 0
    assert len(el['values']) % el['gridWidth'] == 0


def test_nuclei_map_is_valid():
    colors = {'lymphocyte': '#3c78d8', 'tumour': 'rgb(224, 64, 58)'}
    typed = nuclei_map_annotation(BOXES, [0, 1, 0], list(colors), colors, attributes={'model': 'm.pt'})
    validate(typed)
    assert [(e['label']['value'], len(e['points'])) for e in typed['elements']] == [('lymphocyte', 2), ('tumour', 1)]
    assert typed['elements'][0]['colorRange'][-1] == 'rgba(60,120,216,0.9)'
    validate(nuclei_map_annotation(BOXES, visible=False))
    validate(nuclei_map_annotation(np.zeros((0, 4))))


def test_nuclei_pixelmap_is_valid():
    """Once large_image has put the label image's item id in place of the output's name."""
    colors = {'lymphocyte': '#0000ff', 'stromal': 'rgb(0,160,0)'}
    validate(pixelmap_annotation('0123456789abcdef01234567', 3, [0, 1, 0], list(colors), colors,
                                 attributes={'model': 'm.pt'}))
    validate(pixelmap_annotation('0123456789abcdef01234567', 0, visible=False))


def test_tissue_outline_is_valid():
    """A piece with a hole, a piece without, a mark; and no tissue at all."""
    mask = np.zeros((40, 60), bool)
    mask[2:30, 2:30] = True
    mask[10:20, 10:20] = False
    mask[5:15, 40:50] = True
    marks = np.zeros_like(mask)
    marks[34:40, :] = True
    doc = tissue_outline_annotation(TissueMask(mask, 8.0, 8.0, 0.5, marks), (0, 0, 480, 320), 2.0,
                                    attributes={'model': 'm.pt'})
    validate(doc)
    assert sorted(len(e.get('holes', ())) for e in doc['elements']) == [0, 0, 1]
    validate(tissue_outline_annotation(TissueMask(np.zeros((4, 4), bool), 8.0, 8.0, 0.5), (0, 0, 32, 32), 1.0))


def test_empty_density_annotation_is_valid():
    validate(density_annotation(np.zeros((0, 4)), (1000, 600), 0.5))


def broken_documents():
    rect = detections_to_annotation(BOXES, SCORES)
    grid = density_doc()
    cases = []

    def case(base, change):
        doc = copy.deepcopy(base)
        change(doc)
        cases.append(doc)

    case(rect, lambda d: d['elements'][0].update(score=0.5))            # unknown element key
    case(rect, lambda d: d['elements'][0].update(lineColor='green'))    # not a DSA colour
    case(rect, lambda d: d['elements'][0].update(center=[1, 2]))        # needs x, y, z
    case(rect, lambda d: d['elements'][0].update(width=-1))
    case(rect, lambda d: d.update(name=''))
    case(rect, lambda d: d.update(score=1))                              # unknown top-level key
    case(grid, lambda d: d['elements'][0].update(interpretation='density'))
    case(grid, lambda d: d['elements'][0].update(gridWidth=0))
    case(grid, lambda d: d['elements'][0].update(values=['1']))
    case(grid, lambda d: d['elements'][0].update(colorRange=['red']))
    case(grid, lambda d: d['elements'][0].pop('gridWidth'))
    return cases


@pytest.mark.parametrize('doc', broken_documents())
def test_broken_documents_are_rejected(doc):
    with pytest.raises(jsonschema.ValidationError):
        VALIDATOR.validate(doc)
