"""The NeRSemble Monocular FLAME Avatar submission: the held-out sequences rendered from the
benchmark's cameras, packed as the toolkit's ``data/submission_data.py`` expects
(``scripts/nersemble_submission.py``).

Zip layout (``MonoFlameAvatarSubmissionDataWriter`` / ``MonoFlameAvatarSubmissionDataReader``)::

    <participant:03d>/<sequence>/cam_<serial>.mp4

for each participant, each of the 4 held-out sequences and each of the 4 cameras (the training
camera ``222200037`` and the hold-out cameras ``222200046``, ``220700191``, ``222200039``):
H.264 at 24.3 fps, 512x512, ``crf 14`` (the toolkit's ``mediapy.write_video(crf=14)``), one
frame per tracked frame of the sequence; no other files. The toolkit's writer overwrites the
zip, so every participant goes into one call here: ``run=[RUN_393,RUN_404,...]``.

Each frame is the trained avatar driven by the held-out sequence's FLAME tracking
(:func:`headkit.data.nersemble.read_sequence`: the same mesh, expression vector and head pose
as in training) and seen by the calibrated camera; the model renders at its training size
(intrinsics scaled from the videos' size) and the image is resized to ``resolution``.
"""

from __future__ import annotations

import os
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, ListConfig, OmegaConf

from headkit.data.dataset import FrameDataset
from headkit.data.image_io import to_uint8
from headkit.data.insta import scale_intrinsics
from headkit.data.nersemble import camera, participant_dir, read_cameras, read_sequence
from headkit.engine.runs import LoadedRun, RunNotFound, find_latest_run, load_run
from headkit.errors import InvalidConfigValue
from headkit.headmodel.flame import FLAME

ENTRY_RE = re.compile(r"(\d+)/([\w\-+]+)/cam_(\w+)\.mp4")  # the toolkit reader's pattern


def entry_name(participant: int, sequence: str, serial: str) -> str:
    """The zip entry of one video, as the toolkit's ``get_video_path`` names it."""
    return f"{int(participant):03d}/{sequence}/cam_{serial}.mp4"


def held_out_frames(subject, sequence: dict[str, Any], K: np.ndarray, camtoworld: np.ndarray  # [3,3], [4,4]
                    ) -> Iterator[dict[str, torch.Tensor]]:
    """One-frame batches (:data:`~headkit.data.dataset.FRAME_KEYS`) of a held-out sequence seen
    by one camera. Image and mask are the subject's first frame (placeholders: no ground truth);
    time runs from 0 to 1 over the sequence (only time-conditioned parts see it)."""
    base = FrameDataset(subject, "all").batch([0])
    viewmat = np.linalg.inv(camtoworld)
    T = len(sequence["vertices"])
    for t in range(T):
        batch = dict(base)
        batch.update({
            "index": torch.tensor([t]),
            "vertices": torch.from_numpy(sequence["vertices"][t][None]).float(),
            "expression": torch.from_numpy(sequence["expressions"][t][None]).float(),
            "head_pose": torch.from_numpy(sequence["head_poses"][t][None]).float(),
            "K": torch.from_numpy(K[None]).float(),
            "camtoworld": torch.from_numpy(camtoworld[None]).float(),
            "viewmat": torch.from_numpy(viewmat[None]).float(),
            "time": torch.tensor([t / max(T - 1, 1)], dtype=torch.float32),
        })
        yield batch


def render_frames(model, frames: Iterator[dict], resolution: tuple[int, int], device) -> list[np.ndarray]:
    """``model.render_sequence`` over ``frames``, resized to ``resolution`` (H, W), uint8 ``[H, W, 3]``."""
    out = []
    batches = ({k: v.to(device) for k, v in b.items()} for b in frames)
    for image in model.render_sequence(batches):  # [1, h, w, 3]
        image = image.clamp(0, 1).float()
        if tuple(image.shape[1:3]) != tuple(resolution):
            image = F.interpolate(image.permute(0, 3, 1, 2), size=tuple(resolution), mode="bilinear",
                                  align_corners=False, antialias=True).permute(0, 2, 3, 1)
        out.append(to_uint8(image[0].cpu().numpy()))
    return out


def write_mp4(path: Path, frames: list[np.ndarray], fps: float, crf: int) -> None:
    """H.264 (yuv420p) MP4 at ``crf``, as the toolkit writes submissions."""
    import imageio.v2 as imageio

    with imageio.get_writer(path, fps=fps, codec="libx264", quality=None, pixelformat="yuv420p",
                            macro_block_size=1, output_params=["-crf", str(int(crf))]) as w:
        for frame in frames:
            w.append_data(frame)


def _runs(cfg: DictConfig) -> list[Path]:
    runs = cfg.run
    if runs is None:
        return [find_latest_run(f"{cfg.paths.output_dir}/train")]
    return [Path(r) for r in (runs if isinstance(runs, (list, ListConfig)) else [runs])]


def _resolution(value) -> tuple[int, int]:
    size = tuple(int(v) for v in (value if isinstance(value, (list, tuple, ListConfig)) else [value, value]))
    if len(size) != 2 or min(size) <= 0 or any(s % 2 for s in size):
        raise InvalidConfigValue(f"resolution must be a positive even [height, width] (H.264), got {value!r}")
    return size


@torch.no_grad()
def write_submission(cfg: DictConfig) -> dict[str, Any]:
    """Render every run's held-out sequences from the submission cameras into one zip.

    Returns ``{"zip": path, "entries": {entry: frames}, "issues": check_submission(...)}``.
    Errors (a run not trained on ``data=nersemble_mono``, a missing tracking file or camera,
    the FLAME model file gone) name what is missing.
    """
    resolution = _resolution(cfg.resolution)
    runs = _runs(cfg)
    loaded = [load_run(run, cfg.device) for run in runs]  # a bad run fails before anything is written
    _check_runs(runs, loaded)
    out = Path(cfg.out) if cfg.out else runs[0] / "nersemble_submission.zip"
    out.parent.mkdir(parents=True, exist_ok=True)
    entries: dict[str, int] = {}
    fd, tmp = tempfile.mkstemp(suffix=".zip.tmp", dir=out.parent)
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w") as zf, tempfile.TemporaryDirectory() as scratch:
            for run, one in zip(runs, loaded):
                entries.update(_add_run(zf, run, one, cfg, resolution, Path(scratch)))
        os.replace(tmp, out)  # never a half-written zip at the destination
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return {"zip": str(out), "entries": entries, "issues": check_submission(out, entries, resolution)}


def _check_runs(runs: list[Path], loaded: list[LoadedRun]) -> None:
    """Every run trained on ``data=nersemble_mono``, each participant once (one zip entry per video)."""
    seen: dict[int, Path] = {}
    for run, one in zip(runs, loaded):
        data = one.cfg.data
        if not str(data.get("_target_", "")).endswith("load_nersemble_mono"):
            raise RunNotFound(f"{run}: not trained on data=nersemble_mono (data._target_ is "
                              f"{data.get('_target_')}); a submission renders a NeRSemble avatar")
        if int(data.participant) in seen:
            raise InvalidConfigValue(f"run: {seen[int(data.participant)]} and {run} are both participant "
                                     f"{data.participant}; give one run per participant")
        seen[int(data.participant)] = run


def _add_run(zf: zipfile.ZipFile, run: Path, loaded: LoadedRun, cfg: DictConfig, resolution: tuple[int, int],
             scratch: Path) -> dict[str, int]:
    """Render one run's held-out sequences into ``zf``; returns ``{entry: frames}``."""
    data = loaded.cfg.data
    folder = participant_dir(data.root, data.participant)
    cameras = read_cameras(folder)
    flame = FLAME(data.flame_model)
    subject, model = loaded.subject, loaded.model
    original = tuple(subject.meta.get("original_size", (subject.height, subject.width)))
    sequences = list(cfg.sequences) if cfg.sequences else list(data.test_sequences)
    written = {}
    for name in sequences:
        seq = read_sequence(folder, name, flame, list(data.expression_parts), images=False,
                            key="data.test_sequences")
        if cfg.max_frames:
            seq = {k: v[: int(cfg.max_frames)] if k != "tracking" else v for k, v in seq.items()}
        for serial in cfg.serials:
            K, c2w = camera(cameras, str(serial), folder)
            K = scale_intrinsics(K[None], original, (subject.height, subject.width))[0]
            frames = render_frames(model, held_out_frames(subject, seq, K, c2w), resolution, loaded.device)
            entry = entry_name(data.participant, name, str(serial))
            write_mp4(scratch / "video.mp4", frames, float(cfg.fps), int(cfg.crf))
            zf.write(scratch / "video.mp4", entry)
            written[entry] = len(frames)
    return written


def read_zipped_video(zf: zipfile.ZipFile, name: str, scratch: Path) -> np.ndarray:  # [T, H, W, 3] uint8
    """All frames of the zip entry ``name`` (extracted to ``scratch``: imageio's ffmpeg reader
    needs a file it can seek in)."""
    import imageio.v3 as iio

    path = scratch / "check.mp4"
    path.write_bytes(zf.read(name))
    return np.stack(list(iio.imiter(path, plugin="FFMPEG")))


def check_submission(path: str | os.PathLike, expected: dict[str, int],
                     resolution: tuple[int, int]) -> dict[str, list]:
    """The toolkit's ``validate_submission`` checks for the ``expected`` entries (``{entry: frames}``):
    ``missing_files``, ``unexpected_files``, ``wrong_frame_counts`` ``(entry, actual, expected)``,
    ``wrong_resolutions`` ``(entry, (w, h), (W, H))`` and ``bad_names`` (not matching the
    toolkit's entry pattern). Empty dict when the zip is as expected."""
    issues: dict[str, list] = {}
    with zipfile.ZipFile(path) as zf, tempfile.TemporaryDirectory() as scratch:
        names = [i.filename for i in zf.infolist() if not i.is_dir()]
        for name in names:
            if not ENTRY_RE.fullmatch(name):
                issues.setdefault("bad_names", []).append(name)
            if name not in expected:
                issues.setdefault("unexpected_files", []).append(name)
        for name, frames in expected.items():
            if name not in names:
                issues.setdefault("missing_files", []).append(name)
                continue
            video = read_zipped_video(zf, name, Path(scratch))
            n, (h, w) = len(video), video.shape[1:3]
            if n != frames:
                issues.setdefault("wrong_frame_counts", []).append((name, n, frames))
            if (h, w) != tuple(resolution):
                issues.setdefault("wrong_resolutions", []).append((name, (w, h), tuple(resolution[::-1])))
    return issues


def submission_settings(**overrides) -> DictConfig:
    """``configs/nersemble_submission.yaml`` with ``overrides`` (for callers outside Hydra, e.g. tests)."""
    base = OmegaConf.load(Path(__file__).resolve().parents[2] / "configs" / "nersemble_submission.yaml")
    base.pop("defaults", None)
    base.pop("hydra", None)
    return OmegaConf.merge(base, overrides)
