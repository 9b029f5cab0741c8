"""Errors a person can read (issue 11): the scripts print one ``error:`` line (and maybe a
``hint:`` line), exit non-zero and show no traceback for bad input; ``HYDRA_FULL_ERROR=1``
still shows it. Each script case runs the real script in a subprocess (a few seconds of
imports each), with ``paths.*`` inside ``tmp_path``; the in-process cases check that
:func:`headkit.cli.user_errors_exit` lets programming errors through."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from headkit.cli import EXIT_CODE, user_errors_exit
from headkit.data.subject import SubjectError

ROOT = Path(__file__).resolve().parents[1]


def run_script(script: str, tmp_path: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python scripts/<script> paths.data_dir=tmp/data paths.output_dir=tmp/outputs *args`` in tmp_path."""
    environ = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    environ.update({"OMP_NUM_THREADS": "1", "HEADKIT_NO_PROGRESS": "1", **(env or {})})
    return subprocess.run([sys.executable, str(ROOT / "scripts" / script), f"paths.data_dir={tmp_path / 'data'}",
                           f"paths.output_dir={tmp_path / 'outputs'}", *args],
                          cwd=tmp_path, env=environ, capture_output=True, text=True, timeout=300)


def error_line(proc: subprocess.CompletedProcess, *names: str) -> str:
    """Assert the readable-error shape and return the ``error:`` line: exit code 2, no
    traceback, stderr ending in one ``error:`` line (plus at most one ``hint:`` line) that names
    each of ``names``."""
    stderr = proc.stderr
    assert proc.returncode == EXIT_CODE, f"rc={proc.returncode}\n{stderr[-3000:]}"
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    error = lines[-2] if lines[-1].startswith("hint: ") else lines[-1]
    assert error.startswith("error: "), stderr[-3000:]
    assert sum(line.startswith("error:") for line in lines) == 1, stderr[-3000:]
    for name in names:
        assert name in error, (name, error)
    return error


# ----------------------------------------------------------------------------- train.py

def test_negative_learning_rate_is_reported_before_any_data(tmp_path):
    start = time.perf_counter()
    proc = run_script("train.py", tmp_path, "model.optim.lr.unets=-0.001")
    elapsed = time.perf_counter() - start
    error_line(proc, "model.optim.lr.unets", "-0.001")
    assert elapsed < 20, elapsed  # generating the synthetic subject alone takes longer
    data_dir = tmp_path / "data"
    assert not data_dir.exists() or not any(data_dir.iterdir()), list(data_dir.rglob("*"))[:5]


def test_unknown_model_key_is_named(tmp_path):
    # without '+' Hydra refuses the override itself ("Could not override ..."); with '+' it reaches the model
    error_line(run_script("train.py", tmp_path, "+model.unet.filterz=3"), "model.unet.filterz")


def test_missing_mandatory_value_still_one_line(tmp_path):
    error_line(run_script("train.py", tmp_path, "experiment=insta_subject"), "data.root")


def test_missing_subject_folder_is_named(tmp_path):
    missing = tmp_path / "no_such_subject"
    error_line(run_script("train.py", tmp_path, "data=subject", f"data.root={missing}"), str(missing))


def test_resume_with_a_changed_key_lists_it_with_a_hint(tmp_path):
    from hydra import compose, initialize_config_dir

    from headkit.engine.rundir import save_config

    run_dir = tmp_path / "outputs" / "run"
    overrides = [f"paths.data_dir={tmp_path / 'data'}", f"paths.output_dir={tmp_path / 'outputs'}",
                 f"run_dir={run_dir}"]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    run_dir.mkdir(parents=True)
    save_config(run_dir, cfg)  # the config a finished run saved, as the script composes it
    proc = run_script("train.py", tmp_path, f"run_dir={run_dir}", "trainer.resume=true", "seed=1")
    assert "seed: 0 -> 1" in error_line(proc, "seed")
    assert proc.stderr.strip().splitlines()[-1].startswith("hint: ")
    assert not (tmp_path / "data").exists()  # checked before the subject is built


def test_full_error_shows_the_traceback(tmp_path):
    proc = run_script("train.py", tmp_path, "model.optim.lr.unets=-0.001", env={"HYDRA_FULL_ERROR": "1"})
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "ConfigValueError" in proc.stderr, proc.stderr[-3000:]


# ----------------------------------------------------------------------------- eval.py, fit_3dgs.py

def test_eval_of_a_missing_run_says_it_does_not_exist(tmp_path):
    missing = tmp_path / "no_such_run"
    assert "does not exist" in error_line(run_script("eval.py", tmp_path, f"run={missing}"), str(missing))


def test_eval_without_any_run(tmp_path):
    error_line(run_script("eval.py", tmp_path), "no finished run", "run=RUN_DIR")


def test_fit_3dgs_bad_thread_count_is_named(tmp_path):
    error_line(run_script("fit_3dgs.py", tmp_path, "num_threads=0"), "num_threads=0")


def test_fit_3dgs_missing_subject_folder(tmp_path):
    missing = tmp_path / "no_such_subject"
    error_line(run_script("fit_3dgs.py", tmp_path, "data=subject", f"data.root={missing}"), str(missing))


# ----------------------------------------------------------------------------- prepare_data.py

def test_output_folder_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    start = time.perf_counter()
    proc = run_script("prepare_data.py", tmp_path, "source=synthetic", f"out={blocker / 'subject'}")
    assert time.perf_counter() - start < 20  # checked before the subject is generated
    error_line(proc, str(blocker / "subject"), "is a file")


needs_mediapipe = pytest.mark.skipif(importlib.util.find_spec("mediapipe") is None,
                                     reason="the video extra (mediapipe) is not installed")


@needs_mediapipe
def test_text_file_named_mp4(tmp_path):
    video = tmp_path / "x.mp4"
    video.write_text("not a video\n")
    proc = run_script("prepare_data.py", tmp_path, "source=video", f"video={video}", f"out={tmp_path / 'subject'}")
    error_line(proc, "x.mp4", "not a video file")
    assert not (tmp_path / "data").exists()  # failed before any model file was fetched


@needs_mediapipe
def test_video_without_a_face(tmp_path):
    import imageio.v3 as iio
    import numpy as np

    from tests.test_mediapipe_tasks import LANDMARKER, SEGMENTER

    if not (LANDMARKER.is_file() and SEGMENTER.is_file()):
        pytest.skip(f"MediaPipe model files not found: {LANDMARKER}, {SEGMENTER}")
    video = tmp_path / "empty_room.mp4"
    iio.imwrite(video, np.full((6, 64, 64, 3), 120, np.uint8), plugin="FFMPEG", fps=6)
    proc = run_script("prepare_data.py", tmp_path, "source=video", f"video={video}", f"out={tmp_path / 'subject'}",
                      "video_preprocess.tracker=mediapipe_mesh",  # the ICT kit is not needed to find no face
                      env={"HEADKIT_FACE_LANDMARKER": str(LANDMARKER), "HEADKIT_SELFIE_SEGMENTER": str(SEGMENTER)})
    error_line(proc, "empty_room.mp4", "no face")


def test_video_preprocessing_without_the_extra_names_the_install_command(tmp_path):
    """The real script in a process where ``import mediapipe`` fails (as without the extra)."""
    import imageio.v3 as iio
    import numpy as np

    video = tmp_path / "clip.mp4"
    iio.imwrite(video, np.full((4, 32, 32, 3), 90, np.uint8), plugin="FFMPEG", fps=4)
    script = ROOT / "scripts" / "prepare_data.py"
    code = ("import runpy, sys; sys.modules['mediapipe'] = None; "
            f"sys.argv = [{str(script)!r}] + sys.argv[1:]; runpy.run_path({str(script)!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code, "source=video", f"video={video}", f"out={tmp_path / 'subject'}",
                           f"paths.data_dir={tmp_path / 'data'}"], capture_output=True, text=True, cwd=tmp_path,
                          timeout=300)
    error_line(proc, 'pip install -c constraints.txt -e ".[video]"')


# ----------------------------------------------------------------------------- headkit.cli in process

def test_user_error_becomes_one_line(capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as exit_info, user_errors_exit():
        raise SubjectError("/x: subject folder not found\n  more detail")
    assert exit_info.value.code == EXIT_CODE
    assert capsys.readouterr().err == "error: /x: subject folder not found; more detail\n"


def test_wrapped_user_error_is_unwrapped_and_bugs_pass_through(capsys, monkeypatch):
    from hydra.errors import InstantiationException

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit), user_errors_exit():
        raise InstantiationException("Error in call to target") from SubjectError("/x: subject folder not found")
    assert capsys.readouterr().err == "error: /x: subject folder not found\n"
    # programming errors keep their traceback: not the project's error classes
    for bug in (ValueError("shapes do not match"), KeyError("k"), RuntimeError("boom")):
        with pytest.raises(type(bug)), user_errors_exit():
            raise bug
    with pytest.raises(InstantiationException), user_errors_exit():
        raise InstantiationException("Error in call to target") from TypeError("bad argument")
    # the script's extra classes (prepare_data's broader tuple) are reported too
    with pytest.raises(SystemExit), user_errors_exit(FileExistsError):
        raise FileExistsError("/out: folder exists and is not empty")
    assert capsys.readouterr().err.startswith("error: /out: folder exists")


def test_full_error_reraises(monkeypatch):
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(SubjectError), user_errors_exit():
        raise SubjectError("/x: subject folder not found")
