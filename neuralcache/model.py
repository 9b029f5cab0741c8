"""Neural caching (and its baselines) as one :class:`headkit.engine.Method`.

``variant`` picks what is trained through the shared loop:

========================  ============================================================
``dnr``                   neural texture + DNR U-Net (transposed convolutions)
``dnr_plus``              neural texture + DNR+ (up-convolutions, bottleneck low-pass)
``dnr_plus_plus``         DNR+ fed the current and the previous frame's texture samples
``ours``                  DNR+ G whose last three layers are cached + implicit warp W
``explicit_warp``         DNR+ G + a flow head warping G's cached image (``grid_sample``)
========================  ============================================================

The naive baseline (the previous frame's DNR+ image shown for the current frame) needs no
training: it is a row of the ``dnr_plus`` run's evaluation.

Training (warp variants): a batch is a pair of frames ``(t, t + d)`` of the training split,
``d`` drawn from ``train_warp_distances`` (default ``1..warp_distance``); G renders and caches
frame ``t``, W renders ``t + d`` from the cache, and G, W and the texture are optimised end to
end (:mod:`neuralcache.losses`). DNR++ trains on ``(t - 1, t)``. Batch keys of the earlier frame
carry the prefix ``prev_``.

Inference goes through :mod:`neuralcache.scheduler` workers (:meth:`NeuralCache.make_worker`);
evaluation (the Table-1-style table, online table, warp-distance ablation, FLOPs, latency) is
in :mod:`neuralcache.evaluate`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from headkit.data.dataset import FrameDataset
from headkit.data.subject import Subject
from headkit.engine.method import Method
from headkit.errors import InvalidConfigValue
from headkit.metrics import psnr
from headkit.registry import choose
from neuralcache.generators import DNR, DNRPlus, DNRPlusPlus
from neuralcache.inputs import FrameEncoder, FrameInputs, delayed_gaussian_filter, head_centres
from neuralcache.losses import NeuralCacheLoss
from neuralcache.scheduler import FunctionWorker
from neuralcache.texture import NeuralTexture
from neuralcache.warp import Cache, ExplicitWarp, FrameParams, ImplicitWarp

log = logging.getLogger(__name__)

__all__ = ["NeuralCache", "VARIANTS", "Variant", "WARPS", "WarpKind", "ImplicitWarpKind", "ExplicitWarpKind",
           "build_warp", "CachePipeline"]


@dataclass(frozen=True)
class Variant:
    """How a ``model.variant`` is built: its generator, its warp (a :data:`WARPS` name, None for
    none), its frame inputs, its place in the paper's Table 1 (``table_order``: evaluation rows
    carry an ``order`` from it for scripts/neuralcache_table.py) and the extra evaluation rows it
    adds (:data:`neuralcache.evaluate.EXTRA_ROWS` names)."""

    label: str
    build_generator: Callable[[int, dict], nn.Module]
    warp: str | None = None  # "implicit" | "explicit" | None
    uses_previous_frame: bool = False
    table_order: int = 0
    extra_rows: tuple[str, ...] = ()


def _dnr(D: int, g: dict) -> nn.Module:
    return DNR(in_channels=D, channels=g["channels"], norm=g["norm"])


def _dnr_plus(D: int, g: dict) -> nn.Module:
    return DNRPlus(in_channels=D, channels=g["channels"], lowpass_sigma=g["lowpass_sigma"], norm=g["norm"])


def _dnr_plus_plus(D: int, g: dict) -> nn.Module:
    return DNRPlusPlus(texture_channels=D, num_prev_frames=1, channels=g["channels"],
                       lowpass_sigma=g["lowpass_sigma"], norm=g["norm"])


VARIANTS = {
    "dnr": Variant("DNR", _dnr, table_order=0),
    "dnr_plus": Variant("DNR+", _dnr_plus, table_order=1, extra_rows=("naive",)),
    "dnr_plus_plus": Variant("DNR++", _dnr_plus_plus, uses_previous_frame=True, table_order=3),
    "ours": Variant("Ours", _dnr_plus, warp="implicit", table_order=5),
    "explicit_warp": Variant("ExWarp", _dnr_plus, warp="explicit", table_order=4),
}


class WarpKind(ABC):
    """One kind of warp network W (a :data:`WARPS` entry): how it is built and what its cache
    C_t holds. ``section`` names the model argument (YAML section) holding its options."""

    section: str

    @abstractmethod
    def build(self, feature_channels: dict[int, int], texture_channels: int, sizes: dict[str, int],
              options: dict) -> nn.Module:
        """W for G's ``feature_channels`` (per layer), the texture's channels, the conditioning
        ``sizes`` (``pose_dim``, ``expr_dim``, ``cam_dim``, ``sh_dim``) and its YAML ``options``."""

    @abstractmethod
    def make_cache(self, warp: nn.Module, generated: dict[str, Any], params: FrameParams) -> Cache:
        """The cache W renders from, out of G's outputs (``return_features=True``) on a frame."""


class ImplicitWarpKind(WarpKind):
    """The paper's W (:class:`~neuralcache.warp.ImplicitWarp`, options ``model.warp``): caches
    G's layers ``warp.cached_layers`` (Table 4)."""

    section = "warp"

    def build(self, feature_channels: dict[int, int], texture_channels: int, sizes: dict[str, int],
              options: dict) -> nn.Module:
        return ImplicitWarp(feature_channels=[feature_channels[k] for k in (3, 4, 5)],
                            texture_channels=texture_channels, **sizes, **options)

    def make_cache(self, warp: nn.Module, generated: dict[str, Any], params: FrameParams) -> Cache:
        images = generated["images"] if warp.residual_image else None
        return Cache({k: generated["features"][k] for k in warp.cached_layers}, params, images)


class ExplicitWarpKind(WarpKind):
    """The explicit-warp baseline (:class:`~neuralcache.warp.ExplicitWarp`, options
    ``model.explicit_warp``): caches C3 and G's image, which its flow moves."""

    section = "explicit_warp"

    def build(self, feature_channels: dict[int, int], texture_channels: int, sizes: dict[str, int],
              options: dict) -> nn.Module:
        return ExplicitWarp(c3_channels=feature_channels[3], **sizes, **options)

    def make_cache(self, warp: nn.Module, generated: dict[str, Any], params: FrameParams) -> Cache:
        return Cache({3: generated["features"][3]}, params, generated["images"])


#: ``Variant.warp`` names -> warp kinds; a new warp is a :class:`WarpKind` subclass, an entry here
#: and a variant naming it
WARPS: dict[str, WarpKind] = {"implicit": ImplicitWarpKind(), "explicit": ExplicitWarpKind()}


def build_warp(name: str, feature_channels: dict[int, int], texture_channels: int, sizes: dict[str, int],
               sections: dict[str, dict | None], key: str = "model.variant") -> tuple[WarpKind, nn.Module]:
    """The :data:`WARPS` kind ``name`` and its network, with the options of its section in
    ``sections`` (``{"warp": ..., "explicit_warp": ...}``). Unknown names and unknown option keys
    are errors naming ``key`` or the section."""
    kind = choose(WARPS, name, key)
    try:
        return kind, kind.build(feature_channels, texture_channels, sizes, dict(sections.get(kind.section) or {}))
    except TypeError as exc:  # an unknown key in the YAML
        raise InvalidConfigValue(f"model.{kind.section}: {exc}") from exc


GENERATOR_DEFAULTS = {"channels": (16, 32, 64, 128, 256), "lowpass_sigma": 1.0, "norm": "instance"}
TEXTURE_DEFAULTS = {"num_channels": 16, "resolution": 256, "num_levels": 4, "view_sh": True,
                    "sh_degree": 2, "sh_channel_start": 3, "init_std": 0.1}
OPTIM_DEFAULTS = {"lr": 1e-4, "texture_lr": 1e-3, "betas": (0.9, 0.999), "gamma": 1.0}


def _merged(defaults: dict, given: dict | None, key: str) -> dict:
    unknown = sorted(set(given or {}) - set(defaults))
    if unknown:
        raise InvalidConfigValue(f"unknown config key(s) {', '.join(f'model.{key}.{k}' for k in unknown)}; "
                         f"expected some of {sorted(defaults)}")
    return {**defaults, **(given or {})}


def _prefixed(batch: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in batch.items() if k.startswith(prefix)}


class NeuralCache(Method):
    """Neural texture + DNR-family generator (+ cache and warp); see the module docstring.

    Args:
        subject: the training subject (template UVs, image size, expression size).
        variant: ``dnr | dnr_plus | dnr_plus_plus | ours | explicit_warp``.
        warp_distance: ``k``, frames warped per cache at inference (1x, 2x, ...).
        train_warp_distances: warp distances sampled for training pairs; None = ``1..k``.
        texture: :class:`~neuralcache.texture.NeuralTexture` arguments.
        generator: ``channels``, ``lowpass_sigma`` (DNR+/DNR++ only), ``norm``.
        warp: :class:`~neuralcache.warp.ImplicitWarp` arguments besides the sizes that come
            from the data and G (Table 3 toggles ``use_*``/``modulate_skips``; Table 4
            ``cached_layers``).
        explicit_warp: :class:`~neuralcache.warp.ExplicitWarp` arguments (``hidden_channels``, ...).
        inputs: ``uv_source`` and ``stabilize`` (:class:`~neuralcache.inputs.StabilizationConfig`).
        loss: :class:`~neuralcache.losses.NeuralCacheLoss` arguments.
        optim: ``lr`` (G and W; 1e-4 in the paper), ``texture_lr`` (1e-3), Adam ``betas``,
            ``gamma`` (per-step exponential decay; 1 = constant).
        evaluation: options of :func:`neuralcache.evaluate.evaluate_neural_cache`.
        cache_uv_maps: keep rasterized UV maps of seen frames in memory (training speed; the
            tracked meshes never change during training).
        standardize_warp_inputs: standardise W's θ, p, e, h and their deltas with statistics
            of the training frames (stored in W's buffers). The paper does not say; consecutive
            deltas are ~30x smaller than the values and Δh multiplies features, so raw inputs
            leave the warp nearly blind to motion.
    """

    def __init__(self, subject: Subject, variant: str = "ours", warp_distance: int = 1,
                 train_warp_distances: list[int] | None = None, texture: dict | None = None,
                 generator: dict | None = None, warp: dict | None = None,
                 explicit_warp: dict | None = None, inputs: dict | None = None, loss: dict | None = None,
                 optim: dict | None = None, evaluation: dict | None = None, cache_uv_maps: bool = True,
                 standardize_warp_inputs: bool = True) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise InvalidConfigValue(f"invalid config value model.variant={variant!r}; expected one of {sorted(VARIANTS)}")
        if int(warp_distance) < 1:
            raise InvalidConfigValue(f"invalid config value model.warp_distance={warp_distance} (must be >= 1)")
        self.variant, self.spec = variant, VARIANTS[variant]
        self.warp_distance = int(warp_distance)
        self.train_warp_distances = [int(d) for d in (train_warp_distances or range(1, self.warp_distance + 1))]
        if min(self.train_warp_distances) < 1:
            raise InvalidConfigValue(f"invalid config value model.train_warp_distances={train_warp_distances} (each >= 1)")
        self.expression_dim = subject.expression_dim
        self.optim = _merged(OPTIM_DEFAULTS, optim, "optim")
        for key in ("lr", "texture_lr"):
            if not self.optim[key] > 0:
                raise InvalidConfigValue(f"invalid config value model.optim.{key}={self.optim[key]} (must be > 0)")
        self.evaluation = dict(evaluation or {})
        self.cache_uv_maps = cache_uv_maps

        inputs = dict(inputs or {})
        self.encoder = FrameEncoder(subject, uv_source=inputs.pop("uv_source", "template"),
                                    stabilize=inputs.pop("stabilize", None))
        if inputs:
            raise InvalidConfigValue(f"unknown config key(s) {', '.join('model.inputs.' + k for k in inputs)}")
        if self.encoder.uv_how != "template":
            log.info("texture coordinates: %s", self.encoder.uv_how)
        tex = _merged(TEXTURE_DEFAULTS, texture, "texture")
        self.texture = NeuralTexture(**tex)
        gen = _merged(GENERATOR_DEFAULTS, generator, "generator")
        self.generator = self.spec.build_generator(tex["num_channels"], gen)
        sizes = {"pose_dim": 3, "expr_dim": subject.expression_dim, "cam_dim": 3, "sh_dim": 9}
        self.warp_kind: WarpKind | None = None
        self.warp = None
        if self.spec.warp is not None:
            self.warp_kind, self.warp = build_warp(
                self.spec.warp, self.generator.feature_channels, tex["num_channels"], sizes,
                {"warp": warp, "explicit_warp": explicit_warp}, key=f"VARIANTS[{variant!r}].warp")
        self.loss = NeuralCacheLoss(**(loss or {}))
        self._uv_memo: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}
        self._tracks: dict[int, dict[str, Tensor]] = {}
        if self.warp is not None and standardize_warp_inputs:
            stats = self.encoder.conditioning_statistics(subject)
            stats["uvs"] = (torch.zeros(2), torch.ones(2), self.uv_delta_rms(subject))
            self.warp.set_input_statistics(stats)

    # ------------------------------------------------------------------ data
    def track(self, subject: Subject) -> dict[str, Tensor]:
        """Head poses and (smoothed) head centres of ``subject``'s frames, computed once."""
        key = id(subject)
        if key not in self._tracks:
            self._tracks[key] = self.encoder.track(subject)
        return self._tracks[key]

    def frame_batch(self, dataset: FrameDataset, positions: Iterable[int],
                    device: torch.device | str) -> dict[str, Tensor]:
        """``dataset.batch`` plus the head track (``head_pose`` from the track, so sources without
        poses get fitted ones; ``head_centre``) and, if enabled, memoised UV maps."""
        positions = [int(p) for p in positions]
        batch = dataset.batch(positions, device)
        track = self.track(dataset.subject)
        ids = torch.as_tensor(dataset.frame_ids[positions])
        batch["head_pose"] = track["head_pose"][ids].to(device)
        batch["head_centre"] = track["head_centre"][ids].to(device)
        if self.cache_uv_maps:
            key = id(dataset.subject)
            todo = [i for i, f in enumerate(ids.tolist()) if (key, f) not in self._uv_memo]
            if todo:
                with torch.no_grad():
                    uvs, masks = self.encoder.uv_maps({k: v[todo] for k, v in batch.items()})
                for j, i in enumerate(todo):
                    self._uv_memo[(key, int(ids[i]))] = (uvs[j].cpu(), masks[j].cpu())
            pairs = [self._uv_memo[(key, int(f))] for f in ids.tolist()]
            batch["uv_map"] = torch.stack([p[0] for p in pairs]).to(device)
            batch["uv_mask"] = torch.stack([p[1] for p in pairs]).to(device)
        return batch

    def sample_train_batch(self, dataset: FrameDataset, step: int, batch_size: int,
                           device: torch.device) -> dict[str, Tensor]:
        """Random frames; for DNR++ and the warp variants, pairs ``(t - d, t)`` with the earlier
        frame's keys prefixed ``prev_`` (one ``d`` per batch, global torch RNG: resumable)."""
        if not (self.spec.uses_previous_frame or self.spec.warp):
            return self.frame_batch(dataset, torch.randint(len(dataset), (batch_size,)).tolist(), device)
        if self.spec.warp:
            d = self.train_warp_distances[int(torch.randint(len(self.train_warp_distances), ()))]
        else:
            d = 1
        ids = dataset.frame_ids
        valid = np.flatnonzero(ids[d:] - ids[:-d] == d) + d if len(ids) > d else np.empty(0, np.int64)
        if valid.size == 0:
            raise ValueError(f"the {dataset.split} split of '{dataset.subject.name}' has no frame pairs "
                             f"{d} frames apart (model.train_warp_distances={self.train_warp_distances})")
        targets = valid[torch.randint(valid.size, (batch_size,)).numpy()]
        batch = self.frame_batch(dataset, targets, device)
        batch.update({f"prev_{k}": v for k, v in self.frame_batch(dataset, targets - d, device).items()})
        batch["warp_distance"] = torch.full((batch_size,), d, device=device)
        return batch

    @torch.no_grad()
    def uv_delta_rms(self, subject: Subject, max_pairs: int = 64) -> Tensor:
        """RMS ``[2]`` of ``U_{t+1} - U_t`` over pixels the face covers in both frames, for up to
        ``max_pairs`` evenly spaced pairs of consecutive training frames (ones if none)."""
        dataset = FrameDataset(subject, "train")
        ids = dataset.frame_ids
        starts = np.flatnonzero(ids[1:] - ids[:-1] == 1)
        if starts.size == 0:
            return torch.ones(2)
        starts = starts[np.linspace(0, starts.size - 1, min(max_pairs, starts.size)).round().astype(int)]
        total, count = torch.zeros(2, dtype=torch.float64), 0
        for i in np.unique(starts):
            b = self.frame_batch(dataset, [int(i), int(i) + 1], "cpu")
            uvs, masks = (b["uv_map"], b["uv_mask"]) if "uv_map" in b else self.encoder.uv_maps(b)
            both = masks[0].bool() & masks[1].bool()
            d = (uvs[1] - uvs[0])[both].double()
            total += d.square().sum(0)
            count += d.shape[0]
        return (total / count).sqrt().float() if count else torch.ones(2)

    # ------------------------------------------------------------------ networks
    def pipeline(self) -> "CachePipeline":
        """This model's texture, G and W as a :class:`CachePipeline` (no copy)."""
        return CachePipeline(self.variant, self.spec, self.warp_kind, self.texture, self.generator, self.warp)

    def sample_texture(self, inputs: FrameInputs) -> Tensor:
        """:meth:`CachePipeline.sample_texture` with this model's networks."""
        return self.pipeline().sample_texture(inputs)

    def generate(self, inputs: FrameInputs, prev: FrameInputs | None = None,
                 return_features: bool = False) -> dict[str, Any]:
        """:meth:`CachePipeline.generate` with this model's networks."""
        return self.pipeline().generate(inputs, prev, return_features)

    def make_cache(self, inputs: FrameInputs, prev: FrameInputs | None = None) -> tuple[dict[str, Any], Cache]:
        """:meth:`CachePipeline.make_cache` with this model's networks."""
        return self.pipeline().make_cache(inputs, prev)

    def warp_frame(self, cache: Cache, inputs: FrameInputs) -> Tensor:
        """:meth:`CachePipeline.warp_frame` with this model's networks."""
        return self.pipeline().warp_frame(cache, inputs)

    # ------------------------------------------------------------------ Method interface
    def get_outputs(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Image of the batch's frame; warp variants render it from the cache of ``prev_*``
        (the frame itself when the batch has no ``prev_`` keys), DNR++ uses ``prev_*`` as
        its previous frame. Also returns the targets in the (stabilised) camera."""
        cur = self.encoder(batch)
        prev_batch = _prefixed(batch, "prev_")
        prev = self.encoder(prev_batch) if prev_batch else None
        if self.warp is None:
            out = self.generate(cur, prev)
            return {"image": out["images"], "textures": out["textures"], "target": cur.images,
                    "uv_mask": cur.params.masks}
        src = prev if prev is not None else cur
        g, cache = self.make_cache(src)
        return {"image": self.warp_frame(cache, cur), "target": cur.images, "source_image": g["images"],
                "source_target": src.images, "textures": g["textures"], "uv_mask": src.params.masks}

    def get_loss_dict(self, outputs: dict[str, Tensor], batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        """Eq. (4) for the baselines; the warp objective for the cache + warp variants."""
        if self.warp is None:
            return self.loss(outputs["image"], outputs["target"], outputs["textures"], outputs["target"],
                             outputs["uv_mask"])
        return self.loss(outputs["image"], outputs["target"], outputs["textures"], outputs["source_target"],
                         outputs["uv_mask"], current_images=outputs["source_image"],
                         current_targets=outputs["source_target"])

    @torch.no_grad()
    def get_metrics_dict(self, outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> dict[str, float]:
        """Training PSNR against the (stabilised) target; G's PSNR too for warp variants."""
        metrics = {"psnr": psnr(outputs["image"].clamp(0, 1), outputs["target"]).mean().item()}
        if "source_image" in outputs:
            metrics["psnr_generator"] = psnr(outputs["source_image"].clamp(0, 1), outputs["source_target"]).mean().item()
        return metrics

    def configure_optimizers(self) -> tuple[torch.optim.Optimizer, Any]:
        """Adam: the texture at ``texture_lr``, G and W at ``lr`` (paper: 1e-3 / 1e-4)."""
        o = self.optim
        nets = list(self.generator.parameters()) + (list(self.warp.parameters()) if self.warp is not None else [])
        optimizer = torch.optim.Adam([{"params": list(self.texture.parameters()), "lr": o["texture_lr"]},
                                      {"params": nets, "lr": o["lr"]}], betas=tuple(o["betas"]))
        scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, o["gamma"]) if o["gamma"] < 1 else None
        return optimizer, scheduler

    @torch.no_grad()
    def render_eval(self, batch: dict[str, Tensor]) -> Tensor:
        """The image shown for a batch, ``[B, H, W, 3]`` in the stabilised camera."""
        return self.get_outputs(batch)["image"].clamp(0, 1)

    @torch.no_grad()
    def render_sequence(self, frames: Iterable[dict[str, Tensor]]) -> Iterator[Tensor]:
        """Render a stream of single-frame batches in order as deployed: warp variants cache
        every ``warp_distance``-th frame and warp every frame from the latest cache (one
        worker, the online schedule of :mod:`neuralcache.scheduler`); baselines run G."""
        from neuralcache.scheduler import SequentialRenderer
        device = str(next(self.parameters()).device)
        k, schedule = (self.warp_distance, "algorithm1") if self.warp is not None else (0, "cache_first")
        with SequentialRenderer(device, self.make_worker, warp_distance=k, schedule=schedule) as r:
            for _, images in r.run(self.encode_stream(self._stabilized(frames))):
                yield images.clamp(0, 1)

    def _stabilized(self, frames: Iterable[dict[str, Tensor]]) -> Iterator[dict[str, Tensor]]:
        """Add the online (causal) smoothed ``head_centre`` to frames that lack one."""
        cfg, history = self.encoder.stabilize, []
        for batch in frames:
            if cfg.smooth and "head_centre" not in batch:
                history = (history + [head_centres(batch["head_pose"], self.encoder.centroid)[0]])[-cfg.filter_size:]
                smoothed = delayed_gaussian_filter(torch.stack(history), cfg.filter_size, cfg.filter_sigma)[-1:]
                batch = {**batch, "head_centre": smoothed}
            yield batch

    @torch.no_grad()
    def encode_stream(self, frames: Iterable[dict[str, Tensor]]) -> Iterator[dict[str, Any]]:
        """Scheduler frames ``{"inputs", "prev"}`` of consecutive batches (``prev``: the previous
        frame's inputs, which DNR++ consumes; the first frame is its own predecessor)."""
        prev = None
        for batch in frames:
            cur = self.encoder(batch)
            yield {"inputs": cur, "prev": prev if prev is not None else cur}
            prev = cur

    def make_worker(self, device: str) -> FunctionWorker:
        """A scheduler worker on ``device`` holding its own copy of texture, G and W (the cache
        never leaves the device; CUDA work is synchronised before an output is returned)."""
        dev = torch.device(device)
        nets = copy.deepcopy(nn.ModuleDict({"texture": self.texture, "generator": self.generator,
                                            **({"warp": self.warp} if self.warp is not None else {})}))
        nets = nets.to(dev).eval()
        twin = CachePipeline(self.variant, self.spec, self.warp_kind, nets["texture"], nets["generator"],
                             nets["warp"] if "warp" in nets else None)

        # Its own CUDA stream, so two workers on one GPU can overlap; a worker waits for its own
        # stream only (the scheduler's timing then covers exactly this worker's work).
        stream = torch.cuda.Stream(dev) if dev.type == "cuda" else None

        def on_stream():
            return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()

        def sync() -> None:
            if stream is not None:
                stream.synchronize()

        @torch.no_grad()
        def cache_fn(frame: dict[str, Any]) -> tuple[Tensor, Cache | None]:
            with on_stream():
                inputs, prev = frame["inputs"].to(dev), frame["prev"].to(dev)
                if self.warp is None:
                    images = twin.generate(inputs, prev)["images"]
                    sync()
                    return images, None
                out, cache = twin.make_cache(inputs)
            sync()
            return out["images"], cache

        @torch.no_grad()
        def warp_fn(cache: Cache, frame: dict[str, Any]) -> Tensor:
            with on_stream():
                images = twin.warp_frame(cache, frame["inputs"].to(dev))
            sync()
            return images

        return FunctionWorker(cache_fn, warp_fn)

    def evaluate(self, dataset: FrameDataset, run_dir: Path, **kwargs) -> dict[str, Any]:
        """Table-1-style evaluation on the test split (see :mod:`neuralcache.evaluate`)."""
        from neuralcache.evaluate import evaluate_neural_cache
        return evaluate_neural_cache(self, dataset, run_dir, **{**self.evaluation, **kwargs})


class CachePipeline:
    """What renders frames at deployment: the neural texture, G and W of one variant. The model
    delegates to one over its own networks; each scheduler worker holds one over its own copy
    (:meth:`NeuralCache.make_worker`)."""

    def __init__(self, variant: str, spec: Variant, warp_kind: WarpKind | None, texture: nn.Module,
                 generator: nn.Module, warp: nn.Module | None) -> None:
        self.variant, self.spec, self.warp_kind = variant, spec, warp_kind
        self.texture, self.generator, self.warp = texture, generator, warp

    def sample_texture(self, inputs: FrameInputs) -> Tensor:
        """Neural texture sampled by the UV map, SH view encoding applied: ``[B, D, H, W]``."""
        return self.texture(inputs.params.uvs, inputs.params.masks, inputs.view_dirs)

    def generate(self, inputs: FrameInputs, prev: FrameInputs | None = None,
                 return_features: bool = False) -> dict[str, Any]:
        """G on a frame (DNR++: and on its predecessor ``prev``, the frame itself if None).
        Returns G's dict plus ``"textures"`` (the current frame's texture sample)."""
        textures = self.sample_texture(inputs)
        if self.spec.uses_previous_frame:
            prev_textures = textures if prev is None else self.sample_texture(prev)
            out = self.generator(textures, prev_textures, return_features=return_features)
        else:
            out = self.generator(textures, return_features=return_features)
        return {**out, "textures": textures}

    def make_cache(self, inputs: FrameInputs, prev: FrameInputs | None = None) -> tuple[dict[str, Any], Cache]:
        """Run G on a frame and build its cache C_t (eq. 1). Returns ``(G outputs, cache)``."""
        out = self.generate(inputs, prev, return_features=True)
        if self.warp_kind is None:  # a baseline: nothing warps from it; G's C3 as the cache
            return out, Cache({3: out["features"][3]}, inputs.params, None)
        return out, self.warp_kind.make_cache(self.warp, out, inputs.params)

    def warp_frame(self, cache: Cache, inputs: FrameInputs) -> Tensor:
        """W: the image ``[B, H, W, 3]`` of a new frame rendered from a cache."""
        if self.warp is None:
            raise RuntimeError(f"variant {self.variant!r} has no warp network")
        if getattr(self.warp, "use_texture", False):  # Table 3's "ExWarp" input
            return self.warp(cache, inputs.params, textures=self.sample_texture(inputs))["images"]
        return self.warp(cache, inputs.params)["images"]
