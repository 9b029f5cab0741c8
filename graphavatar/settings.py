"""GraphAvatar's configuration sections: defaults, merging and validation with named keys.

Each constructor argument of :class:`graphavatar.model.GraphAvatar` is a section of
``configs/model/graphavatar.yaml`` (a plain dict after Hydra). :func:`section` merges it over
:data:`DEFAULTS` and rejects unknown keys and invalid values with the full config key in the
message (``model.optim.lr.unets``), as RELIABILITY.md asks. The defaults are the CPU-sized
synthetic-subject settings; ``experiment=insta_subject`` holds the paper's.
"""

from __future__ import annotations

import copy
import math
from typing import Any

from headkit.errors import InvalidConfigValue

__all__ = ["DEFAULTS", "ConfigValueError", "section"]

DEFAULTS: dict[str, dict[str, Any]] = {
    "hierarchy": {"factors": [4, 8], "preserve_border": False, "cache_dir": None},
    "unet": {"filters": [16, 16], "K": 3, "latent": 8, "bottleneck": "global", "skip": True, "num_freqs": 0},
    "geometry": {"offset_scale": None, "scale_init": None},
    "appearance": {"sh_degree": 3, "opacity_init": 0.1},
    "neural_gaussians": {"enabled": True, "num_offsets": 2, "feature_dim": 4, "hidden_dim": 32,
                         "use_distance": False, "local_frame": False, "opacity_threshold": 0.0,
                         "offset_init_std": 1.0, "opacity_init": 0.1},
    "ggo": {"enabled": True, "num_heads": 4, "num_freqs": 10, "dropout": 0.0, "pose_side": "right",
            "apply_on_test": False},
    "enhancer": {"enabled": True, "channels": [16, 32, 64], "film_hidden": 16, "depth_offset": None,
                 "depth_scale": None},
    "render": {"background": [1.0, 1.0, 1.0], "composite_gt": False, "backend": "auto", "tile_size": None,
               "near_plane": 0.01},
    "warmup": {"enabled": True, "steps": 500, "loss": "mse", "batch_size": 1, "lr": 2e-3, "log_every": 50,
               "weights": {"means": 1.0, "scales": 1.0, "quats": 1.0, "sh": 1.0, "opacities": 1.0},
               "fit_steps": 1000, "fit_sh_increase_every": 250, "fit_batch_size": 1},
    "loss": {"l1": 0.8, "dssim": 0.2, "lpips": 0.1, "lpips_from_step": 0, "coarse": 0.1, "alpha_bce": 0.1,
             "offset_hinge": {"weight": 0.0, "max": 3.0}, "scale_hinge": {"weight": 0.0, "max": 3.0},
             "ggo_reg": {"pose": 1000.0, "expression": 10.0},
             "lpips_weights": None},
    "optim": {"lr": {"unets": 1e-3, "neural_mlps": 2e-3, "neural_anchors": 1e-2, "ggo": 1e-4, "enhancer": 1e-3},
              "schedule": "exponential", "final_ratio": 0.1, "max_steps": 3000},
}


class ConfigValueError(InvalidConfigValue):
    """An invalid GraphAvatar config value; the message names the full key (``model.<section>.<key>``)."""


def _merge(defaults: dict, given: dict, prefix: str) -> dict:
    out = copy.deepcopy(defaults)
    for key, value in (given or {}).items():
        if key not in defaults:
            raise ConfigValueError(f"unknown config key {prefix}.{key}; known: {sorted(defaults)}")
        if isinstance(defaults[key], dict):
            if not isinstance(value, dict):
                raise ConfigValueError(f"config value {prefix}.{key} must be a mapping, got {value!r}")
            out[key] = _merge(defaults[key], value, f"{prefix}.{key}")
        else:
            out[key] = value
    return out


def _fail(key: str, value: Any, why: str) -> None:
    raise ConfigValueError(f"invalid config value {key}={value!r}: {why}")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive_ints(key: str, values: Any) -> None:
    if not isinstance(values, (list, tuple)) or not values or \
            not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
        _fail(key, values, "must be a non-empty list of integers >= 1")


def _check(name: str, s: dict, p: str) -> None:
    """Value checks per section (``p`` is the key prefix, e.g. ``model.optim``)."""
    def need(key: str, ok: bool, why: str) -> None:
        if not ok:
            _fail(f"{p}.{key}", _get(s, key), why)

    if name == "hierarchy":
        need("factors", isinstance(s["factors"], (list, tuple)) and len(s["factors"]) >= 1
             and all(_number(f) and f > 1 for f in s["factors"]), "must be a list of numbers > 1")
    elif name == "unet":
        _positive_ints(f"{p}.filters", s["filters"])
        need("K", isinstance(s["K"], int) and s["K"] >= 1, "must be an integer >= 1")
        need("latent", isinstance(s["latent"], int) and s["latent"] >= 1, "must be an integer >= 1")
        need("bottleneck", s["bottleneck"] in ("global", "per_vertex"), "must be 'global' or 'per_vertex'")
        need("num_freqs", isinstance(s["num_freqs"], int) and s["num_freqs"] >= 0, "must be an integer >= 0")
    elif name == "appearance":
        need("sh_degree", s["sh_degree"] in (0, 1, 2, 3), "must be 0, 1, 2 or 3")
        need("opacity_init", _number(s["opacity_init"]) and 0 < s["opacity_init"] < 1, "must be in (0, 1)")
    elif name == "neural_gaussians" and s["enabled"]:
        for key in ("num_offsets", "feature_dim", "hidden_dim"):
            need(key, isinstance(s[key], int) and s[key] >= 1,
                 "must be an integer >= 1 when neural Gaussians are enabled")
    elif name == "ggo" and s["enabled"]:
        need("pose_side", s["pose_side"] in ("left", "right"), "must be 'left' or 'right'")
        need("num_freqs", isinstance(s["num_freqs"], int) and s["num_freqs"] >= 1, "must be an integer >= 1")
        need("num_heads", isinstance(s["num_heads"], int) and s["num_heads"] >= 1, "must be an integer >= 1")
    elif name == "enhancer" and s["enabled"]:
        _positive_ints(f"{p}.channels", s["channels"])
        for key in ("depth_offset", "depth_scale"):
            need(key, s[key] is None or _number(s[key]), "must be a number or null (derived from the data)")
        need("depth_scale", s["depth_scale"] is None or s["depth_scale"] > 0, "must be > 0")
    elif name == "render":
        bg = s["background"]
        need("background", isinstance(bg, (list, tuple)) and len(bg) == 3 and all(_number(c) and 0 <= c <= 1 for c in bg),
             "must be 3 numbers in [0, 1]")
        need("backend", s["backend"] in ("auto", "torch", "gsplat"), "must be auto, torch or gsplat")
    elif name == "warmup":
        need("loss", s["loss"] in ("mse", "l1"), "must be 'mse' or 'l1'")
        for key in ("steps",):
            need(key, isinstance(s[key], int) and s[key] >= 0, "must be an integer >= 0")
        for key in ("batch_size", "log_every", "fit_steps", "fit_sh_increase_every", "fit_batch_size"):
            need(key, isinstance(s[key], int) and s[key] >= 1, "must be an integer >= 1")
        need("lr", _number(s["lr"]) and s["lr"] > 0, "learning rates must be > 0")
        for key, value in s["weights"].items():
            need(f"weights.{key}", _number(value) and value >= 0, "loss weights must be >= 0")
    elif name == "loss":
        for key in ("l1", "dssim", "lpips", "coarse", "alpha_bce"):
            need(key, _number(s[key]) and s[key] >= 0, "loss weights must be >= 0")
        need("lpips_from_step", isinstance(s["lpips_from_step"], int) and s["lpips_from_step"] >= 0,
             "must be an integer >= 0")
        for key in ("pose", "expression"):
            need(f"ggo_reg.{key}", _number(s["ggo_reg"][key]) and s["ggo_reg"][key] >= 0, "must be >= 0")
        for hinge in ("offset_hinge", "scale_hinge"):
            need(f"{hinge}.weight", _number(s[hinge]["weight"]) and s[hinge]["weight"] >= 0, "must be >= 0")
            need(f"{hinge}.max", _number(s[hinge]["max"]) and s[hinge]["max"] > 0, "must be > 0")
    elif name == "optim":
        for key, value in s["lr"].items():
            need(f"lr.{key}", _number(value) and value > 0, "learning rates must be > 0")
        need("schedule", s["schedule"] in ("constant", "exponential", "cosine"),
             "must be constant, exponential or cosine")
        need("final_ratio", _number(s["final_ratio"]) and 0 < s["final_ratio"] <= 1, "must be in (0, 1]")
        need("max_steps", isinstance(s["max_steps"], int) and s["max_steps"] >= 1, "must be an integer >= 1")


def _get(s: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        s = s[part]
    return s


def section(name: str, given: dict | None) -> dict:
    """``DEFAULTS[name]`` updated with ``given`` (recursively) and validated; keys are named
    ``model.<name>.<key>`` in errors."""
    prefix = f"model.{name}"
    merged = _merge(DEFAULTS[name], dict(given or {}), prefix)
    _check(name, merged, prefix)
    return merged
