"""Exact cross-tile NMS that streams: one global greedy NMS over a whole slide, computed band by band.

The detection loop (``slide_detection``) reads overlapping tiles row by row and gets raw detections per tile;
objects in the overlaps
are detected more than once.  :class:`StreamingNMS` returns exactly the boxes that one
``torchvision.ops.nms(all_boxes, all_scores, iou)`` over every raw detection of the slide (in the order they were
added) would keep, in time linear in the number of detections and memory bounded by the undecided band.

Why it is exact.  Greedy NMS keeps box b iff no *kept* box a that outranks b (higher score; equal scores: the one
added first, as torchvision's stable descending sort does) has IoU(a, b) > threshold.  With threshold >= 0, IoU > 0
needs a positive-area intersection, so only boxes whose extents strictly overlap matter, and the suppression relation
is a DAG ordered by rank.  Every box is one of
  kept        all higher-ranked overlapping neighbours (IoU > threshold) are suppressed, and every box that can ever
              overlap it has been added: the caller promised that no later box has y1 < Y, and the box has y2 <= Y
              (a later box then has y1 >= y2 and cannot overlap it);
  suppressed  a kept box outranks it with IoU > threshold (final whatever arrives later);
  undecided   otherwise: it stays buffered, with its edges, until a later call decides it.
Kept boxes are emitted and dropped (no later box can overlap them), suppressed boxes are dropped (they suppress
nothing), undecided boxes stay, however far a chain of dependencies runs.  IoU is computed with exactly torchvision's
CPU arithmetic (same dtype, same operation order, the float result compared with the threshold in double precision),
so pairs at the threshold are decided identically.

Neighbours are found with a spatial hash of cells a little larger than ``max_box_size`` (a box larger than that in
either side is still handled exactly, by comparing it with every buffered box: slower, not wrong).
"""

import math

import numpy as np

from .errors import CellRCNNError

_UNDECIDED, _KEPT, _SUPPRESSED = 0, 1, 2


def concat_ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenated ranges [starts[i], starts[i] + counts[i]) as one index array."""
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    offsets = np.cumsum(counts) - counts
    return np.repeat(starts - offsets, counts) + np.arange(total, dtype=np.int64)


def _pair_iou(boxes, area, i, j):
    """IoU of pairs (i[k], j[k]) with torchvision's CPU kernel arithmetic, in the boxes' dtype."""
    zero = boxes.dtype.type(0)
    bi, bj = boxes[i], boxes[j]
    w = np.maximum(np.minimum(bi[:, 2], bj[:, 2]) - np.maximum(bi[:, 0], bj[:, 0]), zero)
    h = np.maximum(np.minimum(bi[:, 3], bj[:, 3]) - np.maximum(bi[:, 1], bj[:, 1]), zero)
    inter = w * h
    with np.errstate(divide='ignore', invalid='ignore'):
        return inter / ((area[i] + area[j]) - inter)


class StreamingNMS:
    """Global greedy NMS over boxes arriving in bands from top to bottom; see the module docstring.

    ``add`` the raw detections of each tile (slide pixels), call ``complete_up_to(y)`` when no later box can have
    y1 < y (after a row of tiles: the top of the next row's tiles) and collect what it returns, then ``finish()``.
    Boxes are compared in ``dtype`` (torchvision computes IoU in the boxes' dtype: float32 for float32 boxes).
    """

    def __init__(self, iou_threshold: float, max_box_size: float, *, dtype=np.float32):
        iou_threshold, max_box_size = float(iou_threshold), float(max_box_size)
        if not iou_threshold >= 0 or math.isinf(iou_threshold):  # also rejects NaN
            raise CellRCNNError(f'IoU threshold must be a number >= 0, not {iou_threshold}')
        if not max_box_size > 0 or math.isinf(max_box_size):
            raise CellRCNNError(f'max_box_size must be a positive number, not {max_box_size}')
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise CellRCNNError(f'StreamingNMS computes in float32 or float64, not {self.dtype}')
        self.iou_threshold = iou_threshold
        self.max_box_size = max_box_size
        self._cell = max_box_size * (1 + 1e-6)  # margin against rounding in floor(x / cell)
        self._promise = -math.inf  # no box added from now on may have y1 < this
        self._next_seq = 0
        self._score_dtype = None  # dtype of the scores handed back: what was passed in (at least float32)
        self._extra_shape = None  # trailing shape and dtype of `extra` rows, once known; False: no extras
        # undecided boxes, and the edges (src outranks dst, IoU > threshold) among them
        self._boxes = np.zeros((0, 4), self.dtype)
        self._scores = np.zeros(0, np.float64)  # float64 holds float32 and float64 scores with their order intact
        self._seq = np.zeros(0, np.int64)  # tie-break: lower seq outranks at equal score
        self._extra = None
        self._src = np.zeros(0, np.int64)
        self._dst = np.zeros(0, np.int64)
        self._pending = []  # added since the last resolution: (boxes, scores, seq, extra)
        self._n_pending = 0

    @property
    def buffered(self) -> int:
        """Boxes held now: undecided ones and those added since the last ``complete_up_to``."""
        return len(self._boxes) + self._n_pending

    def add(self, boxes: np.ndarray, scores: np.ndarray, extra: np.ndarray | None = None) -> None:
        """Raw detections of one tile (N x 4 x1, y1, x2, y2 slide px; N scores); `extra`: optional per-box payload
        rows (N x ..., e.g. class ids) handed back with the kept boxes."""
        self._add(boxes, scores, extra, None)

    def _add(self, boxes, scores, extra, seq):
        boxes = np.asarray(boxes)
        scores = np.asarray(scores)
        if boxes.size == 0 and scores.size == 0:
            return
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise CellRCNNError(f'boxes must be an N x 4 array (x1, y1, x2, y2), not shape {boxes.shape}')
        if scores.shape != (len(boxes),):
            raise CellRCNNError(f'expected {len(boxes)} scores (one per box), got shape {scores.shape}')
        if not np.issubdtype(scores.dtype, np.floating) and not np.issubdtype(scores.dtype, np.integer):
            raise CellRCNNError(f'scores must be numbers, not {scores.dtype}')
        boxes = np.ascontiguousarray(boxes, dtype=self.dtype)
        if not np.isfinite(boxes).all():
            raise CellRCNNError('box coordinates must be finite numbers')
        if np.isnan(scores).any():
            raise CellRCNNError('scores must not be NaN')
        y1 = boxes[:, 1].astype(np.float64)
        if (y1 < self._promise).any():
            raise CellRCNNError(f'a box with y1 = {y1.min():g} was added after complete_up_to({self._promise:g}) '
                                f'promised that no later box has y1 < {self._promise:g}')
        score_dtype = np.result_type(np.float32, scores.dtype)
        self._score_dtype = score_dtype if self._score_dtype is None else np.result_type(self._score_dtype,
                                                                                          score_dtype)
        if extra is not None:
            extra = np.asarray(extra)
            if extra.ndim == 0 or len(extra) != len(boxes):
                raise CellRCNNError(f'extra must hold one row per box ({len(boxes)}), not shape {extra.shape}')
            if self._extra_shape is None:
                self._extra_shape = extra.shape[1:]
            elif self._extra_shape is False or self._extra_shape != extra.shape[1:]:
                raise CellRCNNError('extra rows must be given for every non-empty add, with the same shape each time')
        elif self._extra_shape is None:
            self._extra_shape = False
        elif self._extra_shape is not False:
            raise CellRCNNError('extra rows must be given for every non-empty add, with the same shape each time')
        if seq is None:
            seq = np.arange(self._next_seq, self._next_seq + len(boxes), dtype=np.int64)
            self._next_seq += len(boxes)
        self._pending.append((boxes, scores.astype(np.float64), np.asarray(seq, np.int64), extra))
        self._n_pending += len(boxes)

    def complete_up_to(self, y: float) -> tuple:
        """Promise that no box added later has y1 < `y`; return the kept boxes that became final
        (boxes, scores, extras or None), highest score first."""
        y = float(y)
        if math.isnan(y):
            raise CellRCNNError('complete_up_to needs a number, not NaN')
        self._promise = max(self._promise, y)
        return self._resolve()

    def finish(self) -> tuple:
        """No more boxes: return all remaining kept boxes (boxes, scores, extras or None), highest score first."""
        self._promise = math.inf
        out = self._resolve()
        assert len(self._boxes) == 0, 'every box is decided once all boxes are in'
        return out

    # --- internals ------------------------------------------------------------------------------------------------

    def _empty_output(self):
        extra = None
        if self._extra_shape not in (None, False):
            extra = np.zeros((0,) + self._extra_shape, self._extra.dtype if self._extra is not None else np.int64)
        return np.zeros((0, 4), self.dtype), np.zeros(0, self._score_dtype or np.float32), extra

    def _resolve(self):
        n_old = len(self._boxes)
        if self._pending:
            boxes = np.concatenate([self._boxes] + [p[0] for p in self._pending])
            scores = np.concatenate([self._scores] + [p[1] for p in self._pending])
            seq = np.concatenate([self._seq] + [p[2] for p in self._pending])
            extra = None
            if self._extra_shape is not False:
                parts = ([] if self._extra is None else [self._extra]) + [p[3] for p in self._pending]
                extra = np.concatenate(parts)
            self._pending, self._n_pending = [], 0
        else:
            boxes, scores, seq, extra = self._boxes, self._scores, self._seq, self._extra
        if len(boxes) == 0:
            return self._empty_output()
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        src, dst = self._new_edges(boxes, area, scores, seq, n_old)
        src = np.concatenate([self._src, src])
        dst = np.concatenate([self._dst, dst])

        state = self._decide(len(boxes), src, dst, boxes[:, 3].astype(np.float64) <= self._promise)

        kept = np.flatnonzero(state == _KEPT)
        kept = kept[np.lexsort((seq[kept], -scores[kept]))]
        out = (boxes[kept], scores[kept].astype(self._score_dtype), None if extra is None else extra[kept])

        undecided = state == _UNDECIDED
        remap = np.cumsum(undecided) - 1
        live = undecided[src] & undecided[dst]
        self._src, self._dst = remap[src[live]], remap[dst[live]]
        self._boxes, self._scores, self._seq = boxes[undecided], scores[undecided], seq[undecided]
        self._extra = None if extra is None else extra[undecided]
        return out

    def _new_edges(self, boxes, area, scores, seq, n_old):
        """Edges (src outranks dst, IoU > threshold) between pairs of boxes of which at least one is new (>= n_old)."""
        m = len(boxes)
        b64 = boxes.astype(np.float64)
        # only boxes with positive extent can have a positive-area intersection, hence IoU > 0
        valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        big = valid & ((b64[:, 2] - b64[:, 0] > self.max_box_size) | (b64[:, 3] - b64[:, 1] > self.max_box_size))
        small = valid & ~big
        pairs_i, pairs_j = [], []

        # small-small pairs through the grid: a cell (by x1, y1) holds boxes whose strict overlaps lie in the 3 x 3
        # block of cells around it, since sides <= max_box_size < cell
        idx = np.flatnonzero(small)
        if len(idx) and (idx >= n_old).any():
            cx = np.floor(b64[idx, 0] / self._cell).astype(np.int64)
            cy = np.floor(b64[idx, 1] / self._cell).astype(np.int64)
            cx -= cx.min() - 1
            cy -= cy.min() - 1
            width = int(cx.max()) + 2
            if (int(cy.max()) + 2) * width >= 2 ** 62:
                raise CellRCNNError('box coordinates span too many cells of max_box_size for the spatial hash')
            key = cy * width + cx
            order = np.argsort(key, kind='stable')
            sorted_key = key[order]
            q = order[idx[order] >= n_old]  # positions in idx of the new boxes, in key order (faster searches)
            for dy in (-1, 0, 1):
                row = (cy[q] + dy) * width + cx[q]
                lo = np.searchsorted(sorted_key, row - 1, 'left')
                hi = np.searchsorted(sorted_key, row + 1, 'right')
                counts = hi - lo
                qi = np.repeat(q, counts)
                tj = order[concat_ranges(lo, counts)]
                gi, gj = idx[qi], idx[tj]
                keep = (gj < n_old) | (gj > gi)  # each pair once; old-old pairs are already known
                pairs_i.append(gi[keep])
                pairs_j.append(gj[keep])

        # pairs with a box larger than max_box_size: compared with everything (exact, only slower)
        if big.any():
            bigs = np.flatnonzero(big)
            alls = np.flatnonzero(valid)
            news = alls[alls >= n_old]
            big_news = bigs[bigs >= n_old]
            extra_i = [np.repeat(news, len(bigs)), np.repeat(big_news, len(alls))]
            extra_j = [np.tile(bigs, len(news)), np.tile(alls, len(big_news))]
            bi, bj = np.concatenate(extra_i), np.concatenate(extra_j)
            lo_, hi_ = np.minimum(bi, bj), np.maximum(bi, bj)
            key = np.unique(lo_[lo_ != hi_] * m + hi_[lo_ != hi_])
            pairs_i.append(key // m)
            pairs_j.append(key % m)

        if not pairs_i:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        i, j = np.concatenate(pairs_i), np.concatenate(pairs_j)
        # torchvision: suppress when (float IoU) > threshold compared in double precision
        hit = _pair_iou(boxes, area, i, j).astype(np.float64) > self.iou_threshold
        i, j = i[hit], j[hit]
        i_first = (scores[i] > scores[j]) | ((scores[i] == scores[j]) & (seq[i] < seq[j]))
        return np.where(i_first, i, j), np.where(i_first, j, i)

    @staticmethod
    def _decide(m, src, dst, complete):
        """States of m boxes: greedy NMS on the DAG of edges, leaving undecided what later boxes could change.

        Level by level (Kahn's order): a box whose higher-ranked neighbours are all decided is kept if complete,
        else stays undecided (and so do its dependants, unless a kept box suppresses them); the neighbours of a newly
        kept box are suppressed at once.  Cost: O(edges + boxes) plus a few numpy calls per level.
        """
        state = np.zeros(m, np.int8)
        if len(src) == 0:
            state[complete] = _KEPT
            return state
        order = np.argsort(src, kind='stable')
        out_dst = dst[order]
        indptr = np.zeros(m + 1, np.int64)
        np.cumsum(np.bincount(src, minlength=m), out=indptr[1:])
        waiting = np.bincount(dst, minlength=m)  # undecided higher-ranked neighbours
        ready = np.flatnonzero(waiting == 0)
        while len(ready):
            kept = ready[complete[ready]]  # ready boxes not complete stay undecided and never resolve
            state[kept] = _KEPT
            victims = out_dst[concat_ranges(indptr[kept], indptr[kept + 1] - indptr[kept])]
            victims = np.unique(victims[state[victims] == _UNDECIDED])
            state[victims] = _SUPPRESSED
            resolved = np.concatenate([kept, victims])
            targets = out_dst[concat_ranges(indptr[resolved], indptr[resolved + 1] - indptr[resolved])]
            if len(targets) == 0:
                break
            targets, counts = np.unique(targets, return_counts=True)
            waiting[targets] -= counts
            ready = targets[(waiting[targets] == 0) & (state[targets] == _UNDECIDED)]
        return state


def merge_all(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, max_box_size: float,
              chunk: int = 8192) -> np.ndarray:
    """Indices kept by global greedy NMS (``torchvision.ops.nms``: same indices, same order, highest score first),
    computed by streaming the boxes through :class:`StreamingNMS` in bands of `chunk` boxes sorted by y1."""
    boxes, scores = np.asarray(boxes), np.asarray(scores)
    if boxes.size == 0:
        return np.zeros(0, np.int64)
    dtype = np.float64 if boxes.dtype == np.float64 else np.float32
    nms = StreamingNMS(iou_threshold, max_box_size, dtype=dtype)
    if boxes.ndim != 2 or boxes.shape[1] != 4 or scores.shape != (len(boxes),):
        raise CellRCNNError(f'need N x 4 boxes and N scores, not shapes {boxes.shape} and {scores.shape}')
    y1 = boxes[:, 1].astype(dtype)
    order = np.argsort(y1, kind='stable')
    kept, kept_scores = [], []
    for start in range(0, len(order), chunk):
        part = order[start:start + chunk]
        nms._add(boxes[part], scores[part], part, part)
        if start + chunk < len(order):
            _, s, idx = nms.complete_up_to(float(y1[order[start + chunk]]))
        else:
            _, s, idx = nms.finish()
        kept.append(idx)
        kept_scores.append(s.astype(np.float64))
    kept, kept_scores = np.concatenate(kept), np.concatenate(kept_scores)
    return kept[np.lexsort((kept, -kept_scores))].astype(np.int64)
