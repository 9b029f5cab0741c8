"""Cameras, scale and starting points of the static scene a 3DGS fit sees.

A talking head is not a static scene: the head moves in front of the camera. What is static
is the head in its own coordinate frame, so with ``head_space=True`` every frame's camera is
re-expressed relative to the head, ``viewmat_head = viewmat @ head_pose`` (head-to-camera),
and the points live in head coordinates (the template vertices). Head poses come from
``subject.head_poses`` or, when the source has none, from a rigid Kabsch fit of the template
to the frame's tracked vertices (:func:`headkit.cameras.head_poses`).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from headkit.cameras import camtoworld_to_viewmat, estimate_rigid, head_poses, invert_rigid, transform_points
from headkit.data.subject import Subject

__all__ = ["knn_scales", "estimate_rigid", "frame_head_poses", "scene_cameras", "initial_points",
           "scene_scale_of"]


def knn_scales(points: Tensor, k: int = 3, chunk: Optional[int] = None) -> Tensor:  # [N, 3]
    """Initial isotropic scale per point, ``sqrt(mean_j d_j^2)`` over its ``k`` nearest
    neighbours, with ``d^2`` clamped at 1e-7 (3DGS's ``distCUDA2``; a root-mean-square, i.e.
    the "mean distance" in the 3DGS sense). ``torch.cdist`` runs on ``chunk`` rows at a time
    (default: ``2^24 / N`` rows, a 64 MB block). With fewer than ``k + 1`` points, all the
    others are used. Returns ``[N]``.
    """
    N = points.shape[0]
    if N == 0:
        raise ValueError("knn_scales: no points")
    chunk = chunk or max(1, 2 ** 24 // N)
    k = min(k, N - 1)
    if k == 0:
        return torch.full((1,), math.sqrt(1e-7), dtype=points.dtype, device=points.device)
    out = []
    for start in range(0, N, chunk):
        d2 = torch.cdist(points[start:start + chunk], points).square()
        rows = torch.arange(start, min(start + chunk, N), device=points.device)
        d2[rows - start, rows] = float("inf")  # not its own neighbour
        out.append(d2.topk(k, dim=1, largest=False).values.mean(1))
    return torch.cat(out).clamp_min(1e-7).sqrt()


def frame_head_poses(subject: Subject) -> Tensor:
    """Head-to-world ``[T, 4, 4]`` of every frame of ``subject`` (:func:`headkit.cameras.head_poses`:
    ``subject.head_poses``, or Kabsch template -> tracked vertices)."""
    tracked = None if subject.head_poses is None else torch.from_numpy(np.asarray(subject.head_poses, np.float32))
    return head_poses(tracked, torch.from_numpy(subject.template_vertices).float(),
                      torch.from_numpy(subject.vertices).float())


def scene_cameras(subject: Subject, head_space: bool) -> tuple[Tensor, Tensor]:
    """Per-frame ``viewmats [T, 4, 4]`` and ``Ks [T, 3, 3]`` of the static scene.

    ``head_space=True``: ``viewmat @ head_pose`` (head coordinates to camera); else the
    tracked world-to-camera matrices.
    """
    viewmats = camtoworld_to_viewmat(torch.from_numpy(subject.camtoworlds).double())
    if head_space:
        viewmats = viewmats @ frame_head_poses(subject).double()
    return viewmats.float(), torch.from_numpy(np.asarray(subject.Ks, np.float32))


def initial_points(subject: Subject, head_space: bool, init_frame: Optional[int] = None) -> Tensor:
    """Points ``[V, 3]`` to start from, one per mesh vertex.

    ``init_frame=None``: the template vertices (head frame), posed by the first train
    frame's head pose when ``head_space`` is false. ``init_frame=t``: frame ``t``'s tracked
    vertices (its expression included), brought into the head frame when ``head_space``.
    """
    if init_frame is None:
        points = torch.from_numpy(subject.template_vertices).float()
        if not head_space:
            points = transform_points(points, frame_head_poses(subject)[int(subject.train_ids[0])])
        return points
    if not -subject.num_frames <= init_frame < subject.num_frames:
        raise IndexError(f"init_frame={init_frame} but subject '{subject.name}' has "
                         f"{subject.num_frames} frames")
    points = torch.from_numpy(subject.vertices[init_frame]).float()
    if head_space:
        points = transform_points(points, invert_rigid(frame_head_poses(subject)[init_frame]))
    return points


def scene_scale_of(viewmats: Tensor, points: Tensor) -> float:  # [C, 4, 4], [N, 3]
    """3DGS's scene extent: 1.1 x the largest distance of a camera centre from their mean.

    When the cameras (nearly) coincide (extent below 1 % of their distance to the points, e.g.
    a fixed camera in world space) the points' extent is used instead: 1.1 x the largest
    distance of a point from their centroid.
    """
    centres = invert_rigid(viewmats.double())[:, :3, 3]
    extent = 1.1 * (centres - centres.mean(0)).norm(dim=-1).max().item()
    distance = (centres.mean(0) - points.double().mean(0)).norm().item()
    if extent < 0.01 * distance or extent == 0.0:
        extent = 1.1 * (points.double() - points.double().mean(0)).norm(dim=-1).max().item()
    return max(extent, 1e-6)
