"""Registers, shared memory and instructions per element of the noise kernels, compiled for a GPU on any machine.

    python benchmarks/overhead/sass_stats.py [--arch 90] [--variants shipped,no-checksum,...] [--out DIR]

Triton compiles `_noise_kernel` (perturb, restore, noisy copy; bf16, aligned contiguous views) for the target
architecture without a GPU (its wheel ships ptxas and cuobjdump), for the shipped kernel and for any variant of
`ablate.py`. Registers a thread decide how many blocks an SM holds (65 536 registers an SM on sm_90); the SASS
instruction count of one tile / elements of a tile is what a thread issues per element (the kernels have no loops
but restore's patch loop). On the H200 the kernels are instruction-bound (the noisy copy: ~40 instructions an
element, 44 % of copy bandwidth), so these two numbers are a CPU-side proxy for the time `ablate.py` and
`kernel_bench.py` measure on the GPU. The Triton here may differ from the GPU machine's (3.6 there): the numbers
are for comparing variants compiled by the same Triton, not for quoting as the GPU's. Writes sass-sm<arch>.json.
To compile with the GPU machine's Triton (3.6; `make setup` here brings 3.9 with torch 2.13):
`pip install --no-deps --target /tmp/triton36 triton==3.6.0` and put /tmp/triton36 first on PYTHONPATH. The two
differ: Triton 3.9 re-lays the perturb's record store out through 16 KB of shared memory (72.0 against 61.5
instructions an element, sass-sm90-triton3.9.json), which ablate.py's `record-stores-asm` avoids (60.5 on 3.9, the
same code as shipped on 3.6).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "src"))
sys.path.insert(0, str(HERE))

import ablate  # noqa: E402
from kernel_bench import load_module, provenance, write_results  # noqa: E402

MODES = {0: "perturb", 1: "restore", 2: "noisy_copy"}


def compile_tile(K, mode: int, arch: int, block: int | None = None, warps: int | None = None):
    """The CompiledKernel of one bf16 launch flavour (ALIGNED, CONTIG, compiled: FAST) of module K's kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {"tab_ptr": "*i64", "map_ptr": "*i32", "cnt_ptr": "*i32", "hdr_ptr": "*i32", "rent_ptr": "*i32", "CAP": "i32",
           "bad_ptr": "*i32", "warg_ptr": "*i16", "oarg_ptr": "*i16", "sarg_ptr": "*fp32", "key_hi": "i32",
           "key_lo": "i32"}
    params = list(K._noise_kernel.arg_names)
    const = dict(MODE=mode, KIND=0, ALIGNED=True, CONTIG=True, RETRY=False, FAST=True, BLOCK_=block or K.BLOCK,
                 PB=256, LAYER_ARGS=mode == 2)
    if params != list(sig) + list(const):
        raise SystemExit(f"_noise_kernel's parameters are {params}: update sass_stats.py's signature")
    sig.update({k: "constexpr" for k in const})
    attrs = {(i,): [["tt.divisibility", 16]] for i, k in enumerate(params) if k.endswith("_ptr")}
    src = ASTSource(fn=K._noise_kernel, signature=sig, constexprs={(params.index(k),): v for k, v in const.items()},
                    attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": warps or K.NUM_WARPS[mode], "enable_fp_fusion": False})


def sass_stats(ck) -> dict:
    """Registers, shared bytes and SASS instruction counts (total and the most frequent opcodes) of a kernel."""
    import triton

    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(ck.asm["cubin"])
    try:
        res = subprocess.run([str(tools / "cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
        sass = subprocess.run([str(tools / "cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    finally:
        os.unlink(f.name)
    regs = int(next(w for w in res.split() if w.startswith("REG:"))[4:])
    ins = [line.split("*/", 1)[1].strip() for line in sass.splitlines()
           if line.strip().startswith("/*") and "*/" in line and ";" in line]
    # "@!P0 STG.E ..." -> STG: drop the predicate guard, then the opcode's modifiers
    full = [re.sub(r"^@!?U?P[T0-9]+\s+", "", i).split()[0] for i in ins if i]
    ops = collections.Counter(f.split(".")[0] for f in full)
    # global accesses with their width: LDG.E.U16 is one 2-byte element a thread, LDG.E.128 eight (vectorized)
    mem = collections.Counter(f for f in full if f.startswith(("LDG", "STG")))
    return {"registers": regs, "shared_bytes": ck.metadata.shared, "instructions": len(ins),
            "top_opcodes": dict(ops.most_common(12)), "global_accesses": dict(mem)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--variants", default="shipped", help=f"comma list of ablate.py variants: {list(ablate.VARIANTS)}")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args(argv)
    text = ablate.KERNELS.read_text()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variants.split(","):
            path = Path(tmp) / f"sass_{name.replace('-', '_')}.py"
            path.write_text(ablate.variant_source(name, text))
            K = load_module(str(path), path.stem)
            for mode, kernel in MODES.items():
                st = sass_stats(compile_tile(K, mode, args.arch))
                warps = K.NUM_WARPS[mode]
                per = st["instructions"] * warps * 32 / K.BLOCK
                blocks = min(65536 // (st["registers"] * warps * 32), 64 // warps)
                rows.append({"variant": name, "kernel": kernel, "block": K.BLOCK, "warps": warps, **st,
                             "instructions_per_element": per, "blocks_per_sm_by_registers": blocks})
                print(f"{name:<24} {kernel:<10} {st['registers']:4d} regs  {st['shared_bytes']:6d} B shared  "
                      f"{per:6.1f} instructions/element  {blocks:2d} blocks/SM", flush=True)
    import triton

    info = provenance(arch=f"sm_{args.arch}", triton_compiled_with=triton.__version__)
    info["device"] = f"sm{args.arch}"  # compiled for, not run on
    write_results(args.out, "sass", info, rows)


if __name__ == "__main__":
    main()
