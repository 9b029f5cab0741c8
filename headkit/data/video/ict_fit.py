"""Fit a full-head model (ICT-FaceKit) to a clip's MediaPipe landmarks: ``tracker: ict``.

Unknowns, solved in one batched torch optimisation over all frames:

- per clip: identity coefficients ``b`` (the first ``K`` modes, ridge-regularised) and the focal
  length ``f`` (log-parametrised, pulled towards the ``fov_deg`` prior: one monocular clip
  barely separates focal length from distance);
- per frame: a rigid head pose ``(R_t, t_t)`` and the model's expression coefficients ``e_t``,
  kept in [0, 1] (projected after every step, as the blendshape rig defines them).

Every canonical landmark ``i`` is a fixed point on the model's surface
(:mod:`.correspondence`), ``X_i(b, e) = n_i + I_i b + E_i e``; it projects to
``pi(K (R_t X_i + t_t))``. The data term is a Huber loss on the pixel distance to the tracked
landmark (``robust_px``: residuals beyond it count linearly, so an occluding hand or a bad
landmark pulls little), with the face-oval landmarks down-weighted (``contour_weight``: MediaPipe
places them on the silhouette, which slides over the real surface as the head turns). Temporal
terms penalise the first differences of expressions and the second differences of pose
(smoothing without lag); a small L1-like prior keeps unused blendshapes at zero.

Initialisation: poses from a robust similarity of the neutral model's landmark points onto each
frame (:func:`.align.align_frames`, depth from the prior focal), expressions from MediaPipe's 52
blendshape scores mapped by name (``browInnerUp`` and ``cheekPuff`` drive both sides), identity
zero. Stage 1 fits pose, focal and identity with the expressions held at their initial values;
stage 2 frees everything.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from ...cameras import so3_exp
from .align import align_frames
from .correspondence import Correspondence

log = logging.getLogger(__name__)

# MediaPipe's face-oval landmarks (the silhouette), down-weighted in the fit.
FACE_OVAL = (10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377, 152,
             148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109)


@dataclass
class IctFitSettings:
    """Weights and schedule of the clip fit (``video_preprocess.ict_fit``)."""

    num_identities: int = 30
    identity_reg: float = 1e-3
    expression_reg: float = 2e-3
    robust_px: float = 2.0
    contour_weight: float = 0.3
    smooth_pose: float = 20.0
    smooth_expression: float = 0.05
    fit_focal: bool = True
    focal_prior: float = 1.0
    rigid_steps: int = 150
    joint_steps: int = 300
    lr: float = 0.01


@dataclass
class IctTrack:
    """A fitted clip. ``T`` frames, ``E`` expressions, ``K`` identity modes, ``L`` landmarks."""

    rotations: np.ndarray  # [T, 3, 3] head to camera
    translations: np.ndarray  # [T, 3] metres
    expressions: np.ndarray  # [T, E] in [0, 1]
    identity: np.ndarray  # [K]
    focal: float  # pixels, of the full video frame
    residual_px: np.ndarray  # [T, L] reprojection error of each landmark

    @property
    def head_poses(self) -> np.ndarray:  # [T, 4, 4]
        """Head-to-camera rigid transforms."""
        poses = np.tile(np.eye(4), (len(self.rotations), 1, 1))
        poses[:, :3, :3], poses[:, :3, 3] = self.rotations, self.translations
        return poses


def blendshape_init(scores: np.ndarray,  # [T, S] MediaPipe blendshape scores
                    score_names: list[str], expression_names: list[str]) -> np.ndarray:  # -> [T, E]
    """Initial model expressions from MediaPipe's ARKit-named scores.

    ``eyeBlinkLeft`` -> ``eyeBlink_L``; a score without side (``browInnerUp``, ``cheekPuff``)
    drives both ``_L`` and ``_R``; names the model lacks are ignored, model shapes MediaPipe lacks
    start at zero.
    """
    index = {}
    for j, name in enumerate(score_names):
        for suffix, side in (("Left", "_L"), ("Right", "_R")):
            if name.endswith(suffix):
                index[name[: -len(suffix)] + side] = j
                break
        else:
            index[name] = j
            index[name + "_L"] = index[name + "_R"] = j
    out = np.zeros((len(scores), len(expression_names)), np.float64)
    for k, name in enumerate(expression_names):
        if name in index:
            out[:, k] = scores[:, index[name]]
    return np.clip(out, 0.0, 1.0)


def initial_poses(points2d: np.ndarray,  # [T, L, 3] pixel-unit landmarks
                  reference: np.ndarray,  # [L, 3] the neutral model's landmark points, metres
                  K: np.ndarray,  # [3, 3]
                  ) -> tuple[np.ndarray, np.ndarray]:  # [T, 3, 3], [T, 3]
    """Rotations and translations from a robust weak-perspective similarity per frame: the
    reference centroid lands at depth ``f / s`` on the ray through its fitted pixel."""
    scales, rotations, translations = align_frames(points2d, reference, "huber", 10)
    centroid = reference.mean(0)
    pixels = scales[:, None] * (rotations @ centroid) + translations  # [T, 3]
    depth = K[0, 0] / scales
    rays = np.stack([(pixels[:, 0] - K[0, 2]) / K[0, 0], (pixels[:, 1] - K[1, 2]) / K[1, 1], np.ones(len(depth))], -1)
    return rotations, rays * depth[:, None] - rotations @ centroid


class _Problem(torch.nn.Module):
    """The differentiable model of the landmarks of every frame."""

    def __init__(self, base, id_basis, ex_basis, R0, t0, e0, focal, centre):
        super().__init__()
        T = len(R0)
        self.register_buffer("base", base)  # [L, 3]
        self.register_buffer("id_basis", id_basis)  # [K, L, 3]
        self.register_buffer("ex_basis", ex_basis)  # [E, L, 3]
        self.register_buffer("R0", R0)  # [T, 3, 3]
        self.register_buffer("centre", centre)  # [2]
        self.omega = torch.nn.Parameter(torch.zeros(T, 3, dtype=base.dtype))
        self.trans = torch.nn.Parameter(t0.clone())
        self.expr = torch.nn.Parameter(e0.clone())
        self.ident = torch.nn.Parameter(torch.zeros(len(id_basis), dtype=base.dtype))
        self.log_focal = torch.nn.Parameter(torch.tensor(float(np.log(focal)), dtype=base.dtype))

    def rotations(self) -> torch.Tensor:  # [T, 3, 3]
        return so3_exp(self.omega) @ self.R0

    def forward(self) -> torch.Tensor:  # -> [T, L, 2] pixels
        shape = self.base + torch.einsum("k,klc->lc", self.ident, self.id_basis)
        points = shape + torch.einsum("te,elc->tlc", self.expr, self.ex_basis)  # [T, L, 3]
        cam = torch.einsum("tij,tlj->tli", self.rotations(), points) + self.trans[:, None]
        z = cam[..., 2:].clamp_min(1e-3)
        return cam[..., :2] / z * self.log_focal.exp() + self.centre


def _losses(problem: _Problem, target, weights, settings: IctFitSettings, log_f0: float) -> dict[str, torch.Tensor]:
    """Named loss terms of the fit (their sum is minimised)."""
    r = (problem() - target).norm(dim=-1)  # [T, L]
    d = settings.robust_px
    huber = torch.where(r < d, 0.5 * r ** 2, d * (r - 0.5 * d))
    terms = {"data": (huber * weights).sum(-1).mean() / weights.sum(),
             "identity": settings.identity_reg * (problem.ident ** 2).sum(),
             "expression": settings.expression_reg * problem.expr.abs().sum(-1).mean(),
             "focal": settings.focal_prior * (problem.log_focal - log_f0) ** 2}
    if len(target) > 2:
        omega = problem.omega  # small deltas: their second difference measures rotational jerk
        jerk = (omega[2:] - 2 * omega[1:-1] + omega[:-2]).square().sum(-1) \
            + ((problem.trans[2:] - 2 * problem.trans[1:-1] + problem.trans[:-2]) * 10.0).square().sum(-1)
        terms["smooth_pose"] = settings.smooth_pose * 1e3 * jerk.mean()
        terms["smooth_expression"] = settings.smooth_expression * (problem.expr[1:] - problem.expr[:-1]).square().sum(-1).mean()
    return terms


def _run(problem: _Problem, target, weights, settings, log_f0: float, steps: int, free: tuple[str, ...]) -> None:
    params = [p for name, p in problem.named_parameters() if name in free]
    opt = torch.optim.Adam(params, lr=settings.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1), eta_min=settings.lr * 0.05)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        sum(_losses(problem, target, weights, settings, log_f0).values()).backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            problem.expr.clamp_(0.0, 1.0)


def fit_ict_clip(landmarks: np.ndarray,  # [T, >=L, 3] pixel-unit landmarks (first L: canonical face)
                 model, corr: Correspondence, K: np.ndarray,  # [3, 3] full video frame
                 blendshapes: np.ndarray | None = None,  # [T, S] MediaPipe scores
                 blendshape_names: list[str] | None = None,
                 settings: IctFitSettings | None = None) -> IctTrack:
    """Fit identity, focal, per-frame pose and expressions to the landmarks (module docstring)."""
    settings = settings or IctFitSettings()
    L = corr.num_points
    points = np.asarray(landmarks[:, :L], np.float64)
    Kid = min(settings.num_identities, model.identities.shape[0])
    base = corr.gather(model.neutral.astype(np.float64))
    R0, t0 = initial_poses(points, base, K)
    E = model.expressions.shape[0]
    e0 = blendshape_init(blendshapes, blendshape_names, model.expression_names) \
        if blendshapes is not None else np.zeros((len(points), E))
    f64 = dict(dtype=torch.float64)
    problem = _Problem(torch.tensor(base, **f64), torch.tensor(corr.gather(model.identities[:Kid].astype(np.float64)), **f64),
                       torch.tensor(corr.gather(model.expressions.astype(np.float64)), **f64),
                       torch.tensor(R0, **f64), torch.tensor(t0, **f64), torch.tensor(e0, **f64),
                       K[0, 0], torch.tensor(K[:2, 2], **f64))
    target = torch.tensor(points[..., :2], **f64)
    weights = torch.ones(L, **f64)
    weights[[i for i in FACE_OVAL if i < L]] = settings.contour_weight
    log_f0 = float(np.log(K[0, 0]))
    rigid = ("omega", "trans", "ident") + (("log_focal",) if settings.fit_focal else ())
    _run(problem, target, weights, settings, log_f0, settings.rigid_steps, rigid)
    _run(problem, target, weights, settings, log_f0, settings.joint_steps, rigid + ("expr",))
    with torch.no_grad():
        residual = (problem() - target).norm(dim=-1)
        track = IctTrack(rotations=problem.rotations().numpy(), translations=problem.trans.numpy().copy(),
                         expressions=problem.expr.numpy().copy(), identity=problem.ident.numpy().copy(),
                         focal=float(problem.log_focal.exp()), residual_px=residual.numpy())
    log.info("ICT fit: landmark error %.2f px (median %.2f), focal %.1f px (prior %.1f)",
             track.residual_px.mean(), np.median(track.residual_px), track.focal, K[0, 0])
    return track


def posed_vertices(model, track: IctTrack) -> np.ndarray:  # -> [T, V, 3] camera space, float32
    """The fitted model's vertices in every frame."""
    shape = model.neutral + np.tensordot(track.identity, model.identities[: len(track.identity)], 1)  # [V, 3]
    T, V = len(track.expressions), len(shape)
    deltas = (track.expressions.astype(np.float32) @ model.expressions.reshape(len(model.expressions), -1))
    local = shape[None] + deltas.reshape(T, V, 3)
    return (np.einsum("tij,tvj->tvi", track.rotations.astype(np.float32), local)
            + track.translations[:, None].astype(np.float32)).astype(np.float32)
