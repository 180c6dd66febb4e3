"""Paired statistics against scipy and hand computation; the markdown table carries them."""

import math
import sys

import pytest
from scipy import stats

from flatlora.experiments.results import paired_stats, summarize, to_markdown


def test_paired_stats_match_scipy_and_hand_values():
    a, b = [0.80, 0.83, 0.81, 0.85], [0.79, 0.80, 0.81, 0.82]
    s = paired_stats(a, b)
    d = [x - y for x, y in zip(a, b)]
    mean = sum(d) / 4
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 3)
    half = stats.t.ppf(0.975, 3) * sd / 2
    assert s["mean_diff"] == pytest.approx(mean) and s["std_diff"] == pytest.approx(sd)
    assert (s["ci_low"], s["ci_high"]) == (pytest.approx(mean - half), pytest.approx(mean + half))
    assert s["t_pvalue"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert s["wilcoxon_pvalue"] == pytest.approx(stats.wilcoxon(d).pvalue)
    assert s["effect_size_dz"] == pytest.approx(mean / sd)
    assert (s["wins"], s["losses"], s["ties"]) == (3, 0, 1)


def test_detectable_difference_has_the_power_it_claims():
    """Simulated paired designs with the true difference set to the detectable one: the two-sided paired t-test
    at 0.05 rejects in 80 % of them (binomial sd over 20 000 trials ~0.3 %); it shrinks like 1/sqrt(n)."""
    import numpy as np

    from flatlora.experiments.results import detectable_difference

    rng = np.random.default_rng(0)
    for n in (3, 5, 10):
        delta = detectable_difference(0.01, n)
        d = rng.normal(delta, 0.01, size=(20_000, n))
        t = d.mean(1) / (d.std(1, ddof=1) / math.sqrt(n))
        assert np.mean(np.abs(t) > stats.t.ppf(0.975, n - 1)) == pytest.approx(0.8, abs=0.012), n
    assert detectable_difference(1.0, 100) == pytest.approx((stats.norm.ppf(0.975) + stats.norm.ppf(0.8)) / 10, rel=0.02)
    assert detectable_difference(2.0, 10) == pytest.approx(2 * detectable_difference(1.0, 10))
    assert detectable_difference(1.0, 2) > 10  # 1 degree of freedom: a t-test of 2 pairs sees only huge effects
    assert math.isnan(detectable_difference(1.0, 1)) and math.isnan(detectable_difference(0.0, 10))
    assert math.isnan(detectable_difference(math.inf, 10))  # an overflowing spread: no number, not a solver error
    s = paired_stats([0.80, 0.83, 0.81, 0.85], [0.79, 0.80, 0.81, 0.82])
    assert s["detectable_diff"] == pytest.approx(detectable_difference(s["std_diff"], 4))


def test_identical_results_give_no_p_values_instead_of_crashing():
    s = paired_stats([0.5, 0.5], [0.5, 0.5])
    assert s["mean_diff"] == 0 and math.isnan(s["t_pvalue"]) and math.isnan(s["wilcoxon_pvalue"])


def test_summary_pairs_flat_methods_with_their_base_by_seed():
    recs = []
    for seed, (base, flat) in enumerate([(0.70, 0.72), (0.71, 0.74), (0.69, 0.70)]):
        for method, v in [("lora", base), ("flat-lora", flat), ("dora", base)]:
            recs.append({"method": method, "rank": 8, "seed": seed, "metrics": {"test/accuracy": v},
                         "primary_metric": "test/accuracy", "train_seconds": 1.0, "steps": 2})
    s = summarize(recs)
    (pair,) = [p for p in s["pairs"] if p["metric"] == "test/accuracy"]
    assert (pair["method"], pair["baseline"], pair["n"]) == ("flat-lora", "lora", 3)
    assert pair["mean_diff"] == pytest.approx(0.02)
    md = to_markdown(s, "t")
    assert "| flat-lora | lora | 8 | test/accuracy | 3 | +2.00 | [-0.48, +4.48] | ±3.26 | 0.074 |" in md
    assert "| lora | 8 | 3 | 70.00 ± 1.00 |" in md
    s2 = summarize(recs, baseline="dora")
    assert {p["method"] for p in s2["pairs"]} == {"lora", "flat-lora"}


def test_cells_carry_mean_train_and_eval_seconds():
    recs = [{"method": "lora", "rank": 8, "seed": s, "metrics": {"test/accuracy": 0.7}, "primary_metric": "test/accuracy",
             "train_seconds": 10.0 + s, "eval_seconds": 2.0 * s, "steps": 2} for s in range(3)]
    recs.append({"method": "flat-lora", "rank": 8, "seed": 0, "metrics": {"test/accuracy": 0.7},  # a record without it
                 "primary_metric": "test/accuracy", "train_seconds": 5.0, "steps": 2})
    cells = {c["method"]: c for c in summarize(recs)["cells"]}
    assert (cells["lora"]["train_seconds"], cells["lora"]["eval_seconds"]) == (11.0, 2.0)
    assert cells["flat-lora"]["train_seconds"] == 5.0 and math.isnan(cells["flat-lora"]["eval_seconds"])


def test_intervals_require_scipy_and_say_which_extra(monkeypatch):
    from flatlora.analysis.sharpness import t_halfwidth

    values = [0.1, 0.3, 0.2, 0.5]
    sd = stats.tstd(values)
    assert t_halfwidth(values) == pytest.approx(stats.t.ppf(0.975, 3) * sd / 2)  # t, not the normal quantile
    for name in ("scipy", "scipy.stats"):
        monkeypatch.setitem(sys.modules, name, None)  # as if scipy were not installed
    with pytest.raises(ImportError, match=r"need scipy: pip install 'flatlora\[analysis\]'"):
        t_halfwidth(values)
    with pytest.raises(ImportError, match=r"need scipy: pip install 'flatlora\[experiments\]'"):
        paired_stats([0.8, 0.9], [0.7, 0.8])


def test_failed_runs_are_listed_not_averaged():
    recs = [{"method": "lora", "rank": 8, "seed": s, "metrics": {"test/accuracy": 0.70 + s / 100}, "primary_metric": "test/accuracy",
             "train_seconds": 1.0, "steps": 2, "status": "done"} for s in range(3)]
    recs += [{"method": "flat-lora", "rank": 8, "seed": s, "metrics": {"test/accuracy": 0.72 + s / 100},
              "primary_metric": "test/accuracy", "train_seconds": 1.0, "steps": 2, "status": "done"} for s in (0, 2)]
    recs.append({"method": "flat-lora", "rank": 8, "seed": 1, "metrics": {}, "primary_metric": "test/accuracy",
                 "train_seconds": 1.0, "steps": 2, "status": "failed", "failure": "diverged: the loss became nan at step 3"})
    s = summarize(recs)
    (pair,) = [p for p in s["pairs"] if p["metric"] == "test/accuracy"]
    assert pair["seeds"] == [0, 2] and pair["mean_diff"] == pytest.approx(0.02)  # seed 1 left out of the pair
    cell = next(c for c in s["cells"] if c["method"] == "flat-lora")
    assert (cell["n"], cell["failed_seeds"]) == (2, [1])
    md = to_markdown(s)
    assert "| flat-lora | 8 | 2 | 73.00 ± 1.41 | 1 | seed 1 |" in md
    assert "- flat-lora r=8 seed 1: diverged: the loss became nan at step 3" in md
