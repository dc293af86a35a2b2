"""Publication-quality figures (PDF + PNG): quality vs cost with the frontier, rank heat maps,
training curves with seed bands, differences vs the baseline with confidence intervals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from peftlab.analysis.analyze import Analysis, metric_name
from peftlab.measures import COST_BY_NAME
from peftlab.models.roles import Role

STYLE = {
    "font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 8,
    "axes.spines.top": False, "axes.spines.right": False, "figure.dpi": 150, "savefig.bbox": "tight",
}
ROLE_ORDER = [role.value for role in Role]  # heat-map columns: every role, fused ones (Phi-3's gate_up) included


class ReportFigure(Figure):
    """A matplotlib Figure that a notebook shows inline whatever its backend (IPython reads `_repr_png_`)."""

    def _repr_png_(self) -> bytes:
        import io

        buffer = io.BytesIO()
        with matplotlib.rc_context(STYLE):
            self.savefig(buffer, format="png")
        return buffer.getvalue()


def _grid(rows: int, cols: int, **options):
    """A figure and its rows x cols axes, outside pyplot: no backend is chosen or drawn on (a notebook shows the
    figure a function returns; a worker process opens no window), and nothing is kept once the figure is dropped."""
    fig = ReportFigure(**options)
    return fig, fig.subplots(rows, cols, squeeze=False)


def _subplots(**options):
    """A figure with one axes (`_grid`)."""
    fig, axes = _grid(1, 1, **options)
    return fig, axes[0, 0]


def _save(fig, folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with matplotlib.rc_context(STYLE):
        fig.savefig(folder / f"{name}.pdf")
        fig.savefig(folder / f"{name}.png")
    return folder / f"{name}.png"


def _half_width(summary) -> float:
    return 0.0 if math.isnan(summary.low) else (summary.high - summary.low) / 2


def quality_vs_cost(analysis: Analysis) -> Figure:
    with matplotlib.rc_context(STYLE):
        fig, ax = _subplots(figsize=(6.0, 4.0))
        for c in analysis.configurations:
            x = c.costs[analysis.cost].mean
            ax.errorbar(x, c.summary.mean, yerr=_half_width(c.summary), fmt="o" if c.on_front else "x",
                        color="C0" if c.on_front else "0.55", capsize=3, ms=6)
            ax.annotate(c.label.split("=", 1)[-1] if "," not in c.label else c.label, (x, c.summary.mean),
                        textcoords="offset points", xytext=(5, 5), fontsize=7)
        front = sorted((c.costs[analysis.cost].mean, c.summary.mean) for c in analysis.configurations if c.on_front)
        ax.plot(*zip(*front), "-", color="C0", alpha=0.6, label="Pareto frontier")
        ax.plot([], [], "x", color="0.55", label="dominated")
        if analysis.cost == "trainable":
            ax.set_xscale("log")
        ax.set_xlabel(COST_BY_NAME[analysis.cost].unit + (" (log scale)" if analysis.cost == "trainable" else ""))
        ax.set_ylabel(f"{metric_name(analysis.metric)} (mean, 95% CI)")
        ax.set_title(f"{analysis.name}: quality vs cost")
        ax.legend(loc="best")
        return fig


def rank_heatmaps(analysis: Analysis) -> Figure:
    plans = []
    for c in analysis.configurations:
        plan_file = analysis.study_dir / "runs" / c.runs[0]["id"] / "plan.json"
        plans.append((c.label, json.loads(plan_file.read_text()) if plan_file.is_file() else None))
    roles, grids = rank_grids([plan for _, plan in plans])
    n_layers = grids[0].shape[0]
    cols = min(3, len(plans))
    rows = math.ceil(len(plans) / cols)
    top = max((s["rank"] for _, p in plans if p for s in p["sites"]), default=1)
    with matplotlib.rc_context(STYLE):
        fig, axes = _grid(rows, cols, figsize=(3.2 * cols, 0.35 * n_layers * rows + 1.4 * rows))
        image = None
        for ax, (label, _), grid in zip(axes.flat, plans, grids):
            image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=top, origin="lower")
            ax.set_title(label, fontsize=8)
            ax.set_xticks(range(len(roles)), [r.split(".")[1] for r in roles], fontsize=7)
            ax.set_yticks(range(n_layers), [str(i) for i in range(n_layers)], fontsize=6)
            ax.set_ylabel("layer", fontsize=7)
        for ax in list(axes.flat)[len(plans):]:
            ax.axis("off")
        fig.colorbar(image, ax=axes.ravel().tolist(), label="LoRA rank (0 = not adapted)", shrink=0.8)
        fig.suptitle("Ranks per layer and role", fontsize=11)
        return fig


def rank_grids(plans: list[dict | None]) -> tuple[list[str], list[np.ndarray]]:
    """The roles any of the plans (plan.json contents; None: missing) adapts, in `Role` order, and each plan's
    rank per layer (rows) and role (columns)."""
    roles = [r for r in ROLE_ORDER if any(p and any(s["role"] == r for s in p["sites"]) for p in plans)] or ROLE_ORDER[:1]
    n_layers = max((p["n_layers"] for p in plans if p), default=1)
    grids = []
    for plan in plans:
        grid = np.zeros((n_layers, len(roles)))
        for s in (plan or {}).get("sites", []):
            grid[s["layer"], roles.index(s["role"])] += s["rank"]
        grids.append(grid)
    return roles, grids


def training_curves(analysis: Analysis) -> Figure:
    with matplotlib.rc_context(STYLE):
        fig, ax = _subplots(figsize=(6.0, 4.0))
        for i, c in enumerate(analysis.configurations):
            curves = {}
            for run in c.runs:
                history = analysis.study_dir / "runs" / run["id"] / "metrics.jsonl"
                if history.is_file():
                    for line in history.read_text().splitlines():
                        row = json.loads(line)
                        if "train_loss" in row:
                            curves.setdefault(row["step"], []).append(row["train_loss"])
            if not curves:
                continue
            steps = sorted(curves)
            mean = np.array([np.mean(curves[s]) for s in steps])
            std = np.array([np.std(curves[s], ddof=1) if len(curves[s]) > 1 else 0.0 for s in steps])
            ax.plot(steps, mean, color=f"C{i % 10}", label=c.label)
            ax.fill_between(steps, mean - std, mean + std, color=f"C{i % 10}", alpha=0.2)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss (mean ± sd over seeds)")
        ax.set_title(f"{analysis.name}: training curves")
        ax.legend(loc="best")
        return fig


def differences(analysis: Analysis) -> Figure:
    compared = [c for c in analysis.configurations if c.comparison is not None]
    with matplotlib.rc_context(STYLE):
        fig, ax = _subplots(figsize=(6.0, 0.45 * max(len(compared), 1) + 1.2))
        for y, c in enumerate(compared):
            cmp = c.comparison
            err = [[cmp.difference - cmp.low], [cmp.high - cmp.difference]] if not math.isnan(cmp.low) else None
            ax.errorbar(cmp.difference, y, xerr=err, fmt="o", color="C3" if c.p_holm < 0.05 else "C0", capsize=3)
            p = "n/a" if math.isnan(c.p_holm) else f"{c.p_holm:.3f}"
            ax.annotate(f"p={p}", (cmp.difference, y), textcoords="offset points", xytext=(6, 6), fontsize=7)
        ax.axvline(0, color="0.4", lw=1, ls="--")
        ax.set_yticks(range(len(compared)), [c.label for c in compared])
        ax.set_xlabel(f"difference in {metric_name(analysis.metric)} vs {analysis.baseline.label} (95% CI)")
        ax.set_title("Differences vs baseline (Holm-corrected p)")
        return fig


FIGURES = {  # name -> (the report's title, how it is drawn from an analysis)
    "quality_vs_cost": ("Quality vs cost, with the Pareto frontier", quality_vs_cost),
    "differences": ("Differences vs the baseline", differences),
    "training_curves": ("Training curves (seed bands)", training_curves),
    "rank_heatmaps": ("Ranks per layer and role", rank_heatmaps),
}


def make_figures(analysis: Analysis, folder: Path) -> dict[str, Path]:
    """Every figure of the report, as PDF and PNG in `folder`: title -> the PNG."""
    return {title: _save(draw(analysis), folder, name) for name, (title, draw) in FIGURES.items()}


def sparsity_heatmap(profile, model: str, folder: Path) -> Path:
    """What the budget bounds (%: the loss increase, or the classifier's representation error) per layer (rows)
    and block at each level (columns), from a sparsity profile."""
    from peftlab.methods.sparselora.profile import MEASURES

    n_layers = max(b.layer for b in profile.blocks) + 1
    columns = [(block, level) for block in ("ffn", "attention") for level in profile.levels]
    grid = np.full((n_layers, len(columns)), np.nan)  # blank: a block SparseLoRA does not sparsify
    for b in profile.blocks:
        for level, increase in zip(profile.levels, b.increase):
            grid[b.layer, columns.index((b.block, level))] = 100 * increase
    with matplotlib.rc_context(STYLE):
        fig, ax = _subplots(figsize=(0.55 * len(columns) + 2.2, 0.3 * n_layers + 1.6))
        top = max(np.nanmax(np.abs(grid)), 1e-9)
        image = ax.imshow(grid, aspect="auto", cmap="RdBu_r", vmin=-top, vmax=top, origin="lower")
        ax.set_xticks(range(len(columns)), [f"{'ffn' if block == 'ffn' else 'attn'} {level:g}" for block, level in columns], fontsize=7,
                      rotation=60, ha="right")
        ax.set_yticks(range(n_layers), [str(i) for i in range(n_layers)], fontsize=6)
        ax.set_ylabel("layer", fontsize=7)
        label = MEASURES[profile.measure]
        fig.colorbar(image, ax=ax, label=f"{label} (%)".replace("the classifier reads", "\nthe classifier reads"),
                     shrink=0.8)
        ax.set_title(f"SparseLoRA sensitivity: {model}, one block sparse at a time", fontsize=9)
        return _save(fig, folder, "sparsity")


def importance_heatmaps(records: list[dict], folder: Path) -> Path:
    """Per-site importance (layer x role), one panel per measure, each scaled to its own maximum."""
    roles = [r for r in ROLE_ORDER if any(s["role"] == r for rec in records for s in rec["sites"])]
    n_layers = max(rec["n_layers"] for rec in records)
    with matplotlib.rc_context(STYLE):
        fig, axes = _grid(1, len(records), figsize=(2.6 * len(records) + 1.0, 0.3 * n_layers + 1.6))
        image = None
        for ax, rec in zip(axes.flat, records):
            grid = np.full((n_layers, len(roles)), np.nan)  # blank: not in the placement
            for s in rec["sites"]:
                grid[s["layer"], roles.index(s["role"])] = s["score"]
            top = np.nanmax(grid) if np.nanmax(grid) > 0 else 1.0
            image = ax.imshow(grid / top, aspect="auto", cmap="magma", vmin=0, vmax=1, origin="lower")
            ax.set_title(rec["measure"], fontsize=9)
            ax.set_xticks(range(len(roles)), [r.split(".")[1] for r in roles], fontsize=7)
            ax.set_yticks(range(n_layers), [str(i) for i in range(n_layers)], fontsize=6)
        axes[0, 0].set_ylabel("layer", fontsize=7)
        fig.colorbar(image, ax=axes.ravel().tolist(), label="score / largest score", shrink=0.8)
        fig.suptitle(f"Importance per layer and role: {records[0]['model']}", fontsize=10, y=1.04)
        return _save(fig, folder, "importance")
