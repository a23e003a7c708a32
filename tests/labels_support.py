"""Helpers of the tests of cellrcnn.labels (tests/test_labels_*.py): where the shared labelled data is (``SHARED``,
``needs_data``), and label files in the tools' formats written at test time (ImageScope XML, QuPath GeoJSON
features)."""

import os
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest


def _shared_data():
    """``<repo>/../shared/data`` (where CI has it), else $CELLRCNN_SHARED_DATA."""
    beside = Path(__file__).resolve().parents[1].parent / 'shared' / 'data'
    if beside.is_dir():
        return beside
    env = os.environ.get('CELLRCNN_SHARED_DATA')
    return Path(env) if env and Path(env).is_dir() else None


SHARED = _shared_data()
needs_data = pytest.mark.skipif(SHARED is None, reason='the shared labelled data (<repo>/../shared/data or '
                                                       '$CELLRCNN_SHARED_DATA) is not on this machine')


def imagescope_xml(layers, mpp=None):
    """ImageScope XML text: ``layers`` is [(layer name, [(region attributes, [(x, y), ...]), ...])]."""
    root = ET.Element('Annotations', {'MicronsPerPixel': str(mpp)} if mpp else {})
    for i, (layer_name, regions) in enumerate(layers):
        layer = ET.SubElement(root, 'Annotation', {'Id': str(i + 1), 'Name': layer_name, 'Type': '4'})
        ET.SubElement(ET.SubElement(layer, 'Attributes'), 'Attribute', {'Name': 'Description', 'Value': ''})
        container = ET.SubElement(layer, 'Regions')
        ET.SubElement(container, 'RegionAttributeHeaders')
        for j, (attributes, vertices) in enumerate(regions):
            region = ET.SubElement(container, 'Region', {'Id': str(j + 1), 'Type': '0', **attributes})
            ET.SubElement(region, 'Attributes')
            vs = ET.SubElement(region, 'Vertices')
            for x, y in vertices:
                ET.SubElement(vs, 'Vertex', {'X': str(x), 'Y': str(y), 'Z': '0'})
    return ET.tostring(root, encoding='unicode')


def feature(geometry_type, coordinates, cls=None, object_type='annotation', legacy_class=False, **extra):
    properties = {'objectType': object_type}
    if cls:
        properties['classification'] = cls if legacy_class else {'name': cls, 'color': [255, 0, 0]}
    return {'type': 'Feature', 'id': 'a1b2', 'geometry': {'type': geometry_type, 'coordinates': coordinates},
            'properties': properties, **extra}
