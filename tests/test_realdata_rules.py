"""INSTA and NBS exactly as the paper's code reads them (issue #14).

Every fixture is written here, file by file, in the upstream layouts: INSTA's generator output
(``transforms*.json`` in pool completion order, RGBA ``images/`` with a soft matte rim, Open3D
OBJs from ``simplification.py`` with vertices in no triangle), NeRFBlendShape's ``transforms.json``
(``img_id``, ``exp_ori``), metrical-tracker's ``checkpoint/*.frame``, ``mesh/*.ply``,
``canonical.obj`` and ``input/*.png`` (cropped frames). Nothing goes through the project's own
subject writer. The head is a small icosphere whose front cap lost its triangles (INSTA's
isolated eye vertices), so the experiment configs can train on it a few steps.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from fixtures_realdata import (opencv_look_at, write_open3d_obj, write_trimesh_obj,  # noqa: E402
                               write_trimesh_ply)
from headkit.data.dataset import FrameDataset  # noqa: E402
from headkit.data.insta import load_insta, normalised_times  # noqa: E402
from headkit.data.nbs import load_nbs  # noqa: E402
from headkit.data.subject import SubjectError  # noqa: E402
from headkit.errors import InvalidConfigValue  # noqa: E402
from headkit.mesh import icosphere, vertex_normals  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SIZE = 32  # frame height and width of the fixtures
FOCAL = 150.0


def head_mesh() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 10 cm icosphere head (162 vertices) whose front cap (z > 0.07) is in no triangle, as
    INSTA's simplification leaves eyeballs and eye region: ``(vertices, faces, isolated ids)``."""
    v, f = icosphere(2, radius=0.1)
    v, f = v.numpy().astype(np.float64), f.numpy()
    cap = np.flatnonzero(v[:, 2] > 0.07)
    faces = f[~np.isin(f, cap).any(axis=1)]
    isolated = np.setdiff1d(np.arange(len(v)), np.unique(faces))
    return v, faces, isolated


def jaw_motion(canonical: np.ndarray, t: int) -> np.ndarray:
    """Per-frame tracked vertices ``[V, 3]``: the lower half opens and closes (a jaw) while the
    head stays put, as metrical-tracker's meshes do (the camera carries the head pose)."""
    out = canonical.copy()
    low = canonical[:, 1] < -0.02
    out[low, 1] -= 0.01 * (1 + np.sin(t))
    out[low, 2] += 0.004 * t
    return out


def camera(t: int) -> np.ndarray:
    """OpenCV camera-to-world ``[4, 4]`` of frame ``t``: about 1 m in front of the face (+z)."""
    center = np.array([0.05 * np.sin(t), 0.02 * np.cos(t), 1.0])
    return opencv_look_at(center, np.zeros(3), np.array([0.0, 1.0, 0.0]))


def smooth_rgb(t: int, size: tuple[int, int] = (SIZE, SIZE)) -> np.ndarray:
    """A smooth colour field ``[H, W, 3]`` uint8 (resampling it changes it little)."""
    ii, jj = np.mgrid[:size[0], :size[1]].astype(np.float64)
    r = 128 + 100 * np.sin(ii / 5.0 + t)
    g = 128 + 100 * np.cos(jj / 6.0 - t)
    b = 128 + 80 * np.sin((ii + jj) / 9.0)
    return np.clip(np.stack([r, g, b], -1), 0, 255).astype(np.uint8)


def soft_alpha(t: int) -> np.ndarray:
    """INSTA's matte after ``postprocess.py``: 255 inside, a soft ramp (< 128) on the rim."""
    ii, jj = np.mgrid[:SIZE, :SIZE]
    r = np.hypot(ii - SIZE / 2 + 0.5, jj - SIZE / 2 + 0.5 - (t % 2))
    return np.where(r < 9, 255, np.where(r < 12, np.clip((12 - r) * 40, 1, 127), 0)).astype(np.uint8)


# ------------------------------------------------------------------------ INSTA fixture

def write_insta(root: Path, *, order: list[int], num_test: int = 3, expression_dim: int = 100) -> dict:
    """INSTA's ``generate.sh`` output for frames ``sorted(order)``; the frame lists are written in
    ``order`` (``transforms.py`` collects frames with ``imap_unordered``) and the split files are
    ``frames[:-num_test]`` / ``frames[-num_test:]`` of that list, as ``transforms.py`` cuts them."""
    v, faces, isolated = head_mesh()
    rng = np.random.default_rng(0)
    K = [[FOCAL, 0, SIZE / 2], [0, FOCAL, SIZE / 2], [0, 0, 1]]
    frames = {}
    for n in sorted(order):
        fid = f"{n:05d}"
        iio.imwrite(_mkdir(root / "images") / f"{fid}.png",
                    np.concatenate([smooth_rgb(n), soft_alpha(n)[..., None]], -1))
        write_open3d_obj(root / "meshes" / f"{fid}.obj", jaw_motion(v, n), faces)
        np.savetxt(_mkdir(root / "flame" / "exp") / f"{fid}.txt", rng.normal(0, 1, expression_dim), fmt="%.8f")
        frames[n] = {"transform_matrix": camera(n).tolist(), "file_path": f"images/{fid}.png",
                     "mesh_path": f"meshes/{fid}.obj", "exp_path": f"flame/exp/{fid}.txt",
                     "depth_path": f"depth/{fid}.png", "seg_mask_path": f"seg_mask/{fid}.png"}
    write_open3d_obj(root / "canonical.obj", v, faces)
    head = {"w": float(SIZE), "h": float(SIZE), "cx": K[0][2], "cy": K[1][2], "fl_x": FOCAL, "fl_y": FOCAL,
            "camera_angle_x": 0.2, "camera_angle_y": 0.2, "x_fov": 12.0, "y_fov": 12.0,
            "integer_depth_scale": 0.001}
    listed = [frames[n] for n in order]
    for name, subset in (("transforms", listed), ("transforms_train", listed[:-num_test]),
                         ("transforms_test", listed[-num_test:]), ("transforms_val", listed[-20:])):
        (root / f"{name}.json").write_text(json.dumps({**head, "frames": subset}, indent=4, sort_keys=True))
    return {"vertices": v, "faces": faces, "isolated": isolated, "test_numbers": sorted(order[-num_test:])}


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


# Pool completion order: nearly sorted, frames 6 and 7 swapped at the train/test boundary.
POOL_ORDER = [0, 1, 2, 3, 4, 5, 7, 6, 8, 9]


def test_insta_split_transforms_keeps_the_official_test_set_and_last_sorts(tmp_path):
    truth = write_insta(tmp_path / "s", order=POOL_ORDER)
    official = load_insta(tmp_path / "s")
    numbers = np.array(official.meta["frame_numbers"])
    np.testing.assert_array_equal(numbers, np.arange(10))  # frames sorted by number either way
    assert truth["test_numbers"] == [6, 8, 9]  # the last 3 list entries, not the last 3 frames
    np.testing.assert_array_equal(numbers[official.test_ids], [6, 8, 9])
    last = load_insta(tmp_path / "s", split="last", num_test=3)
    np.testing.assert_array_equal(np.array(last.meta["frame_numbers"])[last.test_ids], [7, 8, 9])
    np.testing.assert_allclose(last.times, np.arange(10) / 9, atol=1e-7)


def test_insta_mask_mode_binary_is_alpha_255_only(tmp_path):
    write_insta(tmp_path / "m", order=list(range(6)))
    soft = load_insta(tmp_path / "m", num_test=2, split="last")
    binary = load_insta(tmp_path / "m", num_test=2, split="last", mask_mode="binary")
    alpha = np.stack([soft_alpha(n) for n in range(6)])
    np.testing.assert_array_equal(soft.masks, alpha)  # soft: the matte as stored, rim included
    rim = (alpha > 0) & (alpha < 255)
    assert rim.any()
    np.testing.assert_array_equal(binary.masks, np.where(alpha == 255, 255, 0))
    assert binary.meta["mask_mode"] == "binary"
    # Effect: composited targets are pure background on the rim, and the BCE target is 0/1 there.
    from headkit.losses import composite_over_background
    on_rim = torch.from_numpy(rim[0])
    for subject, binary_rule in ((binary, True), (soft, False)):
        item = FrameDataset(subject, "all")[0]
        target = composite_over_background(item["image"][None], item["mask"][None], torch.ones(3))[0]
        assert bool((target[on_rim] == 1.0).all()) == binary_rule  # white background on the rim
        fractional = (item["mask"] > 0) & (item["mask"] < 1)
        assert bool(fractional.any()) != binary_rule  # BCE target: 0/1 (binary) or the matte's fractions
    halved = load_insta(tmp_path / "m", num_test=2, split="last", mask_mode="binary", image_size=16)
    assert set(np.unique(halved.masks)) <= {0, 255}  # binary stays binary after a resize


def test_insta_and_nbs_head_poses_are_identity(tmp_path):
    from headkit.cameras import estimate_rigid
    from headkit.fitting.scene import frame_head_poses
    write_insta(tmp_path / "i", order=list(range(6)))
    write_nbs(tmp_path / "n", ids=list(range(6)))
    for subject in (load_insta(tmp_path / "i", num_test=2, split="last"), load_nbs(tmp_path / "n", num_test=2)):
        np.testing.assert_array_equal(subject.head_poses, np.tile(np.eye(4), (6, 1, 1)))
        assert subject.meta["head_poses"] == "identity"
        poses = frame_head_poses(subject)  # what GraphAvatar and the neural cache use
        np.testing.assert_array_equal(poses.numpy(), np.tile(np.eye(4), (6, 1, 1)))
        # a Kabsch fit of the jaw-open template would have turned the jaw motion into rigid motion
        fitted = estimate_rigid(torch.from_numpy(subject.template_vertices).double(),
                                torch.from_numpy(subject.vertices).double())
        assert (fitted[:, :3, 3].norm(dim=-1) > 1e-3).any()


def test_insta_isolated_vertices_are_harmless(tmp_path):
    from graphavatar.sampling import build_mesh_hierarchy
    truth = write_insta(tmp_path / "iso", order=list(range(6)))
    s = load_insta(tmp_path / "iso", num_test=2, split="last")
    isolated = truth["isolated"]
    assert len(isolated) > 10 and s.num_vertices == 162 and s.uvs is None
    assert not np.isin(s.faces, isolated).any()
    # normals: zero on isolated vertices, unchanged elsewhere, finite gradients
    verts = torch.from_numpy(s.vertices[:2]).double().requires_grad_(True)
    faces = torch.from_numpy(s.faces)
    normals = vertex_normals(verts, faces)
    assert (normals[:, isolated] == 0).all()
    kept = np.setdiff1d(np.arange(s.num_vertices), isolated)
    remap = np.full(s.num_vertices, -1)
    remap[kept] = np.arange(len(kept))
    alone = vertex_normals(verts[:, kept], torch.from_numpy(remap[s.faces]))
    torch.testing.assert_close(normals[:, kept], alone)
    (normals * torch.randn_like(normals)).sum().backward()
    assert torch.isfinite(verts.grad).all() and (verts.grad[:, isolated] == 0).all()
    # pooling: coarse levels keep only surface vertices, D U = I, isolated vertices get convex U rows
    h = build_mesh_hierarchy(s.template_vertices, s.faces, (4, 8))
    assert not np.isin(h.parents[0].numpy(), isolated).any()
    for level in (1, 2):
        assert set(np.unique(h.faces[level].numpy())) == set(range(h.num_vertices[level]))
    up = h.ups[0].to_dense()
    torch.testing.assert_close(up[isolated].sum(1), torch.ones(len(isolated)))
    assert (up >= 0).all()
    torch.testing.assert_close(h.downs[0].to_dense() @ up, torch.eye(h.num_vertices[1]))


def test_isolated_points_never_become_coarse_parents():
    """An isolated point duplicated on top of every surface vertex must not replace it as the
    parent a coarse vertex copies (its features have no neighbours and a zero normal)."""
    from graphavatar.sampling import build_mesh_hierarchy
    v, f = icosphere(2)
    v = v.numpy().astype(np.float64)
    both = np.concatenate([v, v])  # vertices V..2V-1 sit exactly on the surface ones, in no face
    h = build_mesh_hierarchy(both, f.numpy(), (4,))
    assert (h.parents[0] < len(v)).all()


# ------------------------------------------------------------------- UV layout transfer

def write_uv_layout(path: Path, vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A FLAME-style UV template: the same vertices, every triangle with ``v/vt`` corners, a
    seam (vertices with two ``vt``); returns ``(uvs, uv_faces)`` as written."""
    from neuralcache.inputs import spherical_uvs
    uvs, uv_faces = spherical_uvs(torch.from_numpy(vertices).float(), torch.from_numpy(faces))
    uvs, uv_faces = uvs.numpy(), uv_faces.numpy()
    lines = ["# uv template"] + [f"v {x:.8f} {y:.8f} {z:.8f}" for x, y, z in vertices]
    lines += [f"vt {u:.8f} {w:.8f}" for u, w in uvs]
    lines += ["f " + " ".join(f"{a + 1}/{b + 1}" for a, b in zip(fv, ft)) for fv, ft in zip(faces, uv_faces)]
    path.write_text("\n".join(lines) + "\n")
    return np.round(uvs, 8).astype(np.float32), uv_faces


def test_uv_template_gives_the_neural_cache_real_uvs(tmp_path, caplog):
    from neuralcache.inputs import template_uvs
    write_insta(tmp_path / "uv", order=list(range(6)))
    full_v, full_f = (x.numpy() for x in icosphere(2, radius=0.1))
    layout_uvs, layout_faces = write_uv_layout(tmp_path / "layout.obj", full_v.astype(np.float64), full_f)
    s = load_insta(tmp_path / "uv", num_test=2, split="last", uv_template=tmp_path / "layout.obj")
    assert s.uvs is not None and s.uv_faces.shape == s.faces.shape
    index = {tuple(sorted(t)): i for i, t in enumerate(full_f.tolist())}
    for face, corners in zip(s.faces.tolist(), s.uv_faces.tolist()):
        j = index[tuple(sorted(face))]
        expect = dict(zip(full_f[j].tolist(), layout_faces[j].tolist()))
        assert corners == [expect[v] for v in face]  # the layout's own corners, seam included
    uvs, _, how = template_uvs(s)
    assert how == "template"
    np.testing.assert_allclose(uvs.numpy(), layout_uvs, atol=1e-6)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="neuralcache.inputs"):
        _, _, how = template_uvs(load_insta(tmp_path / "uv", num_test=2, split="last"))
    assert how.startswith("spherical") and "data.uv_template" in caplog.text


def test_uv_template_on_a_retriangulated_template(tmp_path):
    """INSTA's sparse face set is not FLAME's: a triangle the layout lacks takes, per corner,
    the nearest of its vertices' UVs, so it stays on one UV island and never spans a seam.

    Two quads side by side (vertices 0 1 2 over 3 4 5); the layout cuts them apart at the
    seam through vertices 1 and 4, which get one ``vt`` on each island (u = 0.9 and u = 0.0)."""
    from headkit.data.insta import transfer_uv_layout
    (tmp_path / "layout.obj").write_text("\n".join([
        "v 0 0 0", "v 1 0 0", "v 2 0 0", "v 0 1 0", "v 1 1 0", "v 2 1 0",
        "vt 0.7 0.0", "vt 0.9 0.0", "vt 0.9 0.2", "vt 0.7 0.2",  # island A: vertices 0 1 4 3
        "vt 0.0 0.0", "vt 0.2 0.0", "vt 0.2 0.2", "vt 0.0 0.2",  # island B: vertices 1 2 5 4
        "f 1/1 2/2 5/3", "f 1/1 5/3 4/4",  # quad A, diagonal 0-4
        "f 2/5 3/6 6/7", "f 2/5 6/7 5/8"]) + "\n")  # quad B, diagonal 1-5
    faces = np.array([[0, 1, 3], [1, 4, 3],  # quad A with the other diagonal (not in the layout)
                      [1, 2, 5], [1, 5, 4]])  # quad B as the layout has it
    uvs, uv_faces = transfer_uv_layout(tmp_path / "layout.obj", faces, 6, tmp_path / "canonical.obj")
    np.testing.assert_array_equal(uv_faces, [[0, 1, 3], [1, 2, 3], [4, 5, 6], [4, 6, 7]])
    assert (uvs[uv_faces[:2]][..., 0] >= 0.7).all()  # island A, not u = 0 across the seam
    (tmp_path / "plain.obj").write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    with pytest.raises(SubjectError, match="no texture coordinates"):
        transfer_uv_layout(tmp_path / "plain.obj", faces[:1], 3, tmp_path / "canonical.obj")
    with pytest.raises(SubjectError, match=r"has 6 vertices but the template canonical.obj has 7"):
        transfer_uv_layout(tmp_path / "layout.obj", faces, 7, tmp_path / "canonical.obj")
    (tmp_path / "partial.obj").write_text("\n".join(
        ["v 0 0 0", "v 1 0 0", "v 0 1 0", "v 1 1 0", "vt 0 0", "vt 1 0", "vt 0 1", "f 1/1 2/2 3/3"]) + "\n")
    with pytest.raises(SubjectError, match="gives vertex 3 no texture coordinate"):
        transfer_uv_layout(tmp_path / "partial.obj", np.array([[1, 3, 2]]), 4, tmp_path / "canonical.obj")


# -------------------------------------------------------------------------- NBS fixture

def write_nbs(root: Path, *, ids: list[int], json_ids: list[int] | None = None, num_exp: int = 100,
              tracker: Path | None = None, crop_box: list[int] | None = None, frame_size: int = SIZE,
              tracker_size: int = SIZE, with_input: bool = False) -> dict:
    """NBS frames ``ids`` (``head_neck_imgs/``, ``head_neck_mask/``), NeRFBlendShape's
    ``transforms.json`` listing ``json_ids`` (default ``ids``, written unsorted), and a
    metrical-tracker re-track in ``tracker`` (default ``root``).

    With ``crop_box = [x_min, x_max, y_min, y_max]`` the tracker saw cropped frames, as with its
    default ``crop_image = True``: rows/columns of the box (its ``crop_image`` slicing), resized
    to ``tracker_size`` (a square box needs no padding); its ``K`` and ``img_size`` describe
    those, and ``input/`` holds them. ``with_input`` writes ``input/`` for an uncropped run too.
    Returns the true intrinsics of the NBS frames and the box."""
    import torch.nn.functional as F
    tracker = root if tracker is None else tracker
    v, faces, _ = head_mesh()
    rng = np.random.default_rng(1)
    K_nbs = np.array([[FOCAL * frame_size / SIZE, 0, frame_size / 2 + 0.5], [0, FOCAL * frame_size / SIZE,
                      frame_size / 2 - 0.5], [0, 0, 1]])
    A = np.eye(3)  # NBS pixel = A @ tracker pixel
    if crop_box is not None:
        x0, x1 = crop_box[0], min(crop_box[1], frame_size - 1)
        y0, y1 = crop_box[2], min(crop_box[3], frame_size - 1)
        assert x1 - x0 == y1 - y0
        A = np.array([[(x1 - x0) / tracker_size, 0, x0], [0, (y1 - y0) / tracker_size, y0], [0, 0, 1]])
    K_trk = np.linalg.inv(A) @ K_nbs
    for n in ids:
        fid = f"{n:05d}"
        rgb = smooth_rgb(n, (frame_size, frame_size))
        iio.imwrite(_mkdir(root / "head_neck_imgs") / f"{fid}.png", rgb)
        mask = np.where(soft_alpha(n) > 0, 255, 0).astype(np.uint8)
        mask = np.pad(mask, (0, frame_size - SIZE))[:frame_size, :frame_size] if frame_size > SIZE else mask
        mask[0, 0] = 254  # a stray value, as resampled or re-encoded masks have
        iio.imwrite(_mkdir(root / "head_neck_mask") / f"{fid}.png", mask)
        if crop_box is not None or with_input:
            seen = rgb
            if crop_box is not None:
                crop = torch.from_numpy(rgb[y0:y1, x0:x1]).permute(2, 0, 1)[None].double()
                mode = "area" if tracker_size < crop.shape[-1] else "bilinear"
                kw = {} if mode == "area" else {"align_corners": False}
                seen = F.interpolate(crop, size=(tracker_size, tracker_size), mode=mode, **kw)
                seen = seen[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
            iio.imwrite(_mkdir(tracker / "input") / f"{fid}.png", seen)
        write_trimesh_ply(_mkdir(tracker / "mesh") / f"{fid}.ply", jaw_motion(v, n), faces)
        w2c = np.linalg.inv(camera(n))
        payload = {
            "flame": {"exp": rng.normal(0, 1, (1, num_exp)).astype(np.float32),
                      "eyes": rng.normal(0, 0.1, (1, 12)).astype(np.float32),
                      "eyelids": rng.uniform(0, 1, (1, 2)).astype(np.float32),
                      "jaw": rng.normal(0, 0.1, (1, 6)).astype(np.float32),
                      "shape": np.zeros((1, 300), np.float32), "tex": np.zeros((1, 140), np.float32),
                      "sh": np.zeros((1, 9, 3), np.float32)},
            "camera": {"R": np.zeros((1, 6), np.float32), "t": w2c[None, :3, 3].astype(np.float32),
                       "fl": np.ones((1, 1), np.float32), "pp": np.zeros((1, 2), np.float32)},
            "opencv": {"R": w2c[None, :3, :3].astype(np.float32), "t": w2c[None, :3, 3].astype(np.float32),
                       "K": K_trk[None].astype(np.float32)},
            "img_size": np.array([tracker_size, tracker_size]), "frame_id": fid, "global_step": n}
        torch.save(payload, _mkdir(tracker / "checkpoint") / f"{fid}.frame")
    write_trimesh_obj(tracker / "canonical.obj", v, faces)
    listed = list(ids if json_ids is None else json_ids)
    listed = listed[1::2] + listed[0::2]  # NBS's file is not in img_id order
    (root / "transforms.json").write_text(json.dumps({
        "fx": K_nbs[0, 0], "fy": K_nbs[1, 1], "cx": K_nbs[0, 2], "cy": K_nbs[1, 2], "h": frame_size, "w": frame_size,
        "frames": [{"img_id": n, "exp_ori": rng.normal(0, 1, 46).round(4).tolist(),
                    "transform_matrix": np.eye(4).tolist()} for n in listed]}))
    return {"K_nbs": K_nbs.astype(np.float32), "K_trk": K_trk.astype(np.float32)}


def test_nbs_frame_list_and_split_come_from_transforms_json(tmp_path, caplog):
    ids = [0, 1, 2, 3, 4, 5, 6, 7, 8]
    write_nbs(tmp_path / "n", ids=ids, json_ids=ids[:-1])  # frame 8 has an image and a checkpoint only
    with caplog.at_level(logging.WARNING, logger="headkit.data.nbs"):
        s = load_nbs(tmp_path / "n", num_test=3)
    assert "frames 8" in caplog.text and "not in transforms.json" in caplog.text
    assert s.meta["frame_list"] == "transforms.json" and s.expression_dim == 120
    np.testing.assert_array_equal(s.meta["frame_numbers"], np.arange(8))  # sorted by img_id
    np.testing.assert_array_equal(np.array(s.meta["frame_numbers"])[s.test_ids], [5, 6, 7])
    # GraphAvatar's NBS time is img_id / N: ours differs by at most one frame step
    assert np.abs(s.times - np.arange(8) / 8).max() <= 1 / 8 + 1e-7
    by_images = load_nbs(tmp_path / "n", num_test=3, frame_list="images")
    np.testing.assert_array_equal(by_images.meta["frame_numbers"], np.arange(9))
    (tmp_path / "n" / "transforms.json").unlink()
    with pytest.raises(SubjectError, match="data.frame_list=images"):
        load_nbs(tmp_path / "n", num_test=3, frame_list="transforms")


def test_nbs_json_frames_without_images_or_checkpoints_are_named(tmp_path):
    write_nbs(tmp_path / "a", ids=list(range(6)), json_ids=list(range(8)))
    with pytest.raises(SubjectError) as err:
        load_nbs(tmp_path / "a", num_test=2)
    msg = str(err.value)
    assert "transforms.json" in msg and "img_id 6, 7" in msg and "head_neck_imgs" in msg and "\n" not in msg
    write_nbs(tmp_path / "b", ids=list(range(6)))
    (tmp_path / "b" / "checkpoint" / "00003.frame").unlink()
    missing_checkpoint = r"1 of its 6 frames have no tracker checkpoint in .*checkpoint/ \(img_id 3\)"
    with pytest.raises(SubjectError, match=missing_checkpoint):
        load_nbs(tmp_path / "b", num_test=2)
    data = json.loads((tmp_path / "b" / "transforms.json").read_text())
    data["frames"].append(dict(data["frames"][0]))
    (tmp_path / "b" / "transforms.json").write_text(json.dumps(data))
    with pytest.raises(SubjectError, match="listed more than once"):
        load_nbs(tmp_path / "b", num_test=2)


def test_nbs_mask_mode_binary_is_mask_255_only(tmp_path):
    write_nbs(tmp_path / "m", ids=list(range(6)))
    soft = load_nbs(tmp_path / "m", num_test=2)
    binary = load_nbs(tmp_path / "m", num_test=2, mask_mode="binary")
    assert soft.masks[0, 0, 0] == 254 and binary.masks[0, 0, 0] == 0
    np.testing.assert_array_equal(binary.masks, np.where(soft.masks == 255, 255, 0))


def test_nbs_cropped_tracker_frames_are_refused_and_named(tmp_path, caplog):
    box = [8, 24, 8, 24]  # a 16x16 face box, resized to the tracker's 32x32
    write_nbs(tmp_path / "c", ids=list(range(6)), crop_box=box)
    with pytest.raises(SubjectError) as err:
        load_nbs(tmp_path / "c", num_test=2)
    msg = str(err.value)
    for fragment in ("input/00000.png", "head_neck_imgs/00000.png", "crop_image", "data.tracker_bbox",
                     "data.tracker_crop=bbox"):
        assert fragment in msg, (fragment, msg)
    # sizes alone give it away when the NBS frames are larger than the tracker's img_size
    write_nbs(tmp_path / "big", ids=list(range(6)), crop_box=[8, 40, 8, 40], frame_size=48)
    with pytest.raises(SubjectError) as err:
        load_nbs(tmp_path / "big", num_test=2)
    msg = str(err.value)
    assert "head_neck_imgs/00000.png" in msg and "48x48" in msg and "32x32" in msg and "crop_image" in msg
    # an uncropped re-track with its input/ frames passes the check; without them it warns
    write_nbs(tmp_path / "ok", ids=list(range(6)), with_input=True)
    with caplog.at_level(logging.WARNING, logger="headkit.data.nbs"):
        load_nbs(tmp_path / "ok", num_test=2)
        assert "cannot be checked" not in caplog.text
        write_nbs(tmp_path / "unseen", ids=list(range(6)))
        load_nbs(tmp_path / "unseen", num_test=2)
    assert "no input/ frames, so it cannot be checked" in caplog.text and "crop_image" in caplog.text


@pytest.mark.parametrize("box,frame_size", [([8, 24, 8, 24], SIZE), ([8, 40, 4, 36], 48)])
def test_nbs_tracker_bbox_moves_k_onto_the_nbs_frames(tmp_path, box, frame_size):
    truth = write_nbs(tmp_path / "c", ids=list(range(6)), crop_box=box, frame_size=frame_size)
    torch.save(np.array(box), tmp_path / "bbox.pt")  # what metrical-tracker saves for the actor
    s = load_nbs(tmp_path / "c", num_test=2, tracker_crop="bbox", tracker_bbox=str(tmp_path / "bbox.pt"))
    assert (s.height, s.width) == (frame_size, frame_size) and s.meta["tracker_bbox"] == box
    np.testing.assert_allclose(s.Ks, np.tile(truth["K_nbs"], (6, 1, 1)), atol=1e-4)
    listed = load_nbs(tmp_path / "c", num_test=2, tracker_crop="bbox", tracker_bbox=box)
    np.testing.assert_allclose(listed.Ks, s.Ks)
    wrong = [box[0] + 4, box[1] + 4, box[2], box[3]]
    with pytest.raises(SubjectError, match=r"does not map .*head_neck_imgs/00000.png"):
        load_nbs(tmp_path / "c", num_test=2, tracker_crop="bbox", tracker_bbox=wrong)


def test_bad_settings_are_config_errors_naming_the_key(tmp_path):
    write_nbs(tmp_path / "n", ids=list(range(6)))
    write_insta(tmp_path / "i", order=list(range(6)))
    with pytest.raises(InvalidConfigValue, match="data.mask_mode"):
        load_insta(tmp_path / "i", mask_mode="hard")
    with pytest.raises(InvalidConfigValue, match="data.split"):
        load_insta(tmp_path / "i", split="random")
    with pytest.raises(InvalidConfigValue, match="data.frame_list"):
        load_nbs(tmp_path / "n", frame_list="json")
    with pytest.raises(InvalidConfigValue, match="data.tracker_bbox"):
        load_nbs(tmp_path / "n", tracker_crop="bbox")
    with pytest.raises(InvalidConfigValue, match="data.tracker_bbox"):
        load_nbs(tmp_path / "n", num_test=2, tracker_crop="bbox", tracker_bbox=[10, 5, 0, 8])


def test_normalised_times_match_graphavatar_for_nbs_only():
    """NBS (ids 0..N-1): within one frame step of GraphAvatar's img_id / N. INSTA: GraphAvatar
    divides by the split file's length, so its test times are far from ours."""
    N, test = 1000, 350
    ours = normalised_times(np.arange(N))
    assert np.abs(ours - np.arange(N) / N).max() <= 1 / N + 1e-7
    graphavatar_test = np.arange(N - test, N) / test
    assert graphavatar_test.max() > 2.8 and ours.max() == 1.0


# --------------------------------------------------- the experiments, composed and trained

def _compose(overrides):
    from hydra import compose, initialize_config_dir
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=overrides)


SHRINK = ["trainer.max_steps=3", "trainer.progress=false", "trainer.device=cpu", "eval.video=false",
          "eval.timing_repeats=2", "model.unet.filters=[8,8]", "model.unet.K=2", "model.enhancer.channels=[4,8]",
          "model.warmup.steps=4", "model.warmup.fit_steps=4", "model.warmup.log_every=2",
          "model.warmup.fit_sh_increase_every=2"]


@pytest.mark.parametrize("experiment", ["insta_subject", "nbs_subject"])
def test_experiment_composes_with_the_papers_settings_and_trains(tmp_path, experiment):
    from headkit.engine.trainer import train
    if experiment == "insta_subject":
        write_insta(tmp_path / "data", order=POOL_ORDER)
        data = [f"data.root={tmp_path / 'data'}"]
    else:
        write_nbs(tmp_path / "data", ids=list(range(8)), tracker=tmp_path / "tracker")
        data = [f"data.root={tmp_path / 'data'}", f"data.tracker_root={tmp_path / 'tracker'}"]
    paper = _compose([f"experiment={experiment}", *data])
    assert paper.experiment_name == experiment
    assert paper.data.mask_mode == "binary"
    assert paper.model.render.composite_gt is True and list(paper.model.render.background) == [1.0, 1.0, 1.0]
    assert paper.model.unet.K == 6 and list(paper.model.hierarchy.factors) == [4, 8]
    if experiment == "insta_subject":
        assert paper.data.split == "transforms" and paper.data.num_test == 350
        assert paper.model.expression_dim == 100 and paper.trainer.max_steps == 100000
    else:
        assert paper.data.frame_list == "transforms" and paper.data.num_test == 500
        assert paper.data.tracker_crop == "detect"
        assert paper.model.expression_dim == 120 and paper.trainer.max_steps == 600000
        assert paper.model.warmup.steps == 10000 and paper.model.warmup.fit_steps == 30000
    shrink = SHRINK + ([] if experiment == "insta_subject" else ["data.num_test=3"])
    cfg = _compose([f"experiment={experiment}", *data, f"paths.data_dir={tmp_path / 'cache'}",
                    f"run_dir={tmp_path / 'run'}", *shrink])
    metrics = train(cfg)
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert written["steps"] == 3 and written["method"] == "GraphAvatar" and np.isfinite(metrics["psnr"])
    assert written["num_test_frames"] == 3
