"""Helpers of the tests of cellrcnn against a real Girder (tests/test_girder_posting.py,
tests/test_girder_commands.py): nuclei documents, their files, the cellrcnn results on an item."""

import numpy as np

from cellrcnn.annotation import detections_to_annotation, write_annotation


def nuclei(n, model='test.pt', seed=0, name='cellrcnn nuclei'):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 600, (n, 2))
    return detections_to_annotation(np.hstack([xy, xy + 9]), rng.uniform(0.5, 1, n), name=name,
                                    attributes={'model': model, 'cellrcnn': '0.1.0'})


def saved(tmp_path, *docs):
    paths = []
    for i, doc in enumerate(docs):
        paths.append(str(tmp_path / f'doc{i}.anot'))
        write_annotation(doc, paths[-1])
    return paths


def cellrcnn_annotations(server, item_id):
    return [a for a in server.annotations(item_id) if 'cellrcnn' in a['annotation'].get('attributes', {})]
