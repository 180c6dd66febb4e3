"""flatlora.analysis: landscapes and sharpness over W' = W + sBA on toy losses with known answers."""

import copy

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
from peft import AdaLoraConfig, LoraConfig, get_peft_model  # noqa: E402

from flatlora.analysis import (create_weight_space, expected_sharpness, hessian_trace, loss_landscape,  # noqa: E402
                               mean_over, sharpness_report, top_hessian_eigenvalue, worst_case_sharpness)
from flatlora.analysis.landscape import combine  # noqa: E402

M, N = 4, 6


class Lin(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.lin = nn.Linear(N, M, bias=False, dtype=dtype)

    def forward(self, x):
        return self.lin(x)


def lora_model(seed=0, dtype=torch.float32, center=None):
    """A PEFT LoRA layer (B != 0); with `center`, W is set so that W' = W + sBA equals it."""
    g = torch.Generator().manual_seed(seed)
    base = Lin(dtype)
    with torch.no_grad():
        base.lin.weight.copy_(torch.randn(M, N, generator=g))
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["lin"], init_lora_weights=False))
    layer = model.base_model.model.lin
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.randn(2, N, generator=g) * 0.5)
        layer.lora_B["default"].weight.copy_(torch.randn(M, 2, generator=g) * 0.5)
        if center is not None:
            delta = layer.get_delta_weight("default").float()
            layer.get_base_layer().weight.copy_((center - delta).to(dtype))
    return model


def merged_of(model):
    """W' as the forward sees it: the layer applied to the identity gives W'^T."""
    eye = torch.eye(N, dtype=model.base_model.model.lin.get_base_layer().weight.dtype)
    return model(eye).float().t()


# ---------------------------------------------------------------------- quadratic bowl
H = torch.tensor([[0.3, 0.5, 0.7, 0.2, 0.9, 0.4],
                  [0.6, 5.0, 0.1, 0.8, 0.3, 0.5],
                  [0.2, 0.4, 0.6, 0.7, 0.1, 0.3],
                  [0.9, 0.2, 0.5, 0.4, 0.6, 0.8]])
C = torch.linspace(-1, 1, M * N).reshape(M, N)


def bowl(m):  # L(W') = ½ Σ h_ij (W'_ij − c_ij)²: Hessian diag(h), λ_max = 5, tr = Σ h
    return 0.5 * (H * (merged_of(m) - C) ** 2).sum()


def test_surface_matches_analytic_bowl():
    model = lora_model()
    space = create_weight_space(model)
    w = space.merged()[0]
    assert torch.allclose(w, merged_of(model), atol=1e-6)  # the space sees W + sBA, not W
    res = loss_landscape(model, bowl, dims=2, steps=5, span=0.5, seed=3)
    d1, d2 = (space.random_direction(3, k)[0] for k in range(2))
    for i, a in enumerate(res.axes[0]):
        for j, b in enumerate(res.axes[1]):
            expect = float(0.5 * (H * (w + a * d1 + b * d2 - C) ** 2).sum())
            assert res.loss[i][j] == pytest.approx(expect, rel=1e-5, abs=1e-6)
    assert res.center_loss == pytest.approx(bowl(model).item(), rel=1e-6)
    curve = loss_landscape(model, bowl, dims=1, steps=7, span=(-1.0, 1.0), seed=3)
    for a, val in zip(curve.axes[0], curve.loss):
        assert val == pytest.approx(float(0.5 * (H * (w + a * d1 - C) ** 2).sum()), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("hvp", ["double", "fd"])
def test_hessian_of_bowl(hvp):
    model = lora_model()
    top = top_hessian_eigenvalue(model, bowl, iters=60, tol=1e-7, hvp=hvp)
    assert top["hvp"] == hvp
    assert top["eigenvalue"] == pytest.approx(5.0, rel=1e-3)
    tr = hessian_trace(model, bowl, n_probes=3, hvp=hvp)
    # Rademacher probes are exact on a diagonal Hessian: zᵀ diag(h) z = Σ h
    assert tr["trace"] == pytest.approx(float(H.sum()), rel=1e-3)


def test_expected_sharpness_of_bowl_is_half_sigma2_weighted_norms():
    # At the minimum E L(W'+ε) − L = ½ Σ_ij h_ij σ² ‖W'_i‖²/n: check the mean against it within its CI.
    model = lora_model(center=C)
    w = C
    sig = 0.1
    expect = float(0.5 * (H * (sig ** 2) * (w.norm(dim=1, keepdim=True) ** 2) / N).sum())
    (row,) = expected_sharpness(model, bowl, sigmas=[sig], n_samples=200, seed=1)
    assert abs(row["increase"] - expect) < 2 * row["ci95"]
    assert row["ci95"] < 0.35 * expect


# ---------------------------------------------------------------------- two minima: flat ranks flatter
A_FLAT, A_SHARP = 1.0, 10.0
C1 = torch.linspace(0.5, 1.5, M * N).reshape(M, N)
C2 = -C1  # same row norms, so filter-normalised moves are the same size at both minima


def two_wells(m):  # soft-min of a flat well at C1 and a sharp well at C2
    w = merged_of(m)
    e1 = -0.5 * A_FLAT * ((w - C1) ** 2).sum()
    e2 = -0.5 * A_SHARP * ((w - C2) ** 2).sum()
    return -torch.logsumexp(torch.stack([e1, e2]), 0)


def test_flatter_minimum_ranks_flatter_under_all_metrics():
    flat, sharp = lora_model(center=C1), lora_model(center=C2)
    kw = dict(sigmas=[0.05], n_samples=8, rho=0.05, ascent_steps=3, power_iters=30, trace_probes=4, seed=0)
    rf, rs = sharpness_report(flat, two_wells, **kw), sharpness_report(sharp, two_wells, **kw)
    assert rf.base_loss == pytest.approx(rs.base_loss, abs=1e-5)  # both are minima of equal depth
    assert rf.expected[0]["increase"] + rf.expected[0]["ci95"] < rs.expected[0]["increase"] - rs.expected[0]["ci95"]
    assert 0 < rf.worst_case["increase"] < rs.worst_case["increase"]
    assert rf.hessian["eigenvalue"] == pytest.approx(A_FLAT, rel=1e-2)
    assert rs.hessian["eigenvalue"] == pytest.approx(A_SHARP, rel=1e-2)
    assert rf.hessian["trace"] < rs.hessian["trace"]
    # paired draws: same seed -> same standard normals -> ratio of the expected increases is the curvature ratio
    assert rs.expected[0]["increase"] / rf.expected[0]["increase"] == pytest.approx(A_SHARP / A_FLAT, rel=0.05)
    # paired over the same draws, the sharp minimum's excess is significant
    from flatlora.analysis import paired_difference

    diff = paired_difference(rf.expected[0], rs.expected[0])
    assert diff["difference"] - diff["ci95"] > 0
    # the curves agree: the flat one rises less at every nonzero step
    cf = loss_landscape(flat, two_wells, dims=1, steps=5, span=0.2)
    cs = loss_landscape(sharp, two_wells, dims=1, steps=5, span=0.2)
    assert all(a < b for a, b, x in zip(cf.loss, cs.loss, cf.axes[0]) if x != 0)


def test_worst_case_ball_is_respected_and_beats_one_step():
    model = lora_model(center=C1)
    one = worst_case_sharpness(model, bowl, rho=0.1, steps=1)
    five = worst_case_sharpness(model, bowl, rho=0.1, steps=5)
    assert five["increase"] >= one["increase"] - 1e-7 > 0
    assert five["radius"] == pytest.approx(0.1, rel=1e-4)  # ascent ends on the boundary, never outside
    glob = worst_case_sharpness(model, bowl, rho=0.1, steps=5, ball="global")
    assert 0 < glob["increase"] and glob["radius"] == pytest.approx(0.1, rel=1e-4)
    assert worst_case_sharpness(model, bowl, rho=0.2, steps=5)["increase"] > five["increase"]
    # one step is SAM's ε = ρ‖W'_i‖ ĝ_i per row: check it against the closed form of the bowl
    w = create_weight_space(model).merged()[0]
    g = H * (w - C)
    eps = 0.1 * w.norm(dim=1, keepdim=True) * g / g.norm(dim=1, keepdim=True)
    sam = float(0.5 * (H * (w + eps - C) ** 2).sum() - 0.5 * (H * (w - C) ** 2).sum())
    assert one["increase"] == pytest.approx(sam, rel=1e-4)


# ---------------------------------------------------------------------- directions: seeded, filter-normalised
def test_directions_are_seeded_and_filter_normalised():
    model = lora_model()
    space = create_weight_space(model)
    state = torch.get_rng_state()
    d0, d0b, d1 = space.random_direction(7), space.random_direction(7), space.random_direction(8)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is never used
    assert torch.equal(d0[0], d0b[0]) and not torch.equal(d0[0], d1[0])
    assert torch.allclose(d0[0].norm(dim=1), space.merged()[0].norm(dim=1), rtol=1e-5)
    assert not torch.equal(space.random_direction(7, 0)[0], space.random_direction(7, 1)[0])
    # a fresh model with the same weights gets the same directions
    assert torch.equal(create_weight_space(lora_model()).random_direction(7)[0], d0[0])


def test_equal_shaped_layers_get_different_directions_and_conv_rows_are_output_channels():
    net = nn.Sequential(nn.Linear(5, 5), nn.Linear(5, 5), nn.Conv2d(3, 4, 3))
    model = get_peft_model(net, LoraConfig(r=2, target_modules=["0", "1", "2"], init_lora_weights=False))
    space = create_weight_space(model)
    d = space.random_direction(0)
    assert not torch.equal(d[0], d[1])
    conv = space.blocks[2]
    assert (conv.m, conv.n) == (4, 27)
    assert torch.allclose(d[2].norm(dim=1), space.merged()[2].norm(dim=1), rtol=1e-5)


def _merged_by_peft(model):
    merged = copy.deepcopy(model).merge_and_unload()
    return {n: p.detach() for n, p in merged.named_parameters()}


@pytest.mark.parametrize("kind", ["conv", "fan_in_fan_out", "adalora"])
def test_merged_weight_matches_peft_merge(kind):
    g = torch.Generator().manual_seed(0)
    if kind == "conv":
        net = nn.Sequential(nn.Conv2d(3, 4, 3))
        model = get_peft_model(net, LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
        key, to_logical = "0.weight", lambda w: w.reshape(4, -1)
    elif kind == "fan_in_fan_out":
        from transformers.pytorch_utils import Conv1D

        net = nn.Sequential(Conv1D(4, 6))  # weight stored (in, out)
        model = get_peft_model(net, LoraConfig(r=2, target_modules=["0"], fan_in_fan_out=True, init_lora_weights=False))
        key, to_logical = "0.weight", lambda w: w.t()
    else:
        net = nn.Sequential(nn.Linear(6, 4))
        model = get_peft_model(net, AdaLoraConfig(r=2, target_modules=["0"], init_lora_weights=False, total_step=10))
        key, to_logical = "0.weight", lambda w: w
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g))
    space = create_weight_space(model)
    ref = to_logical(_merged_by_peft(model)[key])
    assert torch.allclose(space.merged()[0], ref, atol=1e-5)


# ---------------------------------------------------------------------- the model is left exactly as it was
def _snapshot(model):
    return ({n: p.detach().clone() for n, p in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            {n: m.training for n, m in model.named_modules()})


def _assert_same(model, snap):
    params, flags, modes = snap
    for n, p in model.state_dict().items():
        a, b = p.detach(), params[n]
        assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8) if a.dim() else a, b.view(torch.uint8) if b.dim() else b), n
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert modes == {n: m.training for n, m in model.named_modules()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scope", ["lora", "all"])
def test_model_bit_identical_after_analysis(dtype, scope):
    model = lora_model(dtype=dtype)
    model.train()
    model.base_model.model.lin.lora_dropout.eval()  # a mixed train/eval state must come back as it was
    snap = _snapshot(model)
    loss_fn = mean_over([0.1, 1.0], lambda m, k: k * bowl(m))
    loss_landscape(model, loss_fn, dims=2, steps=3, scope=scope, metric_fn=lambda m: -bowl(m))
    sharpness_report(model, loss_fn, sigmas=[0.05, 0.5], n_samples=3, ascent_steps=2, power_iters=3, trace_probes=2,
                     hvp="double", scope=scope)
    _assert_same(model, snap)
    # an analysis that fails half-way also puts everything back
    calls = []

    def flaky(m):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("boom")
        return bowl(m)

    with pytest.raises(RuntimeError, match="boom"):
        loss_landscape(model, flaky, dims=2, steps=3)
    with pytest.raises(RuntimeError, match="boom"):
        calls.clear()
        worst_case_sharpness(model, flaky, steps=5)
    _assert_same(model, snap)
    assert all(p.grad is None for p in model.parameters())


def test_bf16_points_do_not_accumulate_rounding():
    # each grid point is written from the pristine copy, so revisiting the centre gives the centre's loss exactly
    model = lora_model(dtype=torch.bfloat16)
    res = loss_landscape(model, bowl, dims=1, steps=3, span=0.5)
    assert res.loss[1] == res.center_loss


def test_scope_all_includes_plain_weights_but_not_adapters():
    net = nn.Sequential(nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 2))
    model = get_peft_model(net, LoraConfig(r=2, target_modules=["0"]))
    names = lambda s: [b.name for b in create_weight_space(model, scope=s).blocks]  # noqa: E731
    assert names("lora") == ["base_model.model.0"]
    assert len(names("matrices")) == 2 and len(names("all")) == 4
    assert not any("lora_" in n for n in names("all"))


def test_expected_sharpness_uses_common_random_numbers_across_sigma():
    # with the same draws, the increase of a quadratic scales exactly as σ² around a minimum
    model = lora_model(center=C)
    rows = expected_sharpness(model, bowl, sigmas=[0.01, 0.02], n_samples=3, seed=5)
    assert rows[1]["increase"] / rows[0]["increase"] == pytest.approx(4.0, rel=1e-3)


def test_explicit_directions():
    model = lora_model()
    space = create_weight_space(model)
    d = space.random_direction(0)
    res = loss_landscape(model, bowl, dims=1, steps=3, span=1.0, directions=[d])
    res2 = loss_landscape(model, bowl, dims=1, steps=3, span=0.5, directions=[combine([2.0], [d])])
    assert res.loss == pytest.approx(res2.loss, rel=1e-6)


def test_curvlinops_agrees_when_installed():
    curvlinops = pytest.importorskip("curvlinops")
    model = lora_model()
    space = create_weight_space(model)

    class Wrap(nn.Module):  # curvlinops wants model(X) and loss(pred, y): the closure ignores X
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return bowl(self.m)

    class Identity(nn.Module):
        reduction = "sum"

        def forward(self, out, y):
            return out

    p = space.blocks[0].param
    p.requires_grad_(True)
    try:
        op = curvlinops.HessianLinearOperator(Wrap(model), Identity(), [p], [(torch.zeros(1), torch.zeros(1))],
                                              batch_size_fn=lambda x: 1)
        v = torch.randn(p.shape, generator=torch.Generator().manual_seed(0))
        (hv,) = op @ [v]
    finally:
        p.requires_grad_(False)
    assert torch.allclose(hv, H * v, atol=1e-5)


def test_loss_fn_may_return_loss_and_metric_from_one_pass():
    model = lora_model()
    res = loss_landscape(model, lambda m: (bowl(m), -bowl(m)), dims=1, steps=3)
    assert res.metric == [-v for v in res.loss] and res.center_metric == -res.center_loss
    assert loss_landscape(model, bowl, dims=1, steps=3).metric is None
