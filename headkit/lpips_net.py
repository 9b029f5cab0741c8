"""LPIPS (AlexNet, v0.1) in plain torch, without torchvision.

The ``lpips`` package imports torchvision, which has no CPU build for the torch this project
pins, so the network is rebuilt here with the same arithmetic as ``lpips.LPIPS(net='alex',
version='0.1')`` called with ``normalize=True``:

    x' = (2 x - 1 - shift) / scale                      (lpips' ScalingLayer)
    f_l = relu_l(AlexNet(x'))                           l = 1..5
    f̂_l = f_l / (||f_l||_channels + 1e-10)              (unit-normalise channels)
    d = sum_l mean_{h,w} ( w_l · (f̂_l(x) - f̂_l(y))² )   (w_l: 1x1 conv, no bias)

Two weight files are needed:

* the AlexNet backbone, torchvision's ``alexnet-owt-7be5be79.pth``: an explicit path, else
  ``$HEADKIT_ALEXNET_WEIGHTS``, else ``torch.hub.get_dir()/checkpoints/alexnet-owt-7be5be79.pth``
  (where torchvision, and so the lpips package, keeps it);
* the five linear layers, ``lpips/weights/v0.1/alex.pth`` inside the installed lpips wheel
  (found with ``importlib.util.find_spec`` so that lpips, and with it torchvision, is never
  imported), or an explicit path / ``$HEADKIT_LPIPS_LIN_WEIGHTS``; without the lpips package,
  ``<hub dir>/checkpoints/lpips_v0.1_alex-df73285e.pth``.

Downloading (what ``lpips.LPIPS()`` does through torchvision) happens only when asked:
``download=True`` here, or ``eval.lpips_download: true`` (configs/eval/default.yaml) for the
scripts' evaluation through :func:`prepare_lpips_weights`. A missing file at its *default* place
(not an explicit path, not an env var) is then fetched once into the torch hub cache with
``torch.hub.download_url_to_file`` (progress bar, SHA-256 prefix ``7be5be79`` checked as
``torch.hub.load_state_dict_from_url(check_hash=True)`` does; the linear layers are checked
against their full SHA-256). ``$HEADKIT_ALEXNET_URL`` / ``$HEADKIT_LPIPS_LIN_URL`` replace the
URLs (a mirror, a local server); ``HEADKIT_OFFLINE=1`` forbids every download. The library
default is no download, so losses and tests never touch the network.

When a file is missing (and not downloaded) the metric is *unavailable*: :func:`lpips_available`
says why and :func:`load_lpips` raises :class:`MetricUnavailable`; it never quietly returns 0.
"""

from __future__ import annotations

import http.client
import importlib.util
import logging
import os
import socket
import urllib.error
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

ALEXNET_FILENAME = "alexnet-owt-7be5be79.pth"
ALEXNET_URL = "https://download.pytorch.org/models/" + ALEXNET_FILENAME
# torch.hub's check_hash: the SHA-256 of the file starts with the hex after the last "-" of its name
ALEXNET_HASH_PREFIX = "7be5be79"
ALEXNET_SIZE_MB = 233
ALEXNET_ENV = "HEADKIT_ALEXNET_WEIGHTS"
ALEXNET_URL_ENV = "HEADKIT_ALEXNET_URL"
LIN_ENV = "HEADKIT_LPIPS_LIN_WEIGHTS"
LIN_URL_ENV = "HEADKIT_LPIPS_LIN_URL"
# lpips' lpips/weights/v0.1/alex.pth (6 kB), pinned to the commit that last changed it; the same
# bytes as in the lpips 0.1.4 wheel
LIN_SHA256 = "df73285e35b22355a2df87cdb6b70b343713b667eddbda73e1977e0c860835c0"
LIN_URL = ("https://raw.githubusercontent.com/richzhang/PerceptualSimilarity/"
           "c33f89e9f46522a584cf41d8880eb0afa982708b/lpips/weights/v0.1/alex.pth")
LIN_FILENAME = "lpips_v0.1_alex-df73285e.pth"
OFFLINE_ENV = "HEADKIT_OFFLINE"
DOWNLOAD_TIMEOUT_S = 60.0  # per socket operation (connect, each read), not for the whole file
ALEX_CHANNELS = (64, 192, 384, 256, 256)
# Smallest side AlexNet's three 3x3/2 max-pools accept: conv1 must give >= 7 pixels.
MIN_LPIPS_SIZE = 31


class MetricUnavailable(RuntimeError):
    """A metric cannot be computed here (e.g. missing weights); ``reason`` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _hub_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def default_alexnet_path() -> Path:
    """Backbone weights path: ``$HEADKIT_ALEXNET_WEIGHTS`` if set, else the torch hub cache."""
    env = os.environ.get(ALEXNET_ENV)
    if env:
        return Path(env).expanduser()
    return _hub_checkpoints() / ALEXNET_FILENAME


def _wheel_lin_path() -> Path | None:
    """``lpips/weights/v0.1/alex.pth`` of the installed lpips package (None: not installed)."""
    spec = importlib.util.find_spec("lpips")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "weights" / "v0.1" / "alex.pth"


def default_lin_path() -> Path | None:
    """Linear-layer weights: ``$HEADKIT_LPIPS_LIN_WEIGHTS``, else inside the lpips wheel, else a
    copy downloaded earlier into the torch hub cache.

    Returns None when the lpips package is not installed and no env var or downloaded copy exists.
    """
    env = os.environ.get(LIN_ENV)
    if env:
        return Path(env).expanduser()
    wheel = _wheel_lin_path()
    if wheel is not None:
        return wheel
    hub = _hub_checkpoints() / LIN_FILENAME
    return hub if hub.is_file() else None


def offline() -> bool:
    """``HEADKIT_OFFLINE`` set to anything but ``""``/``0``/``false``/``no``: never download."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def alexnet_url() -> str:
    """Where the backbone is downloaded from: ``$HEADKIT_ALEXNET_URL``, else torchvision's URL."""
    return os.environ.get(ALEXNET_URL_ENV) or ALEXNET_URL


def lin_url() -> str:
    """Where the linear layers are downloaded from: ``$HEADKIT_LPIPS_LIN_URL``, else lpips' repo."""
    return os.environ.get(LIN_URL_ENV) or LIN_URL


@contextmanager
def _socket_timeout(seconds: float):
    """urllib (and so torch.hub) waits forever on a silent server; bound each socket operation
    unless the process already chose a default timeout."""
    before = socket.getdefaulttimeout()
    if before is None:
        socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        if before is None:
            socket.setdefaulttimeout(None)


_FAILED: dict[tuple[str, str], str] = {}  # (url, dest) -> why its download failed (no retry per process)


def download_weights(url: str, dest: str | os.PathLike, hash_prefix: str, what: str,
                     progress: bool | None = None) -> Path:
    """Download ``url`` to ``dest`` with ``torch.hub.download_url_to_file`` and return ``dest``.

    The file is written under a temporary name and moved into place only when its SHA-256
    starts with ``hash_prefix`` (torch.hub's check), so a refused or interrupted download
    leaves nothing at ``dest``. ``progress`` None: a bar on a terminal unless
    ``HEADKIT_NO_PROGRESS=1`` (:func:`headkit.progress.progress_enabled`); a log line either way.
    A failure is remembered: the same ``(url, dest)`` is not tried again in this process.

    Raises:
        MetricUnavailable: ``HEADKIT_OFFLINE=1``, the URL cannot be fetched, or the hash differs;
            ``reason`` names ``what``, the URL, ``dest`` and the cause.
    """
    dest = Path(dest)
    if offline():
        raise MetricUnavailable(f"{what} not found at {dest} and not downloaded (${OFFLINE_ENV}="
                                f"{os.environ.get(OFFLINE_ENV)}); download {url} to that path")
    key = (url, str(dest))
    if key in _FAILED:
        raise MetricUnavailable(_FAILED[key])
    if progress is None:
        from headkit.progress import progress_enabled
        progress = progress_enabled()
    log.warning("%s not found at %s: downloading %s (once, into the torch hub cache)", what, dest, url)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            torch.hub.download_url_to_file(url, str(dest), hash_prefix=hash_prefix, progress=progress)
    except RuntimeError as exc:  # torch.hub: 'invalid hash value (expected "...", got "...")'
        reason = (f"{what}: the download from {url} was refused, its SHA-256 does not start with "
                  f"{hash_prefix} ({exc}); nothing was saved at {dest}")
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as exc:
        cause = exc if isinstance(exc, urllib.error.HTTPError) else getattr(exc, "reason", None) or exc
        reason = (f"{what} not found at {dest} and the download failed: cannot fetch {url} "
                  f"({type(exc).__name__}: {cause}); download it to that path")
    else:
        log.info("%s downloaded to %s", what, dest)
        return dest
    _FAILED[key] = reason
    raise MetricUnavailable(reason)


def _resolve(alexnet_path, lin_path, download: bool) -> tuple[Path, Path]:
    """Both weight files' paths, downloading a missing default one when ``download``.

    Raises :class:`MetricUnavailable` naming the file that is missing and why."""
    backbone = Path(alexnet_path) if alexnet_path is not None else default_alexnet_path()
    lin = Path(lin_path) if lin_path is not None else default_lin_path()
    lin_at_default = lin_path is None and not os.environ.get(LIN_ENV)
    if lin is None and download and lin_at_default:
        lin = download_weights(lin_url(), _hub_checkpoints() / LIN_FILENAME, LIN_SHA256,
                               "LPIPS linear-layer weights")
    if lin is None:
        raise MetricUnavailable("LPIPS linear-layer weights not found: the lpips package is not "
                                f"installed (pip install lpips) and ${LIN_ENV} is not set")
    if not lin.is_file():
        raise MetricUnavailable(f"LPIPS linear-layer weights not found at {lin}")
    if not backbone.is_file():
        at_default = alexnet_path is None and not os.environ.get(ALEXNET_ENV)
        what = "AlexNet backbone weights for LPIPS"
        if download and at_default:
            return download_weights(alexnet_url(), backbone, ALEXNET_HASH_PREFIX, what), lin
        hint = (" (train.py's and eval.py's evaluation fetch it into the torch hub cache once when "
                "eval.lpips_download=true, the default, and the network allows)" if at_default else "")
        raise MetricUnavailable(f"{what} not found at {backbone}{hint}; download {alexnet_url()} "
                                f"({ALEXNET_SIZE_MB} MB) to that path or set ${ALEXNET_ENV}")
    return backbone, lin


def lpips_available(alexnet_path: str | os.PathLike | None = None,
                    lin_path: str | os.PathLike | None = None, *,
                    download: bool = False) -> tuple[bool, str]:
    """Whether both LPIPS weight files exist; returns ``(ok, reason)`` (reason is "" if ok).

    ``download=True`` first fetches a file missing at its default place (see the module
    docstring; never over the network when ``HEADKIT_OFFLINE=1``). Only checks that the files
    exist; a file that exists but does not load is reported by :func:`load_lpips` as
    :class:`MetricUnavailable`.
    """
    try:
        _resolve(alexnet_path, lin_path, download)
    except MetricUnavailable as exc:
        return False, exc.reason
    return True, ""


def prepare_lpips_weights(eval_cfg: Mapping | None) -> tuple[bool, str]:
    """Make LPIPS ready for an evaluation configured by ``eval_cfg`` (the ``eval`` config group).

    With ``lpips`` true (default) and ``lpips_download`` true (default *false* here; true in
    configs/eval/default.yaml), a weight file missing at its default place is downloaded once.
    Returns :func:`lpips_available`'s ``(ok, reason)``; never raises for missing weights (the
    evaluation then reports LPIPS as unavailable with the reason).
    """
    cfg = eval_cfg or {}
    if not bool(cfg.get("lpips", True)):
        return False, "disabled by eval.lpips=false"
    ok, reason = lpips_available(cfg.get("lpips_weights"), download=bool(cfg.get("lpips_download", False)))
    if not ok:
        log.warning("LPIPS unavailable: %s", reason)
    return ok, reason


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
               device: torch.device | str = "cpu", *, download: bool = False) -> LPIPSAlex:
    """Build :class:`LPIPSAlex` with both weight files loaded, on ``device``.

    ``download=True``: fetch a weight file missing at its default place first (see the module
    docstring); the default never downloads.

    Raises:
        MetricUnavailable: a weight file is missing or does not load; ``reason`` names it.
    """
    backbone, lin = _resolve(alexnet_path, lin_path, download)
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
              lin_path: str | os.PathLike | None = None, *, download: bool = False) -> LPIPSAlex:
    """Cached :func:`load_lpips`: one network per (device, resolved weight paths).

    Paths are resolved at call time, so changing ``$HEADKIT_ALEXNET_WEIGHTS`` takes effect.
    ``download=True`` is passed on to :func:`load_lpips` (default: no download).
    """
    backbone = Path(alexnet_path) if alexnet_path is not None else default_alexnet_path()
    lin = Path(lin_path) if lin_path is not None else default_lin_path()
    key = (str(torch.device(device)), str(backbone), str(lin))
    if key not in _CACHE:
        _CACHE[key] = load_lpips(alexnet_path, lin_path, device, download=download)
    return _CACHE[key]


def clear_lpips_cache() -> None:
    """Drop the cached networks (e.g. after the weight files changed) and forget failed downloads."""
    _CACHE.clear()
    _FAILED.clear()
