"""Flat-LoRA settings on the command line, next to the Trainer's own: HfArgumentParser reads both.

    python examples/hf_trainer_cli.py --output_dir /tmp/flat --max_steps 8 --seed 3 \\
        --per_device_train_batch_size 4 --gradient_accumulation_steps 2 --use_cpu \\
        --flatlora_sigma 0.05 --flatlora_include '*q_proj' '*v_proj'
    python examples/hf_trainer_cli.py --help          # every --flatlora_* option with its help and default
    python examples/hf_trainer_cli.py args.json       # or all settings from a JSON (or .yaml) file

The noise seed is --seed unless --flatlora_seed is given. The adapter saved at the end (and every checkpoint)
holds flatlora_config.json and a Flat-LoRA line in its README.md. A tiny random Llama on synthetic tokens
stands in for your model and data.
"""

import sys
from dataclasses import dataclass, field

import peft
import torch
from transformers import HfArgumentParser, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from flatlora.integrations.hf import FlatLoRAArguments, FlatLoRACallback


@dataclass
class ModelArguments:
    lora_r: int = field(default=4, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=8, metadata={"help": "LoRA alpha"})
    examples: int = field(default=64, metadata={"help": "synthetic training sequences"})


def tiny_llama(vocab: int = 128) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg)


def parse(argv: list[str]) -> tuple[ModelArguments, TrainingArguments, FlatLoRAArguments]:
    parser = HfArgumentParser((ModelArguments, TrainingArguments, FlatLoRAArguments))
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(argv[0])
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        return parser.parse_yaml_file(argv[0])
    return parser.parse_args_into_dataclasses(argv)


def main(argv: list[str] | None = None) -> dict:
    model_args, training_args, flat_args = parse(sys.argv[1:] if argv is None else argv)
    torch.manual_seed(training_args.seed)
    lora = peft.LoraConfig(r=model_args.lora_r, lora_alpha=model_args.lora_alpha, target_modules="all-linear")
    model = peft.get_peft_model(tiny_llama(), lora)
    g = torch.Generator().manual_seed(training_args.seed)
    ids = torch.randint(0, 128, (model_args.examples, 16), generator=g)
    data = [{"input_ids": row, "labels": row} for row in ids]
    callback = FlatLoRACallback.from_args(training_args, flat_args)
    trainer = Trainer(model=model, args=training_args, train_dataset=data, callbacks=[callback])
    trainer.train()
    trainer.save_model()  # output_dir: adapter + flatlora_config.json + model card
    logs = [h for h in trainer.state.log_history if "flatlora/sigma" in h]
    for h in logs:
        print(f"step {h['step']:3d}  loss {h['loss']:.4f}  flatlora/sigma {h['flatlora/sigma']:.4f}")
    print(f"{callback.flat}\nadapter and Flat-LoRA settings in {training_args.output_dir}")
    return {"config": callback.flat.config, "logged": logs, "output_dir": training_args.output_dir}


if __name__ == "__main__":
    main()
