"""The report: `report.html` (self-contained, figures embedded), `report.md` and `tables.tex`."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any

from peftlab.analysis.analyze import Analysis, NotRun, analyze, metric_name, verdict_text
from peftlab.analysis.figures import make_figures
from peftlab.analysis.references import HEADER as REFERENCE_HEADER
from peftlab.analysis.stats import CONSTANT
from peftlab.errors import PeftlabError
from peftlab.files import write_atomic
from peftlab.measures import COST_BY_NAME, COSTS, METRICS, format_p

TABLED = [cost for cost in COSTS if cost.tabled]
COLUMNS = ["configuration", "quality (mean, 95% CI)", "Δ vs baseline (Holm p)", "verdict", "trainable params (% of base)",
           "parameter reduction", *(cost.title for cost in TABLED)]


def secondary_metrics(analysis: Analysis) -> dict[str, str]:
    """The secondary metrics of this study (label -> column): the declared ones every configuration has on the
    test split (instruction tasks: perplexity, ROUGE-L, exact match), but not its quality metric."""
    shown = {m.label: f"metrics.test.{m.name}" for m in METRICS if m.secondary}
    return {name: key for name, key in shown.items() if key != analysis.metric
            and all(key in c.every_metric and c.every_metric[key].n for c in analysis.configurations)}


def columns(analysis: Analysis) -> list[str]:
    """The main table's columns: COLUMNS with the secondary metrics after the verdict."""
    extra = [f"{name} (mean, 95% CI)" for name in secondary_metrics(analysis)]
    return COLUMNS[:4] + extra + COLUMNS[4:]


def main_table(analysis: Analysis) -> list[dict[str, str]]:
    """One row per configuration, cheapest first; frontier members marked with *."""
    rows = []
    for c in analysis.configurations:
        s = c.summary
        flagged = f", {len(c.degenerate)} degenerate" if c.degenerate else ""
        quality = f"{s.mean:.4f}" + (_interval(s, analysis.interval) if s.n > 1 else "") + f" (n={s.n}{flagged})"
        if c is analysis.baseline:
            delta = "baseline"
        elif c.comparison.test == CONSTANT:
            delta = f"{c.comparison.difference:+.4f} ({c.comparison.relative:+.1f}%) on every seed, no test"
        else:
            delta = f"{c.comparison.difference:+.4f} ({c.comparison.relative:+.1f}%), p={format_p(c.p_holm)}"
        trainable, base = c.costs["trainable"].mean, c.costs["base"].mean
        rows.append({
            "configuration": c.label + (" *" if c.on_front else ""),
            "quality (mean, 95% CI)": quality,
            "Δ vs baseline (Holm p)": delta,
            "verdict": ("baseline" if c is analysis.baseline else verdict_text(c.verdict) + _degenerate_count(c))
            + (" (still improving)" if c.improvement and c.improvement.still_improving else ""),
            "trainable params (% of base)": f"{trainable:,.0f} ({100 * trainable / base:.3f}%)",
            "parameter reduction": f"{base / trainable:,.0f}×" if trainable else "-",
            **{cost.title: cost.cell(c.costs[cost.name].mean) for cost in TABLED},
            **{f"{name} (mean, 95% CI)": _summary_cell(c.every_metric[key], analysis.interval)
               for name, key in secondary_metrics(analysis).items()},
        })
    names = columns(analysis)
    return rows + [_not_run_row(n, names) for n in analysis.not_run]


def _not_run_row(n: NotRun, names: list[str]) -> dict[str, str]:
    """The main table's row of a configuration without seed runs: its verdict (none) and its size."""
    row = dict.fromkeys(names, "-")
    row.update({"configuration": n.label, "quality (mean, 95% CI)": "not run (no seed runs)",
                "verdict": verdict_text(n.verdict)})
    if n.trainable and n.base:
        row["trainable params (% of base)"] = f"{n.trainable:,.0f} ({100 * n.trainable / n.base:.3f}%)"
        row["parameter reduction"] = f"{n.base / n.trainable:,.0f}×"
    return row


def _degenerate_count(c) -> str:
    """Beside a verdict of a partly degenerate configuration: how many of its runs learned nothing."""
    if not c.degenerate or (c.verdict and c.verdict.outcome == "not trained"):
        return ""
    return f" ({len(c.degenerate)} of {c.seeds_run} runs degenerate)"


def _summary_cell(s, interval: str) -> str:
    return f"{s.mean:.4f}" + (_interval(s, interval) if s.n > 1 else "")


def samples_lines(analysis: Analysis) -> list[str]:
    """Markdown: per configuration, a few test prompts with the reference, the base model's and the adapted
    model's completions (its first seed's run)."""
    lines = []
    for label, samples in analysis.samples.items():
        lines += ["", f"### {label}", ""]
        for s in samples:
            lines += [f"- **prompt** (end): {_quote(s['prompt'][-300:])}", f"  - reference: {_quote(s['reference'])}"]
            if "base" in s:
                lines.append(f"  - base model (ROUGE-L {s['base_rouge_l']:.3f}): {_quote(s['base'])}")
            lines.append(f"  - adapted (ROUGE-L {s['rouge_l']:.3f}): {_quote(s['adapted'])}")
    return lines


def _quote(text: str, limit: int = 400) -> str:
    text = " ".join(text.split())
    return "`" + (text[:limit] + " …" if len(text) > limit else text).replace("`", "'") + "`"


def tuning_table(analysis: Analysis) -> tuple[list[str], list[list[str]]]:
    """(header, rows): per configuration, the mean validation metric at each rate of its grid, the chosen
    rate marked with *, and a flag where the choice lies at the edge of the grid."""
    if not analysis.tuning:
        return [], []
    width = max(len(c.scores) for c in analysis.tuning.values())
    grid = any(c.tune is not None and c.tune.beyond_the_rate for c in analysis.tuning.values())
    header = ["configuration", *(f"{'point' if grid else 'rate'} {i + 1}" for i in range(width)), "chosen"]
    rows = []
    for label, choice in sorted(analysis.tuning.items()):
        cells = [f"{choice.describe(point)}: " + (choice.stopped.get(point) or ("failed" if score is None else f"{score:.4f}"))
                 + (" *" if point == choice.point else "") for point, score in choice.scores.items()]
        chosen = "pending" if not choice.complete else ("none" if choice.point is None else choice.describe(choice.point))
        flag = " (every rate scored the same)" if choice.undecided else (" (edge of the grid)" if choice.at_edge else "")
        rows.append([label, *cells, *[""] * (width - len(cells)), chosen + flag])
    return header, rows


def _tuning_markdown(analysis: Analysis) -> list[str]:
    header, rows = tuning_table(analysis)
    if not rows:
        return []
    metric = metric_name(next(iter(analysis.tuning.values())).metric)
    lines = ["", "## Learning rates", "", f"Chosen per configuration by the mean {metric} of its tuning runs "
             "(the test split is not read); * marks the choice." + _halving_sentence(analysis), "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _halving_sentence(analysis: Analysis) -> str:
    if not any(c.stopped for c in analysis.tuning.values()):
        return ""
    steps = analysis.tuning_steps
    spent = (f" Tuning trained {steps[0]:,} optimizer steps, {steps[0] / steps[1]:.0%} of the {steps[1]:,} of "
             "training every rate to the end." if steps and steps[1] else "")
    return (" Successive halving stopped some rates early: where, with their validation score there and how many went "
            "on (the choice is among the rates that trained to the end)." + spent)


def _references_markdown(analysis: Analysis) -> list[str]:
    if not analysis.references:
        return []
    lines = ["", "## Published references", "", "Each published result beside this study's own (the verdicts and the "
             "frontier do not read them); the interval is the published value ± the spread it prints, or its own.", "",
             "| " + " | ".join(REFERENCE_HEADER) + " |", "|" + "---|" * len(REFERENCE_HEADER)]
    return lines + ["| " + " | ".join(row.cells()) + " |" for row in analysis.references]


def _references_html(analysis: Analysis) -> str:
    if not analysis.references:
        return ""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in REFERENCE_HEADER)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row.cells()) + "</tr>"
                   for row in analysis.references)
    return f"<h2>Published references</h2><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _tuning_html(analysis: Analysis) -> str:
    header, rows = tuning_table(analysis)
    if not rows:
        return ""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    note = f"<p>{html.escape(_halving_sentence(analysis).strip())}</p>" if _halving_sentence(analysis) else ""
    return f"<h2>Learning rates</h2>{note}<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def degenerate_lines(analysis: Analysis) -> list[str]:
    """One line per degenerate run, or one saying there is none."""
    lines = [f"{c.label}, seed {seed}: {reason}" for c in analysis.configurations
             for seed, reason in sorted(c.degenerate.items())]
    lines += [f"{n.label}: no seed runs; it {n.verdict.reason}" for n in analysis.not_run]
    return lines or ["None."]


def _interval(s, method: str) -> str:
    """t-intervals are symmetric (mean ± half-width); a bootstrap interval is not, so its ends are shown."""
    return f" ± {(s.high - s.low) / 2:.4f}" if method == "t" else f" [{s.low:.4f}, {s.high:.4f}]"


def _test_note(analysis: Analysis) -> str:
    tests = sorted({c.comparison.test for c in analysis.configurations if c.comparison} - {CONSTANT})
    n = sorted({c.summary.n for c in analysis.configurations})
    intervals = "95% t-intervals (mean ± half-width)" if analysis.interval == "t" else \
        "95% percentile-bootstrap intervals [low, high]"
    tested = sum(not math.isnan(c.p_holm) for c in analysis.configurations)
    kind = "sequential p-values (over the planned looks)" if analysis.design.sequential else "p-values"
    return (f"Quality: {metric_name(analysis.metric)} ({'higher' if analysis.higher_is_better else 'lower'} is better), "
            f"n = {', '.join(map(str, n))} seeds per configuration, {intervals}. Δ: difference from the baseline "
            f"**{analysis.baseline.label}** over matched seeds ({', '.join(tests) or 'no test'}); p: {kind}, "
            f"Holm-corrected across the {tested} comparison(s) with a test. {verdict_note(analysis)} * = on the Pareto "
            f"frontier of quality vs {COST_BY_NAME[analysis.cost].label}. Training time counts optimizer steps only; peak "
            f"memory is {_memory_label(analysis)}. Degenerate runs (one predicted class, accuracy within noise of the "
            f"majority class, a test loss not below the base model's, or, judged by a benchmark, one answer to every "
            f"question or an accuracy within noise of always giving its commonest right answer) are "
            f"{'left out' if analysis.exclude_degenerate else 'included and counted in the quality column'}.")


def verdict_note(analysis: Analysis) -> str:
    """What the verdicts mean for this study's design: each family's guarantee, the levels after Holm, the
    power figures' level, and which configurations got no verdict."""
    verdicts = [c.verdict for c in analysis.configurations if c.verdict] + [n.verdict for n in analysis.not_run]
    judged = [v for v in verdicts if v.outcome != "not trained"]
    design, k, alpha, m = analysis.design, len(judged), analysis.design.alpha, analysis.margin
    resolved = sum(v.outcome not in ("unresolved", "not trained") for v in verdicts)
    if not judged:
        return "Verdicts: none (no comparison had a configuration and a baseline that trained)."
    strictest, laxest = design.level(alpha / k), design.level(alpha)
    looks = f"at any of the looks planned at {', '.join(map(str, design.looks))} seeds" if design.sequential else "at its seeds"
    holm = (f"a plain p-value {looks} must be at or below {strictest:.3g} for the most significant of the {k} "
            f"comparisons and up to {laxest:.3g} for the last, by Holm's step-down" if k > 1 else
            f"a plain p-value {looks} must be at or below {laxest:.3g}")
    per_look = " per look" if design.sequential else ""
    power = next((v.alpha for v in judged if not math.isnan(v.detectable)), strictest)
    untrained = [c.label for c in analysis.configurations if c.verdict and c.verdict.outcome == "not trained"]
    return (f"Verdicts: better / worse when the Holm-corrected p < {alpha:g}: with no true difference, the chance "
            f"of any false better or worse among the {k} comparisons is at most {alpha:g} ({holm}). Equivalent "
            f"(±{m:g}) when the TOST p-value (two one-sided t-tests against ±{m:g}, on the larger of the comparison's "
            f"own spread and the spread pooled over the comparisons without degenerate runs)"
            f"{', sequential over the looks,' if design.sequential else ''} "
            f"is below {alpha:g} after Holm's correction across the {k} equivalence tests: with every true difference "
            f"at the margin, the chance of any false equivalent is at most {alpha:g}. The two families are corrected "
            f"separately. Unresolved comparisons show the smallest difference their seeds detect with 80% power "
            f"(exact, noncentral t, at the two-sided level {power:.3g}{per_look} that the most significant of "
            f"{k} comparison(s) needs) and the seeds that would detect ±{m:g}. {resolved} of {len(verdicts)} "
            f"comparisons resolved."
            + (f" No verdict for {', '.join(untrained)}: every run degenerate (`peftlab report --count-degenerate` "
               "compares them anyway)." if untrained else "")
            + (f" No seed runs, so no verdict, for {', '.join(n.label for n in analysis.not_run)}: every tuning run "
               "collapsed on validation at every rate tried." if analysis.not_run else "")
            + _futility_note(analysis))


def _futility_note(analysis: Analysis) -> str:
    """Which comparisons stopped getting seeds for futility, and what that rule does and does not change."""
    stopped = [c.label for c in analysis.configurations if c.verdict and c.verdict.futility is not None]
    if not stopped:
        return ""
    return (f" Futility: {', '.join(stopped)} got no more seeds, since the predictive probability of resolving by "
            f"the last look ({analysis.design.max_seeds} seeds) was below {analysis.design.futility:.0%}; stopping early "
            "never raises either family's error rate (the looks stay as planned), it can only cost power.")


REPRODUCE = ("To reproduce: install the peftlab version (or commit) and packages below, then run the study spec "
             "saved beside this report (`peftlab study run study.yaml`); each run's exact config is in "
             "`runs/<id>/config.yaml`. A study reuses a run only while its inputs are unchanged.")


def _memory_label(analysis: Analysis) -> str:
    kinds = {r.get("cost.peak_memory_kind") for c in analysis.configurations for r in c.runs}
    if kinds == {"rss_increase"}:
        return "the resident memory training added above the process before the model was loaded"
    if kinds == {"cuda_max_allocated"}:
        return "the CUDA memory allocated at the peak"
    return "measured as " + ", ".join(sorted(k for k in kinds if k))


def write_markdown(analysis: Analysis, figures: dict[str, Path], out: Path) -> Path:
    table, names = main_table(analysis), columns(analysis)
    lines = [f"# Study report: {analysis.name}", "", analysis.description.strip(), "", "## Results", "", _test_note(analysis), "",
             "| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    lines += ["| " + " | ".join(row[c] for c in names) + " |" for row in table]
    lines += ["", "Every metric of every configuration (n, mean, sd, 95% CI) is in `summary.csv`."]
    lines += _references_markdown(analysis)
    lines += _tuning_markdown(analysis)
    if analysis.samples:
        lines += ["", "## Samples", "", "Completions of the first test prompts (first seed of each "
                  "configuration); all of them, with per-example scores, are in each run's samples.jsonl."]
        lines += samples_lines(analysis)
    lines += ["", "## Degenerate runs", ""] + [f"- {line}" for line in degenerate_lines(analysis)]
    lines += ["", "## Recommendations", ""] + [f"- {r}" for r in analysis.recommendations]
    lines += ["", "## Limits", ""] + [f"- {r}" for r in analysis.limits]
    lines += ["", "## Provenance", "", REPRODUCE, ""] + [f"- {r}" for r in analysis.provenance]
    lines += ["", "## Figures", ""] + [f"![{title}]({path.relative_to(out.parent)})" for title, path in figures.items()]
    write_atomic(out, "\n".join(lines) + "\n")
    return out


def _latex_escape(text: str) -> str:
    for a, b in [("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("#", r"\#"), ("_", r"\_"), ("±", r"$\pm$"),
                 ("Δ", r"$\Delta$"), ("×", r"$\times$"), ("≥", r"$\geq$"), ("<", r"$<$"), ("*", r"$^\ast$")]:
        text = text.replace(a, b)
    return text


def write_latex(analysis: Analysis, out: Path) -> Path:
    table, names = main_table(analysis), columns(analysis)
    lines = [
        "% requires \\usepackage{booktabs}",
        "\\begin{table}[t]", "\\centering", "\\small",
        "\\begin{tabular}{l" + "r" * (len(names) - 1) + "}", "\\toprule",
        " & ".join(_latex_escape(c) for c in names) + " \\\\", "\\midrule",
    ]
    lines += [" & ".join(_latex_escape(row[c]) for c in names) + " \\\\" for row in table]
    caption = _latex_escape(_test_note(analysis).replace("**", ""))
    lines += ["\\bottomrule", "\\end{tabular}", f"\\caption{{{_latex_escape(analysis.name)}: {caption}}}",
              f"\\label{{tab:{analysis.name}}}", "\\end{table}"]
    write_atomic(out, "\n".join(lines) + "\n")
    return out


CSS = """body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{padding:6px 10px;border-bottom:1px solid #ddd;text-align:right}
th:first-child,td:first-child{text-align:left}th{border-bottom:2px solid #444}figure{margin:1.5em 0}
img{max-width:100%;border:1px solid #eee}table.samples td{text-align:left;vertical-align:top;white-space:pre-wrap;max-width:320px}.note{color:#555;font-size:14px}"""
# After load, the page records how many figures decoded to real images (read back by the render check).
CHECK = """<script>window.addEventListener('load',()=>{const imgs=[...document.images];
const ok=imgs.filter(i=>i.complete&&i.naturalWidth>0&&i.naturalHeight>0).length;
document.body.dataset.figures=ok+'/'+imgs.length;});</script>"""


def _md_inline(text: str) -> str:
    parts = html.escape(text).split("**")
    return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))


def write_html(analysis: Analysis, figures: dict[str, Path], out: Path) -> Path:
    table, names = main_table(analysis), columns(analysis)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in names)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(row[c])}</td>" for c in names) + "</tr>" for row in table)
    figs = "".join(
        f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}">'
        f"<figcaption>{html.escape(title)}</figcaption></figure>"
        for title, path in figures.items()
    )
    items = lambda lines: "".join(f"<li>{_md_inline(x)}</li>" for x in lines)  # noqa: E731
    page = f"""<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>Study report: {html.escape(analysis.name)}</title>
<style>{CSS}</style></head><body><h1>Study report: {html.escape(analysis.name)}</h1>
<p>{html.escape(analysis.description)}</p><h2>Results</h2><p class="note">{_md_inline(_test_note(analysis))}</p>
<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
{_references_html(analysis)}{_tuning_html(analysis)}{_samples_html(analysis)}<h2>Degenerate runs</h2><ul>{items(degenerate_lines(analysis))}</ul>
<h2>Recommendations</h2><ul>{items(analysis.recommendations)}</ul><h2>Limits</h2><ul>{items(analysis.limits)}</ul>
<h2>Provenance</h2><p class="note">{_md_inline(REPRODUCE)}</p><ul>{items(analysis.provenance)}</ul>
<h2>Figures</h2>{figs}{CHECK}</body></html>"""
    write_atomic(out, page)
    return out


def _samples_html(analysis: Analysis) -> str:
    if not analysis.samples:
        return ""
    parts = ["<h2>Samples</h2><p class=\"note\">Completions of the first test prompts (first seed of each "
             "configuration); all of them, with per-example scores, are in each run's samples.jsonl.</p>"]
    for label, samples in analysis.samples.items():
        rows = "".join(
            f"<tr><td>{html.escape(s['prompt'][-300:])}</td><td>{html.escape(s['reference'])}</td>"
            + (f"<td>{html.escape(s['base'])} ({s['base_rouge_l']:.3f})</td>" if "base" in s else "<td>-</td>")
            + f"<td>{html.escape(s['adapted'])} ({s['rouge_l']:.3f})</td></tr>" for s in samples)
        parts.append(f"<h3>{html.escape(label)}</h3><table class=\"samples\"><thead><tr><th>prompt (end)</th>"
                     f"<th>reference</th><th>base model (ROUGE-L)</th><th>adapted (ROUGE-L)</th></tr></thead>"
                     f"<tbody>{rows}</tbody></table>")
    return "".join(parts)


def write_summary_csv(analysis: Analysis, out: Path) -> Path:
    """Every metric of every configuration: n, mean, sd and the 95% interval."""
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["configuration", "metric", "n", "mean", "std", "ci_low", "ci_high"])
    for c in analysis.configurations:
        for name, s in c.every_metric.items():
            writer.writerow([c.label, name, s.n, s.mean, s.std, s.low, s.high])
    write_atomic(out, buffer.getvalue())
    return out


def write_report(study_dir: Path, **options: Any) -> tuple[Analysis, dict[str, Path]]:
    """Analyse the study and write report.html, report.md, tables.tex and figures/ into `study_dir` (each
    place checked first: nothing is half written when one is in the way)."""
    for name in ("report.html", "report.md", "tables.tex", "summary.csv", "figures"):
        path = study_dir / name
        wanted = "a directory" if name == "figures" else "a file"
        if path.exists() and path.is_dir() != (name == "figures"):
            raise PeftlabError(f"{path}: is {'a file' if name == 'figures' else 'a directory'}, where the report "
                               f"writes {wanted}; move it aside")
    analysis = analyze(study_dir, **options)
    figures = make_figures(analysis, study_dir / "figures")
    outputs = {
        "html": write_html(analysis, figures, study_dir / "report.html"),
        "markdown": write_markdown(analysis, figures, study_dir / "report.md"),
        "latex": write_latex(analysis, study_dir / "tables.tex"),
        "summary": write_summary_csv(analysis, study_dir / "summary.csv"),
    }
    return analysis, outputs
