"""Bring the fetched data to the GPU machine in calls that carry at most 64 MiB each.

    python benchmarks/evidence/carry.py pack                  # here: .carry/<bundle>/ and the carry of each call
    python benchmarks/evidence/carry.py pack --studies llm    # only the LLM's data
    python benchmarks/evidence/carry.py unpack .carry/text .carry/llm-a --to /root/fldata     # there, every call

What travels (the rest of .data is not needed):
    text   pkgs/minilm (model.safetensors cast to fp16: 45 MB instead of 91) + vader/*_GroundTruth.txt
    image  pkgs/effnet (state dict cast to fp16: 9 MB instead of 19) + fashion-mnist (the four IDX files)
           (a tensor that fp16 would change beyond rounding, a filter's norm or a finite value turned inf,
           travels in fp32: EfficientNet-Lite0 has filters of norm ~2e-9, below fp16's range)
    llm-*  the SmolLM2 gguf (98 MB) cut in parts that fill the room the other bundles leave in their calls
           (then calls of their own); the last part comes with the part of reasoning-gym the tasks import
           (arithmetic/, algorithmic/, coaching/, top-level modules: <1 MB) and the `gguf` wheel (pure
           Python; not installed on the GPU machine)

All three studies: (1) text + llm-a, (2) image + llm-b, then the other llm- parts (their number follows the size of the
working tree, which travels with each call); `pack` prints the carry of each call.
`unpack` copies bundles into a folder outside the working tree (kept while the machine stays warm between
back-to-back calls), casts the fp16 weights back to fp32, joins the gguf once every part is there (checked
against the sha256 in manifest.json), and installs the wheel into --site (add it to PYTHONPATH). Set
FLATLORA_DATA to --to.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CALL_LIMIT = 64 * 2**20
RG_KEEP = ("arithmetic", "algorithmic", "coaching")


def _size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size


def _tree_size() -> int:
    """Bytes of what every call sends besides the carried paths (tracked + untracked, not ignored)."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, text=True).stdout
    return sum((ROOT / f).stat().st_size for f in out.split("\0") if f and (ROOT / f).is_file())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fp16_for_transfer(v):
    """v in fp16 for the trip, unless fp16 changes it beyond rounding: a finite value turned inf, or a row (an
    output filter; a 1-D tensor is one row) whose norm moves by more than fp16's rounding, as a filter of norm
    ~2e-9 does (fp16's smallest subnormal is 6e-8: it arrives as zeros). A few tiny entries flushed inside an
    ordinary row (MiniLM's embeddings have 7 of 11.7 M) move nothing. Such a tensor travels in its own dtype
    (fp32 for the models carried here; unpack casts every floating tensor to fp32)."""
    import torch

    if not v.is_floating_point() or v.dtype == torch.float16:
        return v
    h = v.half()
    if (torch.isinf(h) & torch.isfinite(v)).any():
        return v
    if v.numel() == 0:
        return h
    rows = (lambda t: t.double().reshape(t.shape[0] if t.dim() > 1 else 1, -1).norm(dim=1))
    before, after = rows(v), rows(h)
    if ((after - before).abs() > 2**-10 * before).any():
        return v
    return h


def _pack_text(data: Path, out: Path, fetch) -> None:
    """MiniLM folder with fp16 weights, the three VADER sentence sets."""
    from safetensors.torch import load_file, save_file

    mini = fetch.minilm_dir(data)
    dst = out / "text" / mini.relative_to(data)
    shutil.copytree(mini, dst, ignore=shutil.ignore_patterns("model.safetensors", "*.onnx", "*.h5", "*.msgpack", "*.bin"))
    save_file({k: _fp16_for_transfer(v) for k, v in load_file(str(mini / "model.safetensors")).items()},
              str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "CAST_FP16").write_text("model.safetensors was cast to fp16 for the transfer; `carry.py unpack` casts it back\n")
    shutil.copytree(fetch.vader_dir(data), out / "text" / "vader")


def _pack_image(data: Path, out: Path, fetch) -> None:
    """EfficientNet-Lite0 state dict in fp16, the four Fashion-MNIST IDX files."""
    import torch

    eff = fetch.effnet_file(data)
    dst = out / "image" / eff.relative_to(data)
    dst.parent.mkdir(parents=True)
    state = torch.load(eff, map_location="cpu", weights_only=True)
    torch.save({k: _fp16_for_transfer(v) for k, v in state.items()}, dst)
    (dst.parent / "CAST_FP16").write_text(dst.name + "\n")
    fm = fetch.fmnist_dir(data)
    dst = out / "image" / fm.relative_to(data)
    dst.mkdir(parents=True)
    for f in fetch.FMNIST_FILES:
        shutil.copy2(fm / f, dst / f)


def _pack_llm_extra(data: Path, dst: Path, fetch) -> None:
    """The part of reasoning-gym the tasks import, and the `gguf` wheel of the version that works here."""
    rg = fetch.gsm_dir(data).parent.parent  # .../reasoning_gym (the package folder)
    rg_dst = dst / rg.relative_to(data)
    for sub in RG_KEEP:
        shutil.copytree(rg / sub, rg_dst / sub, ignore=shutil.ignore_patterns("__pycache__"))
    for f in rg.glob("*.py"):
        shutil.copy2(f, rg_dst / f.name)
    (dst / "whl").mkdir()
    from importlib.metadata import version

    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(dst / "whl"),
                    f"gguf=={version('gguf')}"], check=True)


def split_sizes(total: int, extra: int, free: list[int], room: int) -> list[int]:
    """Byte sizes of the gguf parts: first the room `free` left in the other studies' calls, then calls of their
    own; the last part's call also holds `extra` bytes (reasoning-gym and the wheel).

    Example:
        >>> split_sizes(100, 5, [30, 20], 60)
        [30, 20, 50]
        >>> split_sizes(100, 5, [], 60)
        [60, 40]
    """
    parts, left = [], total
    for f in free:
        take = max(0, min(f, left))
        parts.append(take)
        left -= take
    while left > 0:
        if left + extra <= room:
            parts.append(left)
            return parts
        parts.append(min(room, left))
        left -= parts[-1]
    if not parts or parts[-1] + extra > room:
        parts.append(0)  # the extra files need a call of their own
    return parts


def pack(data: Path, out: Path, margin: int, studies: list[str]) -> list[list[str]]:
    """Build the bundles of `studies` in `out`; returns the bundles of each call."""
    sys.path.insert(0, str(ROOT / "src"))
    from flatlora.experiments import fetch

    need = {"text": "text", "image": "image", "llm": "math"}
    missing = [need[k] for k in studies if not fetch.status(data)[need[k]]]
    if missing:
        raise SystemExit(f"not fetched in {data}: {missing} (python -m flatlora.experiments.fetch {' '.join(missing)})")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    calls = []
    for name, fn in (("text", _pack_text), ("image", _pack_image)):
        if name in studies:
            fn(data, out, fetch)
            calls.append([name])
    tree = _tree_size()
    room = CALL_LIMIT - tree - margin
    if "llm" in studies:
        extra_dir = out / "llm-extra"
        _pack_llm_extra(data, extra_dir, fetch)
        g = fetch.smollm2_file(data)
        sizes = split_sizes(g.stat().st_size, _size(extra_dir), [room - _size(out / c[0]) for c in calls], room)
        names = [f"llm-{chr(ord('a') + i)}" for i in range(len(sizes))]
        rel = g.relative_to(data)
        with open(g, "rb") as f:
            for i, (name, n) in enumerate(zip(names, sizes)):
                part = out / name / rel.parent / f"{rel.name}.part{i}"
                part.parent.mkdir(parents=True, exist_ok=True)
                part.write_bytes(f.read(n))
        manifest = {"gguf": str(rel), "sha256": _sha256(g), "bytes": g.stat().st_size, "parts": len(sizes)}
        # reasoning-gym and the wheel ride with the last part (merged: both hold a pkgs/ folder)
        shutil.copytree(extra_dir, out / names[-1], dirs_exist_ok=True)
        shutil.rmtree(extra_dir)
        for i, name in enumerate(names):
            (out / name / "manifest.json").write_text(json.dumps(manifest, indent=1))
            if i < len(calls):
                calls[i].append(name)
            else:
                calls.append([name])
    sizes_mb = {p.name: _size(p) for p in sorted(out.iterdir())}
    for k, v in sizes_mb.items():
        print(f"{out.name}/{k:6s} {v / 1e6:7.1f} MB")
    for i, bundles in enumerate(calls, 1):
        mib = (sum(sizes_mb[b] for b in bundles) + tree) / 2**20
        if mib > CALL_LIMIT / 2**20:
            raise SystemExit(f"call {i} would carry {mib:.1f} MiB (limit 64): lower --margin-mb or carry less")
        print(f"call {i}: carry {', '.join(f'{out.name}/{b}' for b in bundles):34s} {mib:5.1f} MiB with the "
              f"{tree / 1e6:.1f} MB tree (limit 64)")
    return calls


def unpack(bundles: list[Path], to: Path, site: Path) -> None:
    import torch

    to.mkdir(parents=True, exist_ok=True)
    for b in bundles:
        if not b.is_dir():
            raise SystemExit(f"no bundle {b}: carry it in this call (carry=[\"{b}\"])")
        for f in b.rglob("*"):
            if f.is_file() and f.name != "manifest.json" and f.parent.name != "whl":
                d = to / f.relative_to(b)
                d.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, d)
        if (b / "manifest.json").exists():
            shutil.copy2(b / "manifest.json", to / "gguf_manifest.json")
        for whl in (b / "whl").glob("*.whl") if (b / "whl").is_dir() else []:
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                            "--target", str(site), str(whl)], check=True)
            print(f"installed {whl.name} into {site} (add it to PYTHONPATH)")
    for marker in to.rglob("CAST_FP16"):  # back to fp32, as the runs expect
        for st in marker.parent.glob("model.safetensors"):
            from safetensors.torch import load_file, save_file

            save_file({k: v.float() if v.is_floating_point() else v for k, v in load_file(str(st)).items()}, str(st),
                      metadata={"format": "pt"})
        for pth in marker.parent.glob("*.pth"):
            state = torch.load(pth, map_location="cpu", weights_only=True)
            torch.save({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, pth)
        marker.unlink()
        print(f"cast {marker.parent} back to fp32")
    man = to / "gguf_manifest.json"
    if man.exists():
        m = json.loads(man.read_text())
        target = to / m["gguf"]
        parts = [target.with_name(f"{target.name}.part{i}") for i in range(m["parts"])]
        if not target.exists() and all(p.exists() for p in parts):
            with open(target, "wb") as out:
                for p in parts:
                    out.write(p.read_bytes())
            if _sha256(target) != m["sha256"]:
                target.unlink()
                raise SystemExit("the joined gguf does not match its sha256: a part is damaged; carry the parts again")
            for p in parts:
                p.unlink()
            print(f"joined {target} ({m['bytes']} bytes, sha256 ok)")
        elif not target.exists():
            print(f"gguf: {sum(p.exists() for p in parts)}/{m['parts']} parts here; the LLM study needs all of them")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="carry.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="build the bundles here")
    p.add_argument("--data", default=None, help="fetched data (default: $FLATLORA_DATA or ./.data)")
    p.add_argument("--out", default=str(ROOT / ".carry"))
    p.add_argument("--margin-mb", type=float, default=6.0, help="room left in each call: the device refused a call this tool counted at 63.0 MiB (2026-12-02), so it measures the tree differently; 6 MB margin")
    p.add_argument("--studies", nargs="+", default=["text", "image", "llm"], choices=["text", "image", "llm"],
                   help="whose data to bundle (default all three)")
    u = sub.add_parser("unpack", help="on the GPU machine: install bundles into --to")
    u.add_argument("bundles", nargs="+")
    u.add_argument("--to", required=True)
    u.add_argument("--site", default="/tmp/site", help="where the gguf wheel is installed")
    args = ap.parse_args(argv)
    if args.cmd == "pack":
        sys.path.insert(0, str(ROOT / "src"))
        from flatlora.experiments.paths import data_root

        pack(Path(args.data) if args.data else data_root(), Path(args.out), int(args.margin_mb * 1e6), args.studies)
    else:
        unpack([Path(b) for b in args.bundles], Path(args.to), Path(args.site))
    return 0


if __name__ == "__main__":
    sys.exit(main())
