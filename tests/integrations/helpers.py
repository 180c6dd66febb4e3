"""Tiny models, data and a reference plain loop shared by the integration tests."""

import torch
from torch import nn

D_IN, D_H, D_OUT = 16, 32, 8


class RegMLP(nn.Module):
    """lin0 -> relu -> lin1 -> relu -> head, MSE loss when `y` is given (a dict like HF models return)."""

    def __init__(self, bn: bool = False):
        super().__init__()
        self.lin0 = nn.Linear(D_IN, D_H)
        self.norm = nn.BatchNorm1d(D_H) if bn else nn.Identity()
        self.lin1 = nn.Linear(D_H, D_H)
        self.head = nn.Linear(D_H, D_OUT)

    def forward(self, x=None, y=None, **kwargs):
        out = self.head(torch.relu(self.lin1(torch.relu(self.norm(self.lin0(x))))))
        loss = None if y is None else nn.functional.mse_loss(out, y)
        return {"loss": loss, "logits": out}


def make_model(seed: int = 0, bn: bool = False, peft_wrap: bool = True):
    """Deterministic LoRA model (nonzero B, so W + sBA differs from W); torch's global RNG untouched."""
    import peft

    g = torch.Generator().manual_seed(seed)
    model = RegMLP(bn=bn)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" not in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    if not peft_wrap:
        return model
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lin0", "lin1"], init_lora_weights=False)
    pm = peft.get_peft_model(model, cfg)
    with torch.no_grad():
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return pm


def make_data(n: int, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D_IN, generator=g)
    y = torch.randn(n, D_OUT, generator=g)
    return [{"x": x[i], "y": y[i]} for i in range(n)]


def collate(rows: list[dict]) -> dict:
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def make_optimizer(model, lr: float = 1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    return opt, sched


def plain_loop(model, data, batch: int, grad_accum: int, steps: int, flat=None, lr: float = 1e-2):
    """The reference: `with flat.step(t):` around each accumulation window, sequential batches."""
    opt, sched = make_optimizer(model, lr)
    model.train()
    mbs = [collate(data[i:i + batch]) for i in range(0, len(data), batch)]
    for t in range(steps):
        window = mbs[t * grad_accum:(t + 1) * grad_accum]
        ctx = flat.step(t) if flat is not None else _null()
        with ctx:
            for mb in window:
                loss = model(**mb)["loss"] / grad_accum
                loss.backward()
        opt.step()
        sched.step()
        model.zero_grad()
    return model


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def adapters(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def bits(model) -> dict:
    """Bit patterns of every frozen float parameter and float buffer."""
    out = {n: p.detach().clone().view(torch.int32) for n, p in model.named_parameters()
           if not p.requires_grad and p.dtype == torch.float32}
    out.update({n: b.detach().clone().view(torch.int32) for n, b in model.named_buffers() if b.dtype == torch.float32})
    return out


def assert_same_bits(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        ai = a[k].view(torch.int32) if a[k].dtype == torch.float32 else a[k]
        bi = b[k].view(torch.int32) if b[k].dtype == torch.float32 else b[k]
        assert torch.equal(ai, bi), f"{k} differs"


def hook_count(model) -> int:
    """Forward-pre and state-dict-pre hooks on every module, plus instance-level method wrappers."""
    wrapped = {"save_pretrained", "generate", "merge", "unmerge"}
    return sum(len(m._forward_pre_hooks) + len(m._state_dict_pre_hooks) + len(vars(m).keys() & wrapped)
               for m in model.modules())
