"""Statistics against scipy, Holm on known p-values, Pareto on hand-made points, and the report."""

import json
import math
import re

import numpy as np
import pytest
from scipy import stats

from peftlab.analysis.pareto import pareto_front
from peftlab.analysis.stats import (
    compare,
    detectable_difference,
    equivalent,
    holm,
    judge,
    seeds_needed,
    summarize,
)

A = [0.81, 0.79, 0.84, 0.80, 0.83]
B = [0.78, 0.77, 0.80, 0.79, 0.78]


def test_summary_matches_scipy_t_interval():
    s = summarize(A)
    low, high = stats.t.interval(0.95, len(A) - 1, loc=np.mean(A), scale=stats.sem(A))
    assert (s.n, s.mean, s.std) == (5, pytest.approx(np.mean(A)), pytest.approx(np.std(A, ddof=1)))
    assert (s.low, s.high) == (pytest.approx(low), pytest.approx(high))
    one = summarize([0.5])
    assert one.mean == 0.5 and math.isnan(one.low)


def test_bootstrap_interval_brackets_the_mean():
    s = summarize(A, method="bootstrap")
    assert min(A) <= s.low < s.mean < s.high <= max(A)


def test_paired_t_and_wilcoxon_match_scipy():
    candidate, baseline = dict(enumerate(A)), dict(enumerate(B))
    t = compare(candidate, baseline)
    assert t.test == "paired t" and t.n == 5
    assert t.p == pytest.approx(stats.ttest_rel(A, B).pvalue)
    d = np.subtract(A, B)
    low, high = stats.t.interval(0.95, 4, loc=d.mean(), scale=stats.sem(d))
    assert (t.difference, t.low, t.high) == (pytest.approx(d.mean()), pytest.approx(low), pytest.approx(high))
    assert t.relative == pytest.approx(100 * d.mean() / np.mean(B))
    w = compare(candidate, baseline, test="wilcoxon")
    assert w.test == "wilcoxon" and w.p == pytest.approx(stats.wilcoxon(A, B).pvalue)


def test_unmatched_seeds_use_welch():
    c = compare({0: 0.8, 1: 0.82, 2: 0.85}, {5: 0.7, 6: 0.75, 7: 0.72})
    assert c.test == "welch t"
    assert c.p == pytest.approx(stats.ttest_ind([0.8, 0.82, 0.85], [0.7, 0.75, 0.72], equal_var=False).pvalue)


def test_holm_on_known_pvalues():
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> monotone: 0.02, 0.03, 0.06, 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    adjusted = holm([0.01, math.nan])
    assert adjusted[0] == pytest.approx(0.01) and math.isnan(adjusted[1])


def test_pareto_on_hand_made_points():
    costs = [1, 2, 3, 4, 2]
    quality = [0.70, 0.80, 0.79, 0.90, 0.80]
    # (3, .79) is dominated by (2, .80); the two (2, .80) points are equal, so neither dominates the other
    assert pareto_front(costs, quality) == [True, True, False, True, True]
    losses = [1.0, 0.8, 0.9, 0.5]
    assert pareto_front([1, 2, 3, 4], losses, higher_is_better=False) == [True, True, False, True]


@pytest.fixture
def synthetic_study(tmp_path):
    """A finished study with known results: 3 placements x 3 seeds on tiny-bert."""
    from peftlab.api import make_plan
    from peftlab.config import validate
    from peftlab.specs import PlanConfig, RunConfig, StudySpec
    from peftlab.studies.grid import expand
    from peftlab.studies.runner import open_study

    spec = validate(StudySpec, {
        "name": "synthetic", "description": "Known numbers.",
        "base": {"model": "tiny-bert", "task": {"path": "data.jsonl", "kind": "classification"}},
        "axes": {"placement": {"all": "all", "attention": "attention", "ffn": "ffn"}},
        "seeds": [0, 1, 2],
    }, "test")
    study_dir = tmp_path / "study"
    store, _ = open_study(spec, study_dir)
    accuracy = {"all": [0.80, 0.81, 0.82], "attention": [0.82, 0.78, 0.80], "ffn": [0.715, 0.68, 0.70]}
    for run in expand(spec):
        config = RunConfig.model_validate(run.config)
        plan = make_plan(PlanConfig(model=config.model, plan=config.plan))
        out = study_dir / "runs" / run.id
        out.mkdir(parents=True)
        (out / "plan.json").write_text(plan.to_json())
        (out / "metrics.jsonl").write_text("".join(
            json.dumps({"step": s, "train_loss": 1.0 / s + 0.01 * run.seed}) + "\n" for s in (10, 20, 30)))
        name = run.axes["placement"]
        acc = accuracy[name][run.seed]
        finish(store, run.id, plan, {"accuracy": acc, "loss": 1 - acc}, "classification",
               head=130, seconds=10.0 + run.seed)
    return study_dir


def finish(store, run_id, plan, test_metrics, kind, head=0, seconds=10.0):
    """Record a finished run with these test metrics and the plan's costs (plus `head` trainable params)."""
    result = {"status": "done", "metrics": {"test": test_metrics},
              "cost": {"trainable_params": plan.trainable_params + head, "base_params": plan.base_params,
                       "total_params": plan.base_params + plan.trainable_params, "train_seconds": seconds,
                       "peak_memory_bytes": 2**29, "adapter_bytes": 4 * plan.trainable_params},
              "data": {"kind": kind}}
    store.mark_running(run_id, None)
    store.finish(run_id, "done", result, None)


def test_analysis_of_known_results(synthetic_study):
    from peftlab.analysis.analyze import analyze

    analysis = analyze(synthetic_study)
    assert analysis.metric == "metrics.test.accuracy" and analysis.higher_is_better
    by_label = {c.label: c for c in analysis.configurations}
    assert analysis.baseline is by_label["placement=all"]
    assert by_label["placement=ffn"].comparison.difference == pytest.approx((0.715 + 0.68 + 0.70 - 2.43) / 3)
    assert by_label["placement=ffn"].p_holm < 0.05
    assert by_label["placement=attention"].p_holm > 0.05
    assert all(c.summary.n == 3 for c in analysis.configurations)
    # on tiny-bert ffn (6,144 LoRA params) < attention (8,192) < all (14,336), each better than the last
    assert [c.label for c in analysis.configurations] == ["placement=ffn", "placement=attention", "placement=all"]
    assert all(c.on_front for c in analysis.configurations)
    cheapest, attention, everything = analysis.recommendations
    assert "cheapest configuration" in cheapest
    assert "**placement=attention**" in attention and "Better than placement=ffn" in attention
    assert "Not resolved against placement=attention" in everything and "seeds would detect ±0.01" in everything
    verdicts = {c.label: c.verdict for c in analysis.configurations if c.verdict}
    assert verdicts["placement=ffn"].outcome == "worse" and verdicts["placement=attention"].outcome == "unresolved"
    assert any("Seeds per configuration: 3" in line for line in analysis.limits)
    # bucketed batches (the default) are named as a training procedure of their own in every report
    assert any(line.startswith("Batches were length-bucketed for every configuration") for line in analysis.limits)


def test_report_files(synthetic_study):
    from peftlab.analysis.report import write_report

    _, outputs = write_report(synthetic_study)
    html_text = outputs["html"].read_text()
    assert html_text.count('src="data:image/png;base64,') == 4
    markdown = outputs["markdown"].read_text()
    assert "placement=ffn" in markdown and "(n=3)" in markdown and "paired t" in markdown
    assert "## Recommendations" in markdown and "## Limits" in markdown
    summary = outputs["summary"].read_text().splitlines()
    assert summary[0] == "configuration,metric,n,mean,std,ci_low,ci_high"
    assert any(line.startswith("placement=ffn,metrics.test.loss,3,") for line in summary)
    tex = outputs["latex"].read_text()
    assert "\\toprule" in tex and "\\bottomrule" in tex and tex.count("\\\\") == 4
    for name in ("quality_vs_cost", "differences", "training_curves", "rank_heatmaps"):
        for suffix in (".png", ".pdf"):
            assert (synthetic_study / "figures" / f"{name}{suffix}").stat().st_size > 5000


def test_cli_report(synthetic_study, cli):
    code, out, _ = cli("report", synthetic_study, "--test", "wilcoxon")
    assert code == 0 and "placement=ffn" in out and "wrote" in out
    code, _, err = cli("report", synthetic_study, "--baseline", "nothing")
    assert code == 2 and "no such configuration" in err


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def test_html_report_renders_in_headless_chromium(synthetic_study, tmp_path):
    import shutil
    import subprocess

    import matplotlib.image

    from peftlab.analysis.report import write_report

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("Debian chromium is not installed (.ci/run installs it)")
    _, outputs = write_report(synthetic_study)
    url = outputs["html"].resolve().as_uri()
    base = [browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    assert 'data-figures="4/4"' in dom  # every figure decoded to an image with a real size
    shot = tmp_path / "report.png"
    subprocess.run([*base, f"--screenshot={shot}", "--window-size=1200,2400", url], capture_output=True, timeout=120)
    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[0] >= 2000 and pixels.std() > 0.05  # a page with content, not a blank one


def test_lower_is_better_metrics_flip_the_frontier(synthetic_study):
    from peftlab.analysis.analyze import analyze

    analysis = analyze(synthetic_study, metric="loss", cost="time")
    assert analysis.metric == "metrics.test.loss" and not analysis.higher_is_better
    # equal training times: only the lowest loss (all) is on the frontier
    assert [c.label for c in analysis.configurations if c.on_front] == ["placement=all"]


def test_a_constant_nonzero_difference_gets_no_p_value():
    # both arms predicting one class: the same difference on every seed, which a t-test cannot weigh
    c = compare({0: 0.62, 1: 0.62, 2: 0.62}, {0: 0.80, 1: 0.79, 2: 0.81})
    assert c.test != "constant difference"  # the baseline varies: an ordinary paired test
    c = compare({0: 0.52, 1: 0.51, 2: 0.53}, {0: 0.62, 1: 0.61, 2: 0.63})
    assert c.test == "constant difference" and math.isnan(c.p)
    assert c.difference == pytest.approx(-0.10)
    assert compare({0: 0.6, 1: 0.6}, {0: 0.6, 1: 0.6}).p == 1.0  # no difference at all
    assert compare({0: 0.52, 1: 0.51}, {0: 0.62, 1: 0.61}, test="wilcoxon").test == "wilcoxon"


def test_relative_change_divides_by_the_baseline_over_the_matched_seeds():
    # seed 2 of the baseline has no partner: it must not enter the denominator
    c = compare({0: 0.55, 1: 0.66}, {0: 0.50, 1: 0.60, 2: 0.90})
    assert c.n == 2
    assert c.relative == pytest.approx(100 * 0.055 / 0.55)


def test_a_constant_difference_is_named_in_the_report_not_called_significant(synthetic_study):
    from peftlab.analysis.analyze import analyze
    from peftlab.analysis.report import main_table
    from peftlab.records.store import open_existing

    store = open_existing(synthetic_study)
    for row in store.rows():  # ffn collapses: exactly 0.1 below `all` on every seed
        result = json.loads(row["result"])
        if '"ffn"' in row["axes"]:
            accuracy = {0: 0.70, 1: 0.71, 2: 0.72}[row["seed"]]
            result["metrics"]["test"]["accuracy"] = accuracy
        store.finish(row["id"], "done", result, None)
    analysis = analyze(synthetic_study)
    ffn = next(c for c in analysis.configurations if c.label == "placement=ffn")
    assert ffn.comparison.test == "constant difference" and math.isnan(ffn.p_holm)
    row = next(r for r in main_table(analysis) if r["configuration"].startswith("placement=ffn"))
    assert "on every seed, no test" in row["Δ vs baseline (Holm p)"]
    assert any("placement=ffn: the same difference from the baseline on every seed" in line for line in analysis.limits)
    assert not any("Better than placement=ffn" in line for line in analysis.recommendations)
    assert ffn.verdict.outcome == "unresolved" and ffn.verdict.reason == "the same difference on every seed"


def test_bootstrap_intervals_are_shown_asymmetric_and_warned_below_ten_seeds(synthetic_study, cli):
    from peftlab.analysis.analyze import analyze
    from peftlab.analysis.report import _test_note, main_table

    analysis = analyze(synthetic_study, interval="bootstrap")
    note = _test_note(analysis)
    assert "percentile-bootstrap intervals [low, high]" in note and "t-intervals" not in note
    config = analysis.configurations[0]
    row = main_table(analysis)[0]["quality (mean, 95% CI)"]
    assert f"[{config.summary.low:.4f}, {config.summary.high:.4f}]" in row and "±" not in row
    assert any("undercover" in line for line in analysis.limits)
    code, _, err = cli("report", synthetic_study, "--interval", "bootstrap")
    assert code == 0 and "percentile intervals undercover below 10 seeds" in err
    assert "95% t-intervals (mean ± half-width)" in _test_note(analyze(synthetic_study))


def test_tost_calls_a_tight_pair_equivalent_and_a_noisy_one_unresolved():
    base = {s: 0.80 + 0.02 * (s % 3) for s in range(8)}
    tight = compare({s: v + 0.001 * (-1) ** s for s, v in base.items()}, base)
    assert equivalent(tight, 0.01)
    assert judge([tight], 0.01, True)[0].outcome == "equivalent"
    # the same tiny mean difference, but differences that swing by ±0.05 from seed to seed
    noisy = compare({s: v + 0.05 * (-1) ** s for s, v in base.items()}, base)
    assert not equivalent(noisy, 0.01)
    v = judge([noisy], 0.01, True)[0]
    assert v.outcome == "unresolved" and v.detectable > 0.01 and v.seeds_needed > 8
    # TOST at alpha = the 90% t-interval inside the margin
    d = np.array([tight.difference + 0.001 * (-1) ** s for s in range(8)])
    low, high = stats.t.interval(0.90, 7, loc=d.mean(), scale=stats.sem(d))
    assert equivalent(tight, max(abs(low), abs(high)) * 1.0001) and not equivalent(tight, max(abs(low), abs(high)) * 0.9999)


def nct_power(difference, sd, n, level):
    """Power of a two-sided paired t-test from scipy's noncentral t, written out here."""
    critical = stats.t.ppf(1 - level / 2, n - 1)
    shift = difference / (sd / math.sqrt(n))
    return stats.nct.sf(critical, n - 1, shift) + np.nan_to_num(stats.nct.cdf(-critical, n - 1, shift))  # ~0: nan


@pytest.mark.parametrize("n,level,sd", [(3, 0.05, 0.03), (3, 0.0271, 0.01), (4, 0.0106, 0.02), (6, 0.0106, 0.016),
                                        (6, 0.0271 / 4, 0.016), (12, 0.05 / 4, 0.005), (30, 0.001, 0.1)])
def test_power_figures_are_exact_noncentral_t(n, level, sd):
    detectable = detectable_difference(sd / math.sqrt(n), n - 1, level)
    assert nct_power(detectable, sd, n, level) == pytest.approx(0.8, abs=1e-6)
    shortcut = (stats.t.ppf(1 - level / 2, n - 1) + stats.t.ppf(0.8, n - 1)) * sd / math.sqrt(n)
    assert detectable > shortcut  # the shortcut overstates power: its difference is detected less often
    margin = detectable * 0.7
    needed = seeds_needed(sd, margin, level)
    assert nct_power(margin, sd, needed, level) >= 0.8 > nct_power(margin, sd, needed - 1, level)
    assert seeds_needed(sd, margin, level / 4) > needed  # a stricter level needs more seeds


def test_the_shortcut_understates_the_detectable_difference_most_at_few_degrees_of_freedom():
    ratio = {df: detectable_difference(1.0, df, 0.0106) / ((stats.t.ppf(1 - 0.0053, df) + stats.t.ppf(0.8, df)))
             for df in (2, 5)}
    assert 1.10 < ratio[2] < 1.20 and 1.03 < ratio[5] < 1.08  # about 15% at 2 df and 5% at 5 df
    assert seeds_needed(10.0, 1e-4, 0.05) is None  # beyond any practical number


def test_a_significant_difference_is_better_or_worse_by_the_metrics_direction():
    c = compare(dict(enumerate(A)), dict(enumerate(B)))
    assert judge([c], 0.01, higher_is_better=True)[0].outcome == "better"
    assert judge([c], 0.01, higher_is_better=False)[0].outcome == "worse"
    assert judge([c] * 40, 0.01, higher_is_better=True)[0].outcome == "unresolved"  # Holm over 40: p * 40 > 0.05


def test_the_report_carries_a_verdict_per_comparison(synthetic_study):
    from peftlab.analysis.report import write_report

    analysis, outputs = write_report(synthetic_study, margin=0.05)
    assert analysis.margin == 0.05
    markdown = outputs["markdown"].read_text()
    assert "| verdict |" in markdown and "| worse |" in markdown and "1 of 2 comparisons resolved" in markdown
    assert "unresolved: detects ≥" in markdown
    assert "worse" in outputs["html"].read_text() and "worse" in outputs["latex"].read_text()


def test_degenerate_runs_are_named_counted_and_can_be_left_out(synthetic_study, cli):
    from peftlab.analysis.analyze import analyze
    from peftlab.analysis.report import main_table, write_report
    from peftlab.records.store import open_existing

    # runs that recorded no predicted classes, majority rate or base loss cannot be checked, and the limits say so
    assert any(line.startswith("Degenerate runs not checked for") for line in analyze(synthetic_study).limits)
    store = open_existing(synthetic_study)
    for row in store.rows():
        result = json.loads(row["result"])
        collapsed = '"ffn"' in row["axes"] or ('"attention"' in row["axes"] and row["seed"] == 2)
        result["metrics"]["test"].update({"majority_rate": 0.6, "count": 300, "predicted_classes": 1 if collapsed else 2})
        store.finish(row["id"], "done", result, None)
    analysis = analyze(synthetic_study)
    by_label = {c.label: c for c in analysis.configurations}
    assert set(by_label["placement=ffn"].degenerate) == {0, 1, 2}
    assert by_label["placement=attention"].degenerate == {2: "predicts a single class"}
    assert not by_label["placement=all"].degenerate
    row = next(r for r in main_table(analysis) if r["configuration"].startswith("placement=ffn"))
    assert "(n=3, 3 degenerate)" in row["quality (mean, 95% CI)"]
    # ffn never trained: no better / worse / equivalent, and it leaves the Holm family; attention keeps its verdict
    ffn, attention = by_label["placement=ffn"], by_label["placement=attention"]
    assert ffn.verdict.outcome == "not trained" and math.isnan(ffn.p_holm)
    assert row["verdict"].startswith("no verdict: did not train (every run degenerate)")
    assert attention.verdict.outcome in ("better", "worse", "equivalent", "unresolved")
    attention_row = next(r for r in main_table(analysis) if r["configuration"].startswith("placement=attention"))
    assert attention_row["verdict"].endswith("(1 of 3 runs degenerate)")
    assert "No verdict for placement=ffn" in write_report(synthetic_study)[1]["markdown"].read_text()
    counted = {c.label: c for c in analyze(synthetic_study, count_degenerate=True).configurations}
    assert counted["placement=ffn"].verdict.outcome == "worse"  # what the flag asks for: the runs as results
    assert any("4 degenerate run(s), included" in line for line in analysis.limits)
    assert any("Caution: 1 of 3 runs of placement=attention are degenerate" in line for line in analysis.recommendations)
    _, outputs = write_report(synthetic_study)
    markdown = outputs["markdown"].read_text()
    assert "## Degenerate runs" in markdown and "- placement=attention, seed 2: predicts a single class" in markdown
    # left out: ffn has no run left, attention keeps two seeds
    excluded = analyze(synthetic_study, exclude_degenerate=True)
    assert {c.label: c.summary.n for c in excluded.configurations} == {"placement=attention": 2, "placement=all": 3}
    assert any("left out of the statistics" in line for line in excluded.limits)
    code, out, _ = cli("study", "status", synthetic_study)
    assert code == 0 and out.count("degenerate: predicts a single class") == 4 and "(4 of the done runs degenerate)" in out
    code, out, _ = cli("report", synthetic_study, "--exclude-degenerate")
    assert code == 0 and "placement=ffn" not in out.split("Quality:")[0]


@pytest.fixture
def instruction_study(tmp_path):
    """A finished instruction study with generation scores and samples files: 2 placements x 3 seeds."""
    import math

    from peftlab.api import make_plan
    from peftlab.config import validate
    from peftlab.specs import PlanConfig, RunConfig, StudySpec
    from peftlab.studies.grid import expand
    from peftlab.studies.runner import open_study

    spec = validate(StudySpec, {
        "name": "instruct", "base": {"model": "tiny-llama", "task": {"path": "data.jsonl", "kind": "instruction"},
                                     "eval": {"generate": {"examples": 2}}},
        "axes": {"placement": {"all": "all", "attention": "attention"}}, "seeds": [0, 1, 2],
    }, "test")
    study_dir = tmp_path / "study"
    store, _ = open_study(spec, study_dir)
    loss = {"all": [1.50, 1.52, 1.49], "attention": [1.60, 1.63, 1.58]}
    rouge = {"all": [0.40, 0.42, 0.41], "attention": [0.30, 0.33, 0.29]}
    for run in expand(spec):
        config = RunConfig.model_validate(run.config)
        plan = make_plan(PlanConfig(model=config.model, plan=config.plan))
        out = study_dir / "runs" / run.id
        out.mkdir(parents=True)
        name = run.axes["placement"]
        (out / "samples.jsonl").write_text("".join(json.dumps(
            {"index": i, "prompt": f"Repeat {w}.", "reference": w, "base": "", "base_rouge_l": 0.0,
             "adapted": f"{w} ({name}, seed {run.seed})", "rouge_l": 0.5}) + "\n" for i, w in enumerate(["apple", "river"])))
        l, r = loss[name][run.seed], rouge[name][run.seed]
        finish(store, run.id, plan, {"loss": l, "perplexity": math.exp(l), "base_loss": 2.0, "rouge_l": r,
                                     "exact_match": r / 2}, "instruction")
    return study_dir


def test_an_instruction_report_shows_generation_scores_beside_loss_and_a_few_samples(instruction_study):
    from peftlab.analysis.analyze import analyze
    from peftlab.analysis.report import write_report

    analysis, outputs = write_report(instruction_study)
    assert analysis.metric == "metrics.test.loss" and not analysis.higher_is_better
    markdown = outputs["markdown"].read_text()
    header = next(line for line in markdown.splitlines() if line.startswith("| configuration"))
    assert "perplexity (mean, 95% CI)" in header and "ROUGE-L (mean, 95% CI)" in header
    assert "exact match (mean, 95% CI)" in header
    row = next(line for line in markdown.splitlines() if line.startswith("| placement=attention"))
    assert "0.3067 ±" in row  # the attention configuration's mean ROUGE-L, (0.30 + 0.33 + 0.29) / 3
    assert "## Samples" in markdown and "### placement=all" in markdown
    assert "`apple (all, seed 0)`" in markdown and "seed 1)" not in markdown  # the first seed's run
    assert "apple (attention, seed 0)" in outputs["html"].read_text()
    # ROUGE-L as the quality metric: higher is better, the verdict's margin 0.01
    by_rouge = analyze(instruction_study, metric="rouge_l")
    assert by_rouge.metric == "metrics.test.rouge_l" and by_rouge.higher_is_better and by_rouge.margin == 0.01
    attention = next(c for c in by_rouge.configurations if c.label == "placement=attention")
    assert attention.verdict.outcome == "worse"


def test_an_edited_label_is_compared_and_seeded_as_its_newest_configuration(synthetic_study):
    """An edit that changes what `placement=ffn` trains keeps the old runs in the store; the analysis compares the
    new configuration only, and seeds until resolved count its runs only (counting both, the study once added
    seeds without end: every look found more runs than its maximum)."""
    from peftlab.analysis.analyze import analyze
    from peftlab.api import make_plan
    from peftlab.config import load_spec, validate
    from peftlab.records.results import Snapshot
    from peftlab.records.store import open_existing
    from peftlab.specs import PlanConfig, RunConfig, StudySpec
    from peftlab.studies.adaptive import seed_counts
    from peftlab.studies.grid import expand
    from peftlab.studies.runner import open_study
    from peftlab.studies.scheduler import waiting

    old = load_spec(StudySpec, synthetic_study / "study.yaml")
    edited = validate(StudySpec, {**old.model_dump(), "seeds": {"min": 3, "max": 4, "step": 1},
                                  "axes": {"placement": {"all": "all", "attention": "attention",
                                                         "ffn": {"roles": "ffn", "layers": "upper-half"}}}}, "t")
    store, _ = open_study(edited, synthetic_study)
    new_ffn = [r for r in expand(edited) if r.axes["placement"] == "ffn"]
    for run, accuracy in zip(new_ffn, (0.79, 0.80, 0.81)):
        config = RunConfig.model_validate(run.config)
        finish(store, run.id, make_plan(PlanConfig(model=config.model, plan=config.plan)),
               {"accuracy": accuracy, "loss": 1 - accuracy}, "classification", head=130)
    for run_id in waiting(store, ("pending",)):  # the seeds the first look added elsewhere
        config = RunConfig.model_validate(json.loads(store.get(run_id)["config"]))
        finish(store, run_id, make_plan(PlanConfig(model=config.model, plan=config.plan)),
               {"accuracy": 0.8, "loss": 0.2}, "classification", head=130)
    by_label = {c.label: c for c in analyze(synthetic_study).configurations}
    ffn = by_label["placement=ffn"].quality  # the new configuration's runs (and any seed a look added to it)
    assert [ffn[seed] for seed in range(3)] == [0.79, 0.80, 0.81] and set(ffn.values()) <= {0.79, 0.80, 0.81, 0.8}
    assert by_label["placement=ffn"].group == new_ffn[0].group and len(by_label) == 3
    counts = seed_counts(edited, Snapshot.of(open_existing(synthetic_study)), synthetic_study)
    assert max(counts.values()) <= 4


def test_the_verdict_note_states_the_levels_of_the_design_in_use(synthetic_study):
    """Each sentence of the note holds for the numbers beside it: the Holm levels of this many comparisons and
    looks, the power's level, and which families are corrected for what."""
    import yaml

    from peftlab.analysis.analyze import analyze
    from peftlab.analysis.report import verdict_note
    from peftlab.analysis.sequential import Design

    fixed = verdict_note(analyze(synthetic_study))
    assert "at or below 0.025 for the most significant of the 2 comparisons and up to 0.05 for the last" in fixed
    assert "at the two-sided level 0.025 that" in fixed and "across the 2 equivalence tests" in fixed
    assert "sequential" not in fixed and "The two families are corrected separately" in fixed
    spec = yaml.safe_load((synthetic_study / "study.yaml").read_text())
    spec["until_resolved"] = {"max": 6, "step": 3}  # looks at 3 and 6 seeds
    (synthetic_study / "study.yaml").write_text(yaml.safe_dump(spec))
    analysis = analyze(synthetic_study)
    design = Design((3, 6))
    note = verdict_note(analysis)
    strictest, laxest = design.level(0.025), design.level(0.05)
    assert analysis.design.looks == (3, 6) and strictest < laxest < 0.05 / 2 + 0.005  # close to Bonferroni
    assert (f"at any of the looks planned at 3, 6 seeds must be at or below {strictest:.3g} for the most significant "
            f"of the 2 comparisons and up to {laxest:.3g} for the last") in note
    assert f"at the two-sided level {strictest:.3g} per look" in note and "sequential over the looks" in note
    unresolved = next(c.verdict for c in analysis.configurations if c.verdict and c.verdict.outcome == "unresolved")
    assert unresolved.alpha == pytest.approx(strictest)


def test_seeds_needed_beyond_the_designs_maximum_say_what_to_raise():
    from peftlab.analysis.analyze import verdict_text
    from peftlab.analysis.sequential import Design
    from peftlab.analysis.stats import judge

    base = {s: 0.80 + 0.01 * s for s in range(6)}
    noisy = compare({s: v + 0.004 + 0.02 * (-1) ** s for s, v in base.items()}, base)
    design = Design((3, 6), step=3)
    v = judge([noisy], 0.02, True, design)[0]
    assert v.outcome == "unresolved" and v.seeds_needed > 6 and v.max_seeds == 6
    assert v.raise_max_to >= v.seeds_needed  # more looks make each look stricter: never fewer seeds than needed
    extended = design.extended(v.raise_max_to)
    assert seeds_needed(noisy.sd, 0.02, extended.level(0.05)) <= v.raise_max_to
    assert f"raise seeds.max to {v.raise_max_to}" in verdict_text(v)
    assert "seeds.max" not in verdict_text(judge([noisy], 0.02, True, Design((6,)))[0])  # a fixed design: no maximum


def test_configurations_still_improving_at_the_end_are_flagged(synthetic_study):
    from peftlab.analysis.analyze import analyze
    from peftlab.analysis.report import main_table
    from peftlab.records.store import open_existing

    store = open_existing(synthetic_study)
    for row in store.rows():
        result = json.loads(row["result"])
        rising = 0.05 if '"attention"' in row["axes"] else 0.002  # attention still gains 5 points at the end
        result["metrics"]["validation"] = {"accuracy": 0.80, "loss": 0.5}
        result["metrics"]["validation@0.5"] = {"accuracy": 0.70, "loss": 0.6}
        result["metrics"]["validation@0.75"] = {"accuracy": 0.80 - rising, "loss": 0.5 + rising}
        store.finish(row["id"], "done", result, None)
    analysis = analyze(synthetic_study)
    by_label = {c.label: c for c in analysis.configurations}
    attention = by_label["placement=attention"].improvement
    assert attention.since == 0.75 and attention.change == pytest.approx(0.05) and attention.still_improving
    assert not by_label["placement=all"].improvement.still_improving
    line = next(line for line in analysis.limits if line.startswith("Still improving"))
    assert "placement=attention (+0.0500, 3 runs)" in line and "the last 25% of the steps" in line
    assert "placement=ffn" not in line and "about this training budget" in line
    cells = {r["configuration"].rstrip(" *"): r["verdict"] for r in main_table(analysis)}
    assert cells["placement=attention"].endswith("(still improving)") and "still" not in cells["placement=ffn"]
    by_loss = {c.label: c.improvement for c in analyze(synthetic_study, metric="loss").configurations}
    assert by_loss["placement=attention"].metric == "validation loss" and by_loss["placement=attention"].change > 0.02


def test_rank_heat_maps_show_every_role_a_plan_adapts_fused_ones_included():
    from peftlab.analysis.figures import rank_grids
    from peftlab.api import make_plan
    from peftlab.specs import PlanConfig

    phi3 = json.loads(make_plan(PlanConfig(model="tiny-phi3", plan={"placement": "all", "allocation": 4})).to_json())
    llama = json.loads(make_plan(PlanConfig(model="tiny-llama", plan={"placement": "q,v", "allocation": 8})).to_json())
    roles, (phi3_grid, llama_grid) = rank_grids([phi3, llama])
    assert roles == ["attn.q", "attn.v", "attn.qkv", "attn.o", "ffn.gate_up", "ffn.down"]
    layers = phi3["n_layers"]  # the grids have the most layers of any plan
    assert (phi3_grid[:layers, roles.index("ffn.gate_up")] == 4).all() and (phi3_grid[:layers, roles.index("attn.qkv")] == 4).all()
    assert phi3_grid.sum() == 4 * 4 * phi3["n_layers"] and llama_grid.sum() == 2 * 8 * llama["n_layers"]


def test_each_metric_and_cost_is_declared_once_and_read_from_its_record():
    from peftlab import measures

    names = [m.name for m in measures.METRICS]
    assert len(names) == len(set(names)) and len({c.name for c in measures.COSTS}) == len(measures.COSTS)
    from peftlab.tasks.kinds import KINDS, primary_metric

    assert primary_metric({"classification"}) == "accuracy" and primary_metric({"instruction"}) == "loss"
    assert primary_metric({"classification", "instruction"}) == "loss"  # mixed kinds: the loss both have
    for kind in KINDS.values():  # every kind's metrics are declared
        assert all(measures.metric(name) is not None for name in (kind.primary, *kind.metrics)), kind.name
    assert not measures.higher_is_better("metrics.forgetting.increase") and measures.higher_is_better("metrics.test.rouge_l")
    assert measures.default_margin("metrics.test.perplexity", 6.9) == pytest.approx(0.138)  # 2% of the baseline's mean
    assert measures.label("metrics.test.rouge_l") == "ROUGE-L" and measures.label("unknown_thing") == "unknown thing"
    assert [measures.COST_BY_NAME[n].format(v) for n, v in [("memory", 3 * 2**20), ("time", 2.25), ("trainable", 1e6)]] \
        == ["3.0 MiB", "2.2 s", "1,000,000"]


def test_published_references_sit_beside_the_study_s_results(synthetic_study):
    import yaml

    from peftlab.analysis.analyze import analyze
    from peftlab.analysis.report import write_report

    spec = yaml.safe_load((synthetic_study / "study.yaml").read_text())
    spec["references"] = {
        "placement=all": {"value": 0.80, "spread": 0.02, "n": 5, "source": "Paper A, Table 2"},
        "placement=ffn": {"value": 0.80, "interval": [0.79, 0.81], "source": "Paper B"},
        "placement=attention": {"value": 0.25, "metric": "loss", "source": "Paper C"},
        "placement=none": {"value": 0.5, "spread": 0.1, "source": "Paper D"},
    }
    (synthetic_study / "study.yaml").write_text(yaml.safe_dump(spec))
    analysis, _ = write_report(synthetic_study)
    rows = {row.label: row for row in analysis.references}
    assert rows["placement=all"].placement == "within" and rows["placement=all"].published == "0.8 ± 0.02 (n=5)"
    assert rows["placement=ffn"].placement == "below (-0.0917)"  # mean 0.6983 against [0.79, 0.81]
    assert rows["placement=attention"].metric == "metrics.test.loss"
    assert rows["placement=attention"].placement == "no published interval"
    assert rows["placement=none"].ours == "no such configuration in this study"
    markdown = (synthetic_study / "report.md").read_text()
    assert "## Published references" in markdown and "| placement=all | accuracy | 0.8100 [" in markdown
    assert [c.verdict.outcome if c.verdict else None for c in analysis.configurations] == \
        [c.verdict.outcome if c.verdict else None for c in analyze(synthetic_study).configurations]  # verdicts unchanged


def test_a_reference_holds_its_value_inside_its_interval():
    from peftlab.config import validate
    from peftlab.errors import PeftlabError
    from peftlab.specs import Reference

    with pytest.raises(PeftlabError, match="does not hold value"):
        validate(Reference, {"value": 0.9, "interval": [0.7, 0.8], "source": "x"}, "study")
    with pytest.raises(PeftlabError, match="a spread or an interval, not both"):
        validate(Reference, {"value": 0.9, "interval": [0.8, 0.95], "spread": 0.1, "source": "x"}, "study")


def test_a_study_names_its_quality_metric(synthetic_study):
    import yaml

    from peftlab.analysis.analyze import analyze

    spec = yaml.safe_load((synthetic_study / "study.yaml").read_text())
    (synthetic_study / "study.yaml").write_text(yaml.safe_dump({**spec, "metric": "loss"}))
    analysis = analyze(synthetic_study)
    assert analysis.metric == "metrics.test.loss" and not analysis.higher_is_better
    assert analyze(synthetic_study, metric="accuracy").metric == "metrics.test.accuracy"  # the command line wins


def test_a_study_judged_by_a_benchmark_metric(tmp_path):
    """A study's `metric:` names an lm-evaluation-harness score; its verdicts, intervals and frontier are on it."""
    from peftlab.analysis.analyze import analyze
    from peftlab.api import make_plan
    from peftlab.config import validate
    from peftlab.specs import PlanConfig, RunConfig, StudySpec
    from peftlab.studies.grid import expand
    from peftlab.studies.runner import open_study

    spec = validate(StudySpec, {
        "name": "bench", "metric": "metrics.benchmarks.tiny_mc.acc",
        "base": {"model": "tiny-llama", "task": {"path": "data.jsonl", "kind": "instruction"},
                 "eval": {"benchmarks": ["tiny_mc"]}},
        "axes": {"placement": {"all": "all", "attention": "attention"}}, "seeds": [0, 1, 2, 3]}, "test")
    store, _ = open_study(spec, tmp_path / "study")
    scores = {"all": [0.60, 0.62, 0.61, 0.63], "attention": [0.70, 0.71, 0.72, 0.70]}
    for run in expand(spec):
        config = RunConfig.model_validate(run.config)
        plan = make_plan(PlanConfig(model=config.model, plan=config.plan))
        finish(store, run.id, plan, {"loss": 1.0}, "instruction")
        result = json.loads(store.get(run.id)["result"])
        result["metrics"]["benchmarks"] = {"tiny_mc": {"acc": scores[run.axes["placement"]][run.seed], "acc_stderr": 0.1}}
        store.finish(run.id, "done", result, None)
    analysis = analyze(tmp_path / "study")
    assert analysis.metric == "metrics.benchmarks.tiny_mc.acc" and analysis.higher_is_better
    attention = next(c for c in analysis.configurations if c.label == "placement=attention")
    assert attention.summary.mean == pytest.approx(0.7075) and attention.verdict.outcome == "better"


def test_the_python_api_gives_the_reports_numbers_as_data_frames(synthetic_study):
    import peftlab
    from peftlab.analysis.report import main_table

    runs = peftlab.load_runs(synthetic_study)
    assert len(runs) == 9 and set(runs["status"]) == {"done"}
    assert sorted(runs.loc[runs["label"] == "placement=ffn", "metrics.test.accuracy"]) == [0.68, 0.70, 0.715]
    analysis = peftlab.analyse(synthetic_study, margin=0.05)
    table = peftlab.verdicts(analysis)
    assert list(table.index) == ["placement=ffn", "placement=attention", "placement=all"]
    ffn, attention, everything = (table.loc[label] for label in table.index)
    assert everything["baseline"] and everything["outcome"] == "baseline" and math.isnan(everything["p_holm"])
    assert ffn["mean"] == pytest.approx((0.715 + 0.68 + 0.70) / 3) and ffn["n"] == 3
    assert ffn["difference"] == pytest.approx((0.715 + 0.68 + 0.70 - 2.43) / 3) and ffn["outcome"] == "worse"
    assert attention["outcome"] == "unresolved" and attention["margin"] == 0.05
    assert ffn["trainable"] < attention["trainable"] < everything["trainable"]
    # the same verdicts and numbers the report's table prints
    cells = {row["configuration"].rstrip(" *"): row for row in main_table(analysis)}
    for label, row in table.iterrows():
        assert cells[label]["verdict"] == row["verdict"]
        half = (row["ci_high"] - row["ci_low"]) / 2
        assert cells[label]["quality (mean, 95% CI)"] == f"{row['mean']:.4f} ± {half:.4f} (n=3)"
    for name in peftlab.FIGURES:
        figure = peftlab.figure(analysis, name)
        assert figure.axes and figure.axes[0].has_data(), name
    written = peftlab.write_report(synthetic_study, metric="loss")
    assert set(written) == {"html", "markdown", "latex", "summary"} and "loss" in written["markdown"].read_text()


@pytest.mark.parametrize("call, message", [
    (lambda d: __import__("peftlab").analyse(d, test="z"), "--test 'z': valid tests are t and wilcoxon"),
    (lambda d: __import__("peftlab").analyse(d, margin=-1.0), "--margin -1.0: must be a positive difference"),
    (lambda d: __import__("peftlab").analyse(d, metric="bleu"), "--metric 'bleu': not a metric of this study's runs"),
    (lambda d: __import__("peftlab").figure(__import__("peftlab").analyse(d), "pie"), "figure 'pie': valid figures are"),
    (lambda d: __import__("peftlab").load_runs(d / "nothing"), "not a study directory"),
    (lambda d: __import__("peftlab").run_study({"name": "x", "seeds": [0, 0]}, d / "new"), "seeds repeat"),
])
def test_the_python_api_refuses_bad_input_with_the_commands_line(synthetic_study, call, message):
    from peftlab.errors import PeftlabError

    with pytest.raises(PeftlabError, match=re.escape(message)):
        call(synthetic_study)
    assert not (synthetic_study / "new").exists()


def test_the_python_api_sets_study_settings_from_a_mapping():
    import peftlab

    spec = peftlab.load_study("placement", settings={"task.max_train_examples": 200, "train.lr": 1e-3})
    assert spec.base["task"]["max_train_examples"] == 200 and spec.base["train"]["lr"] == 1e-3
    assert "task.max_train_examples=200" in spec.description
