"""Shared fixtures: tiny hand-made subjects; CPU only, no downloads."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HEADKIT_NO_PROGRESS", "1")
os.environ.setdefault("HEADKIT_OFFLINE", "1")  # the suite never downloads (LPIPS weights: tests serve them locally)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads stall shared CPUs
import torch  # noqa: E402  (after the OpenMP setting)
torch.set_num_threads(min(2, os.cpu_count() or 1))

from headkit.data.subject import Subject, holdout_split  # noqa: E402


REPO = Path(__file__).resolve().parents[1]


def load_repo_module(relative: str):
    """A script or benchmark of the repository (``"scripts/table.py"``) imported as a module, so
    tests can call its functions; its ``if __name__ == "__main__"`` block does not run."""
    import importlib.util

    path = REPO / relative
    spec = importlib.util.spec_from_file_location(f"_repo_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def one_intraop_thread():
    """One intra-op thread for a module of tiny-tensor tests (``pytestmark =
    pytest.mark.usefixtures("one_intraop_thread")``): on a shared 2-core machine extra OpenMP
    threads only add barriers, 10-30x slower here (measured); idle, one is as fast."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

OCTAHEDRON_VERTICES = np.array(
    [[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], np.float32) * 0.3
OCTAHEDRON_FACES = np.array(
    [[0, 2, 4], [2, 1, 4], [1, 3, 4], [3, 0, 4], [2, 0, 5], [1, 2, 5], [3, 1, 5], [0, 3, 5]], np.int64)


def make_tiny_subject(num_frames: int = 6, width: int = 16, height: int = 12, expression_dim: int = 4,
                      num_test: int = 2, seed: int = 0, with_uvs: bool = True) -> Subject:
    """A hand-made subject: an octahedron 'head' in front of a camera at the origin."""
    rng = np.random.default_rng(seed)
    T, V = num_frames, len(OCTAHEDRON_VERTICES)
    vertices = OCTAHEDRON_VERTICES[None] + rng.normal(0, 0.01, (T, V, 3)).astype(np.float32)
    vertices[..., 2] += 2.0
    Ks = np.tile(np.array([[20, 0, width / 2], [0, 20, height / 2], [0, 0, 1]], np.float32), (T, 1, 1))
    c2w = np.tile(np.eye(4, dtype=np.float32), (T, 1, 1))
    c2w[:, 0, 3] = np.linspace(0, 0.1, T)
    train, test = holdout_split(T, num_test)
    uvs = uv_faces = None
    if with_uvs:
        uvs = rng.uniform(0, 1, (V, 2)).astype(np.float32)
        uv_faces = OCTAHEDRON_FACES.copy()
    return Subject(
        name="tiny", faces=OCTAHEDRON_FACES.copy(), template_vertices=OCTAHEDRON_VERTICES.copy(),
        vertices=vertices.astype(np.float32),
        expressions=rng.normal(0, 1, (T, expression_dim)).astype(np.float32),
        Ks=Ks, camtoworlds=c2w, times=np.linspace(0, 1, T).astype(np.float32),
        images=rng.integers(0, 256, (T, height, width, 3), dtype=np.uint8),
        masks=(rng.uniform(size=(T, height, width)) > 0.5).astype(np.uint8) * 255,
        train_ids=train, test_ids=test, fps=30.0, uvs=uvs, uv_faces=uv_faces,
        head_poses=np.tile(np.eye(4, dtype=np.float32), (T, 1, 1)),
        extras={"true_expressions": rng.normal(0, 1, (T, expression_dim)).astype(np.float32)},
        meta={"source": "test"},
    )


@pytest.fixture
def tiny_subject() -> Subject:
    """A fresh tiny subject per test."""
    return make_tiny_subject()
