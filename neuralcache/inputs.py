"""Per-frame inputs of neural caching: UV maps, θ, p, e, h, view direction, head stabilisation.

For every frame the generator G and the warp W consume (paper Sec. 4 and 4.2):

* ``U`` UV map ``[B, H, W, 2]`` + foreground ``[B, H, W]``: the tracked mesh rasterized with
  :func:`headkit.render.rasterize_mesh` and the template's texture coordinates interpolated
  with the raster's barycentrics (``uv_faces`` into ``uvs``). Real data gets real UVs from the
  template's own ``vt`` or from ``data.uv_template`` (a UV layout in the template's vertex order,
  e.g. FLAME's for INSTA's simplified meshes, which have none); templates without UVs get the
  fallback :func:`spherical_uvs`, with a logged warning.
* ``θ`` ``poses [B, 3]``: the global head rotation as an axis-angle vector, relative to the
  camera and to the *frontal* orientation (head frame y up, face towards +z, as FLAME and the
  synthetic head; :data:`FRONTAL`), so ``θ = 0`` is a head looking straight into the camera
  and the vector stays far from the ``|θ| = π`` wrap-around. FLAME's jaw rotation (the other
  half of DECA's 6-value pose) is not part of a :class:`~headkit.data.Subject`: the synthetic
  head has no jaw joint (its mouth opening is a blendshape, so it lives in ``e``), and a
  tracker that has a jaw can put it into the expression vector. Hence ``pose_dim = 3``.
* ``p`` ``cam_positions [B, 3]``: the camera centre in the head-stabilised frame (origin at the
  smoothed head centre, axes of the frontal camera), i.e. ``-FRONTALᵀ c`` with ``c`` the head
  centre in camera coordinates.
* ``e`` the tracked expression coefficients, untouched (the paper leaves jaw and expression
  unsmoothed to keep lip motion faithful).
* ``h`` ``pose_shs [B, 9]``: :func:`neuralcache.warp.pose_sh` of ``θ``.
* view direction ``[B, 3]`` for the texture's SH encoding: from the head centre to the camera,
  in the head's own frame (invariant to where the head sits in the world).

Head stabilisation (a switch, :class:`StabilizationConfig`): the global head position (the
template centroid carried by the head pose) is smoothed with :func:`delayed_gaussian_filter`
(causal, size 5: usable online, 2 frames of delay) before it enters ``p``; with ``recentre``
the virtual camera is also centred on the smoothed head (principal-point shift by whole
pixels, so the target image moves by an exact pixel shift, no resampling), and with
``rescale`` its focal length follows the head's depth so the head keeps the scale it has at
the reference depth (the paper scales by the projected ear-to-ear distance; a template has no
labelled ears, so the depth ratio is the stand-in; the targets are then resampled
bilinearly). An intrinsics-only change of a pinhole camera maps images by an exact 2D
similarity, so the same transform applied to the ground truth keeps images and UV maps
aligned for any scene depth.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from headkit.cameras import so3_log, transform_points
from headkit.data.subject import Subject, SubjectError
from headkit.errors import InvalidConfigValue
from headkit.fitting.scene import frame_head_poses
from headkit.render.mesh_raster import interpolate, rasterize_mesh
from neuralcache.warp import FrameParams, pose_sh

__all__ = ["FRONTAL", "FrameInputs", "StabilizationConfig", "FrameEncoder", "spherical_uvs",
           "template_uvs", "render_uv_maps", "delayed_gaussian_filter", "head_centres",
           "frame_head_poses", "stabilizing_transforms", "warp_images"]

log = logging.getLogger(__name__)

#: head frame (y up, face +z) -> camera frame (y down, z forward) of a head facing the camera
FRONTAL = torch.tensor([[1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, -1.0]])


def spherical_uvs(
    vertices: Tensor,  # [V, 3] template, head frame (y up, face +z)
    faces: Tensor,  # [F, 3]
) -> tuple[Tensor, Tensor]:
    """Fallback UV parameterisation for templates without texture coordinates.

    Spherical projection around the template centroid::

        u = 0.5 + atan2(x, z) / 2π,   v = 0.5 + asin(y / r) / π

    so the face (+z) sits in the middle of the texture and the seam (u = 0 | 1) runs down the
    back of the head, where it is rarely seen. Corners of faces that straddle the seam (a
    corner u-span above 0.5) are given copies at the seam's right edge (``u = 1``) instead of
    interpolating across the whole texture: those few back faces get a thin degenerate strip,
    not a smear of every texel.

    Returns ``(uvs [V + S, 2], uv_faces [F, 3])``: one UV per vertex, plus ``S`` seam copies.
    """
    v = vertices.double() - vertices.double().mean(0)
    r = v.norm(dim=-1).clamp_min(1e-12)
    u = 0.5 + torch.atan2(v[:, 0], v[:, 2]) / (2 * math.pi)
    w = 0.5 + torch.asin((v[:, 1] / r).clamp(-1.0, 1.0)) / math.pi
    uvs = torch.stack([u, w], dim=-1).float()
    faces = faces.to(torch.int64)
    corner_u = uvs[faces][..., 0]  # [F, 3]
    seam = (corner_u.amax(1) - corner_u.amin(1)) > 0.5
    low = seam[:, None] & (corner_u < 0.5)
    extra = uvs[faces[low]].clone()
    extra[:, 0] = 1.0
    uv_faces = faces.clone()
    uv_faces[low] = uvs.shape[0] + torch.arange(extra.shape[0], device=faces.device)
    return torch.cat([uvs, extra]), uv_faces


def template_uvs(subject: Subject, source: str = "template") -> tuple[Tensor, Tensor, str]:
    """Texture coordinates ``(uvs [Vt, 2], uv_faces [F, 3], how)`` for ``subject``.

    ``source="template"`` uses the subject's own UVs (the template OBJ's ``vt``, or the layout
    ``data.uv_template`` transferred onto it) and falls back to :func:`spherical_uvs` with a
    logged warning when it has none (``how`` says which was used); ``"spherical"`` forces the
    fallback.
    """
    if source not in ("template", "spherical"):
        raise InvalidConfigValue(f"model.inputs.uv_source must be 'template' or 'spherical', got {source!r}")
    if source == "template" and subject.uvs is not None:
        uvs = torch.as_tensor(np.asarray(subject.uvs), dtype=torch.float32)
        if not torch.isfinite(uvs).all() or uvs.min() < -1e-3 or uvs.max() > 1 + 1e-3:
            raise SubjectError(f"subject '{subject.name}': template uvs must be finite and in [0, 1], got range "
                               f"{uvs.min().item():.4g}..{uvs.max().item():.4g} (or NaN); fix the template or set "
                               f"model.inputs.uv_source=spherical")
        return uvs, torch.as_tensor(np.asarray(subject.uv_faces), dtype=torch.int64), "template"
    if source == "template":
        log.warning("subject '%s': the template has no texture coordinates, so the neural texture uses spherical "
                    "UVs (seam down the back of the head, stretched around the ears); for real UVs give a UV "
                    "layout in the template's vertex order with data.uv_template=PATH (an OBJ with vt lines, "
                    "e.g. FLAME's UV template for INSTA/NBS)", subject.name)
    uvs, uv_faces = spherical_uvs(torch.as_tensor(np.asarray(subject.template_vertices), dtype=torch.float32),
                                  torch.as_tensor(np.asarray(subject.faces), dtype=torch.int64))
    return uvs, uv_faces, "spherical (the template has no UVs)" if source == "template" else "spherical"


def render_uv_maps(
    vertices: Tensor,  # [B, V, 3] world space
    faces: Tensor,  # [F, 3]
    uvs: Tensor,  # [Vt, 2] in [0, 1], v up
    uv_faces: Tensor,  # [F, 3] into uvs
    viewmats: Tensor,  # [B, 4, 4]
    Ks: Tensor,  # [B, 3, 3]
    width: int,
    height: int,
) -> tuple[Tensor, Tensor]:
    """Rasterized UV maps ``[B, H, W, 2]`` (0 on background) and foreground masks ``[B, H, W]``.

    ``uv(pixel) = Σ_k bary_k · uvs[uv_faces[face, k]]`` over the visible face's corners.
    """
    raster = rasterize_mesh(vertices, faces.to(vertices.device), viewmats, Ks, width, height)
    maps = interpolate(uvs.to(vertices.device, vertices.dtype), uv_faces.to(vertices.device), raster)
    return maps.clamp(0.0, 1.0), raster.mask.to(vertices.dtype)


def delayed_gaussian_filter(values: Tensor, size: int = 5, sigma: float = 1.0) -> Tensor:  # [T, D]
    """Causal ("delayed") Gaussian smoothing over time.

    ``out_t = Σ_{i=0}^{size-1} w_i x_{t-size+1+i}`` with ``w_i ∝ exp(-(i - c)^2 / 2σ^2)``,
    ``c = (size - 1) / 2``, normalised to sum 1: the centred Gaussian of ``size`` taps applied
    to the last ``size`` frames only, so frame ``t`` never sees the future and the output lags
    by ``c`` frames (2 for the paper's size 5). Frames before the first are the first frame
    repeated. Returns ``[T, D]``.
    """
    if size < 1 or sigma <= 0:
        raise ValueError(f"delayed_gaussian_filter: need size >= 1 and sigma > 0, got {size}, {sigma}")
    if values.ndim != 2:
        raise ValueError(f"delayed_gaussian_filter: values must be [T, D], got {tuple(values.shape)}")
    offsets = torch.arange(size, dtype=torch.float64, device=values.device) - (size - 1) / 2.0
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
    weights = (weights / weights.sum()).to(values.dtype)
    padded = torch.cat([values[:1].expand(size - 1, -1), values], dim=0)  # [T + size - 1, D]
    windows = padded.unfold(0, size, 1)  # [T, D, size], oldest first
    return (windows * weights).sum(-1)


def head_centres(head_poses: Tensor, template_centroid: Tensor) -> Tensor:  # [T, 4, 4], [3]
    """World position of the head midpoint (the template centroid moved by the head pose), ``[T, 3]``."""
    return transform_points(template_centroid[None].expand(head_poses.shape[0], 1, 3), head_poses)[:, 0]


@dataclass
class StabilizationConfig:
    """Head stabilisation switches (``model.inputs.stabilize`` in the config).

    Attributes:
        smooth: smooth the head position of ``p`` with :func:`delayed_gaussian_filter`.
        filter_size, filter_sigma: the filter (the paper: size 5; σ is our choice).
        recentre: centre the virtual camera on the smoothed head (whole-pixel shift).
        rescale: keep the head's projected scale at ``reference_depth`` (resamples targets).
    """

    smooth: bool = True
    filter_size: int = 5
    filter_sigma: float = 1.0
    recentre: bool = False
    rescale: bool = False


def stabilizing_transforms(
    centres_cam: Tensor,  # [B, 3] smoothed head centre in camera coordinates
    Ks: Tensor,  # [B, 3, 3]
    width: int,
    height: int,
    recentre: bool,
    rescale: bool,
    reference_depth: float,
) -> Tensor:
    """2D similarities ``S [B, 3, 3]`` of the stabilised virtual camera: ``K' = S K``.

    ``rescale`` scales about the image centre by ``z / reference_depth`` (projected size ∝ f / z);
    ``recentre`` then shifts by the whole number of pixels that brings the head centre's
    projection to the image centre ``(W/2, H/2)``.
    """
    B = centres_cam.shape[0]
    S = torch.eye(3, dtype=Ks.dtype, device=Ks.device).repeat(B, 1, 1)
    cx, cy = width / 2.0, height / 2.0
    if rescale:
        a = centres_cam[:, 2] / reference_depth
        S[:, 0, 0], S[:, 1, 1] = a, a
        S[:, 0, 2], S[:, 1, 2] = (1 - a) * cx, (1 - a) * cy
    if recentre:
        proj = (S @ Ks @ (centres_cam / centres_cam[:, 2:3]).unsqueeze(-1))[:, :2, 0]
        shift = torch.round(torch.stack([cx - proj[:, 0], cy - proj[:, 1]], dim=-1))
        S[:, 0, 2] += shift[:, 0]
        S[:, 1, 2] += shift[:, 1]
    return S


def warp_images(images: Tensor, S: Tensor, fill: Tensor | None = None) -> Tensor:  # [B,H,W,C], [B,3,3]
    """``out(x') = images(S⁻¹ x')`` (bilinear; pixels from outside get ``fill [C]``, default 0).

    Exact (no blur, bit for bit) when ``S`` is a whole-pixel translation: the bilinear
    weights are then 0 and 1.
    """
    B, H, W, C = images.shape
    ys, xs = torch.meshgrid(torch.arange(H, dtype=images.dtype, device=images.device) + 0.5,
                            torch.arange(W, dtype=images.dtype, device=images.device) + 0.5, indexing="ij")
    pix = torch.stack([xs, ys, torch.ones_like(xs)], dim=-1).reshape(1, H * W, 3)
    src = pix @ torch.linalg.inv(S.to(images.dtype)).transpose(1, 2)  # [B, HW, 3]
    grid = torch.stack([2 * src[..., 0] / W - 1, 2 * src[..., 1] / H - 1], dim=-1).reshape(B, H, W, 2)
    sample = lambda x: F.grid_sample(x.permute(0, 3, 1, 2), grid, mode="bilinear",  # noqa: E731
                                     padding_mode="zeros", align_corners=False).permute(0, 2, 3, 1)
    out = sample(images)
    if fill is not None:
        # Coverage of the source image; the uncovered share takes the fill colour.
        out = out + (1.0 - sample(images.new_ones(B, H, W, 1))) * fill.to(images)
    return out


@dataclass
class FrameInputs:
    """Everything G and W need for a batch of frames, plus the (stabilised) targets.

    Attributes:
        params: θ, p, e, h, UV map and foreground of the frames (:class:`FrameParams`).
        view_dirs: ``[B, 3]`` unit direction head centre -> camera, in the head frame.
        images: ``[B, H, W, 3]`` target images in the stabilised camera (None when unknown).
        masks: ``[B, H, W]`` target foreground masks in the stabilised camera (or None).
    """

    params: FrameParams
    view_dirs: Tensor
    images: Tensor | None = None
    masks: Tensor | None = None

    def to(self, device: torch.device | str) -> FrameInputs:
        """A copy on ``device``."""
        move = (lambda x: None if x is None else x.to(device))  # noqa: E731
        return FrameInputs(self.params.to(device), self.view_dirs.to(device), move(self.images), move(self.masks))


class FrameEncoder(nn.Module):
    """Turns dataset batches into :class:`FrameInputs` (no learnable parameters).

    Built from the training subject (template UVs, image size, the reference depth of
    ``rescale``); works on batches of any subject with the same mesh topology. A batch may
    carry ``head_centre [B, 3]`` (the smoothed world head position, see :meth:`track`) and
    precomputed ``uv_map [B, H, W, 2]`` / ``uv_mask [B, H, W]`` (rasterizing is the slow
    part on a CPU, and the paper leaves it out of its timings); otherwise they are computed
    from ``head_pose`` and ``vertices``.
    """

    def __init__(self, subject: Subject, uv_source: str = "template",
                 stabilize: StabilizationConfig | dict | None = None,
                 background: tuple[float, float, float] | None = None) -> None:
        super().__init__()
        try:
            self.stabilize = (stabilize if isinstance(stabilize, StabilizationConfig)
                              else StabilizationConfig(**(stabilize or {})))
        except TypeError as exc:  # an unknown key in the YAML
            raise InvalidConfigValue(f"model.inputs.stabilize: {exc}") from exc
        uvs, uv_faces, self.uv_how = template_uvs(subject, uv_source)
        self.register_buffer("faces", torch.as_tensor(np.asarray(subject.faces), dtype=torch.int64), persistent=False)
        self.register_buffer("uvs", uvs, persistent=False)
        self.register_buffer("uv_faces", uv_faces, persistent=False)
        template = torch.as_tensor(np.asarray(subject.template_vertices), dtype=torch.float32)
        self.register_buffer("centroid", template.mean(0), persistent=False)
        self.register_buffer("frontal", FRONTAL.clone(), persistent=False)
        bg = background if background is not None else subject.meta.get("settings", {}).get("background", (1.0, 1.0, 1.0))
        self.register_buffer("background", torch.tensor([float(c) for c in bg]), persistent=False)
        self.width, self.height = subject.width, subject.height
        self.num_vertices = subject.num_vertices
        # Reference depth of `rescale`: the median head depth over the training frames.
        track = self.track(subject)
        cams = transform_points(track["head_centre"][:, None], torch.as_tensor(
            np.linalg.inv(np.asarray(subject.camtoworlds, np.float64)), dtype=torch.float32))[:, 0]
        self.reference_depth = float(cams[np.asarray(subject.train_ids), 2].median())

    def track(self, subject: Subject) -> dict[str, Tensor]:
        """Per-frame head poses ``[T, 4, 4]`` and (smoothed, if enabled) head centres ``[T, 3]``
        of a whole subject, in frame order: the filter needs the frame sequence, not a batch."""
        poses = frame_head_poses(subject)
        centres = head_centres(poses, self.centroid.cpu())
        if self.stabilize.smooth:
            centres = delayed_gaussian_filter(centres, self.stabilize.filter_size, self.stabilize.filter_sigma)
        return {"head_pose": poses, "head_centre": centres}

    def camera_transforms(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``(centres_cam [B, 3], S [B, 3, 3])``: head centre in camera coordinates and the
        stabilising 2D similarity (identity unless recentre/rescale)."""
        viewmats = batch["viewmat"]
        centres = batch.get("head_centre")
        if centres is None:
            centres = head_centres(batch["head_pose"], self.centroid)
        centres_cam = transform_points(centres[:, None], viewmats)[:, 0]
        S = stabilizing_transforms(centres_cam, batch["K"], self.width, self.height, self.stabilize.recentre,
                                   self.stabilize.rescale, self.reference_depth)
        return centres_cam, S

    def uv_maps(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Rasterized ``(uv_maps [B, H, W, 2], masks [B, H, W])`` in the stabilised camera."""
        if batch["vertices"].shape[1] != self.num_vertices:
            raise ValueError(f"frame(s) {batch['index'].tolist()}: {batch['vertices'].shape[1]} vertices, "
                             f"the model's template has {self.num_vertices}")
        _, S = self.camera_transforms(batch)
        return render_uv_maps(batch["vertices"], self.faces, self.uvs, self.uv_faces, batch["viewmat"],
                              S @ batch["K"], self.width, self.height)

    def conditioning(self, viewmats: Tensor, head_poses: Tensor, centres: Tensor,  # [B,4,4], [B,4,4], [B,3]
                     frontal: Tensor | None = None) -> dict[str, Tensor]:
        """θ ``poses [B, 3]``, p ``cam_positions [B, 3]``, h ``pose_shs [B, 9]`` and the view
        direction ``view_dirs [B, 3]`` of frames (``centres``: world head centres). The inputs
        must be on the encoder's device (``frontal``: :data:`FRONTAL` on theirs, default
        the buffer)."""
        frontal = self.frontal if frontal is None else frontal
        # Head rotation relative to the camera, measured from the frontal orientation.
        rel = frontal.T @ viewmats[:, :3, :3] @ head_poses[:, :3, :3]
        poses = so3_log(rel)
        centres_cam = transform_points(centres[:, None], viewmats)[:, 0]
        cam_positions = -(centres_cam @ frontal)  # = -FRONTALᵀ c
        # Camera centre relative to the head centre, in the head frame.
        cam_world = torch.linalg.inv(viewmats)[:, :3, 3]
        dirs = (head_poses[:, :3, :3].transpose(1, 2) @ (cam_world - centres).unsqueeze(-1))[..., 0]
        return {"poses": poses, "cam_positions": cam_positions, "pose_shs": pose_sh(poses),
                "view_dirs": dirs / dirs.norm(dim=-1, keepdim=True).clamp_min(1e-8)}

    def conditioning_statistics(self, subject: Subject) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
        """``{key: (mean, std, delta_rms)}`` of θ, p, e, h over ``subject``'s training frames
        (``delta_rms`` over pairs of consecutive training frames), for
        :meth:`neuralcache.warp.ImplicitWarp.set_input_statistics`. Computed on the CPU (the
        track is), whatever device the encoder is on."""
        track = self.track(subject)
        ids = torch.as_tensor(np.asarray(subject.train_ids), dtype=torch.int64)
        viewmats = torch.linalg.inv(torch.as_tensor(np.asarray(subject.camtoworlds)[ids.numpy()], dtype=torch.float64))
        cond = self.conditioning(viewmats.float(), track["head_pose"][ids], track["head_centre"][ids],
                                 frontal=self.frontal.cpu())
        cond["expressions"] = torch.as_tensor(np.asarray(subject.expressions)[ids.numpy()], dtype=torch.float32)
        consecutive = (ids[1:] - ids[:-1]) == 1
        stats = {}
        for key in ("poses", "cam_positions", "expressions", "pose_shs"):
            values = cond[key].double()
            deltas = (values[1:] - values[:-1])[consecutive]
            rms = deltas.square().mean(0).sqrt() if len(deltas) else torch.ones(values.shape[1], dtype=torch.float64)
            stats[key] = (values.mean(0).float(), values.std(0, unbiased=False).float(), rms.float())
        return stats

    def forward(self, batch: dict[str, Tensor]) -> FrameInputs:
        """Encode a batch (keys of :data:`headkit.data.FRAME_KEYS`, optional extras above)."""
        centres_cam, S = self.camera_transforms(batch)
        if "uv_map" in batch:
            uvs, masks = batch["uv_map"], batch["uv_mask"]
        else:
            uvs, masks = self.uv_maps(batch)
        centres = transform_points(centres_cam[:, None], torch.linalg.inv(batch["viewmat"]))[:, 0]
        cond = self.conditioning(batch["viewmat"], batch["head_pose"], centres)
        images = batch.get("image")
        target_masks = batch["mask"][..., 0] if "mask" in batch else None
        identity = torch.eye(3, dtype=S.dtype, device=S.device)
        # S is the identity unless recentre/rescale is on: skip the comparison (a device sync).
        stabilized = self.stabilize.recentre or self.stabilize.rescale
        if images is not None and stabilized and not torch.equal(S, identity.expand_as(S)):
            images = warp_images(images, S, self.background.to(images))
            target_masks = warp_images(target_masks.unsqueeze(-1), S)[..., 0]
        params = FrameParams(cond["poses"], cond["cam_positions"], batch["expression"], cond["pose_shs"], uvs, masks)
        return FrameInputs(params, cond["view_dirs"], images, target_masks)
