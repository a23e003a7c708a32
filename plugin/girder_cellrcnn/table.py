"""The per-slide results table of a folder tree: one row per slide the user can read, with the summary of its
cellrcnn result (item metadata, :data:`girder_cellrcnn.results.META_KEY`), as JSON rows or streamed CSV."""

import csv
import io

from .results import META_KEY, iter_slides

COLUMNS = ('name', 'path', 'item_id', 'cells', 'tissue_mm2', 'cells_per_mm2', 'score_mean', 'score_median',
           'model', 'cellrcnn_version', 'roi', 'annotation_id', 'date')
#: a CSV cell starting with one of these is a formula to spreadsheets: it gets a leading ' (OWASP's advice)
FORMULA_START = ('=', '+', '-', '@', '\t', '\r')
TABLE_FIELDS = ['_id', 'name', 'folderId', 'largeImage', f'meta.{META_KEY}']


def table_rows(folder, user):
    """One row (a dict with :data:`COLUMNS`) per slide in the folder tree that ``user`` can read, as a generator;
    the result columns are None for slides without a result."""
    for path, item, _ in iter_slides(folder, user, fields=TABLE_FIELDS):
        result = (item.get('meta') or {}).get(META_KEY)
        result = result if isinstance(result, dict) else {}
        score = result.get('score') if isinstance(result.get('score'), dict) else {}
        yield {
            'name': item['name'], 'path': path, 'item_id': str(item['_id']),
            'cells': result.get('cells'), 'tissue_mm2': result.get('tissue_mm2'),
            'cells_per_mm2': result.get('cells_per_mm2'), 'score_mean': score.get('mean'),
            'score_median': score.get('p50'), 'model': result.get('model'),
            'cellrcnn_version': result.get('cellrcnn_version'),
            'roi': ','.join(str(v) for v in result['roi']) if result.get('roi') else None,
            'annotation_id': result.get('annotation_id'), 'date': result.get('date'),
        }


def csv_cell(value):
    """A CSV cell: empty for None; text that a spreadsheet would run as a formula (starting with = + - @, a tab or
    a carriage return) gets a leading single quote."""
    if value is None:
        return ''
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value


def table_csv_lines(rows):
    """The rows as CSV text, a header line then one line per row, as a generator of strings."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator='\n')

    def take():
        text = out.getvalue()
        out.seek(0)
        out.truncate()
        return text

    writer.writeheader()
    yield take()
    for row in rows:
        writer.writerow({k: csv_cell(row[k]) for k in COLUMNS})
        yield take()
