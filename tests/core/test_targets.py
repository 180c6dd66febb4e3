"""Every kind of PEFT LoRA layer is found and perturbed with the right rows; bad models fail loudly."""

import copy

import peft
import pytest
import torch
from torch import nn

from flatlora import FlatLoRA, FlatLoRAConfig
from tests.conftest import frozen_bits
from tests.core.test_noise_distribution import merged_rows


def _randomise(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


class GPT2Like(nn.Module):
    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.c_attn = Conv1D(24, 12)  # nf=24 outputs, nx=12 inputs: weight stored (12, 24)
        self.c_proj = Conv1D(12, 24)

    def forward(self, x):
        return self.c_proj(torch.tanh(self.c_attn(x)))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.pw = nn.Conv2d(8, 16, 1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.pw(torch.relu(self.conv1(x))))
        return self.fc(h.mean((2, 3)))


def build(kind):
    g = torch.Generator().manual_seed(1)
    if kind == "fan_in_fan_out":
        base, x = GPT2Like(), torch.randn(2, 5, 12, generator=g)
        cfg = peft.LoraConfig(r=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, init_lora_weights=False)
    elif kind == "conv":
        base, x = ConvNet(), torch.randn(2, 3, 6, 6, generator=g)
        cfg = peft.LoraConfig(r=4, target_modules=["conv1", "pw", "fc"], init_lora_weights=False)
    elif kind == "dora":
        from tests.conftest import MLP

        base, x = MLP(), torch.randn(4, 16, generator=g)
        cfg = peft.LoraConfig(r=4, target_modules=["lin0", "lin1"], use_dora=True, init_lora_weights=False)
    elif kind == "adalora":
        from tests.conftest import MLP

        base, x = MLP(), torch.randn(4, 16, generator=g)
        cfg = peft.AdaLoraConfig(r=4, target_modules=["lin0", "lin1"], total_step=10, init_lora_weights=False)
    else:
        raise ValueError(kind)
    pm = peft.get_peft_model(_randomise(base), cfg)
    _randomise_adapters(pm)
    return pm, x


def _randomise_adapters(pm, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if "magnitude" in n else 0.0))


def out_of(pm, x):
    y = pm(x)
    return (y.logits if hasattr(y, "logits") else y).float().pow(2).mean()


KINDS = ["fan_in_fan_out", "conv", "dora", "adalora"]


def assert_same_grads(model, ref):
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    for n, p in model.named_parameters():
        if p.requires_grad and p.grad is not None:
            torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("kind", KINDS)
def test_norms_match_materialised_merged_weight(kind):
    from flatlora.core.norms import merged_row_sq_norms

    pm, _ = build(kind)
    flat = FlatLoRA(pm, FlatLoRAConfig(sigma=0.1, total_steps=2))
    assert len(flat.targets) >= 2
    for t in flat.targets:
        torch.testing.assert_close(merged_row_sq_norms(t), merged_rows(t.lora).pow(2).sum(1), rtol=1e-5, atol=1e-6)


# dora + forward has different, documented semantics (test_dora_forward_mode_semantics), so it is not in this grid.
@pytest.mark.parametrize("kind, mode", [(k, m) for m in ("inplace", "forward") for k in KINDS
                                        if (k, m) != ("dora", "forward")])
def test_grads_equal_explicit_model(kind, mode):
    pm, x = build(kind)
    flat = FlatLoRA(pm, FlatLoRAConfig(sigma=0.3, total_steps=2, mode=mode))
    ref = copy.deepcopy(pm)
    mods = dict(ref.named_modules())
    with torch.no_grad():
        for t in flat.targets:
            w = mods[t.name].get_base_layer().weight
            w.add_(t.to_storage(flat.noise(t.name, 1), w))
    out_of(ref, x).backward()
    with flat.step(1):
        out_of(pm, x).backward()
    assert_same_grads(pm, ref)


@pytest.mark.parametrize("kind", KINDS)
def test_bit_exact_bf16(kind):
    pm, x = build(kind)
    pm = pm.to(torch.bfloat16)
    before = frozen_bits(pm)
    flat = FlatLoRA(pm, FlatLoRAConfig(sigma=0.15, total_steps=5, schedule="constant"))
    for t in range(5):
        with flat.step(t):
            out_of(pm, x.to(torch.bfloat16)).backward()
    assert all(torch.equal(before[n], v) for n, v in frozen_bits(pm).items())


def test_multiple_adapters_only_active_ones_count():
    from tests.conftest import MLP

    pm = peft.get_peft_model(_randomise(MLP()), peft.LoraConfig(r=4, target_modules=["lin0"], init_lora_weights=False))
    pm.add_adapter("other", peft.LoraConfig(r=2, target_modules=["lin0"], init_lora_weights=False))
    _randomise_adapters(pm)
    flat = FlatLoRA(pm, FlatLoRAConfig(sigma=0.1, total_steps=2))
    (t,) = flat.targets
    from flatlora.core.norms import merged_row_sq_norms

    W = t.weight.float()
    d_default, d_other = t.lora.get_delta_weight("default"), t.lora.get_delta_weight("other")
    torch.testing.assert_close(merged_row_sq_norms(t), (W + d_default).pow(2).sum(1))
    pm.base_model.set_adapter(["default", "other"])
    torch.testing.assert_close(merged_row_sq_norms(t), (W + d_default + d_other).pow(2).sum(1), rtol=1e-5, atol=1e-6)


def test_merged_adapter_is_not_counted_twice():
    from flatlora.core.norms import merged_row_sq_norms
    from tests.conftest import make_lora_mlp

    pm = make_lora_mlp()
    flat = FlatLoRA(pm, FlatLoRAConfig(sigma=0.1, total_steps=2))
    t = flat.targets[0]
    before = merged_row_sq_norms(t)
    pm.base_model.merge_adapter()
    torch.testing.assert_close(merged_row_sq_norms(t), before, rtol=1e-5, atol=1e-5)
    pm.base_model.unmerge_adapter()


def test_adapter_weights_are_read_where_attribute_lookup_finds_them():
    """Target.terms reads the adapters' parameters without nn.Module.__getattr__ (host time), but must still find
    what `lora_A[a].weight` finds: a replaced parameter, and a plain tensor set as an attribute in its place (as
    FSDP1 does with its unsharded views)."""
    from flatlora.core.norms import merged_row_sq_norms
    from tests.conftest import make_lora_mlp

    pm = make_lora_mlp()
    flat = FlatLoRA(pm, FlatLoRAConfig(sigma=0.1, total_steps=2))
    t = flat.targets[0]
    lora_a, lora_b = t.lora.lora_A["default"], t.lora.lora_B["default"]
    g = torch.Generator().manual_seed(3)
    lora_a.weight = nn.Parameter(torch.randn(lora_a.weight.shape, generator=g))
    with torch.no_grad():
        lora_b.weight.normal_(generator=g)
    torch.testing.assert_close(merged_row_sq_norms(t), merged_rows(t.lora).pow(2).sum(1))
    plain = torch.randn(lora_a.weight.shape, generator=g)
    del lora_a.weight
    lora_a.weight = plain  # not a Parameter: nn.Module keeps it in the instance dict
    assert "weight" in lora_a.__dict__ and "weight" not in lora_a._parameters
    torch.testing.assert_close(merged_row_sq_norms(t), merged_rows(t.lora).pow(2).sum(1))


def test_adapter_weights_are_indexed_so_a_gathering_parameter_dict_gathers():
    """DeepSpeed ZeRO-3 replaces a module's _parameters by a dict whose __getitem__ all-gathers a partitioned
    parameter (inside forward, where forward mode reads the adapters); reading it with dict.get would see the
    empty partition. A stand-in with that __getitem__ (DeepSpeed is not installed here)."""
    import collections

    from flatlora.core.norms import merged_row_sq_norms
    from tests.conftest import make_lora_mlp

    class Gathering(collections.OrderedDict):
        def __getitem__(self, key):
            p = super().__getitem__(key)
            if getattr(p, "partitioned", False):
                p.data, p.partitioned = p.full, False  # what ZeRO-3's all_gather does to a partitioned param
            return p

    pm = make_lora_mlp()
    flat = FlatLoRA(pm, FlatLoRAConfig(sigma=0.1, total_steps=2, mode="forward"))
    t = flat.targets[0]
    expected = merged_rows(t.lora).pow(2).sum(1)
    for mod in (t.lora.lora_A["default"], t.lora.lora_B["default"]):
        mod._parameters = Gathering(mod._parameters)
        w = mod._parameters["weight"]
        w.full, w.data, w.partitioned = w.data, torch.empty(0), True
    torch.testing.assert_close(merged_row_sq_norms(t), expected)


def test_include_exclude_and_skipped_kinds():
    from tests.conftest import make_lora_mlp

    pm = make_lora_mlp()
    names = [t.name for t in FlatLoRA(pm, FlatLoRAConfig(sigma=0.1, include=["*lin0"])).targets]
    assert len(names) == 1 and names[0].endswith("lin0")
    names = [t.name for t in FlatLoRA(pm, FlatLoRAConfig(sigma=0.1, exclude=["*lin0"])).targets]
    assert len(names) == 1 and names[0].endswith("lin1")

    class WithEmb(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.lin = nn.Linear(8, 8)

    pe = peft.get_peft_model(WithEmb(), peft.LoraConfig(r=2, target_modules=["emb", "lin"]))
    flat = FlatLoRA(pe, FlatLoRAConfig(sigma=0.1))
    assert [t.name.split(".")[-1] for t in flat.targets] == ["lin"]
    assert any("Embedding" in why for why in flat.skipped.values())


def test_no_target_error_names_what_was_searched():
    from tests.conftest import MLP

    with pytest.raises(ValueError, match=r"found nothing to perturb.*PEFT LoRA layers.*target='linear'"):
        FlatLoRA(MLP(), FlatLoRAConfig(sigma=0.1))
    from tests.conftest import make_lora_mlp

    with pytest.raises(ValueError, match=r"include=\['nope'\]"):
        FlatLoRA(make_lora_mlp(), FlatLoRAConfig(sigma=0.1, include=["nope"]))
    with pytest.raises(ValueError, match="plain nn.Linear"):
        FlatLoRA(nn.Sequential(nn.ReLU()), FlatLoRAConfig(sigma=0.1, target="linear"))


def test_linear_target_skips_lora_internals():
    from tests.conftest import make_lora_mlp

    flat = FlatLoRA(make_lora_mlp(), FlatLoRAConfig(sigma=0.1, target="linear"))
    assert [t.name.split(".")[-1] for t in flat.targets] == ["head"]


def test_dora_forward_mode_semantics():
    """README: in forward mode DoRA computes its (detached) weight norm from the clean W, while the base
    output uses W + eps. Reference: base weight W + eps, DoRA norm forced to the clean W."""
    pm, x = build("dora")
    flat = FlatLoRA(pm, FlatLoRAConfig(sigma=0.3, total_steps=2, mode="forward"))
    ref = copy.deepcopy(pm)
    mods = dict(ref.named_modules())
    with torch.no_grad():
        for t in flat.targets:
            layer = mods[t.name]
            w = layer.get_base_layer().weight
            clean = w.detach().clone()
            dora = layer.lora_magnitude_vector["default"]
            original = dora.get_weight_norm
            dora.get_weight_norm = (lambda weight, lora_weight, scaling, adapter_name=None, _c=clean, _o=original:
                                    _o(_c.to(weight.dtype), lora_weight, scaling, adapter_name=adapter_name))
            w.add_(t.to_storage(flat.noise(t.name, 1), w))
    out_of(ref, x).backward()
    with flat.step(1):
        out_of(pm, x).backward()
    assert_same_grads(pm, ref)
