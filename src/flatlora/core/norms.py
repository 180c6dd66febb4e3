"""Row norms of the merged weight W' = W + B @ A (+ D), the torch implementation of the one algorithm.

Every backend computes ||W'_i||^2 the same way: build the merged rows W_i + (B A)_i (+ D_i) block by
block in float32 and sum their squares. The expansion ||W_i||^2 + 2 <(W A^T)_i, B_i> + ||(B A)_i||^2
is cheaper on paper but cancels catastrophically when B A nearly cancels W (a row's norm can come out
negative or 0 while it is not), so it is not used. Here the blocks are chunks of rows, each at most
CHUNK_ELEMENTS large, so a big layer never gets an m x n float32 temporary; the Triton backend builds
the same rows tile by tile (`triton_noise.row_std_group`).
"""

from __future__ import annotations

import torch

from .targets import Target
from .view import View

# float32 elements of one merged-row chunk (16 MiB): large enough for full-speed matmuls, small enough
# that a 7B layer's norms never allocate a weight-sized temporary.
CHUNK_ELEMENTS = 1 << 22


@torch.no_grad()
def row_sq_norms(view: View) -> torch.Tensor:
    """||W'_i||^2 for the rows `view` holds, float32 [rows], on the weight's device."""
    w = view.mat
    rows = w.shape[0]
    fac, dense = view.terms()
    # s folded into B in float32 first: the value the Triton kernel multiplies (B * s, then the product)
    lowrank = None if fac is None else (fac[0].float() * fac[2], fac[1].float())
    out = torch.empty(rows, dtype=torch.float32, device=w.device)
    step = max(1, CHUNK_ELEMENTS // max(1, view.n))
    for i in range(0, rows, step):
        j = min(rows, i + step)
        merged = w[i:j].to(torch.float32, copy=True)  # copy: a float32 weight must not be written
        if lowrank is not None:
            merged.addmm_(lowrank[0][i:j].float(), lowrank[1].float())
        if dense is not None:
            merged += dense[i:j]
        out[i:j] = merged.square_().sum(1)
    return out


def merged_row_sq_norms(t: Target) -> torch.Tensor:
    """||W'_i||^2 of target `t` as this process holds it, float32: the torch reference that the backends
    and tests compare with."""
    return row_sq_norms(View.of(t))
