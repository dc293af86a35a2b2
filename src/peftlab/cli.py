"""The command line: a table of command name -> typed function. Bad input exits 2 with one line."""

from __future__ import annotations

import sys
import traceback
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape as rich_escape
from rich.table import Table
from typer import TyperException
from typer._click.exceptions import NoArgsIsHelpError

from peftlab import __version__, measures, quiet_libraries
from peftlab.config import load_spec, set_dotted, validate
from peftlab.errors import PeftlabError, PeftlabWarning
from peftlab.files import check_output, write_atomic
from peftlab.measures import COSTS, quality_names
from peftlab.methods.specs import FIXED_SPARSITY, PEFT_TYPES, SPECS
from peftlab.plans.allocation import ALLOCATIONS, MEASURES, check_measure, parse_allocation, steps_help
from peftlab.records.degenerate import degenerate_reason
from peftlab.records.store import check_study_dir
from peftlab.specs import PlanConfig
from peftlab.tasks.kinds import KINDS

if TYPE_CHECKING:
    from peftlab.train.result import RunResult

_library_warning = warnings.showwarning
app = typer.Typer(
    help="peftlab: where to adapt, how much rank, which method, and what it costs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


# Options that run, importance and recommend share: where the model and the training data come from.
ModelOption = Annotated[Optional[str], typer.Option(help="Preset, catalog name, local dir or hub id (default minilm-l6).")]
TaskOption = Annotated[Optional[str], typer.Option(help="Bundled task: reviews | reviews-instruct.")]
DataOption = Annotated[Optional[Path], typer.Option(help="Training data file (CSV / JSON / JSONL); needs --kind.")]
DatasetOption = Annotated[Optional[str], typer.Option(
    help="A datasets id or local dataset, ID or ID:CONFIG (glue:sst2); needs --kind, except GLUE tasks. Splits: task.train_split, task.test_split.")]
KindOption = Annotated[Optional[str], typer.Option(help=f"{' | '.join(KINDS)} (with --data).")]


def _console(stderr: bool = False) -> Console:
    console = Console(stderr=stderr)
    return console if console.is_terminal else Console(stderr=stderr, width=200)


def _allocation_override(allocation: str | None, rank: int | None) -> dict[str, Any]:
    """`--allocation linear(16->4)` and/or `--rank 8` -> dotted overrides. `--rank` alone changes the base
    rank of whatever allocation the config holds (uniform, role-weighted, from-scores, importance) and is
    an error where that allocation has none (linear, budget)."""
    if allocation is None:
        return {} if rank is None else {"plan.allocation.rank": rank}
    try:
        data = parse_allocation(allocation)
    except ValueError as exc:
        raise PeftlabError(f"--allocation: {exc}") from None
    if rank is not None:
        if "rank" not in ALLOCATIONS[data["kind"]].model_fields:
            raise PeftlabError(f"--rank does not apply to allocation {data['kind']!r}")
        data["rank"] = rank
    return {"plan.allocation": data}


@app.command()
def plan(
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML with `model:` and `plan:`.")] = None,
    model: Annotated[Optional[str], typer.Option(help="Preset, catalog name, local dir or hub id.")] = None,
    placement: Annotated[Optional[str], typer.Option(help="all | attention | ffn | roles such as q,v")] = None,
    layers: Annotated[Optional[str], typer.Option(help="all | lower-half | upper-half | every-2nd | last-4 | 0,2,5 ...")] = None,
    modules: Annotated[Optional[str], typer.Option(help="PEFT-style module names, comma-separated (warned if ambiguous).")] = None,
    fused: Annotated[Optional[str], typer.Option(help="whole (one update per fused projection, PEFT's) | parts (one per "
                                                 "part with its own rank, the LoRA paper's)")] = None,
    rank: Annotated[Optional[int], typer.Option(help="Uniform rank (or the base rank of --allocation).")] = None,
    allocation: Annotated[Optional[str], typer.Option(help="uniform(8) | linear(16->4) | attention-heavy(8) | budget(N, shape) | from-scores(file) | importance(measure)")] = None,
    alpha: Annotated[Optional[str], typer.Option(help="2r (alpha = 2r, the default) | 16 (fixed)")] = None,
    bias: Annotated[Optional[str], typer.Option(help="Bias terms trained too: none | adapted | all")] = None,
    norms: Annotated[bool, typer.Option("--norms", help="Train every LayerNorm / RMSNorm weight too.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON instead of a table.")] = False,
    output: Annotated[Optional[Path], typer.Option(help="Also write the plan as JSON to this file.")] = None,
) -> None:
    """Show which sites get adapted, with which rank, and the exact trainable parameters."""
    from peftlab.api import make_plan

    overrides: dict[str, Any] = {
        "model.name": model,
        "plan.placement.roles": placement,
        "plan.placement.layers": layers,
        "plan.placement.modules": modules.split(",") if modules else None,
        "plan.placement.fused": fused,
        **_allocation_override(allocation, rank),
        "plan.alpha": alpha,
        "plan.bias": bias,
        "plan.norms": True if norms else None,
    }
    spec = _load(PlanConfig, config, {k: v for k, v in overrides.items() if v is not None})
    if output is not None:
        check_output(output, "--output", directory=False)
    result = make_plan(spec)
    for warning in result.warnings:
        _console(stderr=True).print(f"[yellow]warning:[/] {warning}", highlight=False)
    if output is not None:
        write_atomic(output, result.to_json() + "\n")
    if as_json:
        sys.stdout.write(result.to_json() + "\n")
        return
    _print_plan(result)


def _print_plan(result) -> None:
    table = Table(title=f"{result.model} ({result.model_type}, {result.n_layers} layers)", title_justify="left")
    for name in ("layer", "role", "path", "in", "out", "rank", "alpha", "params"):
        table.add_column(name, justify="right" if name not in ("role", "path") else "left")
    for p in result.sites:
        s = p.site
        path = f"{s.path}[{s.out_slice[0]}:{s.out_slice[1]}]" if s.out_slice else s.path
        table.add_row(str(s.layer), s.role.value, path, str(s.in_features), str(s.out_features),
                      str(p.rank), f"{p.alpha:g}", f"{p.params:,}")
    console = _console()
    console.print(table)
    what = f" (A and B) over {len(result.sites)} sites"
    if result.extra:
        totals = result.totals()
        what = (f" ({result.adapter_params:,} A and B over {len(result.sites)} sites + {totals['bias_params']:,} in "
                f"{sum(e.kind == 'bias' for e in result.extra)} bias terms + {totals['norm_params']:,} in norms)")
    console.print(
        f"trainable parameters: {result.trainable_params:,}{what} = "
        f"{100 * result.share:.4f}% of {result.base_params:,} base parameters",
        highlight=False,
    )


@app.command()
def run(
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML with model, task, plan, method, train.")] = None,
    model: ModelOption = None,
    task: TaskOption = None,
    data: DataOption = None,
    dataset: DatasetOption = None,
    kind: KindOption = None,
    method: Annotated[Optional[str], typer.Option(help=" | ".join(SPECS) + f" (peft:TYPE, TYPE one of {', '.join(PEFT_TYPES)})")] = None,
    placement: Annotated[Optional[str], typer.Option(help="all | attention | ffn | roles such as q,v")] = None,
    layers: Annotated[Optional[str], typer.Option(help="all | lower-half | upper-half | every-2nd | 0,2,5 ...")] = None,
    rank: Annotated[Optional[int], typer.Option(help="Uniform rank (or the base rank of --allocation).")] = None,
    allocation: Annotated[Optional[str], typer.Option(help="uniform(8) | linear(16->4) | budget(N, shape) ...")] = None,
    budget: Annotated[Optional[int], typer.Option(help="Trainable parameters to match: the method's rank, width or prefix length is chosen.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate.")] = None,
    epochs: Annotated[Optional[float], typer.Option(help="Training epochs.")] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="Optimizer steps (overrides --epochs).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Training batch size.")] = None,
    max_length: Annotated[Optional[int], typer.Option(help="Tokens per example.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Training seed.")] = None,
    generate: Annotated[Optional[int], typer.Option(
        help="Instruction tasks: complete this many test prompts and score them (ROUGE-L, exact match).")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto (cuda, then mps, then cpu) | cuda | mps | cpu")] = None,
    gradient_checkpointing: Annotated[Optional[bool], typer.Option(
        "--gradient-checkpointing/--no-gradient-checkpointing",
        help="Recompute activations in the backward pass: less memory, more time.")] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option(
        help="Save the training state every N steps; the same command resumes after a kill.")] = None,
    sharding: Annotated[Optional[str], typer.Option(
        help="none | fsdp: over several processes (accelerate launch, torchrun), split each layer block over them.")] = None,
    track: Annotated[Optional[str], typer.Option(
        help="Experiment trackers, comma-separated: tensorboard, mlflow, wandb (offline by default).")] = None,
    output: Annotated[Optional[Path], typer.Option(help="Run directory (default runs/<model>-<task>-<method>-<hash>).")] = None,
) -> None:
    """Train and evaluate one configuration; write config, plan, metrics, result and adapter."""
    from peftlab.api import run as run_config
    from peftlab.specs import RunConfig, config_id
    from peftlab.train.distributed import is_main

    overrides = _run_overrides(dict(model=model, task=task, data=data, dataset=dataset, kind=kind,
                                    max_length=max_length, method=method, placement=placement, layers=layers,
                                    allocation=allocation, rank=rank, budget=budget, lr=lr, epochs=epochs,
                                    max_steps=max_steps, batch_size=batch_size, seed=seed,
                                    generate=generate, device=device, gradient_checkpointing=gradient_checkpointing,
                                    checkpoint_every=checkpoint_every, sharding=sharding, track=track))
    spec = _load(RunConfig, config, overrides)
    if output is None:
        task_name = spec.task.name or (spec.task.path.stem if spec.task.path else "data")
        output = Path("runs") / f"{Path(spec.model.name).name}-{task_name}-{spec.method.name}-{config_id(spec)}"
    result = run_config(spec, output)
    if not is_main():  # one of several processes of this run: the main one reports
        return
    _print_result(result, output)
    if not result.done:
        raise typer.Exit(1)


RUN_FLAGS = {"model": "model.name", "task": "task.name", "dataset": "task.dataset", "kind": "task.kind",
             "max_length": "task.max_length", "placement": "plan.placement.roles", "layers": "plan.placement.layers",
             "budget": "budget",
             "lr": "train.lr", "epochs": "train.epochs", "max_steps": "train.max_steps", "batch_size": "train.batch_size",
             "seed": "train.seed", "generate": "eval.generate.examples", "device": "train.device",
             "gradient_checkpointing": "train.gradient_checkpointing", "checkpoint_every": "train.checkpoint_every",
             "sharding": "train.sharding"}
"""`run`'s flags that set one config field as given."""


def _run_overrides(flags: dict[str, Any]) -> dict[str, Any]:
    """The dotted config fields `run`'s flags set (those given)."""
    method, data, track = flags["method"], flags["data"], flags["track"]
    overrides: dict[str, Any] = {
        **{RUN_FLAGS[name]: value for name, value in flags.items() if name in RUN_FLAGS},
        "task.path": str(data) if data else None,
        "method.name": method.partition(":")[0] if method else None,
        "method.type": method.partition(":")[2] or None if method else None,
        **_allocation_override(flags["allocation"], flags["rank"]),
        "tracking.backends": [b.strip() for b in track.split(",")] if track is not None else None,
    }
    return {k: v for k, v in overrides.items() if v is not None}


def _print_result(result: RunResult, output: Path) -> None:
    from peftlab.methods.registry import METHODS

    console = _console()
    if result.status == "stopped":
        scores = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.get("validation", {}).items() if isinstance(v, float))
        console.print(f"stopped after step {result.cost.steps} (train.stop_at){': validation ' + scores if scores else ''}; "
                      f"the same config without train.stop_at resumes from {output}.partial", highlight=False)
        return
    if not result.done:
        console.print(f"[red]run failed:[/] {result.error} (record in {output}/result.json)", highlight=False)
        return
    table = Table(title=f"result: {output}", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for split, values in result.metrics.items():
        for name, value in values.items():
            for inner, shown_value in (value.items() if isinstance(value, dict) else [("", value)]):  # benchmarks
                if name != "count":
                    shown = f"{name} {inner}" if inner else measures.label(name)
                    table.add_row(f"{split} {shown}", f"{shown_value:.4f}" if isinstance(shown_value, float)
                                  else str(shown_value))
    cost = result.cost
    table.add_row("trainable params (adapter + head)", f"{cost.adapter_params:,} + {cost.head_params:,}")
    table.add_row("% of total params", f"{100 * cost.trainable_share:.3f}%")
    if result.budget:
        match = result.budget
        chosen = f"{match['parameter']} {match['size']}" if match["size"] else "fixed size"
        table.add_row("budget (chosen size)", f"{match['target']:,} ({chosen})")
    if cost.quantized_weight_bytes:
        table.add_row("4-bit weights (MiB)", f"{cost.quantized_weight_bytes / 2**20:,.1f}")
    table.add_row("training time (s, optimizer steps)", f"{cost.train_seconds:.1f}")
    cache = result.speed.get("prefix_cache") or {}
    if cache.get("used"):
        how = "loaded" if cache["loaded"] else "built"
        table.add_row(f"prefix cache (layers < {cache['layer']}, {how}, s, not in training time)",
                      f"{cache['build_seconds']:.1f}")
    if cost.importance_probe_seconds is not None:  # once per study, then cached
        table.add_row("importance probe (s, not in training time)", f"{cost.importance_probe_seconds:.1f}")
    table.add_row("tokens/s", f"{cost.tokens_per_second:,.0f}")
    if cost.generated_tokens is not None:
        table.add_row("generation (s, tokens/s; completions in samples.jsonl)",
                      f"{cost.generation_seconds:.1f}, {cost.generation_tokens_per_second:,.1f}")
    for row in METHODS[(result.config or {}).get("method", {}).get("name", "lora")].summary_rows(result.method):
        table.add_row(*row)
    table.add_row("padding (% of positions)", f"{100 * cost.padding_fraction:.1f}%")
    table.add_row(f"peak memory ({cost.peak_memory_kind}, MiB)", f"{cost.peak_memory_bytes / 2**20:,.0f}")
    if cost.peak_memory_process_bytes:
        table.add_row("peak memory of the process (MiB)", f"{cost.peak_memory_process_bytes / 2**20:,.0f}")
    if cost.adapter_bytes is not None:
        table.add_row("adapter size (KiB)", f"{cost.adapter_bytes / 1024:,.0f}")
    for kind, ms in cost.latency_ms_per_batch.items():
        table.add_row(f"latency per batch, {kind} (ms)", f"{ms:.1f}")
    console.print(table)
    if cache.get("note"):
        console.print(f"prefix cache {cache['note']}", highlight=False)
    reason = degenerate_reason({f"metrics.test.{k}": v for k, v in result.metrics.get("test", {}).items()})
    if reason:
        console.print(f"[yellow]warning:[/] degenerate run: {reason}; try another learning rate", highlight=False)


def _load(cls, config: Path | None, overrides: dict[str, Any]):
    if config is not None:
        return load_spec(cls, config, overrides)
    data: dict[str, Any] = {}
    for dotted, value in overrides.items():
        set_dotted(cls, data, dotted, value, "command line")
    return validate(cls, data, "command line")


def _probe_config(config, model, task, data, dataset, kind, placement, layers, batch_size, max_length, lr):
    from peftlab.specs import RunConfig

    overrides = {"model.name": model, "task.name": task, "task.path": str(data) if data else None,
                 "task.dataset": dataset, "task.kind": kind,
                 "task.max_length": max_length, "plan.placement.roles": placement, "plan.placement.layers": layers,
                 "train.batch_size": batch_size, "train.lr": lr}
    return _load(RunConfig, config, {k: v for k, v in overrides.items() if v is not None})


@app.command()
def sparsity(
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML with model, task, plan and train.")] = None,
    model: ModelOption = None,
    task: TaskOption = None,
    data: DataOption = None,
    dataset: DatasetOption = None,
    kind: KindOption = None,
    placement: Annotated[Optional[str], typer.Option(help="Sites the run adapts: all | attention | ffn | roles such as q,v")] = None,
    levels: Annotated[str, typer.Option(help="Comma-separated sparsities each block is measured at.")] = "0.25,0.5,0.75,0.9",
    batches: Annotated[int, typer.Option(help="Training batches measured on.")] = 4,
    batch_size: Annotated[Optional[int], typer.Option(help="Examples per batch.")] = None,
    max_length: Annotated[Optional[int], typer.Option(help="Tokens per example.")] = None,
    output: Annotated[Path, typer.Option(help="Folder for sparsity.json/.csv and sparsity.png.")] = Path("sparsity"),
) -> None:
    """SparseLoRA's sensitivity: each layer's FFN and attention alone at each sparsity, the training loss increase
    and FLOPs saved; then the allocation `sparsity: auto(loss_budget=...)` picks for a few budgets."""
    from peftlab.analysis.figures import sparsity_heatmap
    from peftlab.resolve.sparsity import sparsity_profile, write_profile

    try:
        measured = [float(v) for v in levels.split(",") if v.strip()]
    except ValueError:
        raise PeftlabError(f"--levels {levels!r}: comma-separated numbers between 0 and 1, e.g. 0.25,0.5,0.9") from None
    from peftlab.specs import RunConfig

    spec = _probe_config(config, model, task, data, dataset, kind, placement, None, batch_size, max_length, None)
    dumped = spec.model_dump(mode="json", by_alias=True)
    method = {k: v for k, v in dumped["method"].items() if k not in FIXED_SPARSITY} if dumped["method"]["name"] == "sparselora" \
        else {"name": "sparselora"}
    method["sparsity"] = {**(method.get("sparsity") or {}), "levels": measured, "batches": batches}
    spec = validate(RunConfig, {**dumped, "method": method}, "command line")
    check_output(output, "--output", directory=True)
    profile, allocations = sparsity_profile(spec)
    paths = write_profile(profile, allocations, spec.model.name, output)
    figure = sparsity_heatmap(profile, spec.model.name, output)
    _print_sparsity(profile, allocations)
    _console().print(f"wrote {', '.join(map(str, paths))} and {figure}", highlight=False)


def _print_sparsity(profile, allocations) -> None:
    from peftlab.methods.sparselora.profile import MEASURES as PROFILE_MEASURES

    table = Table(title=f"{PROFILE_MEASURES[profile.measure]}, one block sparse at a time (base loss {profile.base_loss:.4f}, "
                        f"{profile.examples} examples{', cached' if profile.cached else ''})")
    table.add_column("layer")
    for block in ("ffn", "attention"):
        for level in profile.levels:
            table.add_column(f"{block} {level:g}", justify="right")
    rows: dict[int, dict[str, list[float]]] = {}
    for b in profile.blocks:
        rows.setdefault(b.layer, {})[b.block] = b.increase
    for layer, blocks in sorted(rows.items()):
        cells = [f"{100 * v:+.2f}%" if block in blocks else "" for block in ("ffn", "attention")
                 for v in blocks.get(block, [0.0] * len(profile.levels))]
        table.add_row(str(layer), *cells)
    _console().print(table)
    curve = Table(title="allocations: the largest FLOP saving within each budget (predicted from the profile)")
    for column in ("budget", "sparse blocks", "predicted increase", "frozen FLOPs saved"):
        curve.add_column(column, justify="right")
    for budget, allocation in allocations.items():
        sparse = sum(level > 0 for level in allocation.levels.values())
        curve.add_row(f"{budget:.1%}", f"{sparse} of {len(allocation.levels)}", f"{allocation.predicted_increase:.2%}",
                      "dense (LoRA)" if allocation.dense else f"{allocation.saving:.1%}")
    _console().print(curve)


@app.command()
def importance(
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML with model, task, plan (placement) and train.")] = None,
    model: ModelOption = None,
    task: TaskOption = None,
    data: DataOption = None,
    dataset: DatasetOption = None,
    kind: KindOption = None,
    measure: Annotated[str, typer.Option(help=f"Comma-separated: {', '.join(MEASURES)}.")] = "gradient,fisher,activation,update",
    placement: Annotated[Optional[str], typer.Option(help="Sites to score: all | attention | ffn | roles such as q,v")] = None,
    layers: Annotated[Optional[str], typer.Option(help="all | lower-half | upper-half | 0,2,5 ...")] = None,
    steps: Annotated[int, typer.Option(help=steps_help())] = 64,
    rank: Annotated[float, typer.Option(help="Rank of the update / adalora probe runs; the activation measure's mean rank.")] = 8.0,
    batch_size: Annotated[Optional[int], typer.Option(help="Probe batch size.")] = None,
    max_length: Annotated[Optional[int], typer.Option(help="Tokens per example.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate of the update / adalora probe runs.")] = None,
    seed: Annotated[int, typer.Option(help="Probe seed.")] = 0,
    output: Annotated[Path, typer.Option(help="Folder for importance-<measure>.json/.csv and importance.png.")] = Path("importance"),
) -> None:
    """Score every site (layer x role) by importance; the JSON feeds `--allocation from-scores(file)`."""
    import json

    from peftlab.analysis.figures import importance_heatmaps
    from peftlab.importance.probe import importance_scores, write_scores

    measures = [m.strip() for m in measure.split(",") if m.strip()]
    for name in measures or [measure]:
        check_measure(name)
        _probe_settings(name, rank, steps, seed)
    spec = _probe_config(config, model, task, data, dataset, kind, placement, layers, batch_size, max_length, lr)
    check_output(output, "--output", directory=True)
    records = []
    for name in measures:
        record = json.loads(importance_scores(spec, name, rank, steps, seed).read_text())
        write_scores(record, output)
        records.append(record)
    figure = importance_heatmaps(records, output)
    _print_importance(records)
    _console().print(f"wrote {output}/importance-<measure>.json and .csv for {', '.join(measures)}; {figure}", highlight=False)


def _probe_settings(measure: str, rank: float, steps: int, seed: int) -> None:
    """--rank, --steps and --seed of a probe, validated as an importance allocation's fields."""
    from peftlab.plans.allocation import ImportanceAllocation

    values = {"kind": "importance", "measure": measure, "rank": rank, "steps": steps, "seed": seed}
    validate(ImportanceAllocation, values, "command line")


def _print_importance(records: list[dict[str, Any]]) -> None:
    first = records[0]
    table = Table(title=f"importance: {first['model']} on {first['task']} (score / mean score)", title_justify="left")
    for column in ("layer", "role", *(r["measure"] for r in records)):
        table.add_column(column, justify="left" if column == "role" else "right")
    means = [sum(s["score"] for s in r["sites"]) / len(r["sites"]) or 1.0 for r in records]
    for i, site in enumerate(first["sites"]):
        values = [f"{r['sites'][i]['score'] / mean:.2f}" for r, mean in zip(records, means)]
        table.add_row(str(site["layer"]), site["role"], *values)
    _console().print(table)


@app.command()
def recommend(
    budget: Annotated[int, typer.Option(help="Trainable adapter parameters (A and B) to spend.")],
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML with model, task, plan (placement), method, train.")] = None,
    model: ModelOption = None,
    task: TaskOption = None,
    data: DataOption = None,
    dataset: DatasetOption = None,
    kind: KindOption = None,
    measure: Annotated[str, typer.Option(help=f"Importance measure: {' | '.join(MEASURES)}.")] = "fisher",
    study: Annotated[Optional[Path], typer.Option(help="A study directory whose measured results to weigh in.")] = None,
    placement: Annotated[Optional[str], typer.Option(help="Sites to plan over: all | attention | ffn | roles such as q,v")] = None,
    layers: Annotated[Optional[str], typer.Option(help="all | lower-half | upper-half | 0,2,5 ...")] = None,
    steps: Annotated[int, typer.Option(help=steps_help())] = 64,
    output: Annotated[Optional[Path], typer.Option(help="Write a run config (YAML) that trains the proposed plan.")] = None,
) -> None:
    """Propose a plan under a parameter budget and say why."""
    from peftlab.analysis.recommend import recommend as propose

    check_measure(measure)
    if budget < 1:
        raise PeftlabError(f"--budget {budget}: give the trainable parameters to spend, a positive number")
    _probe_settings(measure, 8.0, steps, 0)
    if study is not None and not (study / "study.yaml").is_file():
        raise PeftlabError(f"--study {study}: not a study directory (no study.yaml)")
    spec = _probe_config(config, model, task, data, dataset, kind, placement, layers, None, None, None)
    if output is not None:
        check_output(output, "--output", directory=False)
    result = propose(spec, budget, measure, steps, study)
    _print_plan(result.plan)
    console = _console()
    for line in result.lines:
        console.print("- " + line, highlight=False)
    if output is not None:
        write_atomic(output, result.config.to_yaml())
        console.print(f"wrote {output} (train it with: peftlab run -c {output})", highlight=False)


study_app = typer.Typer(help="Studies: grids of runs x seeds in a resumable store.", no_args_is_help=True)
app.add_typer(study_app, name="study")


@study_app.command("run")
def study_run(
    source: Annotated[str, typer.Argument(help="Study spec (YAML), a shipped study name, or a study directory to resume.")],
    directory: Annotated[Optional[Path], typer.Option("--dir", help="Study directory (default studies/<name>).")] = None,
    jobs: Annotated[int, typer.Option(help="Runs at a time (local executor).")] = 1,
    executor: Annotated[str, typer.Option(help="local | ray")] = "local",
    address: Annotated[Optional[str], typer.Option(help="Ray cluster address (default: start a local one).")] = None,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="Run failed runs again.")] = False,
    rerun_changed: Annotated[bool, typer.Option("--rerun-changed", help="Run again the finished runs whose inputs "
                                                "(data files, a local model directory) changed since they ran.")] = False,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads per run (default cores / jobs).")] = None,
    gpus_per_run: Annotated[float, typer.Option(help="GPUs each Ray run declares; 2 or more: the run trains over that many processes, one per GPU (data parallel).")] = 0.0,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what each configuration will train, then stop.")] = False,
    data: Annotated[Optional[Path], typer.Option(
        help="Train and test on this data file instead of the study's (CSV / JSON / JSONL; Alpaca, Dolly or chat "
             "rows for an instruction study); default directory studies/<name>-<file stem>.")] = None,
    settings: Annotated[Optional[list[str]], typer.Option(
        "--set", help="KEY=VALUE into the study's base run config, e.g. task.max_train_examples=2000 (repeatable; "
                      "VALUE is read as YAML).")] = None,
) -> None:
    """Run a study, or resume one: done runs are skipped, new runs of an edited spec are added."""
    from peftlab.studies.preview import preview
    from peftlab.studies.runner import run_study
    from peftlab.studies.source import study_spec

    spec, study_dir = study_spec(source, directory, data, settings)
    if not dry_run:
        check_study_dir(study_dir)
    previews = preview(spec)
    _print_preview(spec, previews)
    if dry_run:
        invalid = sum(not p.valid for p in previews)
        tuning = ""
        if spec.tune is not None:
            tuning = f" after {sum(len(p.points) for p in previews) * len(spec.tune.seeds)} tuning runs"
            if spec.tune.rungs:
                tuning += (f" (successive halving: compared at {', '.join(f'{f:.0%}' for f in spec.tune.rungs)} of "
                           f"their steps, {spec.tune.keep:.0%} of the rates going on at each)")
        seeds = f"{len(spec.seeds)} seeds"
        if spec.until_resolved is not None:
            rounds = spec.until_resolved
            seeds = (f"{len(spec.seeds)} to {rounds.max} seeds (more only where a comparison is unresolved"
                     + (f" and its chance of resolving by {rounds.max} is at least {rounds.futility:.0%})"
                        if rounds.futility else ")"))
        _console().print(f"dry run: {len(previews)} configurations x {seeds}{tuning}, {invalid} invalid; "
                         f"nothing was written ({study_dir})", highlight=False)
        return
    if not spec.axes:
        _console().print(f"study {spec.name} has no axes: one configuration (its base) x {len(spec.seeds)} seed(s)",
                         highlight=False)
    store = run_study(spec, study_dir, jobs=jobs, executor=executor, address=address, retry_failed=retry_failed,
                      threads=threads, gpus=gpus_per_run, rerun_changed=rerun_changed)
    _print_summary(store.counts(), study_dir)
    failed = store.counts().get("failed", 0)
    if failed:
        _error(f"{failed} of {store.count()} runs failed: {_failure_reasons(store)}; "
               f"see `peftlab study status {study_dir}`, and --retry-failed runs them again")
        raise typer.Exit(1)


def _failure_reasons(store, shown: int = 3) -> str:
    """The commonest reasons runs failed, counted, e.g. `2 x non-finite loss (nan) at step N`."""
    import re
    from collections import Counter

    reasons = Counter(re.sub(r"\d+", "N", row["error"] or "no error recorded")[:120]
                      for row in store.rows() if row["status"] == "failed")
    listed = "; ".join(f"{n} x {reason}" for reason, n in reasons.most_common(shown))
    return listed + (f"; {len(reasons) - shown} other reason(s)" if len(reasons) > shown else "")


def _print_preview(spec, previews) -> None:
    table = Table(title=f"study {spec.name}: what each configuration trains", title_justify="left")
    tuned = spec.tune is not None
    for column in ("configuration", "method", "plan", "seeds", *(["tuning on validation"] if tuned else [])):
        table.add_column(column)
    for p in previews:
        what = p.what if p.valid else f"[red]invalid:[/] {p.what}"
        tuning = [f"{_tried(spec.tune, p)} x seeds {', '.join(map(str, spec.tune.seeds))}"] if tuned else []
        table.add_row(p.label, p.method, what, ", ".join(map(str, p.seeds)), *tuning)
    _console().print(table)


def _print_summary(counts: dict[str, int], study_dir: Path) -> None:
    """The analysis table when runs finished, else the counts."""
    from peftlab.analysis.analyze import analyze

    console = _console()
    if counts.get("done"):
        analysis = analyze(study_dir)
        _print_main_table(analysis)
    console.print(" ".join(f"{k}: {v}" for k, v in sorted(counts.items())) + f"   ({study_dir})", highlight=False)


def _tried(tune, preview) -> str:
    """What a configuration tries in tuning, in a dry run's table."""
    if tune.sample is not None:
        return (f"{len(preview.points)} points ({tune.sample.sampler}, seed {tune.sample.seed}) over "
                f"{', '.join(tune.names)}")
    grid = "".join(f" x {path} {', '.join(map(str, tune.grid[path]))}" for path in tune.paths)
    return f"lr {', '.join(f'{r:g}' for r in preview.rates)}{grid}"


def _print_main_table(analysis) -> None:
    from peftlab.analysis.report import _test_note, columns, main_table

    table = Table(title=f"study {analysis.name}", title_justify="left", caption=_test_note(analysis).replace("**", ""),
                  caption_justify="left")
    names = columns(analysis)
    for column in names:
        table.add_column(column, justify="left" if column == "configuration" else "right")
    for row in main_table(analysis):
        table.add_row(*(row[c] for c in names))
    _console().print(table)


@study_app.command("status")
def study_status(directory: Annotated[Path, typer.Argument(help="Study directory.")]) -> None:
    """Runs of a study by status, with their errors, main metric and degenerate runs named."""
    from peftlab.records.results import primary_metric, run_rows
    from peftlab.records.store import open_existing

    store = open_existing(directory)
    rows = run_rows(store)
    metric, _ = primary_metric(rows)
    table = Table(title=f"{directory}", title_justify="left")
    for column in ("id", "configuration", "seed", "status", metric, "note"):
        table.add_column(column)
    degenerate = 0
    for row in rows:
        value = row.get(metric)
        reason = degenerate_reason(row) if row["status"] == "done" else None
        degenerate += reason is not None
        note = f"[yellow]degenerate:[/] {rich_escape(reason)}" if reason else rich_escape((row["error"] or "")[:80])
        if row["status"] == "stopped":  # successive halving: where it is, or where it stopped for good
            note = f"at step {row.get('cost.steps')} of {row.get('cost.planned_steps')} (successive halving)"
        label = row["label"] + (f" (tuning, lr {row.get('axis.lr')})" if row["phase"] == "tune" else "")
        table.add_row(row["id"], rich_escape(label), str(row["seed"]), row["status"],
                      "-" if value is None else f"{value:.4f}", note)
    console = _console()
    console.print(table)
    counts = " ".join(f"{k}: {v}" for k, v in sorted(store.counts().items()))
    console.print(counts + (f" ({degenerate} of the done runs degenerate)" if degenerate else ""), highlight=False)


@study_app.command("export")
def study_export(
    directory: Annotated[Path, typer.Argument(help="Study directory.")],
    output: Annotated[Optional[list[Path]], typer.Option(help="Files to write (.csv or .parquet).")] = None,
) -> None:
    """Export every run (config axes, status, metrics, costs) to CSV and Parquet."""
    from peftlab.records.results import export
    from peftlab.records.store import open_existing

    paths = output or [directory / "runs.csv", directory / "runs.parquet"]
    for path in paths:
        if path.suffix not in (".csv", ".parquet"):
            raise PeftlabError(f"--output {path}: unsupported file type {path.suffix!r}; use .csv or .parquet")
        check_output(path, "--output", directory=False)
    store = open_existing(directory)
    for path in paths:
        _console().print(f"wrote {export(store, path)}", highlight=False)


def _margins() -> str:
    """The metrics' own equivalence margins, as `--margin`'s help gives them."""
    known = [f"{m.margin:g} {m.label}" for m in measures.METRICS if m.margin and m.quality]
    return ", ".join(known) + f"; {measures.RELATIVE_MARGIN:.0%} of the baseline's mean for others"


@app.command()
def report(
    directory: Annotated[Path, typer.Argument(help="Study directory.")],
    metric: Annotated[Optional[str], typer.Option(help=f"Quality metric on the test split: {', '.join(quality_names())} "
                                                  "(or any dotted metric column, e.g. metrics.forgetting.increase).")] = None,
    cost: Annotated[str, typer.Option(help=f"Cost for the frontier: {' | '.join(c.name for c in COSTS)}")] = "trainable",
    baseline: Annotated[Optional[str], typer.Option(help="Baseline configuration (default: all-placement uniform-rank LoRA).")] = None,
    test: Annotated[str, typer.Option(help="t (paired t-test) | wilcoxon")] = "t",
    interval: Annotated[str, typer.Option(help="Confidence intervals: t | bootstrap")] = "t",
    margin: Annotated[Optional[float], typer.Option(help="Equivalence margin in metric units (default: the study's, "
                                                    f"else {_margins()}).")] = None,
    exclude_degenerate: Annotated[bool, typer.Option("--exclude-degenerate", help="Leave degenerate runs (one predicted "
                                                     "class, majority-class accuracy, no loss gain) out of the statistics.")] = False,
    count_degenerate: Annotated[bool, typer.Option("--count-degenerate", help="Give a verdict also to configurations "
                                                   "whose runs are all degenerate (by default: no verdict, they did "
                                                   "not train).")] = False,
) -> None:
    """Write report.html, report.md and tables.tex (with figures) for a study."""
    from peftlab.analysis.report import write_report
    from peftlab.analysis.stats import BOOTSTRAP_MIN_SEEDS

    analysis, outputs = write_report(directory, metric=metric, cost=cost, baseline=baseline, test=test, interval=interval,
                                     margin=margin, exclude_degenerate=exclude_degenerate,
                                     count_degenerate=count_degenerate)
    fewest = min(c.summary.n for c in analysis.configurations)
    if interval == "bootstrap" and fewest < BOOTSTRAP_MIN_SEEDS:
        _console(stderr=True).print(
            f"[yellow]warning:[/] --interval bootstrap with {fewest} seeds: percentile intervals undercover below "
            f"{BOOTSTRAP_MIN_SEEDS} seeds (3 seeds: about 76% for a nominal 95%); t-intervals are the default", highlight=False)
    _print_main_table(analysis)
    console = _console()
    for line in analysis.recommendations:
        console.print("- " + line.replace("**", ""), highlight=False)
    console.print("wrote " + ", ".join(str(p) for p in outputs.values()), highlight=False)


@app.command()
def models() -> None:
    """List bundled presets, tiny test models and the architecture catalog."""
    from peftlab.models.load import PRESETS, catalog, tiny_configs

    table = Table(title="models", title_justify="left")
    for name in ("name", "kind", "architecture", "layers", "source"):
        table.add_column(name)
    for name, preset in PRESETS.items():
        table.add_row(name, "preset", catalog()[name]["config"]["model_type"], str(_layers(catalog()[name]["config"])),
                      preset.description)
    for name, values in tiny_configs().items():
        table.add_row(name, "tiny (random)", values["model_type"], str(_layers(values)), "built from config, for tests")
    for name, entry in catalog().items():
        if name not in PRESETS:
            table.add_row(name, "catalog", entry["config"]["model_type"], str(_layers(entry["config"])), entry["hub_id"])
    _console().print(table)


def _layers(values: dict[str, Any]) -> int:
    """The layer count of a config's fields, read through transformers' config class (GPT-2 calls it n_layer)."""
    from transformers import AutoConfig

    return AutoConfig.for_model(**values).num_hidden_layers


def main(argv: list[str] | None = None) -> None:
    """`peftlab ...`: bad input (a PeftlabError, a malformed option) is one line on stderr and exit code 2;
    anything else is a bug in peftlab, shown with its traceback and where to report it (exit code 1)."""
    quiet_libraries()
    warnings.simplefilter("always", PeftlabWarning)
    warnings.showwarning = _show_warning
    try:
        code = app(args=argv, prog_name="peftlab", standalone_mode=False)
    except PeftlabError as exc:
        _error(str(exc))
        raise SystemExit(2) from None
    except NoArgsIsHelpError as exc:
        exc.show()
        raise SystemExit(exc.exit_code) from None
    except TyperException as exc:  # click's: an unknown option, a value of the wrong type, a missing argument
        if not hasattr(exc, "format_message"):  # Abort (Ctrl-C at a prompt)
            raise SystemExit(1) from None
        command = exc.ctx.command_path if getattr(exc, "ctx", None) else "peftlab"
        _error(f"{exc.format_message()} (see {command} --help)")
        raise SystemExit(getattr(exc, "exit_code", 2)) from None
    except KeyboardInterrupt:
        _error("interrupted")
        raise SystemExit(130) from None
    except Exception:
        traceback.print_exc()
        _error(f"internal error: this is a bug in peftlab {__version__}, not in your input; please report it with "
               "the command line and the traceback above")
        raise SystemExit(1) from None
    raise SystemExit(code or 0)


def _error(message: str) -> None:
    text = " ".join(message.split())  # one line, whatever the message holds
    _console(stderr=True).print(f"[red]error:[/] {rich_escape(text)}", highlight=False, soft_wrap=True)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    if issubclass(category, PeftlabWarning):
        text = " ".join(str(message).split())
        _console(stderr=True).print(f"[yellow]warning:[/] {rich_escape(text)}", highlight=False, soft_wrap=True)
    else:
        _library_warning(message, category, filename, lineno, file, line)
