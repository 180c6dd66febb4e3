"""Paired statistics against scipy and hand computation; the markdown table carries them."""

import math

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
    assert "| flat-lora | lora | 8 | test/accuracy | 3 | +2.00 |" in md
    assert "| lora | 8 | 3 | 70.00 ± 1.00 |" in md
    s2 = summarize(recs, baseline="dora")
    assert {p["method"] for p in s2["pairs"]} == {"lora", "flat-lora"}
