"""Flat-LoRA step cost on the CPU, MiniLM-L6 shape (random weights): LoRA vs flatlora inplace / forward.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/overhead/cpu_step.py      # writes benchmarks/results/overhead-cpu.json

BERT 6 layers, hidden 384, FFN 1536; LoRA r=8 (alpha 16) on query/key/value/dense; batch 32 x 64;
accumulation 1; sigma 0.05 constant (noise every step); median of 7 steps after one warm-up.
"""

import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import peft
import torch
import transformers
from transformers import BertConfig, BertForSequenceClassification

from flatlora import FlatLoRA, FlatLoRAConfig


def main(out=Path(__file__).resolve().parents[1] / "results" / "overhead-cpu.json", steps=7):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
    model = peft.get_peft_model(
        BertForSequenceClassification(cfg),
        peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "key", "value", "dense"], task_type="SEQ_CLS"),
    )
    ids, labels = torch.randint(0, 30000, (32, 64)), torch.randint(0, 2, (32,))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    rows = []
    for variant in ("lora", "inplace", "forward"):
        flat = None if variant == "lora" else FlatLoRA(model, FlatLoRAConfig(sigma=0.05, total_steps=100, mode=variant, schedule="constant"))
        times, record = [], 0
        for t in range(steps + 1):
            t0 = time.perf_counter()
            if flat:
                flat.begin_step(t)
                record = max(record, flat.restore_record_bytes())
            model(input_ids=ids, labels=labels).loss.backward()
            if flat:
                flat.end_step()
            opt.step()
            opt.zero_grad()
            times.append(time.perf_counter() - t0)
        if flat:
            flat.close()
        rows.append({"setting": "minilm-shape cpu 32x64 acc1", "variant": variant,
                     "median_ms": 1000 * statistics.median(times[1:]), "restore_record_bytes": record})
    base = rows[0]["median_ms"]
    for r in rows:
        r["ratio_vs_lora"] = r["median_ms"] / base
        print(f"{r['variant']:8s} {r['median_ms']:8.1f} ms  {r['ratio_vs_lora']:.3f}x  record {r['restore_record_bytes'] / 2**20:.2f} MiB")
    prov = {"device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
            "date": datetime.date.today().isoformat(), "torch": torch.__version__, "peft": peft.__version__,
            "transformers": transformers.__version__, "command": " ".join([sys.executable.split('/')[-1]] + sys.argv)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps([{**r, **prov} for r in rows], indent=1))


if __name__ == "__main__":
    main()
