"""Flat-LoRA on a PEFT model in a plain loop: the README's PEFT quickstart, runnable offline.

    python examples/quickstart_peft.py            # tiny random Llama, synthetic next-token data, CPU
"""

import argparse

import peft
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from flatlora import FlatLoRA, FlatLoRAConfig


def main(steps: int = 30, grad_accum: int = 2, sigma: float = 0.05, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg)
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    flat = FlatLoRA(model, FlatLoRAConfig(sigma=sigma, total_steps=steps, seed=seed))
    print(flat)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, cfg.vocab_size, (steps * grad_accum, 4, 32), generator=g)
    for t in range(steps):
        with flat.step(t):  # one noise draw for the whole accumulation window
            for ids in data[t * grad_accum:(t + 1) * grad_accum]:
                loss = model(input_ids=ids, labels=ids).loss / grad_accum
                loss.backward()
        opt.step()
        opt.zero_grad()
        if t % 10 == 0 or t == steps - 1:
            print(f"step {t:3d}  loss {loss.item() * grad_accum:.4f}  sigma_t {flat.sigma_at(t):.4f}")
    return {"final_loss": loss.item() * grad_accum, "sigma_last": flat.sigma_at(steps - 1)}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--sigma", type=float, default=0.05)
    args = ap.parse_args()
    main(args.steps, sigma=args.sigma)
