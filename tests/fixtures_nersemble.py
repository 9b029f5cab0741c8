"""Tiny fixtures in the NeRSemble Monocular FLAME Avatar layout and a random model in FLAME's
file format. No real FLAME asset or benchmark data is used: the model is an icosphere "head"
with random blendshapes, the videos are a few 32x32 frames written with imageio."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np

from headkit.mesh import icosphere

TRAIN = ("EXP-1-head", "EXP-2-eyes")
TEST = ("FREE", "EMO-1-shout+laugh")
PARTICIPANT = 393
TRAIN_SERIAL, HOLD_OUT = "222200037", ("222200046", "220700191", "222200039")
SIZE = 32
FOCAL = 80.0
CAM_DISTANCE = 1.0


def random_flame_model(seed: int = 0, subdivisions: int = 2, num_shape: int = 300, num_expr: int = 100) -> dict:
    """A random model with FLAME's entries, shapes and joint layout (root, neck, jaw, two eyes)."""
    rng = np.random.default_rng(seed)
    v, f = icosphere(subdivisions, radius=0.1)
    v = v.double().numpy()
    V = len(v)
    joints_at = np.array([[0, 0, 0], [0, 0.08, 0], [0, 0.05, -0.06], [0.03, -0.02, -0.08], [-0.03, -0.02, -0.08]])
    J_regressor = np.zeros((5, V))
    for j, p in enumerate(joints_at):  # each joint: the mean of its 6 nearest vertices
        near = np.argsort(np.linalg.norm(v - p, axis=1))[:6]
        J_regressor[j, near] = 1 / 6
    weights = rng.uniform(0, 1, (V, 5)) ** 4
    weights /= weights.sum(1, keepdims=True)
    return {
        "v_template": v,
        "shapedirs": rng.normal(0, 1e-3, (V, 3, num_shape + num_expr)),
        "posedirs": rng.normal(0, 1e-3, (V, 3, 36)),
        "J_regressor": J_regressor,
        "weights": weights,
        "kintree_table": np.array([[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]], np.int64),
        "f": f.numpy().astype(np.uint32),
        "bs_style": "lbs", "bs_type": "lrotmin",
    }


def write_flame_pickle(path: Path, seed: int = 0, sparse_regressor: bool = True) -> dict:
    """Pickle :func:`random_flame_model` as FLAME files are (latin-1 safe protocol 2, J_regressor
    a scipy CSC matrix); returns the dense arrays."""
    model = random_flame_model(seed)
    stored = dict(model)
    if sparse_regressor:
        import scipy.sparse as sp
        stored["J_regressor"] = sp.csc_matrix(model["J_regressor"])
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        pickle.dump(stored, fh, protocol=2)
    return model


def write_video(path: Path, frames: np.ndarray) -> None:
    """uint8 frames ``[T, H, W, 3]`` as an H.264 MP4 (imageio-ffmpeg)."""
    import imageio.v2 as imageio
    path.parent.mkdir(parents=True, exist_ok=True)
    with imageio.get_writer(path, fps=24.3, codec="libx264", quality=10, macro_block_size=1) as w:
        for frame in frames:
            w.append_data(frame)


def camera_params() -> dict:
    """Four cameras on a circle around the origin, looking at it (OpenCV world_2_cam)."""
    w2c, intr = {}, {}
    for serial, yaw in zip((TRAIN_SERIAL, *HOLD_OUT), (0.0, -0.5, 0.25, 0.5)):
        c, s = np.cos(yaw), np.sin(yaw)
        R = np.array([[c, 0, -s], [0, 1, 0], [s, 0, c]])  # world -> camera, camera looks down +z at the origin
        m = np.eye(4)
        m[:3, :3], m[:3, 3] = R, [0, 0, CAM_DISTANCE]
        w2c[serial] = m.tolist()
        intr[serial] = [[FOCAL, 0, SIZE / 2], [0, FOCAL, SIZE / 2], [0, 0, 1]]
    return {"world_2_cam": w2c, "intrinsics": intr}


def tracking(T: int, seed: int) -> dict[str, np.ndarray]:
    """Small random FLAME 2023 tracking v2 with the toolkit's keys and shapes."""
    rng = np.random.default_rng(seed)
    return {
        "shape": np.zeros((1, 300), np.float32) + rng.normal(0, 0.5, (1, 300)).astype(np.float32),
        "expression": rng.normal(0, 0.5, (T, 100)).astype(np.float32),
        "rotation": rng.normal(0, 0.05, (T, 3)).astype(np.float32),
        "rotation_matrices": np.tile(np.eye(3, dtype=np.float32), (T, 1, 1)),
        "translation": rng.normal(0, 0.01, (T, 3)).astype(np.float32),
        "jaw": np.abs(rng.normal(0, 0.05, (T, 3))).astype(np.float32),
        "frames": np.arange(T, dtype=np.int32) * 3,
        "scale": np.full((1, 1), 1.2, np.float32),
        "neck": rng.normal(0, 0.02, (T, 3)).astype(np.float32),
        "eyes": rng.normal(0, 0.02, (T, 6)).astype(np.float32),
    }


def write_benchmark(root: Path, frames: int = 4, test_videos: bool = False, seed: int = 0) -> dict:
    """A benchmark folder as ``nersemble-benchmark-download root mono_flame_avatar`` leaves it for
    one participant: calibration; train sequences with the training camera's video, alpha map
    and tracking; test sequences with tracking only (``test_videos``: also the training camera's
    videos, as the full data has them). Returns paths and the FLAME arrays."""
    rng = np.random.default_rng(seed)
    pdir = root / "mono_flame_avatar" / f"{PARTICIPANT:03d}"
    (pdir / "calibration").mkdir(parents=True)
    (pdir / "calibration" / "camera_params.json").write_text(json.dumps(camera_params()))
    flame_path = root.parent / f"{root.name}_flame2023.pkl"
    model = write_flame_pickle(flame_path, seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    disc = ((yy - SIZE / 2 + 0.5) ** 2 + (xx - SIZE / 2 + 0.5) ** 2) < (SIZE * 0.3) ** 2
    for i, seq in enumerate(TRAIN + TEST):
        sdir = pdir / "sequences" / seq
        (sdir / "tracking").mkdir(parents=True)
        np.savez(sdir / "tracking" / "flame2023_tracking_v2.npz", **tracking(frames + i, seed + i))
        if seq in TRAIN or test_videos:
            T = frames + i
            images = np.full((T, SIZE, SIZE, 3), 255, np.uint8)
            images[:, disc] = rng.integers(60, 200, (T, 1, 3), dtype=np.uint8)
            alpha = np.repeat((disc * 255).astype(np.uint8)[None, ..., None], 3, -1).repeat(T, 0)
            write_video(sdir / "images" / f"cam_{TRAIN_SERIAL}.mp4", images)
            write_video(sdir / "alpha_maps" / f"cam_{TRAIN_SERIAL}.mp4", alpha)
    return {"root": root, "participant_dir": pdir, "flame_model": flame_path, "model": model}
