"""RunConfig -> ResolvedRun: everything a run decides before it trains, in one place.

In order: an importance allocation's scores (probed once with their own seed, then cached), the tokenized
data and the head it needs, the method's size where a budget is matched, the plan, and the number of
optimizer steps. Nothing here loads weights; `train.run.execute_run` builds and trains what this decided.
"""

from __future__ import annotations

import math

from peftlab.errors import PeftlabError, warn
from peftlab.files import require_file
from peftlab.importance.probe import resolve_importance
from peftlab.methods.registry import METHODS, make_method
from peftlab.models.load import check_lengths, load_config, load_tokenizer, model_spec_for_task
from peftlab.plans.plan import plan_on
from peftlab.resolve.budget import match_budget
from peftlab.resolve.resolved import ResolvedRun
from peftlab.specs import RunConfig
from peftlab.tasks.kinds import task_kind
from peftlab.tasks.prepare import general_text, load_task, text_chunks
from peftlab.train.batching import check_packable
from peftlab.train.benchmarks import check_tasks
from peftlab.train.device import check_attention, choose_device
from peftlab.train.distributed import process_count
from peftlab.train.generation import generation_prompts
from peftlab.train.sharding import check_shardable
from peftlab.train.tracking import check_backends


def resolve_run(config: RunConfig) -> ResolvedRun:
    from peftlab.provenance import input_identity

    inputs = input_identity(config.model_dump(mode="json", by_alias=True))  # before any input is read
    _check_before_reading(config)
    forgetting = config.eval.forgetting
    spec = config.train
    text = None  # the forgetting probe's text: read before anything is tokenized
    if forgetting and spec.evaluate_test:
        text = general_text(forgetting.path, forgetting.text_column)
    planned, scores = resolve_importance(config)
    tokenizer = load_tokenizer(config.model)
    drawn = None if make_method(config.method).reads_training_data else spec.examples_drawn
    data = load_task(config.task, tokenizer, drawn)
    model = model_spec_for_task(config.model, task_kind(data.kind).head, task_kind(data.kind).num_labels(data.labels))
    sized, budget = planned, None
    if config.budget:  # equal-budget comparison: the method's size parameter is chosen here
        sized, budget = match_budget(planned, model, config.budget)
    plan = plan_on(model, sized.plan)
    make_method(sized.method).check_plan(plan)
    per_epoch = math.ceil(len(data.train) / (spec.batch_size * spec.grad_accum))
    total_steps = spec.max_steps or max(1, round(spec.epochs * per_epoch))
    _warn_slow_evaluation(config, data, total_steps)
    evaluation = config.eval
    prompts = None
    if evaluation.generate and spec.evaluate_test:  # tuning runs never read the test split
        prompts = generation_prompts(data.test, evaluation.generate.examples, tokenizer, tokenizer.pad_token_id,
                                     data.end_of_turn)
    chunks = None
    if text is not None:
        chunks = text_chunks(text, forgetting.path, tokenizer, config.task.max_length, forgetting.max_tokens)
    return ResolvedRun(config, model, sized.method, plan, data, tokenizer.pad_token_id,
                       total_steps, budget, scores, tokenizer, prompts, chunks, inputs)


def _check_before_reading(config: RunConfig) -> None:
    """What can be refused from the config alone (and the model's config): before any input is read."""
    if config.tracking is not None:
        check_backends(config.tracking)
    device = choose_device(config.train.device)
    make_method(config.method).check_device(device)  # before any data is read
    check_attention(config.model.attn_implementation, device)
    if config.train.sharding == "fsdp":
        check_shardable(make_method(config.method), device, config.train.compile)
    if config.train.batching == "packed":
        check_packable(load_config(config.model).model_type, process_count())
    for field in ("checkpoint_every", "stop_at"):  # both save a checkpoint to resume from
        if getattr(config.train, field) and not METHODS[config.method.name].resumable:
            raise PeftlabError(f"train.{field}: method {config.method.name} keeps training state that a checkpoint "
                               f"does not hold, so it cannot resume from one; leave {field} unset")
        if getattr(config.train, field) and process_count() > 1:
            raise PeftlabError(f"train.{field}: not available for a run over several processes yet; leave it unset "
                               "or run in one process")
    forgetting = config.eval.forgetting
    for field, path in (("task.path", config.task.path), ("task.test_path", config.task.test_path),
                        ("eval.forgetting.path", forgetting.path if forgetting else None)):
        if path is not None:  # every input file, before any is read
            require_file(path, field)
    generate = config.eval.generate
    check_lengths(config.model, config.task.max_length, generate.max_new_tokens if generate else 0)
    task_kind(config.task.resolved_kind).check_model(config.model)
    if config.eval.benchmarks is not None and config.train.evaluate_test:  # lm-eval installed, every task known
        check_tasks(config.eval.benchmarks)


EVALUATION_SHARE = 10  # held-out examples per trained example beyond which a run is mostly evaluation


def _warn_slow_evaluation(config: RunConfig, data, total_steps: int) -> None:
    """A run that would evaluate far more examples than it trains on (a large file, a few steps) says so."""
    spec = config.train
    trained = total_steps * spec.batch_size * spec.grad_accum
    held_out = len(data.validation) * (1 + len(spec.eval_at or []) + (total_steps // spec.eval_every if spec.eval_every else 0))
    held_out += len(data.test) if spec.evaluate_test else 0
    if held_out > max(EVALUATION_SHARE * trained, 1000):
        warn(f"task: this run trains on {trained:,} examples ({total_steps} step{'s' if total_steps > 1 else ''}) and evaluates {held_out:,} held-out "
             f"ones ({len(data.validation):,} validation, {len(data.test):,} test), which will take far longer; "
             "limit them with task.max_eval_examples")
