"""Chat and conversation rows: `messages` ([{role, content}], as chat models take them) or ShareGPT's
`conversations` ([{from, value}]), formatted with the tokenizer's own chat template and supervised on the
assistant turns only.

Which tokens are the assistant's is read from the template itself: the conversation up to an assistant turn
is rendered with the generation prompt (`add_generation_prompt=True`), and the text the turn then adds
(its content and the template's end-of-turn marker, trailing whitespace excluded) is supervised. A template
that renders earlier turns differently once a later turn follows cannot be split that way, and is refused.
"""

from __future__ import annotations

from typing import Any

from peftlab.errors import PeftlabError
from peftlab.tasks.fit import IGNORE, fit_example, last_supervised_span, tokenize_pieces

CHAT_COLUMNS = ("messages", "conversations")
ROLES = {"system": "system", "user": "user", "assistant": "assistant",  # messages
         "human": "user", "gpt": "assistant"}  # ShareGPT
PROBE = "peftlab probe answer"  # an assistant turn's content that templates are checked with


def chat_column(row: dict[str, Any]) -> str | None:
    """The conversation column of a row, if it has one."""
    return next((c for c in CHAT_COLUMNS if c in row), None)


def turns(value: Any, where: str) -> list[dict[str, str]]:
    """A row's conversation as [{role, content}] with roles system / user / assistant; an error naming the
    row and turn for anything else."""
    if not isinstance(value, list) or not value:
        raise PeftlabError(f"{where}: expected a non-empty list of turns ({{role, content}} or ShareGPT's "
                           "{from, value})")
    result = []
    for number, turn in enumerate(value, start=1):
        if not isinstance(turn, dict):
            raise PeftlabError(f"{where}: turn {number}: expected an object with role and content")
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if role not in ROLES:
            raise PeftlabError(f"{where}: turn {number}: unknown role {role!r}; valid: system, user, assistant "
                               "(ShareGPT: human, gpt)")
        content = _text(content, f"{where}: turn {number} ({ROLES[role]})")
        if not content.strip():
            raise PeftlabError(f"{where}: turn {number} ({ROLES[role]}) is empty")
        result.append({"role": ROLES[role], "content": content})
    if not any(t["role"] == "assistant" for t in result):
        raise PeftlabError(f"{where}: no assistant turn to learn from")
    if result[0]["role"] == "assistant":
        raise PeftlabError(f"{where}: turn 1 is the assistant's; a conversation starts with a system or user turn "
                           "(the assistant answers something)")
    return result


def _text(content: Any, where: str) -> str:
    """A turn's content as text: a string, or OpenAI-style parts ([{type: text, text: ...}]) joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(part, dict) for part in content):
        kinds = sorted({str(part.get("type")) for part in content} - {"text"})
        if kinds:
            raise PeftlabError(f"{where}: content parts of type {', '.join(kinds)}; only text parts are supported")
        if not all(isinstance(part.get("text"), str) for part in content):
            raise PeftlabError(f"{where}: a text part without its text (expected {{type: text, text: ...}})")
        return "".join(part["text"] for part in content)
    raise PeftlabError(f"{where}: content is a {type(content).__name__} ({content!r:.40}); expected text or a list "
                       "of {type: text, text: ...} parts")


def check_template(tokenizer: Any, template: str | None, model: str) -> str:
    """A chat template exists, is valid Jinja and renders the messages' content (a file name or constant text
    given as task.chat_template renders none): checked on a probe conversation before any row is encoded, whose
    rendering it returns (for `end_of_turn`)."""
    if template is None and not getattr(tokenizer, "chat_template", None):
        raise PeftlabError(f"task: chat rows need a chat template and the tokenizer of {model!r} has none; give one "
                           "as task.chat_template (a Jinja template, as in a tokenizer_config.json)")
    field = "task.chat_template" if template is not None else f"the chat template of {model!r}"
    probe = [{"role": "user", "content": "peftlab probe question"}, {"role": "assistant", "content": PROBE}]
    try:
        rendered = tokenizer.apply_chat_template(probe, chat_template=template, tokenize=False)
    except Exception as exc:  # jinja's syntax and undefined-name errors, and a template's own raise_exception
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PeftlabError(f"{field}: cannot render a user and an assistant turn: {reason}") from None
    if PROBE not in rendered or "peftlab probe question" not in rendered:
        raise PeftlabError(f"{field}: renders no message content ({rendered[:40]!r}...); give the template itself "
                           "(Jinja looping over messages, as in a tokenizer_config.json), not a file name or text")
    return rendered


def end_of_turn(tokenizer: Any, probe: str) -> str | None:
    """The text the template puts after an assistant turn's content when it is not one special token (ChatML's
    `<|im_end|>` on a tokenizer without that token): generation stops at it and scores leave it out. None
    when the turn ends in one special token (a stop id) or in nothing. `probe`: `check_template`'s rendering."""
    ender = probe[probe.rfind(PROBE) + len(PROBE):].strip()
    if not ender:
        return None
    ids = tokenizer(ender, add_special_tokens=False)["input_ids"]
    return None if len(ids) == 1 and ids[0] in special_ids(tokenizer) else ender


def special_ids(tokenizer: Any) -> set[int]:
    """The tokenizer's special tokens, with the added ones marked special (Gemma's <end_of_turn>)."""
    return set(tokenizer.all_special_ids) | {i for i, token in getattr(tokenizer, "added_tokens_decoder", {}).items()
                                             if getattr(token, "special", False)}


ONE_PASS_TURNS = 4  # conversations with more assistant turns are split in one rendering (see `_one_pass`)
OPEN, CLOSE = "\ue000", "\ue001"  # private-use characters around each assistant turn's content


def segments(conversation: list[dict[str, str]], tokenizer: Any, template: str | None, where: str) -> list[tuple[str, bool]]:
    """The rendered conversation, up to its last assistant turn, as (text, supervised) pieces: the text each
    assistant turn adds after the generation prompt (its content and the end-of-turn marker, trailing
    whitespace excluded) is supervised. Turn by turn, each assistant turn rendering the conversation up to it;
    a long conversation in one rendering, checked against the turn-by-turn split at its first and last turns."""
    def render(messages, prompt):
        try:
            return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                 add_generation_prompt=prompt)
        except Exception as exc:  # jinja raises its own errors (e.g. a template that refuses system turns)
            raise PeftlabError(f"{where}: the chat template cannot render this conversation: "
                               f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None

    answers = [i for i, t in enumerate(conversation) if t["role"] == "assistant"]
    conversation = conversation[: answers[-1] + 1]
    if len(answers) > ONE_PASS_TURNS:
        pieces = _one_pass(conversation, render)
        if pieces is not None and all(_split_at(conversation, i, render) == _rendered_upto(pieces, i, answers)
                                      for i in (answers[0], answers[-1])):
            return pieces
    return _turn_by_turn(conversation, render, where)


def _turn_by_turn(conversation, render, where: str) -> list[tuple[str, bool]]:
    pieces: list[tuple[str, bool]] = []
    done = ""  # the text rendered so far
    for i, turn in enumerate(conversation):
        if turn["role"] != "assistant":
            continue
        split = _split_at(conversation, i, render)
        if split is None or not split[0].startswith(done):
            raise PeftlabError(f"{where}: the chat template renders earlier turns differently once a later turn "
                               "follows, so the assistant's tokens cannot be told apart; use another "
                               "task.chat_template")
        prompt, kept = split
        pieces += [(prompt[len(done):], False), (kept, True)]
        done = prompt + kept
    return [(text, supervised) for text, supervised in pieces if text]


def _split_at(conversation, i: int, render) -> tuple[str, str] | None:
    """(the conversation before assistant turn `i` with the generation prompt, what the turn adds to it with
    trailing whitespace excluded); None when the template does not extend the one into the other."""
    prompt = render(conversation[:i], True)
    full = render(conversation[: i + 1], False)
    return (prompt, full[len(prompt):].rstrip()) if full.startswith(prompt) else None


def _one_pass(conversation, render) -> list[tuple[str, bool]] | None:
    """The pieces from one rendering in which each assistant content is wrapped in OPEN/CLOSE: the content and
    the end-of-turn text after it (as the turn ends when it is the last, read from the final turn) are
    supervised. None when the marks change what the template renders, or a turn ends otherwise."""
    marked = [{**t, "content": OPEN + t["content"] + CLOSE} if t["role"] == "assistant" else t for t in conversation]
    text = render(marked, False)
    if text.replace(OPEN, "").replace(CLOSE, "") != render(conversation, False):
        return None
    parts = text.split(OPEN)
    ending = parts[-1].split(CLOSE)[-1].rstrip()  # the last turn's end of turn
    pieces: list[tuple[str, bool]] = [(parts[0], False)]
    for part in parts[1:]:
        content, _, after = part.partition(CLOSE)
        if not after.startswith(ending):
            return None
        pieces += [(content + ending, True), (after[len(ending):], False)]
    pieces[-1] = ("", False)  # what follows the last turn's end: trailing whitespace
    return [(text, supervised) for text, supervised in pieces if text]


def _rendered_upto(pieces: list[tuple[str, bool]], i: int, answers: list[int]) -> tuple[str, str]:
    """What `_split_at` gives for assistant turn `i`, read from `pieces`."""
    supervised = [k for k, (_, is_answer) in enumerate(pieces) if is_answer]
    at = supervised[answers.index(i)]
    return "".join(text for text, _ in pieces[:at]), pieces[at][0]


def encode_chat(conversation: list[dict[str, str]], tokenizer: Any, template: str | None, max_length: int,
                where: str) -> tuple[dict[str, list[int]] | None, bool]:
    """(token ids and labels, truncated): the assistant's tokens supervised, everything else `IGNORE`; a
    conversation longer than `max_length` loses its start first (`fit_example`: the last assistant turn is
    the response); None when no supervised token is left."""
    input_ids, supervised = tokenize_pieces(tokenizer, segments(conversation, tokenizer, template, where))
    labels = [token if sup else IGNORE for token, sup in zip(input_ids, supervised)]
    span = last_supervised_span(labels)
    start = span[0] if span else len(labels)
    keep_first = bool(input_ids) and input_ids[0] in tokenizer.all_special_ids
    prompt_ids, response_ids, truncated = fit_example(input_ids[:start], input_ids[start:], max_length, keep_first)
    prompt_labels, response_labels, _ = fit_example(labels[:start], labels[start:], max_length, keep_first)
    input_ids, labels = prompt_ids + response_ids, prompt_labels + response_labels
    if all(label == IGNORE for label in labels[1:]):  # the first position is never predicted
        return None, truncated
    return {"input_ids": input_ids, "labels": labels}, truncated
