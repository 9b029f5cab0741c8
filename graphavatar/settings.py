"""GraphAvatar's configuration sections: defaults, merging and validation with named keys.

Each constructor argument of :class:`graphavatar.model.GraphAvatar` is a section of
``configs/model/graphavatar.yaml`` (a plain dict after Hydra). That file is the one source of
the defaults (:func:`defaults`): :func:`section` merges the given values over its section and
rejects unknown keys and invalid values with the full config key in the message
(``model.optim.lr.unets``), as RELIABILITY.md asks. The defaults are the CPU-sized
synthetic-subject settings; ``experiment=insta_subject`` holds the paper's.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from headkit.encodings import FREQUENCY_SPACINGS
from headkit.errors import InvalidConfigValue
from headkit.render.gaussians import BACKENDS

from .enhancer import PRECISIONS
from .ggo import POSE_SIDES, TEST_TIMES
from .graph_unet import HEAD_INITS
from .losses import GGO_REG_TARGETS
from .schedules import LR_SCHEDULES

from .warmup import ANCHOR_LOSSES

__all__ = ["CONFIG_DIR", "MODEL_CONFIG", "NOT_SECTIONS", "defaults", "ConfigValueError", "section"]

#: the project's Hydra configs (the package is installed editable from the repository)
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
MODEL_CONFIG = CONFIG_DIR / "model" / "graphavatar.yaml"
#: top-level keys of the model config that are not sections
NOT_SECTIONS = ("_target_", "expression_dim", "input_space")


def defaults() -> dict[str, dict[str, Any]]:
    """The sections of ``configs/model/graphavatar.yaml`` as plain dicts.

    A value the file takes from another config group (``${trainer.max_steps}``,
    ``${paths.data_dir}/...``) is resolved against that group's ``configs/<group>/default.yaml``,
    as in the composed default config; a model built through Hydra gets every key given. The one
    exception is ``hierarchy.cache_dir``: a model built without a run's config (tests, notebooks)
    knows no data folder, so it caches nothing rather than writing into the working directory.
    """
    if not MODEL_CONFIG.is_file():
        raise FileNotFoundError(f"{MODEL_CONFIG} not found: GraphAvatar's defaults are read from the repository's "
                                f"configs/ (install the package editable: pip install -e .)")
    groups = {path.parent.name: OmegaConf.load(path) for path in sorted(CONFIG_DIR.glob("*/default.yaml"))}
    root = OmegaConf.create({"model": OmegaConf.load(MODEL_CONFIG), **groups})
    model = OmegaConf.to_container(root.model, resolve=True)
    model["hierarchy"]["cache_dir"] = None
    return {name: value for name, value in model.items() if name not in NOT_SECTIONS}


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
        need("head_init", s["head_init"] in HEAD_INITS, "must be 'zero' or 'default'")
    elif name == "appearance":
        need("sh_degree", s["sh_degree"] in (0, 1, 2, 3), "must be 0, 1, 2 or 3")
        need("opacity_init", _number(s["opacity_init"]) and 0 < s["opacity_init"] < 1, "must be in (0, 1)")
    elif name == "neural_gaussians" and s["enabled"]:
        for key in ("num_offsets", "feature_dim", "hidden_dim"):
            need(key, isinstance(s[key], int) and s[key] >= 1,
                 "must be an integer >= 1 when neural Gaussians are enabled")
    elif name == "ggo" and s["enabled"]:
        need("pose_side", s["pose_side"] in POSE_SIDES, f"must be one of {', '.join(POSE_SIDES)}")
        need("num_freqs", isinstance(s["num_freqs"], int) and s["num_freqs"] >= 1, "must be an integer >= 1")
        need("frequency_spacing", s["frequency_spacing"] in FREQUENCY_SPACINGS,
             f"must be one of {', '.join(FREQUENCY_SPACINGS)}")
        need("num_heads", isinstance(s["num_heads"], int) and s["num_heads"] >= 1, "must be an integer >= 1")
        need("shared_momentum", _number(s["shared_momentum"]) and 0 <= s["shared_momentum"] < 1, "must be in [0, 1)")
        need("static_avatar_steps", isinstance(s["static_avatar_steps"], int) and s["static_avatar_steps"] >= 0,
             "must be an integer >= 0")
        need("rounds", isinstance(s["rounds"], int) and s["rounds"] >= 1, "must be an integer >= 1")
        need("test_time", s["test_time"] in TEST_TIMES, f"must be one of {', '.join(TEST_TIMES)}")
    elif name == "enhancer" and s["enabled"]:
        _positive_ints(f"{p}.channels", s["channels"])
        for key in ("depth_offset", "depth_scale"):
            need(key, s[key] is None or _number(s[key]), "must be a number or null (derived from the data)")
        need("depth_scale", s["depth_scale"] is None or s["depth_scale"] > 0, "must be > 0")
        need("precision", s["precision"] in PRECISIONS, f"must be one of {', '.join(PRECISIONS)}")
    elif name == "render":
        bg = s["background"]
        need("background", isinstance(bg, (list, tuple)) and len(bg) == 3 and all(_number(c) and 0 <= c <= 1 for c in bg),
             "must be 3 numbers in [0, 1]")
        need("backend", s["backend"] in BACKENDS, f"must be one of {', '.join(BACKENDS)}")
    elif name == "warmup":
        need("loss", isinstance(s["loss"], str) and s["loss"] in ANCHOR_LOSSES,
             f"must be one of {', '.join(map(repr, ANCHOR_LOSSES))}")
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
        need("ggo_reg.target", s["ggo_reg"]["target"] in GGO_REG_TARGETS,
             f"must be one of {', '.join(GGO_REG_TARGETS)}")
        for hinge in ("offset_hinge", "scale_hinge"):
            need(f"{hinge}.weight", _number(s[hinge]["weight"]) and s[hinge]["weight"] >= 0, "must be >= 0")
            need(f"{hinge}.max", _number(s[hinge]["max"]) and s[hinge]["max"] > 0, "must be > 0")
    elif name == "optim":
        for key, value in s["lr"].items():
            need(f"lr.{key}", _number(value) and value > 0, "learning rates must be > 0")
        need("schedule", s["schedule"] in LR_SCHEDULES,
             f"must be one of {sorted(LR_SCHEDULES)}")
        need("final_ratio", _number(s["final_ratio"]) and 0 < s["final_ratio"] <= 1, "must be in (0, 1]")
        need("max_steps", isinstance(s["max_steps"], int) and s["max_steps"] >= 1, "must be an integer >= 1")


def _get(s: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        s = s[part]
    return s


def section(name: str, given: dict | None, sections: dict[str, dict] | None = None) -> dict:
    """The default section ``name`` (from ``sections``, else :func:`defaults`) updated with
    ``given`` (recursively) and validated; keys are named ``model.<name>.<key>`` in errors."""
    prefix = f"model.{name}"
    merged = _merge((sections or defaults())[name], dict(given or {}), prefix)
    _check(name, merged, prefix)
    return merged
