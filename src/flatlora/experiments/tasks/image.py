"""Image classification: Fashion-MNIST on EfficientNet-Lite0 (offline), your own image folder, CIFAR (hub).

Images are kept as uint8 at their stored size and resized per batch (bilinear, antialiased) to
`resolution`, grey images repeated to 3 channels, then normalised the way the backbone was trained
(EfficientNet-Lite: mean = std = 0.5; CLIP: its own constants). On EfficientNet-Lite0 LoRA goes on the
1x1 convolutions (expand, project, head conv; a LoRA "filter" is then an output channel) and the new
classifier is trained in full. BatchNorm models get their running statistics recomputed from clean
forward passes after training, for every method (the runner; Flat-LoRA's engine freezes them while the
noise is on, bn_policy='auto').
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..models import ModelRef, hub_error, resolve_model, tiny_config
from . import hub, register_task
from .base import Task, fingerprint, require_nonempty, stratified_split, stratified_subsample
from .text import check_labels

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
_CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


class VisionClassifier(nn.Module):
    """A HF vision backbone (pooled output) + a linear `classifier` head."""

    def __init__(self, backbone: nn.Module, hidden: int, num_labels: int):
        super().__init__()
        self.backbone = backbone
        self.classifier = nn.Linear(hidden, num_labels)

    def forward(self, pixel_values):
        return self.classifier(self.backbone(pixel_values=pixel_values).pooler_output)


def build_image_model(ref: ModelRef, num_labels: int) -> tuple[nn.Module, tuple, tuple, Any, Any]:
    """(model, mean, std, LoRA targets, modules trained in full) for an image model reference."""
    from ..models.efficientnet_lite import EfficientNetLite0, load_efficientnet_lite0

    if ref.name in ("efficientnet-lite0", "tiny-effnet"):
        model = load_efficientnet_lite0(ref.path if ref.kind == "fetched" else None, num_labels) \
            if ref.kind == "fetched" else EfficientNetLite0(num_labels)
        return model, (0.5,) * 3, (0.5,) * 3, model.pointwise_convs(), ["_fc"]
    from transformers import CLIPVisionModel

    if ref.kind == "tiny":
        cfg = tiny_config(ref.name)
        backbone = CLIPVisionModel(cfg)
    else:
        try:
            backbone = CLIPVisionModel.from_pretrained(ref.path)
        except OSError as e:
            raise hub_error(ref, e) from e
        except ValueError as e:  # not a CLIP checkpoint
            raise ValueError(f"image model {ref.name!r}: only EfficientNet-Lite0 and CLIP vision models are "
                             f"supported for image tasks ({e})") from None
    hidden = backbone.config.hidden_size
    return VisionClassifier(backbone, hidden, num_labels), CLIP_MEAN, CLIP_STD, _CLIP_TARGETS, ["classifier"]


class ImageClassificationTask(Task):
    def __init__(self, name: str, train: tuple[torch.Tensor, torch.Tensor], evals: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 num_labels: int, model: str, resolution: int, info: dict[str, Any] | None = None,
                 ids: dict[str, list] | None = None):
        require_nonempty(name, {"train": train[1], **{k: v[1] for k, v in evals.items()}})
        check_labels(name, train[1].tolist() + [y for v in evals.values() for y in v[1].tolist()], num_labels)
        self.name, self.num_labels, self.resolution = name, num_labels, resolution
        self.ref = resolve_model(model)
        self.train_x, self.train_y = train
        self.evals = evals
        self.primary_metric = "test/accuracy" if "test" in evals else f"{next(iter(evals))}/accuracy"
        self.info, self.ids = info or {}, ids or {}
        self.mean = self.std = None

    def build_model(self) -> nn.Module:
        model, self.mean, self.std, self.default_targets, self.default_modules_to_save = build_image_model(self.ref, self.num_labels)
        if self.ref.kind == "tiny" and self.ref.name == "tiny-clip":
            self.resolution = model.backbone.config.image_size  # a position table of fixed size
        return model.train()

    def num_train(self) -> int:
        return len(self.train_y)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W) or (N, H, W, C) -> normalised float (N, 3, R, R)."""
        x = x.float().div_(255)
        x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
        if x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False, antialias=True)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        mean = torch.tensor(self.mean or (0.5,) * 3).view(1, 3, 1, 1)
        std = torch.tensor(self.std or (0.5,) * 3).view(1, 3, 1, 1)
        return (x - mean) / std

    def collate(self, indices: Sequence[int]):
        idx = torch.as_tensor(list(indices))
        return self.prepare(self.train_x[idx]), self.train_y[idx]

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x).float(), y)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batch_size: int) -> dict[str, float]:
        device = next(model.parameters()).device
        out = {}
        for split, (x, y) in self.evals.items():
            correct = 0
            for i in range(0, len(y), batch_size):
                pred = model(self.prepare(x[i:i + batch_size]).to(device)).argmax(-1).cpu()
                correct += int((pred == y[i:i + batch_size]).sum())
            out[f"{split}/accuracy"] = correct / len(y)
        return out

    def describe(self) -> dict[str, Any]:
        return {"model": self.ref.name, "num_labels": self.num_labels, "resolution": self.resolution,
                "sizes": {"train": len(self.train_y), **{k: len(v[1]) for k, v in self.evals.items()}},
                "fingerprints": {k: fingerprint(v) for k, v in self.ids.items()}, **self.info}

    def split_record(self) -> dict[str, list]:
        return self.ids


# ---------------------------------------------------------------------- Fashion-MNIST (Debian package)
def read_idx(path: Path) -> torch.Tensor:
    """An IDX file (gzip): magic 0x00000803 images / 0x00000801 labels, big-endian sizes, uint8 data."""
    import numpy as np

    raw = gzip.open(path).read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: IDX header says {dims} but holds {data.size} values")
    return torch.from_numpy(data.reshape(dims).copy())


@register_task("fashion-mnist", "Fashion-MNIST (10 classes, official test set) on ImageNet EfficientNet-Lite0, "
               "LoRA on the 1x1 convs; seeded stratified train subset", default_model="efficientnet-lite0", requires="image")
def fashion_mnist(*, model: str, train_size: int | None = 10000, test_size: int | None = None, resolution: int = 64,
                  split_seed: int = 0, dev_size: int | None = None) -> Task:
    from ..fetch import fmnist_dir
    from ..paths import fetch_hint

    d = fmnist_dir()
    if d is None:
        raise ValueError(f"task 'fashion-mnist' needs the Fashion-MNIST files: {fetch_hint('image')}")
    xtr, ytr = read_idx(d / "train-images-idx3-ubyte.gz"), read_idx(d / "train-labels-idx1-ubyte.gz").long()
    xte, yte = read_idx(d / "t10k-images-idx3-ubyte.gz"), read_idx(d / "t10k-labels-idx1-ubyte.gz").long()
    tr = stratified_subsample(list(range(len(ytr))), ytr.tolist(), train_size, split_seed)
    te = stratified_subsample(list(range(len(yte))), yte.tolist(), test_size, split_seed)
    evals, ids = {"test": (xte[te], yte[te])}, {"train": tr, "test": te}
    if dev_size:  # dev: training images outside the train subset (for choosing recipes; test stays untouched)
        taken = set(tr)
        rest = [i for i in range(len(ytr)) if i not in taken]
        if dev_size > len(rest):
            raise ValueError(f"task_args.dev_size={dev_size} but only {len(rest)} training images are outside train_size")
        dv = stratified_subsample(rest, ytr.tolist(), dev_size, split_seed + 1)
        evals["dev"], ids["dev"] = (xtr[dv], ytr[dv]), dv
    info = {"source": "Fashion-MNIST (Zalando, Debian dataset-fashion-mnist)", "split_seed": split_seed}
    return ImageClassificationTask("fashion-mnist", (xtr[tr], ytr[tr]), evals, 10, model, resolution, info, ids=ids)


# ---------------------------------------------------------------------- bring your own image folder
def read_image_folder(root: str | Path, resolution: int, classes: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor, list[str], list[str]]:
    """`root/<class>/<image>` -> (uint8 images (N, R, R, 3), labels, class names, file ids).

    Hidden entries (`.name`, e.g. `.ipynb_checkpoints/`) are ignored; a class folder without images is an
    error naming it, and so are fewer than 2 classes (a 1-class head would learn nothing).
    """
    import numpy as np
    from PIL import Image

    root = Path(root).expanduser()
    if not root.is_dir():
        raise ValueError(f"image folder {str(root)!r} does not exist")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not found:
        raise ValueError(f"image folder {str(root)!r} has no class sub-folders (expected {root}/<class>/<image>.png)")
    files = {c: sorted(p for p in (root / c).iterdir()
                       if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)
             for c in found}
    empty = [c for c in found if not files[c]]
    if empty:
        raise ValueError(f"image folder {str(root)!r}: class folder(s) {empty} hold no images "
                         f"({', '.join(IMAGE_SUFFIXES)}); add images or remove the folder(s)")
    if classes is None:
        if len(found) < 2:
            raise ValueError(f"image folder {str(root)!r} has {len(found)} class folder ({found[0]!r}); "
                             "classification needs at least 2, one sub-folder per class")
        classes = found
    extra = sorted(set(found) - set(classes))
    if extra:
        raise ValueError(f"{root} has classes {extra} that the training folder does not have ({classes})")
    xs, ys, ids = [], [], []
    for label, c in enumerate(classes):
        for f in files.get(c, []):
            try:
                with Image.open(f) as im:
                    im = im.convert("RGB").resize((resolution, resolution), Image.BICUBIC)
                    xs.append(np.asarray(im, dtype=np.uint8))
            except Exception as e:  # noqa: BLE001  (PIL raises many types for a bad file)
                raise ValueError(f"cannot read image {f}: {e}") from None
            ys.append(label)
            ids.append(f"{c}/{f.name}")
    return torch.from_numpy(np.stack(xs)), torch.tensor(ys), classes, ids


@register_task("image-folder", "your images: task_args.path = folder of <class>/<image> (+ test_path or a seeded "
               "split)", default_model="efficientnet-lite0")
def image_folder(*, model: str, path: str | None = None, test_path: str | None = None, resolution: int = 64,
                 test_fraction: float = 0.2, split_seed: int = 0, train_size: int | None = None) -> Task:
    if path is None:
        raise ValueError("task 'image-folder' needs task_args.path: a folder with one sub-folder of images per class")
    x, y, classes, ids = read_image_folder(path, resolution)
    if test_path:
        xte, yte, _, ids_te = read_image_folder(test_path, resolution, classes)
        tr = list(range(len(y)))
    else:
        tr, te = stratified_split(y.tolist(), [1 - test_fraction, test_fraction], split_seed)
        xte, yte, ids_te = x[te], y[te], [ids[i] for i in te]
    tr = stratified_subsample(tr, y.tolist(), train_size, split_seed)
    return ImageClassificationTask("image-folder", (x[tr], y[tr]), {"test": (xte, yte)}, len(classes), model, resolution,
                                   {"path": str(path), "classes": classes, "split_seed": split_seed},
                                   ids={"train": [ids[i] for i in tr], "test": ids_te})


# ---------------------------------------------------------------------- CIFAR (hub), the paper's CLIP protocol
def _hub_images(dataset: str, image_col: str, label_col: str, num_labels: int, name: str):
    def factory(*, model: str, resolution: int = 224, train_size: int | None = None, split_seed: int = 0) -> Task:
        import numpy as np

        def load(split: str):
            rows = hub.load_hub_dataset(dataset, None, split)
            x = torch.from_numpy(np.stack([np.asarray(r[image_col].convert("RGB"), dtype=np.uint8) for r in rows]))
            return x, torch.tensor([int(r[label_col]) for r in rows])

        xtr, ytr = load("train")
        tr = stratified_subsample(list(range(len(ytr))), ytr.tolist(), train_size, split_seed)
        xte, yte = load("test")
        return ImageClassificationTask(name, (xtr[tr], ytr[tr]), {"test": (xte, yte)}, num_labels, model, resolution,
                                       {"source": dataset}, ids={"train": tr})

    return factory


register_task("cifar10", "CIFAR-10 (hub), the paper's CLIP ViT-B/32 protocol", default_model="openai/clip-vit-base-patch32",
              requires="hub")(_hub_images("uoft-cs/cifar10", "img", "label", 10, "cifar10"))
register_task("cifar100", "CIFAR-100 (hub), the paper's CLIP ViT-B/32 protocol", default_model="openai/clip-vit-base-patch32",
              requires="hub")(_hub_images("uoft-cs/cifar100", "img", "fine_label", 100, "cifar100"))
