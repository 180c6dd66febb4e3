"""Every method trains two steps on a tiny model; frozen weights end bit-identical; SAM is SAM."""

import json

import pytest
import torch

from flatlora.experiments.methods import list_methods, paired_baseline
from flatlora.experiments.runner import run_one
from flatlora.experiments.spec import load_spec

from .conftest import tiny_text_overrides


@pytest.mark.parametrize("method", list_methods())
def test_each_method_runs(method, byo_csv, tmp_path):
    spec = load_spec(None, tiny_text_overrides(byo_csv, tmp_path, method=method))
    rec = run_one(spec, tmp_path / method, progress=False)
    assert rec["steps"] == 2 and 0 <= rec["metrics"]["test/accuracy"] <= 1
    assert rec["trainable_params"] > 0
    if method.startswith("flat-"):
        assert rec["flatlora_mode"] == "inplace"
        curve = (tmp_path / method / "curve.csv").read_text().splitlines()
        assert float(curve[-1].split(",")[4]) > 0  # the last step had noise on
    if method in ("full", "flat-full"):
        assert rec["trainable_params"] == 54_434  # every weight of tiny-bert, not an adapter


def test_paired_baselines():
    assert paired_baseline("flat-dora") == "dora" and paired_baseline("sam-w") == "lora"
    assert paired_baseline("lora") is None


def _lora_mlp():
    import peft
    from torch import nn

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    return peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False))


def test_merged_weight_sam_uses_the_gradient_at_the_perturbed_merged_weight():
    from flatlora.baselines.sam import MergedWeightSAM

    model = _lora_mlp()
    x, y = torch.randn(5, 6, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 0, 1])
    loss = lambda: torch.nn.functional.cross_entropy(model(x), y)  # noqa: E731
    trainable = [p for p in model.parameters() if p.requires_grad]
    bases = [m.get_base_layer().weight for m in model.modules() if hasattr(m, "lora_A")]
    clean = [w.detach().clone() for w in bases]
    # Expected: g_W at the point, eps = rho g / ||g||, then grads of A, B at W + eps.
    for w in bases:
        w.requires_grad_(True)
    gw = torch.autograd.grad(loss(), bases)
    for w in bases:
        w.requires_grad_(False)
    norm = torch.sqrt(sum((g ** 2).sum() for g in gw))
    with torch.no_grad():
        for w, g in zip(bases, gw):
            w.add_(0.05 * g / norm)
    expected = torch.autograd.grad(loss(), trainable)
    with torch.no_grad():
        for w, c in zip(bases, clean):
            w.copy_(c)

    sam = MergedWeightSAM(model, rho=0.05)
    sam.step(lambda: loss().backward(), zero=trainable)
    for p, e in zip(trainable, expected):
        torch.testing.assert_close(p.grad, e)
    for w, c in zip(bases, clean):
        assert torch.equal(w, c) and not w.requires_grad and w.grad is None


def test_lora_sam_perturbs_only_the_adapter_and_restores_it_exactly():
    from flatlora.baselines.sam import LoRASAM

    model = _lora_mlp()
    x, y = torch.randn(5, 6), torch.tensor([0, 1, 2, 0, 1])
    trainable = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    g0 = torch.autograd.grad(torch.nn.functional.cross_entropy(model(x), y), trainable)
    sam = LoRASAM(trainable, rho=0.01)
    sam.step(lambda: torch.nn.functional.cross_entropy(model(x), y).backward(), zero=trainable)
    assert all(torch.equal(p, b) for p, b in zip(trainable, before))
    assert any(not torch.allclose(p.grad, g) for p, g in zip(trainable, g0))  # the gradient moved with the point
    with pytest.raises(ValueError, match="rho > 0"):
        LoRASAM(trainable, rho=0)


@pytest.mark.parametrize("method", ["lora", "flat-lora"])
def test_batchnorm_statistics_are_recomputed_for_every_method(method, image_folder, tmp_path):
    spec = load_spec(None, ["task=image-folder", f"task_args.path={image_folder}", "task_args.resolution=32",
                            "model=tiny-effnet", "train.batch_size=8", "train.max_steps=1", f"method={method}",
                            "flat.sigma=0.15"])
    rec = run_one(spec, tmp_path / method, progress=False)
    assert rec["bn_recalibrated_batches"] == 2  # 16 training images / 8: the same clean batches for both methods


def _conv_net():
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 4, 1),
                         nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


@pytest.mark.parametrize("name", ["pissa", "flat-pissa", "lora-ga"])
def test_linear_only_initialisations_refuse_conv_targets_in_one_line(name):
    from flatlora.experiments.methods import get_method, lora_config, prepare_model

    m = get_method(name)
    cfg = lora_config(m, r=2, alpha=4, dropout=0.0, targets=["0", "2", "4"], modules_to_save=None)
    with pytest.raises(ValueError) as e:
        prepare_model(m, _conv_net(), lora_cfg=cfg, grad_step=lambda model: None)
    base = m.adapter
    assert str(e.value) == (f"method {name!r}: {'PiSSA' if base == 'pissa' else 'LoRA-GA'}'s "
                            f"{'SVD' if base == 'pissa' else 'gradient-SVD'} initialisation exists in PEFT for Linear "
                            "layers only, but lora.targets selects 2 Conv2d layers (0, 2): set lora.targets to Linear "
                            f"layers only, or leave {base}/flat-{base} out of methods")


def test_pissa_on_the_linear_layers_of_a_conv_net_is_pissa():
    from flatlora.experiments.methods import get_method, lora_config, prepare_model

    model = _conv_net()
    w = model[4].weight.detach().clone()
    m = get_method("pissa")
    peft_model = prepare_model(m, model, lora_cfg=lora_config(m, r=2, alpha=4, dropout=0.0, targets=["4"], modules_to_save=None))
    layer = peft_model.base_model.model[4]
    s = layer.scaling["default"]
    residual = layer.base_layer.weight + s * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    torch.testing.assert_close(residual, w, rtol=0, atol=1e-6)  # W = residual + sBA, BA = top-2 singular part
    top = torch.linalg.svdvals(w)[:2]
    torch.testing.assert_close(torch.linalg.svdvals(s * layer.lora_B["default"].weight @ layer.lora_A["default"].weight)[:2], top)
    for name in ("lora", "dora", "rslora"):  # no restriction for the others
        mm = get_method(name)
        prepare_model(mm, _conv_net(), lora_cfg=lora_config(mm, r=2, alpha=4, dropout=0.0, targets=["0", "2"], modules_to_save=None))


def test_compare_refuses_pissa_on_conv_targets_before_any_run(image_folder, tmp_path):
    from flatlora.experiments.compare import compare

    spec = load_spec(None, ["task=image-folder", f"task_args.path={image_folder}", "task_args.resolution=32",
                            "model=tiny-effnet", "train.batch_size=8", "train.max_steps=1", "methods=[lora,pissa,flat-pissa]",
                            "seeds=[0]", f"out_dir={tmp_path / 'cmp'}"])
    with pytest.raises(ValueError, match=r"^method 'pissa': PiSSA's SVD initialisation exists in PEFT for Linear layers "
                                         r"only, but lora.targets selects 32 Conv2d layers \(_blocks.0._project_conv, "):
        compare(spec, progress=False, log=lambda s: None)
    assert not (tmp_path / "cmp" / "runs").exists()


def test_dora_refuses_a_zero_norm_filter_that_would_make_the_first_forward_nan():
    import peft

    from flatlora.experiments.methods import get_method, lora_config, prepare_model

    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))

    def dead_filter_net():
        net = _conv_net()
        with torch.no_grad():
            net[2].weight[1].zero_()  # a pruned / dead output filter of a 1x1 conv
        return net

    m = get_method("dora")
    cfg = lora_config(m, r=2, alpha=4, dropout=0.0, targets=["0", "2"], modules_to_save=None)
    # what PEFT alone does with it: nan before any update
    assert torch.isnan(peft.get_peft_model(dead_filter_net(), cfg)(x)).any()
    with pytest.raises(ValueError) as e:
        prepare_model(m, dead_filter_net(), lora_cfg=cfg)
    assert str(e.value) == ("method 'dora': DoRA divides each output filter by its norm ||W_i||, and 1 filter(s) of 1 "
                            "targeted layer(s) have norm 0 or non-finite (first 2: 1 of 4), which makes the first forward "
                            "nan: leave those layers out of lora.targets, or use lora instead of dora")
    # without the dead layer, and on the depthwise (grouped) conv too, DoRA starts exactly at the base model
    for targets in (["0"], ["0", "1"]):
        net = dead_filter_net()
        want = net(x)
        cfg = lora_config(m, r=8, alpha=4, dropout=0.0, targets=targets, modules_to_save=None)
        torch.testing.assert_close(prepare_model(m, net, lora_cfg=cfg)(x), want)


def test_compare_refuses_dora_on_a_zero_norm_filter_before_any_run(image_folder, tmp_path, monkeypatch):
    """A targeted conv with a zero filter (EfficientNet-Lite0's 38 filters of norm ~2e-9 became zeros in an fp16
    transfer): DoRA must stop the comparison before the first run, not fail in every run (as it did on the H200,
    2026-12-02)."""
    from flatlora.experiments import compare as cmp

    real = cmp.create_task

    def with_a_dead_filter(*a, **k):
        task = real(*a, **k)
        build = task.build_model

        def build_model():
            model = build()
            conv = next(m for n, m in model.named_modules() if n.endswith("_blocks.1._expand_conv"))
            with torch.no_grad():
                conv.weight[1].zero_()  # a pruned output filter, as in the pretrained weights
            return model

        task.build_model = build_model
        return task

    monkeypatch.setattr(cmp, "create_task", with_a_dead_filter)
    spec = load_spec(None, ["task=image-folder", f"task_args.path={image_folder}", "task_args.resolution=32",
                            "model=tiny-effnet", "train.batch_size=8", "train.max_steps=1", "methods=[dora,flat-dora]",
                            "seeds=[0]", f"out_dir={tmp_path / 'cmp'}"])
    with pytest.raises(ValueError, match=r"^method 'dora': DoRA divides each output filter by its norm \|\|W_i\|\|, and 1 "
                                         r"filter\(s\) of 1 targeted layer\(s\) have norm 0 or non-finite \(first "
                                         r".*_blocks.1._expand_conv: 1 of "):
        cmp.compare(spec, progress=False, log=lambda s: None)
    assert not (tmp_path / "cmp" / "runs").exists()


def test_dora_norms_of_gpt2_conv1d_are_taken_over_its_output_columns():
    """GPT-2's Conv1D stores its weight as (in, out): an output filter is a column. A dead output column is
    refused; a dead input row (every filter keeps a nonzero norm) is not."""
    from transformers.pytorch_utils import Conv1D

    from flatlora.experiments.methods import check_targets, get_method

    def net(kill):
        m = torch.nn.Sequential(Conv1D(4, 3))  # nf = 4 outputs, nx = 3 inputs: weight (3, 4)
        with torch.no_grad():
            kill(m[0].weight)
        return m

    dora = get_method("dora")
    with pytest.raises(ValueError, match=r"1 filter\(s\) of 1 targeted layer\(s\) have norm 0 or non-finite \(first 0: 1 of 4\)"):
        check_targets(dora, net(lambda w: w[:, 1].zero_()), ["0"])
    check_targets(dora, net(lambda w: w[0].zero_()), ["0"])
