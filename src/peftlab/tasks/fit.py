"""Tokenizing a prompt and its answer as one text, supervised spans and cutting an example to `task.max_length`:
shared by instruction and chat rows and by generation, which reads an example's prompt and reference from the
same spans."""

from __future__ import annotations

from bisect import bisect_right
from itertools import accumulate
from typing import Any

IGNORE = -100  # label of positions that carry no loss (prompt, padding)


def tokenize_pieces(tokenizer: Any, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[bool]]:
    """The token ids of the pieces' texts joined, tokenized as one text (as the model reads it when it
    generates), and for each token whether its piece is supervised. A token belongs to the piece that holds its
    last character, so a token that straddles a prompt and its answer is the answer's.

    Tokenizing the pieces one by one would differ where a tokenizer marks the start of a text: a SentencePiece
    tokenizer that prepends `▁` (Llama 2, Mistral) reads an answer alone as `▁The`, after its prompt's newline
    as `The`. A slow tokenizer (no character offsets) tokenizes piece by piece."""
    if not getattr(tokenizer, "is_fast", False):
        ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text, _ in pieces]
        return [i for part in ids for i in part], [sup for part, (_, sup) in zip(ids, pieces) for _ in part]
    text = "".join(part for part, _ in pieces)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ends = list(accumulate(len(part) for part, _ in pieces))
    supervised = []
    for start, end in encoded["offset_mapping"]:
        piece = bisect_right(ends, max(start, end - 1))  # the first piece that ends after the token's last character
        supervised.append(pieces[min(piece, len(pieces) - 1)][1])
    return list(encoded["input_ids"]), supervised


def last_supervised_span(labels: list[int]) -> tuple[int, int] | None:
    """[start, end) of the last run of supervised positions, or None when no position is supervised."""
    end = len(labels)
    while end and labels[end - 1] == IGNORE:
        end -= 1
    if not end:
        return None
    start = end
    while start and labels[start - 1] != IGNORE:
        start -= 1
    return start, end


def fit_example(prompt: list[int], response: list[int], max_length: int,
                keep_first: bool = False) -> tuple[list[int], list[int], bool]:
    """(prompt, response, cut) within `max_length` tokens. An example that fits is kept whole. One that does
    not loses the start of its prompt first (its first token too, unless `keep_first`: a beginning-of-
    sequence token), so the response, its end token and the prompt's end (the response marker) survive; a
    response is cut at its end only where it leaves the prompt less than a quarter of `max_length`.
    Only lengths decide the cut, so token ids and their labels cut alike."""
    if len(prompt) + len(response) <= max_length:
        return prompt, response, False
    floor = min(len(prompt), max(2, max_length // 4))  # the prompt keeps at least this much of its end
    keep = max(max_length - len(response), floor)
    head = prompt[:1] if keep_first and keep < len(prompt) else []
    kept = head + prompt[len(prompt) - (keep - len(head)):]
    return kept, response[: max_length - len(kept)], True
