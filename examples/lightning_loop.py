"""Flat-LoRA in PyTorch Lightning: one callback; accumulation, validation and exceptions are handled.

    python examples/lightning_loop.py             # tiny PEFT MLP, CPU, seconds

flatlora/sigma is logged with pl_module.log, so every Lightning logger (CSV, TensorBoard, W&B, ...) records it.
"""

import argparse

import peft
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from flatlora.integrations.lightning import FlatLoRACallback

try:
    import lightning.pytorch as pl  # pip install 'flatlora[lightning]'
except ImportError:  # only the older pytorch_lightning package: flatlora uses it too
    import pytorch_lightning as pl


class LitRegressor(pl.LightningModule):
    def __init__(self):
        super().__init__()
        base = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))
        self.model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"]))

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y))

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def main(max_steps: int = 12, grad_accum: int = 2, sigma: float = 0.05, seed: int = 0) -> dict:
    pl.seed_everything(seed, verbose=False)
    x = torch.randn(256, 16)
    y = x.sum(-1, keepdim=True).sin()
    train = DataLoader(TensorDataset(x[:192], y[:192]), batch_size=8, shuffle=True)
    val = DataLoader(TensorDataset(x[192:], y[192:]), batch_size=32)
    callback = FlatLoRACallback(sigma=sigma, seed=seed)  # total_steps from trainer.estimated_stepping_batches
    trainer = pl.Trainer(max_steps=max_steps, accumulate_grad_batches=grad_accum, callbacks=[callback],
                         val_check_interval=5, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(LitRegressor(), train, val)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    print(callback.flat, metrics)
    return metrics


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-steps", type=int, default=12)
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--sigma", type=float, default=0.05)
    a = ap.parse_args()
    main(a.max_steps, a.grad_accum, a.sigma)
