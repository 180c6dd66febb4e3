"""Flat-LoRA in an accelerate loop with gradient accumulation.

    python examples/accelerate_loop.py                            # single process, CPU
    accelerate launch --num_processes 2 examples/accelerate_loop.py

`accelerator.accumulate` decides when gradients sync; the noise window follows the same boundary:
open it on the first micro-batch of a window, close it when `accelerator.sync_gradients` is True, i.e.
after the last backward and before `optimizer.step()` (which accelerate skips on the other micro-batches).
"""

import argparse

import peft
import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from flatlora import FlatLoRA, FlatLoRAConfig


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
    step = 0
    for _ in range(epochs):
        for batch_idx, (xb, yb) in enumerate(loader):
            with accelerator.accumulate(model):
                if not flat.active:
                    flat.begin_step(step)  # first micro-batch of the window
                loss = nn.functional.mse_loss(model(xb), yb)
                accelerator.backward(loss)
                if accelerator.sync_gradients:  # last micro-batch (or the end of the loader)
                    flat.end_step()
                    step += 1
                opt.step()
                opt.zero_grad()
    accelerator.print(f"{flat}  optimizer steps {step}  last sigma_t {flat.metrics()['flatlora/sigma']:.4f}")
    return {"steps": step, "sigma_last": flat.metrics()["flatlora/sigma"]}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--grad-accum", type=int, default=4)
    ap.add_argument("--sigma", type=float, default=0.05)
    a = ap.parse_args()
    main(a.epochs, a.grad_accum, a.sigma)
