"""How fast a subject's head moves relative to the camera, per frame.

The refinement and the time encodings of both methods assume a certain amount of motion
between neighbouring frames; this module measures it so a synthetic subject can be compared
with real clips. The head-to-camera transform of frame ``i`` is
``M_i = inv(camtoworld_i) @ head_pose_i`` (head poses given), or ``inv(camtoworld_i) @ K_i``
with ``K_i`` the rigid (Kabsch) fit of the template to the tracked vertices (no head poses).
Between consecutive frames:

* angular speed: the geodesic angle of ``R_{i+1} R_i^T`` in degrees per frame;
* translational speed: the distance the head centre (the template's vertex centroid, carried by
  ``M_i``) moves in camera coordinates, in mm per frame for subjects in metres.

Both are also given per second (times the subject's fps).
"""

from __future__ import annotations

import numpy as np

__all__ = ["rigid_fit", "head_to_camera", "frame_speeds", "motion_stats", "speed_stats", "PERCENTILES"]

PERCENTILES = (50, 90, 99)


def rigid_fit(source: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Rigid transforms ``[T, 4, 4]`` (Kabsch, no scale) taking ``source [V, 3]`` to each ``targets[t] [V, 3]``."""
    src = np.asarray(source, np.float64)
    tgt = np.asarray(targets, np.float64)
    mu_s, mu_t = src.mean(0), tgt.mean(1)
    cov = np.einsum("tvi,vj->tij", tgt - mu_t[:, None], src - mu_s)  # sum_v t_v s_v^T
    u, _, vt = np.linalg.svd(cov)
    d = np.sign(np.linalg.det(u @ vt))
    fix = np.tile(np.eye(3), (len(tgt), 1, 1))
    fix[:, 2, 2] = d
    out = np.tile(np.eye(4), (len(tgt), 1, 1))
    out[:, :3, :3] = u @ fix @ vt
    out[:, :3, 3] = mu_t - np.einsum("tij,j->ti", out[:, :3, :3], mu_s)
    return out


def head_to_camera(subject) -> np.ndarray:
    """``[T, 4, 4]`` float64 head-to-camera transforms (see the module docstring)."""
    c2w = np.asarray(subject.camtoworlds, np.float64)
    if subject.head_poses is not None:
        head = np.asarray(subject.head_poses, np.float64)
    else:
        head = rigid_fit(subject.template_vertices, subject.vertices)
    return np.linalg.inv(c2w) @ head


def frame_speeds(head_to_cam: np.ndarray, centre: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(deg_per_frame [T-1], units_per_frame [T-1])`` between consecutive transforms ``[T, 4, 4]``;
    ``centre`` ``[3]`` is the head point whose displacement is measured (default: the origin)."""
    M = np.asarray(head_to_cam, np.float64)
    if M.ndim != 3 or M.shape[1:] != (4, 4) or len(M) < 2:
        raise ValueError(f"frame_speeds: need [T >= 2, 4, 4] transforms, got {M.shape}")
    rel = M[1:, :3, :3] @ np.swapaxes(M[:-1, :3, :3], -1, -2)
    cos = np.clip((np.trace(rel, axis1=-2, axis2=-1) - 1.0) / 2.0, -1.0, 1.0)
    angles = np.degrees(np.arccos(cos))
    c = np.zeros(3) if centre is None else np.asarray(centre, np.float64)
    points = np.einsum("tij,j->ti", M[:, :3, :3], c) + M[:, :3, 3]
    return angles, np.linalg.norm(np.diff(points, axis=0), axis=-1)


def speed_stats(head_to_cam: np.ndarray, fps: float, centre=None, percentiles=PERCENTILES,
                unit_to_mm: float = 1000.0) -> dict:
    """Speed percentiles of transforms ``[T, 4, 4]`` sampled at ``fps``: the keys of
    :func:`motion_stats` without name/frames/fps (poses alone, e.g. ``head_motion``'s, no images)."""
    angles, dists = frame_speeds(head_to_cam, centre)
    dists = dists * unit_to_mm
    out = {}
    for p in percentiles:
        out[f"rot_deg_per_frame_p{p}"] = float(np.percentile(angles, p))
        out[f"trans_mm_per_frame_p{p}"] = float(np.percentile(dists, p))
    for p in percentiles:
        out[f"rot_deg_per_s_p{p}"] = out[f"rot_deg_per_frame_p{p}"] * float(fps)
        out[f"trans_mm_per_s_p{p}"] = out[f"trans_mm_per_frame_p{p}"] * float(fps)
    return out


def motion_stats(subject, percentiles=PERCENTILES, unit_to_mm: float = 1000.0) -> dict:
    """Head speed percentiles of a :class:`~headkit.data.subject.Subject` over all consecutive frames.

    Returns ``{"name", "frames", "fps", "rot_deg_per_frame_p50", ..., "trans_mm_per_frame_p50",
    ..., "rot_deg_per_s_p50", ..., "trans_mm_per_s_p50", ...}``; ``unit_to_mm`` converts the
    subject's units (1000 for metres).
    """
    centre = np.asarray(subject.template_vertices, np.float64).mean(0)
    fps = float(subject.fps)
    out = {"name": subject.name, "frames": int(subject.num_frames), "fps": fps}
    out.update(speed_stats(head_to_camera(subject), fps, centre, percentiles, unit_to_mm))
    return out
