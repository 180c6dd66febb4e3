"""Plots and JSON of flatlora.analysis: files are written and round-trip."""

import json

import pytest
import torch
from torch import nn

pytest.importorskip("matplotlib")

from flatlora.analysis import LandscapeResult, SharpnessResult, loss_landscape, sharpness_report  # noqa: E402
from flatlora.analysis.plot import (plot_curves, plot_sharpness_table, plot_surfaces, sharpness_markdown,  # noqa: E402
                                    shared_range)


def _model_and_loss(scale):
    net = nn.Linear(3, 2)
    with torch.no_grad():
        net.weight.copy_(torch.arange(6.0).reshape(2, 3) / 6)
    x = torch.ones(4, 3)
    return net, lambda m: scale * m(x).pow(2).mean()


def test_figures_and_json(tmp_path):
    res2, res1, reps = {}, {}, {}
    for label, scale in [("LoRA", 3.0), ("Flat-LoRA", 1.0)]:
        net, loss_fn = _model_and_loss(scale)
        res2[label] = loss_landscape(net, loss_fn, dims=2, steps=4, metric_fn=lambda m: 0.5)
        res1[label] = loss_landscape(net, loss_fn, dims=1, steps=5, metric_fn=lambda m: 0.5)
        reps[label] = sharpness_report(net, loss_fn, sigmas=[0.1], n_samples=3, ascent_steps=1, power_iters=3,
                                       trace_probes=2)
    lo, hi = shared_range(list(res2.values()))
    assert lo == min(min(r) for x in res2.values() for r in x.loss) and hi == max(max(r) for x in res2.values() for r in x.loss)
    for fn, arg, name in [(plot_surfaces, res2, "s.png"), (plot_curves, res1, "c.png"),
                          (plot_sharpness_table, reps, "t.png")]:
        out = fn(arg, tmp_path / name)
        assert out.read_bytes()[:4] == b"\x89PNG"
    md = sharpness_markdown(reps)
    assert md.count("\n") == 3 and "Flat-LoRA" in md and "λ_max" in md
    for r in list(res2.values()) + list(reps.values()):
        r.save_json(tmp_path / "x.json")
        back = type(r).from_dict(json.loads((tmp_path / "x.json").read_text()))
        assert back == r
    with pytest.raises(ValueError, match="2-D"):
        plot_surfaces(res1, tmp_path / "bad.png")
    assert isinstance(res1["LoRA"], LandscapeResult) and isinstance(reps["LoRA"], SharpnessResult)
