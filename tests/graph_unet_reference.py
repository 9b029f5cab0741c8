"""The graph U-Nets' sparse products as they were before issue #15 (COO ``torch.sparse.mm`` per
product, Chebyshev terms stacked and contracted by ``einsum``): the reference that
``tests/test_ga_graph_unet.py`` pins the CSR path against and the benchmarks
(``bench_graph_unet.py``, ``bench_train_step.py``) time it against."""

from __future__ import annotations

import contextlib
from unittest import mock

import torch

from graphavatar.graph_unet import SparseMatrix


def to_coo(matrix):
    """The COO matrix the old code held as a buffer (made once per :class:`SparseMatrix`, then cached)."""
    if not isinstance(matrix, SparseMatrix):
        return matrix
    if not hasattr(matrix, "_old_coo"):
        matrix._old_coo = matrix.csr().to_sparse_coo().coalesce()
    return matrix._old_coo


def old_sparse_apply(matrix, x):  # SparseMatrix or sparse COO [M, N], [B, N, C]
    """``sparse_apply`` before issue #15: one COO product on ``[N, B*C]``."""
    b, n, c = x.shape
    flat = x.transpose(0, 1).reshape(n, b * c)
    return torch.sparse.mm(to_coo(matrix), flat).reshape(matrix.shape[0], b, c).transpose(0, 1)


def old_cheb_filter(conv, x, laplacian):  # ChebConv, [B, V, C], SparseMatrix or sparse COO [V, V]
    """``cheb_filter`` before issue #15: COO products, terms stacked and contracted by einsum."""
    laplacian = to_coo(laplacian)
    b, v, c = x.shape
    t_prev = x.transpose(0, 1).reshape(v, b * c)
    terms = [t_prev]
    if len(conv.lins) > 1:
        t_cur = torch.sparse.mm(laplacian, t_prev)
        terms.append(t_cur)
        for _ in range(2, len(conv.lins)):
            t_prev, t_cur = t_cur, 2.0 * torch.sparse.mm(laplacian, t_cur) - t_prev
            terms.append(t_cur)
    stacked = torch.stack(terms).reshape(len(terms), v, b, c)
    weights = torch.stack([lin.weight for lin in conv.lins])  # [K, C_out, C_in]
    out = torch.einsum("kvbc,koc->bvo", stacked, weights)
    return out + conv.bias if conv.bias is not None else out


@contextlib.contextmanager
def old_graph_code():
    """Patch in the graph products and the enhancer's upsampling gradient as they were before
    issue #15 (COO + einsum; no :func:`graphavatar.enhancer.dense_grad`); restored on exit."""
    import graphavatar.enhancer as enhancer
    import graphavatar.graph_unet as gu
    with mock.patch.object(gu, "cheb_filter", old_cheb_filter), \
            mock.patch.object(gu, "sparse_apply", old_sparse_apply), \
            mock.patch.object(enhancer, "dense_grad", lambda x: x):
        yield
