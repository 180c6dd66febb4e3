"""Kernel test cases (collected through test_kernels.py). Kernels: the torch Philox stream against Triton's own `randint4x` and the kernels' normal transform, and every Triton kernel
against the torch reference. Without CUDA they run on CPU tensors through TRITON_INTERPRET=1 (small
shapes); with CUDA the same tests run on the GPU, and the `gpu` tests add real sizes."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere in this process
triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from flatlora.kernels import philox  # noqa: E402
from flatlora.kernels import triton_noise as K  # noqa: E402

INTS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
DEV = "cuda" if torch.cuda.is_available() else "cpu"
if DEV == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set", allow_module_level=True)


def bits(x):
    return x.view(INTS[x.dtype])


@triton.jit
def _stream_kernel(c_ptr, i_ptr, f_ptr, seed, N: tl.constexpr):
    offs = tl.arange(0, N)
    c = tl.load(c_ptr + offs)
    a, b, cc, d = tl.randint4x(seed, c)
    tl.store(i_ptr + offs * 4 + 0, a.to(tl.int64) & 0xFFFFFFFF)
    tl.store(i_ptr + offs * 4 + 1, b.to(tl.int64) & 0xFFFFFFFF)
    tl.store(i_ptr + offs * 4 + 2, cc.to(tl.int64) & 0xFFFFFFFF)
    tl.store(i_ptr + offs * 4 + 3, d.to(tl.int64) & 0xFFFFFFFF)
    z = K._normals8(seed, c, False)  # the precise transcendentals, compiled or not
    tl.store(f_ptr + offs[:, None] * 8 + tl.arange(0, 8)[None, :], z)


@triton.jit
def _tile_kernel(f_ptr, seed, g0, ALIGNED: tl.constexpr, FAST: tl.constexpr, BLOCK_: tl.constexpr):
    """The noise kernel's [BLOCK/8, 8] block of z(seed, g0 + o), o < BLOCK."""
    q = tl.arange(0, BLOCK_ // 8)
    z = K._normals(seed, g0, q, ALIGNED, FAST)
    tl.store(f_ptr + q[:, None] * 8 + tl.arange(0, 8)[None, :], z)


def _ulps(a, b):
    """|a - b| in float32 ulps (same-sign values: the stream never gives 0 or a sign change within an ulp)."""
    return (a.view(torch.int32).long() - b.view(torch.int32).long()).abs()


@pytest.mark.parametrize("seed", [0, 12345, 2**62 + 987654321, 2**63 - 1])
def test_torch_philox_matches_triton(seed):
    """Integers bit-identical; normals within 8 ulp: both sides compute the same float32 u1 and theta (exact,
    and one rounding of an exact integer times a float32 constant), so only log/sqrt/cos/sin differ, each
    correctly rounded or within an ulp or two in torch (CPU), numpy (the interpreter) and libdevice (the
    GPU); a few ulp of each compound through r cos theta. FAST=False here: the special-function unit is
    test_noise_block_matches_the_stream's business."""
    n = 512
    g = torch.Generator().manual_seed(seed % 1000)
    # small counters, and counters >= 2^32 (the high word goes to Philox's second counter word)
    c = torch.cat([torch.arange(n // 2), torch.randint(0, 2**40, (n // 2,), generator=g)]).to(DEV)
    ints = torch.empty(4 * n, dtype=torch.int64, device=DEV)
    floats = torch.empty(8 * n, dtype=torch.float32, device=DEV)
    _stream_kernel[(1,)](c, ints, floats, seed, N=n)
    assert torch.equal(ints, torch.stack(philox.philox4x32(seed, c), 1).reshape(-1))
    ref = philox.normals8(seed, c).reshape(-1)
    assert _ulps(floats, ref).max() <= 8, _ulps(floats, ref).max()


@pytest.mark.parametrize("aligned, g0", [(a, g) for g in (0, 8 * 12345, 2**35 + 8 * 77) for a in (True, False)]
                         + [(False, 3), (False, 2**35 + 5)])  # ALIGNED launches start tiles at multiples of 8
def test_noise_block_matches_the_stream(aligned, g0):
    """_normals, both paths (one Philox call per octet when ALIGNED; per element, lane-picked, else), is
    z(seed, g0 + o): the lane order of the joins, and counters >= 2^32. The kernels' own FAST setting: on a
    GPU the special-function unit, whose lg2's absolute error (~2^-22) becomes up to ~4e-5 on z for the
    smallest r (u1 within a few 2^-16 of 1), ~1e-6 elsewhere."""
    seed, block = 2**62 + 4321, 256
    out = torch.empty(block, dtype=torch.float32, device=DEV)
    fast = K._fast()
    _tile_kernel[(1,)](out, seed, g0, ALIGNED=aligned, FAST=fast, BLOCK_=block)
    ref = philox.normal_at(seed, torch.arange(g0, g0 + block, device=DEV))
    if fast:
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)
    else:
        assert _ulps(out, ref).max() <= 8, _ulps(out, ref).max()


def test_rows_are_a_slice_of_the_matrix_and_offsets_agree():
    key, m, n = 987654321, 7, 13
    full = philox.standard_normal_rows(key, m, n, "cpu")
    assert torch.equal(philox.standard_normal_rows(key, m, n, "cpu", slice(2, 5)), full[2:5])
    o = torch.arange(m * n).reshape(m, n)
    assert torch.equal(philox.normal_at(key, o), full)
    assert abs(full.mean()) < 0.5 and 0.5 < full.std() < 1.5


SHAPES = [(20, 1030), (9, 64), (13, 37), (11, 36)]  # several tiles; aligned n; odd n; n % 8 == 4 (per element)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_noisy_copy_matches_reference(dtype, shape):
    m, n = shape
    g = torch.Generator().manual_seed(m * n)
    w = (torch.randn(m, n, generator=g) * 0.02).to(dtype).to(DEV)
    std = (torch.rand(m, generator=g) * 0.01).to(DEV)
    key, row0 = 123456789012345, 3
    out = K.noisy_copy(w, std, key, row0)
    z = philox.standard_normal_rows(key, m + row0, n, DEV, slice(row0, m + row0))
    ref = (w.float() + std[:, None] * z).to(dtype)
    # bit-exact rounding; a few fp32 ulps from the transcendentals can flip a rounding of w + eps
    assert (out.float() - ref.float()).abs().max() <= 2 * torch.finfo(dtype).eps * w.float().abs().max() + 1e-6
    if dtype != torch.float32:
        # On a GPU z comes from the special-function unit (up to ~4e-5 off for the smallest r): that flips the
        # rounding of a few entries (one of the 576 of a 9 x 64 bf16 case on the H200), never more than ~0.1 %.
        assert (bits(out) != bits(ref)).sum() <= 1 + 1e-3 * out.numel()


def test_repeated_noisy_copies_reuse_the_table_and_follow_std_and_output():
    """Forward mode's per-layer copies reuse a cached launch table: the result must still be a fresh copy into
    each output (contiguous or transposed), and follow new std values written into the same tensor."""
    g = torch.Generator().manual_seed(4)
    w = (torch.randn(40, 96, generator=g) * 0.02).to(torch.bfloat16).to(DEV)
    std = (torch.rand(40, generator=g) * 0.01).to(DEV)
    first = K.noisy_copy(w, std, 77, 0)
    again = K.noisy_copy(w, std, 77, 0)
    assert torch.equal(bits(first), bits(again)) and first.data_ptr() != again.data_ptr()
    t_out = torch.empty(96, 40, dtype=w.dtype, device=DEV).t()  # a transposed output view
    K.noisy_copy_(w, std, 77, 0, t_out)
    assert torch.equal(bits(t_out.contiguous()), bits(first))
    std.mul_(3)  # same tensor, new values: the table holds pointers, the kernel reads the values
    tripled = K.noisy_copy(w, std, 77, 0)
    eps, eps3 = first.float() - w.float(), tripled.float() - w.float()
    assert not torch.equal(bits(tripled), bits(first))
    assert abs(float(eps3.std() / eps.std()) - 3) < 0.1
    with pytest.raises(ValueError, match="output must be a"):
        K.noisy_copy_(w, std, 77, 0, torch.empty(40, 96, dtype=torch.float16, device=DEV))


def test_keys_of_all_64_bits_draw_the_reference_stream():
    m, n = 3, 64
    w = torch.zeros(m, n, dtype=torch.float32, device=DEV)
    std = torch.ones(m, device=DEV)
    tables = len(K._ONE)
    # Either side of each 32-bit half's sign bit: the one-layer launch passes the key as two signed int32s
    for key in (0, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 2**31, 2**63 - 1, 2**63, 2**63 + 5, 2**64 - 1):
        z = K.noisy_copy(w, std, key, 0)
        torch.testing.assert_close(z, philox.standard_normal_rows(key, m, n, DEV), rtol=1e-5, atol=1e-5)
    assert len(K._ONE) <= tables + 1  # one table for the weight whatever the key: the key is an argument
    assert not torch.equal(K.noisy_copy(w, std, 5, 0), K.noisy_copy(w, std, 5 + 2**63, 0))  # the top bit counts
    with pytest.raises(ValueError, match="unsigned 64-bit"):
        K.noisy_copy(w, std, 2**64, 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_perturb_is_the_noisy_copy_and_restore_is_exact(dtype):
    m, n = 20, 1030
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(m, n, generator=g) * 0.02).to(dtype).to(DEV)
    std = (torch.rand(m, generator=g) * 0.005).to(DEV)
    w0, key = w.clone(), 42
    copy = K.noisy_copy(w, std, key, 0)
    layers = [K.Layer(w, std, key)]
    rec = K.perturb_group(layers, capacity=0.5)  # room enough: no retry, so no holes in the record
    assert torch.equal(bits(w), bits(copy))
    assert 0 < rec.entries < w.numel() // 2
    # 4-byte counter, (slot, count, checksum) per tile, then per entry one word packing its in-tile offset above the
    # original bits: 4 bytes for 16-bit weights, 8 for float32
    assert rec.nbytes == 4 + 12 * K._tiles(m, n) + rec.entries * (4 if w.element_size() == 2 else 8)
    assert K.restore_group(rec).tolist() == [0]  # no tile was written by anyone else
    assert torch.equal(bits(w), bits(w0))


def _bf16_weight(m, n, seed):
    """A bf16 (m, n) weight on DEV and its untouched copy."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(m, n, generator=g) * 0.02).to(torch.bfloat16).to(DEV)
    return w, w.clone()


def test_record_overflow_retries_only_the_failed_tiles():
    m, n = 40, 1024
    w, w0 = _bf16_weight(m, n, seed=2)
    std = torch.full((m,), 0.02, device=DEV)
    layers = [K.Layer(w, std, 7)]
    rec = K.perturb_group(layers, capacity=0.01)  # far too small: most tiles fail the first pass
    assert torch.equal(bits(w), bits(K.noisy_copy(w0, std, 7, 0)))
    assert (rec.hslot >= 0).all()
    K.restore_group(rec)
    assert torch.equal(bits(w), bits(w0))


def _restored(rec):
    K.restore_group(rec)
    return rec


def _round_trip(layers, sigma):
    rec = K.perturb_group(layers, sigma=sigma)
    return rec, K.Outcome(_restored(rec)).counts()


def test_a_perturb_after_a_checked_one_is_deferred_and_still_exact():
    m, n = 24, 1024
    w, w0 = _bf16_weight(m, n, seed=4)
    std = torch.full((m,), 0.01, device=DEV)
    K._CAPACITY.clear()
    first, counts = _round_trip([K.Layer(w, std, 21)], sigma=0.01)
    assert first.used > 0 and counts == [0]  # the first perturb of these weights is checked at once: size known
    copy = K.noisy_copy(w0, std, 22, 0)
    rec = K.perturb_group([K.Layer(w, std, 22)], sigma=0.01)
    assert rec.used is None  # no host sync: the size is read with the restore's Outcome
    assert torch.equal(bits(w), bits(copy)) and (rec.hslot >= 0).all()
    assert rec.nbytes == 4 + 12 * K._tiles(m, n) + rec.ent.numel() * 4  # unsettled: what is allocated
    assert K.Outcome(_restored(rec)).counts() == [0]
    assert torch.equal(bits(w), bits(w0))
    assert rec.skipped == 0 and rec.used == int(rec.hcnt.sum())  # every tile's entries, no holes
    assert K._CAPACITY[rec.group_key] == (rec.used, 0.01)


def test_a_checked_perturb_after_the_first_is_sized_from_it_too(monkeypatch):
    m, n = 24, 1024
    w, w0 = _bf16_weight(m, n, seed=6)
    std = torch.full((m,), 0.01, device=DEV)
    K._CAPACITY.clear()
    first, _ = _round_trip([K.Layer(w, std, 51)], sigma=0.01)
    monkeypatch.setattr(K, "DEFERRED", False)
    rec = K.perturb_group([K.Layer(w, std, 52)], sigma=0.02)
    assert isinstance(rec.used, int)  # checked at once
    # twice the sigma: twice the last perturb's entries, x 9/8 (at least 1/512 of the elements, 1024 entries)
    assert rec.ent.numel() == max(1024, int(first.used * 2.0 * 9 / 8), m * n // 512)
    assert K.Outcome(_restored(rec)).counts() == [0]
    assert torch.equal(bits(w), bits(w0))


def test_a_deferred_perturb_whose_record_overflows_leaves_those_tiles_clean_and_says_so():
    m, n = 64, 1024
    w, w0 = _bf16_weight(m, n, seed=5)
    K._CAPACITY.clear()
    _round_trip([K.Layer(w, torch.full((m,), 1e-4, device=DEV), 31)], sigma=0.05)
    # 100x the noise under the same sigma hint: the estimate is far too small
    big = torch.full((m,), 1e-2, device=DEV)
    copy = K.noisy_copy(w0, big, 32, 0)
    rec = K.perturb_group([K.Layer(w, big, 32)], sigma=0.05)
    failed = (rec.hslot == -1).cpu()
    assert rec.used is None and 0 < int(failed.sum()) < failed.numel()
    tiles = bits(w).view(-1, K.BLOCK).cpu()
    assert torch.equal(tiles[failed], bits(w0).view(-1, K.BLOCK).cpu()[failed])  # left clean
    assert torch.equal(tiles[~failed], bits(copy).view(-1, K.BLOCK).cpu()[~failed])  # the others noisy
    assert K.Outcome(_restored(rec)).counts() == [0]  # a clean tile is not "modified"
    assert rec.skipped == int(failed.sum())
    assert torch.equal(bits(w), bits(w0))
    assert rec.group_key not in K._CAPACITY  # so the next perturb of the shape is checked at once
    nxt, counts = _round_trip([K.Layer(w, big, 33)], sigma=0.05)
    assert isinstance(nxt.used, int) and (nxt.hslot >= 0).all() and counts == [0]
    assert torch.equal(bits(w), bits(w0))


@pytest.mark.gpu
def test_a_deferred_perturb_of_a_7b_layer_never_waits_for_the_gpu():
    """The point of deferring: no host sync between the perturb and the forward that follows it."""
    m, n = 4096, 11008
    w = (torch.randn(m, n, device=DEV) * 0.02).bfloat16()
    w0, std = w.clone(), torch.full((m,), 0.02 * 0.05, device=DEV)
    K._CAPACITY.clear()
    _round_trip([K.Layer(w, std, 41)], sigma=0.05)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing call below raises
    try:
        rec = K.perturb_group([K.Layer(w, std, 42)], sigma=0.05)
        outcome = K.Outcome(_restored(rec))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert outcome.counts() == [0] and rec.skipped == 0
    assert torch.equal(bits(w), bits(w0))


def test_grouped_launch_with_strides_and_row_offsets():
    g = torch.Generator().manual_seed(3)
    base = [(torch.randn(s, generator=g) * 0.05).to(torch.bfloat16).to(DEV) for s in [(16, 64), (40, 24), (5, 1030)]]
    views = [base[0], base[1].t(), base[2]]  # a transposed (fan_in_fan_out) storage
    stds = [(torch.rand(v.shape[0], generator=g) * 0.01).to(DEV) for v in views]
    keys, row0s = [11, 12, 13], [0, 8, 100]
    copies = [K.noisy_copy(v, s, k, r) for v, s, k, r in zip(views, stds, keys, row0s)]
    snap = [b.clone() for b in base]
    layers = [K.Layer(v, s, k, r) for v, s, k, r in zip(views, stds, keys, row0s)]
    rec = K.perturb_group(layers)
    for v, c in zip(views, copies):
        assert torch.equal(bits(v.contiguous()), bits(c))
    K.restore_group(rec)
    for b, s in zip(base, snap):
        assert torch.equal(bits(b), bits(s))


def _std_targets():
    """Targets covering what row_std_group meets: fp32 with two active adapters (R = 5) and one (R = 3),
    bf16 fan_in_fan_out (transposed view, R = 4), and plain layers without adapters (R = 0)."""
    import peft
    from transformers.pytorch_utils import Conv1D

    from flatlora.core.targets import find_targets
    from tests.conftest import MLP, make_lora_mlp

    pm = make_lora_mlp(r=3)
    pm.add_adapter("other", peft.LoraConfig(r=2, target_modules=["lin0"], init_lora_weights=False))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "other" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    pm.base_model.set_adapter(["default", "other"])
    gpt = torch.nn.Sequential(Conv1D(24, 12), Conv1D(12, 24))  # weights stored (in, out)
    with torch.no_grad():
        for p in gpt.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    gpt = peft.get_peft_model(gpt, peft.LoraConfig(r=4, target_modules=["0", "1"], fan_in_fan_out=True,
                                                   init_lora_weights=False))
    with torch.no_grad():
        for p in gpt.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    gpt = gpt.to(torch.bfloat16)
    plain = MLP()
    targets = []
    for model, kind in ((pm, "lora"), (gpt, "lora"), (plain, "linear")):
        found, _ = find_targets(model.to(DEV), kind)
        targets += found
    return targets


def test_row_std_group_matches_the_torch_reference():
    from flatlora.core.norms import merged_row_sq_norms
    from flatlora.noise import get_noise

    targets = _std_targets()
    ranks = sorted({0 if t.terms()[0] is None else t.terms()[0][1].shape[0] for t in targets})
    assert ranks == [0, 3, 4, 5] and any(t.transposed for t in targets)
    assert {t.weight.dtype for t in targets} == {torch.float32, torch.bfloat16}
    items = []
    for t in targets:
        fac = t.terms()[0]
        b, a, s = (None, None, 1.0) if fac is None else fac
        items.append(K.StdItem(t.weight.t() if t.transposed else t.weight, a, b, s))
    sigma = 0.07
    got = K.row_std_group(items, sigma)
    for t, std in zip(targets, got):
        ref = get_noise("filter")(merged_row_sq_norms(t), t.n, sigma)
        assert std.dtype == torch.float32 and std.shape == (t.m,)
        torch.testing.assert_close(std, ref, rtol=1e-5, atol=1e-7)


def test_row_std_group_loops_over_large_ranks():
    g = torch.Generator().manual_seed(9)
    m, n, r = 19, 150, 150  # R > the kernel's rank chunk (64): several chunks, the last one partial
    w = torch.randn(m, n, generator=g).to(DEV)
    a, b = torch.randn(r, n, generator=g).to(DEV) * 0.2, torch.randn(m, r, generator=g).to(DEV) * 0.2
    w2 = torch.randn(7, n, generator=g).to(DEV)  # no low-rank term, in the same launch
    std, std2 = K.row_std_group([K.StdItem(w, a, b), K.StdItem(w2)], 0.5)
    ref = (w.double() + b.double() @ a.double()).norm(dim=1) * (0.5 / n**0.5)
    torch.testing.assert_close(std, ref.float(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(std2, w2.norm(dim=1) * (0.5 / n**0.5), rtol=1e-5, atol=1e-7)


def test_row_std_reuses_its_table_only_for_the_same_weights_and_factors():
    """The launch table is cached by what it holds: factors updated in place are read live, a replaced factor or
    a new scale gets a table of its own (a stale one would read the old tensor, or scale by the old s)."""
    g = torch.Generator().manual_seed(10)
    m, n, r = 20, 96, 4
    w = torch.randn(m, n, generator=g).to(DEV)
    a, b = torch.randn(r, n, generator=g).to(DEV), torch.randn(m, r, generator=g).to(DEV)

    def ref(a, b, s):
        return (w.double() + s * b.double() @ a.double()).norm(dim=1).float() * (0.3 / n**0.5)

    K._STD_PLANS.clear()
    (std,) = K.row_std_group([K.StdItem(w, a, b, 2.0)], 0.3)
    torch.testing.assert_close(std, ref(a, b, 2.0), rtol=1e-5, atol=1e-7)
    a.mul_(3.0)  # an optimizer step: same tensor, new values
    (std,) = K.row_std_group([K.StdItem(w, a, b, 2.0)], 0.3)
    torch.testing.assert_close(std, ref(a, b, 2.0), rtol=1e-5, atol=1e-7)
    assert len(K._STD_PLANS) == 1  # the same table
    a2 = torch.randn(r, n, generator=g).to(DEV)  # a replaced adapter
    (std,) = K.row_std_group([K.StdItem(w, a2, b, 0.5)], 0.3)
    torch.testing.assert_close(std, ref(a2, b, 0.5), rtol=1e-5, atol=1e-7)
    (std,) = K.row_std_group([K.StdItem(w, a2, b, 1.5)], 0.3)  # a new scaling (set_adapter, scale_layer)
    torch.testing.assert_close(std, ref(a2, b, 1.5), rtol=1e-5, atol=1e-7)
    assert len(K._STD_PLANS) == 3


def test_perturbs_of_the_same_weights_take_each_steps_std_and_key():
    """The perturb table is cached per group of weights; each step writes its own std pointers and keys into it.
    Every perturb must be the noisy copy of its own (std, key), and every restore exact."""
    m, n = 24, 1024
    w, w0 = _bf16_weight(m, n, seed=12)
    v, v0 = _bf16_weight(8, 512, seed=13)
    K._CAPACITY.clear()
    K._PERTURB_TABLES.clear()
    for step, scale in enumerate((0.01, 0.04, 0.02)):
        std_w = torch.linspace(0.5, 1.5, m, device=DEV) * scale  # fresh tensors: new addresses every step
        std_v = torch.full((8,), scale, device=DEV)
        keys = (2**64 - 1 - step, 100 + step)  # one key >= 2^63 (two's complement in the table)
        want_w, want_v = K.noisy_copy(w0, std_w, keys[0], 0), K.noisy_copy(v0, std_v, keys[1], 0)
        rec = K.perturb_group([K.Layer(w, std_w, keys[0]), K.Layer(v, std_v, keys[1])], sigma=scale)
        assert torch.equal(bits(w), bits(want_w)) and torch.equal(bits(v), bits(want_v)), step
        assert K.Outcome(_restored(rec)).counts() == [0, 0]
        assert torch.equal(bits(w), bits(w0)) and torch.equal(bits(v), bits(v0)), step
    assert len(K._PERTURB_TABLES) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_thousand_round_trips_are_exact(dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    w = (torch.randn(4096, 4096, device="cuda", generator=g) * 0.02).to(dtype)
    w0 = w.clone()
    std = w.float().norm(dim=1) * (0.1 / 64)
    for step in range(1000):
        layers = [K.Layer(w, std, step)]
        rec = K.perturb_group(layers)
        K.restore_group(rec)
    assert torch.equal(bits(w), bits(w0))


def _copy_cases(dtype):
    """(w, std, key, row0) for every launch flavour: row-major 16-byte aligned (ALIGNED, CONTIG); n % 8 != 0;
    a transposed (fan_in_fan_out) view; a contiguous weight at an address that is not 16-byte aligned."""
    g = torch.Generator(device="cuda").manual_seed(1)
    rnd = lambda *s: (torch.randn(*s, device="cuda", generator=g) * 0.02).to(dtype)  # noqa: E731
    ws = [rnd(512, 1024), rnd(300, 1030), rnd(1024, 384).t(), rnd(200 * 256 + 1)[1:].view(200, 256)]
    return [(w, torch.rand(w.shape[0], device="cuda", generator=g) * 0.01, 2**63 + 99 * i, 7 * i)
            for i, w in enumerate(ws)]


def _outputs(w):
    """Fresh outputs of every alignment and layout: new, one element into a buffer (not 16-byte aligned), 16
    bytes into one (aligned again), and a transposed view."""
    m, n = w.shape
    buf = torch.empty(m * n + 16, dtype=w.dtype, device="cuda")
    step = 16 // w.element_size()
    return [torch.empty(m, n, dtype=w.dtype, device="cuda"), buf[1:1 + m * n].view(m, n),
            buf[step:step + m * n].view(m, n), torch.empty(n, m, dtype=w.dtype, device="cuda").t()]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_prebound_noisy_copies_are_the_ordinary_launches(dtype, monkeypatch):
    """noisy_copy_'s pre-bound launch writes the bits of Triton's ordinary launch and of the grouped copy, for
    outputs of every alignment and weights of every layout, and it is the launch taken after each
    specialization's first; a launch hook sends every launch back through Triton."""
    from triton import knobs

    monkeypatch.setattr(K, "_ONE", {})
    monkeypatch.setattr(K, "_PREBOUND", {})
    ordinary = []
    launch = K._launch
    monkeypatch.setattr(K, "_launch", lambda *a, **k: ordinary.append(k.get("layer") is not None) or launch(*a, **k))
    cases = _copy_cases(dtype)

    def window(r):
        """Round r's (w, std, key, row0) per case: every round is a new window, with a fresh std tensor and
        a new key (keys below 2^31, between 2^31 and 2^32, and >= 2^63 among them: the halves' signs)."""
        keys = [(k ^ (r * 0x9E3779B97F4A7C15)) & (2**64 - 1) for _, _, k, _ in cases]
        if r % 5 == 1:
            keys = [3 + r, 2**31 + r, 2**32 - 1 - r, 2**64 - 1 - r][:len(cases)]
        return [(w, std * (1 + r / 10), k, row0) for (w, std, _, row0), k in zip(cases, keys)]

    rounds = [window(r) for r in range(25)]
    refs = []
    for layers in rounds:
        refs.append([])
        for w, std, key, row0 in layers:
            ref = torch.empty(w.shape, dtype=dtype, device="cuda")
            K.noisy_copy_group([K.Layer(w, std, key, row0)], [ref])
            refs[-1].append(bits(ref))
    ordinary.clear()
    calls = 0
    for layers, round_refs in zip(rounds, refs):
        for (w, std, key, row0), ref in zip(layers, round_refs):
            for out in _outputs(w):
                K.noisy_copy_(w, std, key, row0, out)
                calls += 1
                assert torch.equal(bits(out.contiguous()), ref)
            # the weight in new storage at every call (a quantized base's dequantized W, a gathered shard)
            fresh = torch.empty_strided(w.shape, w.stride(), dtype=dtype, device="cuda").copy_(w)
            out = torch.empty(w.shape, dtype=dtype, device="cuda")
            K.noisy_copy_(fresh, std, key, row0, out)
            calls += 1
            assert torch.equal(bits(out), ref)
    assert len(K._ONE) == len(cases) * 2  # one table per weight and output layout, whatever the window
    refs = refs[0]
    assert 4 <= len(K._PREBOUND) == len(ordinary) < calls // 20  # one ordinary launch per specialization
    assert any(not key[7] for key in K._PREBOUND)  # some outputs were not 16-byte aligned
    assert any(not key[6] for key in K._PREBOUND)  # nor some weights
    with monkeypatch.context() as m:  # Triton's ordinary launch for every call: the same bits
        m.setattr(K, "_plain_launch", lambda *a: False)
        for (w, std, key, row0), ref in zip(cases, refs):
            for out in _outputs(w):
                K.noisy_copy_(w, std, key, row0, out)
                assert torch.equal(bits(out.contiguous()), ref)
    seen = []
    hook = lambda metadata: seen.append(metadata.get()["name"])  # noqa: E731 (a LazyDict)
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        before, n = len(ordinary), len(K._PREBOUND)
        w, std, key, row0 = cases[0]
        out = torch.empty_like(w)
        K.noisy_copy_(w, std, key, row0, out)
        torch.cuda.synchronize()
        assert seen == ["_noise_kernel"] and len(ordinary) == before + 1 and len(K._PREBOUND) == n
        assert torch.equal(bits(out), refs[0])
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)


# ---------------------------------------------------------------- the engine through the kernels


@pytest.fixture
def force_triton(monkeypatch):
    import flatlora.kernels as kernels

    monkeypatch.setattr(kernels, "FORCE_TRITON", True)


def _train(mode, dtype, generator="philox", steps=4, check_std=False):
    from flatlora import FlatLoRA, FlatLoRAConfig
    from flatlora.core.norms import merged_row_sq_norms
    from flatlora.noise import get_noise
    from tests.conftest import batches, frozen_bits, make_lora_mlp, trainable

    pm = make_lora_mlp(dtype=dtype).to(DEV)
    before = frozen_bits(pm)
    flat = FlatLoRA(pm, FlatLoRAConfig(sigma=0.3, total_steps=steps, mode=mode, generator=generator))
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.05)
    for t, x in enumerate(batches(steps, dtype=dtype)):
        if check_std:  # the torch reference, from the clean weights
            ref = {tg.name: get_noise("filter")(merged_row_sq_norms(tg), tg.n, flat.sigma_at(t)) for tg in flat.targets}
        with flat.step(t):
            if check_std:
                for name, std in ref.items():
                    torch.testing.assert_close(flat.row_std(name, t), std, rtol=1e-5, atol=1e-7)
            pm(x.to(DEV)).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    after = frozen_bits(pm)
    assert all(torch.equal(before[k], after[k]) for k in before)
    return trainable(pm), flat


@pytest.mark.parametrize("mode", ["inplace", "forward"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_engine_through_kernels_is_exact(force_triton, mode, dtype):
    _train(mode, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_engine_inplace_std_is_one_grouped_launch(force_triton, monkeypatch, dtype):
    calls = []
    group = K.row_std_group
    monkeypatch.setattr(K, "row_std_group", lambda items, s: calls.append(len(items)) or group(items, s))
    _, flat = _train("inplace", dtype, steps=3, check_std=True)  # the torch reference's std, exact restore
    noisy = sum(flat.sigma_at(t) > 0 for t in range(3))  # sigma_t = 0 draws nothing
    assert noisy >= 2 and calls == [2] * noisy  # both layers, one call per begin_step


def test_triton_backend_only_where_the_kernels_serve(monkeypatch):
    import flatlora.kernels as kernels
    from flatlora import FlatLoRA, FlatLoRAConfig
    from tests.conftest import make_lora_mlp

    for gen in ("torch", "philox"):
        flat = FlatLoRA(make_lora_mlp(), FlatLoRAConfig(sigma=0.1, total_steps=2, generator=gen))
        assert set(flat.backends().values()) == {"torch"}  # CPU without FORCE_TRITON
    monkeypatch.setattr(kernels, "FORCE_TRITON", True)
    for gen, backend in (("torch", "torch"), ("philox", "triton")):  # the kernels draw the Philox stream only
        flat = FlatLoRA(make_lora_mlp(), FlatLoRAConfig(sigma=0.1, total_steps=2, generator=gen))
        assert set(flat.backends().values()) == {backend}


@pytest.mark.parametrize("mode", ["inplace", "forward"])
def test_engine_kernels_match_the_torch_philox_path(monkeypatch, mode):
    import flatlora.kernels as kernels

    ref, _ = _train(mode, torch.float32)  # pure-torch Philox (kernels off on CPU)
    monkeypatch.setattr(kernels, "FORCE_TRITON", True)
    got, flat = _train(mode, torch.float32)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-5)


def test_engine_noise_is_the_philox_stream():
    from flatlora import FlatLoRA, FlatLoRAConfig
    from tests.conftest import make_lora_mlp

    pm = make_lora_mlp()
    flat = FlatLoRA(pm, FlatLoRAConfig(sigma=0.1, total_steps=3, generator="philox"))
    t = flat.targets[0]
    eps = flat.noise(t.name, 2)
    std = flat.row_std(t.name, 2)
    from flatlora.rng import noise_key

    z = philox.standard_normal_rows(noise_key(0, 2, t.layer_id), t.m, t.n, "cpu")
    torch.testing.assert_close(eps, z * std[:, None])


def test_generator_field_is_validated():
    from flatlora import FlatLoRAConfig
    from flatlora.kernels import resolve_generator

    assert FlatLoRAConfig().generator == "auto"
    with pytest.raises(ValueError, match="generator"):
        FlatLoRAConfig(generator="curand")
    assert resolve_generator("auto", "cpu") == "torch"
    assert resolve_generator("philox", "cpu") == "philox"


def test_restore_leaves_tiles_written_inside_the_window_and_counts_them():
    m, n = 4, K.BLOCK // 2  # 2 tiles: rows 0-1 and rows 2-3
    g = torch.Generator().manual_seed(4)
    w = (torch.randn(m, n, generator=g) * 0.02).to(torch.bfloat16).to(DEV)
    other = (torch.randn(16, 32, generator=g) * 0.02).to(torch.bfloat16).to(DEV)
    w0, other0 = w.clone(), other.clone()
    std = torch.full((m,), 0.01, device=DEV)
    layers = [K.Layer(other, torch.full((16,), 0.01, device=DEV), 5), K.Layer(w, std, 6)]
    rec = K.perturb_group(layers)
    written = w[1, 3].clone()
    w[1, 3] += 1.0  # someone writes into the noisy weight of the first tile while the noise is on
    tampered = w[:2].clone()
    assert K.restore_group(rec).tolist() == [0, 1]
    assert torch.equal(bits(w[:2]), bits(tampered)) and not torch.equal(w[1, 3], written)  # left as found
    assert torch.equal(bits(w[2:]), bits(w0[2:]))  # the other tile restored exactly
    assert torch.equal(bits(other), bits(other0))
