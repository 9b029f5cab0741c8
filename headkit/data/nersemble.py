"""Reader for the NeRSemble Monocular FLAME Avatar benchmark, read in place as the official
toolkit (github.com/tobias-kirschstein/nersemble-benchmark) downloads it.

Layout (the toolkit's ``constants.py`` ``ASSETS["mono_flame_avatar"]``; ``BENCHMARK_FOLDER`` is the
folder given to ``nersemble-benchmark-download BENCHMARK_FOLDER mono_flame_avatar``)::

    BENCHMARK_FOLDER/mono_flame_avatar/<participant:03d>/
        calibration/camera_params.json                  {"world_2_cam": {serial: 4x4}, "intrinsics": {serial: 3x3}}
        sequences/<sequence>/images/cam_<serial>.mp4     RGB, background removed (white), 512x512
        sequences/<sequence>/alpha_maps/cam_<serial>.mp4 foreground alpha in the first channel
        sequences/<sequence>/tracking/flame2023_tracking_v2.npz

Facts from the toolkit that decide how the files are read:

* Cameras (``data/benchmark_data.py``, ``load_camera_calibration``): ``world_2_cam`` is an OpenCV
  world-to-camera pose, ``intrinsics`` a 3x3 pixel matrix, both per camera serial.
* Splits (``constants.py`` and its README): participants 393, 404, 461, 477, 486; 18 train
  sequences filmed by the one training camera ``222200037``; the 4 held-out sequences ``FREE``,
  ``EMO-1-shout+laugh``, ``SEN-09-frown_events_bad``, ``SEN-10-port_strong_smokey`` come with
  tracking only (``ASSETS[...]["test_assets"]``): no images. They are rendered from the training
  camera and the hold-out cameras ``222200046``, ``220700191``, ``222200039`` for the submission.
* Tracking v2 (``FlameTracking`` in ``data/benchmark_data.py``): ``shape (1, 300)``,
  ``expression (T, 100)``, ``rotation (T, 3)``, ``rotation_matrices (T, 3, 3)``,
  ``translation (T, 3)``, ``jaw (T, 3)``, ``neck (T, 3)``, ``eyes (T, 6)``, ``frames (T,)``,
  ``scale (1, 1)``. The README only says "use v2" (v1 is deprecated).
* The mesh (``models/flame.py``, ``FlameProvider``): FLAME 2023 with 300 shape and 100
  expression coefficients; ``pose_params = [0, 0, 0, jaw]`` (the global rotation is *not* given
  to FLAME), ``neck_pose = neck``, ``eye_pose = eyes``, no FLAME translation. The model-to-world
  transform is applied afterwards: ``Pose.from_euler(rotation, translation, 'XYZ')`` (dreifus:
  scipy's ``Rotation.from_euler('XYZ', ...)``, *intrinsic* Euler angles, so
  ``R = Rx(a) Ry(b) Rz(c)``) with the rotation part multiplied by ``scale``:
  ``v_world = scale R v_flame + translation``. Rotation is therefore Euler XYZ, not axis-angle.

The :class:`Subject` holds the training camera's frames of the train sequences (there is no
ground truth for the held-out sequences in the benchmark download). Its ``head_poses`` are the
rigid part ``[R | translation]``; the head frame is FLAME's frame scaled by ``scale``, and the
template is ``scale · FLAME(shape, 0)``. The local test split is ``data.split``: ``last`` holds
out the last ``num_test`` frames of the last train sequence; ``sequences`` evaluates on the
held-out sequences' training-camera videos, for users who have them (e.g. the full NeRSemble
data). The benchmark's own score comes from the submission (``scripts/nersemble_submission.py``).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from headkit.headmodel.flame import FLAME

from .insta import (MASK_MODES, apply_mask_mode, check_choice, map_frames, normalised_times,
                    parse_image_size, resize_images, scale_intrinsics)
from .subject import Subject, SubjectError

log = logging.getLogger(__name__)

BENCHMARK = "mono_flame_avatar"
PARTICIPANTS = (393, 404, 461, 477, 486)
TRAIN_SEQUENCES = (
    "EXP-1-head", "EXP-2-eyes", "EXP-3-cheeks+nose", "EXP-4-lips", "EXP-5-mouth", "EXP-8-jaw-1",
    "EXP-9-jaw-2", "EMO-2-surprise+fear", "EMO-3-angry+sad", "EMO-4-disgust+happy",
    "SEN-01-cramp_small_danger", "SEN-02-same_phrase_thirty_times", "SEN-03-pluck_bright_rose",
    "SEN-04-two_plus_seven", "SEN-05-glow_eyes_sweet_girl", "SEN-06-problems_wise_chief",
    "SEN-07-fond_note_fried", "SEN-08-clothes_and_lodging")
TEST_SEQUENCES = ("FREE", "EMO-1-shout+laugh", "SEN-09-frown_events_bad", "SEN-10-port_strong_smokey")
TRAIN_SERIAL = "222200037"
HOLD_OUT_SERIALS = ("222200046", "220700191", "222200039")
SUBMISSION_SERIALS = (TRAIN_SERIAL, *HOLD_OUT_SERIALS)
TRACKING_NAME = "flame2023_tracking_v2.npz"
TRACKING_SHAPES = {"shape": (1, None), "expression": (None,), "rotation": (3,), "translation": (3,),
                   "jaw": (3,), "neck": (3,), "eyes": (6,), "scale": (1,)}  # per-frame trailing shape
EXPRESSION_PARTS = ("expression", "jaw", "eyes", "neck")
DOWNLOAD_HINT = "download it with the official toolkit: nersemble-benchmark-download BENCHMARK_FOLDER mono_flame_avatar"


def participant_dir(root: str | os.PathLike, participant: int) -> Path:
    """``root/mono_flame_avatar/<participant:03d>`` (``root`` may also be the ``mono_flame_avatar``
    folder itself); :class:`SubjectError` naming the missing folder otherwise."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise SubjectError(f"{root}: NeRSemble benchmark folder not found (data.root); {DOWNLOAD_HINT}")
    base = root / BENCHMARK if (root / BENCHMARK).is_dir() or root.name != BENCHMARK else root
    folder = base / f"{int(participant):03d}"
    if not folder.is_dir():
        have = sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
        raise SubjectError(f"{folder}: participant {participant} not found in the {BENCHMARK} benchmark "
                           f"folder (data.participant; found: {', '.join(have) or 'none'}); {DOWNLOAD_HINT}")
    return folder


def asset_path(folder: Path, sequence: str, asset: str, serial: str = TRAIN_SERIAL) -> Path:
    """Path of one asset (``images``, ``alpha_maps``, ``tracking``) of ``sequence`` in a participant folder."""
    seq = folder / "sequences" / sequence
    if asset == "tracking":
        return seq / "tracking" / TRACKING_NAME
    return seq / asset / f"cam_{serial}.mp4"


def require_file(path: Path, what: str, key: str | None = None) -> Path:
    """``path``, or :class:`SubjectError` naming it, what it is and how to get it."""
    if not path.is_file():
        where = f" (or leave the sequence out of {key})" if key else ""
        raise SubjectError(f"{path}: {what} not found{where}; {DOWNLOAD_HINT}")
    return path


def read_cameras(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{serial: (K [3, 3], camtoworld [4, 4])}`` (OpenCV, float64) from ``calibration/camera_params.json``."""
    path = require_file(folder / "calibration" / "camera_params.json", "camera calibration")
    try:
        params = json.loads(path.read_text())
        w2c, intrinsics = params["world_2_cam"], params["intrinsics"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise SubjectError(f"{path}: not a camera calibration with 'world_2_cam' and 'intrinsics' "
                           f"per serial ({type(exc).__name__}: {exc})") from exc
    cameras = {}
    for serial, pose in w2c.items():
        if serial not in intrinsics:
            raise SubjectError(f"{path}: camera {serial} has a 'world_2_cam' but no 'intrinsics'")
        K, w2c_m = np.asarray(intrinsics[serial], np.float64), np.asarray(pose, np.float64)
        if K.shape != (3, 3) or w2c_m.shape != (4, 4) or not (np.isfinite(K).all() and np.isfinite(w2c_m).all()):
            raise SubjectError(f"{path}: camera {serial} needs a finite 4x4 world_2_cam and 3x3 intrinsics, "
                               f"got {list(w2c_m.shape)} and {list(K.shape)}")
        cameras[str(serial)] = (K, np.linalg.inv(w2c_m))
    return cameras


def camera(cameras: dict, serial: str, folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Camera ``serial`` of :func:`read_cameras`, or :class:`SubjectError` naming the calibration file."""
    if serial not in cameras:
        raise SubjectError(f"{folder / 'calibration' / 'camera_params.json'}: no camera {serial} "
                           f"(has {', '.join(sorted(cameras))})")
    return cameras[serial]


def read_tracking(path: Path) -> dict[str, np.ndarray]:
    """The FLAME tracking arrays of one sequence (:data:`TRACKING_SHAPES`), float64, checked for
    shapes, equal frame counts and finiteness; ``shape`` and ``scale`` as ``[1, ...]``."""
    require_file(path, "FLAME tracking (flame2023_tracking_v2)")
    try:
        with np.load(path) as npz:
            data = {k: np.asarray(npz[k], np.float64) for k in TRACKING_SHAPES if k in npz.files}
    except Exception as exc:
        raise SubjectError(f"{path}: cannot read FLAME tracking ({type(exc).__name__}: {exc})") from exc
    missing = [k for k in TRACKING_SHAPES if k not in data]
    if missing:
        raise SubjectError(f"{path}: FLAME tracking lacks {', '.join(missing)}")
    data["shape"], data["scale"] = data["shape"].reshape(1, -1), data["scale"].reshape(1, 1)
    T = data["expression"].shape[0]
    for key, trailing in TRACKING_SHAPES.items():
        arr = data[key]
        rows = 1 if key in ("shape", "scale") else T
        if arr.ndim != 2 or arr.shape[0] != rows or (trailing[-1] is not None and arr.shape[1] != trailing[-1]):
            raise SubjectError(f"{path}: '{key}' has shape {list(arr.shape)}, expected "
                               f"[{rows}, {trailing[-1] or 'N'}] ({T} frames from 'expression')")
        bad = ~np.isfinite(arr).all(axis=1)
        if bad.any():
            raise SubjectError(f"{path}: NaN/Inf in '{key}' at frame {int(np.flatnonzero(bad)[0])}")
    return data


def euler_xyz(angles: np.ndarray) -> np.ndarray:  # [T, 3] -> [T, 3, 3]
    """Rotation matrices of intrinsic XYZ Euler angles, ``R = Rx(a) Ry(b) Rz(c)``: scipy's
    ``Rotation.from_euler('XYZ')``, which the toolkit's ``Pose.from_euler`` calls."""
    from scipy.spatial.transform import Rotation

    return Rotation.from_euler("XYZ", np.asarray(angles, np.float64)).as_matrix()


def head_poses(tracking: dict[str, np.ndarray]) -> np.ndarray:  # [T, 4, 4]
    """Rigid head-to-world transforms ``[R | translation]`` (scale excluded; module docstring)."""
    T = tracking["rotation"].shape[0]
    poses = np.tile(np.eye(4), (T, 1, 1))
    poses[:, :3, :3], poses[:, :3, 3] = euler_xyz(tracking["rotation"]), tracking["translation"]
    return poses


@torch.no_grad()
def world_vertices(flame: FLAME, tracking: dict[str, np.ndarray], chunk: int = 256) -> np.ndarray:  # [T, V, 3]
    """Tracked FLAME meshes in world space, as the toolkit's ``FlameProvider`` builds them:
    FLAME with zero global rotation, then ``scale R v + translation``."""
    t64 = {k: torch.from_numpy(v).float() for k, v in tracking.items()}
    T = t64["expression"].shape[0]
    poses, scale = head_poses(tracking), float(tracking["scale"][0, 0])
    out = np.empty((T, flame.v_template.shape[0], 3), np.float32)
    for s in range(0, T, chunk):
        sl = slice(s, min(T, s + chunk))
        n = sl.stop - sl.start
        v = flame(t64["shape"][:, :flame.num_shape].expand(n, -1), t64["expression"][sl, :flame.num_expression],
                  neck=t64["neck"][sl], jaw=t64["jaw"][sl], eyes=t64["eyes"][sl]).double().numpy()
        out[sl] = scale * np.einsum("tij,tvj->tvi", poses[sl, :3, :3], v) + poses[sl, None, :3, 3]
    return out


def expression_features(tracking: dict[str, np.ndarray], parts: Sequence[str]) -> np.ndarray:  # [T, E]
    """The per-frame expression vector: ``parts`` of the tracking concatenated (``data.expression_parts``)."""
    for p in parts:
        check_choice("expression_parts", p, EXPRESSION_PARTS)
    return np.concatenate([tracking[p] for p in parts], axis=1).astype(np.float32)


def read_video(path: Path, what: str, every_nth: int = 1) -> np.ndarray:  # [T, H, W, 3] uint8
    """Every ``every_nth`` frame of a video, or :class:`SubjectError` naming the file."""
    from .video.reader import iter_frames

    require_file(path, what)
    return np.stack([frame for _, frame in iter_frames(path, stride=every_nth)])


def read_sequence(folder: Path, sequence: str, flame: FLAME, parts: Sequence[str], *, images: bool,
                  serial: str = TRAIN_SERIAL, every_nth: int = 1, key: str = "data.train_sequences") -> dict[str, Any]:
    """One sequence's per-frame arrays: ``vertices [T, V, 3]`` (world), ``expressions [T, E]``,
    ``head_poses [T, 4, 4]``, the ``tracking`` itself, and with ``images`` the ``serial``
    camera's ``images [T, H, W, 3]`` and ``alphas [T, H, W]`` (uint8). Errors name the file;
    a missing sequence folder names ``key``, the setting that lists it."""
    if not (folder / "sequences" / sequence).is_dir():
        raise SubjectError(f"{folder / 'sequences' / sequence}: sequence '{sequence}' not found "
                           f"(listed in {key}); {DOWNLOAD_HINT}")
    path = asset_path(folder, sequence, "tracking")
    tracking = read_tracking(path)
    tracking = {k: (v if k in ("shape", "scale") else v[::every_nth]) for k, v in tracking.items()}
    out: dict[str, Any] = {"tracking": tracking, "vertices": world_vertices(flame, tracking),
                           "expressions": expression_features(tracking, parts), "head_poses": head_poses(tracking)}
    if images:
        video = asset_path(folder, sequence, "images", serial)
        out["images"] = read_video(video, f"video of camera {serial}", every_nth)
        alpha = np.ascontiguousarray(read_video(asset_path(folder, sequence, "alpha_maps", serial),
                                                f"alpha map of camera {serial}", every_nth)[..., 0])
        counts = {"images": len(out["images"]), "alpha_maps": len(alpha), "tracking": len(out["vertices"])}
        if len(set(counts.values())) > 1:
            listed = ", ".join(f"{k}: {v}" for k, v in counts.items())
            raise SubjectError(f"{video.parent.parent}: frame counts differ ({listed}"
                               f"{'' if every_nth == 1 else f' after taking every {every_nth}th frame'})")
        if alpha.shape != out["images"].shape[:3]:
            raise SubjectError(f"{video.parent.parent}: alpha maps are {list(alpha.shape[1:])} but images "
                               f"{list(out['images'].shape[1:3])} (HxW)")
        out["alphas"] = alpha
    return out


def load_nersemble_mono(
    root: str | os.PathLike,
    participant: int,
    flame_model: str | os.PathLike,
    *,
    train_sequences: Sequence[str] = TRAIN_SEQUENCES,
    test_sequences: Sequence[str] = TEST_SEQUENCES,
    split: str = "last",
    num_test: int = 50,
    serial: str = TRAIN_SERIAL,
    every_nth: int = 1,
    image_size: int | Sequence[int] | None = None,
    expression_parts: Sequence[str] = ("expression", "jaw", "eyes"),
    mask_mode: str = "soft",
    fps: float = 24.3,
    num_workers: int = 4,
) -> Subject:
    """Read one participant of the Monocular FLAME Avatar benchmark into a validated :class:`Subject`.

    Args:
        root: the benchmark folder (holding ``mono_flame_avatar/``), as the toolkit downloads it.
        participant: participant id (393, 404, 461, 477 or 486 in the benchmark).
        flame_model: the user's FLAME 2023 model file (``flame2023.pkl``); never shipped.
        train_sequences: sequences whose training-camera frames are the training data (default:
            the benchmark's 18).
        test_sequences: the held-out sequences (default: the benchmark's 4); read only with
            ``split="sequences"`` (their videos are not part of the benchmark download).
        split: ``"last"`` holds out the last ``num_test`` frames of the last train sequence for
            local evaluation; ``"sequences"`` evaluates on ``test_sequences``' training-camera videos.
        num_test: frames held out with ``split="last"``.
        serial: the camera whose videos are read (the benchmark's only training camera).
        every_nth: keep every n-th frame of each sequence (memory: ~2,500 train frames at 512²).
        image_size: optional ``(height, width)`` or one int; images, masks and K are resized.
        expression_parts: tracking fields concatenated into the expression vector
            (``expression`` 100, ``jaw`` 3, ``eyes`` 6, ``neck`` 3).
        mask_mode: ``"soft"`` keeps the alpha maps; ``"binary"``: alpha 255 only is foreground.
        fps: frame rate recorded on the subject (the toolkit writes submissions at 24.3).
        num_workers: threads that resize frames.

    Times are the normalised positions on one axis through the sequences in the given order;
    ``meta`` lists each frame's ``sequences`` entry and ``frame_in_sequence``.
    """
    train_sequences, test_sequences = list(train_sequences), list(test_sequences)
    _check_settings(split, mask_mode, every_nth, train_sequences)
    folder = participant_dir(root, participant)
    K, c2w = camera(read_cameras(folder), serial, folder)
    flame = FLAME(flame_model)
    seqs = [(name, "data.train_sequences") for name in train_sequences]
    if split == "sequences":
        seqs += [(name, "data.test_sequences") for name in test_sequences]
    read = [read_sequence(folder, name, flame, expression_parts, images=True, serial=serial,
                          every_nth=int(every_nth), key=key) for name, key in seqs]
    sizes = {r["images"].shape[1:3] for r in read}
    if len(sizes) > 1:
        raise SubjectError(f"{folder}: the videos of camera {serial} differ in size ({sorted(sizes)}); "
                           f"one subject has one image size")
    (H, W), = sizes
    size = (H, W) if image_size is None else parse_image_size(image_size)
    images, masks = _frames(read, size, mask_mode, num_workers)
    lengths = [len(r["vertices"]) for r in read]
    T = sum(lengths)
    train_ids, test_ids = _split(lengths, train_sequences, split, num_test, folder)
    subject = Subject(
        name=f"nersemble_{int(participant):03d}",
        faces=flame.faces.numpy().copy(),
        template_vertices=_template(flame, read[0]["tracking"]),
        vertices=np.concatenate([r["vertices"] for r in read]),
        expressions=np.concatenate([r["expressions"] for r in read]),
        Ks=np.tile(scale_intrinsics(K[None], (H, W), size)[0], (T, 1, 1)).astype(np.float32),
        camtoworlds=np.tile(c2w, (T, 1, 1)).astype(np.float32),
        times=normalised_times(np.arange(T)),
        images=images, masks=masks, train_ids=train_ids, test_ids=test_ids, fps=float(fps),
        head_poses=np.concatenate([r["head_poses"] for r in read]).astype(np.float32),
        meta={"source": "nersemble_mono", "root": str(folder), "participant": int(participant),
              "serial": serial, "split": split, "every_nth": int(every_nth), "original_size": [H, W],
              "sequences": [name for (name, _), n in zip(seqs, lengths) for _ in range(n)],
              "frame_in_sequence": [int(i) for n in lengths for i in range(0, n * int(every_nth), int(every_nth))],
              "expression_parts": list(expression_parts), "flame_model": str(flame_model),
              "mask_mode": mask_mode},
    )
    return subject.validate(str(folder))


def _frames(read: list[dict], size: tuple[int, int], mask_mode: str, num_workers: int) -> tuple[np.ndarray, np.ndarray]:
    """All sequences' images ``[T, H', W', 3]`` and masks ``[T, H', W']`` at ``size`` (uint8).

    Each sequence's full-size frames are dropped from ``read`` once copied, so memory peaks at
    the output plus one sequence."""
    T = sum(len(r["images"]) for r in read)
    images, masks = np.empty((T, *size, 3), np.uint8), np.empty((T, *size), np.uint8)
    resized = tuple(size) != read[0]["alphas"].shape[1:]
    start = 0
    for r in read:
        seq_images, seq_alphas = r.pop("images"), r.pop("alphas")

        def one(i: int) -> None:
            mask = apply_mask_mode(seq_alphas[i], mask_mode)
            t = start + i
            images[t], masks[t] = (x[0] for x in resize_images(seq_images[i][None], mask[None], size))
            if mask_mode == "binary" and resized:
                masks[t] = apply_mask_mode(masks[t], mask_mode, resized=True)

        map_frames(one, len(seq_images), num_workers)
        start += len(seq_images)
    return images, masks


def _check_settings(split: str, mask_mode: str, every_nth: int, train_sequences: list[str]) -> None:
    """Bad ``data.*`` values raise errors naming the key, before any file is read."""
    from headkit.errors import InvalidConfigValue

    check_choice("split", split, ("last", "sequences"))
    check_choice("mask_mode", mask_mode, MASK_MODES)
    if int(every_nth) < 1:
        raise InvalidConfigValue(f"data.every_nth must be >= 1, got {every_nth!r}")
    if not train_sequences:
        raise InvalidConfigValue("data.train_sequences is empty: the NeRSemble subject needs at least one")


def _split(lengths: list[int], train_sequences: list[str], split: str, num_test: int,
           folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Train and test frame ids under ``data.split`` (see :func:`load_nersemble_mono`)."""
    T, n_train = sum(lengths), sum(lengths[:len(train_sequences)])
    if split == "sequences":
        return np.arange(n_train), np.arange(n_train, T)
    last = lengths[len(train_sequences) - 1]
    if not 0 < num_test < last:
        raise SubjectError(f"{folder}: data.num_test={num_test} of the {last} frames of the last train "
                           f"sequence '{train_sequences[-1]}' leaves {'no test' if num_test <= 0 else 'no train'} "
                           f"frames of it (data.split=last)")
    return np.arange(T - num_test), np.arange(T - num_test, T)


@torch.no_grad()
def _template(flame: FLAME, tracking: dict[str, np.ndarray]) -> np.ndarray:  # [V, 3] float32
    """The neutral head in the head frame: ``scale · FLAME(shape, 0)`` of a sequence's tracking."""
    shape = torch.from_numpy(tracking["shape"][:, :flame.num_shape]).float()
    neutral = flame(shape, torch.zeros(1, flame.num_expression))[0].double().numpy()
    return (float(tracking["scale"][0, 0]) * neutral).astype(np.float32)
