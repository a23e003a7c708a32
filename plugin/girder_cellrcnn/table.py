"""The per-slide results table of a folder tree: one row per slide the user can read, with the summary of its
cellrcnn result (item metadata, :data:`girder_cellrcnn.results.META_KEY`: its newest result), as JSON rows or
streamed CSV. Given a scope (``scope``: the whole slide, or inside the slide's annotations of one name), each row
holds the slide's newest result that counted it instead (:func:`girder_cellrcnn.results.newest_summary`): a slide
keeps its whole-slide result beside its count inside the tumour.

The table's columns are :data:`COLUMNS` and then the cell-type columns (:mod:`girder_cellrcnn.cell_types`) of every
classified result among the slides the user can read (:func:`table_columns`: a first pass over the tree, so that
every row, and every page, has the same columns), empty where a slide's model lacks the type."""

import csv
import io

from . import cell_types
from .results import META_KEY, iter_slides, newest_summary

COLUMNS = ('name', 'path', 'item_id', 'cells', 'tissue_mm2', 'cells_per_mm2', 'ink_or_fill_mm2', 'out_of_focus_mm2',
           'cells_out_of_focus', 'out_of_focus_left_out', 'keep_blue_green', 'threshold', 'magnification', 'classes',
           'views', 'score_mean', 'score_median', 'model', 'cellrcnn_version', 'roi', 'region_annotation',
           'annotation_id', 'date')
#: a CSV cell starting with one of these is a formula to spreadsheets: it gets a leading ' (OWASP's advice)
FORMULA_START = ('=', '+', '-', '@', '\t', '\r')
TABLE_FIELDS = ['_id', 'name', 'folderId', 'largeImage', f'meta.{META_KEY}']
#: what :func:`table_columns` reads of an item: what iter_slides needs, the result's cell types, and the folder (whose
#: access says who may write to the item: :func:`girder_cellrcnn.results.newest_summary`)
TYPE_FIELDS = ['_id', 'name', 'folderId', 'largeImage', f'meta.{META_KEY}.cell_types',
               f'meta.{META_KEY}.{cell_types.RATIO_KEY}']


def _result(item, scope=None):
    if scope is not None:
        return newest_summary(item, scope) or {}
    result = (item.get('meta') or {}).get(META_KEY)
    return result if isinstance(result, dict) else {}


def table_columns(folder, user, scope=None):
    """The columns of the folder tree's table for ``user``: :data:`COLUMNS`, then the cell-type columns of the
    results of the slides ``user`` can read (none when no result has cell types); of those of ``scope`` when given."""
    return COLUMNS + cell_types.union(cell_types.columns(_result(item, scope), COLUMNS)
                                      for _, item, _ in iter_slides(folder, user, fields=TYPE_FIELDS))


def table_rows(folder, user, columns, scope=None):
    """One row (a dict with ``columns``: :func:`table_columns`) per slide in the folder tree that ``user`` can read,
    as a generator, with its newest result (that of ``scope`` when given); the result columns are None for slides
    without one. (A cell type that a result saved since :func:`table_columns` brings is left out, as it is from the
    header.)"""
    types = dict.fromkeys(columns[len(COLUMNS):])
    for path, item, _ in iter_slides(folder, user, fields=TABLE_FIELDS):
        result = _result(item, scope)
        score = result.get('score') if isinstance(result.get('score'), dict) else {}
        yield {
            'name': item['name'], 'path': path, 'item_id': str(item['_id']),
            'cells': result.get('cells'), 'tissue_mm2': result.get('tissue_mm2'),
            'cells_per_mm2': result.get('cells_per_mm2'), 'ink_or_fill_mm2': result.get('ink_or_fill_mm2'),
            'out_of_focus_mm2': result.get('out_of_focus_mm2'), 'cells_out_of_focus': result.get('cells_out_of_focus'),
            'out_of_focus_left_out': result.get('out_of_focus_left_out'),
            'keep_blue_green': result.get('keep_blue_green'),
            'threshold': result.get('threshold'), 'magnification': result.get('magnification'),
            'classes': ','.join(result['classes']) if result.get('classes') else None, 'views': result.get('views'),
            'score_mean': score.get('mean'),
            'score_median': score.get('p50'), 'model': result.get('model'),
            'cellrcnn_version': result.get('cellrcnn_version'),
            'roi': ','.join(str(v) for v in result['roi']) if result.get('roi') else None,
            'region_annotation': result.get('region_annotation'),
            'annotation_id': result.get('annotation_id'), 'date': result.get('date'),
            **types, **{k: v for k, v in cell_types.columns(result, COLUMNS).items() if k in types},
        }


def csv_cell(value):
    """A CSV cell: empty for None; text that a spreadsheet would run as a formula (starting with = + - @, a tab or
    a carriage return) gets a leading single quote."""
    if value is None:
        return ''
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value


def table_csv_lines(rows, columns):
    """The rows as CSV text, a header line (``columns``, cells made :func:`csv_cell` as a type's name may start a
    formula) then one line per row, as a generator of strings."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator='\n')

    def take():
        text = out.getvalue()
        out.seek(0)
        out.truncate()
        return text

    writer.writerow({k: csv_cell(k) for k in columns})
    yield take()
    for row in rows:
        writer.writerow({k: csv_cell(row[k]) for k in columns})
        yield take()
