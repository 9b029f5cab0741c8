"""Seeding and RNG-state capture for reproducible, resumable runs."""

from __future__ import annotations

import os
import random
import warnings

import numpy as np
import torch


def seed_everything(seed: int, deterministic: bool = False) -> int:
    """Seed Python's ``random``, numpy's global RNG and torch (CPU and every CUDA device).

    ``deterministic=True`` also asks torch for deterministic kernels
    (``torch.use_deterministic_algorithms(True, warn_only=True)``, cuDNN deterministic and no
    benchmark, ``CUBLAS_WORKSPACE_CONFIG``). Limits: gsplat's CUDA backward accumulates with
    atomics and stays run-to-run nondeterministic in the last bits; ``PYTHONHASHSEED`` only
    reaches child processes; numpy ``Generator`` objects made elsewhere are not touched;
    DataLoader workers need their own ``worker_init_fn``. The same seed on a different device
    or torch build gives different numbers.

    Returns the seed, for logging.
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)  # also seeds all CUDA devices
    os.environ["PYTHONHASHSEED"] = str(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    return seed


def capture_rng_state() -> dict:
    """Snapshot of the Python, numpy (global), torch CPU and CUDA generators.

    Holds only tuples, ints, floats, strings and tensors, so checkpoints containing it load
    with ``torch.load(weights_only=True)``.
    """
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng_state(state: dict) -> None:
    """Restore a :func:`capture_rng_state` snapshot.

    CUDA states are restored when the device count matches; otherwise a warning says they
    were skipped (e.g. a GPU checkpoint resumed on CPU).
    """
    random.setstate(_as_tuple(state["python"]))
    np_state = state["numpy"]
    np.random.set_state({
        "bit_generator": np_state["bit_generator"],
        "state": {"key": np.asarray(np_state["key"], dtype=np.int64).astype(np.uint32),
                  "pos": int(np_state["pos"])},
        "has_gauss": int(np_state["has_gauss"]),
        "gauss": float(np_state["gauss"]),
    })
    torch.set_rng_state(state["torch"].cpu())
    cuda_states = state.get("cuda") or []
    if cuda_states:
        if torch.cuda.is_available() and torch.cuda.device_count() == len(cuda_states):
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])
        else:
            warnings.warn(f"RNG state holds {len(cuda_states)} CUDA generator(s) but this machine "
                          f"has {torch.cuda.device_count() if torch.cuda.is_available() else 0}; "
                          "CUDA RNG not restored", RuntimeWarning, stacklevel=2)


def _as_tuple(value):
    """Python's RNG state is nested tuples; a JSON/YAML round trip may have made lists."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value
