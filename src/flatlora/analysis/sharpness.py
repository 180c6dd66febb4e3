"""Sharpness of the merged weights W' = W + s·B·A: three numbers, all in the full weight space.

(a) Expected sharpness under Flat-LoRA's own noise, the quantity the method minimises (v2 Eq. 6):

        S_σ = E_ε L(W' + ε) − L(W'),     ε_ij ~ N(0, σ² ‖W'_i‖² / n)

    Monte Carlo over `n_samples` draws; mean ± half-width of a 95 % t-interval. Draw k uses the same
    standard normals for every σ and, for one seed, for every model (blocks are keyed by layer name), so
    differences between σ's or between LoRA and Flat-LoRA runs are paired (common random numbers).

(b) Worst-case sharpness in a ρ-ball, SAM's inner maximisation (v1 Eq. 9 / v2 Eq. 5):

        S_ρ = max_{δ ∈ B_ρ} L(W' + δ) − L(W')

    approximated from below by `steps` projected ascent steps from δ = 0 (one step is SAM's ε):
    δ ← Π_B(δ + η · r ⊙ ĝ), η = 2.5 ρ / steps (Madry et al.'s PGD rule), and the largest loss over
    the iterates is reported. Two balls, both relative to W' so that models of different scale compare:
      ball="filter" (default): ‖δ_i‖ ≤ ρ ‖W'_i‖ for every row i of every block; ĝ_i = g_i / ‖g_i‖ and
          r_i = ‖W'_i‖ — the geometry of the filter-normalised directions and of Flat-LoRA's noise;
      ball="global": ‖δ‖ ≤ ρ ‖W'‖ over all blocks together (SAM's Frobenius ball); ĝ = g / ‖g‖, r = ‖W'‖.

(c) Curvature of L w.r.t. W': the top eigenvalue of ∇²L by power iteration (it converges to the
    eigenvalue of largest magnitude, reported with its sign) and tr ∇²L by Hutchinson's estimator
    E_z[zᵀ ∇²L z] with Rademacher z (mean ± 95 % t-interval), both from Hessian-vector products.
    Because W' = W + sBA, ∇²_{W'} L = ∇²_W L with the adapter active: the products are taken w.r.t.
    the frozen base weights, whose `requires_grad` is switched on for the call and restored after.
    Tools that pick parameters by `requires_grad` (PyHessian) would measure the LoRA subspace instead.

Why the Hessian-vector products are written here rather than taken from curvlinops-for-pytorch 3.0.1
(checked in this repository on torch 2.13 CPU): curvlinops can be pointed at the base weights (wrap the
closure in a module whose forward ignores X and give it an identity "loss" with a `reduction`
attribute) and then agrees with double backward to 1e-5 on a tiny PEFT model. But (1) its HVP is
`jvp(jacrev(...))` under `vmap`, so every op of the model needs a forward-mode derivative and functorch
support; a stock transformers BERT with the default SDPA attention fails with "Trying to use forward AD
with _scaled_dot_product_flash_attention_for_cpu", and (2) installing it pulls backpack-for-pytorch →
torchvision, whose newest wheel requires a newer torch and replaced the CPU torch of this environment
with a CUDA build. Double backward (`autograd.grad(create_graph=True)`, no torch.autograd.functional)
needs nothing new and was 4× faster on the same tiny BERT with eager attention. Fused kernels without
double backward (SDPA on CPU) are handled by `hvp="fd"`: a central difference of gradients,
Hv ≈ (∇L(W' + hv) − ∇L(W' − hv)) / 2h, which needs only first derivatives; `hvp="auto"` falls back to it.

Every function evaluates in eval mode (dropout off; flags restored after) and leaves the model
bit-identical: all moves of W' go through `WeightSpace.shifted()`.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .landscape import (Direction, LossFn, WeightSpace, _value, combine, create_weight_space, dot, eval_mode, norm,
                        requires_grad)

# Generator index namespaces, so (a), (b), (c) and the landscape directions never share a draw.
_NOISE, _POWER, _HUTCH = 10_000, 20_000, 30_000


def t_halfwidth(values: Sequence[float], level: float = 0.95) -> float:
    """Half-width of the `level` t-interval of the mean of `values` (scipy's t quantile).

    No normal-quantile stand-in: with the few probes used here it makes the interval far too narrow
    (38 % at n = 4), so scipy is required.
    """
    n = len(values)
    if n < 2:
        return float("nan")
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    try:
        from scipy.stats import t
    except ImportError:
        raise ImportError("confidence intervals need scipy: pip install 'flatlora[analysis]'") from None
    return float(t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    return mean, sd


@torch.no_grad()
def _loss(model, loss_fn) -> float:
    return _value(loss_fn(model))


# ---------------------------------------------------------------------- (a) expected sharpness
def expected_sharpness(model: nn.Module, loss_fn: LossFn, *, sigmas: Sequence[float] = (0.01, 0.05, 0.1),
                       n_samples: int = 16, seed: int = 0, scope: str = "lora",
                       space: WeightSpace | None = None) -> list[dict[str, float]]:
    """E_ε L(W' + ε) − L(W') under Flat-LoRA noise at each σ, by Monte Carlo.

    Returns:
        One dict per σ: sigma, increase (mean), sd, ci95 (half-width), n, loss (E L(W' + ε)), draws (the
        increase of every draw, for paired comparisons: see `paired_difference`).

    Example:
        >>> net = nn.Linear(4, 1)
        >>> x = torch.ones(8, 4)
        >>> rows = expected_sharpness(net, lambda m: m(x).pow(2).mean(), sigmas=[0.1], n_samples=4)
        >>> rows[0]["n"]
        4
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    space = space or create_weight_space(model, scope=scope)
    with eval_mode(model), space.shifted() as sh:
        base = _loss(model, loss_fn)
        # std_i / σ = ‖W'_i‖ / √n, from the clean W' (the noise is drawn around it, as in training).
        unit = [(r / math.sqrt(b.n)).unsqueeze(1) for r, b in zip(space.row_norms(), space.blocks)]
        incs: dict[float, list[float]] = {float(s): [] for s in sigmas}
        for k in range(n_samples):
            z = space.gaussian(seed, _NOISE + k)
            for s in incs:
                sh.set([zi * (s * u) for zi, u in zip(z, unit)])
                incs[s].append(_loss(model, loss_fn) - base)
    out = []
    for s, v in incs.items():
        mean, sd = _mean_sd(v)
        out.append({"sigma": s, "increase": mean, "sd": sd, "ci95": t_halfwidth(v), "n": len(v), "loss": base + mean,
                    "draws": v})
    return out


def paired_difference(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
    """Mean ± 95 % t-interval of b − a over paired draws of two `expected_sharpness` rows (same seed and σ).

    Draw k of both models uses the same standard normals (blocks keyed by layer name), so the paired
    interval is much tighter than comparing the two means' intervals."""
    if a["sigma"] != b["sigma"] or len(a["draws"]) != len(b["draws"]):
        raise ValueError("paired rows need the same sigma and number of draws (and the same seed)")
    diff = [y - x for x, y in zip(a["draws"], b["draws"])]
    return {"sigma": a["sigma"], "difference": sum(diff) / len(diff), "ci95": t_halfwidth(diff), "n": len(diff)}


# ---------------------------------------------------------------------- (b) worst-case sharpness
def _ascent_step(g: Direction, r: list[torch.Tensor], R: float, ball: str) -> Direction:
    if ball == "filter":
        return [gi / gi.norm(dim=1, keepdim=True).clamp_min(1e-30) * ri.unsqueeze(1) for gi, ri in zip(g, r)]
    gn = float(norm(g))
    return [gi * (R / max(gn, 1e-30)) for gi in g]


def _project(delta: Direction, r: list[torch.Tensor], R: float, rho: float, ball: str) -> Direction:
    if ball == "filter":
        out = []
        for d, ri in zip(delta, r):
            cap = (rho * ri / d.norm(dim=1).clamp_min(1e-30)).clamp(max=1.0)
            out.append(d * cap.unsqueeze(1))
        return out
    dn = float(norm(delta))
    return delta if dn <= rho * R else [d * (rho * R / dn) for d in delta]


def worst_case_sharpness(model: nn.Module, loss_fn: LossFn, *, rho: float = 0.05, steps: int = 5,
                         ball: str = "filter", scope: str = "lora", space: WeightSpace | None = None) -> dict[str, Any]:
    """max_{δ ∈ B_ρ} L(W' + δ) − L(W'), lower-bounded by `steps` projected normalised-gradient ascent steps.

    Returns:
        rho, ball, steps, increase (best loss − base), losses (loss at each iterate, starting at δ = 0),
        radius (the final δ's size in units of the ball: max_i ‖δ_i‖/‖W'_i‖, or ‖δ‖/‖W'‖; ≤ ρ).

    Example:
        >>> net = nn.Linear(4, 1)
        >>> x = torch.ones(8, 4)
        >>> worst_case_sharpness(net, lambda m: m(x).pow(2).mean(), rho=0.1, steps=2)["increase"] >= 0
        True
    """
    if ball not in ("filter", "global"):
        raise ValueError(f"ball must be 'filter' or 'global', got {ball!r}")
    if steps < 1 or rho < 0:
        raise ValueError(f"need steps >= 1 and rho >= 0, got steps={steps}, rho={rho}")
    space = space or create_weight_space(model, scope=scope)
    eta = 2.5 * rho / steps
    with eval_mode(model), space.shifted() as sh:
        merged = space.merged()
        r = [w.norm(dim=1) for w in merged]
        R = float(norm(merged))
        del merged
        delta = [torch.zeros(b.m, b.n, device=b.param.device) for b in space.blocks]
        losses = []
        for k in range(steps + 1):
            sh.set(delta if k else None)
            if k == steps:
                losses.append(_loss(model, loss_fn))
                break
            with torch.enable_grad():
                loss, g = space.grad(loss_fn)
            losses.append(_value(loss))
            step = _ascent_step(g, r, R, ball)
            delta = _project(combine([1.0, eta], [delta, step]), r, R, rho, ball)
        if ball == "filter":
            radius = max(float((d.norm(dim=1) / ri.clamp_min(1e-30)).max()) for d, ri in zip(delta, r))
        else:
            radius = float(norm(delta)) / max(R, 1e-30)
    return {"rho": rho, "ball": ball, "steps": steps, "increase": max(losses) - losses[0], "losses": losses,
            "radius": radius}


# ---------------------------------------------------------------------- (c) Hessian
class HessianOperator:
    """v ↦ ∇²_{W'} L · v for directions over a WeightSpace (use inside `with op:`; the model is put back on exit).

    hvp="double": double backward through a graph built once and retained (one backward per product);
    hvp="fd": central difference of gradients (first derivatives only; float32/64 weights);
    hvp="auto": double, falling back to fd when the model has ops without a double-backward formula.
    """

    def __init__(self, space: WeightSpace, loss_fn: LossFn, hvp: str = "auto", fd_eps: float = 1e-3):
        if hvp not in ("auto", "double", "fd"):
            raise ValueError(f"hvp must be 'auto', 'double' or 'fd', got {hvp!r}")
        self.space, self.loss_fn, self.method, self.fd_eps = space, loss_fn, hvp, fd_eps
        self.products = 0

    def __enter__(self) -> "HessianOperator":
        self._eval = eval_mode(self.space.model)
        self._eval.__enter__()
        self._shift = self.space.shifted()
        self._sh = self._shift.__enter__()
        self._grads = None
        self._wnorm = float(norm(self.space.merged()))
        if self.method in ("auto", "double"):
            self._rg = requires_grad(self.space)
            self._rg.__enter__()
            with torch.enable_grad():
                loss = self.loss_fn(self.space.model)
                self._grads = torch.autograd.grad(loss, [b.param for b in self.space.blocks], create_graph=True,
                                                  allow_unused=True)
            if self.method == "auto":
                try:
                    self(self.space.gaussian(0, _POWER - 1))  # probe: does the graph have a double backward?
                except RuntimeError as e:
                    warnings.warn(f"double backward is not available for this model ({str(e).splitlines()[0][:160]}); "
                                  "using finite differences of gradients (hvp='fd')", stacklevel=2)
                    self._drop_graph()
                    self.method = "fd"
                else:
                    self.method = "double"
        if self.method == "fd":
            bad = {b.param.dtype for b in self.space.blocks} - {torch.float32, torch.float64}
            if bad:
                raise ValueError(f"hvp='fd' needs float32/64 weights (got {sorted(map(str, bad))}): the difference "
                                 "step would drown in rounding; use hvp='double' or load the model in float32")
        return self

    def _drop_graph(self):
        self._grads = None
        if hasattr(self, "_rg"):
            self._rg.__exit__(None, None, None)
            del self._rg

    def __exit__(self, *exc):
        self._drop_graph()
        self._shift.__exit__(*exc)
        self._eval.__exit__(*exc)
        return False

    def __call__(self, v: Direction) -> Direction:
        self.products += 1
        blocks = self.space.blocks
        if self.method != "fd":
            outs = [b.to_storage(vi.to(b.param.dtype)) for b, vi in zip(blocks, v)]
            used = [(g, o) for g, o in zip(self._grads, outs) if g is not None and g.requires_grad]
            if not used:
                return [torch.zeros_like(vi) for vi in v]
            hv = torch.autograd.grad([g for g, _ in used], [b.param for b in blocks], grad_outputs=[o for _, o in used],
                                     retain_graph=True, allow_unused=True)
            return [torch.zeros(b.m, b.n, device=b.param.device) if h is None else b.as_matrix(h).float()
                    for b, h in zip(blocks, hv)]
        h = self.fd_eps * self._wnorm / max(float(norm(v)), 1e-30)
        grads = []
        for sign in (1.0, -1.0):
            self._sh.set([vi * (sign * h) for vi in v])
            with torch.enable_grad():
                grads.append(self.space.grad(self.loss_fn)[1])
        self._sh.set(None)
        return [(gp - gm) / (2 * h) for gp, gm in zip(*grads)]


def top_hessian_eigenvalue(model: nn.Module, loss_fn: LossFn, *, iters: int = 20, tol: float = 1e-3, seed: int = 0,
                           hvp: str = "auto", scope: str = "lora", space: WeightSpace | None = None) -> dict[str, Any]:
    """Eigenvalue of ∇²_{W'} L of largest magnitude, by power iteration (Rayleigh quotient vᵀHv).

    Stops when two successive estimates differ by less than `tol` relative. Returns eigenvalue, iters,
    converged, hvp (the method used)."""
    space = space or create_weight_space(model, scope=scope)
    with HessianOperator(space, loss_fn, hvp) as H:
        v = space.gaussian(seed, _POWER)
        n0 = float(norm(v))
        v = [t / n0 for t in v]
        lam, prev, converged, it = float("nan"), None, False, 0
        for it in range(1, iters + 1):
            hv = H(v)
            lam = float(dot(v, hv))
            hn = float(norm(hv))
            if hn == 0.0:
                converged = True
                break
            v = [t / hn for t in hv]
            if prev is not None and abs(lam - prev) <= tol * max(abs(lam), 1e-12):
                converged = True
                break
            prev = lam
        return {"eigenvalue": lam, "iters": it, "converged": converged, "hvp": H.method}


def hessian_trace(model: nn.Module, loss_fn: LossFn, *, n_probes: int = 10, seed: int = 0, hvp: str = "auto",
                  scope: str = "lora", space: WeightSpace | None = None) -> dict[str, Any]:
    """Hutchinson's tr ∇²_{W'} L = E_z[zᵀ H z], z Rademacher per entry. Returns trace, ci95, n_probes, hvp."""
    space = space or create_weight_space(model, scope=scope)
    vals = []
    with HessianOperator(space, loss_fn, hvp) as H:
        for k in range(n_probes):
            z = [torch.where(g >= 0, 1.0, -1.0) for g in space.gaussian(seed, _HUTCH + k)]
            vals.append(float(dot(z, H(z))))
        method = H.method
    mean, _ = _mean_sd(vals)
    return {"trace": mean, "ci95": t_halfwidth(vals), "n_probes": n_probes, "hvp": method}


# ---------------------------------------------------------------------- everything at once
@dataclass
class SharpnessResult:
    """All sharpness numbers of one model (see the module docstring for their definitions)."""

    base_loss: float
    expected: list[dict[str, float]]
    worst_case: dict[str, Any] | None
    hessian: dict[str, Any] | None
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SharpnessResult":
        return cls(**d)

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    def summary(self) -> dict[str, float]:
        """Flat {column: value} view used by the tables."""
        out = {"loss": self.base_loss}
        for row in self.expected:
            out[f"E-sharp σ={row['sigma']:g}"] = row["increase"]
            out[f"E-sharp σ={row['sigma']:g} ±"] = row["ci95"]
        if self.worst_case:
            out[f"max-sharp ρ={self.worst_case['rho']:g}"] = self.worst_case["increase"]
        if self.hessian:
            out["λ_max"] = self.hessian["eigenvalue"]
            out["tr H"] = self.hessian["trace"]
            out["tr H ±"] = self.hessian["trace_ci95"]
        return out


def sharpness_report(model: nn.Module, loss_fn: LossFn, *, sigmas: Sequence[float] = (0.01, 0.05, 0.1),
                     n_samples: int = 16, rho: float = 0.05, ball: str = "filter", ascent_steps: int = 5,
                     hessian: bool = True, power_iters: int = 20, trace_probes: int = 10, hvp: str = "auto",
                     seed: int = 0, scope: str = "lora") -> SharpnessResult:
    """(a) expected, (b) worst-case and (c) Hessian sharpness of W' in one call (set rho=0 / hessian=False to skip).

    Example:
        >>> net = nn.Linear(4, 1)
        >>> x = torch.ones(8, 4)
        >>> rep = sharpness_report(net, lambda m: m(x).pow(2).mean(), n_samples=4, power_iters=5, trace_probes=2)
        >>> rep.hessian["eigenvalue"] > 0
        True
    """
    space = create_weight_space(model, scope=scope)
    with eval_mode(model):
        base = _loss(model, loss_fn)
    exp = expected_sharpness(model, loss_fn, sigmas=sigmas, n_samples=n_samples, seed=seed, space=space)
    wc = worst_case_sharpness(model, loss_fn, rho=rho, steps=ascent_steps, ball=ball, space=space) if rho > 0 else None
    hs = None
    if hessian:
        top = top_hessian_eigenvalue(model, loss_fn, iters=power_iters, seed=seed, hvp=hvp, space=space)
        tr = hessian_trace(model, loss_fn, n_probes=trace_probes, seed=seed, hvp=top["hvp"], space=space)
        hs = {"eigenvalue": top["eigenvalue"], "power_iters": top["iters"], "converged": top["converged"],
              "trace": tr["trace"], "trace_ci95": tr["ci95"], "trace_probes": tr["n_probes"], "hvp": top["hvp"]}
    meta = {"scope": space.scope, "seed": seed, "blocks": len(space), "numel": space.numel,
            "noise": "eps_ij ~ N(0, sigma^2 ||W'_i||^2 / n) (Flat-LoRA, filter-wise)",
            "ball": f"{ball}: " + ("||delta_i|| <= rho ||W'_i|| per row" if ball == "filter" else "||delta|| <= rho ||W'||")}
    return SharpnessResult(base, exp, wc, hs, meta)
