"""Flat-LoRA in a Hugging Face Trainer run: one callback, nothing else changes.

    python examples/hf_trainer.py                 # tiny random Llama, synthetic tokens, CPU, ~10 s
    python examples/hf_trainer.py --steps 200 --sigma 0.05 --grad-accum 4

flatlora/sigma (the ramped noise scale) appears in the Trainer's logs next to the loss, so every
`report_to` integration records it; the logged loss is the loss under noise.
"""

import argparse
import tempfile

import peft
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from flatlora.integrations.hf import FlatLoRACallback


def tiny_llama(vocab: int = 128) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg)


def main(steps: int = 8, grad_accum: int = 2, sigma: float = 0.05, seed: int = 0, output_dir: str | None = None) -> dict:
    torch.manual_seed(seed)
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (steps * grad_accum * 4, 16), generator=g)
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(
        output_dir=output_dir or tempfile.mkdtemp(prefix="flatlora-hf-"), max_steps=steps,
        per_device_train_batch_size=4, gradient_accumulation_steps=grad_accum, learning_rate=1e-3,
        logging_steps=max(1, steps // 4), eval_strategy="steps", eval_steps=max(1, steps // 2),
        save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=seed,
    )
    callback = FlatLoRACallback(sigma=sigma)  # total_steps from the Trainer (max_steps), noise seed from args.seed
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data[:8], callbacks=[callback])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "flatlora/sigma" in h]
    for h in logs:
        print(f"step {h['step']:3d}  loss {h['loss']:.4f}  flatlora/sigma {h['flatlora/sigma']:.4f}")
    return {"sigma_last": callback.flat.sigma_at(steps - 1), "logged": logs, "eval_loss": trainer.evaluate()["eval_loss"]}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--sigma", type=float, default=0.05)
    ap.add_argument("--output-dir", default=None)
    a = ap.parse_args()
    main(a.steps, a.grad_accum, a.sigma, output_dir=a.output_dir)
