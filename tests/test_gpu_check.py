"""benchmarks/gpu_check.py: its CPU-capable parts run (tiny), and without CUDA it says why it skips."""

from __future__ import annotations

from pathlib import Path

import torch
from tests.conftest import load_repo_module

ROOT = Path(__file__).resolve().parents[1]


def _module():
    return load_repo_module("benchmarks/gpu_check.py")


def test_quick_cpu_run_fills_every_section(tmp_path):
    out = tmp_path / "gpu.md"
    assert _module().main(["--device", "cpu", "--quick", "--steps", "2", "--out", str(out)]) == 0
    text = out.read_text()
    for heading in ("## Environment", "## Training and evaluation", "## Benchmarks", "## gsplat"):
        assert heading in text
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert "failed" not in text
    graph = rows["GraphAvatar (torch splatting)"].split("|")
    assert 5.0 < float(graph[3]) < 60.0 and "torch" in graph[7]  # a PSNR, and the backend it rendered with
    assert float(rows["neural cache (ours)"].split("|")[3]) > 3.0
    assert any(k.startswith("splatting, torch, 500 Gaussians") for k in rows)
    assert any(k.startswith("Ours (2x warp), 2 worker(s)") for k in rows)
    assert "extension: skipped: no CUDA device" in text


def test_without_cuda_it_says_what_it_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "gpu.md"
    assert _module().main(["--out", str(out)]) == 0
    assert "skipped: no CUDA device" in out.read_text()
