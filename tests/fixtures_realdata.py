"""Writers of tiny INSTA and NBS/metrical-tracker subjects in exactly their on-disk layouts.

No real or licence-restricted data: the "head" is an octahedron, images are noise, and
every tracked quantity is drawn from a seeded generator. Each writer returns the ground truth
it wrote (values as they read back from the written text, e.g. 6 significant digits for
Open3D OBJ files), and, with ``corrupt``, the path of the file it broke, so tests can check
that error messages name it.
"""

from __future__ import annotations

import io
import json
import zipfile
from fractions import Fraction
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch
from plyfile import PlyData, PlyElement

OCTAHEDRON_VERTICES = np.array(
    [[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], np.float64) * 0.1
OCTAHEDRON_FACES = np.array(
    [[0, 2, 4], [2, 1, 4], [1, 3, 4], [3, 0, 4], [2, 0, 5], [1, 2, 5], [3, 1, 5], [0, 3, 5]], np.int64)

INSTA_CORRUPTIONS = ("missing_image", "missing_mesh", "missing_exp", "wrong_vertex_count",
                     "nan_exp", "nan_vertices", "nan_camera", "image_size", "no_alpha", "bad_json",
                     "missing_key", "exp_size")
NBS_CORRUPTIONS = ("missing_image", "missing_mask", "missing_mesh", "missing_frame",
                   "wrong_vertex_count", "nan_exp", "nan_camera", "nan_vertices", "image_size",
                   "missing_key", "truncated_frame", "unsafe_pickle")


def opencv_look_at(center: np.ndarray, target: np.ndarray, up: np.ndarray) -> np.ndarray:
    """OpenCV camera-to-world ``[4, 4]``: z towards ``target``, y along ``-up`` (image down)."""
    z = target - center
    z = z / np.linalg.norm(z)
    y = -up - np.dot(-up, z) * z
    y = y / np.linalg.norm(y)
    x = np.cross(y, z)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = x, y, z, center
    return c2w


def _tracked_frames(rng: np.random.Generator, T: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Canonical vertices ``[V, 3]``, per-frame vertices ``[T, V, 3]`` and OpenCV c2w ``[T, 4, 4]``."""
    canonical = OCTAHEDRON_VERTICES + rng.normal(0, 0.005, OCTAHEDRON_VERTICES.shape)
    vertices = canonical[None] + rng.normal(0, 0.01, (T, len(canonical), 3))
    c2ws = []
    for _ in range(T):
        center = np.array([0.0, 0.0, 1.0]) + rng.normal(0, 0.1, 3)
        c2ws.append(opencv_look_at(center, rng.normal(0, 0.01, 3), np.array([0.0, 1.0, 0.0])))
    return canonical, vertices, np.stack(c2ws)


def _images(rng: np.random.Generator, T: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Noise RGB ``[T, H, W, 3]`` and soft disc masks ``[T, H, W]`` (values 0, 128, 255)."""
    rgb = rng.integers(0, 256, (T, height, width, 3), dtype=np.uint8)
    ii, jj = np.mgrid[:height, :width]
    masks = np.zeros((T, height, width), np.uint8)
    for t in range(T):
        r = np.hypot(ii - height / 2 - t % 3, jj - width / 2)
        masks[t] = np.where(r < height / 3, 255, np.where(r < height / 3 + 1.5, 128, 0))
    return rgb, masks


def _g6(x: float) -> str:
    return "nan" if np.isnan(x) else f"{x:.6g}"  # C++ ostream default: 6 significant digits


def write_open3d_obj(path: Path, vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Write an OBJ as Open3D's ``write_triangle_mesh`` does (INSTA's meshes/canonical.obj).

    Returns the vertices as they read back from the text (6 significant digits).
    """
    name = path.stem
    lines = ["# Created by Open3D ", f"# object name: {name}", f"# number of vertices: {len(vertices)}",
             f"# number of triangles: {len(faces)}", f"mtllib {name}.mtl"]
    lines += ["v " + " ".join(_g6(c) for c in v) for v in vertices]
    lines += [f"usemtl {name}_0"] + [f"f {a + 1} {b + 1} {c + 1}" for a, b, c in faces]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    (path.parent / f"{name}.mtl").write_text(
        f"# Created by Open3D \n# object name: {name}\nnewmtl {name}_0\nKa 1.000 1.000 1.000\n"
        "Kd 1.000 1.000 1.000\nKs 0.000 0.000 0.000\n")
    return np.array([[float(_g6(c)) for c in v] for v in vertices])


def write_trimesh_obj(path: Path, vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Write an OBJ as trimesh's exporter does (metrical-tracker's canonical.obj); 8 decimals."""
    lines = ["# https://github.com/mikedh/trimesh"]
    lines += ["v " + " ".join(f"{c:.8f}" for c in v) for v in vertices]
    lines += [f"f {a + 1} {b + 1} {c + 1}" for a, b, c in faces]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return np.array([[float(f"{c:.8f}") for c in v] for v in vertices])


def write_trimesh_ply(path: Path, vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Write a binary PLY as trimesh's exporter does (metrical-tracker's mesh/%05d.ply).

    float32 ``x, y, z`` and ``list uchar int vertex_indices``; returns the float32 vertices.
    """
    verts32 = np.asarray(vertices, np.float32)
    vdata = np.empty(len(verts32), dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4")])
    vdata["x"], vdata["y"], vdata["z"] = verts32.T
    fdata = np.empty(len(faces), dtype=[("vertex_indices", "i4", (3,))])
    fdata["vertex_indices"] = faces
    path.parent.mkdir(parents=True, exist_ok=True)
    PlyData([PlyElement.describe(vdata, "vertex"),
             PlyElement.describe(fdata, "face", len_types={"vertex_indices": "u1"},
                                 val_types={"vertex_indices": "i4"})],
            text=False, byte_order="<", comments=["https://github.com/mikedh/trimesh"]).write(str(path))
    return verts32.astype(np.float64)


def write_insta_fixture(
    root: str | Path,
    *,
    num_frames: int = 6,
    width: int = 32,
    height: int = 24,
    expression_dim: int = 5,
    num_test: int = 2,
    seed: int = 0,
    frame_numbers: list[int] | None = None,
    split_files: bool = True,
    with_canonical: bool = True,
    shuffle: bool = False,
    convention: str = "opencv",
    corrupt: str | None = None,
) -> dict:
    """Write a tiny INSTA subject folder (INSTA's ``scripts/transforms.py`` + ``generate.sh`` layout).

    ``transforms.json`` always; with ``split_files`` also ``transforms_{train,test,val}.json``
    (train = all but the last ``num_test`` list entries, val = the last 20, as INSTA does).
    ``shuffle`` scrambles the order of the frame lists (INSTA builds them with
    ``imap_unordered``). ``convention="opengl"`` writes NeRF/Blender camera axes instead of
    INSTA's OpenCV ones. ``corrupt`` (one of :data:`INSTA_CORRUPTIONS`) breaks frame 2.

    Returns the truth: ``root, faces, canonical, vertices [T, V, 3], expressions [T, E],
    camtoworlds [T, 4, 4] (OpenCV), Ks [T, 3, 3], images [T, H, W, 3], masks [T, H, W],
    frame_numbers, test_numbers, corrupt_path``.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    T = num_frames
    numbers = list(range(T)) if frame_numbers is None else list(frame_numbers)
    assert len(numbers) == T
    canonical, vertices, c2ws = _tracked_frames(rng, T)
    expressions = rng.normal(0, 1, (T, expression_dim))
    rgb, masks = _images(rng, T, height, width)
    fl_x, fl_y, cx, cy = 40.0, 42.0, width / 2 + 1.25, height / 2 - 0.75
    K = np.array([[fl_x, 0, cx], [0, fl_y, cy], [0, 0, 1]])
    bad = 2 if corrupt else -1
    corrupt_path: Path | None = None
    ids = [f"{n:05d}" for n in numbers]

    for dirname in ("images", "meshes", "flame/exp", "depth", "seg_mask"):
        (root / dirname).mkdir(parents=True, exist_ok=True)
    truth_vertices = np.empty_like(vertices)
    truth_exps = np.empty_like(expressions)
    for t, fid in enumerate(ids):
        image = np.concatenate([rgb[t], masks[t][..., None]], axis=-1)
        if t == bad and corrupt == "image_size":
            image = np.zeros((height + 2, width, 4), np.uint8)
        if t == bad and corrupt == "no_alpha":
            image = image[..., :3]
        iio.imwrite(root / "images" / f"{fid}.png", image)
        iio.imwrite(root / "depth" / f"{fid}.png", np.zeros((height, width), np.uint16))
        iio.imwrite(root / "seg_mask" / f"{fid}.png", np.zeros((height, width, 3), np.uint8))
        verts, faces = vertices[t].copy(), OCTAHEDRON_FACES
        if t == bad and corrupt == "wrong_vertex_count":
            verts, faces = verts[:5], OCTAHEDRON_FACES[(OCTAHEDRON_FACES < 5).all(axis=1)]
        if t == bad and corrupt == "nan_vertices":
            verts[1, 2] = np.nan
        written = write_open3d_obj(root / "meshes" / f"{fid}.obj", verts, faces)
        if written.shape == truth_vertices[t].shape:
            truth_vertices[t] = written
        coeffs = expressions[t].copy()
        if t == bad and corrupt == "nan_exp":
            coeffs[1] = np.nan
        if t == bad and corrupt == "exp_size":
            coeffs = np.append(coeffs, 0.5)
        np.savetxt(root / "flame" / "exp" / f"{fid}.txt", coeffs, fmt="%.8f")  # as transforms.py
        truth_exps[t] = np.round(expressions[t], 8)

    c2w_written = c2ws @ np.diag([1.0, -1.0, -1.0, 1.0]) if convention == "opengl" else c2ws
    frames = []
    for t, fid in enumerate(ids):
        frame = {"transform_matrix": c2w_written[t].tolist(), "file_path": f"images/{fid}.png",
                 "mesh_path": f"meshes/{fid}.obj", "exp_path": f"flame/exp/{fid}.txt",
                 "depth_path": f"depth/{fid}.png", "seg_mask_path": f"seg_mask/{fid}.png"}
        if t == bad and corrupt == "nan_camera":
            frame["transform_matrix"][1][3] = float("nan")  # Python's json writes NaN
        if t == bad and corrupt == "missing_key":
            del frame["mesh_path"]
        frames.append(frame)
    data = {"w": float(width), "h": float(height), "cx": cx, "cy": cy, "fl_x": fl_x, "fl_y": fl_y,
            "camera_angle_x": 2 * np.arctan(width / (2 * fl_x)),
            "camera_angle_y": 2 * np.arctan(height / (2 * fl_y)),
            "x_fov": float(np.degrees(2 * np.arctan(width / (2 * fl_x)))),
            "y_fov": float(np.degrees(2 * np.arctan(height / (2 * fl_y)))),
            "integer_depth_scale": 0.001}
    order = list(rng.permutation(T)) if shuffle else list(range(T))

    def dump(name: str, subset: list[dict]) -> None:
        (root / name).write_text(json.dumps({**data, "frames": subset}, indent=4, sort_keys=True))

    listed = [frames[i] for i in order]
    dump("transforms.json", listed)
    if split_files:
        dump("transforms_train.json", listed[:-num_test])
        dump("transforms_test.json", listed[-num_test:])
        dump("transforms_val.json", listed[-20:])
    canonical_written = None
    if with_canonical:
        canonical_written = write_open3d_obj(root / "canonical.obj", canonical, OCTAHEDRON_FACES)

    if corrupt is not None:
        fid = ids[bad]
        corrupt_path = {
            "missing_image": root / "images" / f"{fid}.png", "missing_mesh": root / "meshes" / f"{fid}.obj",
            "missing_exp": root / "flame" / "exp" / f"{fid}.txt",
            "wrong_vertex_count": root / "meshes" / f"{fid}.obj",
            "nan_exp": root / "flame" / "exp" / f"{fid}.txt", "nan_vertices": root / "meshes" / f"{fid}.obj",
            "nan_camera": root / ("transforms_train.json" if split_files else "transforms.json"),
            "image_size": root / "images" / f"{fid}.png", "no_alpha": root / "images" / f"{fid}.png",
            "bad_json": root / ("transforms_train.json" if split_files else "transforms.json"),
            "missing_key": root / ("transforms_train.json" if split_files else "transforms.json"),
            "exp_size": root / "flame" / "exp" / f"{fid}.txt",
        }[corrupt]
        if corrupt.startswith("missing_") and corrupt != "missing_key":
            corrupt_path.unlink()
        if corrupt == "bad_json":
            corrupt_path.write_text(corrupt_path.read_text()[:-40])

    return {"root": root, "faces": OCTAHEDRON_FACES, "canonical": canonical_written,
            "vertices": truth_vertices, "expressions": truth_exps, "camtoworlds": c2ws,
            "Ks": np.tile(K, (T, 1, 1)), "images": rgb, "masks": masks, "frame_numbers": numbers,
            "test_numbers": sorted(numbers[i] for i in order[-num_test:]), "corrupt_path": corrupt_path}


def _numpy1_pickle_names(path: Path) -> None:
    """Rewrite a torch.save zip so its pickle names numpy 1's modules (``numpy.core``), as the
    .frame files tracked before numpy 2 do."""
    raw = path.read_bytes()
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(raw)) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith("data.pkl"):
                # numpy 2 pickles name numpy._core; numpy 1 already writes numpy.core
                assert b"numpy._core.multiarray" in data or b"numpy.core.multiarray" in data
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            zout.writestr(item, data)
    path.write_bytes(out.getvalue())


def write_nbs_fixture(
    root: str | Path,
    *,
    num_frames: int = 6,
    width: int = 32,
    height: int = 24,
    num_exp: int = 5,
    seed: int = 0,
    tracker_root: str | Path | None = None,
    with_canonical: bool = True,
    tensor_values: bool = False,
    numpy1_names: bool = False,
    corrupt: str | None = None,
) -> dict:
    """Write a tiny NBS subject plus a metrical-tracker re-track in their real layouts.

    ``root/head_neck_imgs/%05d.png`` and ``root/head_neck_mask/%05d.png``;
    ``tracker_root`` (default ``root``) gets ``checkpoint/%05d.frame`` (metrical-tracker's
    ``save_checkpoint`` dict: ``flame``, ``camera``, ``opencv``, ``img_size = (h, w)``,
    ``frame_id``, ``global_step``), ``mesh/%05d.ply`` (trimesh binary PLY) and
    ``canonical.obj``. ``tensor_values`` stores torch tensors instead of numpy arrays;
    ``numpy1_names`` makes the pickles name ``numpy.core`` as files written under numpy 1 do.
    ``corrupt`` (one of :data:`NBS_CORRUPTIONS`) breaks frame 2.

    Returns the truth: ``root, tracker_root, faces, canonical, vertices, parts`` (dict of the
    flame entries per frame), ``expressions`` (``concat(exp, eyes, eyelids, jaw)``),
    ``camtoworlds``, ``Ks``, ``images``, ``masks``, ``corrupt_path``.
    """
    root = Path(root)
    tracker = root if tracker_root is None else Path(tracker_root)
    rng = np.random.default_rng(seed)
    T = num_frames
    canonical, vertices, c2ws = _tracked_frames(rng, T)
    rgb, masks = _images(rng, T, height, width)
    masks = np.where(masks > 0, 255, 0).astype(np.uint8)  # NBS masks are binary
    parts = {"exp": rng.normal(0, 1, (T, num_exp)), "eyes": rng.normal(0, 0.1, (T, 12)),
             "eyelids": rng.uniform(0, 1, (T, 2)), "jaw": rng.normal(0, 0.1, (T, 6))}
    parts = {k: v.astype(np.float32) for k, v in parts.items()}
    bad = 2 if corrupt else -1
    for d in (root / "head_neck_imgs", root / "head_neck_mask", tracker / "checkpoint", tracker / "mesh"):
        d.mkdir(parents=True, exist_ok=True)

    truth_vertices = np.empty_like(vertices)
    Ks = np.empty((T, 3, 3))
    for t in range(T):
        fid = f"{t:05d}"
        iio.imwrite(root / "head_neck_imgs" / f"{fid}.png", rgb[t])
        iio.imwrite(root / "head_neck_mask" / f"{fid}.png", masks[t])
        verts, faces = vertices[t].copy(), OCTAHEDRON_FACES
        if t == bad and corrupt == "wrong_vertex_count":
            verts, faces = verts[:5], OCTAHEDRON_FACES[(OCTAHEDRON_FACES < 5).all(axis=1)]
        if t == bad and corrupt == "nan_vertices":
            verts[3, 0] = np.nan
        written = write_trimesh_ply(tracker / "mesh" / f"{fid}.ply", verts, faces)
        if written.shape == truth_vertices[t].shape:
            truth_vertices[t] = written

        w2c = np.linalg.inv(c2ws[t])
        fx, fy = 40.0 + t, 41.0 + t
        K = np.array([[fx, 0, width / 2 + 0.5], [0, fy, height / 2 - 0.25], [0, 0, 1]])
        Ks[t] = K.astype(np.float32)
        flame = {"exp": parts["exp"][t][None], "shape": rng.normal(0, 1, (1, 7)).astype(np.float32),
                 "tex": rng.normal(0, 1, (1, 3)).astype(np.float32),
                 "sh": rng.normal(0, 1, (1, 9, 3)).astype(np.float32),
                 "eyes": parts["eyes"][t][None].copy(), "eyelids": parts["eyelids"][t][None],
                 "jaw": parts["jaw"][t][None]}
        opencv = {"R": w2c[None, :3, :3].astype(np.float32), "t": w2c[None, :3, 3].astype(np.float32),
                  "K": K[None].astype(np.float32)}
        img_size = np.array([height, width])  # metrical-tracker: (height, width)
        if t == bad and corrupt == "nan_exp":
            flame["eyes"][0, 4] = np.nan
        if t == bad and corrupt == "nan_camera":
            opencv["t"][0, 1] = np.nan
        if t == bad and corrupt == "image_size":
            img_size = np.array([height + 4, width])
        if t == bad and corrupt == "missing_key":
            del flame["eyelids"]
        payload = {
            "flame": flame,
            "camera": {"R": rng.normal(0, 1, (1, 6)).astype(np.float32),
                       "t": w2c[None, :3, 3].astype(np.float32), "fl": np.array([[fx / width]], np.float32),
                       "pp": np.zeros((1, 2), np.float32)},
            "opencv": opencv, "img_size": img_size, "frame_id": fid, "global_step": 100 * t,
        }
        if tensor_values:
            payload = {k: ({kk: torch.from_numpy(np.ascontiguousarray(vv)) for kk, vv in v.items()}
                           if isinstance(v, dict) else (torch.from_numpy(v) if isinstance(v, np.ndarray) else v))
                       for k, v in payload.items()}
        if t == bad and corrupt == "unsafe_pickle":
            payload["note"] = Fraction(1, 3)  # any class outside the numpy/torch allow-list
        path = tracker / "checkpoint" / f"{fid}.frame"
        torch.save(payload, path)
        if numpy1_names and not tensor_values:
            _numpy1_pickle_names(path)

    canonical_written = None
    if with_canonical:
        canonical_written = write_trimesh_obj(tracker / "canonical.obj", canonical, OCTAHEDRON_FACES)

    corrupt_path = None
    if corrupt is not None:
        fid = f"{bad:05d}"
        corrupt_path = {
            "missing_image": root / "head_neck_imgs" / f"{fid}.png",
            "missing_mask": root / "head_neck_mask" / f"{fid}.png",
            "missing_mesh": tracker / "mesh" / f"{fid}.ply",
            "missing_frame": tracker / "checkpoint" / f"{fid}.frame",
            "wrong_vertex_count": tracker / "mesh" / f"{fid}.ply",
            "nan_vertices": tracker / "mesh" / f"{fid}.ply",
            "image_size": root / "head_neck_imgs" / f"{fid}.png",
        }.get(corrupt, tracker / "checkpoint" / f"{fid}.frame")
        if corrupt.startswith("missing_") and corrupt != "missing_key":
            corrupt_path.unlink()
        if corrupt == "truncated_frame":
            corrupt_path.write_bytes(corrupt_path.read_bytes()[:200])

    expressions = np.concatenate([parts[k] for k in ("exp", "eyes", "eyelids", "jaw")], axis=1)
    return {"root": root, "tracker_root": tracker, "faces": OCTAHEDRON_FACES, "canonical": canonical_written,
            "vertices": truth_vertices, "parts": parts, "expressions": expressions, "camtoworlds": c2ws,
            "Ks": Ks, "images": rgb, "masks": masks, "corrupt_path": corrupt_path}
