"""Task data: formats, splits, prompt masking, the tokenization cache and bad-data errors."""

import json

import pytest

from peftlab.errors import PeftlabError, PeftlabWarning
from peftlab.models.load import load_tokenizer
from peftlab.specs import ModelSpec, TaskSpec
from peftlab.tasks.kinds import ALPACA_TEMPLATE, render_prompt
from peftlab.tasks.prepare import IGNORE, collate, load_task


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelSpec(name="tiny-bert"))

pytestmark = pytest.mark.usefixtures("private_cache")  # a cache of its own per test


def write_rows(path, rows):
    if path.suffix == ".csv":
        keys = list(rows[0])
        path.write_text(",".join(keys) + "\n" + "".join(",".join(str(r[k]) for k in keys) + "\n" for r in rows))
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path.write_text(json.dumps(rows))
    return path


ROWS = [{"text": f"review number {i} is {'good' if i % 3 else 'bad'}", "label": "pos" if i % 3 else "neg"} for i in range(40)]


@pytest.mark.parametrize("suffix", [".csv", ".json", ".jsonl"])
def test_classification_files(tmp_path, tokenizer, suffix):
    path = write_rows(tmp_path / f"data{suffix}", ROWS)
    data = load_task(TaskSpec(path=path, kind="classification", validation_fraction=0.25, test_fraction=0.2), tokenizer)
    assert data.labels == ["neg", "pos"]
    assert (len(data.train), len(data.validation), len(data.test)) == (24, 8, 8)
    assert all(e["labels"] in (0, 1) for e in data.train)
    assert data.train[0]["input_ids"][0] == tokenizer.cls_token_id


def test_splits_are_deterministic_by_split_seed(tmp_path, tokenizer):
    path = write_rows(tmp_path / "data.json", ROWS)
    spec = TaskSpec(path=path, kind="classification")
    first, again = load_task(spec, tokenizer), load_task(spec, tokenizer)
    other = load_task(spec.model_copy(update={"split_seed": 1}), tokenizer)
    assert first.test == again.test and first.train == again.train
    assert first.test != other.test
    assert again.cache_file == first.cache_file and first.cache_file.is_file()


def test_a_run_of_a_few_steps_tokenizes_only_the_examples_it_draws(tmp_path, tokenizer, monkeypatch):
    rows = [*ROWS, {"text": "a middling review", "label": "mixed"}]  # one row of a third class
    spec = TaskSpec(path=write_rows(tmp_path / "data.json", rows), kind="classification")
    full = load_task(spec, tokenizer)
    encoded = []
    monkeypatch.setattr(type(tokenizer), "__call__", lambda self, text, **kw: encoded.append(text) or
                        {"input_ids": [1, 2]})
    few = load_task(spec, tokenizer, drawn=4)
    assert (len(few.train), len(few.validation), len(few.test)) == (4, len(full.validation), len(full.test))
    assert few.labels == full.labels == ["mixed", "neg", "pos"]  # the classes come from every training row
    assert len(encoded) == 4 + len(full.validation) + len(full.test)  # the other training rows are never tokenized
    monkeypatch.undo()
    assert load_task(spec, tokenizer, drawn=10_000).train == full.train  # more than the split holds: all of it


def test_alpaca_prompt_tokens_carry_no_loss(tmp_path, tokenizer):
    rows = [{"instruction": "Say yes.", "input": "" if i % 2 else "context", "output": "yes indeed"} for i in range(10)]
    data = load_task(TaskSpec(path=write_rows(tmp_path / "a.json", rows), kind="instruction"), tokenizer)
    example = data.train[0]
    supervised = [t for t in example["labels"] if t != IGNORE]
    response = tokenizer("yes indeed", add_special_tokens=False)["input_ids"]
    assert supervised == response + [tokenizer.sep_token_id]  # response + end of sequence
    n_prompt = example["labels"].index(supervised[0])
    assert example["input_ids"][n_prompt:] == supervised
    assert all(t == IGNORE for t in example["labels"][:n_prompt])


@pytest.fixture(scope="module")
def sentencepiece_style():
    """A BPE tokenizer that marks the start of a text and of each word with `▁` and splits at newlines, as Llama 2's
    and Mistral's SentencePiece tokenizers do: "The" alone is `▁The`, after a newline `The`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", behavior="isolated"),
                                                     pre_tokenizers.Metaspace(prepend_scheme="first")])
    backend.decoder = decoders.Metaspace(prepend_scheme="first")
    corpus = [render_prompt(ALPACA_TEMPLATE, "Name a colour.", "") + "The sky is blue.",
              "[INST] hi [/INST]\nThe answer", "The answer"]
    backend.train_from_iterator(corpus * 20, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    backend.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="</s>",
                                  unk_token="<unk>")
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} "
                         "[/INST]\n{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")  # the answer after a newline
    return tok


@pytest.mark.parametrize("rows", [
    [{"instruction": "Name a colour.", "input": "", "output": "The sky is blue."}],
    [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "The answer"}]}],
], ids=["alpaca", "chat"])
def test_a_prompt_and_its_answer_are_tokenized_as_the_model_reads_them_together(tmp_path, sentencepiece_style, rows):
    tok = sentencepiece_style
    data = load_task(TaskSpec(path=write_rows(tmp_path / "a.jsonl", rows * 8), kind="instruction"), tok)
    example = data.train[0]
    if "output" in rows[0]:
        answer = rows[0]["output"]
        whole = tok(render_prompt(ALPACA_TEMPLATE, "Name a colour.", "") + answer)["input_ids"] + [tok.eos_token_id]
    else:  # as transformers tokenizes a rendered conversation
        answer = rows[0]["messages"][1]["content"]
        whole = tok(tok.apply_chat_template(rows[0]["messages"], tokenize=False), add_special_tokens=False)["input_ids"]
    assert example["input_ids"] == whole  # the tokens of the whole text, not of its pieces one by one
    answer_ids = [t for t in example["labels"] if t != IGNORE]
    assert tok.convert_ids_to_tokens(answer_ids)[0] == "The"  # after a newline
    assert tok.convert_ids_to_tokens(tok(answer, add_special_tokens=False)["input_ids"])[0] == "▁The"  # alone
    assert tok.decode(answer_ids, skip_special_tokens=True).strip() == answer and answer_ids[-1] == tok.eos_token_id


def test_a_token_across_a_prompt_and_its_answer_belongs_to_the_answer(sentencepiece_style):
    from peftlab.tasks.fit import tokenize_pieces

    ids, supervised = tokenize_pieces(sentencepiece_style, [("is ", False), ("blue.", True)])
    assert sentencepiece_style.convert_ids_to_tokens(ids) == ["▁is", "▁blue."]  # "▁blue." holds the prompt's space
    assert supervised == [False, True]


def test_empty_responses_are_dropped_and_counted_but_an_empty_instruction_is_an_error(tmp_path, tokenizer):
    rows = [{"instruction": f"Say {i}.", "input": "", "output": "" if i in (3, 7) else f"{i}"} for i in range(20)]
    data = load_task(TaskSpec(path=write_rows(tmp_path / "a.json", rows), kind="instruction"), tokenizer)
    assert data.dropped == 2 and len(data.train) + len(data.validation) + len(data.test) == 18
    rows[5]["instruction"] = " "
    with pytest.raises(PeftlabError, match="row 6: column 'instruction' is empty"):
        load_task(TaskSpec(path=write_rows(tmp_path / "b.json", rows), kind="instruction"), tokenizer)


def test_dolly_format_and_truncation_keeps_the_response(tmp_path, tokenizer):
    rows = [{"instruction": "Summarise.", "context": "word " * 200, "response": "short"} for _ in range(10)]
    data = load_task(TaskSpec(path=write_rows(tmp_path / "d.jsonl", rows), kind="instruction", max_length=48), tokenizer)
    example = data.train[0]
    assert len(example["input_ids"]) == 48
    assert [t for t in example["labels"] if t != IGNORE] == tokenizer("short", add_special_tokens=False)["input_ids"] + [tokenizer.sep_token_id]


def test_an_example_that_fits_is_kept_whole_and_a_long_one_loses_its_prompts_start(tmp_path, tokenizer):
    """Only examples beyond max_length are cut, and then from the prompt's start: the response keeps its
    end-of-sequence token, so the model still learns to stop."""
    fits = {"instruction": "alpha " * 5, "input": "", "output": "beta " * 70}  # ~37 prompt + 71 response <= 128
    long = {"instruction": "alpha " * 80, "input": "", "output": "beta " * 70}
    rows = [fits] * 6 + [long] * 4
    with pytest.warns(PeftlabWarning, match=r"4 example\(s\) longer than task.max_length=128"):
        data = load_task(TaskSpec(path=write_rows(tmp_path / "a.json", rows), kind="instruction", max_length=128,
                                  validation_fraction=0, test_fraction=0.1), tokenizer)
    assert data.truncated == 4
    response = tokenizer("beta " * 70, add_special_tokens=False)["input_ids"] + [tokenizer.sep_token_id]
    whole, cut = (sorted(data.train + data.test, key=lambda e: len(e["input_ids"]))[i] for i in (0, -1))
    assert [t for t in whole["labels"] if t != IGNORE] == response  # nothing lost, EOS kept
    assert len(cut["input_ids"]) == 128 and [t for t in cut["labels"] if t != IGNORE] == response
    prompt = cut["input_ids"][: 128 - len(response)]
    assert prompt[0] == tokenizer.cls_token_id and "alpha" in tokenizer.decode(prompt[1:3])  # the start went
    assert tokenizer.decode(prompt[-6:-1]).endswith("# # # response :")  # the marker stayed


def test_a_long_conversation_loses_its_first_turns_and_keeps_the_last_answers_end(tmp_path, tokenizer):
    template = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} [SEP] {% endfor %}"
                "{% if add_generation_prompt %}<assistant> {% endif %}")
    conversation = [{"role": "user", "content": "alpha " * 40}, {"role": "assistant", "content": "gamma " * 10},
                    {"role": "user", "content": "alpha " * 40}, {"role": "assistant", "content": "beta " * 20}]
    rows = [{"messages": conversation}] * 8
    with pytest.warns(PeftlabWarning, match="longer than task.max_length=64"):
        data = load_task(TaskSpec(path=write_rows(tmp_path / "c.jsonl", rows), kind="instruction", max_length=64,
                                  chat_template=template), tokenizer)
    example = data.train[0]
    assert len(example["input_ids"]) == 64
    answer = [t for t in example["labels"][-21:]]
    assert answer == tokenizer("beta " * 20, add_special_tokens=False)["input_ids"] + [tokenizer.sep_token_id]


def test_collate_pads_and_masks():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]}, {"input_ids": [5], "labels": [5]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [5, IGNORE, IGNORE]]


def test_bundled_reviews(tokenizer):
    data = load_task(TaskSpec(name="reviews"), tokenizer)
    assert data.labels == ["great", "other"]
    assert (len(data.train), len(data.validation), len(data.test)) == (3600, 400, 1000)
    assert sum(e["labels"] == 0 for e in data.test) == 658  # the majority class: 65.8%


def test_bundled_reviews_instruct(tokenizer):
    data = load_task(TaskSpec(name="reviews-instruct", max_eval_examples=10), tokenizer)
    assert data.kind == "instruction" and len(data.test) == 10
    answers = {tuple(t for t in e["labels"] if t != IGNORE) for e in data.train[:50]}
    great = tuple(tokenizer("great", add_special_tokens=False)["input_ids"] + [tokenizer.sep_token_id])
    assert great in answers


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "the file is empty"),
        (b"text,label\nfine,pos\n\xff\xfe broken,neg\n", "line 3: invalid UTF-8"),
        (b"text,score\nfine,pos\n", "row 2: column 'label' is missing (columns present: score, text)"),
        (b"text,label\nfine,pos\n,neg\n", "row 3: column 'text' is empty"),
    ],
)
def test_bad_csv_names_file_and_row(tmp_path, tokenizer, content, message):
    path = tmp_path / "bad.csv"
    path.write_bytes(content)
    with pytest.raises(PeftlabError) as err:
        load_task(TaskSpec(path=path, kind="classification"), tokenizer)
    assert str(path) in str(err.value) and message in str(err.value)


def test_bad_jsonl_line(tmp_path, tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n{"text": oops}\n')
    with pytest.raises(PeftlabError, match="bad.jsonl: line 2: invalid JSON"):
        load_task(TaskSpec(path=path, kind="classification"), tokenizer)


def test_a_class_only_in_the_test_split_is_kept_with_a_warning(tmp_path, tokenizer):
    train = write_rows(tmp_path / "train.csv", ROWS)
    test = write_rows(tmp_path / "test.csv", [{"text": "a", "label": "pos"}, {"text": "b", "label": "meh"}])
    with pytest.warns(PeftlabWarning, match=r"train.csv: class\(es\) 'meh' never occur in training"):
        data = load_task(TaskSpec(path=train, test_path=test, kind="classification"), tokenizer)
    assert data.labels == ["neg", "pos", "meh"]  # the head has an output for it: its examples count as errors
    assert sorted(e["labels"] for e in data.test) == [1, 2]
    with pytest.raises(PeftlabError, match=r"test.csv: row 3: label 'meh' is not in task.labels \['neg', 'pos'\]"):
        load_task(TaskSpec(path=train, test_path=test, kind="classification", labels=["neg", "pos"]), tokenizer)


def test_unreadable_and_unsupported_files(tmp_path, tokenizer):
    with pytest.raises(PeftlabError, match="no such file"):
        load_task(TaskSpec(path=tmp_path / "missing.csv", kind="classification"), tokenizer)
    (tmp_path / "data.parquet").write_text("x")
    with pytest.raises(PeftlabError, match="unsupported file type '.parquet'"):
        load_task(TaskSpec(path=tmp_path / "data.parquet", kind="classification"), tokenizer)


def test_datasets_source_reads_a_local_dataset_directory(tmp_path, tokenizer):
    folder = tmp_path / "ds"
    folder.mkdir()
    write_rows(folder / "train.jsonl", ROWS)
    write_rows(folder / "test.jsonl", ROWS[:10])
    spec = TaskSpec(dataset=str(folder), kind="classification", test_split="test", validation_fraction=0.25)
    data = load_task(spec, tokenizer)
    assert (len(data.train), len(data.validation), len(data.test)) == (30, 10, 10)
    assert data.labels == ["neg", "pos"]


def test_task_spec_needs_one_source_and_a_kind():
    from peftlab.config import validate

    with pytest.raises(PeftlabError, match="task: kind is required with path or dataset"):
        validate(TaskSpec, {"path": "x.csv"}, "task")
    with pytest.raises(PeftlabError, match="give one of name, path or dataset"):
        validate(TaskSpec, {"name": "reviews", "path": "x.csv", "kind": "classification"}, "task")
