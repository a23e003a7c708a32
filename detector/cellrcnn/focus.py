"""Tissue out of focus: where a slide's tissue is too blurred for its nuclei to be trusted.

A scanner that lost focus over part of a section leaves nuclei there smeared: the model misses many of them, and a
count or density over that tissue is low for no biological reason. The detection loop measures the blur of every
tile it reads, in patches of :data:`PATCH_UM` (``patch_blur``, in its reader threads), keeps the patches with the
tiles' rows (so a resumed run has them too), and paints them over the tissue mask (:func:`mark_blurred`): the tissue
whose sharpest view is blurred beyond :data:`BLUR_LIMIT` is ``out_of_focus_mm2`` in the run's figures, a layer of
the tissue outline annotation and of the overview PNG.

The measure is scikit-image's ``blur_effect`` (Crété-Roffet et al. 2007: how much of the image's edge strength a
further blur takes away; 0 sharp, 1 blurred) of each patch's grey levels, computed for all of a tile's patches in one
pass (a fifth of the time of ``blur_effect`` run patch by patch). It is normalised by the patch's own edges, so pale
and dark staining read alike. Its limit was set on real tissue at 20x, the sample slide and BRCA-M2C's 90
breast fields, each also blurred on purpose (``benchmarks/focus_blur.py``; docs/real-tissue.md, "Out of focus"), so
blur is judged at analysis scales near 0.5 um/px (:data:`MPP_RANGE`), and at finer ones (40x) on each tile reduced to
0.5 um/px first, as a 20x scan of the same tissue would be (:data:`FINEST_MPP`); at coarser ones nothing is judged.

Units: patches are ``(x0, y0, x1, y1, blur)`` rows in analysis pixels (float32).
"""

import numpy as np

#: side of a patch (um): a few nuclei and what lies between them
PATCH_UM = 64.0
#: a patch whose ``blur_effect`` is above this looks out of focus: in-focus fields stay below it (99th percentile
#: 0.42 on the breast fields and on the sample slide) and most of them rise above it once blurred by a Gaussian of
#: 1 um (docs/real-tissue.md)
BLUR_LIMIT = 0.5
#: the analysis scales (um/px) at which the limit holds: 20x, give or take 10 %
MPP_RANGE = (0.45, 0.55)
#: finer analysis scales, down to this one (um/px: 50x), are judged on each tile reduced to :data:`JUDGED_MPP` by
#: area averaging: the blur a 20x view of the tissue shows, in the same um, against the same limit
FINEST_MPP = 0.2
JUDGED_MPP = 0.5
#: a patch is judged only where at least this share of its pixels is darker than glass (grey below GLASS_GREY): the
#: edges of a few cells on glass say little of the focus (at a quarter, in-focus patches stay as far below the limit
#: as at a half, and more of a section's edge is judged)
MIN_STAINED = 0.25
GLASS_GREY = 225
#: the share of a slide's tissue out of focus from which its run's summary and its cohort's warn of it
OUT_OF_FOCUS_NOTE = 0.01
#: the floor of edge strengths (scikit-image's ``blur_effect``'s), which keeps a flat patch's ratio finite
EPSILON = 1e-10
#: no patches: the float32 rows ``patch_blur`` gives where it judges nothing
NO_PATCHES = np.zeros((0, 5), np.float32)


def tissue_judged_mm2(figures):
    """The tissue a run judged for focus (mm²), from its figures (its ``stats``, or its row of a cohort table): its
    ``tissue_mm2``, and for a run that left the tissue out of focus out (``out_of_focus_left_out``) that too."""
    blurred = float(figures.get('out_of_focus_mm2') or 0)
    return float(figures.get('tissue_mm2') or 0) + (blurred if figures.get('out_of_focus_left_out') is True else 0)


def out_of_focus_noted(figures):
    """Whether a run's tissue out of focus (its figures, as :func:`tissue_judged_mm2` takes them) is worth a word: at
    least :data:`OUT_OF_FOCUS_NOTE` of the tissue it judged (figures made before the library measured it never are)."""
    return float(figures.get('out_of_focus_mm2') or 0) >= OUT_OF_FOCUS_NOTE * tissue_judged_mm2(figures) > 0


def judges(mpp):
    """Whether blur is judged at ``mpp`` um per analysis pixel: at 20x (:data:`MPP_RANGE`) and finer scales down to
    :data:`FINEST_MPP`."""
    return FINEST_MPP <= mpp <= MPP_RANGE[1]


def patch_blur(image, x, y, mpp):
    """The blur of each patch of a tile: ``image`` (RGB uint8 at the analysis scale, ``mpp`` um a pixel) whose top
    left is analysis pixel ``(x, y)``, cut in squares of :data:`PATCH_UM` from its top left (the last row and column
    of patches reach to its edge when at least half a patch is left, else they join the patches before them). A tile
    finer than 20x is reduced to :data:`JUDGED_MPP` first, and its patches cut there.
    :returns: float32 rows ``(x0, y0, x1, y1, blur)`` in analysis pixels, one per patch with enough stain
    (:data:`MIN_STAINED`); none where blur is not judged at ``mpp`` (:func:`judges`)."""
    import cv2

    if not judges(mpp):
        return NO_PATCHES
    grey = cv2.cvtColor(np.ascontiguousarray(image[..., :3]), cv2.COLOR_RGB2GRAY)
    height, width = grey.shape
    if mpp < MPP_RANGE[0]:
        reduced = (max(1, round(width * mpp / JUDGED_MPP)), max(1, round(height * mpp / JUDGED_MPP)))
        grey = cv2.resize(grey, reduced, interpolation=cv2.INTER_AREA)
    fx, fy = width / grey.shape[1], height / grey.shape[0]  # analysis pixels per pixel judged
    side = int(round(PATCH_UM / (mpp * fx)))
    spans_y, spans_x = _spans(grey.shape[0], side), _spans(grey.shape[1], side)
    stained = _sums((grey < GLASS_GREY).view(np.uint8), spans_y, spans_x)
    areas = np.outer(np.diff(spans_y).ravel(), np.diff(spans_x).ravel())
    judged = stained >= MIN_STAINED * areas
    if not judged.any():
        return NO_PATCHES
    blur = _blur_effect(grey.astype(np.float32) / 255, spans_y, spans_x)
    return np.array([[x + left * fx, y + top * fy, x + right * fx, y + bottom * fy, blur[j, i]]
                     for j, (top, bottom) in enumerate(spans_y) for i, (left, right) in enumerate(spans_x)
                     if judged[j, i]], np.float32)


def _blur_effect(level, spans_y, spans_x):
    """scikit-image's ``blur_effect`` (its ``h_size`` 11, its Sobel weights) of every patch of the grey ``level``
    image at once: each axis's edge strength, before and after an 11-pixel box blur along that axis, summed per patch
    (:func:`_sums`); the patch's blur is the larger of its two axes' ``1 - what the box blur takes away / edge
    strength``. The filters run over the whole tile, so a patch's edges see its neighbours' pixels where
    ``blur_effect`` on the patch alone mirrors its own (``tests/test_focus.py`` compares the two)."""
    import cv2

    edge = np.array([[1, 0, -1]], np.float32)
    smooth = np.array([[1, 2, 1]], np.float32) / 4
    blur = None
    for kernel, box in ((edge.T @ smooth, (1, 11)), (smooth.T @ edge, (11, 1))):  # along y, then along x
        sharp = np.maximum(np.abs(cv2.filter2D(level, -1, kernel, borderType=cv2.BORDER_REFLECT)), EPSILON)
        blurred = cv2.blur(level, box, borderType=cv2.BORDER_REFLECT)
        soft = np.maximum(np.abs(cv2.filter2D(blurred, -1, kernel, borderType=cv2.BORDER_REFLECT)), EPSILON)
        strength = _sums(sharp, spans_y, spans_x)
        kept = _sums(np.maximum(sharp - soft, 0, out=soft), spans_y, spans_x)
        axis = np.abs(strength - kept) / strength
        blur = axis if blur is None else np.maximum(blur, axis)
    return blur


def _sums(image, spans_y, spans_x):
    """Per patch (rows ``spans_y``, columns ``spans_x``: :func:`_spans`) the sum of ``image`` (uint8 or float32),
    in float64, from its integral image."""
    import cv2

    integral = cv2.integral(image, sdepth=cv2.CV_64F)
    ys, xs = np.asarray(spans_y), np.asarray(spans_x)
    return (integral[np.ix_(ys[:, 1], xs[:, 1])] - integral[np.ix_(ys[:, 0], xs[:, 1])]
            - integral[np.ix_(ys[:, 1], xs[:, 0])] + integral[np.ix_(ys[:, 0], xs[:, 0])])


def _spans(length, side):
    """``[(start, end), ...]`` covering ``0 .. length`` in steps of ``side``, a last piece shorter than half a side
    joined to the one before."""
    starts = list(range(0, length, side))
    if len(starts) > 1 and length - starts[-1] < side / 2:
        starts.pop()
    return list(zip(starts, starts[1:] + [length]))


def mark_blurred(tissue, patches):
    """``tissue`` (a :class:`cellrcnn.tissue.TissueMask`) with the tissue out of focus as its ``blurred``: the
    patches of every tile read (float32 rows ``(x0, y0, x1, y1, blur)`` in analysis pixels, :func:`patch_blur`)
    painted onto the mask pixels they cover. Where tiles overlap, a mask pixel takes its sharpest patch's blur: tissue
    is called out of focus only where no view of it is sharp and that view is above :data:`BLUR_LIMIT`."""
    sharpest = np.full(tissue.mask.shape, np.inf, np.float32)
    for x0, y0, x1, y1, blur in patches:
        window = tissue.window(x0, y0, x1 - x0, y1 - y0)
        if window is not None:
            i0, i1, j0, j1 = window
            np.minimum(sharpest[j0:j1, i0:i1], blur, out=sharpest[j0:j1, i0:i1])
    return tissue.with_blurred(np.isfinite(sharpest) & (sharpest > BLUR_LIMIT))
