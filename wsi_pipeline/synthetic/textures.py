"""Named tissue textures: tumour, stroma, lymphocytes, necrosis, adipose and mucin as H&E-like RGB patches.

Each texture is drawn from the slide's stain preset (eosin and hematoxylin colours), so stain variation carries
over, at any resolution: up to :data:`FINE_UM` µm/px it is drawn directly (nuclei as anti-aliased ellipses, fibres,
vacuoles); coarser atlases are a finer rendering shrunk with area averaging and mirror-tiled, so thumbnails and
low levels show the same colours and coarse structure. ``TEXTURE_CONCEPTS`` names each texture's concept in the
shipped concept set ``workflows/concepts/tissue.yaml`` (the ground truth the demo dual encoder is checked against).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import cv2
import numpy as np

TEXTURES = ("tumour", "stroma", "lymphocytes", "necrosis", "adipose", "mucin")
# texture name -> concept name in workflows/concepts/tissue.yaml
TEXTURE_CONCEPTS = {
    "tumour": "tumour epithelium",
    "stroma": "stroma",
    "lymphocytes": "lymphocytes",
    "necrosis": "necrosis",
    "adipose": "adipose",
    "mucin": "mucin",
}
FINE_UM = 2.0  # coarsest resolution (µm/px) a texture is drawn at directly

RGB = tuple[float, float, float]


def smooth_noise(rng: np.random.Generator, size: int, sigma: tuple[float, float]) -> np.ndarray:
    """Unit-variance Gaussian-blurred noise (sigma_x, sigma_y in px); wide blurs run on a coarser grid."""
    f = max(1, int(min(sigma) // 2))
    n = cv2.GaussianBlur(
        rng.standard_normal((size // f, size // f), np.float32),
        (0, 0),
        sigma[0] / f,
        sigmaY=sigma[1] / f,
        borderType=cv2.BORDER_REFLECT,
    )
    if f > 1:
        n = cv2.resize(n, (size, size), interpolation=cv2.INTER_LINEAR)
    return n / max(float(n.std()), 1e-6)


def _mix(a: RGB | tuple[int, ...], b: RGB | tuple[int, ...], t: float) -> RGB:
    """(1 - t) * a + t * b, per channel."""
    return (a[0] + t * (b[0] - a[0]), a[1] + t * (b[1] - a[1]), a[2] + t * (b[2] - a[2]))


def _ellipses(
    alpha: np.ndarray,
    centres: np.ndarray,
    radii: np.ndarray,
    aspect: np.ndarray,
    angle: np.ndarray,
    value: np.ndarray,
    thickness: int = -1,
) -> None:
    """Anti-aliased ellipses (radii in px; filled, or outlines ``thickness`` px wide) drawn into a float32 plane."""
    params = (centres.tolist(), radii.tolist(), aspect.tolist(), angle.tolist(), value.tolist())
    for (cx, cy), r, asp, ang, a in zip(*params, strict=True):
        axes = (max(1, int(r * 16)), max(1, int(r * asp * 16)))
        cv2.ellipse(alpha, (int(cx * 16), int(cy * 16)), axes, ang, 0, 360, a, thickness, cv2.LINE_AA, 4)


def _count(rng: np.random.Generator, s: int, um: float, per_um2: float) -> int:
    return int(rng.poisson(per_um2 * (s * um) ** 2))


def _layers(
    s: int, base: RGB, layers: list[tuple[np.ndarray, RGB]], grain: np.ndarray, modulate: np.ndarray
) -> np.ndarray:
    """Composite: ``base * modulate``, then each (alpha, colour) layer over it; 3 units of grain; uint8."""
    out = []
    for c in range(3):
        plane = np.full((s, s), base[c], np.float32) * modulate
        for alpha, colour in layers:
            plane += alpha * (colour[c] - plane)
        out.append(plane + 3 * grain)
    return cv2.convertScaleAbs(cv2.merge(out))


def _tumour(rng: np.random.Generator, s: int, um: float, eosin: RGB, hema: RGB, density: float) -> np.ndarray:
    # Sheets and nests of crowded tumour cells (purple cytoplasm) in thin pink septa; large pleomorphic vesicular
    # nuclei (pale chromatin, dark rim, prominent nucleoli), some with a second lobe.
    nests = smooth_noise(rng, s, (25 / um, 25 / um)) + 0.35 * smooth_noise(rng, s, (6 / um, 6 / um))
    in_nest = cv2.GaussianBlur((nests > -1.0).astype(np.float32), (0, 0), max(0.6, 1.2 / um))
    n = _count(rng, s, um, density / 70)
    c = rng.uniform(0, s, (n, 2))
    c = c[in_nest[c[:, 1].astype(int).clip(0, s - 1), c[:, 0].astype(int).clip(0, s - 1)] > 0.5]
    n = len(c)
    r = rng.lognormal(math.log(5.0), 0.25, n).clip(3.0, 10.0) / um
    asp, ang = rng.uniform(0.55, 1, n), rng.uniform(0, 180, n)
    nuc, rim, nucleoli = (np.zeros((s, s), np.float32) for _ in range(3))
    _ellipses(nuc, c, r, asp, ang, rng.uniform(0.8, 0.95, n))
    _ellipses(rim, c, r, asp, ang, np.full(n, 0.8), thickness=max(1, round(0.9 / um)))
    lobe = rng.uniform(0, 1, n) < 0.45  # irregular outlines: a second, offset lobe on some nuclei
    m = int(lobe.sum())
    off = rng.normal(0, 0.45, (n, 2)) * r[:, None]
    _ellipses(
        nuc,
        c[lobe] + off[lobe],
        0.7 * r[lobe],
        rng.uniform(0.5, 1, m),
        rng.uniform(0, 180, m),
        rng.uniform(0.8, 0.95, m),
    )
    k = rng.uniform(0, 1, n) < 0.6
    m = int(k.sum())
    spot = np.full(m, max(0.6, 1.0 / um))
    _ellipses(nucleoli, c[k] + rng.normal(0, 0.2, (m, 2)) * r[k, None], spot, np.ones(m), np.zeros(m), np.full(m, 0.8))
    nuc = np.minimum(nuc, 0.95)
    rim = np.minimum(rim, 1.0) * nuc
    chrom = 1 + 0.1 * smooth_noise(rng, s, (max(0.5, 0.8 / um),) * 2)
    septa = 1 + 0.04 * smooth_noise(rng, s, (3 / um, 1 / um))
    cyto = _mix(eosin, hema, 0.38)
    pale, dark = _mix(hema, eosin, 0.22), _mix(hema, (20, 5, 50), 0.4)
    grain = rng.standard_normal((s, s), np.float32)
    out = []
    for i in range(3):
        plane = cyto[i] * in_nest + eosin[i] * septa * (1 - in_nest)
        plane = plane + nuc * (pale[i] * chrom - plane)
        plane = plane + rim * (dark[i] - plane)
        plane = plane + nucleoli * (dark[i] * 0.7 - plane)
        out.append(plane + 3 * grain)
    return cv2.convertScaleAbs(cv2.merge(out))


def _stroma(rng: np.random.Generator, s: int, um: float, eosin: RGB, hema: RGB, density: float) -> np.ndarray:
    # Wavy collagen bundles (streaky fibres bent by a smooth displacement, pale clefts) with sparse spindle nuclei.
    streaks = smooth_noise(rng, s, (18 / um, max(0.5, 0.7 / um))) + 0.6 * smooth_noise(rng, s, (6 / um, 2.5 / um))
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    bend = 6 / um * smooth_noise(rng, s, (35 / um, 35 / um)) + 2 / um * smooth_noise(rng, s, (10 / um, 10 / um))
    tilt = rng.uniform(-0.35, 0.35)
    fibre = cv2.remap(streaks, xx, yy + bend + tilt * xx, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    cleft = np.clip((fibre - 1.2) * 0.8, 0, 0.65)  # pale gaps between bundles
    modulate = 1 - 0.045 * np.clip(fibre, -2, 1.2)
    n = _count(rng, s, um, density / 900)
    c = rng.uniform(0, s, (n, 2))
    ang = np.degrees(np.arctan(-tilt)) + rng.normal(0, 12, n)  # along the bundles
    nuc = np.zeros((s, s), np.float32)
    _ellipses(nuc, c, rng.uniform(4.5, 7.5, n) / um, rng.uniform(0.2, 0.32, n), ang, rng.uniform(0.75, 0.95, n))
    grain = rng.standard_normal((s, s), np.float32)
    pink = _mix(eosin, (255, 120, 170), 0.08)
    return _layers(
        s, pink, [(cleft, _mix(eosin, (250, 235, 242), 0.75)), (nuc, _mix(hema, (40, 10, 60), 0.1))], grain, modulate
    )


def _lymphocytes(rng: np.random.Generator, s: int, um: float, eosin: RGB, hema: RGB, density: float) -> np.ndarray:
    # A dense infiltrate: small round very dark nuclei packed edge to edge, scant pale cytoplasm between them.
    n = _count(rng, s, um, density / 38)
    c = rng.uniform(0, s, (n, 2))
    nuc = np.zeros((s, s), np.float32)
    _ellipses(
        nuc, c, rng.uniform(2.4, 3.3, n) / um, rng.uniform(0.85, 1, n), rng.uniform(0, 180, n), rng.uniform(0.9, 1.0, n)
    )
    nuc = np.minimum(nuc, 1.0)
    between = _mix(_mix(eosin, hema, 0.3), (245, 235, 245), 0.25)
    modulate = 1 + 0.03 * smooth_noise(rng, s, (20 / um, 20 / um))
    grain = rng.standard_normal((s, s), np.float32)
    return _layers(s, between, [(nuc, _mix(hema, (15, 0, 40), 0.45))], grain, modulate)


def _necrosis(rng: np.random.Generator, s: int, um: float, eosin: RGB, hema: RGB, density: float) -> np.ndarray:
    # Pale pink-grey granular debris, ghost outlines of dead cells, and fragmented nuclear dust.
    base = _mix(_mix(eosin, (205, 190, 200), 0.55), (255, 255, 255), 0.12)
    granules = 0.6 * smooth_noise(rng, s, (max(0.5, 0.9 / um),) * 2) + 0.8 * smooth_noise(rng, s, (8 / um, 8 / um))
    modulate = 1 + 0.045 * granules
    ghosts = np.zeros((s, s), np.float32)
    n = _count(rng, s, um, 1 / 160)
    c = rng.uniform(0, s, (n, 2))
    r = rng.uniform(4.5, 7.0, n) / um
    for (cx, cy), rr in zip(c.tolist(), r.tolist(), strict=True):  # faint eosinophilic rims, no nucleus
        cv2.circle(
            ghosts, (int(cx * 16), int(cy * 16)), max(1, int(rr * 16)), 0.35, max(1, round(0.8 / um)), cv2.LINE_AA, 4
        )
    dust = np.zeros((s, s), np.float32)
    n = _count(rng, s, um, density / 30)
    hubs = rng.uniform(0, s, (max(1, n // 12), 2))
    c = hubs[rng.integers(0, len(hubs), n)] + rng.normal(0, 5 / um, (n, 2))  # karyorrhectic clusters
    _ellipses(
        dust,
        c,
        rng.uniform(0.5, 1.4, n) / um,
        rng.uniform(0.5, 1, n),
        rng.uniform(0, 180, n),
        rng.uniform(0.55, 0.9, n),
    )
    dust = np.minimum(dust, 1.0)
    grain = rng.standard_normal((s, s), np.float32)
    return _layers(
        s, base, [(ghosts, _mix(eosin, (180, 90, 140), 0.3)), (dust, _mix(hema, (60, 40, 90), 0.3))], grain, modulate
    )


def _adipose(rng: np.random.Generator, s: int, um: float, eosin: RGB, hema: RGB, density: float) -> np.ndarray:
    # Large empty polygonal fat cells (Voronoi cells of jittered seeds) with thin pink membranes, small capillaries
    # in the angles between cells and a few flattened nuclei pressed against the membranes.
    spacing = 36 / um
    g = max(2, int(s / spacing) + 4)
    gy, gx = np.mgrid[0:g, 0:g].astype(np.float64)
    pts = (np.stack([gx.ravel(), gy.ravel()], 1) - 1.5) * spacing + rng.uniform(-0.33, 0.33, (g * g, 2)) * spacing
    lo, hi = -2 * spacing, s + 2 * spacing
    sub = cv2.Subdiv2D((int(lo), int(lo), int(hi - lo), int(hi - lo)))
    sub.insert([(float(x), float(y)) for x, y in pts if lo < x < hi and lo < y < hi])
    facets, _ = sub.getVoronoiFacetList([])
    membrane = np.zeros((s, s), np.float32)
    polys = [np.round(np.asarray(f) * 16).astype(np.int32) for f in facets]
    cv2.polylines(membrane, polys, True, 1.0, max(1, round(3.2 / um)), cv2.LINE_AA, 4)
    membrane = np.minimum(membrane, 1.0) * (0.85 + 0.15 * np.clip(smooth_noise(rng, s, (4 / um,) * 2), -1, 1))
    corners = np.unique(np.round(np.concatenate([np.asarray(f) for f in facets])), axis=0)
    corners = corners[((corners > -10 / um) & (corners < s + 10 / um)).all(1)]
    m = len(corners)
    capillary = np.zeros((s, s), np.float32)
    _ellipses(
        capillary,
        corners,
        rng.uniform(2.2, 3.4, m) / um,
        rng.uniform(0.6, 1, m),
        rng.uniform(0, 180, m),
        rng.uniform(0.7, 0.95, m),
    )
    nuc = np.zeros((s, s), np.float32)
    n = _count(rng, s, um, density / 9000)
    c = pts[rng.integers(0, len(pts), n)] + rng.normal(0, 0.5, (n, 2)) * spacing
    _ellipses(
        nuc,
        c,
        rng.uniform(3.5, 5.5, n) / um,
        rng.uniform(0.22, 0.35, n),
        rng.uniform(0, 180, n),
        rng.uniform(0.5, 0.8, n),
    )
    nuc *= membrane
    vacuole = _mix(eosin, (252, 250, 252), 0.8)
    modulate = 1 + 0.004 * smooth_noise(rng, s, (15 / um,) * 2)
    grain = rng.standard_normal((s, s), np.float32)
    layers = [(membrane, _mix(eosin, (200, 80, 140), 0.25)), (np.minimum(capillary, 1.0), (205, 70, 105)), (nuc, hema)]
    return _layers(s, vacuole, layers, grain, modulate)


def _mucin(rng: np.random.Generator, s: int, um: float, eosin: RGB, hema: RGB, density: float) -> np.ndarray:
    # Pale blue-grey pools with wispy darker strands and a few floating cells.
    pool = _mix(hema, (236, 236, 248), 0.55)
    wisp = smooth_noise(rng, s, (14 / um, 3 / um)) + 0.6 * smooth_noise(rng, s, (3 / um, 8 / um))
    strands = np.clip(1 - np.abs(wisp) * 2.2, 0, 1) ** 2 * 0.8
    modulate = 1 + 0.025 * smooth_noise(rng, s, (25 / um,) * 2)
    cells = np.zeros((s, s), np.float32)
    nuc = np.zeros((s, s), np.float32)
    n = _count(rng, s, um, density / 12000)
    c = rng.uniform(0, s, (n, 2))
    _ellipses(cells, c, rng.uniform(6, 10, n) / um, rng.uniform(0.6, 1, n), rng.uniform(0, 180, n), np.full(n, 0.7))
    _ellipses(nuc, c, rng.uniform(2.5, 4.0, n) / um, rng.uniform(0.6, 1, n), rng.uniform(0, 180, n), np.full(n, 0.9))
    grain = rng.standard_normal((s, s), np.float32)
    strand = _mix(hema, (236, 236, 248), 0.3)
    return _layers(
        s,
        pool,
        [(strands, strand), (cells, _mix(eosin, hema, 0.35)), (nuc, _mix(hema, (20, 5, 50), 0.3))],
        grain,
        modulate,
    )


_PAINTERS: dict[str, Callable[[np.random.Generator, int, float, RGB, RGB, float], np.ndarray]] = {
    "tumour": _tumour,
    "stroma": _stroma,
    "lymphocytes": _lymphocytes,
    "necrosis": _necrosis,
    "adipose": _adipose,
    "mucin": _mucin,
}


def _mirror_tile(img: np.ndarray, s: int) -> np.ndarray:
    """``img`` repeated with alternating mirror flips (no seams) and cut to s x s."""
    h, w = img.shape[:2]
    ny, nx = -(-s // h), -(-s // w)
    row = np.concatenate([img if j % 2 == 0 else img[:, ::-1] for j in range(nx)], axis=1)
    full = np.concatenate([row if i % 2 == 0 else row[::-1] for i in range(ny)], axis=0)
    return np.ascontiguousarray(full[:s, :s])


def render_texture(
    name: str, s: int, um_per_px: float, eosin: RGB, hema: RGB, density: float = 1.0, seed: int = 0
) -> np.ndarray:
    """An s x s RGB uint8 patch of texture ``name`` at ``um_per_px``, in the stain's eosin / hematoxylin colours.

    ``density`` scales the number of nuclei (and nuclear dust); the same arguments give the same pixels."""
    if name not in _PAINTERS:
        raise ValueError(f"unknown texture {name!r}; use one of {TEXTURES}")
    key = TEXTURES.index(name) + 1
    rng = np.random.default_rng([seed, key, int(um_per_px * 1000)])
    paint = _PAINTERS[name]
    if um_per_px <= FINE_UM:
        return paint(rng, s, um_per_px, eosin, hema, density)
    # Coarse: draw at FINE_UM (at most 2048 px), shrink with area averaging, repeat with mirror flips.
    fine = min(2048, math.ceil(s * um_per_px / FINE_UM))
    img = paint(rng, fine, FINE_UM, eosin, hema, density)
    side = max(1, round(fine * FINE_UM / um_per_px))
    return _mirror_tile(cv2.resize(img, (side, side), interpolation=cv2.INTER_AREA), s)
