"""GraphAvatar-specific evaluation: how well GGO recovers the true tracking, Gaussian counts.

The synthetic subject keeps the true cameras and expressions next to the noisy "tracked" ones
(``subject.extras["true_camtoworlds"]``, ``["true_expressions"]``), so the refinement can be
scored: on the *training* frames (the ones GGO is trained on), the camera rotation error
(degrees), camera-centre error (data units, metres for the synthetic head) and expression L2
error, before (tracked) and after (tracked + GGO offsets) refinement.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from headkit.data.dataset import FrameDataset
from headkit.data.subject import Subject

__all__ = ["rotation_errors_deg", "ggo_tracking_errors", "count_gaussians"]


def rotation_errors_deg(
    rotations: Tensor,  # [..., 3, 3]
    references: Tensor,  # [..., 3, 3]
) -> Tensor:
    """Geodesic angle ``arccos((tr(R_ref^T R) - 1) / 2)`` in degrees, ``[...]``."""
    rel = references.transpose(-1, -2) @ rotations
    cos = ((rel.diagonal(dim1=-2, dim2=-1).sum(-1) - 1.0) / 2.0).clamp(-1.0, 1.0)
    return torch.rad2deg(torch.arccos(cos))


@torch.no_grad()
def ggo_tracking_errors(model, subject: Subject, device: torch.device, batch_size: int = 16) -> dict:
    """Tracking errors against the truth on the training frames, before and after GGO.

    Returns ``ggo_rot_err_deg_{before,after}``, ``ggo_trans_err_{before,after}`` (camera centre
    distance), ``ggo_expr_err_{before,after}`` (mean L2 norm of the expression error per frame);
    or ``{"ggo_errors_unavailable_reason": ...}`` when the subject has no ground truth.
    """
    if "true_camtoworlds" not in subject.extras or "true_expressions" not in subject.extras:
        return {"ggo_errors_unavailable_reason": "the subject has no true_camtoworlds/true_expressions "
                                                 "(only the synthetic subject keeps the truth)"}
    was_training = model.training
    model.eval()
    train = FrameDataset(subject, "train")
    true_c2w = torch.from_numpy(np.asarray(subject.extras["true_camtoworlds"], np.float32)).to(device)
    true_expr = torch.from_numpy(np.asarray(subject.extras["true_expressions"], np.float32)).to(device)
    sums = dict.fromkeys(("rot_before", "rot_after", "trans_before", "trans_after", "expr_before", "expr_after"), 0.0)
    for start in range(0, len(train), batch_size):
        batch = train.batch(np.arange(start, min(start + batch_size, len(train))), device)
        ids = batch["index"]
        c2w, expr, _, _ = model.refine(batch, model.encode(batch), apply=True)
        for tag, cams, exps in (("before", batch["camtoworld"], batch["expression"]), ("after", c2w, expr)):
            sums[f"rot_{tag}"] += rotation_errors_deg(cams[:, :3, :3], true_c2w[ids, :3, :3]).sum().item()
            sums[f"trans_{tag}"] += (cams[:, :3, 3] - true_c2w[ids, :3, 3]).norm(dim=-1).sum().item()
            sums[f"expr_{tag}"] += (exps - true_expr[ids]).norm(dim=-1).sum().item()
    model.train(was_training)
    n = float(len(train))
    return {"ggo_rot_err_deg_before": sums["rot_before"] / n, "ggo_rot_err_deg_after": sums["rot_after"] / n,
            "ggo_trans_err_before": sums["trans_before"] / n, "ggo_trans_err_after": sums["trans_after"] / n,
            "ggo_expr_err_before": sums["expr_before"] / n, "ggo_expr_err_after": sums["expr_after"] / n}


@torch.no_grad()
def count_gaussians(model, dataset: FrameDataset, device: torch.device, max_frames: int = 8) -> float:
    """Mean number of Gaussians rasterized per frame over the first ``max_frames`` frames."""
    was_training = model.training
    model.eval()
    positions = np.arange(min(max_frames, len(dataset)))
    counts = [model.get_outputs(dataset.batch([int(p)], device))["num_gaussians"].item() for p in positions]
    model.train(was_training)
    return float(np.mean(counts))
