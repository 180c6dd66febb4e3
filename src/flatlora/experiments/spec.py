"""ExperimentSpec: one YAML file (plus `key=value` overrides) describing a run or a comparison grid.

A spec is validated as a whole before anything is built: unknown keys, methods, tasks and bad values
fail with a message that names the key and the accepted values, so a typo never costs a training run.

    task: rt-sentiment          # `flatlora tasks` lists them
    methods: [lora, flat-lora]  # compare: methods x ranks x seeds; run: `method` and `seed`
    lora: {r: 8, alpha: 16}
    train: {epochs: 1, lr: 5.0e-4}
    flat: {sigma: 0.05}         # any FlatLoRAConfig field except total_steps/seed (the runner sets them)
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ..config import FlatLoRAConfig


@dataclass
class LoraSection:
    r: int = field(default=8, metadata={"help": "LoRA rank"})
    alpha: float = field(default=16, metadata={"help": "LoRA alpha (scale s = alpha / r, or alpha / sqrt(r) for rslora)"})
    dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    targets: Any = field(default=None, metadata={"help": "module names or 'all-linear'; None = the task's default"})
    modules_to_save: Any = field(default=None, metadata={"help": "fully trained modules (heads); None = the task's default"})
    loraplus_ratio: float = field(default=16.0, metadata={"help": "LoRA+: lr of B over lr of A"})


@dataclass
class TrainSection:
    epochs: float = field(default=1, metadata={"help": "passes over the training split (fractions allowed)"})
    max_steps: int | None = field(default=None, metadata={"help": "cap on optimizer steps (overrides epochs when smaller)"})
    batch_size: int = field(default=32, metadata={"help": "micro-batch size"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr: float = field(default=5e-4, metadata={"help": "learning rate of adapter methods"})
    full_lr: float = field(default=1e-4, metadata={"help": "learning rate of (flat) full fine-tuning"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay"})
    warmup_ratio: float = field(default=0.03, metadata={"help": "linear warm-up share of the steps"})
    scheduler: str = field(default="cosine", metadata={"help": "cosine | constant | linear"})
    eval_batch_size: int = field(default=128, metadata={"help": "batch size for evaluation"})
    max_grad_norm: float | None = field(default=None, metadata={"help": "gradient clipping (None = off)"})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads (None = torch's default)"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    dtype: str = field(default="float32", metadata={"help": "backbone dtype: float32 | bfloat16 | float16"})


@dataclass
class ExperimentSpec:
    task: str = field(default="rt-sentiment", metadata={"help": "task name (`flatlora tasks`)"})
    task_args: dict = field(default_factory=dict, metadata={"help": "task options, e.g. path/text_column for byo-text"})
    model: str | None = field(default=None, metadata={"help": "model: registry name, local folder or hub id; None = task default"})
    method: str = field(default="flat-lora", metadata={"help": "method of `flatlora run`"})
    seed: int = field(default=0, metadata={"help": "seed of `flatlora run`: init, data order and noise"})
    methods: list = field(default_factory=lambda: ["lora", "flat-lora"], metadata={"help": "methods of `flatlora compare`"})
    seeds: list = field(default_factory=lambda: [0, 1, 2], metadata={"help": "seeds of `flatlora compare` (paired across methods)"})
    ranks: list | None = field(default=None, metadata={"help": "ranks of `flatlora compare` (None = [lora.r])"})
    baseline: str | None = field(default=None, metadata={"help": "method every other is paired against (None = each flat-X against X)"})
    lora: LoraSection = field(default_factory=LoraSection)
    train: TrainSection = field(default_factory=TrainSection)
    flat: dict = field(default_factory=lambda: {"sigma": 0.05}, metadata={"help": "FlatLoRAConfig fields"})
    sam_rho_ab: float = field(default=0.003, metadata={"help": "LoRA-SAM radius on (A, B) (paper v2 Table 6 best: 0.003)"})
    sam_rho_w: float = field(default=0.05, metadata={"help": "SAM radius on the merged W (paper v2 Table 6 best: 0.05)"})
    out_dir: str = field(default="runs/default", metadata={"help": "results folder (one sub-folder per run)"})
    plot: bool = field(default=True, metadata={"help": "compare: save plot.png (needs matplotlib)"})
    description: str = field(default="", metadata={"help": "free text recorded with the results"})

    # ------------------------------------------------------------------ validation
    def __post_init__(self):
        self.validate()

    def validate(self) -> "ExperimentSpec":
        from .methods import get_method
        from .tasks import get_task_entry

        get_task_entry(self.task)
        for m in [self.method, *self.methods] + ([self.baseline] if self.baseline else []):
            get_method(m)
        if self.baseline and self.baseline not in self.methods:
            raise ValueError(f"baseline {self.baseline!r} is not among methods {self.methods}: add it or drop baseline")
        _check_int_list("seeds", self.seeds)
        _check_int_list("ranks", self.ranks, allow_none=True)
        if not self.seeds:
            raise ValueError("seeds is empty: give at least one seed, e.g. seeds=[0,1,2]")
        if not self.methods:
            raise ValueError("methods is empty: give at least one method, e.g. methods=[lora,flat-lora]")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods lists a method twice: {self.methods}")
        l, t = self.lora, self.train
        _positive_int("lora.r", l.r)
        _positive_int("train.batch_size", t.batch_size)
        _positive_int("train.grad_accum", t.grad_accum)
        _positive_int("train.eval_batch_size", t.eval_batch_size)
        if t.max_steps is not None:
            _positive_int("train.max_steps", t.max_steps)
        for name, v in [("train.lr", t.lr), ("train.full_lr", t.full_lr), ("train.epochs", t.epochs),
                        ("sam_rho_ab", self.sam_rho_ab), ("sam_rho_w", self.sam_rho_w)]:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                raise ValueError(f"{name} must be a positive number, got {v!r}")
        if not 0 <= t.warmup_ratio < 1:
            raise ValueError(f"train.warmup_ratio must be in [0, 1), got {t.warmup_ratio}")
        if t.scheduler not in ("cosine", "constant", "linear"):
            raise ValueError(f"train.scheduler must be one of ['cosine', 'constant', 'linear'], got {t.scheduler!r}")
        if t.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"train.dtype must be float32, bfloat16 or float16, got {t.dtype!r}")
        if not isinstance(self.task_args, dict):
            raise ValueError(f"task_args must be a mapping, got {self.task_args!r}")
        if not isinstance(self.flat, dict):
            raise ValueError(f"flat must be a mapping of FlatLoRAConfig fields, got {self.flat!r}")
        taken = {"total_steps", "seed"} & set(self.flat)
        if taken:
            raise ValueError(f"flat.{sorted(taken)[0]} is set by the runner (steps of the run, run seed): remove it")
        self.flat_config(total_steps=1, seed=0)  # FlatLoRAConfig validates the fields
        return self

    def flat_config(self, total_steps: int, seed: int, **overrides: Any) -> FlatLoRAConfig:
        return FlatLoRAConfig.from_dict({**self.flat, **overrides, "total_steps": total_steps, "seed": seed})

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ExperimentSpec":
        if not isinstance(d, dict):
            raise ValueError(f"a spec must be a mapping of keys to values, got {type(d).__name__}")
        d = copy.deepcopy(d)
        _reject_unknown("", d, cls)
        kwargs = dict(d)
        if "lora" in d:
            _reject_unknown("lora.", _mapping("lora", d["lora"]), LoraSection)
            kwargs["lora"] = LoraSection(**d["lora"])
        if "train" in d:
            _reject_unknown("train.", _mapping("train", d["train"]), TrainSection)
            kwargs["train"] = TrainSection(**d["train"])
        return cls(**kwargs)

    def replace(self, **changes: Any) -> "ExperimentSpec":
        return ExperimentSpec.from_dict({**self.to_dict(), **changes})


def load_spec(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentSpec:
    """Read a YAML spec (safe loader) and apply `key=value` overrides (dotted keys, YAML values).

    Example:
        >>> load_spec(None, ["task=byo-text", "task_args.path=x.csv", "train.lr=1e-3"]).train.lr
        0.001
    """
    d: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"config file {str(p)!r} does not exist")
        with open(p, encoding="utf-8") as f:
            d = yaml.safe_load(f) or {}
        if not isinstance(d, dict):
            raise ValueError(f"{p} must hold a mapping of keys to values at the top level")
    for item in overrides or []:
        apply_override(d, item)
    return ExperimentSpec.from_dict(d)


def apply_override(d: dict[str, Any], item: str) -> None:
    """`a.b=value` sets d['a']['b'] to yaml.safe_load(value) ('1e-3' reads as a number, '[a,b]' as a list)."""
    if "=" not in item:
        raise ValueError(f"override {item!r} is not key=value (e.g. train.lr=1e-3 or methods=[lora,flat-lora])")
    key, raw = item.split("=", 1)
    value = _parse_value(raw)
    parts = key.strip().split(".")
    cur = d
    for p in parts[:-1]:
        nxt = cur.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ValueError(f"override {item!r}: {p!r} is not a section")
        cur = nxt
    cur[parts[-1]] = value


def _parse_value(raw: str) -> Any:
    try:
        v = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    # YAML 1.1 reads 5e-4 as a string (it wants 5.0e-4): accept the common spelling.
    if isinstance(v, str):
        try:
            return float(v) if any(c in v.lower() for c in ".e") else v
        except ValueError:
            return v
    return v


def _mapping(name: str, v: Any) -> dict:
    if not isinstance(v, dict):
        raise ValueError(f"{name} must be a mapping (e.g. {name}: {{...}}), got {v!r}")
    return v


def _reject_unknown(prefix: str, d: dict, cls) -> None:
    names = [f.name for f in fields(cls)]
    for k in d:
        if k not in names:
            close = difflib.get_close_matches(k, names, n=1)
            hint = f" Did you mean {prefix}{close[0]}?" if close else ""
            raise ValueError(f"unknown key {prefix}{k!r}.{hint} Accepted: {', '.join(prefix + n for n in names)}")


def _positive_int(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")


def _check_int_list(name: str, v: Any, allow_none: bool = False) -> None:
    if v is None and allow_none:
        return
    if not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        raise ValueError(f"{name} must be a list of integers, e.g. {name}=[0,1,2], got {v!r}")
