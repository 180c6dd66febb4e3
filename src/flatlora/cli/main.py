"""`flatlora` command line: the only place that reads argv.

    flatlora tasks                                   what can run here (offline tasks, methods, models)
    flatlora run configs/text_rt.yaml method=flat-lora seed=1
    flatlora compare configs/demo_text.yaml          methods x ranks x seeds -> table, stats, plot
    flatlora compare task=byo-text task_args.path=my.csv methods=[lora,flat-lora] seeds=[0,1,2]

Every subcommand takes an optional YAML config and `key=value` overrides (dotted keys, YAML values).
Other subcommands register themselves from `flatlora.cli.<name>` modules that define `add_parser(subparsers)`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import warnings

PLUGINS = ("landscape", "bench", "fetch")  # optional modules owned by other parts of the project


def _spec(args):
    from ..experiments.spec import load_spec

    config = args.config
    overrides = list(args.overrides)
    if config and "=" in config and not config.endswith((".yaml", ".yml")):
        overrides.insert(0, config)  # no config file given: the first positional is an override
        config = None
    return load_spec(config, overrides)


def cmd_run(args) -> int:
    from ..experiments.compare import run_name
    from pathlib import Path

    from ..experiments.runner import run_one

    spec = _spec(args)
    run_dir = Path(args.out or spec.out_dir) / run_name(spec.method, spec.lora.r, spec.seed)
    rec = run_one(spec, run_dir, progress=not args.no_progress)
    print(json.dumps({k: rec[k] for k in ("method", "rank", "seed", "metrics", "steps", "train_seconds")}, indent=1))
    print(f"results: {run_dir}")
    return 0


def cmd_compare(args) -> int:
    from ..experiments.compare import compare

    spec = _spec(args)
    res = compare(spec, progress=not args.no_progress, log=lambda s: print(s, flush=True))
    print()
    print(res.markdown)
    print(f"ran {res.ran}, kept {res.skipped} finished; results in {res.out_dir}/ (summary.md, summary.json, runs.csv, pairs.csv"
          + (f", {res.plot.name})" if res.plot else ")"))
    return 0


def cmd_tasks(args) -> int:
    from ..experiments.methods import get_method, list_methods
    from ..experiments.models import FETCHED, TINY
    from ..experiments.tasks import list_tasks

    print("tasks (task=<name>; options go in task_args.<option>):")
    for e in list_tasks():
        ok, why = e.available()
        print(f"  {'✓' if ok else '·'} {e.name:24s} {e.help}")
        print(f"      default model: {e.default_model}; {why}")
        if args.options:
            print("      options: " + ", ".join(f"{k}={v!r}" for k, v in e.options().items()))
    print("\nmethods (method=<name>, methods=[a,b]):")
    for m in list_methods():
        print(f"  {m:14s} {get_method(m).help}")
    print(f"\nmodels (model=<name>): {', '.join(list(FETCHED) + list(TINY))}, a local HF folder, or a hub id")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="flatlora", description="Flat-LoRA experiments: run, compare, list tasks.")
    ap.add_argument("-v", "--verbose", action="store_true", help="log what the engine decides (mode, targets)")
    sub = ap.add_subparsers(dest="command", required=True)
    for name, fn, help in [("run", cmd_run, "train and evaluate one method on one seed"),
                           ("compare", cmd_compare, "methods x ranks x seeds, paired statistics, table and plot")]:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("config", nargs="?", help="YAML config (configs/*.yaml); optional")
        p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=1e-3 seeds=[0,1]")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
        if name == "run":
            p.add_argument("--out", help="results root (default: out_dir of the config)")
        p.set_defaults(fn=fn)
    p = sub.add_parser("tasks", help="list tasks, methods and models available here")
    p.add_argument("--options", action="store_true", help="also list each task's options (task_args)")
    p.set_defaults(fn=cmd_tasks)
    for plugin in PLUGINS:
        try:
            mod = importlib.import_module(f"flatlora.cli.{plugin}")
        except ModuleNotFoundError as e:
            if e.name != f"flatlora.cli.{plugin}":
                raise
            continue
        mod.add_parser(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # transformers' deprecation notices fire once per model build (every run of a compare): not news to a user.
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(message)s")
    try:
        return int(args.fn(args) or 0)
    except (ValueError, FileExistsError) as e:
        # Bad input (config, data, model reference): one clear line, no traceback.
        print(f"flatlora {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
