"""PLY export/import in the standard 3DGS layout (headkit.ply)."""

import math

import numpy as np
import pytest
import torch
from plyfile import PlyData, PlyElement

from headkit.ply import PlyFormatError, load_ply, ply_property_names, save_ply

# Written out by hand from the original gaussian-splatting GaussianModel.construct_list_of_attributes
# (SH degree 3: 1 dc + 15 rest coefficients per channel).
STANDARD_DEGREE3 = (["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
                    + [f"f_rest_{i}" for i in range(45)]
                    + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"])


def random_gaussians(N=7, K=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "means": torch.randn(N, 3, generator=g),
        "quats": torch.randn(N, 4, generator=g),
        "scales": torch.rand(N, 3, generator=g) * 0.1 + 1e-3,
        "opacities": torch.rand(N, generator=g) * 0.98 + 0.01,
        "sh": torch.randn(N, K, 3, generator=g),
        "normals": torch.nn.functional.normalize(torch.randn(N, 3, generator=g), dim=-1),
    }


@pytest.mark.parametrize("K", [1, 4, 9, 16])
def test_round_trip_is_exact_within_float32(tmp_path, K):
    g = random_gaussians(K=K)
    path = save_ply(tmp_path / "g.ply", **g)
    back = load_ply(path)
    assert back["sh_degree"] == int(math.sqrt(K)) - 1
    for key in ("means", "quats", "normals", "sh"):
        assert torch.equal(back[key], g[key].float()), key  # stored as float32 verbatim
    torch.testing.assert_close(back["scales"], g["scales"], rtol=1e-6, atol=0)
    torch.testing.assert_close(back["opacities"], g["opacities"], rtol=1e-6, atol=1e-7)
    assert not list(tmp_path.glob(".*"))  # the atomic write left no temp file


def test_property_names_and_order_match_the_standard_layout(tmp_path):
    assert ply_property_names(16) == STANDARD_DEGREE3
    path = save_ply(tmp_path / "g.ply", **random_gaussians(N=3, K=16))
    ply = PlyData.read(str(path))
    assert [el.name for el in ply.elements] == ["vertex"]
    assert [p.name for p in ply["vertex"].properties] == STANDARD_DEGREE3
    assert all(p.val_dtype in ("f4", "float32") for p in ply["vertex"].properties)
    header = path.read_bytes()[:200].decode("ascii", errors="replace")
    assert "format binary_little_endian 1.0" in header
    assert "element vertex 3" in header
    # degree 0: no f_rest at all
    assert ply_property_names(1) == [n for n in STANDARD_DEGREE3 if not n.startswith("f_rest")]


def test_f_rest_is_channel_major(tmp_path):
    K = 4
    sh = torch.tensor([[[10.0 * k + c for c in range(3)] for k in range(K)]])  # sh[0, k, c] = 10k + c
    path = save_ply(tmp_path / "g.ply", torch.zeros(1, 3), torch.tensor([[1.0, 0, 0, 0]]),
                    torch.ones(1, 3), torch.tensor([0.5]), sh)
    vertex = PlyData.read(str(path))["vertex"]
    rest = [float(vertex[f"f_rest_{i}"][0]) for i in range(9)]
    # all red coefficients (k = 1, 2, 3) first, then green, then blue
    assert rest == [10.0, 20.0, 30.0, 11.0, 21.0, 31.0, 12.0, 22.0, 32.0]
    assert [float(vertex[f"f_dc_{c}"][0]) for c in range(3)] == [0.0, 1.0, 2.0]
    assert torch.equal(load_ply(path)["sh"], sh)


def test_opacity_is_stored_as_logit_and_scales_as_logs(tmp_path):
    opacities = torch.tensor([0.5, 1.0 / (1.0 + math.exp(-2.0)), 0.1])
    scales = torch.tensor([[1.0, math.e, 0.01]] * 3)
    quats = torch.tensor([[0.9, 0.1, -0.2, 0.3]] * 3)
    path = save_ply(tmp_path / "g.ply", torch.zeros(3, 3), quats, scales, opacities,
                    torch.zeros(3, 1, 3))
    vertex = PlyData.read(str(path))["vertex"]
    np.testing.assert_allclose(vertex["opacity"], [0.0, 2.0, math.log(0.1 / 0.9)], atol=1e-6)
    np.testing.assert_allclose(vertex["scale_0"], 0.0, atol=1e-7)
    np.testing.assert_allclose(vertex["scale_1"], 1.0, atol=1e-6)
    np.testing.assert_allclose(vertex["scale_2"], math.log(0.01), atol=1e-6)
    # quaternions stay wxyz and unnormalised, as 3DGS writes them
    np.testing.assert_allclose([vertex[f"rot_{i}"][0] for i in range(4)], [0.9, 0.1, -0.2, 0.3], atol=1e-7)


def test_opacity_one_and_zero_stay_finite(tmp_path):
    path = save_ply(tmp_path / "g.ply", torch.zeros(2, 3), torch.tensor([[1.0, 0, 0, 0]] * 2),
                    torch.ones(2, 3), torch.tensor([0.0, 1.0]), torch.zeros(2, 1, 3))
    stored = np.asarray(PlyData.read(str(path))["vertex"]["opacity"])
    assert np.isfinite(stored).all() and stored[0] < -15 and stored[1] > 15
    torch.testing.assert_close(load_ply(path)["opacities"], torch.tensor([0.0, 1.0]), atol=1e-6, rtol=0)


def _write_raw_ply(path, names, n=2):
    records = np.zeros(n, dtype=[(name, "<f4") for name in names])
    PlyData([PlyElement.describe(records, "vertex")], byte_order="<").write(str(path))


def test_missing_property_names_the_file_and_property(tmp_path):
    path = tmp_path / "broken.ply"
    _write_raw_ply(path, [n for n in ply_property_names(1) if n != "opacity"])
    with pytest.raises(PlyFormatError, match=r"broken\.ply.*opacity"):
        load_ply(path)


def test_bad_f_rest_count_and_garbage_name_the_file(tmp_path):
    path = tmp_path / "odd_rest.ply"
    _write_raw_ply(path, ply_property_names(1)[:9] + ["f_rest_0", "f_rest_1"] + ply_property_names(1)[9:])
    with pytest.raises(PlyFormatError, match=r"odd_rest\.ply.*f_rest"):
        load_ply(path)
    garbage = tmp_path / "garbage.ply"
    garbage.write_bytes(b"this is not a ply file\n\x00\x01")
    with pytest.raises(PlyFormatError, match=r"garbage\.ply"):
        load_ply(garbage)
    with pytest.raises(FileNotFoundError, match=r"nothere\.ply"):
        load_ply(tmp_path / "nothere.ply")


def test_bad_input_is_rejected_before_writing(tmp_path):
    g = random_gaussians(N=2, K=4)
    with pytest.raises(ValueError, match="scales must be > 0"):
        save_ply(tmp_path / "a.ply", **{**g, "scales": -g["scales"]})
    with pytest.raises(ValueError, match="sh must be"):
        save_ply(tmp_path / "a.ply", **{**g, "sh": g["sh"][:, :, :2]})
    with pytest.raises(ValueError, match="K=5"):
        save_ply(tmp_path / "a.ply", **{**g, "sh": torch.zeros(2, 5, 3)})
    with pytest.raises(ValueError, match="means holds NaN"):
        save_ply(tmp_path / "a.ply", **{**g, "means": torch.full((2, 3), float("nan"))})
    assert not list(tmp_path.iterdir())
