"""Loss landscapes of the merged weights W' = W + s·B·A, along filter-normalised random directions.

Flat-LoRA's claim is about the full weight space: a minimum that looks flat in the LoRA subspace (A, B)
can be sharp in the space of W' (paper Fig. 1). So every probe here moves W', never A or B:

    L(α, β) = L(W' + α·d₁ + β·d₂),    d_k = (row-rescaled) Gaussian, one block per targeted layer

with Li et al. (2018) filter normalisation: each row (filter; output unit / output channel, flattened
over the kernel for convolutions) of d is rescaled to the norm of the same row of W',

    d_i ← d_i · ‖W'_i‖ / ‖d_i‖,

so a step α = 0.5 moves every filter by half its own norm whatever its scale, and two models can be
compared on one axis. W' enters the loss only through W + sBA, so adding d to the frozen base weight
with the adapter left active *is* the move of W' by d (for DoRA, d moves the W inside W + sBA, before
the magnitude normalisation: the same place the Flat-LoRA engine puts its noise).

Exactness: every write goes through `WeightSpace.shifted()`, which keeps a copy of each touched weight
and sets  W ← round(W₀ + δ)  from that copy at every point (so grid points never accumulate rounding),
then copies W₀ back. The model is bit-identical afterwards in every dtype, bf16 included, where
add-then-subtract would not be. The copy costs one weight-sized buffer per block: fine for analysis,
which is not the training hot path.

Randomness: block ℓ of direction k is drawn from a private `torch.Generator` keyed by
(seed, k, hash of the layer's name) through `flatlora.rng.noise_key`, so the same seed gives the same
directions, layers of equal shape get different ones, and adding a layer never changes another's.
Torch's global RNG is never touched.

Reference: H. Li, Z. Xu, G. Taylor, C. Studer, T. Goldstein, "Visualizing the Loss Landscape of Neural
Nets", NeurIPS 2018; T. Li et al., "Flat-LoRA", ICML 2025 (arXiv:2409.14396), Fig. 3 / v2 Fig. 6.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from ..core.targets import Target, find_targets
from ..rng import layer_id, noise_key

LossFn = Callable[[nn.Module], torch.Tensor]
MetricFn = Callable[[nn.Module], "float | torch.Tensor"]
Direction = list  # list[torch.Tensor]: one float32 (m, n) block per WeightSpace block, in logical layout

SCOPES = ("lora", "matrices", "all")
# PEFT's own trainable tensors: part of W' through get_delta_weight, never perturbed themselves.
_ADAPTER_KEYS = ("lora_A", "lora_B", "lora_E", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector",
                 "ranknum", "original_module")


@dataclass
class Block:
    """One perturbed weight seen as an (m, n) matrix of m filters.

    `param` is the tensor that is written (the base weight of a LoRA layer, or a plain parameter);
    `target` describes a LoRA-targeted layer (None for the other weights of scope 'matrices'/'all').
    """

    name: str
    param: torch.Tensor
    target: Target | None
    m: int
    n: int

    def as_matrix(self, w: torch.Tensor) -> torch.Tensor:
        if self.target is not None:
            return self.target.as_matrix(w)
        return w.reshape(self.m, self.n)

    def to_storage(self, mat: torch.Tensor) -> torch.Tensor:
        """Logical (m, n) -> the storage shape of `param` (a transposed view for fan_in_fan_out)."""
        if self.target is not None and self.target.transposed:
            return mat.t()
        return mat.reshape(self.param.shape)

    @torch.no_grad()
    def merged(self) -> torch.Tensor:
        """W' = W + Σ_active s·B·A as a float32 (m, n) matrix (W alone for plain parameters)."""
        w = self.as_matrix(self.param).float()
        if self.target is None:
            return w.clone()
        out = w.clone()
        fac, dense = self.target.terms()
        if fac is not None:
            b, a, s = fac
            out += (b.float().to(out.device) * s) @ a.float().to(out.device)
        if dense is not None:
            out += dense.to(out.device)
        return out


class WeightSpace:
    """The merged weights an analysis moves, and the exact way to move them.

    Build it with `create_weight_space(model, scope=...)`. Directions are plain lists of float32 (m, n)
    tensors, one per block, so they add, scale and dot like vectors (`combine`, `dot`, `norm`).
    """

    def __init__(self, model: nn.Module, blocks: list[Block], scope: str, skipped: dict[str, str]):
        if not blocks:
            raise ValueError(f"no weights to analyse in scope {scope!r} of {type(model).__name__}")
        self.model = model
        self.blocks = blocks
        self.scope = scope
        self.skipped = skipped

    def __len__(self) -> int:
        return len(self.blocks)

    @property
    def numel(self) -> int:
        return sum(b.m * b.n for b in self.blocks)

    def merged(self) -> Direction:
        """W' of every block (float32, logical layout)."""
        return [b.merged() for b in self.blocks]

    def row_norms(self) -> list[torch.Tensor]:
        """‖W'_i‖ per block (float32 m-vectors)."""
        return [w.norm(dim=1) for w in self.merged()]

    # ------------------------------------------------------------------ directions
    def gaussian(self, seed: int, index: int = 0) -> Direction:
        """Standard normal blocks, block ℓ drawn from its own generator keyed by (seed, index, name of ℓ)."""
        out = []
        for b in self.blocks:
            gen = torch.Generator(device=b.param.device).manual_seed(noise_key(seed, index, layer_id(b.name)))
            out.append(torch.randn((b.m, b.n), generator=gen, device=b.param.device, dtype=torch.float32))
        return out

    def random_direction(self, seed: int = 0, index: int = 0) -> Direction:
        """A filter-normalised random direction (Li et al. 2018): ‖d_i‖ = ‖W'_i‖ for every row of every block.

        Rows of W' that are exactly zero get a zero direction (as in Li et al.)."""
        d = self.gaussian(seed, index)
        for di, wn in zip(d, self.row_norms()):
            di.mul_((wn / di.norm(dim=1).clamp_min(1e-12)).unsqueeze(1))
        return d

    def flat_lora_noise(self, sigma: float, seed: int = 0, index: int = 0) -> Direction:
        """One draw of Flat-LoRA's noise: ε_ij ~ N(0, σ²‖W'_i‖²/n) (paper v1 Eq. 11 / v2 Eq. 7)."""
        d = self.gaussian(seed, index)
        for di, wn, b in zip(d, self.row_norms(), self.blocks):
            di.mul_((sigma * wn / math.sqrt(b.n)).unsqueeze(1))
        return d

    # ------------------------------------------------------------------ moving W' exactly
    @contextlib.contextmanager
    def shifted(self) -> Iterator["Shifter"]:
        """Context in which `shifter.set(delta)` makes every block W₀ + δ; W₀ is restored bit for bit on exit."""
        shifter = Shifter(self)
        try:
            yield shifter
        finally:
            shifter.restore()

    # ------------------------------------------------------------------ gradients w.r.t. W'
    def grad(self, loss_fn: LossFn, create_graph: bool = False) -> tuple[torch.Tensor, Direction]:
        """(loss, ∂L/∂W') with W' at its current value. ∂L/∂W' = ∂L/∂W because W' = W + sBA.

        Gradients go to the base weights through `torch.autograd.grad`, so no `.grad` of the model is
        touched; the base weights' `requires_grad` flags are set for the call and put back after."""
        with requires_grad(self):
            loss = loss_fn(self.model)
            grads = torch.autograd.grad(loss, [b.param for b in self.blocks], create_graph=create_graph,
                                        allow_unused=True)
        out = []
        for b, g in zip(self.blocks, grads):
            g = torch.zeros_like(b.param) if g is None else g
            out.append(b.as_matrix(g) if create_graph else b.as_matrix(g).float())
        return loss, out


class Shifter:
    """Writes W₀ + δ into the blocks of a WeightSpace from a pristine copy; `restore` puts W₀ back bit for bit."""

    def __init__(self, space: WeightSpace):
        self.space = space
        with torch.no_grad():
            self._orig = [b.param.detach().clone() for b in space.blocks]
        self._dirty = False

    @torch.no_grad()
    def set(self, delta: Direction | None) -> None:
        """Every block ← round(W₀ + δ) in its storage dtype (δ = None: back to W₀)."""
        for b, w0, d in zip(self.space.blocks, self._orig, delta if delta is not None else [None] * len(self._orig)):
            if d is None:
                b.param.copy_(w0)
            else:
                b.param.copy_((w0.float() + b.to_storage(d.to(w0.device))).to(w0.dtype))
        self._dirty = delta is not None

    @torch.no_grad()
    def restore(self) -> None:
        for b, w0 in zip(self.space.blocks, self._orig):
            b.param.copy_(w0)
        self._dirty = False


# ---------------------------------------------------------------------- vector helpers on directions
def combine(coeffs: Sequence[float], directions: Sequence[Direction]) -> Direction:
    """Σ_k c_k · d_k, blockwise."""
    out = [torch.zeros_like(t) for t in directions[0]]
    for c, d in zip(coeffs, directions):
        if c:
            for o, t in zip(out, d):
                o.add_(t, alpha=float(c))
    return out


def dot(a: Direction, b: Direction) -> torch.Tensor:
    return sum((x.double() * y.double()).sum() for x, y in zip(a, b))


def norm(a: Direction) -> torch.Tensor:
    return dot(a, a).sqrt()


# ---------------------------------------------------------------------- building a space
def create_weight_space(model: nn.Module, scope: str = "lora", include=None, exclude=None) -> WeightSpace:
    """The weights an analysis perturbs.

    Args:
        scope: "lora" — the merged weights W + sBA of the PEFT LoRA-targeted layers (the paper's Fig. 3);
            "matrices" — those plus every other floating parameter with dim ≥ 2 (heads, embeddings;
            convolutions as out_channels × rest); "all" — also the 1-D ones (biases, norms), each taken as
            a single filter, so its direction has the parameter's own norm. Adapter tensors (lora_A/B/E,
            DoRA magnitudes) are never moved: they are inside W'. For a model without LoRA layers,
            "lora" falls back to its plain Linear/Conv weights (full fine-tuning).
        include, exclude: fnmatch patterns on module names for the LoRA-targeted layers.

    Example:
        >>> space = create_weight_space(nn.Sequential(nn.Linear(3, 2)), scope="lora")
        >>> [(b.name, b.m, b.n) for b in space.blocks]
        [('0', 2, 3)]
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    try:
        targets, skipped = find_targets(model, "lora", include, exclude)
    except ValueError:
        targets, skipped = find_targets(model, "linear", include, exclude)
    blocks, seen = [], set()
    for t in targets:
        if t.quantized:
            raise ValueError(f"{t.name}: quantized base weights cannot be moved exactly in place; "
                             "dequantize the model (or load it in bf16/fp32) for the analysis")
        blocks.append(Block(t.name, t.weight, t, t.m, t.n))
        seen.add(t.weight.data_ptr())
    if scope != "lora":
        for name, p in model.named_parameters():
            if (not p.is_floating_point() or p.data_ptr() in seen
                    or any(f".{k}." in f".{name}." for k in _ADAPTER_KEYS)):
                continue
            if p.dim() >= 2:
                blocks.append(Block(name, p, None, p.shape[0], p[0].numel()))
            elif scope == "all" and p.numel() > 0:
                blocks.append(Block(name, p, None, 1, p.numel()))
            else:
                continue
            seen.add(p.data_ptr())  # tied weights are moved once
    return WeightSpace(model, blocks, scope, skipped)


# ---------------------------------------------------------------------- model state helpers
@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """model.eval() inside; every module's own train/eval flag restored after (not just the root's)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, t in flags:
            m.training = t


@contextlib.contextmanager
def requires_grad(space: WeightSpace) -> Iterator[None]:
    """Base weights of `space` require grad inside (full-space gradients); flags restored after."""
    flags = [b.param.requires_grad for b in space.blocks]
    try:
        for b in space.blocks:
            b.param.requires_grad_(True)
        yield
    finally:
        for b, f in zip(space.blocks, flags):
            b.param.requires_grad_(f)


def mean_over(batches: Iterable[Any], fn: Callable[[nn.Module, Any], Any]) -> Callable[[nn.Module], torch.Tensor]:
    """A closure `model -> mean of fn(model, batch)` over a fixed list of batches (equal weights).

    Example:
        >>> loss_fn = mean_over([(torch.ones(2, 3), torch.zeros(2, 2))],
        ...                     lambda m, b: ((m(b[0]) - b[1]) ** 2).mean())
    """
    batches = list(batches)
    if not batches:
        raise ValueError("mean_over needs at least one batch")

    def closure(model: nn.Module) -> torch.Tensor:
        total = None
        for b in batches:
            v = fn(model, b)
            v = v if isinstance(v, torch.Tensor) else torch.tensor(float(v))
            total = v if total is None else total + v
        return total / len(batches)

    return closure


def _value(x) -> float:
    return float(x.detach().float().item()) if isinstance(x, torch.Tensor) else float(x)


@torch.no_grad()
def _evaluate(model, loss_fn: LossFn, metric_fn: MetricFn | None) -> tuple[float, float | None]:
    out = loss_fn(model)
    if isinstance(out, (tuple, list)) or (isinstance(out, torch.Tensor) and out.numel() == 2):
        return _value(out[0]), _value(out[1])  # (loss, metric) from one forward pass
    return _value(out), (None if metric_fn is None else _value(metric_fn(model)))


# ---------------------------------------------------------------------- surfaces
@dataclass
class LandscapeResult:
    """Loss (and metric) on a 1-D or 2-D grid of coefficients along random directions of W'.

    `axes` holds one list of coefficients per direction; `loss[i][j]` is at (axes[0][i], axes[1][j]).
    """

    axes: list[list[float]]
    loss: list
    metric: list | None
    center_loss: float
    center_metric: float | None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def dims(self) -> int:
        return len(self.axes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LandscapeResult":
        return cls(**d)

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))


def _grid(span: float | tuple[float, float], steps: int) -> list[float]:
    lo, hi = (-span, span) if isinstance(span, (int, float)) else span
    if steps < 2:
        raise ValueError(f"steps must be >= 2, got {steps}")
    return [lo + (hi - lo) * i / (steps - 1) for i in range(steps)]


def loss_landscape(model: nn.Module, loss_fn: LossFn, *, metric_fn: MetricFn | None = None, dims: int = 2,
                   steps: int = 11, span: float | tuple[float, float] = 0.5, seed: int = 0, scope: str = "lora",
                   directions: Sequence[Direction] | None = None, space: WeightSpace | None = None,
                   progress: Callable[[int, int], None] | None = None) -> LandscapeResult:
    """L(W' + Σ_k α_k d_k) on a `steps`^dims grid over [−span, span]^dims (paper: 11×11 over [−0.5, 0.5]).

    The model is evaluated in eval mode under no_grad (train/eval flags restored after) and is
    bit-identical on return, also when `loss_fn` raises.

    Args:
        loss_fn: the user's closure `model -> scalar loss` over a fixed evaluation set (see `mean_over`);
            it may return (loss, metric) — or a 2-element tensor — to get both from one forward pass.
        metric_fn: optional closure `model -> accuracy` (or any scalar), evaluated at the same points.
        dims: 1 (a curve) or 2 (a surface).
        seed: seed of the filter-normalised directions (`WeightSpace.random_direction(seed, k)`).
        directions: explicit directions instead of random ones (one per dim, blocks as in `space`).
        progress: called as progress(done, total) after each point.

    Returns:
        LandscapeResult with loss[i] (1-D) or loss[i][j] (2-D).

    Example:
        >>> net = nn.Linear(3, 1)
        >>> x = torch.ones(4, 3)
        >>> res = loss_landscape(net, lambda m: m(x).pow(2).mean(), dims=1, steps=5)
        >>> len(res.loss)
        5
    """
    if dims not in (1, 2):
        raise ValueError(f"dims must be 1 or 2, got {dims}")
    space = space or create_weight_space(model, scope=scope)
    random = directions is None
    if random:
        directions = [space.random_direction(seed, k) for k in range(dims)]
    if len(directions) != dims:
        raise ValueError(f"need {dims} directions, got {len(directions)}")
    axes = [_grid(span, steps) for _ in range(dims)]
    points = [(a,) for a in axes[0]] if dims == 1 else [(a, b) for a in axes[0] for b in axes[1]]
    losses, metrics = [], []
    with eval_mode(model), space.shifted() as sh:
        center = _evaluate(model, loss_fn, metric_fn)
        for i, coeffs in enumerate(points):
            sh.set(combine(coeffs, directions))
            l, m = _evaluate(model, loss_fn, metric_fn)
            losses.append(l)
            metrics.append(m)
            if progress:
                progress(i + 1, len(points))
    if dims == 2:
        losses = [losses[i * steps:(i + 1) * steps] for i in range(steps)]
        metrics = [metrics[i * steps:(i + 1) * steps] for i in range(steps)]
    meta = {"scope": space.scope, "seed": seed, "blocks": len(space), "numel": space.numel,
            "normalisation": "filter (Li et al. 2018): ||d_i|| = ||W'_i|| per row",
            "random_directions": random}
    has_metric = center[1] is not None
    return LandscapeResult(axes, losses, metrics if has_metric else None, center[0], center[1], meta)
