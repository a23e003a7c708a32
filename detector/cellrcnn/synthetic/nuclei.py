"""Nuclei: random shape and stain parameters by kind, placement under the crowding bound, rasterisation into
masks and haematoxylin profiles, and their exact boxes with the border rule."""

import numpy as np

from .fields import NF

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
_NHARM = 4  # boundary jitter harmonics k = 2..5


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


def take_nuclei(nuc, idx):
    return {k: v[idx] for k, v in nuc.items()}


def concat_nuclei(nucs):
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


def place(cand, fixed=None, fixed_load=None, limit=MAX_HIDDEN):
    """Greedy acceptance of candidate nuclei (in their order) such that every nucleus (candidates and the already
    accepted ``fixed`` ones) is covered by others over at most ``limit`` of its area; the overlap of two nuclei is
    bounded by the lens area of their bounding circles, so the rule holds whatever the drawing order.
    Returns (indices of accepted candidates, updated loads of fixed nuclei)."""
    from scipy.spatial import cKDTree

    nf = 0 if fixed is None else len(fixed['cx'])
    allc = cand if not nf else concat_nuclei([fixed, cand])
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


def rasterise(nuc):
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
        g = take_nuclei(nuc, idx)
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


def boxes_from_groups(groups, n, y0, x0, h, w):
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


def select_boxes(box, frac, y0, x0, h, w):
    """Apply the border rule (keep when >= VISIBLE_FRACTION of the mask is inside) and clip; returns float32 N x 4."""
    keep = frac >= VISIBLE_FRACTION
    b = box[keep].copy()
    b[:, [0, 2]] = np.clip(b[:, [0, 2]], x0, x0 + w)
    b[:, [1, 3]] = np.clip(b[:, [1, 3]], y0, y0 + h)
    return b.astype(np.float32).reshape(-1, 4), keep


def candidates(rng, layout, style, y0, x0, h, w, margin):
    """Candidate nuclei (Poisson process thinned by the density fields) with centres in the region
    [y0 - margin, y0 + h + margin) x [x0 - margin, x0 + w + margin), in random order."""
    ppu = style['ppu']
    step = max(2, int(round(2 * ppu)))
    gh, gw = (h + 2 * margin) // step + 1, (w + 2 * margin) // step + 1
    f = layout.sample(y0 - margin, x0 - margin, gh, gw, step, channels=NF if layout.crowding is None else 4)
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
