"""Geometry of the synthetic head: a lofted closed head mesh, its UVs, expression blendshapes and
the extra geometry that the tracked mesh lacks (hair, fringe, teeth, tongue, earrings).

Head frame (FLAME-like): metres, y up, z out of the face, x towards the subject's left; the eyes
sit at ``y = 0``. The skin is a latitude/longitude grid: ring ``k`` lies at the density-warped
profile parameter ``p_k`` (0 at the crown, 1 at the bottom of the neck stump), column ``j`` at
longitude ``phi_j`` (0 = straight ahead, the UV seam at the back of the head). Every ring is a
horizontal cross-section ``(A sin phi, y, cz + B(phi) cos phi)`` whose sizes follow a profile
table, so the skin is closed (two poles) and the face is a height field over ``(x, y)`` on
which nose, brows, eye sockets, cheeks, lips, chin and ears are smooth displacements.

The lips meet along a *mouth band*: five rings that crowd together (0.4 mm apart) inside the
mouth sector. Opening the jaw spreads them and pulls the middle ones 3 cm inwards, so the closed
skin folds into a mouth cavity (painted dark) in which the untracked teeth and tongue show.
Blinks slide the upper-lid rows down over the painted eye, folding the skin the same way.

Everything here is numpy float64 and deterministic; only the random extra blendshapes
(``expression_dim > 10``) depend on the seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Landmarks of the head frame (metres).
EYE_X, EYE_Y, EYE_HW, EYE_HH = 0.032, 0.0, 0.013, 0.0055  # eye centre |x|, y, half width/height
MOUTH_Y, MOUTH_HW = -0.062, 0.024  # lip line height, half width of the mouth
BROW_Y = 0.026
EAR_Y, EAR_Z = -0.015, -0.008  # ear centre (on both sides)
JAW_HINGE = np.array([0.0, -0.02, 0.0])  # temporomandibular joint, just in front of the ears
JAW_ANGLE_DEG = 14.0  # jaw rotation at jaw_open = 1
JAW_SLIDE = 0.006  # forward slide of the jaw at jaw_open = 1 (the condyle translates too)
POCKET_DEPTH = 0.03  # how far the lip band folds inwards at jaw_open = 1
BAND_OFFSETS = np.array([0.8, 0.4, 0.0, -0.4, -0.8]) * 1e-3  # band ring heights about MOUTH_Y

BLENDSHAPE_NAMES = (
    "jaw_open", "smile_left", "smile_right", "blink_left", "blink_right",
    "brow_raise", "brow_frown", "lip_pucker", "mouth_stretch", "cheek_puff",
)

# Profile below the eyes: y, half width A, front depth Bf, back depth Bb, centre z (metres).
_LOWER_PROFILE = np.array([
    [0.000, 0.075, 0.085, 0.100, 0.000],
    [-0.030, 0.073, 0.088, 0.093, 0.000],
    [-0.055, 0.068, 0.090, 0.078, 0.000],
    [-0.075, 0.061, 0.089, 0.068, -0.002],
    [-0.095, 0.053, 0.085, 0.061, -0.005],
    [-0.108, 0.049, 0.075, 0.059, -0.008],
    [-0.118, 0.049, 0.062, 0.056, -0.012],
    [-0.130, 0.048, 0.050, 0.054, -0.018],
    [-0.150, 0.048, 0.048, 0.053, -0.020],
    [-0.260, 0.050, 0.050, 0.054, -0.020],
])
_CRANIUM_RY = 0.115  # crown height above the eyes
_TAU_CRANIUM, _TAU_CAP = 0.4, 0.95  # profile-table parameter where the cranium / the cap end


def smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    """Cubic Hermite step: 0 at ``edge0``, 1 at ``edge1`` (either order), C1 in between."""
    t = np.clip((np.asarray(x, dtype=np.float64) - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _gauss(x: np.ndarray, y: np.ndarray, cx: float, cy: float, sx: float, sy: float) -> np.ndarray:
    return np.exp(-((x - cx) / sx) ** 2 - ((y - cy) / sy) ** 2)


def _profile_table(n: int = 4001) -> dict[str, np.ndarray]:
    """Dense table of ring sizes over the raw parameter ``tau`` in [0, 1] and the warped ``p``."""
    tau = np.linspace(0.0, 1.0, n)
    theta = np.clip(tau / _TAU_CRANIUM, 0.0, 1.0) * np.pi / 2
    lower = np.clip((tau - _TAU_CRANIUM) / (_TAU_CAP - _TAU_CRANIUM), 0.0, 1.0)
    y_low = lower * _LOWER_PROFILE[-1, 0]
    cols = [np.interp(-y_low, -_LOWER_PROFILE[:, 0], _LOWER_PROFILE[:, i]) for i in range(1, 5)]
    head = tau <= _TAU_CRANIUM
    y = np.where(head, _CRANIUM_RY * np.cos(theta), y_low)
    # sin^0.75 rounds the cranium out into a broad dome instead of an egg.
    sizes = [np.where(head, c[0] * np.sin(theta) ** 0.75, c) for c in cols[:3]]
    # The neck ends in a flat disc: past _TAU_CAP the ring shrinks to the bottom pole.
    shrink = np.clip((1.0 - tau) / (1.0 - _TAU_CAP), 0.0, 1.0)
    A, Bf, Bb = (s * shrink for s in sizes)
    cz = np.where(head, 0.0, cols[3])
    # Arc length averaged over the front, side and back silhouettes, re-weighted so rings crowd
    # around the eyes and the mouth (where the expressions happen) and thin out on the neck.
    ds = (np.hypot(np.diff(y), np.diff(cz + Bf)) + np.hypot(np.diff(y), np.diff(A))
          + np.hypot(np.diff(y), np.diff(cz - Bb))) / 3.0
    ym = 0.5 * (y[1:] + y[:-1])
    density = (1.0 + 2.0 * np.exp(-((ym - EYE_Y) / 0.018) ** 2)
               + 2.5 * np.exp(-((ym - MOUTH_Y) / 0.022) ** 2)
               - 0.45 * smoothstep(-0.13, -0.16, ym))
    p = np.concatenate([[0.0], np.cumsum(ds * density)])
    return dict(tau=tau, p=p / p[-1], y=y, A=A, Bf=Bf, Bb=Bb, cz=cz)


_TABLE = _profile_table()


def _p_of_y(y: float) -> float:
    """Warped parameter of the (face-side) ring at height ``y`` below the eyes."""
    lower = _TABLE["tau"] >= _TAU_CRANIUM
    return float(np.interp(-y, -_TABLE["y"][lower], _TABLE["p"][lower]))


def longitudes(t: np.ndarray) -> np.ndarray:
    """Longitude ``phi`` (radians, 0 = front) of the column parameter ``t`` in [0, 1].

    ``t = 0.5`` is the front and ``t = 0, 1`` the back seam; columns are 1.8x denser in front.
    """
    x = 2.0 * np.asarray(t, dtype=np.float64) - 1.0
    return np.pi * x * (0.55 + 0.45 * x * x)


def mouth_sector(phi: np.ndarray) -> np.ndarray:
    """Weight in [0, 1] of the mouth sector (1 between the mouth corners, 0 beyond ~27 deg)."""
    return 1.0 - smoothstep(np.radians(17.0), np.radians(27.0), np.abs(phi))


@dataclass
class HeadGrid:
    """Ring/column layout of the skin grid for a vertex budget (see :func:`head_grid`)."""

    ring_ps: np.ndarray  # [R] warped profile parameter of each ring
    num_cols: int
    band: np.ndarray  # [5] ring indices of the mouth band, top to bottom

    @property
    def num_rings(self) -> int:
        """Number of rings ``R`` (the poles excluded)."""
        return len(self.ring_ps)

    def band_fraction(self, p: np.ndarray) -> np.ndarray:
        """0 above the mouth band, 1 below, linear across the band's five rings (in ``p``)."""
        lo, hi = self.ring_ps[self.band[0]], self.ring_ps[self.band[-1]]
        return np.clip((np.asarray(p) - lo) / (hi - lo), 0.0, 1.0)

    def warp(self, p: np.ndarray, phi: np.ndarray) -> np.ndarray:
        """Profile parameter at which ring parameter ``p`` samples the surface at longitude ``phi``.

        Identity outside the mouth sector; inside it the five band rings are pulled onto the lip
        line (``MOUTH_Y + BAND_OFFSETS``) and the rings next to them stretch to meet them.
        """
        k0, k1 = self.band[0] - 1, self.band[-1] + 1
        knots = self.ring_ps[k0:k1 + 1]
        targets = np.array([knots[0]] + [_p_of_y(MOUTH_Y + o) for o in BAND_OFFSETS] + [knots[-1]])
        inside = (p > knots[0]) & (p < knots[-1])
        warped = np.where(inside, np.interp(p, knots, targets), p)
        return p + mouth_sector(phi) * (warped - p)


def head_grid(num_vertices_target: int) -> HeadGrid:
    """Rings and columns for about ``num_vertices_target`` skin vertices (at least ~150)."""
    if num_vertices_target < 150:
        raise ValueError(f"num_vertices_target={num_vertices_target} is too small for a head "
                         "(need >= 150 so the eyes and the mouth band get their own rings)")
    num_rings = max(14, int(round(np.sqrt(num_vertices_target / 1.2))))
    num_cols = max(10, int(round((num_vertices_target - 2) / num_rings)))
    ring_ps = np.arange(1, num_rings + 1) / (num_rings + 1)
    k = int(np.argmin(np.abs(ring_ps - _p_of_y(MOUTH_Y))))
    k = int(np.clip(k, 3, num_rings - 4))
    return HeadGrid(ring_ps=ring_ps, num_cols=num_cols, band=np.arange(k - 2, k + 3))


def _loft(p: np.ndarray, phi: np.ndarray) -> np.ndarray:
    """Base (feature-free) surface point ``[..., 3]`` at warped parameter ``p`` and longitude."""
    tab = _TABLE
    tau = np.interp(p, tab["p"], tab["tau"])
    y, A, Bf, Bb, cz = (np.interp(tau, tab["tau"], tab[k]) for k in ("y", "A", "Bf", "Bb", "cz"))
    depth = 0.5 * (Bf + Bb) + 0.5 * (Bf - Bb) * np.cos(phi)  # Bf in front, Bb behind, smooth
    return np.stack([A * np.sin(phi), y, cz + depth * np.cos(phi)], axis=-1)


def face_features(points: np.ndarray) -> np.ndarray:
    """Displacements ``[..., 3]`` that turn the loft into a face (nose, brows, sockets, lips...).

    All are smooth bumps over the face height field ``(x, y)``, faded out away from the front.
    """
    x, y, z = points[..., 0], points[..., 1], points[..., 2]
    ax = np.abs(x)
    front = smoothstep(0.25, 0.6, z / np.maximum(np.hypot(x, z), 1e-9))
    nose_h = np.interp(-y, [-0.02, -0.01, 0.0, 0.015, 0.028, 0.034, 0.040, 0.046],
                       [0.0, 0.004, 0.008, 0.014, 0.022, 0.020, 0.006, 0.0])
    nose_w = np.interp(-y, [-0.02, 0.02, 0.034, 0.046], [0.006, 0.008, 0.011, 0.010])
    dz = nose_h * np.exp(-0.5 * (x / nose_w) ** 2)
    dz += 0.005 * np.exp(-((y - BROW_Y) / 0.009) ** 2 - (x / 0.055) ** 4)
    dz += -0.007 * _gauss(ax, y, EYE_X, EYE_Y + 0.002, 0.017, 0.011)
    dz += 0.004 * _gauss(ax, y, EYE_X, EYE_Y, 0.011, 0.007)  # the eyeball under the lids
    dz += 0.006 * _gauss(ax, y, 0.046, -0.018, 0.018, 0.014)  # cheekbones
    dz += 0.004 * np.exp(-(x / 0.022) ** 4 - ((y - MOUTH_Y - 0.004) / 0.004) ** 2)  # upper lip
    dz += 0.0045 * np.exp(-(x / 0.020) ** 4 - ((y - MOUTH_Y + 0.005) / 0.0045) ** 2)  # lower lip
    dz += -0.002 * _gauss(x, y, 0.0, MOUTH_Y - 0.014, 0.02, 0.004)  # groove under the lip
    dz += 0.006 * _gauss(x, y, 0.0, -0.097, 0.018, 0.012)  # chin
    side = smoothstep(0.6, 0.9, ax / np.maximum(np.hypot(x, z), 1e-9))
    ear = _gauss(y, z, EAR_Y, EAR_Z, 0.024, 0.012) * side
    out = np.zeros_like(points)
    out[..., 0] = np.sign(x) * 0.018 * ear
    out[..., 2] = dz * front
    return out


def head_surface(grid: HeadGrid, p: np.ndarray, phi: np.ndarray) -> np.ndarray:
    """Template skin point ``[..., 3]`` at ring parameter ``p`` and longitude ``phi``.

    The same function places the mesh vertices and paints the texture, so texture features
    land where the geometry puts them whatever the mesh resolution.
    """
    p, phi = np.broadcast_arrays(np.asarray(p, np.float64), np.asarray(phi, np.float64))
    base = _loft(grid.warp(p, phi), phi)
    pts = base + face_features(base)
    # The lips meet in a shallow crease: the inner band rings sit 1.5 mm deeper.
    pts[..., 2] -= 0.0015 * np.sin(np.pi * grid.band_fraction(p)) * mouth_sector(phi)
    return pts


@dataclass
class Part:
    """One piece of geometry in the head frame with its material and expression response.

    ``blendshapes [E, V, 3]`` give its deformation (non-zero for the parts the jaw carries);
    ``occlusion [V]`` is baked ambient occlusion in [0, 1] (dark inside the mouth).
    """

    name: str
    material: str
    vertices: np.ndarray  # [V, 3]
    faces: np.ndarray  # [F, 3]
    uvs: np.ndarray  # [Vt, 2]
    uv_faces: np.ndarray  # [F, 3]
    occlusion: np.ndarray  # [V]
    blendshapes: np.ndarray | None = None  # [E, V, 3]
    two_sided: bool = False  # an open surface seen from both sides (drawn with both windings)
    meta: dict = field(default_factory=dict)


def grid_mesh(points: np.ndarray, top: np.ndarray | None, bottom: np.ndarray | None,
              v_coords: np.ndarray, v_top: float = 1.0, v_bottom: float = 0.0
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mesh of a closed-around ring grid ``points [R, C, 3]`` with optional pole points ``[3]``.

    Faces wind outwards for rings ordered top to bottom with columns increasing in ``phi``.
    UVs: ``u = j / C`` (the seam column duplicated at ``u = 1``), ``v = v_coords[r]``; each
    pole gets one UV per column at the column's centre. Returns vertices, faces, uvs, uv_faces.
    """
    R, C = points.shape[:2]
    verts = [points.reshape(-1, 3)]
    off = 1 if top is not None else 0
    if top is not None:
        verts.insert(0, top[None])
    j, jn = np.arange(C), (np.arange(C) + 1) % C
    faces, uv_faces = [], []
    u = np.arange(C + 1) / C
    uvs = [np.stack(np.broadcast_arrays(u[None, :], v_coords[:, None]), -1).reshape(-1, 2)]
    uv_off = 0
    if top is not None:
        uvs.insert(0, np.stack([(j + 0.5) / C, np.full(C, v_top)], -1))
        uv_off = C
        faces.append(np.stack([np.zeros(C, int), off + j, off + jn], 1))
        uv_faces.append(np.stack([j, uv_off + j, uv_off + j + 1], 1))
    for r in range(R - 1):
        a, b = off + r * C, off + (r + 1) * C
        ua, ub = uv_off + r * (C + 1), uv_off + (r + 1) * (C + 1)
        faces += [np.stack([a + j, b + j, b + jn], 1), np.stack([a + j, b + jn, a + jn], 1)]
        uv_faces += [np.stack([ua + j, ub + j, ub + j + 1], 1), np.stack([ua + j, ub + j + 1, ua + j + 1], 1)]
    if bottom is not None:
        south = off + R * C
        verts.append(bottom[None])
        a, ua = off + (R - 1) * C, uv_off + (R - 1) * (C + 1)
        us = uv_off + R * (C + 1)
        uvs.append(np.stack([(j + 0.5) / C, np.full(C, v_bottom)], -1))
        faces.append(np.stack([a + j, np.full(C, south), a + jn], 1))
        uv_faces.append(np.stack([ua + j, us + j, ua + j + 1], 1))
    return (np.concatenate(verts), np.concatenate(faces).astype(np.int64),
            np.concatenate(uvs), np.concatenate(uv_faces).astype(np.int64))


def build_skin(grid: HeadGrid) -> dict[str, np.ndarray]:
    """The tracked skin mesh: vertices, faces, uvs, uv_faces and per-vertex grid coordinates."""
    phis = longitudes(np.arange(grid.num_cols) / grid.num_cols)
    pts = head_surface(grid, grid.ring_ps[:, None], phis[None, :])  # [R, C, 3]
    top = head_surface(grid, np.array(0.0), np.array(0.0))
    bottom = head_surface(grid, np.array(1.0), np.array(0.0))
    verts, faces, uvs, uv_faces = grid_mesh(pts, top, bottom, 1.0 - grid.ring_ps)
    ps = np.concatenate([[0.0], np.repeat(grid.ring_ps, grid.num_cols), [1.0]])
    ph = np.concatenate([[0.0], np.tile(phis, grid.num_rings), [0.0]])
    return dict(vertices=verts, faces=faces, uvs=uvs, uv_faces=uv_faces, ps=ps, phis=ph)


def _jaw_motion(points: np.ndarray) -> np.ndarray:
    """Displacement ``[V, 3]`` of rigidly jaw-attached points at jaw_open = 1."""
    a = np.radians(JAW_ANGLE_DEG)
    rot = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rel = points - JAW_HINGE
    return rel @ rot.T - rel + np.array([0.0, 0.0, JAW_SLIDE])


def skin_blendshapes(grid: HeadGrid, skin: dict[str, np.ndarray], expression_dim: int,
                     rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    """Localised displacement fields ``[E, V, 3]`` of the skin and their names.

    The first ten are designed (:data:`BLENDSHAPE_NAMES`); beyond that, random smooth bumps on
    the face (``bump_k``) drawn from ``rng``. Each field has compact Gaussian/smoothstep support.
    """
    v = skin["vertices"]
    x, y, z = v[:, 0], v[:, 1], v[:, 2]
    ax, sx = np.abs(x), np.sign(x)
    frac = grid.band_fraction(skin["ps"])
    m = mouth_sector(skin["phis"])
    front = smoothstep(0.25, 0.6, z / np.maximum(np.hypot(x, z), 1e-9))
    shapes = {}

    region = smoothstep(-0.2, 0.3, z / np.maximum(np.hypot(x, z), 1e-9)) * smoothstep(-0.14, -0.118, y)
    lower = m * frac + (1.0 - m) * smoothstep(MOUTH_Y + 0.004, MOUTH_Y - 0.012, y)
    jaw = (region * lower)[:, None] * _jaw_motion(v)
    jaw[:, 1] -= 0.004 * m * frac * np.exp(-((y - MOUTH_Y + 0.006) / 0.008) ** 2)  # lip drops more
    jaw[:, 2] -= POCKET_DEPTH * np.sin(np.pi * frac) * m
    shapes["jaw_open"] = jaw

    for side, name in ((1.0, "smile_left"), (-1.0, "smile_right")):
        corner = _gauss(side * x, y, MOUTH_HW, MOUTH_Y, 0.014, 0.012) * front
        cheek = _gauss(side * x, y, 0.042, -0.03, 0.016, 0.014) * front
        d = corner[:, None] * np.array([0.004 * side, 0.006, -0.003])
        shapes[name] = d + cheek[:, None] * np.array([0.0, 0.003, 0.002])

    for side, name in ((1.0, "blink_left"), (-1.0, "blink_right")):
        ex = (side * x - EYE_X) / EYE_HW
        ey = (y - EYE_Y) / EYE_HH
        top = np.maximum(1.0 - ex ** 2, 0.0)
        lid = (smoothstep(top - 0.25, top, ey) * (1.0 - smoothstep(top + 0.6, top + 2.2, ey))
               * (1.0 - smoothstep(1.0, 1.35, np.abs(ex))) * front)
        shapes[name] = lid[:, None] * np.stack(
            [np.zeros_like(x), -(2.0 * top + 0.2) * EYE_HH, np.full_like(x, 0.004)], -1)

    brow = np.exp(-((y - BROW_Y) / 0.014) ** 2) * (1.0 - smoothstep(0.045, 0.065, ax)) * front
    shapes["brow_raise"] = brow[:, None] * np.array([0.0, 0.005, 0.0])
    inner = _gauss(ax, y, 0.016, BROW_Y - 0.002, 0.011, 0.009) * front
    shapes["brow_frown"] = inner[:, None] * np.stack(
        [-0.002 * sx, np.full_like(x, -0.003), np.full_like(x, 0.001)], -1)
    lips = np.exp(-(x / 0.028) ** 2 - ((y - MOUTH_Y) / 0.012) ** 2) * front
    shapes["lip_pucker"] = lips[:, None] * np.stack([-0.3 * x, np.zeros_like(x), np.full_like(x, 0.007)], -1)
    corners = _gauss(ax, y, MOUTH_HW, MOUTH_Y, 0.013, 0.010) * front
    shapes["mouth_stretch"] = corners[:, None] * np.stack(
        [0.006 * sx, np.full_like(x, -0.002), np.full_like(x, -0.002)], -1)
    puff = _gauss(ax, y, 0.045, MOUTH_Y + 0.01, 0.018, 0.018) * front
    outward = np.stack([x, np.zeros_like(x), z], -1) / np.maximum(np.hypot(x, z), 1e-9)[:, None]
    shapes["cheek_puff"] = 0.006 * puff[:, None] * outward

    names = list(BLENDSHAPE_NAMES[:expression_dim])
    fields = [shapes[n] for n in names]
    for k in range(len(BLENDSHAPE_NAMES), expression_dim):
        cx, cy = rng.uniform(-0.05, 0.05), rng.uniform(-0.1, 0.05)
        sig = rng.uniform(0.012, 0.025)
        direction = rng.normal(size=3) * [0.5, 0.5, 1.0]
        direction *= rng.uniform(0.002, 0.004) / np.linalg.norm(direction)
        bump = _gauss(x, y, cx, cy, sig, sig) * front
        fields.append((bump / max(bump.max(), 1e-9))[:, None] * direction)  # peak = drawn amplitude
        names.append(f"bump_{k}")
    return np.stack(fields).astype(np.float64), names


def _orient(verts: np.ndarray, faces: np.ndarray, refs: np.ndarray) -> np.ndarray:
    """Flip faces whose normal points towards their reference (inside) point ``refs [F, 3]``."""
    a, b, c = (verts[faces[:, i]] for i in range(3))
    normal = np.cross(b - a, c - a)
    flip = (normal * ((a + b + c) / 3.0 - refs)).sum(-1) < 0
    faces = faces.copy()
    faces[flip] = faces[flip][:, [0, 2, 1]]
    return faces


def _ellipsoid(center: np.ndarray, radii: np.ndarray, n_lat: int = 8, n_lon: int = 12
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Closed ellipsoid mesh with grid UVs (vertices, faces, uvs, uv_faces)."""
    theta = np.arange(1, n_lat) * np.pi / n_lat
    phi = np.arange(n_lon) * 2 * np.pi / n_lon
    dirs = np.stack([np.sin(theta)[:, None] * np.sin(phi), np.cos(theta)[:, None] + 0 * phi,
                     np.sin(theta)[:, None] * np.cos(phi)], -1)
    pts = center + dirs * radii
    verts, faces, uvs, uv_faces = grid_mesh(pts, center + [0, radii[1], 0], center - [0, radii[1], 0],
                                            1.0 - theta / np.pi)
    return verts, _orient(verts, faces, np.broadcast_to(center, (len(faces), 3))), uvs, uv_faces


def _arc_tube(radius: float, half_angle: float, z_center: float, y_top: float, y_bottom: float,
              thickness: float, n_arc: int = 17):
    """Closed tube with a rectangular section swept along a horizontal arc (a row of teeth).

    The arc is centred on the z axis at ``z_center``; UV ``v`` runs along the arc.
    """
    psi = np.linspace(-half_angle, half_angle, n_arc)
    sec_r = np.array([radius, radius, radius - thickness, radius - thickness])
    sec_y = np.array([y_top, y_bottom, y_bottom, y_top])
    pts = np.stack([sec_r[None] * np.sin(psi)[:, None], sec_y[None] + 0 * psi[:, None],
                    z_center + sec_r[None] * np.cos(psi)[:, None]], -1)  # [n_arc, 4, 3]
    rc, yc = radius - thickness / 2, (y_top + y_bottom) / 2

    def centre(a):
        return np.stack([rc * np.sin(a), yc + 0 * a, z_center + rc * np.cos(a)], -1)

    verts, faces, uvs, uv_faces = grid_mesh(pts, centre(psi[0]), centre(psi[-1]),
                                            np.linspace(0.0, 1.0, n_arc), 0.0, 1.0)
    face_psi = np.arctan2(verts[faces, 0].mean(1), verts[faces, 2].mean(1) - z_center)
    eps = 0.1 * (psi[1] - psi[0])
    return verts, _orient(verts, faces, centre(np.clip(face_psi, psi[0] + eps, psi[-1] - eps))), uvs, uv_faces


HAIRLINE_DEG = np.array([0.0, 30.0, 60.0, 80.0, 110.0, 140.0, 180.0])
HAIRLINE_Y = np.array([0.070, 0.066, 0.050, 0.032, 0.022, -0.020, -0.060])


def _p_at_height(y: np.ndarray) -> np.ndarray:
    """Warped profile parameter of the ring at height ``y`` (the whole head, crown to neck)."""
    return np.interp(-np.asarray(y), -_TABLE["y"], _TABLE["p"])


def _radial(points: np.ndarray) -> np.ndarray:
    """Outward direction from the head centre; a good enough normal on the cranium."""
    d = points - np.array([0.0, -0.01, -0.005])
    return d / np.linalg.norm(d, axis=-1, keepdims=True)


def build_extras(grid: HeadGrid, expression_dim: int, hair: bool = True, accessories: bool = True,
                 mouth_interior: bool = True) -> list[Part]:
    """Untracked geometry in the head frame: hair cap + fringe, earrings, teeth and tongue.

    Lower teeth and tongue ride on the jaw (their ``jaw_open`` field is the rigid jaw motion);
    the rest is rigid with the head. The hair cap is an open shell that meets the skin along
    the hairline (thickness 1.5 mm there) with strand clumps modulating its thickness.
    """
    parts: list[Part] = []
    cols = max(24, grid.num_cols)
    if hair:
        phis = longitudes(np.arange(cols) / cols)
        p_line = _p_at_height(np.interp(np.degrees(np.abs(phis)), HAIRLINE_DEG, HAIRLINE_Y))
        n_rings = max(6, grid.num_rings // 3)
        us = np.arange(1, n_rings + 1) / n_rings  # 0 at the crown, 1 on the hairline
        skin = head_surface(grid, us[:, None] * p_line[None, :], phis[None, :])
        clumps = 1.0 + 0.15 * np.sin(26 * phis + 2 * np.sin(3 * phis))[None, :] * us[:, None]
        thick = (0.010 + 0.008 * (1 - us[:, None]) ** 2) * clumps * np.sqrt(1 - us[:, None] ** 4) + 0.0015
        pts = skin + _radial(skin) * thick[..., None]
        crown = head_surface(grid, np.array(0.0), np.array(0.0)) + np.array([0.0, 0.018 + 0.0015, 0.0])
        v, f, uv, uvf = grid_mesh(pts, crown, None, 1.0 - us)
        parts.append(Part("hair", "hair", v, f, uv, uvf, np.ones(len(v))))
        # Fringe: ribbons combed from the hairline down over the forehead, towards the subject's right.
        vs, fs, uvs, n_seg, k_strands = [], [], [], 6, 7
        for k, phi0 in enumerate(np.linspace(-0.42, 0.18, k_strands)):
            s = np.linspace(0.0, 1.0, n_seg + 1)
            p0 = _p_at_height(np.interp(np.degrees(abs(phi0)), HAIRLINE_DEG, HAIRLINE_Y)) - 0.01
            p1 = _p_at_height(0.036 + 0.004 * np.cos(3.0 * k))
            ps, ph = p0 + (p1 - p0) * s, phi0 - 0.14 * s ** 1.5
            centre = head_surface(grid, ps, ph)
            centre = centre + _radial(centre) * (0.007 - 0.004 * s)[:, None]
            side = head_surface(grid, ps, ph + 1e-3) - head_surface(grid, ps, ph - 1e-3)
            side /= np.linalg.norm(side, axis=-1, keepdims=True)
            half = (0.0035 * (1 - 0.7 * s))[:, None] * side
            ribbon = np.stack([centre - half, centre + half], 1).reshape(-1, 3)
            i = sum(len(r) for r in vs) + 2 * np.arange(n_seg)[:, None]  # left vertex of each segment
            fs.append(np.concatenate([np.hstack([i, i + 1, i + 3]), np.hstack([i, i + 3, i + 2])]))
            vs.append(ribbon)
            u0 = (k + 0.5) / k_strands
            uvs.append(np.stack([u0 + np.tile([-0.03, 0.03], n_seg + 1), 1.0 - 0.5 * np.repeat(s, 2)], -1))
        v, f, uv = np.concatenate(vs), np.concatenate(fs), np.concatenate(uvs)
        parts.append(Part("fringe", "hair", v, f, uv, f.copy(), np.full(len(v), 0.9), two_sided=True))
    if accessories:
        # A gold bead hanging just under each ear lobe.
        lobe = head_surface(grid, np.array(_p_at_height(EAR_Y - 0.036)), np.array(np.pi / 2))
        for side, name in ((1.0, "earring_left"), (-1.0, "earring_right")):
            centre = np.array([side * (lobe[0] + 0.001), EAR_Y - 0.04, EAR_Z])
            v, f, uv, uvf = _ellipsoid(centre, np.full(3, 0.0042), 6, 10)
            parts.append(Part(name, "gold", v, f, uv, uvf, np.ones(len(v))))
    if mouth_interior:
        base = _loft(np.array(_p_of_y(MOUTH_Y)), np.array(0.0))
        z_lip = float((base + face_features(base))[2])
        teeth = (("teeth_upper", 0.027, z_lip - 0.0045, MOUTH_Y + 0.007, MOUTH_Y - 0.0015, 0.8, False),
                 ("teeth_lower", 0.0255, z_lip - 0.0065, MOUTH_Y + 0.0005, MOUTH_Y - 0.007, 0.7, True))
        for name, radius, z_front, y0, y1, occ, on_jaw in teeth:
            v, f, uv, uvf = _arc_tube(radius, np.radians(62.0), z_front - radius, y0, y1, 0.004)
            parts.append(Part(name, "teeth", v, f, uv, uvf, np.full(len(v), occ),
                              meta=dict(on_jaw=on_jaw)))
        v, f, uv, uvf = _ellipsoid(np.array([0.0, MOUTH_Y - 0.008, z_lip - 0.032]),
                                   np.array([0.018, 0.006, 0.02]), 8, 12)
        parts.append(Part("tongue", "tongue", v, f, uv, uvf, np.full(len(v), 0.55), meta=dict(on_jaw=True)))
    for part in parts:
        if part.meta.get("on_jaw") and expression_dim > 0:
            part.blendshapes = np.zeros((expression_dim, len(part.vertices), 3))
            part.blendshapes[0] = _jaw_motion(part.vertices)
    return parts
