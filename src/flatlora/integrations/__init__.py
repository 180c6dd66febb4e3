"""Flat-LoRA in the training loops people already run.

    from flatlora.integrations.hf import FlatLoRACallback          # HF Trainer, TRL SFTTrainer  [hf] extra
    from flatlora.integrations.lightning import FlatLoRACallback   # PyTorch Lightning           [lightning] extra

Each submodule imports its framework when it is imported; this package itself imports nothing.
Plain, accelerate and torchrun loops need no integration: `with flat.step(t): <micro-batches>` (see
examples/plain_loop.py and examples/torchrun_ddp.py).
"""
