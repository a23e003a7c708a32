"""``cellrcnn batch --girder-url --folder``: a Girder folder tree of slides on the session's real Girder (skipped
only without its optional virtualenv, tests/conftest.py): each result posted to its slide, replaced on a re-run,
downloads removed, Girder names that are not safe paths, replaced bytes, and the token kept off Dask workers."""

import os

import numpy as np
import pytest

from cellrcnn.devstack.local_girder import wait_for
from cellrcnn.nuclei_map import MAP_NAME
from cellrcnn.tissue_outline import TISSUE_NAME
from girder_support import cellrcnn_annotations
from support import run_batch


def girder_slides(server, synthetic_slide):
    """Two large-image items: one in the module's folder, one in a subfolder. :returns: {path: item id}."""
    gc = server.client()
    top, _ = server.upload_slide(synthetic_slide(640, 480, seed=41)[0], name='one.tiff')
    sub = gc.createFolder(server.folder_id, 'scans')
    file = gc.uploadFileToFolder(sub['_id'], str(synthetic_slide(640, 480, seed=42)[0]), filename='two.tiff')
    wait_for(lambda: gc.getItem(file['itemId']).get('largeImage', {}).get('fileId'), 60, 'the second large image')
    return {'one.tiff': top, 'scans/two.tiff': file['itemId']}


def test_a_girder_folder_cohort_posts_each_result_to_its_slide(server, synthetic_slide, tmp_path):
    items = girder_slides(server, synthetic_slide)
    output = tmp_path / 'out'
    girder = ('--girder-url', server.api_url, '--girder-token', server.token, '--folder', server.folder_id)
    code, out, err, rows = run_batch('-o', output, *girder)
    assert code == 0, err
    assert set(rows) == set(items)
    for path, item_id in items.items():
        row = rows[path]
        assert row['status'] == 'done' and row['girder_item_id'] == item_id and int(row['cells']) > 50
        assert 'posted to item' in row['note']
        found = cellrcnn_annotations(server, item_id)
        nuclei = [a for a in found if a['annotation']['attributes'].get('stats')]
        assert len(nuclei) == 1 and nuclei[0]['_elementCount'] == int(row['cells'])
        assert nuclei[0]['annotation']['attributes']['model'] == 'cellrcnn-default.pt'
        types = nuclei[0]['annotation']['attributes']['model_config']['cell_types']
        per_type = sorted(str(a['annotation']['attributes'].get('cell_type')) for a in found if a not in nuclei)
        # besides the nuclei: the map, the density, one density per type, the tissue outline
        assert len(types) == 3 and per_type == sorted(['None', 'None', 'None', *types])
        assert sum(a['annotation']['name'] == MAP_NAME for a in found) == 1
        (tissue,) = [a for a in found if a['annotation']['name'] == TISSUE_NAME]
        assert tissue['annotation']['attributes']['density']['tissue_mm2'] == pytest.approx(float(row['tissue_mm2']),
                                                                                          abs=0.01)
        assert (output / row['output']).is_dir()
    assert not any(f for _, _, f in os.walk(output / '.girder-cache'))  # downloads removed once posted

    code, out, _, again = run_batch('-o', output, *girder)
    assert code == 0 and all(r['status'] == 'skipped' for r in again.values())
    code, out, _, strict = run_batch('-o', output, '--threshold', '0.999', *girder)
    assert code == 0
    for path, item_id in items.items():
        assert strict[path]['status'] == 'done'
        found = cellrcnn_annotations(server, item_id)
        assert len(found) == 7  # the earlier result (nuclei, map, density, 3 per type, tissue) replaced, not doubled
        nuclei = [a for a in found if a['annotation']['attributes'].get('stats')]
        assert nuclei[0]['_elementCount'] == int(strict[path]['cells']) < int(rows[path]['cells'])


class UnsendableToken(str):
    """A Girder token that refuses to be pickled: it must never travel to a Dask cluster."""

    def __reduce__(self):
        raise TypeError('the Girder token was about to be sent to the Dask cluster')


def test_a_girder_cohort_on_dask_workers_keeps_the_token_here(server, synthetic_slide, tmp_path):
    """Workers run each slide's detection; downloading and posting, which need the token, stay in the client."""
    import pickle

    from cellrcnn.cohort import GirderFolder, batch
    from cellrcnn.settings import DetectionSettings

    gc = server.client()
    folder = gc.createFolder(server.collection_id, 'on-dask', parentType='collection')['_id']
    item_id, _ = server.upload_slide(synthetic_slide(480, 400, seed=44)[0], 'dask.tiff', folder_id=folder)
    token = UnsendableToken(server.token)
    with pytest.raises(TypeError, match='about to be sent'):
        pickle.dumps(token)
    rows = batch(None, str(tmp_path), DetectionSettings(device='cpu'), scheduler='local:1',
                 girder=GirderFolder(server.api_url, token, folder))
    [row] = rows
    assert row['status'] == 'done' and 'posted to item' in row['note'] and int(row['cells']) > 20
    nuclei = [a for a in cellrcnn_annotations(server, item_id) if a['annotation']['attributes'].get('stats')]
    assert [a['_elementCount'] for a in nuclei] == [int(row['cells'])]


def test_girder_names_holding_slashes_get_result_folders_of_their_own(server, synthetic_slide, tmp_path):
    """An item named ``x/y.tiff``, an item ``y.tiff`` in a folder ``x`` and an item ``x_y.tiff``: before, the first
    two shared ``OUT/slides/x/y.tiff``; now each result folder is a safe name ending in its item's id."""
    from cellrcnn.cohort import GirderFolder, girder_slides

    gc = server.client()
    top = gc.createFolder(server.collection_id, 'names', parentType='collection')['_id']  # apart from the others
    sub = gc.createFolder(top, 'x')['_id']
    path = synthetic_slide(320, 256, seed=43)[0]
    items = [server.upload_slide(path, name, folder_id=folder)[0]
             for name, folder in (('xy.tiff', top), ('y.tiff', sub), ('x_y.tiff', top))]
    assert gc.put(f'item/{items[0]}', parameters={'name': 'x/y.tiff'})['name'] == 'x/y.tiff'  # an upload drops 'x/'
    slides = girder_slides(GirderFolder(server.api_url, server.token, top), str(tmp_path))
    assert sorted(s.item_id for s in slides) == sorted(items)
    assert len({s.folder for s in slides}) == 3 and all(s.output.endswith(f'-{s.item_id}') for s in slides)
    assert all(s.folder.startswith(str(tmp_path / 'slides') + os.sep) for s in slides)


def test_a_girder_slide_whose_bytes_are_replaced_is_downloaded_and_computed_again(server, synthetic_slide, tmp_path):
    """Girder keeps a file's id when its bytes are replaced (``PUT file/{id}/contents``): the cohort knows the file
    by its id and version (size, created, updated, sha512), so the new bytes are downloaded and detected again."""
    gc = server.client()
    folder = gc.createFolder(server.collection_id, 'replaced', parentType='collection')['_id']
    item_id, file_id = server.upload_slide(synthetic_slide(320, 256, seed=44)[0], 'scan.tiff', folder_id=folder)
    girder = ('--girder-url', server.api_url, '--girder-token', server.token, '--folder', folder)
    code, _, err, first = run_batch('-o', tmp_path, '--tile-size', '256', *girder)
    assert code == 0 and first['scan.tiff']['status'] == 'done', err
    other = synthetic_slide(480, 384, seed=45)[0]
    with open(other, 'rb') as f:
        gc.uploadFileContents(file_id, f, os.path.getsize(other))
    code, _, err, second = run_batch('-o', tmp_path, '--tile-size', '256', *girder)
    assert code == 0 and second['scan.tiff']['status'] == 'done', err  # before: skipped, the old result kept
    assert second['scan.tiff']['cells'] != first['scan.tiff']['cells']
    assert second['scan.tiff']['tissue_mm2'] != first['scan.tiff']['tissue_mm2']


def test_a_cohort_counts_each_slide_inside_its_region_annotation(server, synthetic_slide, tmp_path):
    """``--region-annotation tumour``: a slide is counted inside the areas its pathologist's annotation named
    'tumour' outlines (a polygon and a rectangle here), only nuclei centred there are posted, redrawing the region
    recomputes the slide, and a slide without the annotation gets a 'no region' row, not a whole-slide count."""
    from cellrcnn.region import annotation_region, inside

    gc = server.client()
    folder = gc.createFolder(server.collection_id, 'regions', parentType='collection')['_id']
    drawn, _ = server.upload_slide(synthetic_slide(640, 480, seed=46)[0], 'drawn.tiff', folder_id=folder)
    server.upload_slide(synthetic_slide(320, 256, seed=47)[0], 'undrawn.tiff', folder_id=folder)
    tumour = {'name': 'tumour', 'elements': [
        {'type': 'polyline', 'closed': True, 'points': [[40, 40, 0], [300, 60, 0], [260, 300, 0], [60, 260, 0]]},
        {'type': 'rectangle', 'center': [500, 380, 0], 'width': 160, 'height': 120, 'rotation': 0},
        {'type': 'point', 'center': [600, 50, 0], 'label': {'value': 'a note'}}]}
    region = gc.post('annotation', parameters={'itemId': drawn}, json=tumour)
    gc.post('annotation', parameters={'itemId': drawn}, json={'name': 'stroma', 'elements': [
        {'type': 'rectangle', 'center': [320, 240, 0], 'width': 600, 'height': 400, 'rotation': 0}]})
    girder = ('--girder-url', server.api_url, '--girder-token', server.token, '--folder', folder,
              '--region-annotation', 'tumour')
    code, out, err, rows = run_batch('-o', tmp_path, '--tile-size', '256', *girder)
    assert code == 0, err
    assert rows['undrawn.tiff']['status'] == 'no region' and rows['undrawn.tiff']['cells'] == ''
    assert "no annotation named 'tumour'" in rows['undrawn.tiff']['note']
    assert '1 done, 0 skipped (done by an earlier run), 0 failed, 1 without the region annotation' in out
    row = rows['drawn.tiff']
    assert row['status'] == 'done' and "inside annotation 'tumour' (2 area(s))" in row['note']
    (nuclei,) = [a for a in cellrcnn_annotations(server, drawn) if a['annotation']['attributes'].get('stats')]
    elements = gc.get(f'annotation/{nuclei["_id"]}')['annotation']['elements']
    assert len(elements) == int(row['cells']) > 20
    centres = np.array([e['center'][:2] for e in elements])
    assert inside(annotation_region([tumour], 'tumour')['polygons'], *centres.T).all()
    # the region's tissue: at most the two areas (53 200 and 19 200 px, 0.24 of the slide), not the slide's
    mpp = server.client().get(f'item/{drawn}/tiles')['mm_x'] * 1000
    assert 0 < float(row['tissue_mm2']) <= (53200 + 160 * 120) * (mpp / 1000) ** 2 * 1.02

    code, _, err, again = run_batch('-o', tmp_path, '--tile-size', '256', *girder)
    assert code == 0 and again['drawn.tiff']['status'] == 'skipped', err
    tumour['elements'] = tumour['elements'][:1]  # the pathologist takes the rectangle out
    gc.put(f'annotation/{region["_id"]}', json=tumour)
    code, _, err, redrawn = run_batch('-o', tmp_path, '--tile-size', '256', *girder)
    assert code == 0 and redrawn['drawn.tiff']['status'] == 'done', err
    assert "(1 area(s))" in redrawn['drawn.tiff']['note']
    assert int(redrawn['drawn.tiff']['cells']) < int(row['cells'])
