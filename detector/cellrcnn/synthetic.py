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
"""

import math
import os
import tempfile

import cv2
import numpy as np

__all__ = ['make_tile', 'make_dataset', 'write_slide']

LYMPHOCYTE, TUMOUR, FIBROBLAST = 0, 1, 2
KIND_NAMES = ('lymphocyte', 'tumour', 'fibroblast')

#: Maximum fraction of a nucleus' area that other nuclei may cover (bound on the hidden part).
MAX_HIDDEN = 0.3
#: Nucleus size limits (longest extent, micrometres).
MIN_SIZE_UM, MAX_SIZE_UM = 4.5, 15.0
#: A nucleus cut by a tile's edge gets its clipped box when at least this fraction of it is inside. Below the
#: detector's NMS IoU (0.35) a clipped box would survive next to the whole box of the neighbouring tile; at 0.4 and
#: above its IoU with that box is above the NMS threshold, so the slide-wide merge keeps one of them.
VISIBLE_FRACTION = 0.4

# Haematoxylin and eosin optical density vectors (R, G, B), normalised.  Between the Ruifrok & Johnston vectors
# (H 0.65 0.70 0.29, E 0.07 0.99 0.11) and Macenko estimates on real 20x H&E (H ~ 0.54 0.75 0.38, E ~ 0.25-0.33
# 0.8-0.9 0.34-0.5): the pure Ruifrok haematoxylin renders nuclei navy blue instead of purple.
_H_OD = np.array([0.56, 0.74, 0.37])
_E_OD = np.array([0.28, 0.82, 0.50])
# brown pigment (haemosiderin, melanin): the optical density direction of DAB-like browns (histomicstk's 'dab')
_P_OD = np.array([0.27, 0.57, 0.78])
_LN10 = math.log(10.0)
_NHARM = 4  # boundary jitter harmonics k = 2..5
_FIELD_CELL_UM = 20.0  # spacing of the smooth layout field grid (micrometres)


# --------------------------------------------------------------------------------------------------------------
# random sources
# --------------------------------------------------------------------------------------------------------------

def _as_rng(rng):
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


def _hash_noise(key, y0, x0, h, w):
    """Deterministic white noise (zero mean, unit std, float32) as a function of global pixel position: the same
    pixel gets the same value whichever canvas it is computed for, so whole-slide textures have no seams."""
    ys = np.arange(y0, y0 + h, dtype=np.int64).astype(np.uint64)[:, None]
    xs = np.arange(x0, x0 + w, dtype=np.int64).astype(np.uint64)[None, :]
    v = ys * np.uint64(0x9E3779B97F4A7C15) + xs * np.uint64(0xC2B2AE3D27D4EB4F)
    v ^= np.uint64(key & 0xFFFFFFFFFFFFFFFF)
    v ^= v >> np.uint64(30)
    v *= np.uint64(0xBF58476D1CE4E5B9)
    v ^= v >> np.uint64(27)
    v *= np.uint64(0x94D049BB133111EB)
    v ^= v >> np.uint64(31)
    u = (v >> np.uint64(40)).astype(np.float32) * np.float32(1.0 / (1 << 24))
    return (u - np.float32(0.5)) * np.float32(math.sqrt(12.0))


class _RngNoise:
    """Noise source for a single tile: plain draws from the generator (coordinates are irrelevant)."""

    def __init__(self, rng):
        self.rng = rng

    def __call__(self, key, y0, x0, h, w):
        u = self.rng.random((h, w), dtype=np.float32)
        u -= np.float32(0.5)
        u *= np.float32(math.sqrt(12.0))
        return u


class _HashNoise:
    """Noise source for whole slides: a function of (key, global position)."""

    def __init__(self, seed):
        self.base = int(np.random.SeedSequence([seed, 7]).generate_state(1, np.uint64)[0])

    def __call__(self, key, y0, x0, h, w):
        return _hash_noise(self.base ^ (key * 0x632BE59BD9B4E019), y0, x0, h, w)


# --------------------------------------------------------------------------------------------------------------
# style (per tile / per slide random appearance)
# --------------------------------------------------------------------------------------------------------------

def _unit(v):
    return v / np.linalg.norm(v)


def _make_style(rng, ppu):
    """Random appearance parameters.  ``ppu``: pixels per micrometre."""
    s = {}
    s['ppu'] = ppu
    s['vH'] = _unit(np.clip(_H_OD + rng.normal(0, 0.045, 3), 0.05, None)).astype(np.float32)
    s['vE'] = _unit(np.clip(_E_OD + rng.normal(0, [0.05, 0.03, 0.06]), 0.02, None)).astype(np.float32)
    s['h_scale'] = rng.uniform(0.75, 1.25)
    s['e_scale'] = rng.uniform(0.6, 1.35)
    s['i0'] = (rng.uniform(232, 250) + rng.normal(0, 2.5, 3)).astype(np.float32)
    s['e_stroma'] = rng.uniform(0.35, 0.72)
    s['h_stroma'] = rng.uniform(0.03, 0.1)
    s['e_cyto'] = rng.uniform(0.2, 0.4)
    s['h_cyto'] = rng.uniform(0.08, 0.22)
    s['gap'] = rng.uniform(0.0, 0.45)  # amount of white cracks between collagen bundles
    s['wave'] = rng.uniform(0.5, 3.0)  # waviness of collagen (um)
    s['border'] = rng.uniform(-0.05, 0.25) * (rng.random() < 0.7)  # epithelial cell borders (eosin OD)
    s['fib_theta'] = rng.uniform(0, np.pi)
    s['fib_dtheta'] = rng.uniform(0.25, 0.7) * rng.choice([-1, 1])
    s['tum_size'] = rng.uniform(9.5, 13.0)  # typical tumour nucleus major axis (um) for this tile
    s['tum_h'] = rng.uniform(0.4, 0.7)
    s['blur'] = rng.uniform(0.35, 1.3) * ppu * 0.5  # focus: Gaussian sigma in pixels (0.35-1.3 px at 20x)
    s['noise'] = rng.uniform(1.0, 3.5)
    return s


# --------------------------------------------------------------------------------------------------------------
# smooth layout fields
# --------------------------------------------------------------------------------------------------------------

# channels of the layout grid
_F_TISSUE, _F_EPI, _F_LYMPH, _F_FIB, _F_DENS = range(5)
_NF = 5


def _octave_grid(rng, gh, gw, coarse):
    """Unit-ish std smooth noise on a (gh, gw) grid: a coarse octave (upsampled by ``coarse``) plus a fine one."""
    ch, cw = gh // coarse + 3, gw // coarse + 3
    c = rng.standard_normal((ch, cw)).astype(np.float32)
    c = cv2.resize(c, (cw * coarse, ch * coarse), interpolation=cv2.INTER_CUBIC)[coarse:coarse + gh, coarse:coarse + gw]
    f = rng.standard_normal((gh, gw)).astype(np.float32)
    f = cv2.GaussianBlur(f, (0, 0), 0.8)
    return 0.85 * c + 0.9 * f


class _Layout:
    """Smooth random fields on a coarse grid (cell ``cell`` pixels, origin at pixel (-2 cells, -2 cells)),
    sampled at any pixel with bicubic interpolation, so that any canvas of a slide sees the same continuous field."""

    def __init__(self, rng, height, width, cell, mode, crowding):
        self.cell = cell
        gh, gw = int(math.ceil(height / cell)) + 5, int(math.ceil(width / cell)) + 5
        g = np.empty((gh, gw, _NF), np.float32)
        g[..., _F_TISSUE] = _octave_grid(rng, gh, gw, 4)
        g[..., _F_EPI] = _octave_grid(rng, gh, gw, 3)
        g[..., _F_LYMPH] = _octave_grid(rng, gh, gw, 2)
        g[..., _F_FIB] = _octave_grid(rng, gh, gw, 4)
        g[..., _F_DENS] = _octave_grid(rng, gh, gw, 5)
        self.grid = g
        inner = g[2:-2, 2:-2]
        # tissue threshold: mode 'full' (all tissue), 'partial' (random coverage) or 'slide' (irregular blobs)
        if mode == 'full':
            self.t_thr = -1e9
        else:
            cover = {'partial': rng.uniform(0.25, 0.9), 'empty': rng.uniform(0.0, 0.12),
                     'slide': rng.uniform(0.35, 0.6)}[mode]
            self.t_thr = float(np.quantile(inner[..., _F_TISSUE], 1 - cover)) if cover > 0 else 1e9
        # epithelial fraction: none, some or all of the tissue (of a tile); part of the tissue (of a slide)
        r = rng.random()
        ecover = 0.0 if r < 0.25 else (1.0 if r < 0.5 else rng.uniform(0.2, 0.8))
        if mode == 'slide':
            ecover = rng.uniform(0.2, 0.6)
        self.e_thr = float(np.quantile(inner[..., _F_EPI], 1 - ecover)) if 0 < ecover < 1 else (
            -1e9 if ecover >= 1 else 1e9)
        # lymphocyte aggregates over 5-50 % of the tissue, or (one tile in five) a sheet over most of it
        lcover = rng.uniform(0.6, 0.95) if rng.random() < 0.2 else rng.uniform(0.05, 0.5)
        self.l_thr = float(np.quantile(inner[..., _F_LYMPH], 1 - lcover))
        self.crowding = crowding  # None: from the density field (slides)

    def sample(self, y0, x0, h, w, step=1, channels=_NF):
        """Fields at the points (y0 + step*i + step/2, x0 + step*j + step/2) (continuous coordinates: pixel (r, c)
        covers [r, r+1) x [c, c+1)), i < h, j < w: float32 (h, w, channels), bicubic interpolation of the grid."""
        c = self.cell
        m = np.array([[step / c, 0, (x0 + 0.5 * step) / c + 1.5], [0, step / c, (y0 + 0.5 * step) / c + 1.5]])
        flags = cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP
        # cv2 warps at most 4 channels at a time
        out = cv2.warpAffine(self.grid[..., :4], m, (w, h), flags=flags, borderMode=cv2.BORDER_REPLICATE)
        if channels > 4:
            out = np.dstack([out, cv2.warpAffine(self.grid[..., 4], m, (w, h), flags=flags,
                                                 borderMode=cv2.BORDER_REPLICATE)])
        return out

    def sample_pixels(self, y0, x0, h, w):
        """The first 4 fields at the centres of the pixels of [y0, y0+h) x [x0, x0+w): sampled every 4 pixels and
        interpolated linearly (the fields are smooth on that scale), aligned exactly on the global pixel grid."""
        s = 4
        gh, gw = -(-h // s) + 1, -(-w // s) + 1
        f = self.sample(y0, x0, gh, gw, s, channels=4)
        return cv2.resize(f, (gw * s, gh * s), interpolation=cv2.INTER_LINEAR)[:h, :w]

    def derived(self, f):
        """tissue, epi, lymph-aggregate (soft 0..1 masks), fibre direction weight and crowding from raw fields."""
        tissue = np.clip((f[..., _F_TISSUE] - self.t_thr) * 8.0 + 0.5, 0, 1)
        epi = np.clip((f[..., _F_EPI] - self.e_thr) * 2.5 + 0.5, 0, 1)
        lymph = np.clip((f[..., _F_LYMPH] - self.l_thr) * 2.0 + 0.3, 0, 1)
        fibw = np.clip(f[..., _F_FIB] * 0.8 + 0.5, 0, 1)
        if self.crowding is not None:
            crowd = np.float32(self.crowding)
        elif f.shape[-1] > _F_DENS:
            crowd = np.clip(0.5 + 0.45 * f[..., _F_DENS], 0, 1)
        else:
            crowd = None
        return tissue, epi, lymph, fibw, crowd


# --------------------------------------------------------------------------------------------------------------
# nuclei: parameters, placement, rasterisation
# --------------------------------------------------------------------------------------------------------------

def _shape_area_factor(p):
    """Area of {|u/a|^p + (v/b)^2 <= 1} divided by a*b (pi for the ellipse p = 2)."""
    from scipy.special import gamma

    return 4 * gamma(1 + 1 / p) * gamma(1.5) / gamma(1.5 + 1 / p)


def _new_nuclei(rng, kind, cx, cy, style, fib_theta):
    """Random shape and stain parameters of nuclei of the given kinds at the given centres (pixel coordinates)."""
    n = len(kind)
    ppu = style['ppu']
    major = np.empty(n)
    aspect = np.empty(n)
    theta = rng.uniform(0, np.pi, n)
    p = np.full(n, 2.0)
    jit = np.empty(n)
    h = np.empty(n)
    tex = np.empty(n)
    rim = np.empty(n)
    e = np.empty(n)
    nucl = np.zeros((n, 2, 4))  # per nucleolus: u, v (fraction of a, b), sigma (px), amplitude
    for k in (LYMPHOCYTE, TUMOUR, FIBROBLAST):
        m = kind == k
        c = int(m.sum())
        if not c:
            continue
        if k == LYMPHOCYTE:
            major[m] = rng.uniform(4.5, 7.0, c)
            aspect[m] = rng.uniform(1.0, 1.15, c)
            jit[m] = rng.uniform(0.01, 0.04, c)
            h[m] = rng.uniform(1.05, 1.9, c)  # up to near-saturated: small lymphocytes are the darkest nuclei
            tex[m] = rng.uniform(0.04, 0.12, c)
            rim[m] = rng.uniform(0.0, 0.15, c)
            e[m] = rng.uniform(0.05, 0.15, c)
        elif k == TUMOUR:
            major[m] = np.clip(style['tum_size'] * rng.uniform(0.82, 1.18, c), 8.5, 14.5)
            aspect[m] = rng.uniform(1.0, 1.6, c)
            jit[m] = rng.uniform(0.02, 0.07, c)
            h[m] = style['tum_h'] * rng.uniform(0.8, 1.25, c)
            tex[m] = rng.uniform(0.2, 0.4, c)
            rim[m] = rng.uniform(0.3, 1.0, c)
            e[m] = rng.uniform(0.1, 0.25, c)
            cnt = rng.choice(3, c, p=[0.4, 0.42, 0.18])
            r = np.sqrt(rng.uniform(0, 0.25, (c, 2)))
            ang = rng.uniform(0, 2 * np.pi, (c, 2))
            nl = np.zeros((c, 2, 4))
            nl[..., 0] = r * np.cos(ang)
            nl[..., 1] = r * np.sin(ang)
            nl[..., 2] = rng.uniform(0.35, 0.6, (c, 2)) * ppu
            nl[..., 3] = rng.uniform(0.35, 0.9, (c, 2)) * (np.arange(2)[None, :] < cnt[:, None])
            nucl[m] = nl
        else:
            major[m] = rng.uniform(9.5, 15.0, c)
            aspect[m] = major[m] / rng.uniform(2.6, 4.2, c)
            theta[m] = fib_theta[m] + rng.normal(0, 0.18, c)
            p[m] = rng.uniform(1.15, 1.7, c)
            jit[m] = rng.uniform(0.01, 0.04, c)
            h[m] = rng.uniform(0.75, 1.15, c)
            tex[m] = rng.uniform(0.08, 0.16, c)
            rim[m] = rng.uniform(0.0, 0.1, c)
            e[m] = rng.uniform(0.08, 0.18, c)
    a = major * 0.5 * ppu
    b = a / aspect
    # boundary jitter: r(phi) = r_shape(phi) * (1 + Re sum_k c_k e^{i k phi}), k = 2..5
    kk = np.arange(2, 2 + _NHARM)
    amp = jit[:, None] * rng.standard_normal((n, _NHARM)) / np.sqrt(kk - 1)[None, :]
    ck = amp * np.exp(1j * rng.uniform(0, 2 * np.pi, (n, _NHARM)))
    # bounding radius of the jittered ellipse (the spindle lies inside the ellipse with the same a, b)
    phi = np.linspace(0, 2 * np.pi, 40, endpoint=False)
    re = 1.0 / np.sqrt((np.cos(phi)[None, :] / a[:, None]) ** 2 + (np.sin(phi)[None, :] / b[:, None]) ** 2)
    jj = np.real(ck @ np.exp(1j * np.outer(kk, phi)))
    rmax = (re * (1 + jj)).max(1) * 1.005  # (sampled every 9 degrees: small safety factor)
    # keep the longest extent (<= 2R + 1 px) within MAX_SIZE_UM
    scale = np.minimum(1.0, (MAX_SIZE_UM / 2 * ppu - 0.5) / rmax)
    a *= scale
    b *= scale
    rmax *= scale
    nucl[..., 2] *= scale[:, None]
    area = a * b * _shape_area_factor(p) * (1 + 0.5 * (np.abs(ck) ** 2).sum(1))
    return {
        'kind': kind.astype(np.int8), 'cx': cx.astype(np.float64), 'cy': cy.astype(np.float64),
        'a': a, 'b': b, 'theta': theta, 'p': p, 'ck': ck, 'R': rmax, 'area': area,
        'h': h * style['h_scale'], 'tex': tex, 'rim': rim, 'e': e, 'nucl': nucl,
    }


def _take(nuc, idx):
    return {k: v[idx] for k, v in nuc.items()}


def _concat(nucs):
    nucs = [n for n in nucs if len(n['cx'])]
    if not nucs:
        return None
    return {k: np.concatenate([n[k] for n in nucs]) for k in nucs[0]}


def _lens_area(d, r1, r2):
    """Intersection area of circles with radii r1, r2 at centre distance d (vectorised)."""
    d = np.maximum(d, 1e-9)
    out = np.zeros_like(d)
    inside = d <= np.abs(r1 - r2)
    out[inside] = np.pi * np.minimum(r1, r2)[inside] ** 2
    m = (d < r1 + r2) & ~inside
    if m.any():
        d_, a, b = d[m], r1[m], r2[m]
        c1 = np.clip((d_ ** 2 + a ** 2 - b ** 2) / (2 * d_ * a), -1, 1)
        c2 = np.clip((d_ ** 2 + b ** 2 - a ** 2) / (2 * d_ * b), -1, 1)
        k = np.sqrt(np.maximum((-d_ + a + b) * (d_ + a - b) * (d_ - a + b) * (d_ + a + b), 0))
        out[m] = a * a * np.arccos(c1) + b * b * np.arccos(c2) - 0.5 * k
    return out


def _place(cand, fixed=None, fixed_load=None, limit=MAX_HIDDEN):
    """Greedy acceptance of candidate nuclei (in their order) such that every nucleus (candidates and the already
    accepted ``fixed`` ones) is covered by others over at most ``limit`` of its area; the overlap of two nuclei is
    bounded by the lens area of their bounding circles, so the rule holds whatever the drawing order.
    Returns (indices of accepted candidates, updated loads of fixed nuclei)."""
    from scipy.spatial import cKDTree

    nf = 0 if fixed is None else len(fixed['cx'])
    allc = cand if not nf else _concat([fixed, cand])
    m = len(allc['cx'])
    if m == 0:
        return np.zeros(0, np.int64), fixed_load
    pts = np.stack([allc['cx'], allc['cy']], 1)
    rr = allc['R']
    pairs = cKDTree(pts).query_pairs(2 * float(rr.max()), output_type='ndarray')
    load = np.zeros(m)
    if nf:
        load[:nf] = fixed_load
    accepted = np.zeros(m, bool)
    accepted[:nf] = True
    if len(pairs):
        i, j = pairs[:, 0], pairs[:, 1]
        d = np.hypot(*(pts[i] - pts[j]).T)
        lens = _lens_area(d, rr[i], rr[j])
        keep = lens > 0
        i, j, lens = i[keep], j[keep], lens[keep]
        src = np.concatenate([i, j])
        dst = np.concatenate([j, i])
        f_src = np.concatenate([lens / allc['area'][i], lens / allc['area'][j]])  # fraction of src covered by dst
        f_dst = np.concatenate([lens / allc['area'][j], lens / allc['area'][i]])
        o = np.argsort(src, kind='stable')
        src, dst, f_src, f_dst = src[o], dst[o], f_src[o], f_dst[o]
        ptr = np.searchsorted(src, np.arange(m + 1)).tolist()
        dst, f_src, f_dst = dst.tolist(), f_src.tolist(), f_dst.tolist()
    else:
        ptr = [0] * (m + 1)
        dst = f_src = f_dst = []
    acc = accepted.tolist()
    ld = load.tolist()
    for c in range(nf, m):
        s = 0.0
        ok = True
        for q in range(ptr[c], ptr[c + 1]):
            j = dst[q]
            if acc[j]:
                s += f_src[q]
                if s > limit or ld[j] + f_dst[q] > limit:
                    ok = False
                    break
        if not ok:
            continue
        acc[c] = True
        ld[c] = s
        for q in range(ptr[c], ptr[c + 1]):
            j = dst[q]
            if acc[j] and j != c:
                ld[j] += f_dst[q]
    acc = np.array(acc)
    ld = np.array(ld)
    return np.nonzero(acc[nf:])[0], (ld[:nf] if nf else fixed_load)


def _rasterise(nuc):
    """Masks and haematoxylin profiles of nuclei, in local patches.
    Returns a list of groups (idx, oy, ox, mask[n,P,P] bool, prof[n,P,P] float32) (patch size P per group)."""
    n = len(nuc['cx'])
    if n == 0:
        return []
    psz = 2 * np.ceil(nuc['R']).astype(int) + 4
    spindle = nuc['p'] < 2
    key = psz * 2 + spindle
    groups = []
    for kv in np.unique(key):
        idx = np.nonzero(key == kv)[0]
        P = int(kv // 2)
        g = _take(nuc, idx)
        oy = np.floor(g['cy']).astype(np.int64) - P // 2
        ox = np.floor(g['cx']).astype(np.int64) - P // 2
        grid = np.arange(P) + 0.5
        dx = (ox[:, None] + grid[None, :] - g['cx'][:, None]).astype(np.float32)[:, None, :]
        dy = (oy[:, None] + grid[None, :] - g['cy'][:, None]).astype(np.float32)[:, :, None]
        ct = np.cos(g['theta']).astype(np.float32)[:, None, None]
        st = np.sin(g['theta']).astype(np.float32)[:, None, None]
        u = dx * ct + dy * st
        v = dy * ct - dx * st
        r = np.sqrt(u * u + v * v) + np.float32(1e-6)
        cz, sz = u / r, v / r  # e^{i phi}
        jit = np.zeros_like(u)
        zr, zi = cz * cz - sz * sz, 2 * cz * sz  # e^{2 i phi}
        for k in range(_NHARM):
            c = g['ck'][:, k]
            jit += np.float32(1) * (c.real.astype(np.float32)[:, None, None] * zr
                                    - c.imag.astype(np.float32)[:, None, None] * zi)
            zr, zi = zr * cz - zi * sz, zr * sz + zi * cz
        s = np.float32(1) / (1 + jit)
        un = np.abs(u) * s / g['a'].astype(np.float32)[:, None, None]
        vn = v * s / g['b'].astype(np.float32)[:, None, None]
        if kv % 2:
            rho2 = un ** g['p'].astype(np.float32)[:, None, None] + vn * vn
        else:
            rho2 = un * un + vn * vn
        mask = rho2 <= 1
        rho = np.sqrt(rho2)
        rimw = np.clip((rho - 0.55) / 0.45, 0, 1)
        prof = g['h'].astype(np.float32)[:, None, None] * (1 + g['rim'].astype(np.float32)[:, None, None] * rimw * rimw)
        if (g['nucl'][..., 3] > 0).any():
            for q in range(2):
                nl = g['nucl'][:, q]
                amp = nl[:, 3].astype(np.float32)[:, None, None]
                if not (amp > 0).any():
                    continue
                du = u - (nl[:, 0] * g['a']).astype(np.float32)[:, None, None]
                dv = v - (nl[:, 1] * g['b']).astype(np.float32)[:, None, None]
                sg = np.maximum(nl[:, 2], 1e-3).astype(np.float32)[:, None, None]
                prof += amp * np.exp(-(du * du + dv * dv) / (2 * sg * sg))
        groups.append((idx, oy, ox, mask, prof.astype(np.float32)))
    return groups


def _boxes_from_groups(groups, n, y0, x0, h, w):
    """Exact boxes of all nuclei (global pixel coordinates) and the fraction of each mask inside [y0,y0+h)x[x0,x0+w)."""
    box = np.zeros((n, 4), np.float64)
    frac = np.zeros(n)
    for idx, oy, ox, mask, _ in groups:
        P = mask.shape[1]
        rows = mask.any(2)
        cols = mask.any(1)
        r1 = rows.argmax(1)
        r2 = P - rows[:, ::-1].argmax(1)
        c1 = cols.argmax(1)
        c2 = P - cols[:, ::-1].argmax(1)
        box[idx] = np.stack([ox + c1, oy + r1, ox + c2, oy + r2], 1)
        gy = oy[:, None] + np.arange(P)[None, :]
        gx = ox[:, None] + np.arange(P)[None, :]
        iny = (gy >= y0) & (gy < y0 + h)
        inx = (gx >= x0) & (gx < x0 + w)
        inside = (mask & iny[:, :, None] & inx[:, None, :]).sum((1, 2))
        frac[idx] = inside / np.maximum(mask.sum((1, 2)), 1)
    return box, frac


def _select_boxes(box, frac, y0, x0, h, w):
    """Apply the border rule (keep when >= VISIBLE_FRACTION of the mask is inside) and clip; returns float32 N x 4."""
    keep = frac >= VISIBLE_FRACTION
    b = box[keep].copy()
    b[:, [0, 2]] = np.clip(b[:, [0, 2]], x0, x0 + w)
    b[:, [1, 3]] = np.clip(b[:, [1, 3]], y0, y0 + h)
    return b.astype(np.float32).reshape(-1, 4), keep


def _candidates(rng, layout, style, y0, x0, h, w, margin):
    """Candidate nuclei (Poisson process thinned by the density fields) with centres in the region
    [y0 - margin, y0 + h + margin) x [x0 - margin, x0 + w + margin), in random order."""
    ppu = style['ppu']
    step = max(2, int(round(2 * ppu)))
    gh, gw = (h + 2 * margin) // step + 1, (w + 2 * margin) // step + 1
    f = layout.sample(y0 - margin, x0 - margin, gh, gw, step, channels=_NF if layout.crowding is None else 4)
    tissue, epi, lymph, fibw, crowd = layout.derived(f)
    # mean nucleus areas (px^2)
    a_l = np.pi * (2.9 * ppu) ** 2
    a_t = np.pi * (style['tum_size'] * 0.5 * ppu) ** 2 / 1.3
    a_f = 12.0 * 3.4 * ppu * ppu * 0.8
    # intensities (expected nuclei per px^2) before the non-overlap rejection
    lam = np.stack([
        tissue * ((1 - epi) * (0.004 + (0.035 * crowd ** 1.5 + lymph * (0.25 + 0.6 * crowd)) * 0.7)
                  + epi * 0.02 * crowd) / a_l,
        tissue * epi * (0.02 + 3.0 * crowd ** 1.5) / a_t,
        tissue * (1 - epi) * (1 - 0.6 * lymph) * (0.02 + 0.16 * crowd) / a_f,
    ]).astype(np.float64)
    area = (h + 2 * margin) * (w + 2 * margin)
    kinds, xs, ys = [], [], []
    for k in range(3):
        lmax = float(lam[k].max())
        if lmax <= 0:
            continue
        n0 = rng.poisson(lmax * area)
        cx = rng.uniform(0, w + 2 * margin, n0)
        cy = rng.uniform(0, h + 2 * margin, n0)
        li = lam[k][np.minimum((cy / step).astype(int), gh - 1), np.minimum((cx / step).astype(int), gw - 1)]
        keep = rng.random(n0) * lmax < li
        kinds.append(np.full(int(keep.sum()), k))
        xs.append(cx[keep] + x0 - margin)
        ys.append(cy[keep] + y0 - margin)
    if not kinds:
        kinds, xs, ys = [np.zeros(0, int)], [np.zeros(0)], [np.zeros(0)]
    kind = np.concatenate(kinds)
    cx = np.concatenate(xs)
    cy = np.concatenate(ys)
    o = rng.permutation(len(kind))
    kind, cx, cy = kind[o], cx[o], cy[o]
    # local fibre direction (for fibroblasts)
    fw = fibw[np.clip(((cy - y0 + margin) / step).astype(int), 0, gh - 1),
              np.clip(((cx - x0 + margin) / step).astype(int), 0, gw - 1)]
    fib_theta = style['fib_theta'] + style['fib_dtheta'] * (fw > 0.5)
    return _new_nuclei(rng, kind, cx, cy, style, fib_theta)


# --------------------------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------------------------

def _smooth_noise(noise, key, y0, x0, h, w, sigma):
    """Gaussian-smoothed white noise of about unit std (correlation length ``sigma`` px) on the canvas
    [y0, y0+h) x [x0, x0+w).  Drawn on a lattice of step s ~ sigma / 1.5 anchored at the global origin and
    interpolated, so it is cheap for large sigma and seamless between canvases of a slide."""
    s = max(1, int(sigma / 1.5))
    sl = sigma / s
    pad = int(math.ceil(3 * sl)) + 2
    ky0, kx0 = y0 // s - pad, x0 // s - pad
    gh, gw = (y0 + h - 1) // s + pad + 2 - ky0, (x0 + w - 1) // s + pad + 2 - kx0
    g = cv2.GaussianBlur(noise(key, ky0, kx0, gh, gw), (0, 0), sl, borderType=cv2.BORDER_REFLECT)
    g *= np.float32(2 * math.sqrt(math.pi) * sl)
    if s == 1:
        return g[y0 - ky0:y0 - ky0 + h, x0 - kx0:x0 - kx0 + w]
    # lattice point k sits at global coordinate s * (k + 0.5); pixel j's centre is j + 0.5
    m = np.array([[1.0 / s, 0, (x0 + 0.5) / s - 0.5 - kx0], [0, 1.0 / s, (y0 + 0.5) / s - 0.5 - ky0]])
    return cv2.warpAffine(g, m, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)


def _fibre_noise(noise, key, y0, x0, h, w, theta, along, across, disp):
    """Anisotropic noise, 2 channels: fine fibres (correlation length ``along`` px in direction ``theta`` and
    ``across`` px across it) and bundles (about 1.5x longer and 3x wider), displaced across by ``disp`` (px, smooth
    field) so that they wave.  A function of global position: seamless across canvases."""
    c, s = math.cos(theta), math.sin(theta)
    X = (x0 + 0.5 + np.arange(w, dtype=np.float32))[None, :]
    Y = (y0 + 0.5 + np.arange(h, dtype=np.float32))[:, None]
    U = np.broadcast_to(X * np.float32(c / along) + Y * np.float32(s / along), (h, w))
    V = (Y * np.float32(c) - X * np.float32(s) + disp) * np.float32(1.0 / across)
    su, sv = 1.0, 2.5  # bundle blur in lattice units
    pu, pv = 6, 10
    u0 = int(math.floor(float(U.min()))) - pu
    v0 = int(math.floor(float(V.min()))) - pv
    nu = int(math.ceil(float(U.max()))) - u0 + pu + 1
    nv = int(math.ceil(float(V.max()))) - v0 + pv + 1
    g = noise(key, v0, u0, nv, nu)
    gb = cv2.GaussianBlur(g, (0, 0), sigmaX=su, sigmaY=sv) * np.float32(math.sqrt(4 * math.pi * su * sv))
    return cv2.remap(np.dstack([g, gb]), U - np.float32(u0), V - np.float32(v0), cv2.INTER_CUBIC)


def _clutter(rng, h, w, ppu):
    """Hard negatives for a training tile: haematoxylin, eosin and pigment optical density maps (float32 h x w) of
    dark keratin / elastic strands, red blood cells, nuclear debris and brown pigment, each present in some tiles."""
    H, E, P = (np.zeros((h, w), np.float32) for _ in range(3))
    scale = h * w / (256.0 * 256.0) * (0.5 * ppu) ** -2  # per 128 x 128 um
    if rng.random() < 0.35:  # strands: smooth curves 15-80 um long, 0.5-2.5 um thick, dark purple to pink
        for _ in range(rng.poisson(rng.uniform(2, 14) * scale)):
            length, width = rng.uniform(15, 80) * ppu, rng.uniform(0.5, 2.5) * ppu
            t = np.linspace(-0.5, 0.5, 24)[:, None]
            a = rng.uniform(0, np.pi)
            d, n = np.array([np.cos(a), np.sin(a)]), np.array([-np.sin(a), np.cos(a)])
            bend = rng.uniform(-0.25, 0.25) * length * (4 * t * t - 1) + rng.uniform(0, 0.06) * length * np.sin(
                rng.uniform(4, 14) * t + rng.uniform(0, 6))
            pts = rng.uniform(0, [w, h]) + length * t * d + bend * n
            mask = np.zeros((h, w), np.uint8)
            cv2.polylines(mask, [np.round(pts * 4).astype(np.int32)], False, 1, max(1, int(round(width))),
                          cv2.LINE_AA, shift=2)
            H += mask * np.float32(rng.uniform(0.4, 1.3))
            E += mask * np.float32(rng.uniform(0.2, 0.9))
    if rng.random() < 0.3:  # red blood cells: 6.5-8 um discs with central pallor, in a small cluster
        centre = rng.uniform(0, [w, h])
        yy, xx = np.ogrid[:h, :w]
        for _ in range(rng.integers(2, 30)):
            c = centre + rng.normal(0, rng.uniform(5, 25) * ppu, 2)
            r = rng.uniform(3.2, 4.0) * ppu
            rho = np.hypot((xx + 0.5 - c[0]) / r, (yy + 0.5 - c[1]) / (r * rng.uniform(0.8, 1.0)))
            E += np.where(rho <= 1, np.float32(rng.uniform(0.7, 1.5)) * (0.65 + 0.35 * np.clip(rho, 0.5, 1)), 0)
    if rng.random() < 0.4:  # debris: specks 0.8-2.5 um, dark
        for _ in range(rng.poisson(rng.uniform(2, 20) * scale)):
            c = np.round(rng.uniform(0, [w, h]) * 4).astype(int)
            cv2.circle(H, tuple(int(v) for v in c), int(round(rng.uniform(0.4, 1.25) * ppu * 4)),
                       float(rng.uniform(0.6, 1.6)), -1, cv2.LINE_AA, shift=2)
    if rng.random() < 0.15:  # brown pigment granules in clumps
        for _ in range(rng.poisson(rng.uniform(1, 6) * scale)):
            c = rng.uniform(0, [w, h])
            for _ in range(rng.integers(3, 15)):
                g = np.round((c + rng.normal(0, 2.5 * ppu, 2)) * 4).astype(int)
                cv2.circle(P, tuple(int(v) for v in g), int(round(rng.uniform(0.3, 1.2) * ppu * 4)),
                           float(rng.uniform(0.3, 1.0)), -1, cv2.LINE_AA, shift=2)
    return H, E, P


def _render(layout, style, noise, y0, x0, h, w, drawn, clutter=None):
    """Render the canvas [y0, y0+h) x [x0, x0+w) (global pixel coordinates) as float32 RGB (before blur / noise).

    ``drawn``: list of (nuc, groups) batches in drawing order; ``clutter``: optional (H, E, pigment) optical density
    maps of hard negatives, added off the nuclei.  Also returns the label image (index into the concatenation of the
    batches, -1 for no nucleus) for tests."""
    ppu = style['ppu']
    f = layout.sample_pixels(y0, x0, h, w)
    tissue, epi, lymph, fibw, _ = layout.derived(f)
    # ragged tissue edges
    edge = _smooth_noise(noise, 1, y0, x0, h, w, 1.2 * ppu)
    tissue = np.clip(tissue + 0.7 * edge * (tissue * (1 - tissue) * 4), 0, 1)
    stroma = (1 - epi) * tissue
    epit = epi * tissue
    E = np.zeros((h, w), np.float32)
    H = np.zeros((h, w), np.float32)
    coarse = _smooth_noise(noise, 4, y0, x0, h, w, 3.0 * ppu)
    if float(stroma.max()) > 1e-3:
        # collagen: wavy bundles along two orientations (blended by a smooth field), white cracks between them
        disp = f[..., _F_EPI] * np.float32(6.0 * ppu) + _smooth_noise(noise, 9, y0, x0, h, w, 8.0 * ppu) * np.float32(
            style['wave'] * ppu)
        fib = np.zeros((h, w), np.float32)
        bundles = np.zeros((h, w), np.float32)
        for q, (th, wt) in enumerate(((style['fib_theta'], fibw),
                                      (style['fib_theta'] + style['fib_dtheta'], 1 - fibw))):
            fb = _fibre_noise(noise, 20 + q, y0, x0, h, w, th, 16.0 * ppu, 1.0 * ppu, disp)
            fine_q, bund_q = fb[..., 0], fb[..., 1]
            fib += wt * (0.55 * fine_q + 0.85 * bund_q)
            bundles += wt * bund_q
        gaps = np.clip((bundles + 0.3 * coarse + 2.4 - 5.0 * style['gap']) * 1.5, 0, 1)
        e_str = style['e_stroma'] * np.clip(0.85 + 0.17 * fib + 0.1 * coarse, 0.2, 1.6) * gaps
        E += stroma * e_str * (1 - 0.35 * lymph)
        H += stroma * np.float32(style['h_stroma']) * (1 + 1.5 * lymph)
    if float(epit.max()) > 1e-3:
        # epithelial / tumour cytoplasm
        fine = _smooth_noise(noise, 5, y0, x0, h, w, 0.6 * ppu)
        E += epit * (style['e_cyto'] * (1 + 0.08 * fine + 0.08 * coarse))
        H += epit * (style['h_cyto'] * (1 + 0.08 * fine + 0.1 * coarse))
    # nuclei
    label = np.full(h * w, -1, np.int32)
    offs = 0
    params = []
    flat_i, flat_r, flat_a = [], [], []
    for nuc, groups in drawn:
        for idx, oy, ox, mask, prof in groups:
            P = mask.shape[1]
            ly = oy[:, None] - y0 + np.arange(P)[None, :]
            lx = ox[:, None] - x0 + np.arange(P)[None, :]
            ok = mask & ((ly >= 0) & (ly < h))[:, :, None] & ((lx >= 0) & (lx < w))[:, None, :]
            nn, iy, ix = np.nonzero(ok)
            if not len(nn):
                continue
            flat_i.append(ly[nn, iy] * w + lx[nn, ix])
            flat_r.append(idx[nn] + offs)
            flat_a.append(prof[nn, iy, ix])
        params.append(nuc)
        offs += len(nuc['cx'])
    if flat_i:
        fi = np.concatenate(flat_i)
        fr = np.concatenate(flat_r).astype(np.int32)
        fa = np.concatenate(flat_a)
        # where nuclei overlap, the one with the larger index (batches in raster order, then index in the batch) is
        # on top: the same on every canvas of a slide
        np.maximum.at(label, fi, fr)
        win = label[fi] == fr
        amap = np.zeros(h * w, np.float32)
        amap[fi[win]] = fa[win]
        allp = _concat(params)
        lab = label.reshape(h, w)
        isn = lab >= 0
        li = lab[isn]
        if style['border'] > 0 and float(epi.max()) > 0.05:
            # epithelial cell borders: Voronoi boundaries between nuclei (nuclear clumps), a little paler and pinker
            _, vl = cv2.distanceTransformWithLabels(isn.view(np.uint8) ^ 1, cv2.DIST_L2, 3,
                                                    labelType=cv2.DIST_LABEL_CCOMP)
            bd = np.zeros((h, w), np.float32)
            bd[:, 1:] += vl[:, 1:] != vl[:, :-1]
            bd[1:, :] += vl[1:, :] != vl[:-1, :]
            bd = cv2.GaussianBlur(np.minimum(bd, 1), (0, 0), 0.5 * ppu) * (tissue * epi)
            E += bd * np.float32(style['border'])
            H -= bd * H * np.float32(0.5)
        chrom = _smooth_noise(noise, 6, y0, x0, h, w, 0.4 * ppu)
        clump = _smooth_noise(noise, 7, y0, x0, h, w, 1.0 * ppu)
        tex = np.clip(0.6 * chrom[isn] + 0.6 * clump[isn], -2.5, 2.5)
        hn = amap.reshape(h, w)[isn] * (1 + allp['tex'][li].astype(np.float32) * tex)
        H[isn] = np.maximum(hn, 0.02)
        E[isn] = allp['e'][li].astype(np.float32) + 0.25 * E[isn]
    else:
        lab = label.reshape(h, w)
    P = np.zeros((h, w), np.float32)
    if clutter is not None:
        off = cv2.erode((lab < 0).view(np.uint8), np.ones((3, 3), np.uint8)).astype(np.float32)
        H += clutter[0] * off
        E += clutter[1] * off
        P += clutter[2] * off
    # Beer-Lambert: I = I0 * 10 ** -(H * vH + E * vE + P * vP) = exp(ln I0 - ln10 * (H * vH + E * vE + P * vP))
    m = np.stack([-_LN10 * style['vH'], -_LN10 * style['e_scale'] * style['vE'], -_LN10 * _unit(_P_OD),
                  np.log(style['i0'])], 1)
    rgb = cv2.exp(cv2.transform(np.dstack([H, E, P]), m.astype(np.float32)))
    return rgb, lab


def _finish(rgb, style, noise, y0, x0):
    """Focus blur and sensor noise, to uint8."""
    if style['blur'] > 0.05:
        rgb = cv2.GaussianBlur(rgb, (0, 0), style['blur'])
    h, w = rgb.shape[:2]
    rgb = rgb + noise(8, y0, x0, h, w)[..., None] * np.float32(style['noise'])
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------------------

def _make_tile(rng, size=256, mpp=0.5, crowding=None, jpeg=True):
    rng = _as_rng(rng)
    h, w = (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))
    if h < 1 or w < 1 or not mpp > 0:
        raise ValueError('size must be positive and mpp > 0')
    ppu = 1.0 / mpp
    style = _make_style(rng, ppu)
    if crowding is None:
        crowding = rng.uniform(0, 1)
    crowding = float(np.clip(crowding, 0, 1))
    r = rng.random()
    mode = 'full' if r < 0.62 else ('partial' if r < 0.92 else 'empty')
    layout = _Layout(rng, h, w, _FIELD_CELL_UM * ppu, mode, crowding)
    margin = int(math.ceil(MAX_SIZE_UM / 2 * ppu))
    cand = _candidates(rng, layout, style, 0, 0, h, w, margin)
    acc, _ = _place(cand)
    nuc = _take(cand, acc)
    groups = _rasterise(nuc)
    noise = _RngNoise(rng)
    rgb, lab = _render(layout, style, noise, 0, 0, h, w, [(nuc, groups)], _clutter(rng, h, w, ppu))
    img = _finish(rgb, style, noise, 0, 0)
    if jpeg and rng.random() < 0.85:
        q = int(rng.integers(55, 96))
        ok, buf = cv2.imencode('.jpg', img, [cv2.IMWRITE_JPEG_QUALITY, q])
        img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    n = len(nuc['cx'])
    box, frac = _boxes_from_groups(groups, n, 0, 0, h, w)
    boxes, keep = _select_boxes(box, frac, 0, 0, h, w)
    info = {'nuclei': nuc, 'groups': groups, 'label': lab, 'keep': keep, 'style': style, 'crowding': crowding,
            'mode': mode}
    return img, boxes, info


def make_tile(rng, size=256, mpp=0.5, crowding=None):
    """One H&E-like RGB tile (uint8, size x size x 3, or (h, w) if size is a tuple) and its nucleus boxes
    (float32 N x 4 x1, y1, x2, y2 in pixel-edge coordinates; see the module doc for the border rule).

    ``rng``: a numpy.random.Generator or an integer seed.  ``mpp``: micrometres per pixel (0.5 = 20x).
    ``crowding`` in [0, 1] sets nucleus density (None: drawn at random per tile, so a dataset mixes sparse and
    crowded tiles)."""
    img, boxes, _ = _make_tile(rng, size, mpp, crowding)
    return img, boxes


def make_dataset(seed, count, size=256, mpp=0.5, scale=None):
    """``count`` tiles from one seed (different seeds give disjoint sets); tile i depends only on (seed, i), so a
    longer dataset extends a shorter one with the same seed.

    ``scale=(low, high)``: each tile is drawn with its nuclei and textures ``s`` times larger in pixels, ``s``
    log-uniform in that range (as if scanned at ``mpp / s`` and labelled ``mpp``: a scanner's true 20x, a mis-stated
    resolution, shrinkage in processing)."""
    tiles = []
    for i in range(int(count)):
        rng = np.random.default_rng([int(seed), 0, i])
        s = math.exp(rng.uniform(math.log(scale[0]), math.log(scale[1]))) if scale else 1.0
        tiles.append(make_tile(rng, size, mpp / s))
    return tiles


# --------------------------------------------------------------------------------------------------------------
# whole-slide images
# --------------------------------------------------------------------------------------------------------------

class _SlideGen:
    """Generates a slide tile-row by tile-row.  Nuclei are placed per generation tile (centres inside the tile),
    in raster order, taking into account the nuclei already placed in the neighbouring tiles, and rasterised once;
    rendering a tile draws the nuclei of its 3 x 3 neighbourhood, so nuclei crossing seams are drawn whole and
    identically on both sides, with one box."""

    def __init__(self, width, height, seed, mpp, tile):
        self.W, self.H, self.T = width, height, tile
        self.seed = seed
        rng = np.random.default_rng([seed, 1])
        self.ppu = 1.0 / mpp
        self.style = _make_style(rng, self.ppu)
        self.style['blur'] = rng.uniform(0.4, 0.9) * self.ppu * 0.5
        self.style['noise'] = rng.uniform(1.0, 2.0)
        # collagen directions vary much more over a slide than within a tile
        self.style['fib_dtheta'] = rng.uniform(0.9, 1.6) * rng.choice([-1, 1])
        self.layout = _Layout(rng, height, width, _FIELD_CELL_UM * self.ppu * 1.5, 'slide', None)
        # tissue blobs at a coarser scale than within-tile structure: add a very coarse octave to the tissue field
        g = self.layout.grid
        gh, gw = g.shape[:2]
        coarse = max(4, int(max(gh, gw) / 5))
        g[..., _F_TISSUE] = 0.5 * g[..., _F_TISSUE] + 1.2 * _octave_grid(rng, gh, gw, coarse)
        inner = g[2:-2, 2:-2, _F_TISSUE]
        self.layout.t_thr = float(np.quantile(inner, 1 - rng.uniform(0.35, 0.6)))
        self.noise = _HashNoise(seed)
        self.nty = int(math.ceil(height / tile))
        self.ntx = int(math.ceil(width / tile))
        self.cells = {}  # (ty, tx) -> dict(nuc, groups, load)
        self.boxes = []
        self.margin = int(math.ceil(MAX_SIZE_UM * self.ppu)) + 8

    def _place_tile(self, ty, tx):
        T = self.T
        y0, x0 = ty * T, tx * T
        h, w = min(T, self.H - y0), min(T, self.W - x0)
        rng = np.random.default_rng([self.seed, 2, ty, tx])
        cand = _candidates(rng, self.layout, self.style, y0, x0, h, w, 0)
        nbrs = [(ty, tx - 1), (ty - 1, tx - 1), (ty - 1, tx), (ty - 1, tx + 1)]
        nbrs = [k for k in nbrs if k in self.cells and len(self.cells[k]['nuc']['cx'])]
        if nbrs:
            fixed = _concat([self.cells[k]['nuc'] for k in nbrs])
            fload = np.concatenate([self.cells[k]['load'] for k in nbrs])
            acc, fload = _place(cand, fixed, fload)
            o = 0
            for k in nbrs:
                n = len(self.cells[k]['nuc']['cx'])
                self.cells[k]['load'] = fload[o:o + n]
                o += n
        else:
            acc, _ = _place(cand)
        nuc = _take(cand, acc)
        groups = _rasterise(nuc)
        box, frac = _boxes_from_groups(groups, len(nuc['cx']), 0, 0, self.H, self.W)
        b, _ = _select_boxes(box, frac, 0, 0, self.H, self.W)
        self.boxes.append(b)
        self.cells[(ty, tx)] = {'nuc': nuc, 'groups': groups, 'load': np.zeros(len(nuc['cx']))}

    def _render_tile(self, ty, tx):
        T, M = self.T, self.margin
        y0, x0 = ty * T, tx * T
        h, w = min(T, self.H - y0), min(T, self.W - x0)
        drawn = []
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                c = self.cells.get((ty + dy, tx + dx))
                if c is not None and c['groups']:
                    drawn.append((c['nuc'], c['groups']))
        rgb, _ = _render(self.layout, self.style, self.noise, y0 - M, x0 - M, h + 2 * M, w + 2 * M, drawn)
        img = _finish(rgb, self.style, self.noise, y0 - M, x0 - M)
        return img[M:M + h, M:M + w]

    def strips(self):
        """Yield uint8 strips (rows ty*T .. ty*T + T, full width)."""
        for tx in range(self.ntx):
            self._place_tile(0, tx)
        for ty in range(self.nty):
            if ty + 1 < self.nty:
                for tx in range(self.ntx):
                    self._place_tile(ty + 1, tx)
            yield np.concatenate([self._render_tile(ty, tx) for tx in range(self.ntx)], 1)
            for tx in range(self.ntx):
                self.cells.pop((ty - 1, tx), None)


def write_slide(path, width, height, seed, mpp=0.5, tile_size=512):
    """Write a pyramidal tiled JPEG (Q=90) BigTIFF whole-slide image of ``width`` x ``height`` pixels at ``mpp``
    micrometres per pixel, with resolution tags so that large_image reports mm_x = mm_y = mpp / 1000 and
    magnification 10 / mpp.  Tissue blobs on white glass; the image is generated one row of ``tile_size`` tiles at a
    time and streamed to libvips, so memory stays bounded for large slides.

    Returns all nucleus boxes in base-level pixels (float32 N x 4, same conventions as make_tile, clipped to the
    slide) and saves them as ``<path>.boxes.npy``."""
    import pyvips
    import tifffile

    width, height, tile_size = int(width), int(height), int(tile_size)
    if tile_size % 16 or tile_size < 64:
        raise ValueError('tile_size must be a multiple of 16, at least 64')
    if width < 1 or height < 1 or not mpp > 0:
        raise ValueError('width and height must be positive and mpp > 0')
    gen = _SlideGen(width, height, int(seed), float(mpp), tile_size)
    path = os.fspath(path)
    # The base level is streamed, one row of tiles at a time, into an uncompressed strip TIFF next to the output
    # (W x H x 3 bytes of disk; this libvips build has no streaming loader fed from Python), which libvips then reads
    # sequentially and turns into the pyramidal JPEG TIFF in one pass: memory stays at a few tile rows.
    fd, tmp = tempfile.mkstemp(suffix='.tif', prefix='.synthetic-', dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    try:
        tifffile.imwrite(tmp, data=gen.strips(), shape=(height, width, 3), dtype=np.uint8, photometric='rgb',
                         rowsperstrip=tile_size, bigtiff=width * height * 3 > 2 ** 31)
        image = pyvips.Image.new_from_file(tmp, access='sequential')
        px_per_mm = 1000.0 / mpp
        image = image.copy(xres=px_per_mm, yres=px_per_mm)
        image.tiffsave(path, tile=True, tile_width=tile_size, tile_height=tile_size, pyramid=True,
                       compression='jpeg', Q=90, bigtiff=True, resunit='cm')
        del image
    finally:
        os.unlink(tmp)
    boxes = np.concatenate(gen.boxes) if gen.boxes else np.zeros((0, 4), np.float32)
    boxes = boxes.astype(np.float32).reshape(-1, 4)
    np.save(path + '.boxes.npy', boxes)
    return boxes
