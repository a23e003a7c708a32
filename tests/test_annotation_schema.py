"""Our DSA documents against the real large_image annotation JSON schema.

The schema lives in the Girder plugin ``girder-large-image-annotation``
(``AnnotationSchema.annotationSchema``, validated server-side with a jsonschema
Draft6Validator). The plugin (with girder) is not a cellrcnn dependency, so this
module is skipped where it is not installed. To run it, in a separate environment:

    python3 -m venv /tmp/girderenv
    /tmp/girderenv/bin/pip install 'girder>=3.2.18,<5' 'girder-large-image-annotation==1.35.6' \
        jsonschema pytest
    /tmp/girderenv/bin/pip install --no-deps -e .
    /tmp/girderenv/bin/python -m pytest --noconftest tests/test_annotation_schema.py

(``--noconftest``: tests/conftest.py imports torch, which that environment lacks;
cellrcnn.annotation and cellrcnn.outputs do not need it.)
"""

import copy
import json

import numpy as np
import pytest

pytest.importorskip('girder_large_image_annotation')
jsonschema = pytest.importorskip('jsonschema')
annotation_model = pytest.importorskip('girder_large_image_annotation.models.annotation')

from cellrcnn.annotation import detections_to_annotation  # noqa: E402
from cellrcnn.outputs import density_annotation  # noqa: E402

VALIDATOR = jsonschema.Draft6Validator(annotation_model.AnnotationSchema.annotationSchema)

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
