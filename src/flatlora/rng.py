"""Randomness owned by flatlora: noise as a pure function of (seed, step, layer, row, column).

Every noise draw gets its own 63-bit key, mixed with splitmix64 from the run seed, the update step,
a stable id of the layer (a hash of its module name, so adding or excluding other layers never
changes this layer's noise) and, with per-rank noise, the data-parallel rank. The key seeds private
`torch.Generator`s that draw the layer's m x n standard normals in row-major order (on CPU one per block
of CPU_BLOCK_ROWS rows, seeded from (key, block)), so element (i, j) is fixed by (key, i, j). Restore and backward replay the key instead of storing the noise, and
torch's global RNG (which drives the user's dropout and data order) is never touched.
"""

from __future__ import annotations

import hashlib
import threading

import torch

_MASK64 = (1 << 64) - 1

# Wrappers that prefix module names without changing the model: DDP, FSDP1, torch.compile,
# activation checkpointing. Stripping them keeps a layer's noise the same however it is wrapped.
_WRAPPER_PREFIXES = ("module.", "_fsdp_wrapped_module.", "_orig_mod.", "_checkpoint_wrapped_module.")


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def canonical_name(name: str) -> str:
    """Module name as the user's own model calls it: wrapper prefixes removed, and for PEFT layers the path
    below PEFT's `base_model.model.` (`model.base_model.model.layers.0.q` -> `layers.0.q`), so a plain loop,
    a Lightning module holding the PEFT model as `self.model`, DDP and FSDP all key the same noise."""
    parts = [p for p in name.split(".") if p]
    wrappers = {w.rstrip(".") for w in _WRAPPER_PREFIXES}
    name = ".".join(p for p in parts if p not in wrappers)
    marker = "base_model.model."
    return name[name.rindex(marker) + len(marker):] if marker in name else name


def layer_id(name: str) -> int:
    """Stable 64-bit id of a layer from its canonical module name."""
    digest = hashlib.blake2b(canonical_name(name).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def noise_key(seed: int, step: int, layer: int, rank: int | None = None) -> int:
    """63-bit key of one layer's noise at one update step (and rank, for per-rank noise)."""
    return layer_key(step_key(seed, step), layer, rank)


def step_key(seed: int, step: int) -> int:
    """The part of `noise_key` shared by every layer of a step (a draw of many layers mixes it once)."""
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (step & _MASK64))


def layer_key(step_key: int, layer: int, rank: int | None = None) -> int:
    """`noise_key` from its step's `step_key`."""
    key = _splitmix64(step_key ^ (layer & _MASK64))
    return _splitmix64(key ^ ((-1 if rank is None else rank) & _MASK64)) >> 1


# CPU draws come in blocks of this many rows, each from its own generator keyed by (key, block): the
# blocks fill in parallel (torch's CPU normal_ is serial, and the noise draw is most of Flat-LoRA's CPU
# cost), and a row slice only draws the blocks it touches. Part of the stream's definition: fixed.
CPU_BLOCK_ROWS = 64
_POOL = None
_LOCAL = threading.local()


def _pool():
    global _POOL
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        # The calling thread fills a share itself, so one worker fewer than torch's threads.
        _POOL = ThreadPoolExecutor(max(1, torch.get_num_threads() - 1), thread_name_prefix="flatlora-rng")
    return _POOL


def _block_generator() -> torch.Generator:
    # One generator per thread, re-seeded for every block: manual_seed resets the whole state (and the
    # cached second normal), so it draws exactly what a fresh generator with that seed would.
    gen = getattr(_LOCAL, "gen", None)
    if gen is None:
        gen = _LOCAL.gen = torch.Generator()
    return gen


def _cpu_blocks(key: int, m: int, n: int, rows: slice, scale: torch.Tensor | None) -> torch.Tensor:
    start, stop, _ = rows.indices(m)
    first, last = start // CPU_BLOCK_ROWS, (max(stop, start + 1) - 1) // CPU_BLOCK_ROWS
    lo = first * CPU_BLOCK_ROWS
    out = torch.empty((min(m, (last + 1) * CPU_BLOCK_ROWS) - lo, n), dtype=torch.float32)
    if scale is not None:  # one factor per row of `out` (rows outside `rows` are dropped below)
        scale = torch.nn.functional.pad(scale, (start - lo, out.shape[0] - (stop - lo)), value=1.0)[:, None]

    def fill(b0: int, b1: int) -> None:  # torch ops release the GIL, so ranges fill on several cores
        gen = _block_generator()
        for b in range(b0, b1):
            gen.manual_seed(_splitmix64(key ^ b) >> 1)
            i, j = b * CPU_BLOCK_ROWS - lo, (b + 1) * CPU_BLOCK_ROWS - lo
            block = out[i:j].normal_(generator=gen)
            if scale is not None:  # while the block is in cache; the same float32 product as a separate pass
                block.mul_(scale[i:j])

    # One contiguous range of blocks per thread, the caller's included: a task per block cost a pool
    # hand-off (and GIL round trips) every ~0.1 ms, which dominated the draw whenever the cores were busy.
    blocks = last + 1 - first
    parts = min(blocks, torch.get_num_threads()) if out.numel() >= 1 << 16 else 1
    edges = [first + blocks * i // parts for i in range(parts + 1)]
    futures = [_pool().submit(fill, edges[i], edges[i + 1]) for i in range(1, parts)]
    try:
        fill(edges[0], edges[1])
    finally:
        for f in futures:
            f.result()
    return out[start - lo:stop - lo]


def standard_normal(key: int, m: int, n: int, device: torch.device | str, rows: slice | None = None,
                    generator: str = "torch", scale: torch.Tensor | None = None) -> torch.Tensor:
    """The m x n float32 standard normals of `key` (or just `rows` of them), on `device`; with `scale`
    (one per returned row) each row multiplied by its factor: `z.mul_(scale[:, None])`, bit for bit.

    Values depend only on (key, i, j) and the stream: a row slice equals the same rows of the full draw,
    so sharded weights get the rows the unsharded weight would have. generator="torch" uses private
    torch.Generators (on CPU one per block of CPU_BLOCK_ROWS rows, filled in parallel; on other devices
    one for the whole matrix); "philox" computes only the rows asked for, with the counter-based stream of
    `flatlora.kernels.philox` (the same on every device, up to the last ulp).
    """
    if generator == "philox":
        from .kernels.philox import standard_normal_rows

        z = standard_normal_rows(key, m, n, device, rows)
    elif torch.device(device).type == "cpu":
        return _cpu_blocks(key, m, n, slice(None) if rows is None else rows, scale)
    else:
        gen = torch.Generator(device=device).manual_seed(key)
        z = torch.randn((m, n), generator=gen, device=device, dtype=torch.float32)
        z = z if rows is None else z[rows]
    return z if scale is None else z.mul_(scale.to(z.device)[:, None])
