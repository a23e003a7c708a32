"""The contract between the library and the Girder plugin, written on both sides on purpose: the plugin (plugin/,
girder_cellrcnn) stays torch-free and never imports cellrcnn. No Girder server is needed: the plugin's modules import
girder at their top, so their constants are read from their source with ``ast``.
"""

import ast
import os

import pytest

from cellrcnn import cohort, girder_post
from cellrcnn.checkpoint import BUNDLED_MODEL

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
    (girder_post.POST_KEY, 'rerun', 'POST_KEY'),  # set by the library's poster, which replaces earlier results itself
    (os.path.basename(BUNDLED_MODEL), 'results', 'DEFAULT_MODEL'),  # the model CellDetection runs without one given
    (cohort.FORMULA_STARTS, 'table', 'FORMULA_START'),  # CSV cells a spreadsheet would run get a leading quote
])
def test_the_library_and_the_plugin_agree(library, module, name):
    assert plugin_constant(module, name) == library
