"""The choices of a folder run (``batch``): the CellDetection task's parameters that change what a slide's count is.

A folder run may set each of :data:`CHOICES` (the score threshold, the analysis magnification, the cell types kept,
the views per tile, and the true-or-false choices of leaving tissue out of focus out and of keeping green and blue
areas as tissue); a slide counts as done, or running, only by a result or a job made with the same choices, the ones
the run does not set left at the task's defaults. A run's choices are a dict of the ones set, by their names in a
result's ``params`` (``cellrcnn.settings.ResultSettings.identity``), each value as ``params`` records it, the cell
types in name order. The same dict is read from a job's parameters as HistomicsUI or a folder run gave them to
slicer_cli_web (:func:`of_task`) and from a result's ``params`` (:func:`recorded`). A result records the threshold
and magnification it used, its model's own when none was chosen, so a result is compared (:func:`same`) with the
threshold and magnification its model takes by default (its recorded ``model_config``) taken as no choice; a run
takes them so too (:func:`of_model`, with the bundled model's configuration or the one a model file's checkpoint
holds).
"""

import json
import math

#: a task's boolean parameter on, as slicer_cli_web takes it from HistomicsUI
ON = 'true'
VIEWS = (1, 2, 4, 8)
#: the most cell types a run may keep, and the longest name of one
CLASSES_MAX, CLASS_NAME_MAX_CHARS = 50, 100


def _number(value, what, high):
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f'{what} must be a number, not {str(value)[:40]!r}') from None
    if math.isnan(number) or number > high:
        raise ValueError(f'{what} must be at most {high:g}, not {str(value)[:40]}')
    return number


def _threshold(value):
    """The task's threshold: below 0 (its -1) the model's calibrated threshold (None)."""
    number = _number(value, 'threshold', 1)
    return number if number >= 0 else None


def _magnification(value):
    """The task's analysis magnification: 0 or less (its -1) the model's own (None)."""
    number = _number(value, 'magnification', 100)
    return number if number > 0 else None


def _classes(value):
    """Cell type names, a list, a JSON list (as HistomicsUI sends a string-vector) or a comma-separated text, in name
    order; empty names are dropped, none at all is the task's default (every nucleus)."""
    names = value
    if isinstance(value, str):
        try:
            names = json.loads(value)
        except ValueError:
            names = value.split(',')
        if not isinstance(names, list):
            names = value.split(',')
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise ValueError(f'classes must be cell type names separated by commas, not {str(value)[:40]!r}')
    names = sorted({n.strip() for n in names if n.strip()})
    if len(names) > CLASSES_MAX or any(len(n) > CLASS_NAME_MAX_CHARS or not n.isprintable() for n in names):
        raise ValueError(f'classes takes at most {CLASSES_MAX} printable names of at most {CLASS_NAME_MAX_CHARS} '
                         'characters each')
    return names or None


def _views(value):
    try:
        views = int(str(value))
    except ValueError:
        views = None
    if views not in VIEWS:
        raise ValueError(f'views must be one of {", ".join(map(str, VIEWS))}, not {str(value)[:40]}')
    return views


def _on(value):
    if value in (True, ON):
        return True
    if value in (False, 'false', '', None):
        return False
    raise ValueError(f'a true-or-false choice must be true or false, not {str(value)[:40]!r}')


#: name in a result's ``params`` -> (the task's parameter, what reads a value of it, its value at the task's default)
CHOICES = {
    'threshold': ('threshold', _threshold, None),
    'magnification': ('analysis_mag', _magnification, None),
    'classes': ('classes', _classes, None),
    'views': ('views', _views, 1),
    'leave_out_of_focus': ('leave_out_of_focus', _on, False),
    'keep_blue_green': ('keep_blue_green', _on, False),
}


def _set(values, key):
    """The choices set among ``values``, keyed by ``key(params name, task name)``; None and absent values are the
    task's defaults. :raises ValueError: a value the task would not take."""
    choices = {}
    for name, (task, read, unset) in CHOICES.items():
        value = values.get(key(name, task))
        value = unset if value is None else read(value)
        if value != unset:
            choices[name] = value
    return choices


def of_task(params):
    """The choices among a task's parameters (names as the task's, values as HistomicsUI sends them or typed).
    :raises ValueError: a value the task would not take, in one line."""
    return _set(params, lambda name, task: task)


def recorded(params):
    """The choices a result's run recorded in its ``params`` (None when one of them is not a value a run records).
    A run records the threshold and the magnification it used, the model's own when none was chosen."""
    try:
        return _set(params, lambda name, task: name)
    except ValueError:
        return None


def _model_defaults(config):
    """The threshold and the magnification a run of a model takes when none is chosen: its calibrated threshold and
    the magnification of its pixels (10 / µm per pixel), from the checkpoint's configuration a result records
    (``model_config``; None: none recorded); those it does not state are left out."""
    config = config if isinstance(config, dict) else {}
    threshold, mpp = config.get('threshold'), config.get('mpp')
    defaults = {}
    if _is_number(threshold):
        defaults['threshold'] = threshold
    if _is_number(mpp) and mpp > 0:
        defaults['magnification'] = 10.0 / mpp
    return defaults


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _chosen(choices, defaults):
    """``choices`` without a threshold or magnification equal to the model's own (``defaults``)."""
    return {name: value for name, value in choices.items()
            if not (name in defaults and math.isclose(value, defaults[name], rel_tol=1e-9, abs_tol=1e-9))}


def same(params, model_config, choices):
    """Whether a result's run (its ``params`` and ``model_config``) made exactly ``choices`` (None: the task's
    defaults): a threshold or a magnification the same as its model's own is the default, whether chosen or not."""
    made = recorded(params)
    defaults = _model_defaults(model_config)
    return made is not None and _chosen(made, defaults) == _chosen(choices or {}, defaults)


def of_model(choices, config):
    """``choices`` for a model whose configuration is known (``config`` as a result records it, ``model_config``):
    a threshold or a magnification equal to the model's own is no choice, as :func:`same` takes it, so that a folder
    run naming them finds the slides' jobs made at the task's defaults (HistomicsUI's) and queues its own so.
    :raises ValueError: a cell type the model lacks, in the line the task would fail every slide's job with
    (``cellrcnn.settings``' ``type_indices``)."""
    cell_types, asked = config.get('cell_types') or (), choices.get('classes') or ()
    if asked and not cell_types:
        raise ValueError(f'classes {", ".join(asked)} asked for, but the model has no cell types')
    unknown = [name for name in asked if name not in cell_types]
    if unknown:
        raise ValueError(f'unknown class {unknown[0]!r}: the model\'s cell types are {", ".join(cell_types)}')
    return _chosen(choices, _model_defaults(config))


def task_params(choices):
    """The task's parameters that make ``choices``, as HistomicsUI gives them to slicer_cli_web (a list as JSON)."""
    params = {}
    for name, value in choices.items():
        task = CHOICES[name][0]
        params[task] = ON if value is True else json.dumps(value) if isinstance(value, list) else str(value)
    return params


def describe(choices):
    """``choices`` in words for a log: ``threshold 0.6 and leave_out_of_focus``."""
    return ' and '.join(name if value is True else f'{name} {",".join(value) if isinstance(value, list) else value}'
                        for name, value in choices.items())
