"""Plots and JSON of flatlora.analysis: files are written and round-trip."""

import json

import pytest
import torch
from torch import nn

pytest.importorskip("matplotlib")

from flatlora.analysis import LandscapeResult, SharpnessResult, loss_landscape, sharpness_report  # noqa: E402
from flatlora.analysis.plot import (plot_compare, plot_curves, plot_sharpness, plot_surfaces,  # noqa: E402
                                    plot_training_curves, read_curves, sharpness_markdown, shared_range)


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
                          (plot_sharpness, reps, "t.png")]:
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


def _axes_texts(fig):
    return [t for ax in fig.axes for t in (ax.get_title(), ax.get_ylabel(), getattr(ax, "get_zlabel", lambda: "")())]


def test_surfaces_add_the_difference_panel_with_a_visible_z_label(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    res = {}
    for label, scale in [("LoRA", 3.0), ("Flat-LoRA", 1.0)]:
        net, loss_fn = _model_and_loss(scale)
        res[label] = loss_landscape(net, loss_fn, dims=2, steps=4)
    figs = []
    monkeypatch.setattr(plt, "close", lambda fig: figs.append(fig))
    plot_surfaces(res, tmp_path / "s.png")
    fig = figs[0]
    texts = _axes_texts(fig)
    assert "Flat-LoRA − LoRA\n(blue: lower loss)" in texts and "Δ loss" in texts
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    d3 = [ax for ax in fig.axes if ax.name == "3d"]
    assert len(d3) == 3  # LoRA, Flat-LoRA, difference
    bars = [ax for ax in fig.axes if ax.name != "3d" and ax.get_ylabel() in ("loss", "Δ loss") and not ax.get_title()]
    for ax in d3:  # no colour bar sits on top of a z-label
        z = ax.zaxis.label.get_window_extent(renderer)
        assert z.width > 0 and not any(z.overlaps(b.get_window_extent(renderer)) for b in bars)
    # the difference panel holds the difference of the two grids
    diff = [ax for ax in d3 if ax.get_zlabel() == "Δ loss"][0]
    lo, hi = diff.get_zlim()
    expect = max(abs(a - b) for ra, rb in zip(res["Flat-LoRA"].loss, res["LoRA"].loss) for a, b in zip(ra, rb))
    assert abs(hi - expect) < 1e-6 and abs(lo + expect) < 1e-6


def test_sharpness_chart_shows_paired_differences(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    reps = {}
    for label, scale in [("LoRA", 3.0), ("Flat-LoRA", 1.0)]:
        torch.manual_seed(0)  # the same network twice; only the loss scale differs
        net, loss_fn = _model_and_loss(scale)
        reps[label] = sharpness_report(net, loss_fn, sigmas=[0.05, 0.1], n_samples=4, ascent_steps=1, power_iters=3,
                                       trace_probes=2)
    figs = []
    monkeypatch.setattr(plt, "close", lambda fig: figs.append(fig))
    plot_sharpness(reps, tmp_path / "sh.png")
    ax_e, ax_o = figs[0].axes
    # The loss is 3x smaller for Flat-LoRA, so is each paired draw's increase: Δ = -66.7 % of LoRA's, exactly,
    # with a zero-width interval; the same for the other measures.
    # (Δ is divided by |LoRA's value|: its sign says which model is higher.)
    (expected,) = ax_e.containers
    signs = [1 if row["increase"] > 0 else -1 for row in reps["LoRA"].expected]
    assert list(expected.lines[0].get_ydata()) == pytest.approx([-200 / 3 * s for s in signs], abs=1e-4)
    lora = reps["LoRA"]
    signs = [1 if v > 0 else -1 for v in (lora.worst_case["increase"], lora.hessian["eigenvalue"], lora.hessian["trace"])]
    others = [y for c in ax_o.containers for y in c.lines[0].get_ydata()]
    assert others == pytest.approx([-200 / 3 * s for s in signs], rel=1e-3)
    with pytest.raises(ValueError, match="at least 2"):
        plot_sharpness({"LoRA": reps["LoRA"]}, tmp_path / "one.png")


def _records():
    recs = []
    for seed, (a, b) in enumerate([(0.80, 0.82), (0.81, 0.82), (0.79, 0.83)]):
        for method, acc in (("lora", a), ("flat-lora", b)):
            recs.append({"method": method, "rank": 8, "seed": seed, "metrics": {"test/accuracy": acc},
                         "primary_metric": "test/accuracy", "train_seconds": 1.0, "steps": 3})
    return recs


def test_compare_plot_adds_the_paired_delta_with_its_ci(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from flatlora.experiments.results import plot_summary, summarize

    recs = _records()
    summary = summarize(recs)
    figs = []
    monkeypatch.setattr(plt, "close", lambda fig: figs.append(fig))
    assert plot_summary(recs, summary, tmp_path / "plot.png").exists()
    delta_ax = [ax for ax in figs[0].axes if ax.get_title() == "paired Δ test/accuracy, 95 % CI"][0]
    pair = summary["pairs"][0]
    texts = [t.get_text() for t in delta_ax.texts]
    assert texts == [f"{100 * pair['mean_diff']:+.2f}\n[{100 * pair['ci_low']:+.2f}, {100 * pair['ci_high']:+.2f}]"]
    assert texts[0].startswith("+2.33")  # (2 + 1 + 4) / 3 points
    seeds = sorted(round(y, 6) for line in delta_ax.lines for y in line.get_ydata() if len(line.get_ydata()) == 3)
    assert seeds == [1.0, 2.0, 4.0]


def test_compare_plot_of_a_grid_where_every_run_failed_says_so(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from flatlora.experiments.results import plot_summary, summarize

    recs = [{"method": m, "rank": 8, "seed": s, "metrics": {}, "primary_metric": "test/accuracy", "train_seconds": 1.0,
             "steps": 474, "status": "failed", "failure": "diverged: the loss became nan at step 0"}
            for s in (300, 301) for m in ("dora", "flat-dora")]
    summary = summarize(recs, errors=[{"run": "pissa_r8_s300", "error": "ValueError: x"}])
    assert summary["metrics"] == []  # what made plt.subplots(rows, 0) raise before
    figs = []
    monkeypatch.setattr(plt, "close", lambda fig: figs.append(fig))
    (tmp_path / "plot.png").write_bytes(b"an older plot")
    path = plot_summary(recs, summary, tmp_path / "plot.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the older plot is replaced, not left standing
    (text,) = [t.get_text() for ax in figs[0].axes for t in ax.texts]
    assert text.splitlines()[:3] == ["no run finished: nothing to plot", "failed: dora r=8, flat-dora r=8",
                                     "1 run(s) raised an error"]


def test_training_curves_average_over_seeds(tmp_path, monkeypatch):
    import gzip
    import json as _json

    import matplotlib.pyplot as plt

    dirs = []
    for method, sig in (("lora", 0.0), ("flat-lora", 0.05)):
        for seed in (0, 1):
            d = tmp_path / f"{method}_r8_s{seed}"
            d.mkdir()
            (d / "metrics.json").write_text(_json.dumps({"method": method, "rank": 8, "seed": seed}))
            rows = "".join(f"{t},0,{1.0 + seed - 0.01 * t},1e-3,{sig * t / 29},{t}\n" for t in range(30))
            text = "step,epoch,loss,lr,sigma,seconds\n" + rows
            if seed == 1:  # committed evidence keeps its curves gzipped
                (d / "curve.csv.gz").write_bytes(gzip.compress(text.encode()))
            else:
                (d / "curve.csv").write_text(text)
            dirs.append(d)
    (tmp_path / "unfinished").mkdir()
    curves = read_curves(dirs + [tmp_path / "unfinished"])
    assert set(curves) == {("lora", 8), ("flat-lora", 8)} and set(curves[("lora", 8)]) == {0, 1}
    figs = []
    monkeypatch.setattr(plt, "close", lambda fig: figs.append(fig))
    plot_training_curves(dirs, tmp_path / "curves.png")
    ax_loss, ax_sigma = figs[0].axes
    raw = [line for line in ax_loss.lines if len(line.get_ydata()) == 30]
    assert abs(raw[0].get_ydata()[0] - 1.5) < 1e-9  # mean of seed 0 (1.0) and seed 1 (2.0)
    assert max(max(line.get_ydata()) for line in ax_sigma.lines) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="no finished runs"):
        plot_training_curves([tmp_path / "unfinished"], tmp_path / "x.png")
