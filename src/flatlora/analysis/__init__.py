"""Flatness analysis in the full weight space of the merged weights W' = W + s·B·A.

    from flatlora.analysis import loss_landscape, sharpness_report, mean_over
    loss_fn = mean_over(eval_batches, lambda m, b: m(**b).loss)
    surface = loss_landscape(model, loss_fn, dims=2, steps=11, span=0.5, seed=0)   # paper Fig. 3
    report = sharpness_report(model, loss_fn, sigmas=[0.05, 0.1], rho=0.05)

Plots live in `flatlora.analysis.plot` (matplotlib, the [plot] extra), imported on use.
"""

from .landscape import (LandscapeResult, WeightSpace, create_weight_space, eval_mode, loss_landscape, mean_over)
from .sharpness import (HessianOperator, SharpnessResult, expected_sharpness, hessian_trace, paired_difference,
                        sharpness_report, top_hessian_eigenvalue, worst_case_sharpness)

__all__ = ["HessianOperator", "LandscapeResult", "SharpnessResult", "WeightSpace", "create_weight_space", "eval_mode",
           "expected_sharpness", "hessian_trace", "loss_landscape", "mean_over", "paired_difference", "sharpness_report",
           "top_hessian_eigenvalue", "worst_case_sharpness"]
