"""Random fields in global pixel coordinates: white noise (drawn per tile, or a function of position that is the
same on every canvas of a slide), smoothed and fibre-like noise, and the smooth layout fields (tissue, epithelium,
lymphocyte aggregates, fibre direction, crowding) sampled at any pixel."""

import math

import cv2
import numpy as np

FIELD_CELL_UM = 20.0  # spacing of the smooth layout field grid (micrometres)


# --------------------------------------------------------------------------------------------------------------
# random sources
# --------------------------------------------------------------------------------------------------------------

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


class RngNoise:
    """Noise source for a single tile: plain draws from the generator (coordinates are irrelevant)."""

    def __init__(self, rng):
        self.rng = rng

    def __call__(self, key, y0, x0, h, w):
        u = self.rng.random((h, w), dtype=np.float32)
        u -= np.float32(0.5)
        u *= np.float32(math.sqrt(12.0))
        return u


class HashNoise:
    """Noise source for whole slides: a function of (key, global position)."""

    def __init__(self, seed):
        self.base = int(np.random.SeedSequence([seed, 7]).generate_state(1, np.uint64)[0])

    def __call__(self, key, y0, x0, h, w):
        return _hash_noise(self.base ^ (key * 0x632BE59BD9B4E019), y0, x0, h, w)


def smooth_noise(noise, key, y0, x0, h, w, sigma):
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


def fibre_noise(noise, key, y0, x0, h, w, theta, along, across, disp):
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


# --------------------------------------------------------------------------------------------------------------
# smooth layout fields
# --------------------------------------------------------------------------------------------------------------

# channels of the layout grid
F_TISSUE, F_EPI, F_LYMPH, F_FIB, F_DENS = range(5)
NF = 5


def octave_grid(rng, gh, gw, coarse):
    """Unit-ish std smooth noise on a (gh, gw) grid: a coarse octave (upsampled by ``coarse``) plus a fine one."""
    ch, cw = gh // coarse + 3, gw // coarse + 3
    c = rng.standard_normal((ch, cw)).astype(np.float32)
    c = cv2.resize(c, (cw * coarse, ch * coarse), interpolation=cv2.INTER_CUBIC)[coarse:coarse + gh, coarse:coarse + gw]
    f = rng.standard_normal((gh, gw)).astype(np.float32)
    f = cv2.GaussianBlur(f, (0, 0), 0.8)
    return 0.85 * c + 0.9 * f


class Layout:
    """Smooth random fields on a coarse grid (cell ``cell`` pixels, origin at pixel (-2 cells, -2 cells)),
    sampled at any pixel with bicubic interpolation, so that any canvas of a slide sees the same continuous field."""

    def __init__(self, rng, height, width, cell, mode, crowding):
        self.cell = cell
        gh, gw = int(math.ceil(height / cell)) + 5, int(math.ceil(width / cell)) + 5
        g = np.empty((gh, gw, NF), np.float32)
        g[..., F_TISSUE] = octave_grid(rng, gh, gw, 4)
        g[..., F_EPI] = octave_grid(rng, gh, gw, 3)
        g[..., F_LYMPH] = octave_grid(rng, gh, gw, 2)
        g[..., F_FIB] = octave_grid(rng, gh, gw, 4)
        g[..., F_DENS] = octave_grid(rng, gh, gw, 5)
        self.grid = g
        inner = g[2:-2, 2:-2]
        # tissue threshold: mode 'full' (all tissue), 'partial' (random coverage) or 'slide' (irregular blobs)
        if mode == 'full':
            self.t_thr = -1e9
        else:
            cover = {'partial': rng.uniform(0.25, 0.9), 'empty': rng.uniform(0.0, 0.12),
                     'slide': rng.uniform(0.35, 0.6)}[mode]
            self.t_thr = float(np.quantile(inner[..., F_TISSUE], 1 - cover)) if cover > 0 else 1e9
        # epithelial fraction: none, some or all of the tissue (of a tile); part of the tissue (of a slide)
        r = rng.random()
        ecover = 0.0 if r < 0.25 else (1.0 if r < 0.5 else rng.uniform(0.2, 0.8))
        if mode == 'slide':
            ecover = rng.uniform(0.2, 0.6)
        self.e_thr = float(np.quantile(inner[..., F_EPI], 1 - ecover)) if 0 < ecover < 1 else (
            -1e9 if ecover >= 1 else 1e9)
        # lymphocyte aggregates over 5-50 % of the tissue, or (one tile in five) a sheet over most of it
        lcover = rng.uniform(0.6, 0.95) if rng.random() < 0.2 else rng.uniform(0.05, 0.5)
        self.l_thr = float(np.quantile(inner[..., F_LYMPH], 1 - lcover))
        self.crowding = crowding  # None: from the density field (slides)

    def sample(self, y0, x0, h, w, step=1, channels=NF):
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
        tissue = np.clip((f[..., F_TISSUE] - self.t_thr) * 8.0 + 0.5, 0, 1)
        epi = np.clip((f[..., F_EPI] - self.e_thr) * 2.5 + 0.5, 0, 1)
        lymph = np.clip((f[..., F_LYMPH] - self.l_thr) * 2.0 + 0.3, 0, 1)
        fibw = np.clip(f[..., F_FIB] * 0.8 + 0.5, 0, 1)
        if self.crowding is not None:
            crowd = np.float32(self.crowding)
        elif f.shape[-1] > F_DENS:
            crowd = np.clip(0.5 + 0.45 * f[..., F_DENS], 0, 1)
        else:
            crowd = None
        return tissue, epi, lymph, fibw, crowd
