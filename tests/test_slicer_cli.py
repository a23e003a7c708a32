"""The CellDetection task run exactly as a DSA worker runs it: through slicer_cli_web's entrypoint in cli/."""

import dataclasses
import importlib.util
import json
import os
import re
import subprocess
import sys
import types
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from cellrcnn.errors import CellRCNNError
from cellrcnn.settings import AnnotationTrainingSettings, DetectionSettings

CLI_DIR = os.path.join(os.path.dirname(__file__), '..', 'cli')


def entrypoint(*args):
    return subprocess.run([sys.executable, '-m', 'slicer_cli_web.cli_list_entrypoint', *args], cwd=CLI_DIR,
                          capture_output=True, text=True, timeout=300)


def test_list_cli_and_xml():
    listing = entrypoint('--list_cli')
    assert listing.returncode == 0
    assert json.loads(listing.stdout[listing.stdout.index('{'):]) == {'CellDetection': {'type': 'python'},
                                                                'TrainCellDetector': {'type': 'python'}}
    xml = entrypoint('CellDetection', '--xml')
    assert xml.returncode == 0
    root = ET.fromstring(xml.stdout)
    names = {e.findtext('name') for e in root.iter() if e.find('name') is not None}
    assert {'inputImageFile', 'analysis_roi', 'outputCellAnnotationFile', 'outputDensityAnnotationFile',
            'analysis_mag', 'analysis_tile_size', 'tile_overlap', 'min_tissue_frac', 'threshold', 'nms_iou',
            'anchor_upsample', 'adapt_tiles', 'views', 'element_type', 'model_file', 'device', 'batch_size',
            'scheduler', 'girderApiUrl', 'girderToken', 'outputNucleiPixelmapAnnotationFile',
            'outputNucleiLabelImage', 'outputTissueAnnotationFile', 'keep_blue_green', 'leave_out_of_focus'} <= names
    adapt = next(e for e in root.iter('integer') if e.findtext('name') == 'adapt_tiles')
    assert adapt.findtext('label') == "Adapt to this slide's staining"
    assert int(adapt.findtext('default')) == DetectionSettings.adapt_tiles == 0  # off by default, as in cellrcnn detect
    outputs = [e for e in root.iter('file') if e.findtext('channel') == 'output']
    assert all(e.get('reference') == 'inputImageFile' and e.findtext('name').endswith('AnnotationFile')
               for e in outputs)
    # the pixelmap's label image is an image output: its name is what the pixelmap annotation calls it
    (label_image,) = [e for e in root.iter('image') if e.findtext('channel') == 'output']
    assert label_image.findtext('name') == 'outputNucleiLabelImage' and label_image.get('fileExtensions') == '.tiff'


@pytest.fixture(scope='module')
def slide(synthetic_slide):
    return synthetic_slide(640, 480, seed=21)[0]


def test_a_full_run_through_the_entrypoint(slide, tiny_checkpoint, tmp_path):
    nuclei, density = tmp_path / 'nuclei.anot', tmp_path / 'density.anot'
    pixelmap, labels = tmp_path / 'pixelmap.anot', tmp_path / 'labels.tiff'
    tissue = tmp_path / 'tissue.anot'
    run = entrypoint('CellDetection', str(slide), str(nuclei), '--outputDensityAnnotationFile', str(density),
                     '--outputTissueAnnotationFile', str(tissue),
                     '--outputNucleiPixelmapAnnotationFile', str(pixelmap), '--outputNucleiLabelImage', str(labels),
                     '--model_file', str(tiny_checkpoint), '--analysis_tile_size', '256', '--element_type', 'point',
                     '--analysis_roi', '0,0,500,400', '--adapt_tiles', '3', '--views', '2', '--api-url', '',
                     '--girder-token', '')
    assert run.returncode == 0, run.stderr
    assert '<filter-progress>1.000</filter-progress>' in run.stdout and '<filter-end>' in run.stdout
    # after the detection, the job's progress counts the outputs as they are written, naming each
    writing = run.stdout[run.stdout.index('<filter-comment>writing the nuclei annotation</filter-comment>'):]
    assert writing.index('writing the density heatmap') < writing.index('writing the nuclei pixelmap and its label '
                                                                        'image') < writing.index('<filter-end>')
    assert re.search(r'^\d+ nuclei in .*; outputs written in [\d.]+ s$', run.stdout, re.MULTILINE), run.stdout
    doc = json.loads(nuclei.read_text())
    assert isinstance(doc, dict) and doc['elements']  # one document per file: what HistomicsUI ingests
    assert all(e['type'] == 'point' and e['center'][0] <= 500 + 64 and e['center'][1] <= 400 + 64
               for e in doc['elements'])
    assert doc['attributes']['params']['roi'] == [0, 0, 500, 400]
    assert doc['attributes']['params']['adapt_tiles'] == doc['attributes']['stats']['adapt_tiles'] == 3
    assert doc['attributes']['params']['views'] == doc['attributes']['stats']['views'] == 2
    assert ', each tile in 2 views; outputs written' in run.stdout
    heat = json.loads(density.read_text())
    assert heat['elements'][0]['type'] == 'griddata'
    # the pixelmap names the label image by its output, which large_image resolves when the DSA uploads both
    (element,) = json.loads(pixelmap.read_text())['elements']
    assert element['girderId'] == 'outputNucleiLabelImage' and len(element['values']) == len(doc['elements']) + 1
    assert labels.read_bytes()[:4] == b'II+\x00'  # a BigTIFF
    # the tissue outline: cut to the region, hidden until asked for, never taken for the nuclei (attributes.density)
    outline = json.loads(tissue.read_text())
    assert outline['display'] == {'visible': False} and outline['attributes']['density']['kind'] == 'tissue outline'
    points = np.array([p for e in outline['elements'] for p in e['points']])
    assert len(points) and points[:, 0].max() <= 500 and points[:, 1].max() <= 400
    assert not (tmp_path / 'nuclei.anot.partial').exists()


def test_bad_input_is_one_line(tmp_path, tiny_checkpoint):
    run = entrypoint('CellDetection', str(tmp_path / 'missing.svs'), str(tmp_path / 'n.anot'),
                     '--model_file', str(tiny_checkpoint))
    assert run.returncode == 2
    assert run.stderr.strip() == f'CellDetection: error: slide not found: {tmp_path / "missing.svs"}'
    run = entrypoint('CellDetection', str(tmp_path / 'missing.svs'), str(tmp_path / 'n.anot'),
                     '--outputNucleiLabelImage', str(tmp_path / 'labels.tiff'), '--model_file', str(tiny_checkpoint))
    assert run.returncode == 2 and run.stderr.strip() == ('CellDetection: error: the nuclei pixelmap needs both its '
                                                          'annotation and its label image; only the label image was '
                                                          'given')


def xml_defaults(task):
    """The task's parameters as slicer_cli_web passes them when a user changes nothing: each XML default, typed."""
    root = ET.parse(os.path.join(CLI_DIR, task, f'{task}.xml')).getroot()
    kinds = {'integer': int, 'integer-enumeration': int, 'double': float, 'float': float,
             'boolean': lambda text: text == 'true', 'region': lambda text: [float(v) for v in text.split(',')]}
    values = {}
    for group in root.iter('parameters'):
        for element in group:
            name, default = element.findtext('name'), element.findtext('default')
            if name is not None:
                values[name] = kinds.get(element.tag, str)(default) if default is not None else None
    return types.SimpleNamespace(**values)


def task_module(task):
    spec = importlib.util.spec_from_file_location(task, os.path.join(CLI_DIR, task, f'{task}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_task_defaults_are_the_library_defaults():
    """One source of defaults: the XML a DSA shows, read as the tasks read it, gives the library's settings."""
    assert task_module('CellDetection').settings_from(xml_defaults('CellDetection')) == \
        dataclasses.replace(DetectionSettings(), progress='slicer')
    assert task_module('TrainCellDetector').settings_from(xml_defaults('TrainCellDetector')) == \
        AnnotationTrainingSettings()


def test_the_task_keeps_the_cell_types_it_is_given():
    settings_from = task_module('CellDetection').settings_from
    given = xml_defaults('CellDetection')
    for value, classes in ([''], None), (['tumour', ' stromal'], ('stromal', 'tumour')):  # as slicer_cli_web splits
        given.classes = value
        assert settings_from(given).classes == classes


@pytest.mark.parametrize('option', ['keep_blue_green', 'leave_out_of_focus'])
def test_the_task_takes_green_and_blue_for_tissue_and_leaves_tissue_out_of_focus_out_when_asked(option):
    given = xml_defaults('CellDetection')
    assert getattr(given, option) is False is getattr(DetectionSettings(), option)  # off by default, alike
    setattr(given, option, True)
    settings = task_module('CellDetection').settings_from(given)
    assert getattr(settings, option) is True and settings.identity()[option] is True
    assert option not in DetectionSettings().identity()  # earlier runs keep their identity


def test_the_task_takes_a_rectangle_or_polygons_drawn_in_histomicsui():
    settings_from = task_module('CellDetection').settings_from
    given = xml_defaults('CellDetection')
    region = ET.parse(os.path.join(CLI_DIR, 'CellDetection', 'CellDetection.xml')).getroot().find('.//region')
    assert set(region.get('shapes').split(',')) == {'rectangle', 'polygon', 'multipolygon'}  # the panel's buttons
    given.analysis_roi = [10.0, 20.0, 30.0, 40.0]
    assert (settings_from(given).roi, settings_from(given).polygons) == ((10, 20, 30, 40), None)
    given.analysis_roi = [0.0, 0.0, 100.0, 0.0, 100.0, 50.0, 0.0, 50.0, -1.0, -1.0, 200.0, 200.0, 300.0, 200.0, 250.0,
                          300.0, 200.0, 300.0]
    settings = settings_from(given)
    assert settings.roi == (0, 0, 300, 300) and [len(p) for p in settings.polygons] == [4, 4]
    given.analysis_roi = [0.0, 0.0, 1.0]
    with pytest.raises(CellRCNNError, match='a region is X,Y,W,H'):
        settings_from(given)


def numeric_parameters(task):
    """``{name: (minimum, maximum, step)}`` of the task's integer and double parameters, from their constraints."""
    root = ET.parse(os.path.join(CLI_DIR, task, f'{task}.xml')).getroot()
    found = {}
    for element in [*root.iter('integer'), *root.iter('double')]:
        kind = int if element.tag == 'integer' else float
        found[element.findtext('name')] = tuple(kind(element.findtext(f'constraints/{bound}'))
                                                for bound in ('minimum', 'maximum', 'step'))
    return found


@pytest.mark.parametrize('task, names', [
    ('CellDetection', {'threshold', 'nms_iou', 'adapt_tiles', 'analysis_mag', 'base_mpp', 'analysis_tile_size',
                       'tile_overlap', 'min_tissue_frac', 'batch_size'}),
    ('TrainCellDetector', {'point_size', 'holdout', 'steps', 'batch_size', 'learning_rate'})])
def test_the_task_bounds_are_the_library_bounds(task, names):
    """Every number a DSA user can type is bounded in the XML (what HistomicsUI shows) as the library bounds it: each
    bound passes the settings' validate (DetectionSettings, AnnotationTrainingSettings), a step beyond it is refused
    (a minimum of -1 is 'the model's or the slide's own', which the task reads as None)."""
    settings_from = task_module(task).settings_from
    parameters = numeric_parameters(task)
    assert set(parameters) == names

    def settings(name, value):
        given = xml_defaults(task)
        setattr(given, name, value)
        if name == 'tile_overlap':  # below half the tile size: the largest tile takes the largest overlap
            given.analysis_tile_size = parameters['analysis_tile_size'][1]
        if name == 'analysis_tile_size':  # and the smallest tile the smallest overlap
            given.tile_overlap = parameters['tile_overlap'][0]
        return settings_from(given)

    for name, (low, high, step) in parameters.items():
        settings(name, high).validate()
        settings(name, low).validate()
        with pytest.raises(CellRCNNError, match='must be between'):
            settings(name, high + step).validate()
        if low != -1:
            with pytest.raises(CellRCNNError, match='must be between'):
                settings(name, low - step).validate()
