"""Task kinds, each one object: the columns its rows hold, how a row becomes an example, the head it trains,
its loss, its scores and the metric its studies are judged by. A new kind is one class here and one entry of
`KINDS`; nothing else asks which kind it runs.

Validating a config reads `KINDS` without torch: the losses import torch and transformers when they run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from peftlab.errors import PeftlabError, warn
from peftlab.tasks.chat import CHAT_COLUMNS, chat_column, encode_chat, turns
from peftlab.tasks.fit import IGNORE, fit_example, tokenize_pieces

if TYPE_CHECKING:
    import torch
    from torch import nn

    from peftlab.specs import ModelSpec, TaskSpec

Batch = dict[str, "torch.Tensor"]
HiddenStates = Callable[["nn.Module", Batch], "torch.Tensor"]
Encoder = Callable[[dict[str, Any], str], "dict[str, Any] | None"]
"""(row, where it is) -> example, or None for a row with nothing to learn (dropped and counted)."""
Indexed = list[tuple[int, dict[str, Any]]]  # (row number as a person counts it, row)

ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task{with_input}. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)


class TaskKind:
    """The interface; see `Classification` and `Instruction`."""

    name: ClassVar[str]
    head: ClassVar[str]
    """The model head it trains: "sequence-classification" or "causal-lm" (`models.load.HEAD_CLASSES`)."""
    primary: ClassVar[str]
    """The metric (`measures.METRICS`) a study of this kind is judged by unless told otherwise."""
    metrics: ClassVar[tuple[str, ...]]
    """What `scores` reports beside the loss."""
    generates: ClassVar[bool]
    """Completions, the forgetting probe and the base model's loss apply (`eval.generate`, `eval.forgetting`)."""
    profile_measure: ClassVar[str]
    """What a calibrated SparseLoRA loss budget bounds (`methods.sparselora.profile.MEASURES`)."""

    def check_model(self, spec: ModelSpec) -> None:
        """Refuse, in one line and before any data is read, a model that cannot learn this kind."""

    def columns(self, spec: TaskSpec, rows: list[dict[str, Any]]) -> tuple[str, ...]:
        """The columns every row needs, given the training rows."""
        raise NotImplementedError

    def optional_columns(self, columns: tuple[str, ...]) -> tuple[str, ...]:
        """Those of `columns` a row may leave empty."""
        return ()

    def labels(self, spec: TaskSpec, train_rows: Indexed, held_out: list[tuple[Indexed, str]], source: str) -> list[str]:
        """The class names (none for a kind without classes); `held_out`: (rows, their source) per split."""
        return []

    def encoder(self, spec: TaskSpec, tokenizer: Any, labels: list[str], columns: tuple[str, ...],
                truncated: list[str]) -> Encoder:
        """Where an example is cut to `task.max_length`, the encoder adds where it is to `truncated`."""
        raise NotImplementedError

    def num_labels(self, labels: list[str]) -> int:
        """Outputs of the head a sequence-classification model gets for these class names."""
        return max(len(labels), 2)

    def matches(self, config: Any) -> bool:
        """Whether a model with this kind's head and `config` was built for this kind (`kind_for_model`)."""
        return True

    def nll(self, model: nn.Module, batch: Batch, hidden_states: HiddenStates | None = None):
        """(summed loss, predictions counted, the head's outputs or None); `hidden_states`: the method's forward to
        the last hidden states where it adds positions (`Method.hidden_states`; default: the backbone's)."""
        raise NotImplementedError

    def predictions(self, outputs: torch.Tensor) -> list[Any]:
        """What `scores` compares with the labels, from the head's outputs (`nll`)."""
        return outputs.argmax(-1).tolist()

    def profile_pass(self, model: nn.Module, batch: Batch, reads_first: bool) -> tuple[float, int, torch.Tensor]:
        """(summed loss, predictions, the outputs the loss reads) for a sparsity profile; `reads_first`: a
        classifier's head reads the first position ([CLS]) rather than the last."""
        raise NotImplementedError

    def scores(self, loss: float, predictions: list[int], golds: list[int], n_labels: int) -> dict[str, float]:
        """The metrics beside the loss, over a whole split."""
        raise NotImplementedError


class Classification(TaskKind):
    """Rows of a text (or a sentence pair) and a label; a sequence-classification head; cross-entropy per
    example."""

    name = "classification"
    head = "sequence-classification"
    primary = "accuracy"
    metrics = ("accuracy", "macro_f1", "mcc", "f1", "majority_rate", "predicted_classes")
    generates = False
    profile_measure = "representation"  # the head is untrained when the profile runs: its loss barely moves

    def columns(self, spec: TaskSpec, rows: list[dict[str, Any]]) -> tuple[str, ...]:
        pair = (spec.text_pair_column,) if spec.text_pair_column else ()
        return (spec.text_column, *pair, spec.label_column)

    def matches(self, config: Any) -> bool:
        return getattr(config, "num_labels", 2) >= 2

    def labels(self, spec: TaskSpec, train_rows: Indexed, held_out: list[tuple[Indexed, str]], source: str) -> list[str]:
        """`task.labels`, else every label found (training first). A class that occurs only in the validation or
        test split is kept with a warning: the model cannot learn it, and every example of it counts as an error."""
        column = spec.label_column
        parts = [(train_rows, source), *held_out]
        _check_label_types(column, parts)
        seen = sorted({str(row[column]) for _, row in train_rows})
        found = sorted({str(row[column]) for rows, _ in held_out for _, row in rows} - set(seen))
        labels = [str(x) for x in spec.labels] if spec.labels else seen + found
        for rows, where in parts:
            unknown = [(i, str(row[column])) for i, row in rows if str(row[column]) not in labels]
            if unknown:
                raise PeftlabError(f"{where}: row {unknown[0][0]}: label {unknown[0][1]!r} is not in task.labels {labels}")
        if len(seen) < 2:
            raise PeftlabError(f"{source}: classification needs at least 2 classes in training, found {seen}")
        untrained = [label for label in labels if label not in seen]
        if untrained:
            warn(f"{source}: class(es) {', '.join(map(repr, untrained))} never occur in training (only in "
                 "validation, test or task.labels): the model cannot learn them and their examples count as errors")
        return labels

    def encoder(self, spec: TaskSpec, tokenizer: Any, labels: list[str], columns: tuple[str, ...],
                truncated: list[str]) -> Encoder:
        index = {name: i for i, name in enumerate(labels)}
        return _text_encoder(spec, tokenizer, truncated, lambda row: index[str(row[spec.label_column])])

    def nll(self, model: nn.Module, batch: Batch, hidden_states: HiddenStates | None = None):
        import torch

        logits = model(**_inputs(batch)).logits
        return self.loss(logits, batch["labels"]), torch.tensor(len(logits), device=logits.device), logits

    def loss(self, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Summed over the batch's examples."""
        import torch.nn.functional as F

        return F.cross_entropy(outputs.float(), labels, reduction="sum")

    def profile_pass(self, model: nn.Module, batch: Batch, reads_first: bool) -> tuple[float, int, torch.Tensor]:
        """The outputs: the last hidden state at the position the head reads."""
        import torch

        mask = batch["attention_mask"]
        out = model(**_inputs(batch), output_hidden_states=True)
        loss = self.loss(out.logits, batch["labels"]).item()
        read = torch.zeros(len(mask), dtype=torch.long, device=mask.device) if reads_first else mask.sum(dim=1) - 1
        return loss, len(mask), out.hidden_states[-1][torch.arange(len(mask), device=mask.device), read].float()

    def scores(self, loss: float, predictions: list[int], golds: list[int], n_labels: int) -> dict[str, float]:
        from sklearn.metrics import f1_score, matthews_corrcoef

        binary = {"f1": float(f1_score(golds, predictions, pos_label=1, labels=[0, 1], average="binary",
                                       zero_division=0.0))} if n_labels == 2 and golds else {}
        return {
            "accuracy": sum(p == g for p, g in zip(predictions, golds)) / max(len(golds), 1),
            "macro_f1": macro_f1(predictions, golds, n_labels),
            "mcc": float(matthews_corrcoef(golds, predictions)) if golds else math.nan,
            **binary,  # of the second class (GLUE's MRPC and QQP: "equivalent", "duplicate")
            # what a trivial classifier scores here, and whether this one is one (see records.degenerate)
            "majority_rate": max(map(golds.count, set(golds))) / len(golds) if golds else math.nan,
            "predicted_classes": len(set(predictions)),
        }


class Regression(Classification):
    """Rows of a text (or a sentence pair) and a number; a one-output head; squared error per example (GLUE's
    STS-B)."""

    name = "regression"
    primary = "pearson"
    metrics = ("pearson", "spearman", "predicted_values")

    def num_labels(self, labels: list[str]) -> int:
        return 1

    def matches(self, config: Any) -> bool:
        return getattr(config, "num_labels", 2) == 1

    def labels(self, spec: TaskSpec, train_rows: Indexed, held_out: list[tuple[Indexed, str]], source: str) -> list[str]:
        """None: a regression has no classes. Every label is checked to be a finite number."""
        for rows, where in [(train_rows, source), *held_out]:
            for i, row in rows:
                _number(row[spec.label_column], f"{where}: row {i}: label")
        return []

    def encoder(self, spec: TaskSpec, tokenizer: Any, labels: list[str], columns: tuple[str, ...],
                truncated: list[str]) -> Encoder:
        return _text_encoder(spec, tokenizer, truncated, lambda row: _number(row[spec.label_column], "label"))

    def loss(self, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return (outputs.float().squeeze(-1) - labels.float()).pow(2).sum()

    def predictions(self, outputs: torch.Tensor) -> list[Any]:
        return outputs.float().squeeze(-1).tolist()

    def scores(self, loss: float, predictions: list[float], golds: list[float], n_labels: int) -> dict[str, float]:
        from scipy.stats import pearsonr, spearmanr

        distinct = len(set(predictions))  # 1: the model predicts one value (a degenerate run, `records.degenerate`)
        if len(golds) < 2 or len(set(golds)) < 2:
            correlations = {"pearson": math.nan, "spearman": math.nan}  # labels without spread: nothing to correlate
        elif distinct < 2:
            correlations = {"pearson": 0.0, "spearman": 0.0}  # a constant prediction follows none of the labels
        else:
            correlations = {"pearson": float(pearsonr(predictions, golds).statistic),
                            "spearman": float(spearmanr(predictions, golds).statistic)}
        return {**correlations, "predicted_values": distinct}


class Instruction(TaskKind):
    """Prompt and response rows (Alpaca, Dolly) or conversations (chat); a causal LM; loss on response tokens."""

    name = "instruction"
    head = "causal-lm"
    primary = "loss"
    metrics = ("perplexity",)
    generates = True
    profile_measure = "loss"
    FORMATS: ClassVar[dict[str, tuple[str, str, str]]] = {  # instruction, input, response columns
        "alpaca": ("instruction", "input", "output"),
        "dolly": ("instruction", "context", "response"),
    }

    def check_model(self, spec: ModelSpec) -> None:
        from peftlab.models.load import check_causal_lm

        check_causal_lm(spec)

    def columns(self, spec: TaskSpec, rows: list[dict[str, Any]]) -> tuple[str, ...]:
        """`task.format`'s columns; auto: chat where the first row has a conversation, dolly where it has a
        response, else alpaca. The input column is needed only where the first row has it."""
        fmt, first = spec.format, rows[0]
        if fmt == "chat" or (fmt == "auto" and chat_column(first)):
            return (chat_column(first) or "messages",)
        if fmt == "auto":
            fmt = "dolly" if "response" in first and "output" not in first else "alpaca"
        instruction, context, response = self.FORMATS[fmt]
        return (instruction, response, context) if context in first else (instruction, response)

    def optional_columns(self, columns: tuple[str, ...]) -> tuple[str, ...]:
        return columns[1:]

    def encoder(self, spec: TaskSpec, tokenizer: Any, labels: list[str], columns: tuple[str, ...],
                truncated: list[str]) -> Encoder:
        if columns[0] in CHAT_COLUMNS:
            def encode_conversation(row: dict[str, Any], where: str) -> dict[str, Any] | None:
                conversation = turns(row[columns[0]], f"{where}: {columns[0]}")
                example, cut = encode_chat(conversation, tokenizer, spec.chat_template, spec.max_length, where)
                if cut:
                    truncated.append(where)
                return example

            return encode_conversation
        return _instruction_encoder(spec, tokenizer, columns, truncated)

    def nll(self, model: nn.Module, batch: Batch, hidden_states: HiddenStates | None = None):
        """NLL of the supervised next tokens, computing the LM head only at those positions: the head of a
        262k-token vocabulary would otherwise dominate memory (B x T x V logits)."""
        nll, supervised, _ = _next_token_nll(model, batch, hidden_states)
        return nll, supervised, None

    def profile_pass(self, model: nn.Module, batch: Batch, reads_first: bool) -> tuple[float, int, torch.Tensor]:
        """The outputs: the last hidden states at the supervised positions."""
        nll, supervised, read = _next_token_nll(model, batch, None)
        return nll.item(), int(supervised), read.float()

    def scores(self, loss: float, predictions: list[int], golds: list[int], n_labels: int) -> dict[str, float]:
        return {"perplexity": math.exp(loss) if loss < 700 else math.inf}


KINDS: dict[str, TaskKind] = {kind.name: kind for kind in (Classification(), Regression(), Instruction())}


def task_kind(name: str) -> TaskKind:
    return KINDS[name]


def kind_for_model(model: nn.Module) -> TaskKind:
    """The kind a model was built for: by its head (`models.load.head_kind`) and its config (a one-output
    sequence head is a regression, as in transformers); a model no head registers is a causal LM."""
    from peftlab.models.load import head_kind, unwrap

    base = unwrap(model)
    head = head_kind(base)
    return next((k for k in KINDS.values() if k.head == head and k.matches(base.config)), KINDS["instruction"])


def primary_metric(kinds: set[str]) -> str:
    """The metric a study of these task kinds is judged by by default (loss where kinds are mixed)."""
    primaries = {KINDS[k].primary for k in kinds if k in KINDS}
    return primaries.pop() if len(primaries) == 1 else "loss"


def macro_f1(predictions: list[int], golds: list[int], n_labels: int) -> float:
    scores = []
    for c in range(n_labels):
        tp = sum(p == c and g == c for p, g in zip(predictions, golds))
        fp = sum(p == c and g != c for p, g in zip(predictions, golds))
        fn = sum(p != c and g == c for p, g in zip(predictions, golds))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / n_labels


def _check_label_types(column: str, parts: list[tuple[Indexed, str]]) -> None:
    """Labels are all text or all integers: `1` and `"1"` (or a number among names) are one mistake away from
    silently becoming separate classes or one."""
    first: dict[str, tuple[str, int, Any]] = {}
    for rows, source in parts:
        for i, row in sorted(rows, key=lambda indexed: indexed[0]):
            value = row[column]
            kind = "integer" if isinstance(value, int) and not isinstance(value, bool) else \
                "text" if isinstance(value, str) else None
            if kind is None:
                raise PeftlabError(f"{source}: row {i}: label {value!r} is a {type(value).__name__}; labels are "
                                   "class names (text) or integers")
            first.setdefault(kind, (source, i, value))
    if len(first) > 1:
        (a_source, a_row, a), (b_source, b_row, b) = first["integer"], first["text"]
        raise PeftlabError(f"column {column!r} mixes integer and text labels ({a_source}: row {a_row}: {a!r}; "
                           f"{b_source}: row {b_row}: {b!r}); write every label the same way")


def _text_encoder(spec: TaskSpec, tokenizer: Any, truncated: list[str], label: Callable[[dict[str, Any]], Any]) -> Encoder:
    """A row's text (and its pair, as the tokenizer encodes sentence pairs) cut to `task.max_length`, and its label."""

    def encode(row: dict[str, Any], where: str) -> dict[str, Any]:
        texts = [str(row[spec.text_column])] + ([str(row[spec.text_pair_column])] if spec.text_pair_column else [])
        encoded = tokenizer(*texts, truncation=True, max_length=spec.max_length)
        ids = encoded["input_ids"]
        if len(ids) == spec.max_length and len(tokenizer(*texts)["input_ids"]) > spec.max_length:
            truncated.append(where)
        segments = {"token_type_ids": encoded["token_type_ids"]} if len(texts) > 1 and "token_type_ids" in encoded else {}
        return {"input_ids": ids, **segments, "labels": label(row)}  # segments: which text of a pair (BERT)

    return encode


def _inputs(batch: Batch) -> Batch:
    """What a sequence classifier reads of a batch: the tokens, their mask and, for a sentence pair, the segments."""
    return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}


def _number(value: Any, where: str) -> float:
    """A regression label: an int, a float or numeric text, finite."""
    try:
        number = float(value) if not isinstance(value, bool) and isinstance(value, (int, float, str)) else math.nan
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise PeftlabError(f"{where} {value!r} is not a finite number; a regression's labels are numbers")
    return number


def render_prompt(template: str, instruction: str, context: str) -> str:
    context = context.strip()
    return template.format(
        instruction=instruction.strip(),
        input=context,
        with_input=", paired with an input that provides further context" if context else "",
        input_block=f"### Input:\n{context}\n\n" if context else "",
    )


def _instruction_encoder(spec: TaskSpec, tokenizer: Any, columns: tuple[str, ...], truncated: list[str]) -> Encoder:
    instruction_col, response_col = columns[0], columns[1]
    context_col = columns[2] if len(columns) > 2 else None
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    template = spec.template or ALPACA_TEMPLATE
    before, after = _special_tokens_around(tokenizer)

    def encode(row: dict[str, Any], where: str) -> dict[str, Any] | None:
        if not str(row[response_col]).strip():
            return None  # an empty response teaches nothing but an immediate stop: dropped and counted
        prompt = render_prompt(template, str(row[instruction_col]), str(row.get(context_col) or "") if context_col else "")
        ids, supervised = tokenize_pieces(tokenizer, [(prompt, False), (str(row[response_col]), True)])
        answer = supervised.index(True) if True in supervised else len(ids)
        prompt_ids = before + ids[:answer] + after  # framed as `tokenizer(prompt)` frames it: BOS, [CLS] .. [SEP]
        response_ids = ids[answer:] + [eos]
        first_is_special = bool(prompt_ids) and prompt_ids[0] in tokenizer.all_special_ids  # BOS, [CLS]: kept
        prompt_ids, response_ids, cut = fit_example(prompt_ids, response_ids, spec.max_length, first_is_special)
        if cut:
            truncated.append(where)
        if not response_ids or not prompt_ids:  # the first token is never predicted: it needs a prompt before it
            return None
        return {"input_ids": prompt_ids + response_ids, "labels": [IGNORE] * len(prompt_ids) + response_ids}

    return encode


def _special_tokens_around(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text (e.g. [BOS], or [CLS] and [SEP])."""
    framed, bare = tokenizer("a")["input_ids"], tokenizer("a", add_special_tokens=False)["input_ids"]
    start = next((i for i in range(len(framed) - len(bare) + 1) if framed[i : i + len(bare)] == bare), None)
    return ([], []) if start is None else (framed[:start], framed[start + len(bare):])


def _next_token_nll(model: nn.Module, batch: Batch, hidden_states: HiddenStates | None):
    """(summed NLL of the supervised next tokens, their count, the hidden states that predict them)."""
    import torch
    import torch.nn.functional as F

    from peftlab.models.load import backbone_hidden, unwrap

    base = unwrap(model)
    hidden = (hidden_states or backbone_hidden)(model, batch)
    targets = batch["labels"][:, 1:]  # position t predicts token t + 1
    supervised = targets != IGNORE  # (B, T-1)
    read = hidden[:, :-1][supervised]  # (N, H)
    logits = base.get_output_embeddings()(read)  # (N, V)
    cap = getattr(base.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return F.cross_entropy(logits.float(), targets[supervised], reduction="sum"), supervised.sum(), read
