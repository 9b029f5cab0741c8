"""LPIPS (AlexNet, v0.1) in plain torch, without torchvision.

The ``lpips`` package imports torchvision, which has no CPU build for the torch this project
pins, so the network is rebuilt here with the same arithmetic as ``lpips.LPIPS(net='alex',
version='0.1')`` called with ``normalize=True``:

    x' = (2 x - 1 - shift) / scale                      (lpips' ScalingLayer)
    f_l = relu_l(AlexNet(x'))                           l = 1..5
    f̂_l = f_l / (||f_l||_channels + 1e-10)              (unit-normalise channels)
    d = sum_l mean_{h,w} ( w_l · (f̂_l(x) - f̂_l(y))² )   (w_l: 1x1 conv, no bias)

Two weight files are needed and neither is shipped or downloaded by this project:

* the AlexNet backbone, torchvision's ``alexnet-owt-7be5be79.pth``: an explicit path, else
  ``$HEADKIT_ALEXNET_WEIGHTS``, else ``torch.hub.get_dir()/checkpoints/alexnet-owt-7be5be79.pth``;
* the five linear layers, ``lpips/weights/v0.1/alex.pth`` inside the installed lpips wheel
  (found with ``importlib.util.find_spec`` so that lpips, and with it torchvision, is never
  imported), or an explicit path / ``$HEADKIT_LPIPS_LIN_WEIGHTS``.

When either is missing the metric is *unavailable*: :func:`lpips_available` says why and
:func:`load_lpips` raises :class:`MetricUnavailable`; it never quietly returns 0.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from torch import Tensor, nn

ALEXNET_FILENAME = "alexnet-owt-7be5be79.pth"
ALEXNET_URL = "https://download.pytorch.org/models/" + ALEXNET_FILENAME
ALEXNET_ENV = "HEADKIT_ALEXNET_WEIGHTS"
LIN_ENV = "HEADKIT_LPIPS_LIN_WEIGHTS"
ALEX_CHANNELS = (64, 192, 384, 256, 256)
# Smallest side AlexNet's three 3x3/2 max-pools accept: conv1 must give >= 7 pixels.
MIN_LPIPS_SIZE = 31


class MetricUnavailable(RuntimeError):
    """A metric cannot be computed here (e.g. missing weights); ``reason`` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def default_alexnet_path() -> Path:
    """Backbone weights path: ``$HEADKIT_ALEXNET_WEIGHTS`` if set, else the torch hub cache."""
    env = os.environ.get(ALEXNET_ENV)
    if env:
        return Path(env).expanduser()
    return Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_FILENAME


def default_lin_path() -> Path | None:
    """Linear-layer weights: ``$HEADKIT_LPIPS_LIN_WEIGHTS``, else inside the lpips wheel.

    Returns None when the lpips package is not installed (and no env var is set).
    """
    env = os.environ.get(LIN_ENV)
    if env:
        return Path(env).expanduser()
    spec = importlib.util.find_spec("lpips")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "weights" / "v0.1" / "alex.pth"


def lpips_available(alexnet_path: str | os.PathLike | None = None,
                    lin_path: str | os.PathLike | None = None) -> tuple[bool, str]:
    """Whether both LPIPS weight files exist; returns ``(ok, reason)`` (reason is "" if ok).

    Only checks that the files exist; a file that exists but does not load is reported by
    :func:`load_lpips` as :class:`MetricUnavailable`.
    """
    backbone = Path(alexnet_path) if alexnet_path is not None else default_alexnet_path()
    lin = Path(lin_path) if lin_path is not None else default_lin_path()
    if lin is None:
        return False, ("LPIPS linear-layer weights not found: the lpips package is not installed "
                       f"(pip install lpips) and ${LIN_ENV} is not set")
    if not lin.is_file():
        return False, f"LPIPS linear-layer weights not found at {lin}"
    if not backbone.is_file():
        return False, (f"AlexNet backbone weights for LPIPS not found at {backbone}; download "
                       f"{ALEXNET_URL} to that path or set ${ALEXNET_ENV}")
    return True, ""


class AlexNetFeatures(nn.Module):
    """torchvision's ``alexnet().features`` layer for layer, returning LPIPS' five ReLU taps.

    ``self.features`` has torchvision's indices, so ``state_dict()`` keys are
    ``features.0.weight`` ... ``features.10.bias``, as in ``alexnet-owt-7be5be79.pth``.
    """

    # Index (exclusive end) in ``features`` of the layer after each tapped ReLU (lpips' slices).
    TAPS = (2, 5, 8, 10, 12)

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )

    def reset_parameters(self) -> None:
        """Re-initialise the convolutions with torch's default init."""
        for layer in self.features:
            if isinstance(layer, nn.Conv2d):
                layer.reset_parameters()

    def forward(self, images: Tensor) -> list[Tensor]:  # images: [B, 3, H, W]
        """Return the ReLU outputs ``relu1..relu5`` (``[B, C_l, H_l, W_l]``)."""
        taps, h, start = [], images, 0
        for end in self.TAPS:
            for layer in self.features[start:end]:
                h = layer(h)
            taps.append(h)
            start = end
        return taps


class LPIPSAlex(nn.Module):
    """LPIPS v0.1 with the AlexNet trunk; inputs channels-last in [0, 1], output ``[B]``.

    Equals ``lpips.LPIPS(net='alex', version='0.1')(x, y, normalize=True)`` given the same
    weights. Parameters are frozen (``requires_grad=False``) but gradients flow to the
    images, so it also serves as a perceptual loss.
    """

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.net = AlexNetFeatures()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in ALEX_CHANNELS)
        self.requires_grad_(False)
        self.eval()

    def load_weights(self, backbone_state: dict, lin_state: dict) -> None:
        """Load torchvision AlexNet keys (``features.*``; ``classifier.*`` ignored) and lpips'
        ``lin{k}.model.1.weight`` keys; raises ValueError naming missing or misshapen keys."""
        features = {k: v for k, v in backbone_state.items() if k.startswith("features.")}
        self._load_checked(self.net, features, "AlexNet backbone")
        lins = {}
        for k in range(len(ALEX_CHANNELS)):
            for key in (f"lin{k}.model.1.weight", f"lin{k}.model.0.weight"):  # with/without dropout
                if key in lin_state:
                    lins[f"{k}.weight"] = lin_state[key]
        self._load_checked(self.lins, lins, "LPIPS linear layers")

    @staticmethod
    def _load_checked(module: nn.Module, state: dict, what: str) -> None:
        own = module.state_dict()
        missing = sorted(set(own) - set(state))
        if missing:
            raise ValueError(f"{what}: weights lack keys {missing}")
        for key, value in state.items():
            if tuple(value.shape) != tuple(own[key].shape):
                raise ValueError(f"{what}: '{key}' has shape {tuple(value.shape)}, "
                                 f"expected {tuple(own[key].shape)}")
        module.load_state_dict(state, strict=True)

    def forward(self, preds: Tensor, targets: Tensor) -> Tensor:  # [B, H, W, 3] each
        """LPIPS distance per image pair, ``[B]``."""
        if preds.shape != targets.shape or preds.ndim != 4 or preds.shape[-1] != 3:
            raise ValueError(f"LPIPS expects two [B, H, W, 3] images of equal shape, got "
                             f"{tuple(preds.shape)} and {tuple(targets.shape)}")
        if min(preds.shape[1:3]) < MIN_LPIPS_SIZE:
            raise ValueError(f"LPIPS (AlexNet) needs images at least {MIN_LPIPS_SIZE} pixels on "
                             f"each side, got {tuple(preds.shape[1:3])}")
        feats = []
        for images in (preds, targets):
            x = images.permute(0, 3, 1, 2).to(self.scale.dtype)
            x = ((2.0 * x - 1.0) - self.shift) / self.scale
            feats.append(self.net(x))
        total = 0.0
        for lin, f0, f1 in zip(self.lins, *feats):
            f0 = f0 / (f0.square().sum(dim=1, keepdim=True).sqrt() + 1e-10)
            f1 = f1 / (f1.square().sum(dim=1, keepdim=True).sqrt() + 1e-10)
            total = total + lin((f0 - f1).square()).mean(dim=(1, 2, 3))
        return total


def load_lpips(alexnet_path: str | os.PathLike | None = None,
               lin_path: str | os.PathLike | None = None,
               device: torch.device | str = "cpu") -> LPIPSAlex:
    """Build :class:`LPIPSAlex` with both weight files loaded, on ``device``.

    Raises:
        MetricUnavailable: a weight file is missing or does not load; ``reason`` names it.
    """
    ok, reason = lpips_available(alexnet_path, lin_path)
    if not ok:
        raise MetricUnavailable(reason)
    backbone = Path(alexnet_path) if alexnet_path is not None else default_alexnet_path()
    lin = Path(lin_path) if lin_path is not None else default_lin_path()
    states = []
    for path in (backbone, lin):
        try:
            states.append(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as exc:  # any unreadable file makes the metric unavailable
            raise MetricUnavailable(f"cannot load LPIPS weights {path}: {exc}") from exc
    net = LPIPSAlex()
    try:
        net.load_weights(*states)
    except ValueError as exc:
        raise MetricUnavailable(f"LPIPS weights {backbone} / {lin} do not fit: {exc}") from exc
    return net.to(device)


_CACHE: dict[tuple, LPIPSAlex] = {}


def get_lpips(device: torch.device | str = "cpu",
              alexnet_path: str | os.PathLike | None = None,
              lin_path: str | os.PathLike | None = None) -> LPIPSAlex:
    """Cached :func:`load_lpips`: one network per (device, resolved weight paths).

    Paths are resolved at call time, so changing ``$HEADKIT_ALEXNET_WEIGHTS`` takes effect.
    """
    backbone = Path(alexnet_path) if alexnet_path is not None else default_alexnet_path()
    lin = Path(lin_path) if lin_path is not None else default_lin_path()
    key = (str(torch.device(device)), str(backbone), str(lin))
    if key not in _CACHE:
        _CACHE[key] = load_lpips(backbone, lin, device)
    return _CACHE[key]


def clear_lpips_cache() -> None:
    """Drop the cached networks (e.g. after the weight files changed)."""
    _CACHE.clear()
