"""Chat rows: formatted with the tokenizer's chat template, supervised on the assistant's tokens only."""

import json
import re

import pytest

from peftlab.errors import PeftlabError
from peftlab.models.load import GEMMA3_CHAT_TEMPLATE
from peftlab.specs import TaskSpec
from peftlab.tasks.prepare import IGNORE, load_task
from peftlab.train.generation import generation_prompts

pytestmark = pytest.mark.usefixtures("private_cache")

TEMPLATE = ("{{ bos_token }}{% for m in messages %}<start> {{ m['role'] }} {{ m['content'] }} <end>\n{% endfor %}"
            "{% if add_generation_prompt %}<start> assistant {% endif %}")
WORDS = ["user", "assistant", "system", "hello", "there", "hi", "friend", "bye", "see", "you", "be", "brief", "[UNK]"]


@pytest.fixture
def tokenizer():
    """A word-level tokenizer built here (nothing downloaded) with a chat template whose turns end in <end>."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "<bos>", "<eos>", "<start>", "<end>"]
    vocab = {token: i for i, token in enumerate(specials + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="[PAD]",
                                  unk_token="[UNK]")
    # special added tokens that are not among the named special tokens, as Gemma's <start_of_turn> / <end_of_turn>
    tok.add_tokens([AddedToken("<start>", special=True), AddedToken("<end>", special=True)])
    assert tok.convert_tokens_to_ids("<end>") not in tok.all_special_ids
    tok.chat_template = TEMPLATE
    return tok


def write_rows(tmp_path, rows, name="chat.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


CONVERSATION = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"},
                {"role": "assistant", "content": "hi friend"}, {"role": "user", "content": "bye"},
                {"role": "assistant", "content": "see you"}]


def task(path, **more):
    return TaskSpec(path=path, kind="instruction", test_fraction=0.25, validation_fraction=0.0, **more)


def test_only_the_assistant_tokens_are_supervised_token_by_token(tmp_path, tokenizer):
    path = write_rows(tmp_path, [{"messages": CONVERSATION}] * 8)
    example = load_task(task(path), tokenizer).train[0]
    tokens = tokenizer.convert_ids_to_tokens(example["input_ids"])
    assert tokens == ["<bos>", "<start>", "system", "be", "brief", "<end>", "<start>", "user", "hello", "there", "<end>",
                      "<start>", "assistant", "hi", "friend", "<end>", "<start>", "user", "bye", "<end>",
                      "<start>", "assistant", "see", "you", "<end>"]
    supervised = [t for t, label in zip(tokens, example["labels"]) if label != IGNORE]
    assert supervised == ["hi", "friend", "<end>", "see", "you", "<end>"]
    for token_id, label in zip(example["input_ids"], example["labels"]):
        assert label in (IGNORE, token_id)


def test_sharegpt_rows_read_like_messages(tmp_path, tokenizer):
    share = [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[t["role"]], "value": t["content"]}
             for t in CONVERSATION]
    messages = load_task(task(write_rows(tmp_path, [{"messages": CONVERSATION}] * 8)), tokenizer).train[0]
    sharegpt = load_task(task(write_rows(tmp_path, [{"conversations": share}] * 8, "share.jsonl")), tokenizer).train[0]
    assert sharegpt == messages


def test_generation_completes_the_last_assistant_turn_and_stops_at_the_end_of_turn(tmp_path, tokenizer):
    data = load_task(task(write_rows(tmp_path, [{"messages": CONVERSATION}] * 8)), tokenizer)
    prompts = generation_prompts(data.test, 5, tokenizer, tokenizer.pad_token_id)
    assert tokenizer.convert_ids_to_tokens(prompts.ids[0])[-2:] == ["<start>", "assistant"]
    assert prompts.references[0] == "see you"
    assert tokenizer.convert_tokens_to_ids("<end>") in prompts.stop_ids


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_an_end_of_turn_of_several_tokens_stops_generation_and_is_left_out_of_scores(tmp_path):
    """ChatML's <|im_end|> on a tokenizer without that token (GPT-2's) is seven tokens, not one stop id."""
    import torch

    from peftlab.models.load import load_tokenizer
    from peftlab.specs import GenerateSpec, ModelSpec
    from peftlab.train.generation import generate

    gpt2 = load_tokenizer(ModelSpec(name="tiny-gpt2"))
    rows = [{"messages": [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "see you"}]}] * 8
    data = load_task(task(write_rows(tmp_path, rows), chat_template=CHATML), gpt2)
    assert data.end_of_turn == "<|im_end|>"
    prompts = generation_prompts(data.test, 2, gpt2, gpt2.pad_token_id, data.end_of_turn)
    ender = gpt2("<|im_end|>", add_special_tokens=False)["input_ids"]
    assert len(ender) > 1 and prompts.stop_sequence == ender
    assert prompts.references == ["see you", "see you"]  # the end of turn is not part of the reference

    answer = gpt2(" see you", add_special_tokens=False)["input_ids"] + ender
    calls = []

    class Scripted(torch.nn.Module):
        """Generates `answer` then filler, one token per step, asking the stopping criteria as generate does."""

        def generate(self, input_ids, attention_mask, generation_config, stopping_criteria):
            out = input_ids
            for step in range(generation_config.max_new_tokens):
                token = answer[step] if step < len(answer) else 13
                out = torch.cat([out, torch.full((out.shape[0], 1), token)], dim=1)
                calls.append(step)
                if all(criterion(out, None).all() for criterion in stopping_criteria):
                    break
            return out

    completions = generate(Scripted(), prompts, GenerateSpec(max_new_tokens=20, batch_size=2), gpt2, "cpu")
    assert completions.texts == ["see you", "see you"]
    assert completions.new_tokens == [len(answer)] * 2 and len(calls) == len(answer)  # stopped at the end of turn


@pytest.mark.parametrize("turns, message", [
    ([{"role": "bot", "content": "hi"}], "row 1: messages: turn 1: unknown role 'bot'"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}], "row 1: messages: turn 2 (assistant) is empty"),
    ([{"role": "user", "content": "hello"}], "row 1: messages: no assistant turn to learn from"),
    ("hello", "row 1: messages: expected a non-empty list of turns"),
])
def test_a_bad_row_is_one_line_naming_the_row(tmp_path, tokenizer, turns, message):
    rows = [{"messages": turns}] + [{"messages": CONVERSATION}] * 7
    path = write_rows(tmp_path, rows)
    with pytest.raises(PeftlabError) as error:
        load_task(TaskSpec(path=path, kind="instruction", test_fraction=0.25, split_seed=1), tokenizer)
    assert str(error.value).startswith(f"{path}: {message}")
    assert "\n" not in str(error.value)


def test_a_tokenizer_without_a_chat_template_is_told_how_to_give_one(tmp_path, tokenizer):
    tokenizer.chat_template = None
    path = write_rows(tmp_path, [{"messages": CONVERSATION}] * 8)
    with pytest.raises(PeftlabError, match="has none; give one as task.chat_template"):
        load_task(task(path), tokenizer)
    assert load_task(task(path, chat_template=TEMPLATE), tokenizer).train  # given in the task, it is used


def test_a_template_that_rewrites_earlier_turns_is_refused(tmp_path, tokenizer):
    # renders only the last two turns: earlier text changes as the conversation grows
    shifting = "{% for m in messages[-2:] %}{{ m['role'] }} {{ m['content'] }} <end>\n{% endfor %}" \
               "{% if add_generation_prompt %}assistant {% endif %}"
    path = write_rows(tmp_path, [{"messages": CONVERSATION}] * 8)
    with pytest.raises(PeftlabError, match="renders earlier turns differently"):
        load_task(task(path, chat_template=shifting), tokenizer)


def test_the_bundled_gemma_template_renders_gemma_turns_and_splits_into_assistant_segments(tokenizer):
    from peftlab.models.load import GEMMA3_CHAT_TEMPLATE
    from peftlab.tasks.chat import segments

    text = tokenizer.apply_chat_template(CONVERSATION, chat_template=GEMMA3_CHAT_TEMPLATE, tokenize=False)
    assert text == ("<bos><start_of_turn>user\nbe brief\n\nhello there<end_of_turn>\n<start_of_turn>model\nhi friend"
                    "<end_of_turn>\n<start_of_turn>user\nbye<end_of_turn>\n<start_of_turn>model\nsee you<end_of_turn>\n")
    pieces = segments(CONVERSATION, tokenizer, GEMMA3_CHAT_TEMPLATE, "row 1")
    assert [p for p, supervised in pieces if supervised] == ["hi friend<end_of_turn>", "see you<end_of_turn>"]
    assert "".join(p for p, _ in pieces) == text.rstrip()


def test_content_parts_read_as_their_text_and_other_contents_name_the_turn(tmp_path, tokenizer):
    def parts(text):  # "hi friend" -> [{type: text, text: "hi "}, {type: text, text: "friend"}], joined back
        words = text.split(" ")
        return [{"type": "text", "text": w + (" " if i < len(words) - 1 else "")} for i, w in enumerate(words)]

    parts = [{**t, "content": parts(t["content"])} for t in CONVERSATION]
    plain = load_task(task(write_rows(tmp_path, [{"messages": CONVERSATION}] * 8)), tokenizer).train[0]
    as_parts = load_task(task(write_rows(tmp_path, [{"messages": parts}] * 8, "parts.jsonl")), tokenizer).train[0]
    assert as_parts == plain
    bad = {
        "a number": ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": 123}],
                     "turn 2 (assistant): content is a int (123); expected text or a list of"),
        "an image part": ([{"role": "user", "content": [{"type": "image", "url": "x"}]}, {"role": "assistant", "content": "hi"}],
                          "turn 1 (user): content parts of type image; only text parts are supported"),
        "assistant first": ([{"role": "assistant", "content": "hello"}, {"role": "user", "content": "hi"},
                             {"role": "assistant", "content": "bye"}], "turn 1 is the assistant's; a conversation starts"),
    }
    for name, (turns, message) in bad.items():
        path = write_rows(tmp_path, [{"messages": turns}] + [{"messages": CONVERSATION}] * 7, f"{name}.jsonl")
        with pytest.raises(PeftlabError, match=re.escape(message)):
            load_task(TaskSpec(path=path, kind="instruction", test_fraction=0.25), tokenizer)


@pytest.mark.parametrize("template, message", [
    ("chat_template.jinja", "task.chat_template: renders no message content ('chat_template.jinja'...)"),
    ("always the same", "task.chat_template: renders no message content"),
    ("{% for m in messages %}{{ m.content }", "task.chat_template: cannot render a user and an assistant turn"),
])
def test_a_chat_template_that_renders_no_content_or_no_jinja_names_the_field(tmp_path, tokenizer, template, message):
    path = write_rows(tmp_path, [{"messages": CONVERSATION}] * 8)
    with pytest.raises(PeftlabError, match=re.escape(message)):
        load_task(task(path, chat_template=template), tokenizer)


def long_conversation(turns: int) -> list[dict[str, str]]:
    words = ["hello", "there", "hi", "friend", "bye", "see", "you"]
    out = [{"role": "system", "content": "be brief"}]
    for i in range(turns):
        out += [{"role": "user", "content": f"{words[i % 7]} {words[(i + 3) % 7]}"},
                {"role": "assistant", "content": f"{words[(i + 1) % 7]} {words[(i + 5) % 7]}  "}]  # trailing spaces
    return out


@pytest.mark.parametrize("template", [TEMPLATE, CHATML, GEMMA3_CHAT_TEMPLATE, "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: "
                                      "{{ m['content'] | trim }}\n{% endfor %}{% if add_generation_prompt %}assistant: "
                                      "{% endif %}"])
def test_a_long_conversation_is_split_in_one_rendering_exactly_as_turn_by_turn(tokenizer, template):
    from peftlab.tasks import chat

    conversation = long_conversation(12)

    def render(messages, prompt):
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=prompt)

    one_pass = chat.segments(conversation, tokenizer, template, "row 1")
    assert one_pass == chat._turn_by_turn(conversation, render, "row 1")
    assert sum(supervised for _, supervised in one_pass) == 12


def test_a_two_thousand_turn_conversation_renders_a_fixed_number_of_times(tokenizer, monkeypatch):
    from peftlab.tasks import chat

    calls = []
    original = type(tokenizer).apply_chat_template

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "apply_chat_template", counted)
    pieces = chat.segments(long_conversation(2000), tokenizer, None, "row 1")
    assert sum(supervised for _, supervised in pieces) == 2000
    assert len(calls) <= 6  # one marked and one plain rendering, two checks of two renderings each
