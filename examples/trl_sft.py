"""Flat-LoRA with TRL's SFTTrainer: the same callback; SFTTrainer builds the PeftModel from `peft_config`.

    python examples/trl_sft.py                    # tiny random Llama + word-level tokenizer, offline, CPU

Swap in a real model id, tokenizer and dataset for actual fine-tuning; nothing flatlora-specific changes.
"""

import argparse
import tempfile

import torch
from datasets import Dataset
from peft import LoraConfig
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import SFTConfig, SFTTrainer

from flatlora.integrations.hf import FlatLoRACallback

WORDS = "the a cat dog sat ran on under mat log red blue big small and then".split()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def main(steps: int = 6, sigma: float = 0.05, seed: int = 0, output_dir: str | None = None) -> dict:
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id))
    g = torch.Generator().manual_seed(seed)
    texts = [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (12,), generator=g)) for _ in range(64)]
    args = SFTConfig(
        output_dir=output_dir or tempfile.mkdtemp(prefix="flatlora-trl-"), max_steps=steps, max_length=32,
        per_device_train_batch_size=4, gradient_accumulation_steps=2, learning_rate=1e-3, logging_steps=1,
        save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=seed,
    )
    callback = FlatLoRACallback(sigma=sigma, seed=seed)
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_dict({"text": texts}), processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), callbacks=[callback],
    )
    trainer.train()
    sigmas = [h["flatlora/sigma"] for h in trainer.state.log_history if "flatlora/sigma" in h]
    print(f"{callback.flat}\nlogged sigma_t: {[round(s, 4) for s in sigmas]}")
    return {"sigmas": sigmas, "targets": len(callback.flat.targets)}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--sigma", type=float, default=0.05)
    a = ap.parse_args()
    main(a.steps, a.sigma)
