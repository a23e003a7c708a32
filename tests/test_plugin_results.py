"""The Girder plugin (plugin/, girder_cellrcnn) in a real DSA Girder: a slide's result as item metadata (posted by
cellrcnn, ingested by the DSA, replaced, edited, deleted, and what is no result), cell types in the metadata and the
results table, classified runs posted and ingested, and re-runs folded into the earlier result as its history.

Set up as tests/test_plugin_folders.py says: the session's server, this module's items in a collection of its own.
"""

import csv
import dataclasses
import datetime
import io
import json
import os
import subprocess
import sys
import textwrap

import pytest

from cellrcnn import __version__
from cellrcnn.annotation import read_annotation_file
from cellrcnn.devstack.local_girder import wait_for
from cellrcnn.errors import CellRCNNError
from cellrcnn.girder_post import post_annotation_files, post_annotations
from cellrcnn.job import detect_to_files, output_paths
from cellrcnn.nuclei_map import MAP_NAME
from cellrcnn.settings import DetectionSettings
from cellrcnn.tissue_outline import TISSUE_NAME
from plugin_support import (
    COLUMNS,
    DEFAULT_MODEL,
    FAST,
    NEEDS_GIRDER,
    PYTHON,
    READ,
    active_annotations,
    annotate,
    expected_summary,
    folder,
    grant,
    in_database,
    nuclei,
    result_of,
    slide_in,
)

pytestmark = NEEDS_GIRDER


def check_summary(result, doc, annotation_id):
    want = expected_summary(doc)
    assert result['cells'] == want['cells']
    assert result['tissue_mm2'] == pytest.approx(want['tissue_mm2'], rel=1e-5)
    assert result['cells_per_mm2'] == pytest.approx(want['cells_per_mm2'], rel=1e-3)
    assert result['ink_or_fill_mm2'] == want['ink_or_fill_mm2']
    assert result['out_of_focus_mm2'] == want['out_of_focus_mm2']
    assert result['cells_out_of_focus'] == want['cells_out_of_focus']
    assert result['out_of_focus_left_out'] is want['out_of_focus_left_out']
    assert result['keep_blue_green'] is want['keep_blue_green']
    assert [result[k] for k in ('threshold', 'magnification', 'classes', 'views')] == [
        want[k] for k in ('threshold', 'magnification', 'classes', 'views')]
    for key in ('mean', 'p5', 'p25', 'p50', 'p75', 'p95'):
        assert result['score'][key] == pytest.approx(want[key], abs=1e-4), key
    assert result['score']['histogram'] == want['histogram']
    assert (result['model'], result['cellrcnn_version'], result['roi'], result['annotation_id']) == \
        (doc['attributes']['model'], __version__, doc['attributes']['params']['roi'], annotation_id)
    assert result['model_sha256'] == doc['attributes'].get('model_sha256')


# --------------------------------------------------------------------------- the plugin


def test_the_plugin_loads_without_torch(server):
    plugins = server.client().get('system/plugins')
    assert 'cellrcnn' in plugins['all'] and 'cellrcnn' in plugins['loaded'], server.log_tail()
    check = subprocess.run([PYTHON, '-c', 'import sys, girder_cellrcnn; '
                                          'print(sorted(m for m in ("torch", "cellrcnn") if m in sys.modules))'],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and check.stdout.strip() == '[]', check.stderr


# --------------------------------------------------------------------------- metadata


def test_a_posted_result_becomes_item_metadata(server, slide_file, result_files, nuclei_doc):
    item_id, _ = slide_in(server, slide_file, server.folder_id, 'posted.tiff')
    posted = post_annotation_files(server.api_url, server.token, item_id,
                                   [result_files['annotation'], result_files['density']], **FAST)
    result = result_of(server, item_id)
    check_summary(result, nuclei_doc, posted[0]['_id'])  # the nuclei, not the density annotation posted after it
    age = datetime.datetime.now(datetime.timezone.utc) - datetime.datetime.fromisoformat(result['date'])
    assert datetime.timedelta(0) <= age < datetime.timedelta(minutes=5)


def test_a_result_ingested_by_the_dsa_becomes_item_metadata(server, slide_file, result_files, nuclei_doc):
    item_id, file_id = slide_in(server, slide_file, server.folder_id, 'ingested.tiff')
    server.upload_as_dsa(result_files['annotation'], item_id, file_id, 'outputCellAnnotationFile')
    server.upload_as_dsa(result_files['density'], item_id, file_id, 'outputDensityAnnotationFile')
    result = wait_for(lambda: result_of(server, item_id), 30, 'metadata from the ingested annotation')
    annotations = server.client().get('annotation', {'itemId': item_id})
    nuclei_id = next(a['_id'] for a in annotations if a['annotation']['name'] == nuclei_doc['name'])
    check_summary(result, nuclei_doc, nuclei_id)


def test_the_metadata_follows_replacement_edits_and_deletion(server, slide_file):
    item_id, _ = slide_in(server, slide_file, server.folder_id, 'replaced.tiff')
    gc = server.client()
    other = post_annotations(server.api_url, server.token, item_id, nuclei(30, 'other.pt'), **FAST)[0]['_id']
    assert result_of(server, item_id)['annotation_id'] == other
    first = post_annotations(server.api_url, server.token, item_id, nuclei(50, DEFAULT_MODEL), **FAST)[0]['_id']
    # cellrcnn replaces a model's result: the new one lands, then the old one is deleted. The new one stays.
    second_doc = nuclei(40, DEFAULT_MODEL, seed=1)
    second = post_annotations(server.api_url, server.token, item_id, second_doc, **FAST)
    assert second[0]['replaced'] == [first]
    check_summary(result_of(server, item_id), second_doc, second[0]['_id'])
    # An edit in HistomicsUI (cells removed) is counted again.
    stored = gc.get(f'annotation/{second[0]["_id"]}')['annotation']
    stored['elements'] = stored['elements'][:25]
    gc.put(f'annotation/{second[0]["_id"]}', json=stored)
    assert result_of(server, item_id)['cells'] == 25
    # Deleting the result described falls back to the newest remaining one, then to none.
    gc.delete(f'annotation/{second[0]["_id"]}')
    assert result_of(server, item_id)['annotation_id'] == other
    assert result_of(server, item_id)['model'] == 'other.pt'
    gc.delete(f'annotation/item/{item_id}')
    assert result_of(server, item_id) is None


def test_annotations_that_are_not_nuclei_results_leave_no_metadata(server, slide_file, result_files):
    item_id, _ = slide_in(server, slide_file, server.folder_id, 'others.tiff')
    gc = server.client()
    gc.post('annotation', {'itemId': item_id}, json={'name': 'drawn by a person', 'elements': []})
    gc.post('annotation', {'itemId': item_id}, json=read_annotation_file(result_files['density']))
    assert result_of(server, item_id) is None


# --------------------------------------------------------------------------- cell types

#: the cell-type columns of the table below, in the order its slides bring them, the ratio last
TYPED = [f'{name}{suffix}' for name in ('lymphocyte', 'tumour', 'stromal', '=macrophage', 'secret')
         for suffix in ('_count', '_per_mm2', '_fraction')] + ['lymphocyte_per_tumour']


def classified(n, model, counts, seed=0):
    """A nuclei document of a model with cell types: its run's stats carry ``{type: count}``."""
    doc = nuclei(n, model, seed)
    doc['attributes']['stats']['cell_types'] = counts
    return doc


def test_cell_types_go_into_the_metadata_and_the_results_table(server, slide_file, reader):
    root = folder(server, server.folder_id, 'typed')
    hidden = folder(server, root, 'hidden')
    ids = {name: slide_in(server, slide_file, hidden if name == 'h.tiff' else root, name)[0]
           for name in ('a.tiff', 'b.tiff', 'c.tiff', 'd.tiff', 'e.tiff', 'h.tiff')}
    first = annotate(server, ids['a.tiff'], classified(40, 'typed.pt', {'lymphocyte': 24, 'tumour': 8, 'stromal': 8}))
    annotate(server, ids['b.tiff'], classified(10, 'other.pt', {'tumour': 0, '=macrophage': 10}))  # no lymphocytes
    annotate(server, ids['c.tiff'], classified(6, 'typed.pt', {'lymphocyte': 6, 'tumour': 0, 'stromal': 0}))
    annotate(server, ids['d.tiff'], nuclei(5, 'plain.pt'))  # a model without cell types
    annotate(server, ids['e.tiff'], classified(5, 'odd.pt', {'x': -1}))  # not counts: a result without types
    annotate(server, ids['h.tiff'], classified(5, 'secret.pt', {'secret': 5}))

    a = result_of(server, ids['a.tiff'])  # tissue 0.04 mm2
    assert a['cells'] == 40 and a['cell_types'] == [
        {'name': 'lymphocyte', 'count': 24, 'per_mm2': 600.0, 'fraction': 0.6},
        {'name': 'tumour', 'count': 8, 'per_mm2': 200.0, 'fraction': 0.2},
        {'name': 'stromal', 'count': 8, 'per_mm2': 200.0, 'fraction': 0.2}]
    assert a['lymphocyte_per_tumour'] == 3.0
    assert result_of(server, ids['c.tiff'])['lymphocyte_per_tumour'] is None  # no tumour cell: no ratio, no error
    assert 'lymphocyte_per_tumour' not in result_of(server, ids['b.tiff'])
    for plain in ('d.tiff', 'e.tiff'):
        assert set(result_of(server, ids[plain])) == set(result_of(server, ids['a.tiff'])) - {
            'cell_types', 'lymphocyte_per_tumour'}

    rows = {r['name']: r for r in server.client().get(f'cellrcnn/folder/{root}/results')}
    assert all(set(r) == set(COLUMNS + TYPED) for r in rows.values())  # every row has every type's columns

    def types(row, **values):
        return {k: row[k] for k in TYPED} == {**dict.fromkeys(TYPED), **values}

    assert types(rows['a.tiff'], lymphocyte_count=24, lymphocyte_per_mm2=600.0, lymphocyte_fraction=0.6,
                 tumour_count=8, tumour_per_mm2=200.0, tumour_fraction=0.2, stromal_count=8,
                 stromal_per_mm2=200.0, stromal_fraction=0.2, lymphocyte_per_tumour=3.0)
    assert types(rows['b.tiff'], tumour_count=0, tumour_per_mm2=0.0, tumour_fraction=0.0,
                 **{'=macrophage_count': 10, '=macrophage_per_mm2': 250.0, '=macrophage_fraction': 1.0})
    assert types(rows['c.tiff'], lymphocyte_count=6, lymphocyte_per_mm2=150.0, lymphocyte_fraction=1.0,
                 tumour_count=0, tumour_per_mm2=0.0, tumour_fraction=0.0, stromal_count=0, stromal_per_mm2=0.0,
                 stromal_fraction=0.0)
    assert types(rows['d.tiff']) and types(rows['e.tiff']) and rows['e.tiff']['cells'] == 5
    assert types(rows['h.tiff'], secret_count=5, secret_per_mm2=125.0, secret_fraction=1.0)

    text = server.client().sendRestRequest('GET', f'cellrcnn/folder/{root}/results', {'format': 'csv'},
                                           jsonResp=False).text
    header, *table = csv.reader(io.StringIO(text))
    assert header == COLUMNS + [f"'{c}" if c.startswith('=') else c for c in TYPED]  # a type's name is text too
    assert table == [['' if r[k] is None else str(r[k]) for k in COLUMNS + TYPED] for r in rows.values()]

    # A reader who may not see the hidden folder sees neither its slide nor the cell types only it has.
    reader_id, token = reader
    grant(server, root, reader_id, READ, recurse=True)
    grant(server, hidden, reader_id, None)
    seen = server.client(token).get(f'cellrcnn/folder/{root}/results')
    assert [r['name'] for r in seen] == ['a.tiff', 'b.tiff', 'c.tiff', 'd.tiff', 'e.tiff']
    assert all(set(r) == set(COLUMNS + TYPED) - {c for c in TYPED if c.startswith('secret')} for r in seen)
    text = server.client(token).sendRestRequest('GET', f'cellrcnn/folder/{root}/results', {'format': 'csv'},
                                                jsonResp=False).text
    assert 'secret' not in text

    # Deleting a newer result falls back to the classified one, cell types and all, whether the plugin remembered
    # its summary or computes it again from the stored annotation.
    for forget in (False, True):
        if forget:
            in_database(server, "db['annotation'].update_one({'_id': ObjectId(args[0])}, "
                                "{'$unset': {'cellrcnnSummary': ''}})", first['_id'])
        newer = annotate(server, ids['a.tiff'], nuclei(12, 'plain.pt'))
        assert 'cell_types' not in result_of(server, ids['a.tiff'])
        server.client().delete(f'annotation/{newer["_id"]}')
        assert result_of(server, ids['a.tiff']) == {**a, 'date': result_of(server, ids['a.tiff'])['date']}


# --------------------------------------------------------------------------- classified results end to end

TYPES = ('lymphocyte', 'tumour', 'stromal')
TYPE_COLORS = {'lymphocyte': '#0000ff', 'tumour': '#ff0000', 'stromal': '#00ff00'}


def class_density_names(types):
    return [f'cellrcnn nuclei density ({name})' for name in types]


def detect_typed(checkpoint, slide_file, out, *options, env=None):
    """``cellrcnn detect`` with the typed model (``options``: ``--classes``, posting); its output files by key."""
    run = subprocess.run([sys.executable, '-m', 'cellrcnn', 'detect', str(slide_file), '-o', str(out), '--model',
                          str(checkpoint), '--threshold', '0.05', '--tile-size', '256', '--min-tissue', '0',
                          '--device', 'cpu', '--progress', 'none', '--no-resume', *options],
                         capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    return output_paths(str(out), os.path.splitext(os.path.basename(slide_file))[0])


def by_name(server, item_id):
    """The item's active annotations (their whole documents), by name; each name once."""
    stored = active_annotations(server, item_id)
    names = [a['annotation']['name'] for a in stored]
    assert len(names) == len(set(names)), names  # no result is there twice
    return {a['annotation']['name']: server.client().get(f'annotation/{a["_id"]}') for a in stored}


def check_typed_result(server, item_id, paths, types, with_map=True):
    """The item holds exactly the run of ``paths``: the nuclei with each type's label, group and colour, the
    nuclei map (``with_map``), the density, one density per type, the tissue outline; its metadata is that nuclei
    annotation's, with the run's counts per type."""
    local = read_annotation_file(paths['annotation'])
    counts = local['attributes']['stats']['cell_types']
    assert list(counts) == list(types)
    stored = by_name(server, item_id)
    assert sorted(stored) == sorted([local['name'], 'cellrcnn nuclei density', *class_density_names(types),
                                     TISSUE_NAME, *([MAP_NAME] if with_map else [])])
    nuclei_ = stored[local['name']]['annotation']
    assert nuclei_['description'] == local['description'] and all(f'{t}: {TYPE_COLORS[t]}' in nuclei_['description']
                                                                  for t in types)
    styles = [(e['group'], e['label']['value'], e['lineColor']) for e in nuclei_['elements']]
    assert sorted(styles) == sorted((t, t, TYPE_COLORS[t]) for t in types for _ in range(counts[t]))
    for name, cell_type in zip(class_density_names(types), types):
        heatmap = stored[name]['annotation']
        assert heatmap['elements'][0]['type'] == 'griddata'
        assert (heatmap['attributes']['cell_type'], heatmap['attributes']['density']['nuclei']) == \
            (cell_type, counts[cell_type])
    result = result_of(server, item_id)
    assert (result['annotation_id'], result['cells']) == (stored[local['name']]['_id'], len(local['elements']))
    assert [(t['name'], t['count']) for t in result['cell_types']] == list(counts.items())
    return {name: doc['_id'] for name, doc in stored.items()}


def test_the_table_gives_each_slides_whole_slide_result_or_its_count_inside_a_region(server, slide_file, reader):
    """A slide keeps its whole-slide result beside its count inside the tumour (cellrcnn's client replaces only
    the same region's result): the table shows each slide's newest result, or with ``wholeSlide`` or
    ``regionAnnotation`` its newest one of that scope from a writer, cell types and all."""
    root = folder(server, server.folder_id, 'scoped')
    reader_id, reader_token = reader
    access = {'users': [{'id': server.user_id, 'level': 2},
                        {'id': reader_id, 'level': READ, 'flags': ['large_image_create_annotations']}], 'groups': []}
    server.client().put(f'folder/{root}/access', {'access': json.dumps(access)})
    ids = {name: slide_in(server, slide_file, root, name)[0] for name in ('both.tiff', 'whole.tiff')}
    tumour = {'roi': [0, 0, 300, 300], 'polygons': [[[0, 0], [300, 0], [0, 300]]], 'region_annotation': 'tumour'}

    def post(item, n, counts, **params):
        doc = classified(n, 'typed.pt', counts)
        doc['attributes']['params'].update(params)
        post_annotations(server.api_url, server.token, ids[item], doc, **FAST)

    post('both.tiff', 30, {'lymphocyte': 10, 'tumour': 20})
    post('both.tiff', 12, {'lymphocyte': 3, 'tumour': 9}, **tumour)
    post('both.tiff', 5, {'lymphocyte': 5, 'tumour': 0}, roi=[0, 0, 50, 50])  # a hotspot: newest of all
    post('whole.tiff', 9, {'lymphocyte': 0, 'tumour': 9})
    fake = classified(99, 'typed.pt', {'lymphocyte': 99, 'tumour': 0})  # a reader's look-alike: not a result
    fake['attributes']['params'].update(tumour)
    annotate(server, ids['whole.tiff'], fake, token=reader_token)

    def table(**params):
        return {r['name']: r for r in server.client().get(f'cellrcnn/folder/{root}/results', params)}

    newest, whole, inside = table(), table(wholeSlide='true'), table(regionAnnotation=' tumour ')
    assert [(r['cells'], r['roi'], r['region_annotation']) for r in newest.values()] == [
        (5, '0,0,50,50', None), (9, None, None)]
    assert [(r['cells'], r['lymphocyte_count'], r['region_annotation']) for r in whole.values()] == [
        (30, 10, None), (9, 0, None)]
    assert (inside['both.tiff']['cells'], inside['both.tiff']['lymphocyte_per_tumour']) == (12, 0.333)
    assert inside['both.tiff']['region_annotation'] == 'tumour' and inside['whole.tiff']['cells'] is None
    text = server.client().sendRestRequest('GET', f'cellrcnn/folder/{root}/results',
                                           {'format': 'csv', 'regionAnnotation': 'tumour'}, jsonResp=False).text
    header, *rows = csv.reader(io.StringIO(text))
    assert [dict(zip(header, row))['cells'] for row in rows] == ['12', '']
    with pytest.raises(Exception) as refused:
        table(wholeSlide='true', regionAnnotation='tumour')
    assert refused.value.status == 400 and 'give wholeSlide or regionAnnotation, not both' in refused.value.responseText


def test_a_classified_run_posted_to_girder_replaces_the_models_earlier_run(server, slide_file, typed_checkpoint,
                                                                        tmp_path):
    root = folder(server, server.folder_id, 'typed_posts')
    item_id, _ = slide_in(server, slide_file, root, 'typed.tiff')
    env = {**os.environ, 'GIRDER_TOKEN': server.token}
    post = ('--girder-url', server.api_url, '--item', item_id)

    first = detect_typed(typed_checkpoint, slide_file, tmp_path / 'first', *post, env=env)
    ids = check_typed_result(server, item_id, first, TYPES)
    before = result_of(server, item_id)
    assert sum(1 for t in before['cell_types'] if t['count']) > 1  # more than one type to tell apart
    row = server.client().get(f'cellrcnn/folder/{root}/results')[0]
    assert [row[f'{t["name"]}_count'] for t in before['cell_types']] == [t['count'] for t in before['cell_types']]
    assert row['lymphocyte_per_tumour'] == before['lymphocyte_per_tumour']

    # Deleting a per-type heatmap leaves the result alone: it is no nuclei result.
    server.client().delete(f'annotation/{ids[class_density_names(TYPES)[2]]}')
    assert result_of(server, item_id) == before

    # The same run again replaces every annotation of the earlier one, heatmaps too; none is there twice.
    again = detect_typed(typed_checkpoint, slide_file, tmp_path / 'again', *post, env=env)
    ids_again = check_typed_result(server, item_id, again, TYPES)
    assert not set(ids.values()) & set(ids_again.values())

    # A run keeping one type leaves no heatmap of the others behind.
    tumour = detect_typed(typed_checkpoint, slide_file, tmp_path / 'tumour', *post, '--classes', 'tumour', env=env)
    kept = check_typed_result(server, item_id, tumour, ('tumour',))
    assert 'lymphocyte_per_tumour' not in result_of(server, item_id)

    # A post that fails part way (the server refuses its last heatmap) takes itself back: the earlier run stays whole.
    broken = tmp_path / 'broken.class-density.anot.json'
    heatmaps = json.loads(open(again['class_density']).read())
    heatmaps[-1]['elements'][0]['values'] = 'not numbers'
    broken.write_text(json.dumps(heatmaps))
    with pytest.raises(CellRCNNError, match='broken.class-density.anot.json'):
        post_annotation_files(server.api_url, server.token, item_id, [again['annotation'], again['density'], broken],
                              **FAST)
    assert check_typed_result(server, item_id, tumour, ('tumour',)) == kept


@pytest.fixture(scope='module')
def typed_outputs(slide_file, typed_checkpoint, tmp_path_factory):
    """The typed model's outputs for the slide as the CellDetection task writes them: every type, and tumour only."""
    settings = DetectionSettings(model=str(typed_checkpoint), threshold=0.05, tile_size=256, min_tissue=0.0,
                                 device='cpu', progress='none')
    runs = {}
    for name, classes in (('all', None), ('tumour', ('tumour',))):
        runs[name] = output_paths(str(tmp_path_factory.mktemp(f'typed_{name}')), 'slide')
        detect_to_files(str(slide_file), runs[name], dataclasses.replace(settings, classes=classes))
    return runs


def test_a_classified_run_ingested_by_the_dsa_folds_into_the_earlier_run(server, slide_file, typed_outputs):
    item_id, file_id = slide_in(server, slide_file, server.folder_id, 'typed_dsa.tiff')
    outputs = (('annotation', 'outputCellAnnotationFile'), ('density', 'outputDensityAnnotationFile'),
               ('class_density', 'outputClassDensityAnnotationFile'), ('tissue', 'outputTissueAnnotationFile'))

    def run_task(paths, count, histories):
        """The task's outputs uploaded as slicer_cli_web uploads them; once ``count`` annotations are left, each
        with ``histories`` versions (the re-runs folded into them), what the item holds."""
        for key, identifier in outputs:
            server.upload_as_dsa(paths[key], item_id, file_id, identifier)

        def landed():
            now = active_annotations(server, item_id)
            return len(now) == count and all(
                len(server.client().get(f'annotation/{a["_id"]}/history')) == histories for a in now)

        wait_for(landed, 60, f'{count} annotations with {histories} versions each')
        return check_typed_result(server, item_id, paths, list(read_annotation_file(paths['annotation'])[
            'attributes']['stats']['cell_types']), with_map=False)

    ids = run_task(typed_outputs['all'], 6, 1)
    assert run_task(typed_outputs['all'], 6, 2) == ids  # a re-run updates each annotation in place
    kept = run_task(typed_outputs['tumour'], 4, 3)  # the heatmaps of the types this run left out are gone
    assert kept == {name: ids[name] for name in kept}


# --------------------------------------------------------------------------- deletions and re-runs

DELETE_WITHOUT_ELEMENTS = textwrap.dedent('''
    import json, sys
    from girder_large_image_annotation.models.annotation import Annotation
    from girder_large_image_annotation.models.annotationelement import Annotationelement

    def refuse(*args, **kwargs):
        raise AssertionError('the elements of an annotation were read')

    Annotationelement.getElements = Annotationelement.yieldElements = refuse
    from girder_cellrcnn import results

    annotation_id, item_id = sys.argv[1:]
    Annotation().remove(Annotation().load(annotation_id, force=True, getElements=False))
    print(json.dumps(results.resync(item_id)['meta'].get('cellrcnn'), default=str))
''')


def test_deleting_a_result_reads_no_elements(server, slide_file):
    """The fallback after a deletion, run in the server's code against its database with element reads refused:
    once with the summary the plugin remembered for the older result, once computing it from scores alone."""
    item_id, _ = slide_in(server, slide_file, server.folder_id, 'fallback.tiff')
    older_doc = nuclei(40, 'other.pt', seed=3)
    older = annotate(server, item_id, older_doc)
    for round_, forget in ((0, False), (1, True)):
        newer = annotate(server, item_id, nuclei(12, DEFAULT_MODEL, seed=round_))
        assert result_of(server, item_id)['annotation_id'] == newer['_id']
        if forget:  # an older result saved before the plugin remembered summaries
            in_database(server, "db['annotation'].update_one({'_id': ObjectId(args[0])}, "
                                "{'$unset': {'cellrcnnSummary': ''}})", older['_id'])
        env = {**os.environ, 'GIRDER_MONGO_URI': server.db_uri}
        env.pop('PYTHONPATH', None)
        run = subprocess.run([PYTHON, '-c', DELETE_WITHOUT_ELEMENTS, newer['_id'], item_id], capture_output=True,
                             text=True, timeout=120, env=env, cwd=server.root)
        assert run.returncode == 0, run.stderr[-3000:]
        summary = json.loads(run.stdout.strip().splitlines()[-1])
        check_summary(summary, older_doc, older['_id'])
        check_summary(result_of(server, item_id), older_doc, older['_id'])


def test_a_rerun_updates_the_earlier_result_and_keeps_it_as_history(server, slide_file, result_files, nuclei_doc,
                                                                    reader, tmp_path):
    reader_id, reader_token = reader
    root = folder(server, server.folder_id, 'reruns')
    access = {'users': [{'id': server.user_id, 'level': 2},
                        {'id': reader_id, 'level': READ, 'flags': ['large_image_create_annotations']}], 'groups': []}
    server.client().put(f'folder/{root}/access', {'access': json.dumps(access)})
    item_id, file_id = slide_in(server, slide_file, root, 'rerun.tiff')
    for path, identifier in ((result_files['annotation'], 'outputCellAnnotationFile'),
                             (result_files['density'], 'outputDensityAnnotationFile')):
        server.upload_as_dsa(path, item_id, file_id, identifier)
    first = wait_for(lambda: len(active_annotations(server, item_id)) == 2 and active_annotations(server, item_id),
                     60, 'the first run ingested')
    ids = {a['annotation']['name']: a['_id'] for a in first}
    nuclei_id = ids[nuclei_doc['name']]
    assert result_of(server, item_id)['annotation_id'] == nuclei_id

    # The task runs again (from HistomicsUI): the DSA ingests its outputs as new annotations; this run found fewer.
    second_doc = dict(nuclei_doc, elements=nuclei_doc['elements'][:40])
    second = tmp_path / os.path.basename(result_files['annotation'])
    second.write_text(json.dumps(second_doc))
    server.upload_as_dsa(second, item_id, file_id, 'outputCellAnnotationFile')
    server.upload_as_dsa(result_files['density'], item_id, file_id, 'outputDensityAnnotationFile')

    def folded():
        now = active_annotations(server, item_id)
        histories = [server.client().get(f'annotation/{i}/history') for i in ids.values()]
        return (now if sorted(a['_id'] for a in now) == sorted(ids.values()) and all(len(h) == 2 for h in histories)
                else None)

    wait_for(folded, 60, 'the second run folded into the first one\'s annotations')
    result = result_of(server, item_id)
    assert (result['annotation_id'], result['cells']) == (nuclei_id, 40)
    versions = server.client().get(f'annotation/{nuclei_id}/history')
    earlier = server.client().get(f'annotation/{nuclei_id}/history/{versions[-1]["_version"]}')
    assert len(earlier['annotation']['elements']) == len(nuclei_doc['elements'])  # the first run, kept
    assert len(server.client().get(f'annotation/{nuclei_id}')['annotation']['elements']) == 40
    # the second run's elements were moved in the database, not loaded into Girder and stored again: none stay with
    # the arrival, and the result and its history hold each element once
    stored = in_database(server, """
        result = db['annotation'].find_one({'_id': ObjectId(args[0])})
        arrival = result['cellrcnnContent']['from']
        result = [db['annotationelement'].count_documents({'annotationId': arrival}),
                  db['annotationelement'].count_documents({'annotationId': ObjectId(args[0])})]""", nuclei_id)
    assert stored == [0, len(nuclei_doc['elements']) + 40]
    # its summary is remembered for its new version: the results table does not read its elements at each request
    remembered = in_database(server, """
        doc = db['annotation'].find_one({'_id': ObjectId(args[0])})
        result = [doc['_version'], doc['cellrcnnSummary']['version'], doc['cellrcnnSummary']['summary']['cells']]
        """, nuclei_id)
    assert remembered[0] == remembered[1] and remembered[2] == 40

    # Another model's result, and the reader's look-alike, stay annotations of their own; the result is untouched.
    other = annotate(server, item_id, nuclei(10, 'other.pt'))
    fake = annotate(server, item_id, dict(nuclei_doc, elements=nuclei_doc['elements'][:3]), token=reader_token)
    # Runs of regions drawn as polygons with one bounding box are results of their own, and not the whole slide's.
    drawn = []
    for polygon in ([[0, 0], [200, 0], [0, 200]], [[200, 200], [200, 0], [0, 200]]):
        doc = nuclei(6, nuclei_doc['attributes']['model'], roi=[0, 0, 200, 200])
        doc['attributes']['params']['polygons'] = [polygon]
        drawn.append(annotate(server, item_id, doc)['_id'])
    # A run inside the slide's annotations named 'tumour' is their region's result however they are drawn: a run
    # after the tumour was redrawn folds into it.
    inside = []
    for polygon in ([[0, 0], [200, 0], [0, 200]], [[0, 0], [300, 0], [0, 300]]):
        doc = nuclei(7 + len(inside), nuclei_doc['attributes']['model'], roi=[0, 0, 200, 200])
        doc['attributes']['params'].update(polygons=[polygon], region_annotation='tumour')
        inside.append(annotate(server, item_id, {**doc, 'name': f'{doc["name"]} inside tumour'})['_id'])
    # Girder's events thread takes its work in order: once a third density run uploaded after them has been folded
    # in, those arrivals have been looked at.
    server.upload_as_dsa(result_files['density'], item_id, file_id, 'outputDensityAnnotationFile')
    density_id = ids[next(name for name in ids if name != nuclei_doc['name'])]
    wait_for(lambda: len(server.client().get(f'annotation/{density_id}/history')) == 3
             and len(active_annotations(server, item_id)) == 7, 60, 'the third density run folded in')
    assert sorted(a['_id'] for a in active_annotations(server, item_id)) == sorted([*ids.values(), other['_id'],
                                                                                     fake['_id'], *drawn, inside[0]])
    assert len(server.client().get(f'annotation/{inside[0]}')['annotation']['elements']) == 8
    assert len(server.client().get(f'annotation/{nuclei_id}')['annotation']['elements']) == 40
