"""ExperimentSpec: one YAML file (plus `key=value` overrides) describing a run or a comparison grid.

A spec is validated as a whole before anything is built: every field has a check (type and range), and
unknown keys, methods, tasks and bad values fail with one line that names the key (with file:line when it
came from a file) and what is accepted, so a typo never costs a training run.

    task: rt-sentiment          # `flatlora tasks` lists them
    methods: [lora, flat-lora]  # compare: methods x ranks x seeds; run: `method` and `seed`
    lora: {r: 8, alpha: 16}
    train: {epochs: 1, lr: 5.0e-4}
    flat: {sigma: 0.05}         # any FlatLoRAConfig field except total_steps/seed (the runner sets them)
    quant: {type: nf4}          # QLoRA: the base loaded in 4-bit NF4 by bitsandbytes (causal-LM tasks)

`flatlora run --help` prints every key with its default, help and accepted values (`config_keys()`).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import yaml

from ..config import FlatLoRAConfig

# transformers.get_scheduler names that need no extra arguments ("constant" has no warm-up, as in HF).
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt")
DTYPES = ("float32", "bfloat16", "float16")
QUANT_TYPES = ("nf4", "fp4", "int8")


class SpecError(ValueError):
    """A spec value that is not accepted. `key` is the dotted key, so the loader can add the file and line."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


# ---------------------------------------------------------------------- field checks
@dataclass(frozen=True)
class Check:
    """`accepts` is said in errors and in `--help`; `test(value) -> bool`."""

    accepts: str
    test: Callable[[Any], bool]

    def __call__(self, key: str, value: Any) -> None:
        if not self.test(value):
            raise SpecError(key, f"{key} must be {self.accepts}, got {_show(value)}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def integer(lo: int) -> Check:
    return Check("a positive integer" if lo == 1 else f"an integer >= {lo}", lambda v: _is_int(v) and v >= lo)


def number(*, gt: float | None = None, ge: float | None = None, lt: float | None = None) -> Check:
    if gt == 0 and ge is None and lt is None:
        words = "a positive finite number"
    else:
        bounds = [f">= {ge}" if ge is not None else "", f"> {gt}" if gt is not None else "", f"< {lt}" if lt is not None else ""]
        words = "a finite number " + " and ".join(b for b in bounds if b)
    return Check(words, lambda v: _is_num(v) and (gt is None or v > gt) and (ge is None or v >= ge) and (lt is None or v < lt))


def choice(*values: str) -> Check:
    return Check("one of " + " | ".join(values), lambda v: isinstance(v, str) and v in values)


def optional(c: Check) -> Check:
    return Check(f"{c.accepts}, or null", lambda v: v is None or c.test(v))


def _str_list(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, str) and x for x in v)


def _int_list(lo: int, example: str) -> Check:
    return Check(f"a non-empty list of distinct integers >= {lo}, e.g. {example}",
                 lambda v: isinstance(v, list) and bool(v) and all(_is_int(x) and x >= lo for x in v) and len(set(v)) == len(v))


STRING = Check("a non-empty string", lambda v: isinstance(v, str) and bool(v.strip()))
TEXT = Check("a string", lambda v: isinstance(v, str))
BOOL = Check("true or false", lambda v: isinstance(v, bool))
def mapping(example: str) -> Check:
    return Check(f"a mapping of names to values, e.g. {example}", lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v))


NAMES = Check("a non-empty list of distinct names, e.g. [lora, flat-lora]",
              lambda v: _str_list(v) and len(set(v)) == len(v))
MODULES = Check("a module name, a list of module names, or 'all-linear'",
                lambda v: (isinstance(v, str) and bool(v)) or _str_list(v))
DEVICE = Check("auto | cpu | cuda | cuda:N",
               lambda v: isinstance(v, str) and (v in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", v) is not None))


def _f(default: Any, help: str, check: Check, **kw: Any):
    if callable(default) and not isinstance(default, (int, float, str)):
        return field(default_factory=default, metadata={"help": help, "check": check}, **kw)
    return field(default=default, metadata={"help": help, "check": check}, **kw)


@dataclass
class LoraSection:
    r: int = _f(8, "LoRA rank", integer(1))
    alpha: float = _f(16, "LoRA alpha (scale s = alpha / r, or alpha / sqrt(r) for rslora)", number(gt=0))
    dropout: float = _f(0.0, "LoRA dropout", number(ge=0, lt=1))
    targets: Any = _f(None, "module names or 'all-linear'; null = the task's default", optional(MODULES))
    modules_to_save: Any = _f(None, "fully trained modules (heads); null = the task's default", optional(MODULES))
    loraplus_ratio: float = _f(16.0, "LoRA+: lr of B over lr of A", number(gt=0))


@dataclass
class TrainSection:
    epochs: float = _f(1, "passes over the training split (fractions allowed)", number(gt=0))
    max_steps: int | None = _f(None, "cap on optimizer steps (overrides epochs when smaller)", optional(integer(1)))
    batch_size: int = _f(32, "micro-batch size", integer(1))
    grad_accum: int = _f(1, "micro-batches per optimizer step", integer(1))
    lr: float = _f(5e-4, "learning rate of adapter methods", number(gt=0))
    full_lr: float = _f(1e-4, "learning rate of (flat) full fine-tuning", number(gt=0))
    weight_decay: float = _f(0.1, "AdamW weight decay", number(ge=0))
    warmup_ratio: float = _f(0.03, "linear warm-up share of the steps (ceil(ratio x steps) steps, as HF Trainer)",
                             number(ge=0, lt=1))
    scheduler: str = _f("cosine", "lr schedule, by transformers.get_scheduler name", choice(*SCHEDULERS))
    eval_batch_size: int = _f(128, "batch size for evaluation", integer(1))
    max_grad_norm: float | None = _f(None, "gradient clipping (null = off)", optional(number(gt=0)))
    threads: int | None = _f(None, "torch CPU threads per run (null = torch's default; with jobs > 1: cores / jobs)",
                             optional(integer(1)))
    device: str = _f("auto", "where runs train (auto = cuda when visible)", DEVICE)
    dtype: str = _f("float32", "backbone dtype", choice(*DTYPES))


@dataclass
class QuantSection:
    """The QLoRA set-up: the frozen base loaded quantized through transformers' BitsAndBytesConfig, then
    peft.prepare_model_for_kbit_training; LoRA (and Flat-LoRA, in forward mode) on top."""

    type: str | None = _f(None, "quantize the frozen base: nf4 | fp4 (4-bit) | int8 (LLM.int8()); null = full precision "
                          "(needs bitsandbytes; causal-LM tasks)", optional(choice(*QUANT_TYPES)))
    double_quant: bool = _f(True, "4-bit: quantize the quantization constants too (QLoRA's double quantization)", BOOL)
    compute_dtype: str = _f("auto", "4-bit: dtype the layers multiply in; auto = bfloat16 on CUDA, train.dtype on CPU",
                            choice("auto", *DTYPES))
    gradient_checkpointing: bool = _f(False, "prepare_model_for_kbit_training's gradient checkpointing (saves "
                                      "activation memory on large bases, costs a second forward)", BOOL)


@dataclass
class ExperimentSpec:
    task: str = _f("rt-sentiment", "task name (`flatlora tasks`)", STRING)
    task_args: dict = _f(dict, "task options, e.g. path/text_column for byo-text (`flatlora tasks --options`)",
                          mapping("{path: data.csv}"))
    model: str | None = _f(None, "model: registry name, local folder or hub id; null = the task's default", optional(STRING))
    method: str = _f("flat-lora", "method of `flatlora run`", STRING)
    seed: int = _f(0, "seed of `flatlora run`: init, data order and noise", integer(0))
    methods: list = _f(lambda: ["lora", "flat-lora"], "methods of `flatlora compare`", NAMES)
    seeds: list = _f(lambda: [0, 1, 2], "seeds of `flatlora compare` (paired across methods)", _int_list(0, "[0, 1, 2]"))
    ranks: list | None = _f(None, "ranks of `flatlora compare` (null = [lora.r])", optional(_int_list(1, "[8, 16]")))
    baseline: str | None = _f(None, "method every other is paired against (null = each flat-X against X)", optional(STRING))
    lora: LoraSection = field(default_factory=LoraSection)
    train: TrainSection = field(default_factory=TrainSection)
    quant: QuantSection = field(default_factory=QuantSection)
    flat: dict = _f(lambda: {"sigma": 0.05}, "FlatLoRAConfig fields (sigma, schedule, noise, mode, ...)",
                    mapping("{sigma: 0.05}"))
    sam_rho_ab: float = _f(0.003, "LoRA-SAM radius on (A, B) (paper v2 Table 6 best: 0.003)", number(gt=0))
    sam_rho_w: float = _f(0.05, "SAM radius on the merged W (paper v2 Table 6 best: 0.05)", number(gt=0))
    out_dir: str = _f("runs/default", "results folder (one sub-folder per run)", STRING)
    jobs: int = _f(1, "compare: runs trained at once on the device, each in its own process", integer(1))
    plot: bool = _f(True, "compare: save plot.png (needs matplotlib)", BOOL)
    tensorboard: bool = _f(True, "write TensorBoard events (loss, sigma, lr) into each run's tb/ when tensorboard is installed", BOOL)
    description: str = _f("", "free text recorded with the results", TEXT)

    # ------------------------------------------------------------------ validation
    def __post_init__(self):
        self.validate()

    def validate(self) -> "ExperimentSpec":
        from .methods import get_method
        from .tasks import get_task_entry

        for prefix, obj in (("", self), ("lora.", self.lora), ("train.", self.train), ("quant.", self.quant)):
            for f in fields(obj):
                if "check" in f.metadata:
                    f.metadata["check"](prefix + f.name, getattr(obj, f.name))
        _named("task", lambda: get_task_entry(self.task))
        _named("method", lambda: get_method(self.method))
        for m in self.methods:
            _named("methods", lambda: get_method(m))
        if self.baseline is not None and self.baseline not in self.methods:
            raise SpecError("baseline", f"baseline {self.baseline!r} is not among methods {self.methods}: add it or drop baseline")
        _check_out_dir(self.out_dir)
        taken = {"total_steps", "seed"} & set(self.flat)
        if taken:
            key = sorted(taken)[0]
            raise SpecError(f"flat.{key}", f"flat.{key} is set by the runner (steps of the run, run seed): remove it")
        try:
            self.flat_config(total_steps=1, seed=0)  # FlatLoRAConfig validates its fields
        except (ValueError, TypeError) as e:
            raise SpecError("flat", f"flat: {e}") from None
        if self.quant.type is not None and self.flat.get("mode", "auto") == "inplace":
            raise SpecError("flat.mode", f"flat.mode=inplace cannot run on a quant.type={self.quant.type} base (re-quantizing "
                            "W + eps cannot be undone): use flat.mode=auto or forward")
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
        for name, section in (("lora", LoraSection), ("train", TrainSection), ("quant", QuantSection)):
            if name in d:
                _reject_unknown(f"{name}.", _mapping(name, d[name]), section)
                kwargs[name] = section(**d[name])
        return cls(**kwargs)

    def replace(self, **changes: Any) -> "ExperimentSpec":
        return ExperimentSpec.from_dict({**self.to_dict(), **changes})


def config_keys() -> list[tuple[str, Any, str, str]]:
    """(key, default, help, accepted values) of every spec key, FlatLoRAConfig's `flat.*` fields included."""
    out = []
    for prefix, cls in (("", ExperimentSpec), ("lora.", LoraSection), ("train.", TrainSection), ("quant.", QuantSection)):
        for f in fields(cls):
            if f.name in ("lora", "train", "quant"):
                continue
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            out.append((prefix + f.name, default, f.metadata.get("help", ""), f.metadata["check"].accepts))
    for f in fields(FlatLoRAConfig):
        if f.name not in ("total_steps", "seed"):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            if f.name == "sigma":
                default = ExperimentSpec().flat["sigma"]
            out.append((f"flat.{f.name}", default, f.metadata.get("help", ""), "see FlatLoRAConfig"))
    return out


# ---------------------------------------------------------------------- loading
class _Loader(yaml.SafeLoader):
    """Safe YAML that also reads `1e-3` as a number (YAML 1.1 wants `1.0e-3` and would give a string)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def load_spec(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentSpec:
    """Read a YAML spec (safe loader) and apply `key=value` overrides (dotted keys, YAML values).

    Errors in the file name it with the line: `c.yaml:4: train.lr must be a positive finite number, got 'abc'`.

    Example:
        >>> load_spec(None, ["task=byo-text", "task_args.path=x.csv", "train.lr=1e-3"]).train.lr
        0.001
    """
    d: dict[str, Any] = {}
    lines: dict[str, int] = {}
    if path is not None:
        d, lines = read_yaml(path)
    given: set[str] = set()
    for item in overrides or []:
        given.add(apply_override(d, item))
    try:
        return ExperimentSpec.from_dict(d)
    except SpecError as e:
        key = e.key
        while key and key not in lines:
            key = key.rpartition(".")[0]  # flat.sigma from a file that wrote `flat: {sigma: ...}` on one line
        if path is None or not key or any(g == e.key or e.key.startswith(g + ".") or g.startswith(e.key + ".") for g in given):
            raise
        raise SpecError(e.key, f"{path}:{lines[key]}: {e}") from None


def read_yaml(path: str | Path) -> tuple[dict[str, Any], dict[str, int]]:
    """The mapping in a YAML config file and the line of each (dotted) key; one-line errors for bad files."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"config file {str(p)!r} does not exist")
    if not p.is_file():
        raise ValueError(f"config {str(p)!r} is not a file (give a .yaml file)")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ValueError(f"{p}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); save the config as UTF-8") from None
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.constructor.ConstructorError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{p}:{mark.line + 1}" if mark else str(p)
        tag = re.search(r"tag '([^']*)'", str(e.problem))
        what = f"the tag {tag.group(1).replace('tag:yaml.org,2002:', '!!')}" if tag else "a YAML tag"
        raise ValueError(f"{where}: {what} is not allowed: a config holds plain values (numbers, strings, lists, "
                         "mappings)") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{p}:{mark.line + 1}:{mark.column + 1}" if mark else str(p)
        raise ValueError(f"{where}: not valid YAML: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{p}: not valid YAML: {e}") from None
    finally:
        loader.dispose()
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ValueError(f"{p} must hold a mapping of keys to values at the top level, got {type(data).__name__}")
    lines: dict[str, int] = {}
    _key_lines(node, "", lines, p)
    return data, lines


def _key_lines(node: yaml.Node, prefix: str, out: dict[str, int], path: Path) -> None:
    if not isinstance(node, yaml.MappingNode):
        return
    for k, v in node.value:
        key = f"{prefix}{k.value}"
        if key in out:
            raise ValueError(f"{path}:{k.start_mark.line + 1}: {key} is given twice (also on line {out[key]}): keep one")
        out[key] = k.start_mark.line + 1
        _key_lines(v, key + ".", out, path)


def apply_override(d: dict[str, Any], item: str) -> str:
    """`a.b=value` sets d['a']['b'] to the YAML value ('1e-3' reads as a number, '[a,b]' as a list); returns 'a.b'."""
    if "=" not in item:
        raise ValueError(f"override {item!r} is not key=value (e.g. train.lr=1e-3 or methods=[lora,flat-lora])")
    key, raw = item.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if not all(parts):
        raise ValueError(f"override {item!r}: {key!r} is not a key (e.g. train.lr)")
    cur = d
    for p in parts[:-1]:
        nxt = cur.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise SpecError(p, f"override {item!r}: {p!r} is not a section")
        cur = nxt
    cur[parts[-1]] = _parse_value(raw)
    return key


def _parse_value(raw: str) -> Any:
    try:
        return yaml.load(raw, Loader=_Loader)
    except yaml.YAMLError:  # a tag or unbalanced bracket: kept as text, the field's check then names it
        return raw


def _show(v: Any) -> str:
    text = repr(v)
    return (text if len(text) <= 80 else text[:77] + "...") + ("" if v is None or isinstance(v, (bool, int, float))
                                                              else f" ({type(v).__name__})")


def _named(key: str, lookup: Callable[[], Any]) -> None:
    try:
        lookup()
    except ValueError as e:
        raise SpecError(key, str(e)) from None


def _check_out_dir(out_dir: str) -> None:
    p = Path(out_dir).expanduser()
    for q in (p, *p.parents):  # the nearest existing ancestor must be a folder
        if q.exists():
            if not q.is_dir():
                where = "" if q == p else f" ({str(q)!r} is a file)"
                raise SpecError("out_dir", f"out_dir {out_dir!r} is not a folder{where}: give a folder path")
            return


def _mapping(name: str, v: Any) -> dict:
    if not isinstance(v, dict):
        raise SpecError(name, f"{name} must be a mapping (e.g. {name}: {{...}}), got {_show(v)}")
    return v


def _reject_unknown(prefix: str, d: dict, cls) -> None:
    names = [f.name for f in fields(cls)]
    for k in d:
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f" Did you mean {prefix}{close[0]}?" if close else ""
            raise SpecError(f"{prefix}{k}", f"unknown key {prefix}{k!r}.{hint} Accepted: {', '.join(prefix + n for n in names)}")
