"""Synthetic H&E-like tissue with exact nucleus bounding boxes.

This is the ground truth used to train and evaluate the detector: there is no real annotated H&E nucleus data here,
so tiles (and whole slides) are *generated* together with the exact box of every nucleus drawn.

Model of a tile
---------------
* Tissue layout from smooth random fields: tissue vs white glass background (some tiles partly or wholly glass),
  epithelial/tumour regions (purple cytoplasm, crowded large pale nuclei) vs stroma (pink eosin with collagen-fibre
  texture and white cracks, spindle fibroblast nuclei aligned with the fibres, lymphocyte aggregates).
* Nuclei (sizes in micrometres, converted with ``mpp``; every nucleus is 4.5-15 um across its longest extent):

  - lymphocytes: round, 4.5-7 um, very dark (up to near-saturated), nearly homogeneous chromatin; a small
    lymphocyte is 6-9 um across with a nucleus that nearly fills it (histology textbooks, e.g. Ross & Pawlina), and
    a 3-5 um section cuts most nuclei off their equator, so their profiles on the slide are smaller still; on real
    20x H&E they measure 10-12 px (5-6 um). Some tiles hold dense lymphocyte sheets (aggregates over most of the
    tissue);
  - tumour / epithelial: 8.5-14.5 um, round to oval (aspect up to 1.6), pale and vesicular: granular chromatin,
    darker rim (nuclear membrane), 0-2 nucleoli; crowded in touching clusters;
  - stromal / fibroblast: spindles 9.5-15 um long and 2.6-4.2 um wide with pointed ends.

  Each outline is an ellipse (or spindle) whose polar radius is jittered by low-order harmonics, so boundaries are
  irregular.  A nucleus is rasterised in a small local patch (pixel (r, c) is inside when its centre (c+0.5, r+0.5)
  is inside the outline); its box is exactly the extent of that pixel mask.
* Hard negatives (training tiles): dark keratin or elastic strands, red blood cells with central pallor, specks of
  nuclear debris and brown pigment, drawn beside (never over) the nuclei and never boxed.
* Crowding: touching/overlapping nuclei are allowed, but no nucleus may be covered by others over more than 30% of
  its area.  This is enforced when nuclei are placed with a bound that does not depend on drawing order: the overlap
  of two nuclei is at most the lens area of their bounding circles, and the sum of those lens areas over all
  neighbours of a nucleus must stay <= 30% of its area.
* Colour via the Beer-Lambert law: per pixel haematoxylin and eosin concentrations (optical densities) times
  stain OD vectors, ``I = I0 * 10 ** -(c_H * v_H + c_E * v_E)``.  histomicstk's ``color_convolution`` does the
  same from 8-bit stain-intensity images; the renderer works in float optical densities, so the composition is one
  matrix transform and one exp per tile (cv2), with standard H&E vectors (between
  Ruifrok & Johnston's and Macenko estimates on real 20x slides) jittered per tile together with the stain
  intensities and the illumination (stain variation).  Then a random Gaussian blur (focus), sensor noise and,
  for training tiles, JPEG compression at a random quality.

Boxes
-----
``float32`` N x 4 ``[x1, y1, x2, y2]`` in pixel-edge coordinates: pixel (r, c) covers [c, c+1) x [r, r+1), so
x1 = min column of the nucleus mask, x2 = max column + 1 (same for rows).  Border rule: a nucleus cut by the tile
(or slide) border is kept, with its box clipped to the tile, when at least ``VISIBLE_FRACTION`` (0.4) of its mask
area lies inside the tile; otherwise it is dropped (it is still drawn, there is just no box for it).

Everything is deterministic given the ``numpy.random.Generator`` (or integer seed).

Modules
-------
``fields`` (white noise, smoothed and fibre noise, the smooth layout fields), ``nuclei`` (parameters, placement,
rasterisation, boxes), ``render`` (style, hard negatives, Beer-Lambert composition), ``tiles`` (:func:`make_tile`,
:func:`make_dataset`) and ``slides`` (:func:`write_slide`).
"""

from .nuclei import MAX_SIZE_UM, MIN_SIZE_UM, VISIBLE_FRACTION
from .slides import write_slide
from .tiles import make_dataset, make_tile

__all__ = ['make_tile', 'make_dataset', 'write_slide', 'MIN_SIZE_UM', 'MAX_SIZE_UM', 'VISIBLE_FRACTION']
