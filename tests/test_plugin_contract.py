"""The contract between the library and the Girder plugin, written on both sides on purpose: the plugin (plugin/,
girder_cellrcnn) stays torch-free and never imports cellrcnn. No Girder server is needed: the plugin's modules import
girder at their top, so their constants are read from their source with ``ast``; its cell-type module is pure Python
and is imported by its path, to compare what it computes with the library.
"""

import ast
import dataclasses
import importlib.util
import os

import numpy as np
import pytest

from cellrcnn import cohort, girder_post, girder_target, region
from cellrcnn.checkpoint import BUNDLED_MODEL
from cellrcnn.config import ModelConfig

PLUGIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'plugin', 'girder_cellrcnn')


def plugin_constant(module, name):
    """The literal value assigned to ``name`` at the top level of ``plugin/girder_cellrcnn/<module>.py``."""
    path = os.path.join(PLUGIN, f'{module}.py')
    with open(path, encoding='utf-8') as f:
        tree = ast.parse(f.read(), path)
    values = [ast.literal_eval(node.value) for node in tree.body
              if isinstance(node, ast.Assign) and [getattr(t, 'id', None) for t in node.targets] == [name]]
    assert len(values) == 1, f'{path} should assign {name} once at its top level, as a literal'
    return values[0]


@pytest.mark.parametrize('library, module, name', [
    (girder_post.MARKER, 'results', 'MARKER'),  # the attribute every cellrcnn annotation carries
    (girder_post.SHA_KEY, 'results', 'SHA_KEY'),  # the model's identity: its checkpoint's SHA-256
    (girder_target.POST_KEY, 'rerun', 'POST_KEY'),  # set by the library's poster, which replaces earlier results itself
    (os.path.basename(BUNDLED_MODEL), 'results', 'DEFAULT_MODEL'),  # the model CellDetection runs without one given
    (cohort.FORMULA_STARTS, 'table', 'FORMULA_START'),  # CSV cells a spreadsheet would run get a leading quote
    (cohort.CELL_TYPE_SUFFIXES, 'cell_types', 'SUFFIXES'),  # a cell type's columns: its name and these
    (cohort.RATIO_COLUMN, 'cell_types', 'RATIO_KEY'),  # lymphocytes per tumour cell
    (cohort.LYMPHOCYTE_NAMES, 'cell_types', 'LYMPHOCYTE_NAMES'),  # which types the ratio counts
    (cohort.TUMOUR_NAMES, 'cell_types', 'TUMOUR_NAMES'),
    (region.ELLIPSE_POINTS, 'regions', 'ELLIPSE_POINTS'),  # an ellipse or circle drawn as a region: its points
    (region.AREA_TYPES, 'regions', 'AREA_TYPES'),  # the elements that outline an area
])
def test_the_library_and_the_plugin_agree(library, module, name):
    assert plugin_constant(module, name) == library


def plugin_module(name):
    """The plugin's pure-Python module ``girder_cellrcnn.<name>``, imported by its path (not through the package,
    which needs Girder)."""
    spec = importlib.util.spec_from_file_location(f'plugin_{name}', os.path.join(PLUGIN, f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def plugin_cell_types():
    return plugin_module('cell_types')


@pytest.mark.parametrize('counts, tissue', [
    ({'lymphocyte': 30, 'Tumour': 7, 'stromal': 0}, 0.37),
    ({'lymphocytes': 4, 'tumor': 0}, 1.0),  # no tumour cell: the ratio is empty
    ({'neoplastic': 0, 'lymphocyte': 0}, 0.0),  # nothing found, no tissue
    ({'cells': 3, 'epithelial': 5}, 2.0),  # a type named cells: its columns are not the table's own
    ({'macrophage': 9}, 0.5),  # no ratio
])
def test_the_plugin_gives_a_results_row_the_cell_type_columns_of_a_cohort_row(counts, tissue):
    plugin = plugin_cell_types()
    assert plugin.valid_counts(counts)
    library = cohort.cell_type_columns(counts, tissue)
    row = plugin.columns(plugin.summarise(counts, tissue), plugin_constant('table', 'COLUMNS'))
    assert list(row) == list(library)
    for column, value in row.items():  # the plugin keeps three decimals of a density, the table one
        if value is None:
            assert library[column] == '', column
        else:
            assert value == pytest.approx(library[column], abs=0.05), column


@pytest.mark.parametrize('element', [
    {'type': 'rectangle', 'center': [100, 50, 0], 'width': 40, 'height': 20, 'rotation': 0.3},
    {'type': 'rectangle', 'center': [100, 50, 0], 'width': 40, 'height': 20},
    {'type': 'ellipse', 'center': [10, 20, 0], 'width': 40, 'height': 10, 'rotation': -1.2},
    {'type': 'circle', 'center': [5, 5, 0], 'radius': 3},
    {'type': 'polyline', 'closed': True, 'points': [[0, 0, 0], [10, 0, 0], [10, 10, 0], [0, 10, 0]]},
    # two holes cut out, the outline and a hole closed by their first points as some writers do
    {'type': 'polyline', 'closed': True, 'points': [[0, 0, 0], [10, 0, 0], [10, 10, 0], [0, 10, 0], [0, 0, 0]],
     'holes': [[[2, 2, 0], [4, 2, 0], [3, 4, 0], [2, 2, 0]], [[6, 6, 0], [8, 6, 0], [8, 8, 0]]]},
])
def test_a_folder_run_reads_a_region_annotation_as_the_library_does(element):
    """The plugin reads a slide's region annotation when it queues the slide (``girder_cellrcnn.regions``); what it
    gives the task is the region ``cellrcnn batch --region-annotation`` reads from the same annotation."""
    from cellrcnn.region import annotation_region, region_settings

    values = plugin_module('regions').region_values([element, {'type': 'point', 'center': [1, 1, 0]}, element])
    library = annotation_region([{'elements': [element, element]}], 'tumour')
    given = region_settings(values)
    assert given['roi'] == pytest.approx(library['roi'])
    assert len(given['polygons']) == len(library['polygons']) == 2
    for ours, theirs in zip(given['polygons'], library['polygons']):
        assert np.allclose(ours, theirs, atol=1e-9)


@pytest.mark.parametrize('elements, message', [
    ([{'type': 'point', 'center': [1, 2, 0]}], 'outlines no area'),
    ([{'type': 'polyline', 'closed': True, 'points': [[0, 0, 0], [9, 0, 0], [9, 9, 0]], 'holes': [[[1, 1, 0]]]}],
     'a polygon or a hole of fewer than three points'),
    ([{'type': 'rectangle', 'center': [1, 2, 0]}], 'without its size or position'),
])
def test_a_region_annotation_that_cannot_be_counted_is_refused_on_both_sides(elements, message):
    from cellrcnn.errors import CellRCNNError
    from cellrcnn.region import annotation_region

    regions = plugin_module('regions')
    with pytest.raises(regions.RegionError, match=message):
        regions.region_values(elements)
    with pytest.raises(CellRCNNError):
        annotation_region([{'elements': elements}], 'tumour')


# --------------------------------------------------------------------------- a folder run's choices


def plugin_run_choices():
    return plugin_module('run_choices')


@pytest.mark.parametrize('given, typed', [
    ({}, {}),  # the task's defaults
    ({'threshold': '0.6', 'analysis_mag': '40', 'views': '4'}, {'threshold': 0.6, 'analysis_mag': 40.0, 'views': 4}),
    # 0 is a threshold, and no magnification
    ({'threshold': '0', 'analysis_mag': '0'}, {'threshold': 0.0, 'analysis_mag': 0.0}),
    ({'classes': '["tumour", "lymphocyte"]'}, {'classes': ['tumour', ' lymphocyte']}),  # as slicer_cli_web splits it
    ({'keep_blue_green': 'true', 'leave_out_of_focus': 'false'}, {'keep_blue_green': True}),
])
def test_a_folder_run_reads_the_tasks_parameters_as_the_task_does(given, typed):
    """A job's parameters as HistomicsUI sends them, read by the plugin (``run_choices.of_task``), are the choices
    the task records in a result's params when it takes them (typed, as its parser gives them)."""
    from test_slicer_cli import task_module, xml_defaults

    run_choices = plugin_run_choices()
    args = xml_defaults('CellDetection')
    for name, value in typed.items():
        setattr(args, name, value)
    identity = task_module('CellDetection').settings_from(args).result().identity()
    assert run_choices.of_task(given) == run_choices.recorded(identity)
    assert run_choices.of_task(run_choices.task_params(run_choices.of_task(given))) == run_choices.of_task(given)


def test_every_choice_is_a_setting_and_a_task_parameter_whose_default_is_no_choice():
    from test_slicer_cli import xml_defaults

    from cellrcnn.settings import ResultSettings

    run_choices = plugin_run_choices()
    defaults = vars(xml_defaults('CellDetection'))
    fields = {f.name for f in dataclasses.fields(ResultSettings)}
    for name, (task, _, _) in run_choices.CHOICES.items():
        assert name in fields and task in defaults
        assert run_choices.of_task({task: defaults[task]}) == {}, task


def test_a_real_run_is_known_by_the_choices_it_was_made_with(slide_file, result_files, tmp_path):
    """A run records the threshold and magnification it used (its model's own by default): the plugin takes them
    for no choice, and knows a run made with choices by them."""
    from cellrcnn.annotation import read_annotation_file
    from cellrcnn.job import detect_to_files, output_paths
    from cellrcnn.settings import DetectionSettings

    run_choices = plugin_run_choices()

    def made(attributes, choices):
        return run_choices.same(attributes['params'], attributes['model_config'], choices)

    plain = read_annotation_file(result_files['annotation'])['attributes']
    config = plain['model_config']
    assert plain['params']['threshold'] == config['threshold']  # what the run used: the model's own
    assert made(plain, {}) and made(plain, {'threshold': config['threshold'], 'magnification': 10 / config['mpp']})
    assert not made(plain, {'threshold': 0.9}) and not made(plain, {'views': 2})

    paths = {'annotation': output_paths(str(tmp_path), 'slide')['annotation']}
    detect_to_files(str(slide_file), paths, DetectionSettings(
        device='cpu', tile_size=256, progress='none', threshold=0.6, classes=('tumour', 'lymphocyte'), views=2,
        keep_blue_green=True, leave_out_of_focus=True))
    chosen = read_annotation_file(paths['annotation'])['attributes']
    asked = run_choices.of_task({'threshold': '0.60', 'classes': '["lymphocyte","tumour"]', 'views': '2',
                                 'keep_blue_green': 'true', 'leave_out_of_focus': 'true', 'analysis_mag': '-1'})
    assert made(chosen, asked) and not made(plain, asked)
    assert not made(chosen, {**asked, 'views': 4}) and not made(chosen, {})


def test_the_plugin_knows_the_bundled_models_configuration():
    """The plugin takes a folder run with the bundled model's own threshold and magnification for one at the task's
    defaults, and refuses one asking it for a cell type it lacks with the line the task would fail each slide's job
    with; HistomicsUI's panel names the types: all as the checkpoint holds them."""
    import xml.etree.ElementTree as ET

    from test_slicer_cli import CLI_DIR

    from cellrcnn.checkpoint import load_model
    from cellrcnn.errors import CellRCNNError
    from cellrcnn.settings import DetectionSettings

    config = load_model().config
    known = plugin_constant('results', 'DEFAULT_MODEL_CONFIG')
    assert known == {'cell_types': list(config.cell_types), 'threshold': pytest.approx(config.threshold, abs=1e-9),
                     'mpp': config.mpp}
    run_choices = plugin_run_choices()
    own = {'threshold': config.threshold, 'analysis_mag': 10 / config.mpp}
    assert run_choices.of_model(run_choices.of_task(own), known) == {}
    assert run_choices.of_model(run_choices.of_task({**own, 'threshold': '0.5', 'views': '2'}), known) == {
        'threshold': 0.5, 'views': 2}
    for asked in ('neutrophil', 'tumour,Lymphocyte', '["stromal", "tumor"]'):
        choices = run_choices.of_task({'classes': asked})
        with pytest.raises(CellRCNNError) as task_error:
            DetectionSettings(classes=choices['classes']).type_indices(config.cell_types)
        with pytest.raises(ValueError) as plugin_error:
            run_choices.of_model(choices, known)
        assert str(plugin_error.value) == str(task_error.value)
    with pytest.raises(CellRCNNError) as task_error:  # a model without cell types
        DetectionSettings(classes=('tumour', 'stromal')).type_indices(())
    with pytest.raises(ValueError) as plugin_error:
        run_choices.of_model(run_choices.of_task({'classes': 'tumour,stromal'}), {**known, 'cell_types': None})
    assert str(plugin_error.value) == str(task_error.value)
    for asked in ('stromal', 'tumour,lymphocyte,stromal'):
        assert run_choices.of_model(run_choices.of_task({'classes': asked}), known) == run_choices.of_task(
            {'classes': asked})
    task = ET.parse(os.path.join(CLI_DIR, 'CellDetection', 'CellDetection.xml')).getroot()
    described = next(e.findtext('description') for e in task.iter('string-vector') if e.findtext('name') == 'classes')
    assert f"The bundled model's cell types are {', '.join(config.cell_types)}." in described


def test_the_plugin_reads_a_model_files_configuration_as_the_task_runs_it(tiny_checkpoint, typed_checkpoint,
                                                                          tmp_path):
    """What the torch-free plugin reads of a model file (its cell types, threshold and scale) is what the task's
    model runs with: for the bundled checkpoint, one without cell types, one with, and one that stores its threshold
    under the old name. Files torch would not load are refused in the task's own words, and a pickle that would run
    code is refused without running it."""
    import pickle
    import zipfile

    import torch

    from cellrcnn import checkpoint
    from cellrcnn.errors import CellRCNNError

    reader = plugin_module('checkpoint_config')
    assert reader.FORMAT == checkpoint.FORMAT and checkpoint.RENAMED_SETTINGS[reader.OLD_THRESHOLD] == 'threshold'
    assert reader.MODEL_SETTINGS == {f.name for f in dataclasses.fields(ModelConfig)} | set(checkpoint.RENAMED_SETTINGS)
    renamed = tmp_path / 'renamed.pt'
    payload = torch.load(typed_checkpoint, weights_only=True)
    payload['config'][reader.OLD_THRESHOLD] = 0.42
    del payload['config']['threshold']
    torch.save(payload, renamed)
    for path in (BUNDLED_MODEL, tiny_checkpoint, typed_checkpoint, renamed):
        config = checkpoint.load_model(str(path)).config
        with open(path, 'rb') as f:
            assert reader.read_config(f) == {'cell_types': list(config.cell_types), 'threshold': config.threshold,
                                             'mpp': config.mpp}
    assert config.threshold == 0.42

    (tmp_path / 'notes.pt').write_text('not a model')
    (tmp_path / 'cut.pt').write_bytes(open(typed_checkpoint, 'rb').read()[:20000])
    torch.save({'weights': torch.zeros(2)}, tmp_path / 'foreign.pt')
    for name in ('notes.pt', 'cut.pt', 'foreign.pt'):
        path = str(tmp_path / name)
        with pytest.raises(CellRCNNError) as task_error:
            checkpoint.load_checkpoint(path)
        with open(path, 'rb') as f, pytest.raises(ValueError) as plugin_error:
            reader.read_config(f)
        assert f'{path} is {plugin_error.value}' == str(task_error.value)

    newer = tmp_path / 'newer.pt'  # written by a cellrcnn with a setting the task's does not know
    payload['config']['tile_overlap_um'], payload['version'] = 12.0, '9.0.0'
    torch.save(payload, newer)
    with pytest.raises(CellRCNNError) as task_error:
        checkpoint.load_model(str(newer))
    assert str(task_error.value).endswith('unknown model settings: tile_overlap_um')
    with open(newer, 'rb') as f, pytest.raises(ValueError) as plugin_error:
        reader.read_config(f)
    assert str(plugin_error.value) == ("a cellrcnn checkpoint with model settings that the task's cellrcnn does not "
                                       'know: tile_overlap_um (written by cellrcnn 9.0.0)')

    bomb = tmp_path / 'bomb.pt'  # a pickle of empty dicts, a byte each: next to nothing zipped
    with zipfile.ZipFile(bomb, 'w', zipfile.ZIP_DEFLATED) as archive:
        archive.writestr('bomb/data.pkl', b'(' + b'}' * reader.PICKLE_MAX_BYTES + b'l.')
    assert bomb.stat().st_size < 2000
    with open(bomb, 'rb') as f, pytest.raises(ValueError) as plugin_error:
        reader.read_config(f)
    assert str(plugin_error.value).startswith('too large a checkpoint to read (its settings take 262147 bytes')
    with zipfile.ZipFile(BUNDLED_MODEL) as archive:  # room for models of many more tensors than the bundled one's
        bundled, = (i.file_size for i in archive.infolist() if i.filename.endswith('/data.pkl'))
    assert reader.PICKLE_MAX_BYTES > 10 * bundled

    class Crafted:
        def __reduce__(self):
            return os.mkdir, (str(tmp_path / 'ran'),)

    crafted = tmp_path / 'crafted.pt'
    with zipfile.ZipFile(crafted, 'w') as archive:
        archive.writestr('crafted/data.pkl', pickle.dumps({'format': checkpoint.FORMAT, 'config': Crafted()}, 2))
    with open(crafted, 'rb') as f, pytest.raises(ValueError) as plugin_error:
        reader.read_config(f)
    assert str(plugin_error.value) == ('not a readable checkpoint (it names posix.mkdir, which a checkpoint does '
                                       'not hold)')
    assert not (tmp_path / 'ran').exists()
