"""Trajectories of the synthetic subject, all functions of time in seconds.

Every curve's random parameters come from its own ``numpy`` stream seeded by ``(seed, k)`` and
never from the frame count or rate: 30 and 60 fps sample the same performance, and a longer
clip extends a shorter one.
"""

from __future__ import annotations

import inspect
import math

import numpy as np

from .synthetic_head import smoothstep

__all__ = ["head_motion", "head_bursts", "burst_events", "parse_bursts", "BURST_KEYS", "expression_trajectories",
           "smooth_noise", "correlation_sigma_frames"]


def _signal(rng: np.random.Generator, times: np.ndarray, f_lo: float, f_hi: float, n: int = 4) -> np.ndarray:
    """``Σ_k a_k sin(2π f_k t + φ_k) / Σ_k a_k`` in [-1, 1]: smooth random motion of time in seconds.

    Its parameters come from ``rng`` alone, never from the frame count or rate, so every
    sampling of the same seed traces the same curve.
    """
    freqs, phases, amps = rng.uniform(f_lo, f_hi, n), rng.uniform(0, 2 * np.pi, n), rng.uniform(0.3, 1.0, n)
    return (amps * np.sin(2 * np.pi * freqs * times[:, None] + phases)).sum(-1) / amps.sum()


def parse_bursts(bursts) -> dict | None:
    """``None`` (no bursts: ``None``, ``0`` or ``rate_hz == 0``) or the full, validated mapping."""
    if bursts is None or (not hasattr(bursts, "keys") and bursts == 0):
        return None
    if not hasattr(bursts, "keys"):
        raise ValueError(f"head_bursts must be null or a mapping with keys {list(BURST_KEYS)}, got {bursts!r}")
    unknown = sorted(set(bursts.keys()) - set(BURST_KEYS))
    if unknown:
        raise ValueError(f"head_bursts: unknown key(s) {unknown}; allowed: {list(BURST_KEYS)}")
    out = {k: float(bursts.get(k, v)) for k, v in BURST_KEYS.items() if k != "axis_weights"}
    out["axis_weights"] = [float(w) for w in bursts.get("axis_weights", BURST_KEYS["axis_weights"])]
    bad = [k for k in ("rate_hz", "deg", "mm", "hold_s") if not (math.isfinite(out[k]) and out[k] >= 0)]
    if not (math.isfinite(out["duration_s"]) and out["duration_s"] > 0):
        bad.insert(0, "duration_s")
    if len(out["axis_weights"]) != 3 or not all(math.isfinite(w) and w >= 0 for w in out["axis_weights"]):
        bad.insert(0, "axis_weights")
    if bad:
        raise ValueError(f"head_bursts.{bad[0]} is out of range (durations > 0, rest >= 0, 3 axis weights): "
                         f"got {out[bad[0]]!r}")
    return None if out["rate_hz"] == 0 else out


def burst_events(seed: int, t_end: float, rate_hz: float, deg: float, mm: float, hold_s: float,
                 axis_weights=(1.0, 1.0, 0.5)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bursts starting before ``t_end`` seconds: ``(starts [K], holds [K], offsets [K, 6])``.

    Starts are a Poisson process (exponential gaps of mean ``1 / rate_hz``); holds are
    exponential with mean ``hold_s``; each offset is a rotation (yaw, pitch, roll in radians) of
    norm ``deg · U(0.5, 1.5)`` along ``n ⊙ axis_weights`` (``n`` Gaussian) and a translation
    (metres) of norm ``mm · U(0.5, 1.5)`` along a uniformly random direction. Events are drawn in
    time order from the stream ``(seed, 11)`` with a fixed number of draws each, so a later
    ``t_end`` only appends events.
    """
    rng, w = np.random.default_rng([seed, 11]), np.asarray(axis_weights, np.float64)
    starts, holds, offsets = [], [], []
    t = rng.exponential(1.0 / rate_hz) if rate_hz > 0 else np.inf
    while t < t_end:
        rot = rng.normal(size=3) * w
        rot *= np.radians(deg) * rng.uniform(0.5, 1.5) / max(np.linalg.norm(rot), 1e-12)
        trans = rng.normal(size=3)
        trans *= 1e-3 * mm * rng.uniform(0.5, 1.5) / max(np.linalg.norm(trans), 1e-12)
        starts.append(t)
        holds.append(rng.exponential(hold_s) if hold_s > 0 else 0.0)
        offsets.append(np.concatenate([rot, trans]))
        t += rng.exponential(1.0 / rate_hz)
    return np.asarray(starts), np.asarray(holds), np.asarray(offsets).reshape(-1, 6)


def head_bursts(times: np.ndarray, seed: int = 0, rate_hz: float = 0.0, deg: float = 10.0, mm: float = 5.0,
                duration_s: float = 0.3, hold_s: float = 0.8, axis_weights=(1.0, 1.0, 0.5)) -> np.ndarray:
    """Quick out-and-back head movements: offsets ``[T, 6]`` (yaw, pitch, roll in radians; x, y, z in metres).

    Talking heads mostly drift slowly but now and then nod or turn quickly; the sinusoids of
    :func:`head_motion` never do, so their speed has no tail. Burst ``k`` (:func:`burst_events`)
    starts at a Poisson time ``t_k``, moves by its offset ``a_k`` along a smoothstep
    ``S(u) = 3u² - 2u³`` over ``d = duration_s`` seconds, holds it for ``h_k`` and moves back the
    same way, so the head never drifts off::

        b(t) = Σ_k a_k [S((t - t_k) / d) - S((t - t_k - d - h_k) / d)],   S clipped to [0, 1].

    A move's peak speed is ``1.5 |a_k| / d`` and its mean ``|a_k| / d``. The events never depend
    on the frame count or rate: a longer clip appends events and 60 fps samples the same ones.
    """
    times = np.asarray(times, dtype=np.float64)
    t_end = (times.max() if len(times) else 0.0) + 1.0
    starts, holds, offsets = burst_events(seed, t_end, rate_hz, deg, mm, hold_s, axis_weights)
    out = np.zeros((len(times), 6))
    for t, hold, offset in zip(starts, holds, offsets):
        profile = (smoothstep(t, t + duration_s, times)
                   - smoothstep(t + duration_s + hold, t + 2 * duration_s + hold, times))
        out += profile[:, None] * offset[None]
    return out


#: keys of the ``bursts`` mapping and their defaults: :func:`head_bursts`' keyword arguments
BURST_KEYS = {name: p.default for name, p in inspect.signature(head_bursts).parameters.items()
              if name not in ("times", "seed")}


def head_motion(times: np.ndarray, seed: int = 0, rotation_deg=(30.0, 15.0, 10.0),
                translation=(0.015, 0.012, 0.02), bursts=None) -> np.ndarray:
    """Head-to-world poses ``[T, 4, 4]`` (float64) at ``times`` in seconds.

    ``R = R_y(yaw) R_x(pitch) R_z(roll)`` about the head origin (between the eyes) plus a
    translation; each angle/offset is its bound times a soft-saturated sum of 4 sinusoids of
    0.04-0.3 Hz normalised to [-1, 1], so the bounds are never exceeded and a 10 s clip
    typically reaches 70-95 % of them. ``bursts`` (a mapping of :func:`head_bursts` arguments,
    or None) adds quick out-and-back nods/turns to the angles and offsets; None (default) leaves
    the poses bit-identical to the sinusoids alone.
    """
    times = np.asarray(times, dtype=np.float64)
    rng = np.random.default_rng([seed, 10])
    # tanh(1.6 s) / tanh(1.6) keeps the bound but lifts typical peaks (60-80 % of it) to 80-95 %.
    sat = lambda x: np.tanh(1.6 * x) / np.tanh(1.6)  # noqa: E731
    yaw, pitch, roll = (np.radians(b) * sat(_signal(rng, times, 0.04, 0.3)) for b in rotation_deg)
    offsets = np.stack([b * sat(_signal(rng, times, 0.03, 0.2)) for b in translation], -1)
    bursts = parse_bursts(bursts)
    if bursts is not None:
        extra = head_bursts(times, seed, **bursts)
        yaw, pitch, roll, offsets = yaw + extra[:, 0], pitch + extra[:, 1], roll + extra[:, 2], offsets + extra[:, 3:]
    c, s, one, zero = np.cos, np.sin, np.ones_like(times), np.zeros_like(times)
    Ry = np.stack([np.stack([c(yaw), zero, s(yaw)], -1), np.stack([zero, one, zero], -1),
                   np.stack([-s(yaw), zero, c(yaw)], -1)], -2)
    Rx = np.stack([np.stack([one, zero, zero], -1), np.stack([zero, c(pitch), -s(pitch)], -1),
                   np.stack([zero, s(pitch), c(pitch)], -1)], -2)
    Rz = np.stack([np.stack([c(roll), -s(roll), zero], -1), np.stack([s(roll), c(roll), zero], -1),
                   np.stack([zero, zero, one], -1)], -2)
    poses = np.tile(np.eye(4), (len(times), 1, 1))
    poses[:, :3, :3] = Ry @ Rx @ Rz
    poses[:, :3, 3] = offsets
    return poses


def _blinks(rng: np.random.Generator, times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Left/right blink curves: events every ~3 s (at least 0.8 s apart), 15 % of them winks."""
    t, left, right = rng.uniform(0.2, 2.0), np.zeros_like(times), np.zeros_like(times)
    t_end = (times.max() if len(times) else 0.0) + 1.0
    while t < t_end:  # events are drawn in order, so a longer clip only appends events
        wink = rng.random()
        pulse = np.exp(-((times - t) / 0.07) ** 2)
        left = np.maximum(left, pulse * (wink > 0.075))
        right = np.maximum(right, pulse * (wink < 0.925))
        t += 0.8 + rng.exponential(2.2)
    return left, right


def expression_trajectories(times: np.ndarray, names: list[str], seed: int = 0) -> np.ndarray:
    """Expression coefficients ``[T, E]`` in [0, 1] at ``times`` in seconds, one curve per name.

    Talking-like jaw motion (0.15-0.8 Hz), a shared smile with a small asymmetry, blink events,
    brow raise/frown and pucker/stretch as opposite halves of one signal, rare cheek puffs, and
    slow random activity for the extra ``bump_k`` shapes. Each group has its own random stream.
    """
    times = np.asarray(times, dtype=np.float64)

    def rng(k: int) -> np.random.Generator:
        return np.random.default_rng([seed, 20, k])

    smile = _signal(rng(1), times, 0.05, 0.3)
    s_l, s_r = _signal(rng(2), times, 0.1, 0.5), _signal(rng(3), times, 0.1, 0.5)
    blink_l, blink_r = _blinks(rng(4), times)
    brow, mouth = _signal(rng(5), times, 0.05, 0.4), _signal(rng(6), times, 0.08, 0.5)
    curves = {
        "jaw_open": smoothstep(0.15, 0.95, 0.45 + 0.8 * _signal(rng(0), times, 0.15, 0.8, 5)),
        "smile_left": smoothstep(0.2, 0.9, 0.4 + 0.7 * smile + 0.2 * s_l),
        "smile_right": smoothstep(0.2, 0.9, 0.4 + 0.7 * smile + 0.2 * s_r),
        "blink_left": blink_l, "blink_right": blink_r,
        "brow_raise": smoothstep(0.25, 0.9, 1.2 * brow), "brow_frown": smoothstep(0.25, 0.9, -1.2 * brow),
        "lip_pucker": smoothstep(0.3, 0.95, 1.2 * mouth),
        "mouth_stretch": smoothstep(0.3, 0.95, -1.2 * mouth),
        "cheek_puff": smoothstep(0.3, 0.9, 1.2 * _signal(rng(7), times, 0.05, 0.3)),
    }
    out = [curves[n] if n in curves
           else smoothstep(0.0, 1.0, 0.5 + 0.6 * _signal(rng(100 + k), times, 0.05, 0.5))
           for k, n in enumerate(names)]
    return np.stack(out, -1) if out else np.zeros((len(times), 0))


def smooth_noise(rng: np.random.Generator, num_frames: int, dims: int,
                 sigma_frames: float = 1.5) -> np.ndarray:
    """Per-frame noise ``[T, dims]`` with unit standard deviation, Gaussian-smoothed over frames.

    White noise convolved with a Gaussian kernel of standard deviation ``sigma_frames`` and
    divided by the kernel's L2 norm: a stationary Gaussian process with unit variance whose
    autocorrelation is ``exp(-lag² / (4 sigma_frames²))`` (a squared-exponential kernel with
    length scale ``sqrt(2) sigma_frames``; see :func:`correlation_sigma_frames`). The unit
    standard deviation is the process's; one realisation of a clip a few correlation times long
    has a visibly non-zero mean (a shared offset) and a smaller spread about it.
    """
    radius = int(math.ceil(3 * sigma_frames))
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma_frames) ** 2)
    kernel /= kernel.sum()
    white = rng.normal(size=(num_frames + 2 * radius, dims))
    smooth = np.stack([np.convolve(white[:, d], kernel, mode="valid") for d in range(dims)], -1)
    return smooth / np.sqrt((kernel ** 2).sum())


def correlation_sigma_frames(correlation_s: float, fps: float) -> float:
    """Kernel width ``sigma_frames`` of :func:`smooth_noise` for a correlation time in seconds.

    The correlation time ``ell`` is the length scale of the noise's squared-exponential
    autocorrelation ``rho(lag) = exp(-lag² / (2 ell²))``: the autocorrelation falls to
    ``exp(-1/2) ≈ 0.61`` at a lag of ``ell`` (and to ``exp(-2) ≈ 0.14`` at ``2 ell``). Smoothing
    white noise with a Gaussian of width ``sigma`` gives ``ell = sqrt(2) sigma``, so
    ``sigma_frames = correlation_s * fps / sqrt(2)``. The default tracker jitter
    (``sigma_frames = 1.5``) is ``ell ≈ 2.1`` frames, 0.07 s at 30 fps.
    """
    if not (math.isfinite(correlation_s) and correlation_s > 0 and math.isfinite(fps) and fps > 0):
        raise ValueError(f"correlation_s and fps must be > 0, got {correlation_s!r}, {fps!r}")
    return float(correlation_s) * float(fps) / math.sqrt(2.0)
