"""Flat-LoRA in a hand-written loop: `with flat.step(t):` around each accumulation window.

    python examples/plain_loop.py                 # tiny PEFT MLP on random regression data, CPU, seconds

The window opens before the first micro-batch's forward and closes (exact restore) before optimizer.step(),
on exceptions too; evaluate and save between windows, never inside one.
"""

import argparse

import peft
import torch
from torch import nn

from flatlora import FlatLoRA, FlatLoRAConfig


def main(steps: int = 20, grad_accum: int = 4, sigma: float = 0.05, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"]))
    flat = FlatLoRA(model, FlatLoRAConfig(sigma=sigma, total_steps=steps, seed=seed))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(steps * grad_accum, 8, 16)
    y = x.sum(-1, keepdim=True).sin()
    for t in range(steps):
        with flat.step(t) as sigma_t:  # one noise draw for all grad_accum micro-batches
            for i in range(t * grad_accum, (t + 1) * grad_accum):
                loss = nn.functional.mse_loss(model(x[i]), y[i]) / grad_accum
                loss.backward()
        opt.step()  # the base weights are clean again here, bit for bit
        opt.zero_grad()
        if t % 5 == 0 or t == steps - 1:
            print(f"step {t:3d}  loss {loss.item() * grad_accum:.4f}  sigma_t {sigma_t:.4f}  {flat.metrics()}")
    return {"sigma_last": flat.metrics()["flatlora/sigma"], "loss": loss.item() * grad_accum}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--grad-accum", type=int, default=4)
    ap.add_argument("--sigma", type=float, default=0.05)
    a = ap.parse_args()
    main(a.steps, a.grad_accum, a.sigma)
