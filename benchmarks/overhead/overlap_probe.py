"""Does the in-place perturb hide behind the forward? A probe before building it into the engine.

The in-place step at 7B GA 1 spends ~27 ms of kernels (row std + perturb) before the forward can start, all
memory-bound, while the forward's GEMMs are compute-bound. Here the engine's in-place mode is swapped for a
copy that computes row std and perturb in chunks of consecutive layers on a side stream, each chunk
followed by an event the chunk's layers wait for in a forward pre-hook, so layer 0's forward starts after
the first chunk. Variants, timed interleaved as `run.py` times them (same model, same batches):

    lora              plain LoRA
    inplace           the engine as shipped (one launch for all row stds, one for all perturbs)
    chunked-serial    the chunks on the main stream (what chunking alone costs)
    overlap-<k>       the chunks on a side stream, k layers a chunk

Afterwards the frozen weights are compared with a copy taken before the first step (bit-identical expected).

    python3 benchmarks/overhead/overlap_probe.py --out $OUT [--chunks 7,28] [--size llama-7b] [--steps 20]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import statistics
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
spec = importlib.util.spec_from_file_location("overhead_run", HERE / "run.py")
R = importlib.util.module_from_spec(spec)
sys.modules["overhead_run"] = R
spec.loader.exec_module(R)

from flatlora import FlatLoRA, FlatLoRAConfig  # noqa: E402
from flatlora.core.modes import InplaceMode  # noqa: E402
from flatlora.core.view import View  # noqa: E402


class ChunkedInplace(InplaceMode):
    """InplaceMode with row std + perturb per chunk of `k` consecutive targets, on `stream` (None: the main one)."""

    def __init__(self, plan, k: int, side: bool):
        super().__init__(plan)
        self.k, self.side = k, side
        self.stream = torch.cuda.Stream() if side else None
        self.hooks = []
        self.events: dict[int, torch.cuda.Event] = {}
        if side:
            for backend, targets in plan:
                for i, t in enumerate(targets):
                    self.hooks.append(t.base.register_forward_pre_hook(self._waiter(i)))

    def _waiter(self, i):
        def hook(module, args):
            ev = self.events.get(i // self.k)
            if ev is not None:
                torch.cuda.current_stream().wait_event(ev)
        return hook

    def open(self, window):
        self.events.clear()
        if self.side:
            self.stream.wait_stream(torch.cuda.current_stream())  # every allocation on the side stream comes after the main stream's uses
        with torch.cuda.stream(self.stream) if self.side else contextlib.nullcontext():
            for backend, targets in self.plan:
                views = [View.of(t) for t in targets]
                for c in range(0, len(views), self.k):
                    vs = views[c:c + self.k]
                    window.draws.update(window.draw(vs))
                    for applied in backend.perturb([(v, window.draws[v.name]) for v in vs], window.sigma):
                        window.applied.append(applied)
                    if self.side:
                        ev = torch.cuda.Event()
                        ev.record(self.stream)
                        self.events[c // self.k] = ev

    def close(self, window):
        if self.side:
            torch.cuda.current_stream().wait_stream(self.stream)
        super().close(window)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--size", default="llama-7b")
    ap.add_argument("--micro", default="4x512")
    ap.add_argument("--chunks", default="7,28")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny model on CPU, no side streams (checks the code)")
    args = ap.parse_args(argv)
    dev = "cpu" if args.cpu_smoke else "cuda"
    if args.cpu_smoke:
        args.size, args.micro, args.steps, args.rounds = "tiny", "2x16", 4, 2
    bs, seq = (int(x) for x in args.micro.split("x"))
    vocab = 32000 if dev == "cuda" else 256
    model = R.build_llama(args.size, dev, vocab)
    batch = R.llama_batch(vocab, bs, seq, dev)(0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    names = R.PROJ
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()
              if not p.requires_grad and any(k in n for k in names)}

    def fwd_bwd():
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
            loss = model(**batch).loss
        loss.backward()

    def lora():
        opt.zero_grad(set_to_none=True)
        fwd_bwd()
        opt.step()

    flat = FlatLoRA(model, FlatLoRAConfig(sigma=0.05, schedule="constant", mode="inplace", seed=0))
    shipped = flat._mode
    modes = {"inplace": shipped, "chunked-serial": ChunkedInplace(flat._plan, int(args.chunks.split(",")[0]), False)}
    for k in (int(x) for x in args.chunks.split(",")) if dev == "cuda" else ():
        modes[f"overlap-{k}"] = ChunkedInplace(flat._plan, k, True)

    def flat_step(mode):
        def step():
            flat._mode = mode
            opt.zero_grad(set_to_none=True)
            with flat.step():
                fwd_bwd()
            opt.step()
        return step

    fns = {"lora": lora, **{v: flat_step(m) for v, m in modes.items()}}
    times = {v: [] for v in fns}
    for r in range(args.rounds):
        for v, fn in fns.items():
            ts, _ = R.timed(fn, dev, args.steps // args.rounds, 2 if r == 0 else 1)
            times[v] += ts
    flat._mode = shipped
    flat.close()
    for m in modes.values():
        for h in getattr(m, "hooks", []):
            h.remove()
    exact = all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    base = statistics.median(times["lora"])
    rows = []
    for v, ts in times.items():
        med = statistics.median(ts)
        rows.append({"variant": v, "median_ms": med, "min_ms": min(ts), "ratio_vs_lora": med / base, "n_steps": len(ts)})
        print(f"{v:<16} {med:9.2f} ms  x{med / base:6.3f}  (min {min(ts):.2f})", flush=True)
    print(f"frozen weights bit-identical after all variants: {exact}")
    out = {"provenance": {**R.provenance(argparse.Namespace(dev=dev, smoke=dev != "cuda", anchor=None)), "command": " ".join(sys.argv)},
           "setting": {"size": args.size, "micro": [bs, seq], "ga": 1}, "exact": exact, "rows": rows}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "overlap-probe.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
