"""`flatlora` command line: the only place that reads argv.

    flatlora tasks                                   what can run here (offline tasks, methods, models)
    flatlora run configs/text_rt.yaml method=flat-lora seed=1
    flatlora compare configs/demo_text.yaml --jobs 4 methods x ranks x seeds -> table, stats, plot
    flatlora compare task=byo-text task_args.path=my.csv methods=[lora,flat-lora] seeds=[0,1,2] --out runs/mine
    flatlora run --help                              every config key, its default and what it accepts

Every subcommand takes an optional YAML config and `key=value` overrides (dotted keys, YAML values).
Other subcommands register themselves from `flatlora.cli.<name>` modules that define `add_parser(subparsers)`.

Errors: bad input (a config, data, a model reference, a missing extra) is one line naming the problem,
exit code 2. What counts as bad input is a ValueError / FileExistsError / ImportError that flatlora's own
code raised on purpose; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import textwrap
import traceback
import warnings
from pathlib import Path

PLUGINS = ("landscape", "bench", "fetch")  # optional modules owned by other parts of the project
USER_ERRORS = (ValueError, FileExistsError, ImportError)


def _spec(args):
    from ..experiments.spec import load_spec

    config = args.config
    overrides = list(args.overrides)
    if config and "=" in config and not config.endswith((".yaml", ".yml")):
        overrides.insert(0, config)  # no config file given: the first positional is an override
        config = None
    if config is None and not overrides and not args.print_config:
        raise ValueError(f"give a config file or key=value settings, e.g. `flatlora {args.command} configs/demo_text.yaml` "
                         f"(`flatlora {args.command} --help` lists every key; --print-config shows the defaults)")
    if args.out:
        overrides.append(f"out_dir={args.out}")
    if getattr(args, "jobs", None) is not None:
        overrides.append(f"jobs={args.jobs}")
    return load_spec(config, overrides)


def _spec_command(fn):
    """`run` and `compare`: the spec from the config and overrides, passed to `fn(args, spec)`; with
    --print-config the spec is printed instead and nothing runs."""

    def command(args) -> int:
        spec = _spec(args)
        if args.print_config:
            import yaml

            print(yaml.safe_dump(spec.to_dict(), sort_keys=False), end="")
            return 0
        return fn(args, spec)

    return command


def cmd_run(args, spec) -> int:
    from ..experiments.compare import run_name
    from ..experiments.runner import run_one

    run_dir = Path(spec.out_dir) / run_name(spec.method, spec.lora.r, spec.seed)
    rec = run_one(spec, run_dir, progress=not args.no_progress)
    print(json.dumps({k: rec[k] for k in ("status", "method", "rank", "seed", "metrics", "steps", "train_seconds")}, indent=1))
    print(f"results: {run_dir}")
    if rec["status"] != "done":
        print(f"flatlora run: the run failed: {rec['failure']}", file=sys.stderr)
        return 1
    return 0


def cmd_compare(args, spec) -> int:
    from ..experiments.compare import compare

    res = compare(spec, progress=not args.no_progress, log=lambda s: print(s, flush=True))
    print()
    print(res.markdown)
    print(f"ran {res.ran}, kept {res.skipped} finished; results in {res.out_dir}/ (summary.md, summary.json, runs.csv, pairs.csv"
          + (f", {res.plot.name})" if res.plot else ")"))
    if res.failed:
        print(f"{len(res.failed)} run(s) failed (diverged): their reasons are in the table above")
    if res.errors:
        print(f"flatlora compare: {len(res.errors)} run(s) raised an error; run the same command again to retry them",
              file=sys.stderr)
        return 1
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


def config_help() -> str:
    """Every config key with its default, help and accepted values (the epilog of `run`/`compare --help`)."""
    from ..experiments.spec import config_keys

    lines = ["config keys (in the YAML file, or key=value after it; --print-config shows the resolved values):"]
    for key, default, help, accepts in config_keys():
        lines.append(f"  {key} = {json.dumps(default)}")
        text = help + ("" if accepts.startswith("see ") else f"  [{accepts}]")
        lines += textwrap.wrap(text, width=100, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)


def _version() -> str:
    from .. import __version__

    return f"flatlora {__version__}"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="flatlora", description="Flat-LoRA experiments: run, compare, list tasks.")
    ap.add_argument("--version", action="version", version=_version())
    ap.add_argument("-v", "--verbose", action="store_true", help="log what the engine decides (mode, targets)")
    sub = ap.add_subparsers(dest="command", required=True)
    keys = config_help()
    for name, fn, help in [("run", cmd_run, "train and evaluate one method on one seed"),
                           ("compare", cmd_compare, "methods x ranks x seeds, paired statistics, table and plot")]:
        p = sub.add_parser(name, help=help, description=help, epilog=keys,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("config", nargs="?", help="YAML config (configs/*.yaml)")
        p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=1e-3 seeds=[0,1]")
        p.add_argument("--out", help="results root (default: out_dir of the config)")
        p.add_argument("--print-config", action="store_true", help="print the resolved spec (config + overrides) and exit")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
        if name == "compare":
            p.add_argument("--jobs", type=int, metavar="N",
                           help="train N runs at once on the device, each in its own process (default: the spec's "
                                "jobs, 1); pairing and resume are unchanged")
        p.set_defaults(fn=_spec_command(fn))
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


def _raised_by_flatlora(e: BaseException) -> bool:
    """True when the innermost frame of the error is flatlora's own code (a deliberate check)."""
    tb = traceback.extract_tb(e.__traceback__)
    root = str(Path(__file__).resolve().parents[1])
    return bool(tb) and str(Path(tb[-1].filename).resolve()).startswith(root)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """argparse stops collecting positionals at the first option: `key=value` after `--jobs 2` is picked up here."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # transformers' deprecation notices fire once per model build (every run of a compare): not news to a user.
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(message)s")
    try:
        return int(args.fn(args) or 0)
    except USER_ERRORS as e:
        if not _raised_by_flatlora(e):
            raise  # a library's error inside our code: a bug until shown otherwise, keep the traceback
        print(f"flatlora {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nflatlora {args.command}: interrupted; finished runs are kept, the same command resumes", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
