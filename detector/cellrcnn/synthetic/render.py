"""Appearance and rendering: the random style of a tile or slide (stain vectors and intensities, focus, noise),
hard negatives, and the Beer-Lambert composition of haematoxylin, eosin and pigment optical densities into RGB."""

import math

import cv2
import numpy as np

from .fields import F_EPI, fibre_noise, smooth_noise
from .nuclei import concat_nuclei

# Haematoxylin and eosin optical density vectors (R, G, B), normalised.  Between the Ruifrok & Johnston vectors
# (H 0.65 0.70 0.29, E 0.07 0.99 0.11) and Macenko estimates on real 20x H&E (H ~ 0.54 0.75 0.38, E ~ 0.25-0.33
# 0.8-0.9 0.34-0.5): the pure Ruifrok haematoxylin renders nuclei navy blue instead of purple.
_H_OD = np.array([0.56, 0.74, 0.37])
_E_OD = np.array([0.28, 0.82, 0.50])
# brown pigment (haemosiderin, melanin): the optical density direction of DAB-like browns (histomicstk's 'dab')
_P_OD = np.array([0.27, 0.57, 0.78])
_LN10 = math.log(10.0)


# --------------------------------------------------------------------------------------------------------------
# style (per tile / per slide random appearance)
# --------------------------------------------------------------------------------------------------------------

def _unit(v):
    return v / np.linalg.norm(v)


def make_style(rng, ppu):
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
# rendering
# --------------------------------------------------------------------------------------------------------------

def clutter_maps(rng, h, w, ppu):
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


def render(layout, style, noise, y0, x0, h, w, drawn, clutter=None):
    """Render the canvas [y0, y0+h) x [x0, x0+w) (global pixel coordinates) as float32 RGB (before blur / noise).

    ``drawn``: list of (nuc, groups) batches in drawing order; ``clutter``: optional (H, E, pigment) optical density
    maps of hard negatives, added off the nuclei.  Also returns the label image (index into the concatenation of the
    batches, -1 for no nucleus) for tests."""
    H, E, tissue, epi = _tissue_stains(layout, style, noise, y0, x0, h, w)
    lab = _draw_nuclei(H, E, drawn, style, noise, tissue, epi, y0, x0, h, w)
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


def _tissue_stains(layout, style, noise, y0, x0, h, w):
    """Haematoxylin and eosin optical densities (float32 h x w) of the tissue around the nuclei: collagen in the
    stroma, cytoplasm in the epithelium; and the tissue and epithelium masks."""
    ppu = style['ppu']
    f = layout.sample_pixels(y0, x0, h, w)
    tissue, epi, lymph, fibw, _ = layout.derived(f)
    # ragged tissue edges
    edge = smooth_noise(noise, 1, y0, x0, h, w, 1.2 * ppu)
    tissue = np.clip(tissue + 0.7 * edge * (tissue * (1 - tissue) * 4), 0, 1)
    stroma = (1 - epi) * tissue
    epit = epi * tissue
    E = np.zeros((h, w), np.float32)
    H = np.zeros((h, w), np.float32)
    coarse = smooth_noise(noise, 4, y0, x0, h, w, 3.0 * ppu)
    if float(stroma.max()) > 1e-3:
        # collagen: wavy bundles along two orientations (blended by a smooth field), white cracks between them
        disp = f[..., F_EPI] * np.float32(6.0 * ppu) + smooth_noise(noise, 9, y0, x0, h, w, 8.0 * ppu) * np.float32(
            style['wave'] * ppu)
        fib = np.zeros((h, w), np.float32)
        bundles = np.zeros((h, w), np.float32)
        for q, (th, wt) in enumerate(((style['fib_theta'], fibw),
                                      (style['fib_theta'] + style['fib_dtheta'], 1 - fibw))):
            fb = fibre_noise(noise, 20 + q, y0, x0, h, w, th, 16.0 * ppu, 1.0 * ppu, disp)
            fine_q, bund_q = fb[..., 0], fb[..., 1]
            fib += wt * (0.55 * fine_q + 0.85 * bund_q)
            bundles += wt * bund_q
        gaps = np.clip((bundles + 0.3 * coarse + 2.4 - 5.0 * style['gap']) * 1.5, 0, 1)
        e_str = style['e_stroma'] * np.clip(0.85 + 0.17 * fib + 0.1 * coarse, 0.2, 1.6) * gaps
        E += stroma * e_str * (1 - 0.35 * lymph)
        H += stroma * np.float32(style['h_stroma']) * (1 + 1.5 * lymph)
    if float(epit.max()) > 1e-3:
        # epithelial / tumour cytoplasm
        fine = smooth_noise(noise, 5, y0, x0, h, w, 0.6 * ppu)
        E += epit * (style['e_cyto'] * (1 + 0.08 * fine + 0.08 * coarse))
        H += epit * (style['h_cyto'] * (1 + 0.08 * fine + 0.1 * coarse))
    return H, E, tissue, epi


def _nucleus_pixels(drawn, y0, x0, h, w):
    """The canvas pixels covered by the nuclei of ``drawn``, per group: flat pixel indices, the nucleus' index into
    the concatenation of the batches, and its haematoxylin profile there; and the batches' nucleus parameters."""
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
    return flat_i, flat_r, flat_a, params


def _draw_nuclei(H, E, drawn, style, noise, tissue, epi, y0, x0, h, w):
    """Draw the nuclei of ``drawn`` into the optical density maps ``H`` and ``E`` (in place), with the epithelial
    cell borders between them. Returns the label image (index into the concatenation of the batches, -1 for no
    nucleus)."""
    ppu = style['ppu']
    label = np.full(h * w, -1, np.int32)
    flat_i, flat_r, flat_a, params = _nucleus_pixels(drawn, y0, x0, h, w)
    if not flat_i:
        return label.reshape(h, w)
    fi = np.concatenate(flat_i)
    fr = np.concatenate(flat_r).astype(np.int32)
    fa = np.concatenate(flat_a)
    # where nuclei overlap, the one with the larger index (batches in raster order, then index in the batch) is
    # on top: the same on every canvas of a slide
    np.maximum.at(label, fi, fr)
    win = label[fi] == fr
    amap = np.zeros(h * w, np.float32)
    amap[fi[win]] = fa[win]
    allp = concat_nuclei(params)
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
    chrom = smooth_noise(noise, 6, y0, x0, h, w, 0.4 * ppu)
    clump = smooth_noise(noise, 7, y0, x0, h, w, 1.0 * ppu)
    tex = np.clip(0.6 * chrom[isn] + 0.6 * clump[isn], -2.5, 2.5)
    hn = amap.reshape(h, w)[isn] * (1 + allp['tex'][li].astype(np.float32) * tex)
    H[isn] = np.maximum(hn, 0.02)
    E[isn] = allp['e'][li].astype(np.float32) + 0.25 * E[isn]
    return lab


def finish(rgb, style, noise, y0, x0):
    """Focus blur and sensor noise, to uint8."""
    if style['blur'] > 0.05:
        rgb = cv2.GaussianBlur(rgb, (0, 0), style['blur'])
    h, w = rgb.shape[:2]
    rgb = rgb + noise(8, y0, x0, h, w)[..., None] * np.float32(style['noise'])
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)
