"""Synthetic subject with exact ground truth: a procedural head rendered along smooth trajectories.

:func:`generate_synthetic_subject` builds a :class:`~headkit.data.subject.Subject` in seconds:

* a closed procedural skin mesh with UVs and localised expression blendshapes
  (:mod:`headkit.data.synthetic_head`), a detailed texture (:mod:`headkit.data.synthetic_texture`);
* geometry the tracked mesh lacks: hair cap and fringe, earrings, teeth and tongue in a mouth
  cavity that opens with the jaw;
* Lambert + Blinn-Phong shading under lights fixed in the world, so appearance depends on the
  view direction and on the head pose relative to the lights;
* a fixed camera, smooth head-pose and expression trajectories defined in *seconds* (30 and 60 fps
  sample the same motion), supersampled anti-aliasing, a constant background and coverage masks;
* optional tracking noise: the subject holds the noisy "tracked" cameras/expressions/vertices,
  ``extras`` the true ones.

World frame = head frame at rest (metres, y up, the face looking down +z); the camera sits on +z.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..cameras import camtoworld_to_viewmat, intrinsics_from_fov, look_at, perturb_pose, transform_points
from ..mesh import vertex_normals
from ..render.mesh_raster import MeshRaster, interpolate, rasterize_mesh
from .subject import Subject, holdout_split
from .synthetic_head import build_extras, build_skin, head_grid, mouth_sector, skin_blendshapes
from .synthetic_motion import (correlation_sigma_frames, expression_trajectories, head_motion, parse_bursts,
                               smooth_noise)
from .synthetic_texture import MATERIALS, SHININESS, paint_textures

# Lights fixed in the world: (direction towards the light, intensity). The key light comes from
# the viewer's upper left, the fill from the right; both also drive the specular highlights.
DEFAULT_LIGHTS = (((-0.45, 0.5, 0.75), 0.8), ((0.6, 0.05, 0.8), 0.3))
DEFAULT_AMBIENT = 0.25
# Bumped whenever the same settings would render differently (stored in ``meta``; caches keyed
# on the settings alone should include it).
GENERATOR_VERSION = 1


@dataclass
class SyntheticHead:
    """Everything static about the synthetic head, as torch tensors ready for rendering.

    The first ``num_skin_vertices`` rows of ``rest_vertices`` are the tracked skin (the Subject's
    mesh); the rest are the untracked extras. All positions are in the head frame (metres).
    """

    rest_vertices: Tensor  # [Va, 3] skin then extras
    blendshapes: Tensor  # [E, Va, 3] per-vertex displacement per unit coefficient
    faces: Tensor  # [Fa, 3] int64 into rest_vertices, outward; reversed copies of open parts last
    uvs: Tensor  # [Ta, 2]
    uv_faces: Tensor  # [Fa, 3] int64 into uvs
    face_materials: Tensor  # [Fa] int64 index into MATERIALS
    occlusion: Tensor  # [Va] baked ambient occlusion
    textures: list[Tensor]  # per material [1, 4, R, R] (RGB albedo + specular strength)
    num_skin_vertices: int
    num_skin_faces: int
    num_skin_uvs: int
    num_oriented_faces: int  # faces[:num_oriented_faces] define the shading normals
    blendshape_names: list[str]
    part_names: list[str]

    @property
    def skin_faces(self) -> Tensor:  # [F, 3]
        """Faces of the tracked skin mesh."""
        return self.faces[: self.num_skin_faces]

    def deform(self, expressions: Tensor) -> Tensor:  # [B, E]
        """Head-frame vertices ``[B, Va, 3]`` of skin and extras: ``rest + Σ_i e_i B_i``."""
        offsets = torch.einsum("be,evc->bvc", expressions.to(self.blendshapes), self.blendshapes)
        return self.rest_vertices + offsets

    def skin_vertices(self, expressions: Tensor, head_poses: Tensor) -> Tensor:  # [B, E], [B, 4, 4]
        """World-space tracked skin ``[B, V, 3]``: template + Σ e_i B_i, posed by ``head_poses``."""
        V = self.num_skin_vertices
        local = self.rest_vertices[:V] + torch.einsum("be,evc->bvc", expressions.to(self.blendshapes),
                                                      self.blendshapes[:, :V])
        return transform_points(local, head_poses.to(local))


def build_synthetic_head(num_vertices_target: int = 2500, expression_dim: int = 10,
                         texture_resolution: int = 512, seed: int = 0, hair: bool = True,
                         accessories: bool = True, mouth_interior: bool = True) -> SyntheticHead:
    """Build the head: skin grid of ~``num_vertices_target`` vertices, ``expression_dim`` blendshapes
    (10 designed ones, then random local bumps), extras, and textures painted from ``seed``."""
    if expression_dim < 1:
        raise ValueError(f"expression_dim must be >= 1, got {expression_dim}")
    if texture_resolution < 32:
        raise ValueError(f"texture_resolution must be >= 32, got {texture_resolution}")
    rng = np.random.default_rng([seed, 1])
    grid = head_grid(num_vertices_target)
    skin = build_skin(grid)
    shapes, names = skin_blendshapes(grid, skin, expression_dim, rng)
    parts = build_extras(grid, expression_dim, hair=hair, accessories=accessories,
                         mouth_interior=mouth_interior)
    verts, blends, faces, uvs, uv_faces, mats, occ = [skin["vertices"]], [shapes], [skin["faces"]], \
        [skin["uvs"]], [skin["uv_faces"]], [np.zeros(len(skin["faces"]), np.int64)], []
    # The lip band lines the mouth cavity: dark inside, a crease when the lips are closed.
    occ.append(1.0 - 0.85 * np.sin(np.pi * grid.band_fraction(skin["ps"])) * mouth_sector(skin["phis"]))
    nv, nt = len(skin["vertices"]), len(skin["uvs"])
    for part in parts:
        verts.append(part.vertices)
        blends.append(part.blendshapes if part.blendshapes is not None
                      else np.zeros((expression_dim, len(part.vertices), 3)))
        faces.append(part.faces + nv)
        uvs.append(part.uvs)
        uv_faces.append(part.uv_faces + nt)
        mats.append(np.full(len(part.faces), MATERIALS.index(part.material), np.int64))
        occ.append(part.occlusion)
        nv, nt = nv + len(part.vertices), nt + len(part.uvs)
    # Back-facing copies of two-sided parts go last: normals come from the oriented faces only
    # (a face and its reverse would cancel), and the rasterizer can cull back faces.
    num_oriented = sum(len(f) for f in faces)
    for k, part in enumerate(parts):
        if part.two_sided:
            faces.append(faces[k + 1][:, [0, 2, 1]])
            uv_faces.append(uv_faces[k + 1][:, [0, 2, 1]])
            mats.append(mats[k + 1])
    textures = paint_textures(grid, texture_resolution, np.random.default_rng([seed, 2]))
    f32 = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    i64 = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))  # noqa: E731
    return SyntheticHead(
        rest_vertices=f32(np.concatenate(verts)), blendshapes=f32(np.concatenate(blends, axis=1)),
        faces=i64(np.concatenate(faces)), uvs=f32(np.concatenate(uvs)),
        uv_faces=i64(np.concatenate(uv_faces)),
        face_materials=i64(np.concatenate(mats)), occlusion=f32(np.concatenate(occ)),
        textures=[f32(textures[m]).permute(2, 0, 1)[None] for m in MATERIALS],
        num_skin_vertices=len(skin["vertices"]), num_skin_faces=len(skin["faces"]),
        num_skin_uvs=len(skin["uvs"]), num_oriented_faces=num_oriented, blendshape_names=names,
        part_names=[p.name for p in parts])


def shade_blinn_phong(
    albedos: Tensor,  # [P, 3]
    spec_strengths: Tensor,  # [P, 1]
    shininess: Tensor,  # [P, 1]
    occlusion: Tensor,  # [P, 1]
    normals: Tensor,  # [P, 3] (normalised here)
    views: Tensor,  # [P, 3] unit directions from the surface to the camera
    lights=DEFAULT_LIGHTS,
    ambient: float = DEFAULT_AMBIENT,
    specular: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Lambert + Blinn-Phong under directional lights; returns ``(colours [P, 3], speculars [P, 1])``.

    Normals are turned towards the viewer first (two-sided lighting). With unit light directions
    ``L_l``, intensities ``I_l`` and ``H_l = normalize(L_l + V)``::

        colour = o · a · (ambient + Σ_l I_l max(0, N·L_l)) + s,
        s = specular · o · k · Σ_l I_l [N·L_l > 0] max(0, N·H_l)^n

    clamped to [0, 1]. Only ``s`` depends on the view direction ``V``.
    """
    nrm = F.normalize(normals, dim=-1)
    nrm = torch.where((nrm * views).sum(-1, keepdim=True) < 0, -nrm, nrm)
    diffuse = torch.full_like(occlusion, ambient)
    spec = torch.zeros_like(occlusion)
    for direction, intensity in lights:
        L = F.normalize(torch.as_tensor(direction, dtype=nrm.dtype), dim=0)
        ndl = nrm @ L[:, None]
        diffuse = diffuse + intensity * ndl.clamp_min(0)
        ndh = (nrm * F.normalize(L + views, dim=-1)).sum(-1, keepdim=True).clamp_min(0)
        spec = spec + intensity * (ndl > 0) * ndh.pow(shininess)
    spec = specular * occlusion * spec_strengths * spec  # white highlights
    return (occlusion * albedos * diffuse + spec).clamp(0, 1), spec


def render_head(
    head: SyntheticHead,
    expressions: Tensor,  # [B, E]
    head_poses: Tensor,  # [B, 4, 4]
    camtoworlds: Tensor,  # [B, 4, 4]
    Ks: Tensor,  # [B, 3, 3]
    width: int,
    height: int,
    supersample: int = 2,
    background: tuple[float, float, float] = (1.0, 1.0, 1.0),
    lights=DEFAULT_LIGHTS,
    ambient: float = DEFAULT_AMBIENT,
    specular: float = 1.0,
    return_aux: bool = False,
) -> dict[str, Tensor]:
    """Render ``B`` frames of the head with anti-aliasing.

    Args:
        expressions: ``[B, E]`` blendshape coefficients.
        head_poses: ``[B, 4, 4]`` head-to-world transforms.
        camtoworlds: ``[B, 4, 4]`` OpenCV cameras; Ks: ``[B, 3, 3]`` intrinsics for ``width x height``.
        supersample: ``s``; the scene is rasterized at ``s·W x s·H`` and box-filtered down.
        lights: ``((direction towards the light in world, intensity), ...)``.
        specular: global scale of the specular term (0 gives a purely Lambertian render).

    Shading is :func:`shade_blinn_phong` with the albedo and specular strength ``k`` from the
    material's texture, a shininess per material and the baked occlusion; the lights are fixed
    in the world, so the highlights move when the camera or the head moves, the diffuse shading
    only when the head moves. Back faces are culled (the open fringe is stored with both windings).

    Returns:
        ``images [B, H, W, 3]`` in [0, 1] (composited on ``background``), ``alphas [B, H, W]``
        coverage in [0, 1], ``face_ids [B, sH, sW]`` (supersampled, -1 on background) and, with
        ``return_aux``, ``materials [B, sH, sW]`` (index into MATERIALS, -1 on background) and
        ``speculars [B, sH, sW]`` (the specular term alone, grey).
    """
    if supersample < 1:
        raise ValueError(f"supersample must be >= 1, got {supersample}")
    s, B = int(supersample), expressions.shape[0]
    Hs, Ws = height * s, width * s
    verts = transform_points(head.deform(expressions), head_poses.float())  # [B, Va, 3]
    normals = vertex_normals(verts, head.faces[: head.num_oriented_faces])
    Ks_s = Ks.float().clone()
    Ks_s[:, :2] *= s  # pixel centres at +0.5 scale exactly with the image
    raster = rasterize_mesh(verts, head.faces, camtoworld_to_viewmat(camtoworlds.float()), Ks_s, Ws, Hs,
                            cull_backfaces=True)
    fid = raster.face_ids
    pix = (fid >= 0).view(-1).nonzero()[:, 0]  # [P] covered pixels, flat over (B, Hs, Ws)
    fids = fid.view(-1)[pix]
    bidx = torch.div(pix, Hs * Ws, rounding_mode="floor")
    mat = head.face_materials[fids]
    # Interpolate on the covered pixels only (a third of the image): a [1, 1, P] raster whose
    # face ids address the B frames' vertex arrays stacked into one.
    Va, Fa = verts.shape[1], head.faces.shape[0]
    stacked = (head.faces[None] + Va * torch.arange(B)[:, None, None]).reshape(-1, 3)
    flat = MeshRaster(face_ids=(bidx * Fa + fids)[None, None], bary=raster.bary.view(-1, 3)[pix][None, None],
                      depth=raster.depth.view(-1)[pix][None, None])
    attrs = torch.cat([verts, normals, head.occlusion[None, :, None].expand(B, -1, 1)], -1)
    geo = interpolate(attrs.reshape(1, B * Va, 7), stacked, flat)[0, 0]  # [P, 7]
    uv = interpolate(head.uvs, head.uv_faces, flat._replace(face_ids=fids[None, None]))[0, 0]  # [P, 2]
    points, nrm, occ = geo[:, :3], geo[:, 3:6], geo[:, 6:]

    texel = torch.empty(len(mat), 4)
    grid = torch.stack([2 * uv[:, 0] - 1, 1 - 2 * uv[:, 1]], -1)
    for m, tex in enumerate(head.textures):
        sel = (mat == m).nonzero()[:, 0]
        if len(sel):
            texel[sel] = F.grid_sample(tex, grid[sel][None, None], mode="bilinear", padding_mode="border",
                                       align_corners=False)[0, :, 0].T
    shin = torch.tensor([SHININESS[m] for m in MATERIALS])[mat][:, None]
    views = F.normalize(camtoworlds.float()[bidx, :3, 3] - points, dim=-1)
    colour, spec = shade_blinn_phong(texel[:, :3], texel[:, 3:], shin, occ, nrm, views, lights, ambient,
                                     specular)

    images = torch.tensor(background, dtype=torch.float32).repeat(B * Hs * Ws, 1)
    images[pix] = colour
    alphas = torch.zeros(B * Hs * Ws)
    alphas[pix] = 1.0
    out = dict(face_ids=fid)
    if return_aux:
        materials = torch.full((B * Hs * Ws,), -1, dtype=torch.int64).index_put_((pix,), mat)
        out["materials"] = materials.view(B, Hs, Ws)
        out["speculars"] = torch.zeros(B * Hs * Ws).index_put_((pix,), spec[:, 0]).view(B, Hs, Ws)
    out["images"] = images.view(B, height, s, width, s, 3).mean((2, 4))
    out["alphas"] = alphas.view(B, height, s, width, s).mean((2, 4))
    return out


@contextlib.contextmanager
def _torch_threads(num_threads: int | None):
    """Temporarily set torch's intra-op thread count (``None``: leave it)."""
    previous = torch.get_num_threads()
    if num_threads is not None:
        if int(num_threads) < 1:
            raise ValueError(f"synthetic subject: num_threads must be >= 1 or None, got {num_threads!r}")
        torch.set_num_threads(int(num_threads))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


_NOISE_KEYS = ("pose_rot_deg", "pose_trans", "expression")
#: the tracker-jitter smoothing of the default (``correlation_s: null``), in frames
DEFAULT_NOISE_SIGMA_FRAMES = 1.5


def _parse_noise(tracking_noise) -> dict:
    """``{pose_rot_deg, pose_trans, expression: float >= 0, correlation_s: None | float > 0}``."""
    if tracking_noise is None or (not hasattr(tracking_noise, "keys") and tracking_noise == 0):
        return {**dict.fromkeys(_NOISE_KEYS, 0.0), "correlation_s": None}
    if not hasattr(tracking_noise, "keys"):
        raise ValueError(f"tracking_noise must be 0 or a mapping with keys {list(_NOISE_KEYS) + ['correlation_s']}, "
                         f"got {tracking_noise!r}")
    unknown = sorted(set(tracking_noise.keys()) - set(_NOISE_KEYS) - {"correlation_s"})
    if unknown:
        raise ValueError(f"tracking_noise: unknown key(s) {unknown}; allowed: {list(_NOISE_KEYS) + ['correlation_s']}")
    noise = {k: float(tracking_noise.get(k, 0.0) or 0.0) for k in _NOISE_KEYS}
    bad = [k for k, v in noise.items() if not (math.isfinite(v) and v >= 0)]
    if bad:
        raise ValueError(f"tracking_noise.{bad[0]} must be a finite number >= 0, got {noise[bad[0]]}")
    corr = tracking_noise.get("correlation_s", None)
    if corr is not None:
        if isinstance(corr, bool) or not isinstance(corr, (int, float)) or not (math.isfinite(corr) and corr > 0):
            raise ValueError(f"tracking_noise.correlation_s must be null (tracker jitter, ~1.5 frames) or a "
                             f"number of seconds > 0, got {corr!r}")
        corr = float(corr)
    noise["correlation_s"] = corr
    return noise


def generate_synthetic_subject(
    num_frames: int = 300,
    width: int = 128,
    height: int = 128,
    fps: float = 30.0,
    num_test: int | None = None,
    num_vertices_target: int = 2500,
    expression_dim: int = 10,
    texture_resolution: int = 512,
    supersample: int = 2,
    camera_distance: float = 1.0,
    fov_y_deg: float = 20.0,
    camera_height: float = -0.01,
    background: tuple[float, float, float] = (1.0, 1.0, 1.0),
    head_rotation_deg: tuple[float, float, float] = (30.0, 15.0, 10.0),
    head_translation: tuple[float, float, float] = (0.015, 0.012, 0.02),
    head_bursts=None,
    tracking_noise=0,
    hair: bool = True,
    accessories: bool = True,
    mouth_interior: bool = True,
    specular: float = 1.0,
    soft_masks: bool = True,
    batch_size: int = 16,
    num_threads: int | None = 1,
    seed: int = 0,
    name: str = "synthetic",
) -> Subject:
    """Render a synthetic subject with exact ground truth (see the module docstring).

    Args:
        num_frames, fps: the clip; frame ``i`` is at ``i / fps`` seconds and all motion is a
            function of seconds, so changing ``fps`` resamples the same performance.
        num_test: the last ``num_test`` frames are the test split (default: 10 %, at least 1).
        num_vertices_target: skin mesh resolution (the grid gets about this many vertices).
        expression_dim: number of blendshapes; the first 10 are designed
            (:data:`~headkit.data.synthetic_head.BLENDSHAPE_NAMES`), more are random local bumps.
        texture_resolution: skin texture size (hair gets half, teeth/tongue an eighth).
        supersample: anti-aliasing factor ``s`` (render at ``s`` times the size, box-filter down).
        camera_distance, fov_y_deg, camera_height: the fixed camera on the +z axis at height
            ``camera_height`` looking horizontally at the head (metres, degrees).
        background: RGB in [0, 1] of the constant background (white, as GraphAvatar's data).
        head_rotation_deg: bounds of |yaw|, |pitch|, |roll|; head_translation: bounds in metres.
        head_bursts: None (default: the slow sinusoids alone), or a mapping of
            :func:`~headkit.data.synthetic_motion.head_bursts` arguments (``rate_hz``, ``deg``,
            ``mm``, ``duration_s``, ``hold_s``, ``axis_weights``): quick out-and-back nods/turns at
            Poisson times on top of them, e.g. ``experiment=neuralcache_talking``.
        tracking_noise: 0, or a mapping with ``pose_rot_deg`` (std of the camera rotation error
            per axis, degrees), ``pose_trans`` (std of the camera translation error, metres) and
            ``expression`` (std of the additive expression error), and optionally
            ``correlation_s``. The errors are Gaussian processes with these standard deviations:
            with ``correlation_s`` null (default) white noise smoothed over ~1.5 frames (tracker
            jitter); with ``correlation_s`` in seconds, slowly varying drift whose
            autocorrelation is ``exp(-lag² / (2 correlation_s²))``
            (:func:`~headkit.data.synthetic_motion.correlation_sigma_frames`). The camera error is applied on the left
            (``perturb_pose(c2w, xi, "left")``: rotation about the world origin, i.e. the head).
        hair, accessories, mouth_interior: include the untracked hair+fringe, earrings, teeth+tongue.
        specular: scale of the Blinn-Phong term (0: Lambertian only).
        soft_masks: masks hold the anti-aliased coverage (0..255); else thresholded at 50 %.
        batch_size: frames per rasterizer call.
        num_threads: torch threads while rendering (restored afterwards; None keeps the current
            setting). One thread is the default because the renderer's many small ops gain
            little from a second thread and lose 2-4x when the cores are shared with other jobs.
        seed: trajectories, texture details and extra blendshapes; same seed -> identical output.

    Returns:
        A validated :class:`Subject`. The tracked fields hold the (possibly noisy) tracking;
        ``extras`` holds ``true_camtoworlds``, ``true_expressions``, ``true_vertices``,
        ``true_head_poses`` (equal to the tracked ones without noise; the head pose itself is
        never perturbed, so ``head_poses`` is always the truth); ``meta`` holds every setting.
    """
    settings = dict(locals())
    for key, value, low in (("num_frames", num_frames, 2), ("width", width, 8), ("height", height, 8),
                            ("supersample", supersample, 1), ("batch_size", batch_size, 1)):
        if int(value) != value or value < low:
            raise ValueError(f"synthetic subject: {key} must be an integer >= {low}, got {value!r}")
    for key, value in (("fps", fps), ("camera_distance", camera_distance), ("fov_y_deg", fov_y_deg)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"synthetic subject: {key} must be > 0, got {value!r}")
    if camera_distance < 0.4:
        raise ValueError(f"synthetic subject: camera_distance={camera_distance} puts the camera inside "
                         "the moving head's reach; use >= 0.4 m")
    if len(background) != 3 or not all(0.0 <= float(c) <= 1.0 for c in background):
        raise ValueError(f"synthetic subject: background must be 3 values in [0, 1], got {background!r}")
    noise = _parse_noise(tracking_noise)
    bursts = parse_bursts(head_bursts)
    if num_test is None:
        num_test = max(1, int(round(0.1 * num_frames)))
    train_ids, test_ids = holdout_split(num_frames, num_test, source=f"synthetic subject '{name}'")

    head = build_synthetic_head(num_vertices_target, expression_dim, texture_resolution, seed,
                                hair=hair, accessories=accessories, mouth_interior=mouth_interior)
    seconds = np.arange(num_frames) / float(fps)
    head_poses = head_motion(seconds, seed, head_rotation_deg, head_translation, bursts)
    expressions = expression_trajectories(seconds, head.blendshape_names, seed)
    eye = torch.tensor([0.0, camera_height, camera_distance], dtype=torch.float64)
    c2w = look_at(eye, eye * torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)).numpy()
    camtoworlds = np.tile(c2w, (num_frames, 1, 1))
    Ks = np.tile(intrinsics_from_fov(fov_y_deg, width, height).numpy(), (num_frames, 1, 1))

    images = np.empty((num_frames, height, width, 3), np.uint8)
    masks = np.empty((num_frames, height, width), np.uint8)
    t32 = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float32))  # noqa: E731
    with torch.no_grad(), _torch_threads(num_threads):
        for start in range(0, num_frames, batch_size):
            sl = slice(start, min(start + batch_size, num_frames))
            out = render_head(head, t32(expressions[sl]), t32(head_poses[sl]), t32(camtoworlds[sl]),
                              t32(Ks[sl]), width, height, supersample, tuple(background), specular=specular)
            images[sl] = (out["images"] * 255).round().clamp(0, 255).to(torch.uint8).numpy()
            alphas = out["alphas"] if soft_masks else (out["alphas"] >= 0.5).float()
            masks[sl] = (alphas * 255).round().to(torch.uint8).numpy()
        true_vertices = head.skin_vertices(t32(expressions), t32(head_poses)).numpy()

        rng = np.random.default_rng([seed, 30])
        tracked_c2w, tracked_expr, tracked_vertices = camtoworlds, expressions, true_vertices
        sigma = (DEFAULT_NOISE_SIGMA_FRAMES if noise["correlation_s"] is None
                 else correlation_sigma_frames(noise["correlation_s"], fps))
        if noise["pose_rot_deg"] > 0 or noise["pose_trans"] > 0:
            xi = np.concatenate([np.radians(noise["pose_rot_deg"]) * smooth_noise(rng, num_frames, 3, sigma),
                                 noise["pose_trans"] * smooth_noise(rng, num_frames, 3, sigma)], -1)
            tracked_c2w = perturb_pose(torch.from_numpy(camtoworlds), torch.from_numpy(xi), "left").numpy()
        if noise["expression"] > 0:
            errors = smooth_noise(rng, num_frames, expressions.shape[1], sigma)
            tracked_expr = expressions + noise["expression"] * errors
            tracked_vertices = head.skin_vertices(t32(tracked_expr), t32(head_poses)).numpy()

    V, Ft, Tt = head.num_skin_vertices, head.num_skin_faces, head.num_skin_uvs
    settings["background"] = [float(c) for c in background]
    settings["head_rotation_deg"] = [float(c) for c in head_rotation_deg]
    settings["head_translation"] = [float(c) for c in head_translation]
    settings["head_bursts"] = bursts
    settings["tracking_noise"] = noise
    settings["num_test"] = int(num_test)
    meta = dict(
        source="synthetic", generator="headkit.data.synthetic.generate_synthetic_subject",
        generator_version=GENERATOR_VERSION, settings=settings,
        blendshape_names=list(head.blendshape_names), untracked_parts=list(head.part_names),
        units="metres; world = head frame at rest (y up, face towards +z); OpenCV cameras",
        lights=[dict(direction=list(d), intensity=i) for d, i in DEFAULT_LIGHTS],
        ambient=DEFAULT_AMBIENT,
        num_skin_vertices=V,
    )
    f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)  # noqa: E731
    subject = Subject(
        name=name, faces=head.faces[:Ft].numpy().copy(),
        template_vertices=head.rest_vertices[:V].numpy().copy(), vertices=f32(tracked_vertices),
        expressions=f32(tracked_expr), Ks=f32(Ks), camtoworlds=f32(tracked_c2w),
        times=f32(np.arange(num_frames) / max(num_frames - 1, 1)), images=images, masks=masks,
        train_ids=train_ids, test_ids=test_ids, fps=float(fps), uvs=head.uvs[:Tt].numpy().copy(),
        uv_faces=head.uv_faces[:Ft].numpy().copy(), head_poses=f32(head_poses),
        extras=dict(true_camtoworlds=f32(camtoworlds), true_expressions=f32(expressions),
                    true_vertices=f32(true_vertices), true_head_poses=f32(head_poses)),
        meta=meta,
    )
    return subject.validate(source=f"synthetic subject '{name}'")
