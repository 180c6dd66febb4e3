"""Bring the fetched data to the GPU machine in calls that carry at most 64 MiB each.

    python benchmarks/evidence/carry.py pack     # here: .carry/{text,image,llm-a,llm-b,llm-c}/ + sizes per call
    python benchmarks/evidence/carry.py unpack .carry/text .carry/llm-a --to /root/fldata     # there, every call

What travels (the rest of .data is not needed):
    text   pkgs/minilm (model.safetensors cast to fp16: 45 MB instead of 91) + vader/*_GroundTruth.txt
    image  pkgs/effnet (state dict cast to fp16: 9 MB instead of 19) + fashion-mnist (the four IDX files)
    llm-*  the SmolLM2 gguf (98 MB) cut in three parts that fill the room left in three calls, the part of
           reasoning-gym the tasks import (arithmetic/, algorithmic/, coaching/, top-level modules: <1 MB), and
           the `gguf` wheel (pure Python; not installed on the GPU machine)

The three calls: (1) text + llm-a, (2) image + llm-b, (3) llm-c. `unpack` copies a bundle into a folder
outside the working tree (kept while the machine stays warm between back-to-back calls), casts the fp16
weights back to fp32, joins the gguf once all three parts are there (checked against the sha256 in
manifest.json), and installs the wheel into /tmp/site (add it to PYTHONPATH). Set FLATLORA_DATA to --to.
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


def pack(data: Path, out: Path, margin: int) -> dict[str, int]:
    import torch
    from safetensors.torch import load_file, save_file

    sys.path.insert(0, str(ROOT / "src"))
    from flatlora.experiments import fetch

    shutil.rmtree(out, ignore_errors=True)
    missing = [k for k, ok in fetch.status(data).items() if k in ("text", "image", "math") and not ok]
    if missing:
        raise SystemExit(f"not fetched in {data}: {missing} (python -m flatlora.experiments.fetch {' '.join(missing)})")
    # text: MiniLM folder with fp16 weights, the three VADER sets
    mini = fetch.minilm_dir(data)
    dst = out / "text" / mini.relative_to(data)
    shutil.copytree(mini, dst, ignore=shutil.ignore_patterns("model.safetensors", "*.onnx", "*.h5", "*.msgpack", "*.bin"))
    save_file({k: v.half() if v.is_floating_point() else v for k, v in load_file(str(mini / "model.safetensors")).items()},
              str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "CAST_FP16").write_text("model.safetensors was cast to fp16 for the transfer; `carry.py unpack` casts it back\n")
    shutil.copytree(fetch.vader_dir(data), out / "text" / "vader")
    # image: EfficientNet-Lite0 state dict in fp16, Fashion-MNIST IDX files
    eff = fetch.effnet_file(data)
    dst = out / "image" / eff.relative_to(data)
    dst.parent.mkdir(parents=True)
    state = torch.load(eff, map_location="cpu", weights_only=True)
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, dst)
    (dst.parent / "CAST_FP16").write_text(dst.name + "\n")
    fm = fetch.fmnist_dir(data)
    dst = out / "image" / fm.relative_to(data)
    dst.mkdir(parents=True)
    for f in fetch.FMNIST_FILES:
        shutil.copy2(fm / f, dst / f)
    # llm: reasoning-gym subset, gguf wheel, gguf in three parts
    rg = fetch.gsm_dir(data).parent.parent  # .../reasoning_gym (the package folder)
    c = out / "llm-c"
    rg_dst = c / rg.relative_to(data)
    for sub in RG_KEEP:
        shutil.copytree(rg / sub, rg_dst / sub, ignore=shutil.ignore_patterns("__pycache__"))
    for f in rg.glob("*.py"):
        shutil.copy2(f, rg_dst / f.name)
    (c / "whl").mkdir()
    import gguf as _gguf  # the version that works here

    version = getattr(_gguf, "__version__", None) or __import__("importlib.metadata").metadata.version("gguf")
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(c / "whl"),
                    f"gguf=={version}"], check=True)
    g = fetch.smollm2_file(data)
    tree = _tree_size()
    room = CALL_LIMIT - tree - margin
    sizes_a = room - _size(out / "text")
    sizes_b = room - _size(out / "image")
    total = g.stat().st_size
    cuts = [0, sizes_a, sizes_a + sizes_b, total]
    if sizes_a <= 0 or sizes_b <= 0 or total - cuts[2] + _size(c) > room:
        raise SystemExit(f"the data does not fit three calls of {CALL_LIMIT} bytes with a {tree}-byte tree")
    rel = g.relative_to(data)
    with open(g, "rb") as f:
        for i, name in enumerate(("llm-a", "llm-b", "llm-c")):
            part = out / name / rel.parent / f"{rel.name}.part{i}"
            part.parent.mkdir(parents=True, exist_ok=True)
            part.write_bytes(f.read(cuts[i + 1] - cuts[i]))
    manifest = {"gguf": str(rel), "sha256": _sha256(g), "bytes": total, "parts": 3}
    for name in ("llm-a", "llm-b", "llm-c"):
        (out / name / "manifest.json").write_text(json.dumps(manifest, indent=1))
    sizes = {name: _size(out / name) for name in ("text", "image", "llm-a", "llm-b", "llm-c")}
    calls = {"call 1 (text + llm-a)": sizes["text"] + sizes["llm-a"], "call 2 (image + llm-b)": sizes["image"] + sizes["llm-b"],
             "call 3 (llm-c)": sizes["llm-c"]}
    for k, v in sizes.items():
        print(f"{out.name}/{k:6s} {v / 1e6:7.1f} MB")
    for k, v in calls.items():
        print(f"{k:24s} {(v + tree) / 2**20:6.1f} MiB with the {tree / 1e6:.1f} MB tree (limit 64 MiB)")
    return sizes


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
            print(f"gguf: {sum(p.exists() for p in parts)}/{m['parts']} parts here; the LLM study needs all three")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="carry.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="build the bundles here")
    p.add_argument("--data", default=None, help="fetched data (default: $FLATLORA_DATA or ./.data)")
    p.add_argument("--out", default=str(ROOT / ".carry"))
    p.add_argument("--margin-mb", type=float, default=1.0, help="room left in each call for files made meanwhile")
    u = sub.add_parser("unpack", help="on the GPU machine: install bundles into --to")
    u.add_argument("bundles", nargs="+")
    u.add_argument("--to", required=True)
    u.add_argument("--site", default="/tmp/site", help="where the gguf wheel is installed")
    args = ap.parse_args(argv)
    if args.cmd == "pack":
        sys.path.insert(0, str(ROOT / "src"))
        from flatlora.experiments.paths import data_root

        pack(Path(args.data) if args.data else data_root(), Path(args.out), int(args.margin_mb * 1e6))
    else:
        unpack([Path(b) for b in args.bundles], Path(args.to), Path(args.site))
    return 0


if __name__ == "__main__":
    sys.exit(main())
