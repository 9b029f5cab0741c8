"""``scripts/prepare_data.py source=synthetic`` writes a folder the parser reads back."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from headkit.data.folder import load_subject_folder
from headkit.data.subject import SubjectError

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["data.generator.num_frames=6", "data.generator.width=32", "data.generator.height=32",
         "data.generator.num_vertices_target=600", "data.generator.texture_resolution=64"]


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "prepare_data.py"), *args],
                          capture_output=True, text=True, timeout=300)


def test_prepare_synthetic_round_trip(tmp_path):
    out = tmp_path / "synthetic"
    proc = run_script("source=synthetic", f"out={out}", *SMALL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    subject = load_subject_folder(out)
    assert subject.num_frames == 6 and subject.images.shape[1:] == (32, 32, 3)
    assert len(subject.test_ids) >= 1 and set(subject.extras) >= {"true_camtoworlds", "true_expressions"}
    assert (out / "contact_sheet.png").is_file()
    assert np.array_equal(subject.extras["true_expressions"], subject.expressions)  # no noise asked
    again = run_script("source=synthetic", f"out={out}", *SMALL)  # never silently overwritten
    assert again.returncode != 0 and "not empty" in again.stderr


def test_synthetic_source_caches_by_settings(tmp_path):
    from headkit.data.sources import synthetic_cache_dir, synthetic_subject
    gen = {"num_frames": 4, "width": 24, "height": 24, "num_vertices_target": 400,
           "texture_resolution": 32, "num_test": 1}
    first = synthetic_subject(tmp_path, gen)
    folder = synthetic_cache_dir(tmp_path, gen)
    assert (folder / "subject.json").is_file()
    stamp = (folder / "subject.json").stat().st_mtime_ns
    second = synthetic_subject(tmp_path, gen)
    assert (folder / "subject.json").stat().st_mtime_ns == stamp  # read from the cache
    np.testing.assert_array_equal(first.images, second.images)
    assert synthetic_cache_dir(tmp_path, {**gen, "seed": 1}) != folder


def test_unknown_source_is_named(tmp_path):
    proc = run_script("source=nonsense", f"out={tmp_path / 'x'}", *SMALL)
    assert proc.returncode != 0 and "nonsense" in proc.stderr
