"""Row norms of the merged weight W' = W + B @ A (scalings folded into B) without building W'.

    ||W'_i||^2 = ||W_i||^2 + 2 <(W A^T)_i, B_i> + <(B (A A^T))_i, B_i>

costs one read of W (for ||W_i||^2 and the m x r product W A^T) instead of an m x n temporary.
"""

from __future__ import annotations

import torch

from .targets import Target


def _local(w: torch.Tensor) -> torch.Tensor:
    return w.to_local() if hasattr(w, "to_local") else w


@torch.no_grad()
def merged_row_sq_norms(t: Target, rows: slice | None = None, fused: bool = False) -> torch.Tensor:
    """||W'_i||^2 for the rows of `t` (all, or `rows` of them), float32, on the weight's device.

    fused=True reads W once in a Triton kernel for ||W_i||^2 and W A^T together (where the kernels serve
    the device; else the torch path)."""
    if fused:
        out = _fused(t, rows)
        if out is not None:
            return out
    # With FSDP2 the weight is a DTensor sharded by rows: work on the local rows (`rows` says which global
    # rows they are) and take the matching rows of B; A is needed whole.
    W = t.as_matrix(_local(t.dense_weight())).float()
    sl = slice(None) if rows is None else rows
    lowrank = t.lowrank()
    dense = t.dense_delta()
    if dense is not None:
        # Only layers whose update has no factor form (grouped convs, unknown LoRA kinds) get here;
        # they are small, so build their W' outright.
        merged = W + dense.to(W.device)[sl]
        if lowrank is not None:
            merged += lowrank[0].to(W.device)[sl] @ lowrank[1].to(W.device)
        return merged.pow(2).sum(1)
    out = W.pow(2).sum(1)
    if lowrank is not None:
        B, A = lowrank[0].to(W.device)[sl], lowrank[1].to(W.device)
        out += 2.0 * ((W @ A.t()) * B).sum(1)
        out += ((B @ (A @ A.t())) * B).sum(1)
    return out.clamp_min_(0.0)


def _fused(t: Target, rows: slice | None) -> torch.Tensor | None:
    from .. import kernels

    w = _local(t.dense_weight())
    if not kernels.use_triton(w.device) or t.dense_delta() is not None:
        return None
    from ..kernels import triton_noise

    if not triton_noise.supported(w) or w.dim() < 2:
        return None
    view = w.t() if t.transposed else w.reshape(w.shape[0], -1)
    lowrank = t.lowrank()
    sl = slice(None) if rows is None else rows
    A = None if lowrank is None else lowrank[1].to(w.device).contiguous()
    sq, wa = triton_noise.row_norm_parts(view, A)
    if lowrank is not None:
        B = lowrank[0].to(w.device)[sl]
        sq += 2.0 * (wa * B).sum(1)
        sq += ((B @ (A @ A.t())) * B).sum(1)
    return sq.clamp_min_(0.0)
