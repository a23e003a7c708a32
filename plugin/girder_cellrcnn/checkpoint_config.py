"""A cellrcnn checkpoint's configuration, the parts a folder run uses, read without torch and without running
anything the file holds.

``torch.save`` writes a zip archive whose ``<name>/data.pkl`` is a pickle of the checkpoint's payload
(``cellrcnn.checkpoint``: its ``format`` header, the model's ``config``, the ``state_dict``); each tensor's bytes are
a record of their own. The pickle is read with the standard library's unpickler restricted as Python's documentation
shows ("Restricting Globals"): the only globals it resolves are those torch's pickle names for tensors, each to a
stand-in that builds nothing, a tensor's storage (a persistent id) is None, and any other global refuses the file.
So no code from the file runs, no tensor is read, and a file of gigabytes costs the reading of its zip directory and
one small record.
"""

import collections
import io
import pickle
import zipfile

FORMAT = 'cellrcnn-checkpoint'  # cellrcnn.checkpoint.FORMAT
#: the most bytes a checkpoint's pickle (its settings and the tensors' names, not their values) may take: the bundled
#: model's is 17 kB, and a model of some 3000 tensors fits. A pickle's opcodes of one byte each can build an object of
#: some 80 bytes, and a zip stores such a pickle in next to nothing, so this bounds what any user who may upload a
#: file makes the server hold per request (about 20 MB)
PICKLE_MAX_BYTES = 256 << 10
#: the threshold as checkpoints older than its name stored it (cellrcnn.checkpoint.RENAMED_SETTINGS)
OLD_THRESHOLD = 'detect_thresh'
#: the model settings a checkpoint may hold: the fields of cellrcnn.config.ModelConfig and the older names of
#: cellrcnn.checkpoint.RENAMED_SETTINGS, of the cellrcnn this plugin ships with (its task image's)
MODEL_SETTINGS = frozenset((
    'anchor_offsets', 'anchor_sizes', 'anchor_upsample', 'aspect_ratios', 'backbone', 'backbone_stages',
    'backbone_width', 'box_batch_size_per_image', 'box_head_channels', 'box_positive_fraction',
    'box_score_thresh', 'cell_type_bias', 'cell_type_colors', 'cell_type_labels', 'cell_types',
    'centre_distance_um', 'class_names', 'detect_thresh', 'detections_per_mpx', 'extra', 'fpn_channels',
    'image_mean', 'image_std', 'mpp', 'nms_thresh', 'rpn_batch_size_per_image', 'rpn_conv_depth', 'rpn_levels',
    'rpn_nms_thresh', 'rpn_nms_thresh_test', 'rpn_post_nms_per_mpx_test', 'rpn_post_nms_per_mpx_train',
    'rpn_pre_nms_per_mpx_test', 'rpn_pre_nms_per_mpx_train', 'rpn_score_thresh', 'score_thresh',
    'stain_reference', 'stain_strength', 'threshold'))
#: why a file is refused when torch would not read it (cellrcnn.checkpoint.load_checkpoint's words)
NOT_A_MODEL_FILE = 'not a readable checkpoint (not a whole model file as torch writes them; cellrcnn train writes one)'


def _stand_in(*args, **kwargs):
    return None


def _tensor_global(module, name):
    """What a global torch's pickle names for tensors resolves to here; None for any other global."""
    if module == 'collections' and name == 'OrderedDict':  # a state_dict
        return collections.OrderedDict
    if (module == 'torch._utils' and name in ('_rebuild_tensor_v2', '_rebuild_parameter')
            or module in ('torch', 'torch.storage') and name.endswith('Storage')):
        return _stand_in
    return None


class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        found = _tensor_global(module, name)
        if found is None:
            raise pickle.UnpicklingError(f'it names {module}.{name}, which a checkpoint does not hold')
        return found

    def persistent_load(self, pid):
        return None  # a tensor's storage: its own record, never read


def _payload(handle):
    """The checkpoint's payload (a dict, tensors as None) from ``handle``, a seekable binary file.
    :raises ValueError: why it is not one, in words that follow "the file is"."""
    try:
        archive = zipfile.ZipFile(handle)
    except (zipfile.BadZipFile, OSError, EOFError):
        raise ValueError(NOT_A_MODEL_FILE) from None
    with archive:
        pickles = [info for info in archive.infolist() if info.filename.endswith('/data.pkl')]
        if len(pickles) != 1:
            raise ValueError(NOT_A_MODEL_FILE)
        if pickles[0].file_size > PICKLE_MAX_BYTES:
            raise ValueError(f'too large a checkpoint to read (its settings take {pickles[0].file_size} bytes, '
                             f'more than {PICKLE_MAX_BYTES})')
        try:
            with archive.open(pickles[0]) as record:
                data = record.read()  # zipfile never reads past the record's stated size, checked above
        # a damaged record, an unknown compression, an encrypted one (RuntimeError)
        except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, RuntimeError) as exc:
            raise ValueError(f'not a readable checkpoint ({exc})') from None
    try:
        return _Unpickler(io.BytesIO(data)).load()
    except Exception as exc:  # a damaged or crafted pickle can raise any error
        reason = str(exc).splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ValueError(f'not a readable checkpoint ({reason})') from None


def read_config(handle):
    """The configuration a result records (``model_config``) of the cellrcnn checkpoint in ``handle`` (a seekable
    binary file), the parts a folder run uses (``run_choices.of_model``): ``cell_types`` (a list of names, empty
    for a model without), and ``threshold`` and ``mpp`` where the checkpoint states them.
    :raises ValueError: why the file is not a cellrcnn checkpoint, in words that follow "the file is"."""
    payload = _payload(handle)
    if not isinstance(payload, dict) or payload.get('format') != FORMAT:
        raise ValueError(f'not a cellrcnn checkpoint (no "{FORMAT}" header)')
    config = payload.get('config')
    if not isinstance(config, dict):
        raise ValueError('an incomplete cellrcnn checkpoint (no model configuration)')
    unknown = sorted(str(name) for name in set(config) - MODEL_SETTINGS)
    if unknown:  # the task would fail on every slide: a newer cellrcnn wrote the file
        raise ValueError(f'a cellrcnn checkpoint with model settings that the task\'s cellrcnn does not know: '
                         f'{", ".join(unknown)} (written by cellrcnn {payload.get("version", "of unknown version")})')
    cell_types = config.get('cell_types') or ()
    if not isinstance(cell_types, (list, tuple)) or not all(isinstance(name, str) for name in cell_types):
        raise ValueError('a cellrcnn checkpoint whose cell types are not a list of names')
    known = {'cell_types': list(cell_types)}
    threshold = config.get('threshold', config.get(OLD_THRESHOLD))
    for name, value in (('threshold', threshold), ('mpp', config.get('mpp'))):
        if value is not None:
            known[name] = value
    return known
