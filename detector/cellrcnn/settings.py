"""Settings of a detection run, and of training from annotations: the single source of their defaults.

``cellrcnn detect`` / ``batch`` (``__main__``), the DSA tasks (``cli/*/*.xml``; a test checks their defaults against
these) and the library all take their defaults from here: the stages (``tiling``, ``inference``, ``slide_detection``)
take these values as required arguments and keep no defaults of their own, and this module imports none of them
(a scheduler's address is checked by ``dask_cluster``, imported when one is given).
None means "the model's or the slide's own value".
"""

import dataclasses
import numbers
import os
import typing
from dataclasses import dataclass

from .errors import CellRCNNError

#: what a setting of each declared type accepts, and the words for it in an error
_KINDS = {int: (numbers.Integral, 'a whole number'), float: (numbers.Real, 'a number'),
          str: ((str, os.PathLike), 'a string'), tuple: ((tuple, list), 'a sequence'), bool: (bool, 'true or false')}


#: the values each numeric detection setting may take, ``(lowest, highest)``, both allowed; the overlap is also below
#: half the tile size. They keep a run's memory in bounds whoever asks for it (a DSA task is started by any user):
#: the tile side bounds one read (4096² analysis px: 48 MiB of RGB), the batch the model's input, ``adapt_tiles`` the
#: crops adaptation holds, ``workers`` the reader threads. The DSA task's XML states the same bounds in its
#: ``constraints`` (tests/test_slicer_cli.py checks that they agree); docs/security.md lists them.
BOUNDS = {'magnification': (1.0, 100.0), 'mpp': (0.05, 20.0), 'tile_size': (64, 4096), 'overlap': (16, 2047),
          'min_tissue': (0.0, 1.0), 'threshold': (0.0, 1.0), 'nms': (0.0, 1.0), 'adapt_tiles': (0, 256),
          'batch_size': (1, 64), 'workers': (0, 32)}

#: the same for training from annotations (:class:`AnnotationTrainingSettings`; the TrainCellDetector task's XML states
#: them too): ``max_region_megapixels`` bounds the pixels one annotated region keeps (4096: 12 GB of RGB), the batch
#: the crops of a step, the steps the time a run may hold a worker.
TRAINING_BOUNDS = {'point_size_um': (0.5, 100.0), 'holdout': (0.01, 10_000), 'steps': (1, 100_000),
                   'batch_size': (1, 64), 'lr': (1e-6, 1.0), 'max_region_megapixels': (1, 4096)}

#: the choices of ``DetectionSettings.display``
DISPLAYS = ('auto', 'boxes', 'map', 'pixelmap')

#: the choices of ``ResultSettings.views``, the default first (``cellrcnn.views``)
VIEWS = (1, 2, 4, 8)


def check_views(views):
    """A one-line CellRCNNError unless ``views`` is one of :data:`VIEWS`."""
    if views not in VIEWS:
        raise CellRCNNError(f'views must be one of {", ".join(map(str, VIEWS))}, not {views!r}')


def _declared(annotation):
    """The type a field declares, without its ``| None``."""
    return next((a for a in typing.get_args(annotation) if a is not type(None)), annotation)


def _check(settings, bounds):
    """One-line CellRCNNErrors for settings (a dataclass) not of their declared kind (a whole number, a number, a
    string, a sequence, true or false; None only where the default is None) or outside ``bounds``, ``{name: (lowest,
    highest)}``, both allowed."""
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if value is None and f.default is None:
            continue
        declared = _declared(f.type)
        accepted, kind = _KINDS[declared]
        if isinstance(value, bool) != (declared is bool) or not isinstance(value, accepted):
            raise CellRCNNError(f'{f.name} must be {kind}, not {repr(value)[:40]}')
    for name, (low, high) in bounds.items():
        value = getattr(settings, name)
        if value is not None and not low <= value <= high:
            raise CellRCNNError(f'{name} must be between {low:g} and {high:g}, not {value:g}')


@dataclass(frozen=True)
class ResultSettings:
    """The settings that change a result: which nuclei are found and how they are drawn. With the slide and the model
    file they identify a run: its resume key (``resume.run_key``), cohort skipping (``cohort.fingerprint``) and the
    annotation's ``params`` attribute."""

    #: analysis magnification (None: the model's, 20x)
    magnification: float | None = None
    #: micrometres per base pixel, for slides that do not state it (None: the slide's own)
    mpp: float | None = None
    #: region of interest ``(x, y, width, height)`` in **base** pixels (None: the whole slide)
    roi: tuple | None = None
    #: polygons the region is cut to, each a tuple of ``(x, y)`` points in base pixels, ``roi`` their bounding box
    #: (None: the rectangle ``roi`` is the region); :mod:`cellrcnn.region` makes both from a region's numbers
    polygons: tuple | None = None
    #: the name of the Girder annotations ``roi`` and ``polygons`` were read from (``region.girder_region``), recorded
    #: with the result so that the Girder plugin knows a folder run's slides done
    region_annotation: str | None = None
    #: tile side and overlap in **analysis** pixels
    tile_size: int = 1024
    overlap: int = 64
    #: tiles with less tissue than this fraction are read only where their tissue lies, tiles without tissue not at
    #: all (``tiling.tile_grid``); 0 reads every tile whole
    min_tissue: float = 0.05
    #: score threshold (None: the model's calibrated operating point)
    threshold: float | None = None
    #: NMS IoU threshold (None: the model's)
    nms: float | None = None
    #: anchor density upsampling at inference (None: the model's)
    anchor_upsample: int | None = None
    #: re-estimate the model's BatchNorm statistics on this many of the slide's tissue tiles first (0: off). Off by
    #: default: on the real sample's loose dermis it added boxes on collagen and glass (docs/real-tissue.md).
    adapt_tiles: int = 0
    #: annotation element per nucleus: 'rectangle' or 'point'
    element: str = 'rectangle'
    #: keep only nuclei of these cell types, names of the model's ``ModelConfig.cell_types`` (None: every nucleus),
    #: held in name order whatever order they are given in (:meth:`__post_init__`)
    classes: tuple | None = None
    #: views each tile is seen in, flipped and turned, their detections fused (one of :data:`VIEWS`; ``views``): more
    #: accurate, and as many times the model's time. 1: the tile as it is.
    views: int = 1
    #: take large green or blue areas for tissue, not for pen ink (special stains such as Masson's trichrome or
    #: alcian blue colour tissue so; ``tissue.find_tissue``'s ``ink``): only black fill is left out
    keep_blue_green: bool = False
    #: leave the tissue out of focus (``cellrcnn.focus``) out of the counts, as pen ink is: the nuclei found there are
    #: dropped and its area is not in ``tissue_mm2``, so counts and densities are of the tissue in focus. Off by
    #: default: it is counted, and flagged (``out_of_focus_mm2``, ``detections_out_of_focus``).
    leave_out_of_focus: bool = False

    def __post_init__(self):
        """Cell types given as a list or tuple of names are held as a tuple in name order, as the Girder plugin's
        folder runs hold them: the same types asked in another order are the same run (its key, its recorded params,
        the cohort table's ``classes``). Anything else is left for :meth:`DetectionSettings.validate` to refuse."""
        if isinstance(self.classes, (list, tuple)) and all(isinstance(name, str) for name in self.classes):
            object.__setattr__(self, 'classes', tuple(sorted(self.classes)))

    def identity(self) -> dict:
        """The result settings as a plain dict (what run keys hash and annotations record); on a
        :class:`DetectionSettings` too, only these. ``classes``, ``polygons`` and ``region_annotation`` are left out
        when None, ``views`` when 1 and ``keep_blue_green`` and ``leave_out_of_focus`` when False, so the identity of a
        run without them is what it was before the settings existed."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(ResultSettings)}
        for name, unset in (('classes', None), ('views', 1), ('polygons', None), ('keep_blue_green', False),
                            ('leave_out_of_focus', False), ('region_annotation', None)):
            if values[name] == unset:
                del values[name]
        return values

    def type_indices(self, cell_types: tuple) -> tuple | None:
        """The indices into a model's ``cell_types`` of the types :attr:`classes` keeps, in the model's order (None:
        no filter); a one-line CellRCNNError for a name the model does not have, or a model without cell types."""
        if self.classes is None:
            return None
        if not cell_types:
            raise CellRCNNError(f'classes {", ".join(self.classes)} asked for, but the model has no cell types')
        unknown = [name for name in self.classes if name not in cell_types]
        if unknown:
            raise CellRCNNError(f'unknown class {unknown[0]!r}: the model\'s cell types are {", ".join(cell_types)}')
        return tuple(i for i, name in enumerate(cell_types) if name in self.classes)


@dataclass(frozen=True)
class DetectionSettings(ResultSettings):
    """Everything that chooses what a detection run computes (:class:`ResultSettings`) and how fast (the rest)."""

    #: checkpoint file (None: the bundled model)
    model: str | None = None
    #: tiles per model call: 2 on a CPU runs as fast as more and keeps memory low; a GPU gains from 8 or more
    batch_size: int = 2
    #: tile reader threads
    workers: int = 2
    device: str = 'auto'
    #: where tile batches run: 'local:N' (N local processes) or a scheduler address that
    #: :func:`cellrcnn.dask_cluster.scheduler_route` accepts (None: in this process)
    scheduler: str | None = None
    #: 'auto', 'bar', 'slicer' or 'none' (``progress.Progress``)
    progress: str = 'auto'
    #: what HistomicsUI shows when the slide is opened: 'boxes' (the nuclei annotation), 'map' (the nuclei map),
    #: 'pixelmap' (the nuclei pixelmap, when the run writes one) or 'auto' (the boxes of a small result, the pixelmap
    #: or else the map of a large one: ``nuclei_map.shown_on_open``). It changes how a result is shown, not which
    #: nuclei it holds.
    display: str = 'auto'

    def result(self) -> 'ResultSettings':
        """The :class:`ResultSettings` part, as asked for (None still meaning the model's or slide's own)."""
        return ResultSettings(**self.identity())

    def validate(self) -> 'DetectionSettings':
        """Check these settings once, where a run starts (``job``, ``cohort``), each with a one-line CellRCNNError: each
        is of its declared kind (a whole number, a number, a string, a sequence; None only where None means the model's
        or the slide's own value); numbers lie within :data:`BOUNDS`, the overlap below half the tile size;
        ``classes`` name distinct types; ``polygons`` come with their ``roi``; ``views`` is one of :data:`VIEWS`; a
        ``scheduler`` is one :func:`cellrcnn.dask_cluster.scheduler_route` accepts.
        What depends on the slide or the model is checked by the stage that has it: ``tiling.tile_grid`` (the number of
        tiles), ``slide.Slide`` (the scale, the ROI, the slide's own tile size), the model's configuration (anchor
        density; NMS above 0), the job (``classes`` against the model's cell types: :meth:`type_indices`).
        :returns: the settings."""
        _check(self, BOUNDS)
        if self.display not in DISPLAYS:
            raise CellRCNNError(f'display must be one of {", ".join(DISPLAYS)}, not {repr(self.display)[:40]}')
        check_views(self.views)
        if self.classes is not None and (not self.classes or len(set(self.classes)) != len(self.classes) or
                                         not all(isinstance(name, str) and name for name in self.classes)):
            raise CellRCNNError(f'classes must be distinct cell type names, not {repr(self.classes)[:40]}')
        if self.polygons is not None and self.roi is None:
            raise CellRCNNError('polygons need their bounding box as the roi (cellrcnn.region.region_settings)')
        if not 2 * self.overlap < self.tile_size:
            raise CellRCNNError(f'overlap must be below half the tile size {self.tile_size}, not {self.overlap}')
        if self.scheduler is not None:
            from .dask_cluster import scheduler_route

            scheduler_route(self.scheduler)
        return self


@dataclass(frozen=True)
class AnnotationTrainingSettings:
    """Training a model from nuclei annotated in HistomicsUI (``cellrcnn train-girder``, the TrainCellDetector task)."""

    #: label of the rectangles/polygons that outline the annotated region (none: the bounding box of the nuclei)
    region_label: str = 'region'
    #: side of the square box around a point annotation, in micrometres (a typical nucleus is 6-12 um across)
    point_size_um: float = 8.0
    #: held-out slides: a count (a whole number, 1: the last slide) or a fraction between 0 and 1
    holdout: float = 1.0
    steps: int = 300
    batch_size: int = 4
    lr: float = 1e-3
    seed: int = 0
    #: checkpoint to fine-tune (None: the bundled model)
    init: str | None = None
    #: train from random weights (with ``init``'s configuration) instead of fine-tuning
    from_scratch: bool = False
    device: str = 'auto'
    #: cell types to learn, ``NAME`` or ``NAME=LABEL+LABEL`` (the classes in the annotations that mean it, as in
    #: ``cellrcnn train --cell-types``); empty: no classifier (or the starting model's own cell types)
    cell_types: tuple = ()
    #: where a nucleus' class comes from: 'label' (its label, else its style group), 'group', or 'annotation' (the
    #: name of the annotation holding it; the cell types' names and labels are then annotation names to read)
    class_from: str = 'label'
    #: the most analysis pixels (millions) one annotated region keeps in memory: past it only the tiles holding its
    #: nuclei are kept, and a region whose nuclei alone need more is refused (``labelled_slides.region_tiles``)
    max_region_megapixels: float = 256.0

    def validate(self) -> 'AnnotationTrainingSettings':
        """Check these settings where a run starts (``girder_training.train_from_girder``), each with a one-line
        CellRCNNError: each is of its declared kind, numbers lie within :data:`TRAINING_BOUNDS`. What depends on the
        slides is checked where they are known (``girder_training.holdout_count``: a count or a fraction).
        :returns: the settings."""
        _check(self, TRAINING_BOUNDS)
        return self
