"""BatchNorm running statistics stay clean of the weight noise and can be recalibrated."""

import peft
import pytest
import torch
from torch import nn

from flatlora import FlatLoRA, FlatLoRAConfig


class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def make(policy, seed=0):
    g = torch.Generator().manual_seed(seed)
    net = BNNet()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    pm = peft.get_peft_model(net, peft.LoraConfig(r=2, target_modules=["conv", "fc"], init_lora_weights=False))
    flat = FlatLoRA(pm, FlatLoRAConfig(sigma=0.5, total_steps=4, schedule="constant", bn_policy=policy))
    return pm, flat


def data(n=6, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 3, 4, 4, generator=g) * 2 + 1 for _ in range(n)]


def bn_of(pm):
    return next(m for m in pm.modules() if isinstance(m, nn.BatchNorm2d))


def test_auto_policy_resolves_by_presence_of_batchnorm():
    _, flat = make("auto")
    assert flat.bn_policy == "recalibrate"
    from tests.conftest import make_lora_mlp

    assert FlatLoRA(make_lora_mlp(), FlatLoRAConfig(sigma=0.1)).bn_policy == "none"


def test_paper_policy_lets_noise_into_running_stats_and_freeze_does_not():
    xs = data()
    pm, flat = make("none")
    bn = bn_of(pm)
    clean = make("none")[0]
    for t, x in enumerate(xs[:4]):
        with flat.step(t):
            pm(x)
        clean(x)
    assert not torch.allclose(bn.running_var, bn_of(clean).running_var)

    pm, flat = make("freeze")
    bn = bn_of(pm)
    start = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    for t, x in enumerate(xs[:4]):
        with flat.step(t):
            y = pm(x)
    assert torch.equal(bn.running_mean, start[0]) and torch.equal(bn.running_var, start[1])
    assert torch.equal(bn.num_batches_tracked, start[2])
    assert bn.track_running_stats  # switched back after each window
    # normalisation inside the window still used batch statistics (train mode), as in plain training
    assert y.shape == (16, 3)


def test_recalibrate_equals_clean_pass_statistics():
    xs = data()
    pm, flat = make("recalibrate")
    for t, x in enumerate(xs[:4]):
        with flat.step(t):
            pm(x).sum().backward()
    assert flat.bn_stale
    pm.train()
    used = flat.recalibrate_batchnorm(xs)
    assert used == len(xs) and not flat.bn_stale
    assert pm.training  # modes restored
    bn = bn_of(pm)
    with torch.no_grad():
        feats = [pm.base_model.model.conv(x) for x in xs]
    # Cumulative average over batches of per-batch mean and unbiased variance (what BatchNorm accumulates).
    mean = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
    var = torch.stack([f.transpose(0, 1).reshape(8, -1).var(1, unbiased=True) for f in feats]).mean(0)
    torch.testing.assert_close(bn.running_mean, mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.running_var, var, rtol=1e-5, atol=1e-5)


def test_recalibrate_refuses_inside_window_and_empty_input():
    pm, flat = make("recalibrate")
    bn = bn_of(pm)
    before = bn.running_var.clone()
    with pytest.raises(ValueError, match="no batches"):
        flat.recalibrate_batchnorm([])
    assert torch.equal(bn.running_var, before)  # bad input loses nothing
    with flat.step(1):
        with pytest.raises(RuntimeError, match="inside a window"):
            flat.recalibrate_batchnorm(data(1))
