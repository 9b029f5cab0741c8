"""GraphAvatar-specific evaluation: how well GGO recovers the true tracking, Gaussian counts.

The synthetic subject keeps the true cameras and expressions next to the noisy "tracked" ones
(``subject.extras["true_camtoworlds"]``, ``["true_expressions"]``), so the refinement can be
scored: on the *training* frames (the ones GGO is trained on), the camera rotation error
(degrees), camera-centre error (data units, metres for the synthetic head) and expression L2
error, before (tracked) and after (tracked + GGO offsets) refinement, raw and with the part
common to all training frames removed (``*_zero_mean_*``; a rigid offset shared by every frame
in the avatar's own frame is indistinguishable from moving the avatar, so GGO is scored by the
zero-mean part).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from headkit.data.dataset import FrameDataset
from headkit.data.subject import Subject

__all__ = ["rotation_errors_deg", "shared_offset", "tracking_errors", "training_frame_tracking", "ggo_tracking_errors",
           "count_gaussians"]


def rotation_errors_deg(
    rotations: Tensor,  # [..., 3, 3]
    references: Tensor,  # [..., 3, 3]
) -> Tensor:
    """Geodesic angle ``arccos((tr(R_ref^T R) - 1) / 2)`` in degrees, ``[...]``."""
    rel = references.transpose(-1, -2) @ rotations
    cos = ((rel.diagonal(dim1=-2, dim2=-1).sum(-1) - 1.0) / 2.0).clamp(-1.0, 1.0)
    return torch.rad2deg(torch.arccos(cos))


def _project_so3(matrix: Tensor) -> Tensor:
    """The rotation nearest (Frobenius) to a 3x3 matrix: the chordal L2 mean of rotations."""
    u, _, vt = torch.linalg.svd(matrix)
    d = torch.sign(torch.det(u @ vt))
    return u @ torch.diag(torch.stack([torch.ones_like(d), torch.ones_like(d), d])) @ vt


def shared_offset(
    cameras: Tensor,  # [N, 4, 4] estimated
    true_cameras: Tensor,  # [N, 4, 4] in the same frame
) -> Tensor:
    """The rigid offset common to all frames' errors ``E_i = cameras_i true_i^-1``, ``[4, 4]``:
    the chordal mean of their rotations and the mean of their translations."""
    errs = cameras @ torch.linalg.inv(true_cameras)  # E_i, [N, 4, 4]
    mean = torch.eye(4, dtype=errs.dtype, device=errs.device)
    mean[:3, :3] = _project_so3(errs[:, :3, :3].mean(0))
    mean[:3, 3] = errs[:, :3, 3].mean(0)
    return mean


def tracking_errors(
    camtoworlds: Tensor,  # [N, 4, 4] estimated
    true_camtoworlds: Tensor,  # [N, 4, 4]
    expressions: Tensor,  # [N, E] estimated
    true_expressions: Tensor,  # [N, E]
    local_poses: Tensor | None = None,  # [N, 4, 4] the avatar's frame to world per frame; None = world
) -> dict[str, float]:
    """Mean per-frame tracking errors, raw and with the part common to all frames removed.

    Raw: ``rot_err_deg`` (geodesic angle between the rotations), ``centre_err`` (camera-centre
    distance, data units) and ``expr_err`` (L2 norm of the expression error).

    Zero-mean (``*_zero_mean``): a rigid offset shared by every frame *in the frame the avatar
    lives in* cannot be told from moving the avatar the other way, so it is removed before
    scoring. An avatar attached to the head (GraphAvatar's ``input_space: head``) is rendered
    from the camera in the head's frame, ``L_i = P_i^-1 c2w_i`` with the frame's head pose ``P_i``
    (``local_poses``); moving that avatar by ``G`` is the same as ``L_i -> G L_i`` for every frame,
    i.e. ``c2w_i -> P_i G P_i^-1 c2w_i`` in the world, which differs from frame to frame as the
    head turns. A world-frame offset ``c2w_i -> G c2w_i`` is the shared one only for an avatar
    fixed in the world (``local_poses=None``). The per-frame errors in that frame,
    ``E_i = L_i Ltrue_i^-1``, are averaged (``R_bar``: the chordal mean of their rotations,
    ``t_bar``: the mean of their translations), and the cameras ``E_bar^-1 L_i`` are scored
    against ``Ltrue_i`` as above. The raw errors do not depend on the frame (a rigid change of
    frame keeps angles and distances). The expression error's mean over the frames is subtracted
    likewise. All values are floats (mean over frames).
    """
    cams, true = camtoworlds.double(), true_camtoworlds.double()
    if cams.shape != true.shape or cams.dim() != 3 or cams.shape[1:] != (4, 4) or len(cams) < 1:
        raise ValueError(f"tracking_errors: need two [N, 4, 4] camera stacks, got {tuple(cams.shape)} "
                         f"and {tuple(true.shape)}")
    if local_poses is not None:
        if local_poses.shape != cams.shape:
            raise ValueError(f"tracking_errors: local_poses must be [N, 4, 4] like the cameras, got "
                             f"{tuple(local_poses.shape)}")
        to_local = torch.linalg.inv(local_poses.double())
        cams, true = to_local @ cams, to_local @ true  # L_i, Ltrue_i
    aligned = torch.linalg.inv(shared_offset(cams, true)) @ cams
    expr, true_expr = expressions.double(), true_expressions.double()
    d_expr = expr - true_expr
    out = {}
    for tag, c, de in (("", cams, d_expr), ("_zero_mean", aligned, d_expr - d_expr.mean(0))):
        out[f"rot_err_deg{tag}"] = rotation_errors_deg(c[:, :3, :3], true[:, :3, :3]).mean().item()
        out[f"centre_err{tag}"] = (c[:, :3, 3] - true[:, :3, 3]).norm(dim=-1).mean().item()
        out[f"expr_err{tag}"] = de.norm(dim=-1).mean().item()
    return out


@torch.no_grad()
def training_frame_tracking(model, subject: Subject, device: torch.device, batch_size: int = 16,
                            split: str = "train") -> dict[str, Tensor]:
    """The training frames (or those of ``split``) as tracked and as GGO refines them (and the
    truth, where the subject has it).

    Returns ``{"ids": [N] subject frame indices, "poses": [N, 4, 4] the avatar's frame to world,
    "c2w_before", "c2w_after": [N, 4, 4], "expr_before", "expr_after": [N, E]}`` in the split's
    frame order, plus ``"true_c2w"`` and ``"true_expr"`` when ``subject.extras`` holds
    ``true_camtoworlds`` and ``true_expressions``.
    """
    was_training = model.training
    model.eval()
    frames = FrameDataset(subject, split)
    parts = {key: [] for key in ("ids", "poses", "c2w_before", "c2w_after", "expr_before", "expr_after")}
    for start in range(0, len(frames), batch_size):
        batch = frames.batch(np.arange(start, min(start + batch_size, len(frames))), device)
        encoded = model.encode(batch)
        c2w, expr, _ = model.refine(batch, encoded, apply=True)
        for key, value in (("ids", batch["index"]), ("poses", encoded["poses"]), ("c2w_before", batch["camtoworld"]),
                           ("c2w_after", c2w), ("expr_before", batch["expression"]), ("expr_after", expr)):
            parts[key].append(value)
    model.train(was_training)
    out = {key: torch.cat(value) for key, value in parts.items()}
    ids = out["ids"].cpu().numpy()
    for key, name in (("true_c2w", "true_camtoworlds"), ("true_expr", "true_expressions")):
        if name in subject.extras:
            out[key] = torch.from_numpy(np.asarray(subject.extras[name], np.float32)[ids]).to(device)
    return out


@torch.no_grad()
def ggo_tracking_errors(model, subject: Subject, device: torch.device, batch_size: int = 16) -> dict:
    """Tracking errors against the truth on the training frames, before and after GGO.

    Returns ``ggo_rot_err_deg_{before,after}``, ``ggo_trans_err_{before,after}`` (camera centre
    distance, data units), ``ggo_centre_err_mm_{before,after}`` (the same in mm, for subjects in
    metres such as the synthetic one), ``ggo_expr_err_{before,after}`` (mean L2 norm of the
    expression error per frame), and each of them with the part common to all training frames
    removed, ``ggo_rot_err_deg_zero_mean_{before,after}`` etc. (see :func:`tracking_errors`; a
    rigid offset shared in the avatar's frame, the model's ``encode(batch)["poses"]``, cannot be
    told from moving the avatar, so the zero-mean errors are the ones to score GGO by); or
    ``{"ggo_errors_unavailable_reason": ...}`` when the subject has no ground truth.
    """
    if "true_camtoworlds" not in subject.extras or "true_expressions" not in subject.extras:
        return {"ggo_errors_unavailable_reason": "the subject has no true_camtoworlds/true_expressions "
                                                 "(only the synthetic subject keeps the truth)"}
    t = training_frame_tracking(model, subject, device, batch_size)
    out = {}
    for tag in ("before", "after"):
        errors = tracking_errors(t[f"c2w_{tag}"], t["true_c2w"], t[f"expr_{tag}"], t["true_expr"], t["poses"])
        for zm in ("", "_zero_mean"):
            out[f"ggo_rot_err_deg{zm}_{tag}"] = errors[f"rot_err_deg{zm}"]
            out[f"ggo_trans_err{zm}_{tag}"] = errors[f"centre_err{zm}"]
            out[f"ggo_centre_err_mm{zm}_{tag}"] = 1000.0 * errors[f"centre_err{zm}"]
            out[f"ggo_expr_err{zm}_{tag}"] = errors[f"expr_err{zm}"]
    return out


@torch.no_grad()
def count_gaussians(model, dataset: FrameDataset, device: torch.device, max_frames: int = 8) -> float:
    """Mean number of Gaussians rasterized per frame over the first ``max_frames`` frames."""
    was_training = model.training
    model.eval()
    positions = np.arange(min(max_frames, len(dataset)))
    counts = [model.get_outputs(dataset.batch([int(p)], device))["num_gaussians"].item() for p in positions]
    model.train(was_training)
    return float(np.mean(counts))
