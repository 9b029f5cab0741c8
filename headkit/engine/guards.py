"""Fail-fast guards for training: non-finite losses/gradients, devices, out-of-memory."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor, nn


class NonFiniteError(FloatingPointError):
    """NaN or Inf met in a named tensor at a given step (``name``, ``step`` attributes)."""

    def __init__(self, message: str, name: str, step: int):
        super().__init__(message)
        self.name, self.step = name, step


def _describe(values: Tensor) -> str:
    nans = int(torch.isnan(values).sum())
    infs = int(torch.isinf(values).sum())
    return f"{nans} NaN and {infs} Inf of {values.numel()}"


def _all_finite(tensors: Sequence[Tensor]) -> bool:
    """Whether every tensor is free of NaN and Inf, cheaply: one fused ``torch._foreach_norm``
    over the floating tensors and one device sync (integer tensors are always finite).

    A NaN or Inf element makes its tensor's norm NaN or Inf, so ``True`` is exact. ``False``
    may also come from finite values whose norm overflows (|x| > ~1e19 in float32): callers
    re-check per tensor before reporting (:func:`check_finite`).
    """
    floats = [t for t in tensors if t.is_floating_point() or t.is_complex()]
    if not floats:
        return True
    norms = torch._foreach_norm(floats)
    device = norms[0].device
    return bool(torch.stack([n.to(device=device, dtype=torch.float32) for n in norms]).isfinite().all())


def check_finite(named_tensors: Mapping[str, Tensor | float], step: int) -> None:
    """Raise :class:`NonFiniteError` naming the first entry that holds NaN or Inf.

    One fused norm and one device sync for all entries when everything is finite (the common
    case, :func:`_all_finite`); only then is each entry checked on its own to name the culprit.
    """
    tensors = {k: torch.as_tensor(v).detach() for k, v in named_tensors.items()}
    if not tensors or _all_finite(list(tensors.values())):
        return
    for name, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            raise NonFiniteError(f"step {step}: non-finite values in '{name}' ({_describe(t)})",
                                 name, step)


def check_finite_grads(model: nn.Module, step: int) -> None:
    """Raise :class:`NonFiniteError` naming the first parameter whose gradient has NaN/Inf.

    Parameters without a gradient are skipped.
    """
    grads = {f"{name}.grad": p.grad for name, p in model.named_parameters() if p.grad is not None}
    check_finite(grads, step)


def device_from_string(spec: str | torch.device) -> torch.device:
    """``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``.

    Raises:
        ValueError: the string is not a device, or the device asked for is not present here
            (the message says what is available and suggests ``device=auto``).
    """
    if isinstance(spec, str) and spec.strip().lower() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device {spec!r} is not a device string "
                         "(use auto, cpu, cuda or cuda:N)") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r} asked for but CUDA is not available (torch "
                             f"{torch.__version__}, CUDA build: {torch.version.cuda}); "
                             "use device=cpu or device=auto")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {spec!r} asked for but only {count} CUDA device(s) exist")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {spec!r} asked for but MPS is not available; use device=auto")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {spec!r}: unsupported device type '{device.type}'")
    return device


@lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (Linux); empty elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


@lru_cache(maxsize=None)
def fast_bfloat16(device: str | torch.device) -> bool:
    """Whether bfloat16 convolutions run natively, i.e. faster than float32, on ``device``: a CUDA
    device with bfloat16 support, or a CPU with AVX512-BF16 or AMX-BF16 instructions (read from
    ``/proc/cpuinfo``; False where that is missing, since emulated bfloat16 is slower). Cached per
    device: the enhancer asks on every forward pass."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())
    return False


# What the message suggests when the caller names no knobs (config keys vary per method).
DEFAULT_OOM_KNOBS = ("image resolution", "batch size", "neural Gaussians per anchor (k)")


def oom_message(exc: BaseException, knobs: Mapping[str, object] | Sequence[str] = DEFAULT_OOM_KNOBS) -> str:
    """A message for an out-of-memory error naming the settings that reduce memory.

    ``knobs`` maps config keys to their current values (``{"data.resolution": 512}``) or just
    lists them. The original error's first line and, on CUDA, the peak allocation are kept.
    """
    if isinstance(knobs, Mapping):
        listed = ", ".join(f"{k}={v}" for k, v in knobs.items())
    else:
        listed = ", ".join(str(k) for k in knobs)
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    peak = ""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak = f" Peak CUDA memory allocated: {torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB."
    return (f"Out of memory ({first_line}).{peak} Lower one of these settings to need less "
            f"memory: {listed}; or run on a device with more memory.")


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


@contextmanager
def explain_oom(knobs: Mapping[str, object] | Sequence[str] = DEFAULT_OOM_KNOBS) -> Iterator[None]:
    """Re-raise out-of-memory errors (CUDA's ``torch.OutOfMemoryError``, CPU allocator
    failures) as ``torch.OutOfMemoryError`` with :func:`oom_message`; the original is chained.
    ``torch.OutOfMemoryError`` subclasses RuntimeError, so existing handlers still match."""
    try:
        yield
    except RuntimeError as exc:
        if not _is_oom(exc):
            raise
        raise torch.OutOfMemoryError(oom_message(exc, knobs)) from exc

