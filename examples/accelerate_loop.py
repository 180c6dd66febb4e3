"""Flat-LoRA in an accelerate loop with gradient accumulation.

    python examples/accelerate_loop.py                            # single process, CPU
    accelerate launch --num_processes 2 examples/accelerate_loop.py

One line changes: `with accumulate(accelerator, flat, model):` in place of `with accelerator.accumulate(model):`.
The noise window follows accelerate's own boundary: it opens on the first micro-batch of an update step and
closes in `accelerator.backward` when `accelerator.sync_gradients` is True, i.e. after the last backward and
before `optimizer.step()` (which accelerate skips on the other micro-batches).
"""

import argparse

import peft
import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from flatlora import FlatLoRA, FlatLoRAConfig
from flatlora.integrations.accelerate import accumulate


def main(epochs: int = 2, grad_accum: int = 4, sigma: float = 0.05, seed: int = 0) -> dict:
    accelerator = Accelerator(gradient_accumulation_steps=grad_accum, cpu=not torch.cuda.is_available())
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"]))
    x = torch.randn(256, 16)
    loader = DataLoader(TensorDataset(x, x.sum(-1, keepdim=True).sin()), batch_size=8, shuffle=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    steps_per_epoch = -(-len(loader) // grad_accum)
    flat = FlatLoRA(accelerator.unwrap_model(model),
                    FlatLoRAConfig(sigma=sigma, total_steps=epochs * steps_per_epoch, seed=seed))
    for _ in range(epochs):
        for xb, yb in loader:
            with accumulate(accelerator, flat, model):  # was: with accelerator.accumulate(model):
                loss = nn.functional.mse_loss(model(xb), yb)
                accelerator.backward(loss)  # closes the window on the last micro-batch of the update step
                opt.step()
                opt.zero_grad()
    steps = flat.last_step + 1
    accelerator.print(f"{flat}  optimizer steps {steps}  last sigma_t {flat.metrics()['flatlora/sigma']:.4f}")
    return {"steps": steps, "sigma_last": flat.metrics()["flatlora/sigma"]}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--grad-accum", type=int, default=4)
    ap.add_argument("--sigma", type=float, default=0.05)
    a = ap.parse_args()
    main(a.epochs, a.grad_accum, a.sigma)
