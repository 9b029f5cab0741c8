"""Triangle-mesh rasterizer in pure torch: per-pixel face ids, barycentrics and depth.

The rasterizer answers, for every pixel centre ``(j + 0.5, i + 0.5)`` of every camera, which
triangle is nearest along the pixel's ray, where on it the ray lands (perspective-correct
barycentrics) and how far away (camera-space z). It is the front end of deferred neural
rendering (UV look-ups for a neural texture) and of any per-pixel mesh attribute.

How it works (no per-triangle Python loop, same code on CPU and CUDA):

1. All triangles of all ``B`` cameras are projected at once; a triangle is culled if any
   vertex is closer than ``near`` (see :func:`rasterize_mesh` for why), if it is degenerate
   on screen, if its pixel-centre bounding box is empty, or, optionally, if it faces away.
2. Triangles are bucketed by screen bounding-box size (rounded up to powers of two); each
   bucket is evaluated as a dense ``[T, h, w]`` grid of pixel centres, in chunks of at most
   ``max_fragments`` (triangle, pixel) pairs so memory stays bounded whatever the mesh.
   Barycentrics and ``1/z`` are affine in screen space, so a pixel costs a few multiply-adds.
3. Fragments inside their triangle are z-tested with one ``scatter_reduce(amin)`` on an
   int64 key ``(float32 bits of depth) << 32 | face id``: positive float32 bit patterns sort
   like the floats, so the minimum key is the nearest fragment, ties broken by the lowest
   face id. The result is an exact z-buffer, merged across chunks by the same reduction.
4. For the visible pixels only, barycentrics and depth are recomputed in the input dtype from
   the (differentiable) vertices, so gradients reach ``vertices`` through ``bary`` and
   ``depth`` (not through the discrete face choice).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..cameras import transform_points
from ..mesh import check_faces

__all__ = ["MeshRaster", "rasterize_mesh", "interpolate"]

_EMPTY_KEY = torch.iinfo(torch.int64).max


class MeshRaster(NamedTuple):
    """Output of :func:`rasterize_mesh`.

    Attributes:
        face_ids: ``[B, H, W]`` int64 index of the visible face, ``-1`` on background.
        bary: ``[B, H, W, 3]`` perspective-correct barycentric weights of the visible surface
            point (they sum to 1 and ``Σ bary_k · vertex_k`` is the 3D hit point); 0 on
            background. Pixel centres exactly on an edge may give weights of about ``-1e-7``.
        depth: ``[B, H, W]`` camera-space z of the visible point; 0 on background.
    """

    face_ids: Tensor
    bary: Tensor
    depth: Tensor

    @property
    def mask(self) -> Tensor:
        """``[B, H, W]`` bool, True where a face is visible."""
        return self.face_ids >= 0


def _check_inputs(vertices: Tensor, faces: Tensor, viewmats: Tensor, Ks: Tensor,
                  width: int, height: int, near: float) -> None:
    """Raise ``ValueError`` naming the argument for any malformed rasterizer input."""
    if vertices.dim() != 3 or vertices.shape[-1] != 3:
        raise ValueError(f"rasterize_mesh: vertices must be [B, V, 3], got {list(vertices.shape)}")
    B, V = vertices.shape[:2]
    check_faces(faces, V)
    if viewmats.shape != (B, 4, 4):
        raise ValueError(f"rasterize_mesh: viewmats must be [B={B}, 4, 4], got {list(viewmats.shape)}")
    if Ks.shape != (B, 3, 3):
        raise ValueError(f"rasterize_mesh: Ks must be [B={B}, 3, 3], got {list(Ks.shape)}")
    if int(width) <= 0 or int(height) <= 0:
        raise ValueError(f"rasterize_mesh: image size must be positive, got {width}x{height}")
    if not near > 0:
        raise ValueError(f"rasterize_mesh: near must be > 0, got {near}")
    for name, t in (("vertices", vertices), ("viewmats", viewmats), ("Ks", Ks)):
        finite = torch.isfinite(t).reshape(B, -1).all(dim=1)
        if not bool(finite.all()):
            bad = torch.nonzero(~finite)[:, 0].tolist()
            raise ValueError(f"rasterize_mesh: {name} contain NaN/Inf in batch elements {bad}")


def _screen_setup(cams: Tensor, Ks: Tensor, faces: Tensor) -> tuple[Tensor, Tensor]:
    """Projected triangle corners ``[B, F, 3, 2]`` and their depths ``[B, F, 3]``."""
    tri = cams[:, faces]  # [B, F, 3, 3]
    z = tri[..., 2]
    fx, fy = Ks[:, 0, 0, None, None], Ks[:, 1, 1, None, None]
    cx, cy = Ks[:, 0, 2, None, None], Ks[:, 1, 2, None, None]
    skew = Ks[:, 0, 1, None, None]
    # Guard the division for culled (behind-camera) corners; their triangles are dropped anyway.
    safe_z = torch.where(z > 0, z, torch.ones_like(z))
    x, y = tri[..., 0] / safe_z, tri[..., 1] / safe_z
    screen = torch.stack([fx * x + skew * y + cx, fy * y + cy], dim=-1)
    return screen, z


def _plane_coefficients(screen: Tensor, z: Tensor, origins: Tensor) -> tuple[Tensor, Tensor]:
    """Affine screen-space forms of ``(λ0, λ1, λ2, 1/z)`` relative to per-triangle ``origins``.

    Args:
        screen: ``[T, 3, 2]`` corner pixels; z: ``[T, 3]`` corner depths; origins: ``[T, 2]``.

    Returns:
        ``coeffs [T, 4, 3]`` with ``value = c0 · du + c1 · dv + c2`` for ``(du, dv)`` measured
        from ``origins``, and the signed doubled screen areas ``[T]``.
    """
    p = screen - origins[:, None, :]  # [T, 3, 2]
    p0, p1, p2 = p.unbind(1)

    def edge(a: Tensor, b: Tensor) -> Tensor:
        # Edge function E(q) = (b - a) × (q - a) = A q_x + B q_y + C, returned as (A, B, C).
        return torch.stack([-(b[:, 1] - a[:, 1]), b[:, 0] - a[:, 0],
                            (b[:, 1] - a[:, 1]) * a[:, 0] - (b[:, 0] - a[:, 0]) * a[:, 1]], dim=-1)

    area = (p1[:, 0] - p0[:, 0]) * (p2[:, 1] - p0[:, 1]) - (p1[:, 1] - p0[:, 1]) * (p2[:, 0] - p0[:, 0])
    safe_area = torch.where(area != 0, area, torch.ones_like(area))
    lam = torch.stack([edge(p1, p2), edge(p2, p0), edge(p0, p1)], dim=1) / safe_area[:, None, None]
    inv_z = (lam / z[:, :, None]).sum(dim=1, keepdim=True)  # [T, 1, 3]
    return torch.cat([lam, inv_z], dim=1), area


def rasterize_mesh(
    vertices: Tensor,  # [B, V, 3] world space (or [V, 3], shared by all cameras)
    faces: Tensor,  # [F, 3]
    viewmats: Tensor,  # [B, 4, 4] world-to-camera
    Ks: Tensor,  # [B, 3, 3]
    width: int,
    height: int,
    *,
    near: float = 0.01,
    cull_backfaces: bool = False,
    max_fragments: int = 1 << 20,
) -> MeshRaster:
    """Rasterize a triangle mesh into ``B`` pinhole cameras (OpenCV convention).

    A pixel ``(i, j)`` is sampled at its centre ``(u, v) = (j + 0.5, i + 0.5)``; a triangle
    covers it if the centre lies inside or on its projected edges. The nearest covering
    triangle wins (exact z-buffer on perspective-correct depth; equal depths go to the lowest
    face id). Both windings are drawn unless ``cull_backfaces`` is set, which drops triangles
    whose outward normal ``(b - a) × (c - a)`` points away from the camera.

    Triangles with any vertex at camera depth ``< near`` are culled whole rather than clipped:
    a head mesh seen by a head-tracking camera never straddles the near plane, and clipping
    would add new vertices and barycentric remapping for no benefit. Choose ``near`` below
    the closest geometry you expect.

    Args:
        vertices: ``[B, V, 3]`` world-space positions (``[V, 3]`` is broadcast to all cameras).
        faces: ``[F, 3]`` int64 vertex indices.
        viewmats: ``[B, 4, 4]`` world-to-camera transforms.
        Ks: ``[B, 3, 3]`` intrinsics in pixels.
        width, height: image size in pixels.
        near: near-plane depth (> 0).
        cull_backfaces: drop back-facing triangles.
        max_fragments: (triangle, padded-bbox pixel) pairs evaluated at once; bounds memory to
            roughly ``64 · max_fragments`` bytes. A single triangle's bbox is never split.

    Returns:
        :class:`MeshRaster` with ``face_ids [B, H, W]``, ``bary [B, H, W, 3]``,
        ``depth [B, H, W]``; gradients flow from ``bary`` and ``depth`` to ``vertices``,
        ``viewmats`` and ``Ks``.
    """
    if vertices.dim() == 2 and viewmats.dim() == 3:
        vertices = vertices.unsqueeze(0).expand(viewmats.shape[0], -1, -1)
    _check_inputs(vertices, faces, viewmats, Ks, width, height, near)
    W, H = int(width), int(height)
    B, F = vertices.shape[0], faces.shape[0]
    device, dtype = vertices.device, vertices.dtype
    faces = faces.to(device=device, dtype=torch.int64)

    cams = transform_points(vertices, viewmats.to(dtype))  # [B, V, 3]
    keys = torch.full((B * H * W,), _EMPTY_KEY, dtype=torch.int64, device=device)
    if F > 0:
        _zbuffer(cams.detach(), Ks.detach().to(dtype), faces, W, H, near, cull_backfaces,
                 max_fragments, keys)
    valid = keys != _EMPTY_KEY
    face_ids = torch.where(valid, keys & 0xFFFFFFFF, torch.full_like(keys, -1)).view(B, H, W)
    bary, depth = _resolve(cams, Ks.to(dtype), faces, face_ids)
    return MeshRaster(face_ids=face_ids, bary=bary, depth=depth)


@torch.no_grad()
def _zbuffer(cams: Tensor, Ks: Tensor, faces: Tensor, W: int, H: int, near: float,
             cull_backfaces: bool, max_fragments: int, keys: Tensor) -> None:
    """Fill ``keys [B*H*W]`` with the min ``depth_bits << 32 | face_id`` over covering fragments."""
    B, F = cams.shape[0], faces.shape[0]
    device = cams.device
    screen, z = _screen_setup(cams.double(), Ks.double(), faces)  # [B, F, 3, 2], [B, F, 3]
    screen, z = screen.reshape(B * F, 3, 2), z.reshape(B * F, 3)
    tri_ids = torch.arange(B * F, device=device)

    keep = (z >= near).all(dim=1)
    if cull_backfaces:
        tri = cams.double()[:, faces].reshape(B * F, 3, 3)
        normals = torch.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=-1)
        keep &= (normals * tri[:, 0]).sum(-1) < 0  # front-facing: normal points at the camera
    # Pixel-centre bounding box: columns j with j + 0.5 in [min u, max u].
    lo = torch.ceil(screen.amin(dim=1) - 0.5)
    hi = torch.floor(screen.amax(dim=1) - 0.5)
    limits = torch.tensor([W - 1, H - 1], dtype=lo.dtype, device=device)
    lo = torch.maximum(lo, torch.zeros_like(lo))
    hi = torch.minimum(hi, limits)
    keep &= (hi >= lo).all(dim=1)
    tri_ids, screen, z, lo, hi = tri_ids[keep], screen[keep], z[keep], lo[keep], hi[keep]
    coeffs, area = _plane_coefficients(screen, z, lo + 0.5)
    nondegenerate = area.abs() > 1e-12
    tri_ids, coeffs, lo, hi = tri_ids[nondegenerate], coeffs[nondegenerate], lo[nondegenerate], hi[nondegenerate]
    if tri_ids.numel() == 0:
        return
    coeffs = coeffs.float()
    lo, size = lo.long(), (hi - lo).long() + 1  # [T, 2] (x, y)
    _splat(tri_ids, coeffs, lo, size, F, W, H, max_fragments, keys)


def _splat(tri_ids: Tensor, coeffs: Tensor, lo: Tensor, size: Tensor, F: int, W: int, H: int,
           max_fragments: int, keys: Tensor) -> None:
    """Inside-test every triangle on the pixel centres of its bbox and min-reduce the keys.

    Triangles are bucketed by their bbox size rounded up to powers of two, so each bucket is a
    dense ``[T, 4, h, w]`` broadcast of the affine forms over a small pixel grid: no
    per-fragment gathers, few buckets (at most ``log2 W · log2 H``), at most 4x padding.
    Padding pixels beyond the true bbox are masked (they may lie outside the image).
    """
    device = tri_ids.device
    batch, face_ids = torch.div(tri_ids, F, rounding_mode="floor"), tri_ids % F
    base_pixels = (batch * H + lo[:, 1]) * W + lo[:, 0]  # pixel index of each bbox corner
    log_w = torch.ceil(torch.log2(size[:, 0].double())).long()
    log_h = torch.ceil(torch.log2(size[:, 1].double())).long()
    bucket = log_w * 64 + log_h
    order = torch.argsort(bucket)
    buckets, counts = torch.unique_consecutive(bucket[order], return_counts=True)
    start = 0
    for code, count in zip(buckets.tolist(), counts.tolist()):
        bw, bh = 1 << (code // 64), 1 << (code % 64)
        members = order[start:start + count]
        start += count
        dx = torch.arange(bw, device=device, dtype=torch.float32)
        dy = torch.arange(bh, device=device, dtype=torch.float32)[:, None]
        per_chunk = max(1, max_fragments // (bw * bh))
        for first in range(0, count, per_chunk):
            idx = members[first:first + per_chunk]
            c = coeffs[idx][..., None, None]  # [t, 4, 3, 1, 1]
            vals = c[:, :, 0] * dx + c[:, :, 1] * dy + c[:, :, 2]  # [t, 4, bh, bw]
            sz = size[idx][:, :, None, None]
            # 1/z > 0 follows from λ >= 0 (all corners are in front of the near plane).
            inside = (vals[:, :3].amin(dim=1) >= 0) & (dx < sz[:, 0]) & (dy < sz[:, 1])
            flat = torch.nonzero(inside.reshape(-1))[:, 0]
            depth = 1.0 / vals[:, 3].reshape(-1)[flat]
            t_i, rest = torch.div(flat, bw * bh, rounding_mode="floor"), flat % (bw * bh)
            y_i, x_i = torch.div(rest, bw, rounding_mode="floor"), rest % bw
            pix = base_pixels[idx][t_i] + y_i * W + x_i
            key = (depth.view(torch.int32).to(torch.int64) << 32) | face_ids[idx][t_i]
            keys.scatter_reduce_(0, pix, key, reduce="amin", include_self=True)


def _resolve(cams: Tensor, Ks: Tensor, faces: Tensor, face_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Differentiable perspective-correct barycentrics and depth of the visible faces."""
    B, H, W = face_ids.shape
    bary = cams.new_zeros(B, H, W, 3)
    depth = cams.new_zeros(B, H, W)
    flat = torch.nonzero(face_ids.reshape(-1) >= 0)[:, 0]
    if flat.numel() == 0:
        return bary, depth
    V = cams.shape[1]
    b = torch.div(flat, H * W, rounding_mode="floor")
    i, j = torch.div(flat % (H * W), W, rounding_mode="floor"), flat % W
    corners = faces[face_ids.reshape(-1)[flat]] + (b * V)[:, None]  # [P, 3] rows of cams
    tri = cams.reshape(B * V, 3)[corners]  # [P, 3, 3] camera space
    fx, skew, cx = Ks[b, 0, 0, None], Ks[b, 0, 1, None], Ks[b, 0, 2]
    fy, cy = Ks[b, 1, 1, None], Ks[b, 1, 2]
    z = tri[..., 2]
    x, y = tri[..., 0] / z, tri[..., 1] / z
    uv = torch.stack([fx * x + skew * y, fy * y], dim=-1)  # [P, 3, 2], principal point dropped
    centre = torch.stack([j + 0.5 - cx, i + 0.5 - cy], dim=-1).to(cams.dtype)
    d = uv - centre[:, None, :]  # corners relative to the pixel centre, for precision
    # Screen barycentric of the pixel centre: λ_k ∝ signed area of the opposite sub-triangle.
    d1, d2 = d.roll(-1, dims=1), d.roll(-2, dims=1)  # rows (d1, d2, d0) and (d2, d0, d1)
    cross = d1[..., 0] * d2[..., 1] - d1[..., 1] * d2[..., 0]
    lam = cross / cross.sum(dim=1, keepdim=True)
    w = lam / z  # perspective correction: weights ∝ λ_k / z_k
    inv_depth = w.sum(dim=1)
    bary = bary.reshape(-1, 3).index_copy(0, flat, w / inv_depth[:, None]).view(B, H, W, 3)
    depth = depth.reshape(-1).index_copy(0, flat, 1.0 / inv_depth).view(B, H, W)
    return bary, depth


def interpolate(
    attrs: Tensor,  # [V, C] or [B, V, C]
    faces: Tensor,  # [F, 3]
    raster: MeshRaster,
) -> Tensor:
    """Interpolate per-vertex attributes with the raster's barycentrics: ``[B, H, W, C]``.

    ``out[b, i, j] = Σ_k bary[b, i, j, k] · attrs[faces[face_ids[b, i, j], k]]`` and 0 on
    background. ``faces`` may index a different array than the rasterized one (e.g.
    ``uv_faces`` into ``uvs``) as long as face ``f`` of both is the same triangle.
    Differentiable with respect to ``attrs`` and ``raster.bary``.
    """
    face_ids, bary = raster.face_ids, raster.bary
    B = face_ids.shape[0]
    if attrs.dim() not in (2, 3):
        raise ValueError(f"interpolate: attrs must be [V, C] or [B, V, C], got {list(attrs.shape)}")
    if attrs.dim() == 3 and attrs.shape[0] != B:
        raise ValueError(f"interpolate: attrs batch {attrs.shape[0]} != raster batch {B}")
    check_faces(faces, attrs.shape[-2])
    num_faces = faces.shape[0]
    if face_ids.numel() and int(face_ids.max()) >= num_faces:
        raise ValueError(f"interpolate: raster refers to face {int(face_ids.max())} but faces "
                         f"has only {num_faces} rows")
    mask = face_ids >= 0
    if num_faces == 0:  # nothing can be visible
        return attrs.new_zeros(*face_ids.shape, attrs.shape[-1])
    corners = faces.to(attrs.device)[face_ids.clamp_min(0)]  # [B, H, W, 3]
    if attrs.dim() == 2:
        values = attrs[corners]  # [B, H, W, 3, C]
    else:
        batch = torch.arange(B, device=attrs.device).view(B, 1, 1, 1)
        values = attrs[batch, corners]
    out = (bary.to(attrs.dtype).unsqueeze(-1) * values).sum(dim=-2)
    return out * mask.unsqueeze(-1).to(out.dtype)
