"""The cell types of a classified result (a model with a cell-type classifier): per type its count, its density per
mm² of tissue and its fraction of the typed nuclei, and lymphocytes per tumour cell, as in the library's cohort
table (``cellrcnn.cohort``).

A run records its counts in its annotation's ``attributes.stats.cell_types`` (``{name: count}``, in the model's
order; absent for a model without cell types). In the item metadata they are a list, in that order, of
``{"name", "count", "per_mm2", "fraction"}`` (a list: a class name may hold characters a metadata key may not), and
``lymphocyte_per_tumour`` when the model has both types (None when it found no tumour cell). In the results table
each type has the columns ``<name>_count``, ``<name>_per_mm2`` and ``<name>_fraction`` (``<name>_type_...`` for a
type whose columns would be the table's own, a type named ``cells``), then ``lymphocyte_per_tumour``.

The names are written twice on purpose (the plugin imports nothing of cellrcnn); tests/test_plugin_contract.py
imports this module (pure Python, no Girder) by its path and compares it with the library.
"""

#: at most this many cell types, with names of at most this many characters (``cellrcnn.config``'s limits)
MAX_TYPES, NAME_MAX_CHARS = 64, 100
#: the columns of each cell type: ``<name>`` and these
SUFFIXES = ('_count', '_per_mm2', '_fraction')
#: lymphocytes per tumour cell: a table column and a metadata key
RATIO_KEY = 'lymphocyte_per_tumour'
#: the cell type names (any case) that count as lymphocytes and as tumour cells for the ratio
LYMPHOCYTE_NAMES = ('lymphocyte', 'lymphocytes')
TUMOUR_NAMES = ('tumour', 'tumor', 'tumours', 'tumors', 'neoplastic')


def _valid_name(name):
    return isinstance(name, str) and 0 < len(name) <= NAME_MAX_CHARS and name.isprintable()


def valid_counts(counts):
    """Whether a run's ``stats.cell_types`` is ``{name: count}`` of at most :data:`MAX_TYPES` short printable names
    and whole counts from 0."""
    return (isinstance(counts, dict) and 0 < len(counts) <= MAX_TYPES and all(map(_valid_name, counts))
            and all(map(is_count, counts.values())))


def is_count(value):
    """Whether ``value`` is a whole count from 0 (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _first_named(names, wanted):
    return next((n for n in names if n.strip().lower() in wanted), None)


def summarise(counts, tissue_mm2):
    """The metadata entries of valid ``stats.cell_types`` (:func:`valid_counts`) over ``tissue_mm2`` (None when
    unknown): ``{"cell_types": [...], "lymphocyte_per_tumour": ...}``, the ratio only for a model with both."""
    total = sum(counts.values())
    summary = {'cell_types': [{'name': name, 'count': count,
                               'per_mm2': round(count / tissue_mm2, 3) if tissue_mm2 else None,
                               'fraction': round(count / total, 4) if total else None}
                              for name, count in counts.items()]}
    lymphocyte, tumour = _first_named(counts, LYMPHOCYTE_NAMES), _first_named(counts, TUMOUR_NAMES)
    if lymphocyte is not None and tumour is not None:
        summary[RATIO_KEY] = round(counts[lymphocyte] / counts[tumour], 3) if counts[tumour] else None
    return summary


def columns(result, taken):
    """The cell-type columns (name: value) of a result's metadata entry, in its types' order, the ratio last; none
    for a result without cell types. ``taken``: the table's own columns, which no type's column may be. The entry
    is item metadata, which writers of the item may change: entries without a valid name are left out."""
    types = result.get('cell_types')
    types = [t for t in types[:MAX_TYPES] if isinstance(t, dict) and _valid_name(t.get('name'))] \
        if isinstance(types, list) else []
    row = {}
    for entry in types:
        name = entry['name']
        stem = f'{name}_type' if any(name + suffix in taken for suffix in SUFFIXES) else name
        row.update({stem + suffix: entry.get(key) for suffix, key in zip(SUFFIXES, ('count', 'per_mm2', 'fraction'))})
    if types and RATIO_KEY in result:
        row[RATIO_KEY] = result[RATIO_KEY]
    return row


def union(column_lists):
    """The cell-type columns of many rows (each an iterable of column names): each once, in the order first met,
    the ratio last."""
    seen = dict.fromkeys(c for names in column_lists for c in names)
    return tuple(c for c in seen if c != RATIO_KEY) + ((RATIO_KEY,) if RATIO_KEY in seen else ())
