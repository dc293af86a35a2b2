"""Generation-based evaluation of instruction tuning: greedy (or seeded sampled) completions of test prompts,
scored against the reference responses with ROUGE-L and normalised exact match.

The prompts are the test examples as tokenized for training: everything before an example's last supervised
span (its last response, or its last assistant turn) is the prompt, and that span is the reference. Batches
are left-padded and use the KV cache; completions stop at the tokens that ended the supervised responses
(EOS, a chat template's end-of-turn token, or its end-of-turn text where that is several tokens, which the
completions and references then leave out) or after `max_new_tokens`.
"""

from __future__ import annotations

import hashlib
import json
import re
import string
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from peftlab.files import write_atomic
from peftlab.methods.base import generated_tokens
from peftlab.tasks.chat import special_ids
from peftlab.tasks.fit import last_supervised_span
from peftlab.train.result import SAMPLES_FILE  # noqa: F401  (where a run writes its samples)

if TYPE_CHECKING:
    from peftlab.specs import GenerateSpec


@dataclass(frozen=True)
class Prompts:
    """What generation needs of the test split, decided before the run (see `generation_prompts`)."""

    ids: list[list[int]]  # prompt token ids, one list per example
    texts: list[str]  # the prompts as text (for the samples file)
    references: list[str]  # the supervised responses as text, without their end token(s)
    stop_ids: list[int]  # generation stops at any of these
    pad_id: int
    stop_sequence: list[int] = field(default_factory=list)  # an end of turn of several tokens: stops it too


def generation_prompts(examples: list[dict[str, Any]], count: int, tokenizer: Any, pad_id: int,
                       end_of_turn: str | None = None) -> Prompts:
    """The first `count` examples (the split is already a seeded shuffle) as prompts and references.
    `end_of_turn`: a chat template's end-of-turn text that is not one special token (see
    `tasks.chat.end_of_turn`); its tokens end generation and are left out of the references."""
    ids, texts, references, enders = [], [], [], set()
    special = special_ids(tokenizer)
    sequence = tokenizer(end_of_turn, add_special_tokens=False)["input_ids"] if end_of_turn else []
    for example in examples:
        if len(ids) == count:
            break
        span = last_supervised_span(example["labels"])
        if span is None or span[0] == 0:
            continue
        start, end = span
        prompt, response = example["input_ids"][:start], example["input_ids"][start:end]
        if sequence and response[-len(sequence):] == sequence:
            response = response[: -len(sequence)]
        elif response[-1] in special:  # the token training taught the model to end a response with
            enders.add(response[-1])
        ids.append(prompt)
        texts.append(tokenizer.decode(prompt, skip_special_tokens=True))
        references.append(tokenizer.decode(response, skip_special_tokens=True).strip())
    own = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    stop = sorted(enders | ({own} if own is not None else set()))
    return Prompts(ids, texts, references, stop, pad_id, sequence)


def _sequence_stop(sequence: list[int]):
    """A `generate` stopping criterion: a row is done once its newest generated tokens spell `sequence`."""
    from transformers import StoppingCriteria

    class SequenceStop(StoppingCriteria):
        generated = 0  # called once per generated token

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
            self.generated += 1
            done = input_ids[:, -len(sequence):] == torch.tensor(sequence, device=input_ids.device)
            return done.all(dim=1) & (self.generated >= len(sequence))

    return SequenceStop()


@dataclass
class Completions:
    texts: list[str]
    new_tokens: list[int]  # tokens generated per example, the stop token included
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return sum(self.new_tokens) / self.seconds if self.seconds else 0.0


@torch.no_grad()
def generate(model: nn.Module, prompts: Prompts, spec: GenerateSpec, tokenizer: Any, device,
             autocast: Callable[[], AbstractContextManager] = nullcontext,
             complete: Callable[..., torch.Tensor] | None = None) -> Completions:
    """Complete every prompt: batches of similar length, left-padded, with the KV cache; greedy unless
    `spec.greedy` is off (then sampled from `spec.seed`). The texts come back in the prompts' order.
    `complete(model, input_ids, attention_mask, config)` returns the new tokens (a method's own way of
    generating, `Method.complete`); by default `model.generate`'s."""
    complete = complete or generated_tokens
    from transformers import GenerationConfig, StoppingCriteriaList

    config = GenerationConfig(
        max_new_tokens=spec.max_new_tokens, do_sample=not spec.greedy, use_cache=True, pad_token_id=prompts.pad_id,
        eos_token_id=prompts.stop_ids, **({} if spec.greedy else {"temperature": spec.temperature, "top_p": spec.top_p}),
    )
    order = sorted(range(len(prompts.ids)), key=lambda i: len(prompts.ids[i]))
    texts: list[str] = [""] * len(order)
    new_tokens: list[int] = [0] * len(order)
    was_training = model.training
    model.eval()
    cuda = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    start = time.perf_counter()
    # generation never shifts the training's random streams (the base model's completions come before training)
    try:
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(spec.seed)
            for first in range(0, len(order), spec.batch_size):
                chosen = order[first : first + spec.batch_size]
                input_ids, attention_mask = _left_padded([prompts.ids[i] for i in chosen], prompts.pad_id)
                extra = {}
                if prompts.stop_sequence:
                    extra["stopping_criteria"] = StoppingCriteriaList([_sequence_stop(prompts.stop_sequence)])
                with autocast():
                    output = complete(model, input_ids.to(device), attention_mask.to(device), config, **extra)
                for row, i in enumerate(chosen):
                    tokens, kept = _until_stop(output[row].tolist(), prompts.stop_ids, prompts.stop_sequence)
                    new_tokens[i] = len(tokens)
                    texts[i] = tokenizer.decode(kept, skip_special_tokens=True).strip()
    finally:
        model.train(was_training)
    return Completions(texts, new_tokens, time.perf_counter() - start)


def _left_padded(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(map(len, sequences))
    input_ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, longest - len(sequence):] = torch.tensor(sequence, dtype=torch.long)
        attention_mask[row, longest - len(sequence):] = 1
    return input_ids, attention_mask


def _until_stop(tokens: list[int], stop_ids: list[int], sequence: list[int]) -> tuple[list[int], list[int]]:
    """(the generated tokens up to and including the first stop token or stop sequence, the same without a
    stop sequence): what follows is padding."""
    k = len(sequence)
    for position, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[: position + 1], tokens[: position + 1]
        if k and tokens[max(0, position + 1 - k) : position + 1] == sequence:
            return tokens[: position + 1], tokens[: position + 1 - k]
    return tokens, tokens


# --- scores ---------------------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def rouge_l(predictions: list[str], references: list[str]) -> list[float]:
    """ROUGE-L F-measure of each prediction against its reference (rouge-score, ROUGE-1.5.5's
    tokenisation: lower-cased alphanumeric tokens, no stemming)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return [scorer.score(reference, prediction)["rougeL"].fmeasure for prediction, reference in zip(predictions, references)]


@dataclass
class Scores:
    rouge_l: list[float]
    exact_match: list[float]

    def means(self, prefix: str = "") -> dict[str, float]:
        n = max(len(self.rouge_l), 1)
        return {f"{prefix}rouge_l": sum(self.rouge_l) / n, f"{prefix}exact_match": sum(self.exact_match) / n}


def score(predictions: list[str], references: list[str]) -> Scores:
    return Scores(rouge_l(predictions, references), [exact_match(p, r) for p, r in zip(predictions, references)])


# --- the base model's completions, cached across the runs of a study -----------------------------------

def base_cache_key(model_identity: dict[str, Any], prompts: Prompts, spec: GenerateSpec) -> str:
    """What the base model's completions depend on: the model and how it computes (dtype, quantization,
    precision, device), the prompts and the generation settings."""
    content = {"model": model_identity, "prompts": prompts.ids, "stop": prompts.stop_ids, "pad": prompts.pad_id,
               "stop_sequence": prompts.stop_sequence, "generate": spec.model_dump(mode="json"), "version": 2}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:24]


def read_cached(file: Path) -> Completions | None:
    if not file.is_file():
        return None
    data = json.loads(file.read_text())
    return Completions(data["texts"], data["new_tokens"], data["seconds"])


def write_cached(file: Path, completions: Completions) -> None:
    write_atomic(file, json.dumps(asdict(completions)))


def write_samples(path: Path, prompts: Prompts, adapted: Completions, adapted_scores: Scores,
                  base: Completions | None, base_scores: Scores | None) -> None:
    """One line per example: prompt, reference, the base model's and the adapted model's completions and
    their scores (studies pair configurations example by example from these)."""
    lines = []
    for i, (prompt, reference) in enumerate(zip(prompts.texts, prompts.references)):
        row = {"index": i, "prompt": prompt, "reference": reference, "adapted": adapted.texts[i],
               "rouge_l": adapted_scores.rouge_l[i], "exact_match": adapted_scores.exact_match[i]}
        if base is not None and base_scores is not None:
            row.update({"base": base.texts[i], "base_rouge_l": base_scores.rouge_l[i],
                        "base_exact_match": base_scores.exact_match[i]})
        lines.append(json.dumps(row, ensure_ascii=False))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
