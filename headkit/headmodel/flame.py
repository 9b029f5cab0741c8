"""The FLAME head model (Li et al., SIGGRAPH Asia 2017) as a torch layer, read from the user's
model file. FLAME cannot be redistributed: this project never ships or downloads it; the user
passes the path of their ``flame2023.pkl`` (``data.flame_model=PATH``).

The model file is a pickled dict (the public format of FLAME 2020/2023, as read by FLAME_PyTorch
and smplx) with these entries (``V`` vertices, ``J`` = 5 joints):

    v_template     [V, 3]          neutral mesh (metres)
    shapedirs      [V, 3, 300+100] identity blendshapes, then expression blendshapes
    posedirs       [V, 3, 9(J-1)]  pose-corrective blendshapes
    J_regressor    [J, V]          joint locations from the shaped mesh (often a scipy sparse matrix)
    weights        [V, J]          skinning weights
    kintree_table  [2, J]          row 0: parent of each joint (root: any value), row 1: joint ids
    f              [F, 3]          triangles

The forward pass (FLAME's paper, eq. 1-4; the same as FLAME_PyTorch's ``lbs``)::

    v_shaped = T̄ + S β + E ψ                           shape and expression blendshapes
    J        = 𝒥 v_shaped                               joint locations, [J, 3]
    v_posed  = v_shaped + P vec(R(θ_j) - I), j ≥ 1      pose correctives (root rotation excluded)
    G_j      = G_parent(j) [R(θ_j) | J_j - J_parent(j)] world transform of joint j (G_root = [R(θ_0) | J_0])
    v        = Σ_j w_vj (G_j [I | -J_j]) v_posed         linear blend skinning

with ``R(·)`` Rodrigues' formula on axis-angle vectors (:func:`headkit.cameras.so3_exp`). The
joints are FLAME's: 0 global (root), 1 neck, 2 jaw, 3 left eye, 4 right eye;
:meth:`FLAME.forward` takes them in that order from separate arguments, as FLAME_PyTorch's
``pose_params = [global, jaw]``, ``neck_pose``, ``eye_pose = [left, right]`` do.

Loading uses a restricted unpickler (numpy arrays and scipy sparse matrices only), so a model
file cannot run code. Older releases (FLAME 2020) store some arrays as ``chumpy.ch.Ch`` objects;
those are read without chumpy from the array they keep (``x``); any other chumpy object (a
derived expression, which would need chumpy to evaluate) is refused with one line saying so.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from headkit.cameras import so3_exp
from headkit.headmodel.model import HeadModelError

__all__ = ["FLAME", "load_flame_file", "lbs", "FLAME_KEYS", "NUM_SHAPE_FLAME"]

#: entries every FLAME model file must hold
FLAME_KEYS = ("v_template", "shapedirs", "posedirs", "J_regressor", "weights", "kintree_table", "f")
#: identity blendshapes come first in ``shapedirs``; expression blendshapes start here (FLAME 2020/2023)
NUM_SHAPE_FLAME = 300


_PLAIN_BUILTINS = {"object": object, "set": set, "frozenset": frozenset, "list": list, "dict": dict,
                   "tuple": tuple}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickle numpy arrays/scalars and scipy sparse matrices; refuse everything else.

    numpy-1 module names (``numpy.core.*``) are mapped to numpy 2's ``numpy._core.*``.
    """

    _NUMPY = {("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer")}

    def find_class(self, module: str, name: str):
        if module == "chumpy.ch" and name == "Ch":
            return _ChumpyArray
        if module.split(".")[0] == "chumpy":
            raise HeadModelError("needs chumpy")
        if module.startswith("numpy"):
            leaf = module.rsplit(".", 1)[-1]
            if module == "numpy" and name in ("ndarray", "dtype"):
                return getattr(np, name)
            if module == "numpy.dtypes" or (leaf, name) in self._NUMPY:
                core = "numpy._core" if int(np.__version__.split(".")[0]) >= 2 else "numpy.core"
                target = module if module == "numpy.dtypes" else f"{core}.{leaf}"
                return getattr(__import__(target, fromlist=[name]), name)
        if module == "copyreg" and name == "_reconstructor":
            import copyreg
            return copyreg._reconstructor
        if module in ("builtins", "__builtin__") and name in _PLAIN_BUILTINS:
            return _PLAIN_BUILTINS[name]  # data containers only (chumpy's state holds sets)
        if module == "_codecs" and name == "encode":  # protocol-2 pickles of bytes (array buffers)
            import _codecs
            return _codecs.encode
        if module.startswith("scipy.sparse"):
            import scipy.sparse as sp
            cls = getattr(sp, name, None)  # old module paths (scipy.sparse.csc) resolve by name
            if isinstance(cls, type) and issubclass(cls, (sp.spmatrix, getattr(sp, "sparray", sp.spmatrix))):
                return cls
        raise HeadModelError(f"holds '{module}.{name}', which a FLAME model file does not need")


class _ChumpyArray:
    """Stands in for ``chumpy.ch.Ch`` while unpickling: keeps the array ``x`` of its state."""

    def __setstate__(self, state) -> None:
        self.x = state.get("x") if isinstance(state, dict) else None


def _dense(key: str, value) -> np.ndarray:
    """A model entry as a dense array (scipy sparse, a chumpy array's ``x``, or array-like)."""
    if isinstance(value, _ChumpyArray):
        if not isinstance(value.x, np.ndarray):
            raise HeadModelError(f"entry '{key}' is a chumpy object without an array")
        value = value.x
    return value.toarray() if hasattr(value, "toarray") else np.asarray(value)


def load_flame_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of a FLAME model file (:data:`FLAME_KEYS`), dense float64/int64.

    Raises :class:`~headkit.headmodel.HeadModelError` naming the file when it is missing, not a
    FLAME pickle, needs chumpy, or lacks an entry.
    """
    path = Path(path).expanduser()
    hint = ("FLAME cannot be redistributed: register at https://flame.is.tue.mpg.de, download "
            "FLAME 2023 and set data.flame_model to its flame2023.pkl")
    if not path.is_file():
        raise HeadModelError(f"{path}: FLAME model file not found (data.flame_model); {hint}")
    try:
        with open(path, "rb") as f:
            raw = _RestrictedUnpickler(f, encoding="latin1").load()
    except HeadModelError as exc:
        if str(exc) == "needs chumpy":
            raise HeadModelError(f"{path}: this FLAME pickle holds chumpy expressions that need the "
                                 f"'chumpy' package to evaluate; use FLAME 2023's flame2023.pkl") from None
        raise HeadModelError(f"{path}: not a FLAME model file: it {exc}") from None
    except Exception as exc:
        raise HeadModelError(f"{path}: cannot read the FLAME model file ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from exc
    if not isinstance(raw, dict):
        raise HeadModelError(f"{path}: not a FLAME model file (a {type(raw).__name__}, not a dict)")
    missing = [k for k in FLAME_KEYS if k not in raw]
    if missing:
        raise HeadModelError(f"{path}: not a FLAME model file (missing {', '.join(missing)})")
    out = {}
    for key in FLAME_KEYS:
        try:
            value = _dense(key, raw[key])
        except HeadModelError as exc:
            raise HeadModelError(f"{path}: not a FLAME model file: {exc}") from None
        out[key] = value.astype(np.int64 if key in ("f", "kintree_table") else np.float64)
    return out


def joint_transforms(rotations: Tensor,  # [B, J, 3, 3]
                     joints: Tensor,  # [B, J, 3]
                     parents: list[int],  # [J], parents[0] = -1
                     ) -> Tensor:  # [B, J, 4, 4]
    """Skinning transforms ``G_j [I | -J_j]``: each joint's world transform along the kinematic
    chain, with its rest location removed (so a vertex is moved relative to its rest pose)."""
    B, J = joints.shape[:2]
    rel = joints.clone()
    rel[:, 1:] -= joints[:, parents[1:]]
    local = torch.zeros(B, J, 4, 4, dtype=joints.dtype, device=joints.device)
    local[..., :3, :3], local[..., :3, 3], local[..., 3, 3] = rotations, rel, 1.0
    chain = [local[:, 0]]
    for j in range(1, J):
        chain.append(chain[parents[j]] @ local[:, j])
    world = torch.stack(chain, dim=1)  # [B, J, 4, 4]
    rest = torch.einsum("bjmn,bjn->bjm", world[..., :3, :3], joints)
    out = world.clone()
    out[..., :3, 3] = world[..., :3, 3] - rest
    return out


def lbs(v_shaped: Tensor,  # [B, V, 3]
        rotations: Tensor,  # [B, J, 3, 3]
        J_regressor: Tensor,  # [J, V]
        posedirs: Tensor,  # [9(J-1), V*3]
        weights: Tensor,  # [V, J]
        parents: list[int],
        ) -> Tensor:  # [B, V, 3]
    """Pose correctives plus linear blend skinning of the shaped mesh (module docstring)."""
    B, V = v_shaped.shape[:2]
    joints = torch.einsum("jv,bvc->bjc", J_regressor, v_shaped)
    eye = torch.eye(3, dtype=rotations.dtype, device=rotations.device)
    pose_feature = (rotations[:, 1:] - eye).reshape(B, -1)  # [B, 9(J-1)]
    v_posed = v_shaped + (pose_feature @ posedirs).reshape(B, V, 3)
    G = joint_transforms(rotations, joints, parents)  # [B, J, 4, 4]
    T = torch.einsum("vj,bjmn->bvmn", weights, G)  # [B, V, 4, 4]
    return torch.einsum("bvmn,bvn->bvm", T[..., :3, :3], v_posed) + T[..., :3, 3]


class FLAME(nn.Module):
    """FLAME as a differentiable layer: parameters in, mesh vertices out (module docstring).

    Args:
        path: the user's FLAME model file (e.g. ``flame2023.pkl``).
        num_shape: identity coefficients used (the first ``num_shape`` of ``shapedirs``).
        num_expression: expression coefficients used (``shapedirs`` from index ``shape_offset``).
        shape_offset: where expression blendshapes start in ``shapedirs`` (300 in FLAME 2020/2023;
            smaller only for test models).
        model: already-loaded arrays (:func:`load_flame_file`) instead of ``path``.

    Buffers are float32; ``faces`` is ``[F, 3]`` int64.
    """

    def __init__(self, path: str | os.PathLike | None = None, num_shape: int = 300, num_expression: int = 100,
                 shape_offset: int = NUM_SHAPE_FLAME, model: dict[str, np.ndarray] | None = None):
        super().__init__()
        m = model if model is not None else load_flame_file(path)
        where = str(path) if path is not None else "FLAME model"
        total = m["shapedirs"].shape[-1]
        if num_shape > shape_offset or shape_offset + num_expression > total:
            raise HeadModelError(f"{where}: shapedirs has {total} components; {num_shape} shape + "
                                 f"{num_expression} expression coefficients from {shape_offset} do not fit")
        dirs = np.concatenate([m["shapedirs"][..., :num_shape],
                               m["shapedirs"][..., shape_offset:shape_offset + num_expression]], axis=-1)
        V = m["v_template"].shape[0]
        f32 = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32)  # noqa: E731
        self.register_buffer("v_template", f32(m["v_template"]))  # [V, 3]
        self.register_buffer("shapedirs", f32(dirs))  # [V, 3, S+E]
        self.register_buffer("posedirs", f32(m["posedirs"].reshape(V * 3, -1).T))  # [9(J-1), V*3]
        self.register_buffer("J_regressor", f32(m["J_regressor"]))  # [J, V]
        self.register_buffer("weights", f32(m["weights"]))  # [V, J]
        self.register_buffer("faces", torch.as_tensor(m["f"], dtype=torch.int64))  # [F, 3]
        self.parents = [-1] + [int(p) for p in m["kintree_table"][0, 1:]]
        self.num_shape, self.num_expression = int(num_shape), int(num_expression)
        self.num_joints = int(m["weights"].shape[1])

    def forward(self,
                shape: Tensor,  # [B, num_shape]
                expression: Tensor,  # [B, num_expression]
                global_rotation: Tensor | None = None,  # [B, 3] axis-angle of the root joint
                neck: Tensor | None = None,  # [B, 3]
                jaw: Tensor | None = None,  # [B, 3]
                eyes: Tensor | None = None,  # [B, 6] left eye, right eye
                ) -> Tensor:  # [B, V, 3]
        """Vertices of the posed mesh in FLAME's model frame; omitted poses are zero."""
        B = shape.shape[0]
        zeros = shape.new_zeros(B, 3)
        poses = [global_rotation, neck, jaw]
        poses = [zeros if p is None else p for p in poses]
        poses += list((shape.new_zeros(B, 6) if eyes is None else eyes).split(3, dim=-1))
        rotations = so3_exp(torch.stack(poses, dim=1))  # [B, 5, 3, 3] (Rodrigues)
        betas = torch.cat([shape, expression], dim=-1)  # [B, S+E]
        v_shaped = self.v_template + torch.einsum("vcl,bl->bvc", self.shapedirs, betas)
        return lbs(v_shaped, rotations, self.J_regressor, self.posedirs, self.weights, self.parents)
