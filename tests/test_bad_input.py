"""Bad input never gets a traceback. Malformed configs, data files, study specs and command-line values are
generated (seeded, so every run of the suite sees the same cases) and each goes through the CLI entry point
in-process: exit code 2, one line on stderr, no traceback, and nothing new in the working directory.

Every generated input is malformed by construction (a value outside its field's range, a row that cannot
parse, an axis value that no model accepts), so a case that exits 0 is a bug in the validation."""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
from pathlib import Path

import pytest
import yaml

from peftlab.cli import main


def invoke(*args) -> tuple[int, str, str]:
    """`peftlab ARGS...` in-process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def snapshot(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.fixture
def work(tmp_path, monkeypatch):
    """The working directory of a case: a small classification and instruction file, a file where a folder
    is expected, and a non-empty folder. The peftlab cache lies outside it."""
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "work"
    folder.mkdir()
    monkeypatch.chdir(folder)
    rows = [{"text": f"the food was {'great' if i % 2 else 'awful'} {i}", "label": "pos" if i % 2 else "neg"}
            for i in range(24)]
    (folder / "reviews.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    instructions = [{"instruction": f"say {i}", "input": "", "output": f"number {i}"} for i in range(24)]
    (folder / "instruct.json").write_text(json.dumps(instructions))
    (folder / "a-file").write_text("not a folder\n")
    (folder / "full").mkdir()
    (folder / "full" / "kept.txt").write_text("kept\n")
    return folder


def check_refused(work: Path, args: list, expected: str | None = None) -> str:
    before = snapshot(work)
    code, out, err = invoke(*args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, f"exit {code}: {args}\n{out[-2000:]}\n{err[-2000:]}"
    assert "Traceback" not in err + out, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert snapshot(work) == before, f"{args} left {snapshot(work) - before}"
    if expected is not None:
        assert expected in lines[0], lines[0]
    return lines[0]


# -- command-line values ----------------------------------------------------------------------------------------

RUN = ["run", "--model", "tiny-bert", "--data", "reviews.jsonl", "--kind", "classification", "--max-steps", "1",
       "--output", "out"]
CLI_VALUES = {  # (command prefix, option): values that are each invalid for it
    ("run", "--lr"): ["inf", "-inf", "nan", "0", "-0.001", "fast", "1e999"],
    ("run", "--epochs"): ["inf", "nan", "0", "-1", "one", "1e9"],
    ("run", "--seed"): ["-1", "-100", "4294967296", "99999999999999999999", "1e3", "abc"],
    ("run", "--batch-size"): ["0", "-5", "abc", "2.5"],
    ("run", "--max-length"): ["0", "7", "100000", "99999999999999999999", "-1"],
    ("run", "--max-steps"): ["0", "-1", "abc"],
    ("run", "--rank"): ["0", "-3", "65", "1e3"],
    ("run", "--generate"): ["0", "-1", "3"],  # 3: generation on a classification task
    ("run", "--method"): ["lorra", "LORA", "peft"],
    ("run", "--placement"): ["everything", "q,x", "attn.z", "gate"],
    ("run", "--layers"): ["99", "-1", "2-1", "abc", "every-0th", "last-0", "0,0,7"],
    ("run", "--allocation"): ["quadratic(3)", "linear(8)", "uniform(0)", "role-weighted(8, attn=inf)",
                              "role-weighted(8, attn=nan)", "role-weighted(8, attn=-1)", "role-weighted(8, attn=1e999)",
                              "budget(0)", "budget(1e999)", "budget(inf)", "from-scores(missing.json)", "uniform(",
                              "linear(16->x)", "attention-heavy(8, 9)"],
    ("run", "--budget"): ["0", "-1", "1", "abc"],
    ("run", "--task"): ["reviewz", ""],
    ("run", "--kind"): ["regression"],
    ("run", "--data"): ["missing.csv", "full", "a-file", "reviews.parquet"],
    ("run", "--model"): ["tiny-bret", "", "llama3-8b", "/no/such/dir", "./a-file"],
    ("run", "--device"): ["gpu", "tpu"],
    ("run", "--checkpoint-every"): ["-1", "often"],
    ("run", "--track"): ["neptune", "mlflow,mlflow", ""],
    ("run", "--output"): ["a-file", "a-file/run", "full"],
    ("plan", "--output"): ["a-file/plan.json", "full"],
    ("plan", "--alpha"): ["lots", "-1", "0", "inf", "nan", "2x"],
    ("plan", "--modules"): ["c_attn", ","],
    ("importance", "--measure"): ["bogus", "gradient,nope"],
    ("importance", "--steps"): ["0", "-1"],
    ("importance", "--rank"): ["0", "nan", "inf", "-1"],
    ("importance", "--seed"): ["-1", "4294967296"],
    ("importance", "--output"): ["a-file", "a-file/scores"],
    ("recommend", "--budget"): ["0", "-1", "abc"],
    ("recommend", "--measure"): ["bogus"],
    ("recommend", "--steps"): ["0"],
    ("recommend", "--study"): ["full", "missing-study"],
    ("recommend", "--output"): ["a-file/run.yaml", "full"],
    ("report", "--test"): ["z"],
    ("report", "--interval"): ["z"],
    ("report", "--margin"): ["0", "-1", "nan", "inf"],
    ("study", "--jobs"): ["0", "-1"],
    ("study", "--executor"): ["bogus", ""],
    ("study", "--dir"): ["a-file", "a-file/study", "full"],
    ("study", "--set"): ["noequals", "train.lrr=1", "seeds=[-1]", "train.lr=.inf", "margin=0"],
    ("study", "--data"): ["missing.csv"],
}


def cli_args(work: Path, command: str, option: str, value: str) -> list:
    if command == "run":
        args = [a for a in RUN]
        if option in args:  # replace the default (--data, --model, --output)
            index = args.index(option)
            args[index + 1] = value
            return args
        return [*args, option, value]
    if command == "plan":
        return ["plan", "--model", "tiny-bert", option, value]
    if command == "importance":
        return ["importance", "--model", "tiny-bert", "--data", "reviews.jsonl", "--kind", "classification",
                "--steps", "1", "--output", "scores", option, value]
    if command == "recommend":
        defaults = {"--budget": "5000", "--steps": "1"}
        defaults[option] = value
        return ["recommend", "--model", "tiny-bert", "--data", "reviews.jsonl", "--kind", "classification",
                *[x for pair in defaults.items() for x in pair]]
    if command == "report":
        return ["report", work / "study", option, value]
    study = work / "spec.yaml"
    defaults = {"--dir": "study"}
    defaults[option] = value
    return ["study", "run", study, *[x for pair in defaults.items() for x in pair]]


def valid_study_spec(work: Path) -> Path:
    """A valid one-configuration study on the test's data (a case must make it invalid)."""
    spec = {"name": "tiny", "base": {"model": "tiny-bert", "task": {"path": str(work / "reviews.jsonl"),
                                                                    "kind": "classification"},
                                     "train": {"max_steps": 1, "latency_batches": 0}},
            "axes": {"rank": [2]}, "seeds": [0]}
    path = work / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


CLI_CASES = [(command, option, value) for (command, option), values in CLI_VALUES.items() for value in values]
CLI_CASES += [("run", "--bogus", "1"), ("plan", "--placement", None), ("nosuch", None, None)]


@pytest.mark.parametrize("command, option, value", CLI_CASES, ids=[f"{c} {o} {v!r}" for c, o, v in CLI_CASES])
def test_cli_values(work, command, option, value):
    if command == "nosuch":
        args = ["nosuch"]
    elif value is None:
        args = [command, "--model", "tiny-bert", option]  # an option without its value
    else:
        args = cli_args(work, command, option, value)
    if command in ("study", "report"):
        valid_study_spec(work)
        if command == "report":
            (work / "study").mkdir()  # a folder that holds no study
    check_refused(work, args)


# -- config files ---------------------------------------------------------------------------------------------

def valid_run_config(work: Path) -> dict:
    return {"model": "tiny-bert", "task": {"path": str(work / "reviews.jsonl"), "kind": "classification"},
            "plan": {"placement": "attention", "allocation": 2}, "method": "lora",
            "train": {"max_steps": 1, "latency_batches": 0}}


CONFIG_VALUES = {  # dotted path: values invalid there
    "model": [5, [1, 2]],
    "model.name": ["tiny-bret", "", 3],
    "model.num_labels": [1, -1, "two"],
    "model.dtype": ["fp8"],
    "model.dropout": [1.5, -0.1, float("nan")],
    "model.role_map": [{"[": "q"}, {"query": "nope"}, "q"],
    "model.head": ["regressor"],
    "model.nme": ["x"],
    "task.max_length": [4, 100000, 10**20, "long"],
    "task.validation_fraction": [1.0, -0.1, float("nan")],
    "task.test_fraction": [0, 1, float("inf")],
    "task.kind": ["regression"],
    "task.format": ["xml"],
    "task.split_seed": [-1, 2**40],
    "task.max_train_examples": [0],
    "task.labels": [["pos"]],  # a label of the data is missing
    "task.text_column": ["body"],
    "task.dataset": ["also-a-dataset"],  # two sources
    "train.lr": [float("inf"), float("nan"), -1, "fast"],
    "train.epochs": [float("inf"), 0, -2],
    "train.seed": [-1, 2**40, 1.5],
    "train.batch_size": [0, -3],
    "train.optimizer": ["sgd"],
    "train.schedule": ["step"],
    "train.warmup_ratio": [1.0, float("nan")],
    "train.precision": ["fp8"],
    "train.max_grad_norm": [0, float("nan")],
    "train.lrr": [0.1],
    "train.device": ["gpu", "tpu"],
    "train.checkpoint_every": [-1, "often"],
    "tracking": [["neptune"], [], {"backends": ["mlflow", "mlflow"]}, {"backends": ["mlflow"], "tags": {"a": [1]}}],
    "plan.allocation": ["quadratic(2)", {"kind": "linear", "first": 8}, {"kind": "uniform", "rank": float("inf")},
                        {"kind": "role-weighted", "rank": 2, "weights": {"attn": float("nan")}}, 0, -4],
    "plan.placement": [{"roles": "everything"}, {"layers": [9]}, {"layers": "lower-tenth"}, 7],
    "plan.alpha": [-2, "lots", float("inf")],
    "plan.rnk": [2],
    "method": ["lorra", {"name": "lora", "dropout": 1.0}, {"name": "lora", "loraplus_lr_ratio": float("nan")},
               {"name": "lora", "rank": 4}],
    "eval.generate": [{"examples": 0}, {"examples": 3}],  # a classification task has no generation
    "budget": [0, -5, float("inf")],
    "tassk": [1],
}
CONFIG_CASES = [(path, value) for path, values in CONFIG_VALUES.items() for value in values]


def set_path(data: dict, dotted: str, value) -> dict:
    *parents, last = dotted.split(".")
    node = data
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {} if node.get(part) is None else {"name": node[part]}
        node = node[part]
    node[last] = value
    return data


@pytest.mark.parametrize("dotted, value", CONFIG_CASES, ids=[f"{p}={v!r}" for p, v in CONFIG_CASES])
def test_run_config_files(work, dotted, value):
    config = set_path(valid_run_config(work), dotted, value)
    path = work / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    check_refused(work, ["run", "-c", path, "--output", "out"])


MALFORMED_CONFIGS = {
    "unclosed bracket": "model: tiny-bert\nplan: [unclosed\n",
    "a list": "- model\n- tiny-bert\n",
    "a scalar": "just words\n",
    "tabs": "model:\ttiny-bert\n\tplan: 2\n",
    "deep nesting": "a:\n" + "".join(" " * i + "b:\n" for i in range(1, 2000)),
    "deep flow nesting": "[" * 5000,
    "invalid UTF-8": b"model: tiny-bert\nplan: \xff\xfe\n",
    "binary": bytes(range(256)),
}


@pytest.mark.parametrize("name", MALFORMED_CONFIGS)
def test_malformed_config_files(work, name):
    path = work / "bad.yaml"
    text = MALFORMED_CONFIGS[name]
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    message = check_refused(work, ["plan", "-c", path, "--output", "plan.json"])
    assert str(path) in message


# -- data files -----------------------------------------------------------------------------------------------

def csv_text(rows: list[list[str]]) -> str:
    return "".join(",".join(row) + "\n" for row in rows)


def good_csv_rows(rng: random.Random) -> list[list[str]]:
    return [["text", "label"]] + [[f"review {i} {rng.choice(['tasty', 'bland'])}", rng.choice(["pos", "neg"])]
                                  for i in range(12)] + [["one more", "pos"], ["and another", "neg"]]


def ragged_csv(rng):
    rows = good_csv_rows(rng)
    row = rng.randrange(1, len(rows))
    rows[row] = rows[row] + ["extra"] * rng.randint(1, 3)
    return csv_text(rows)


def short_csv(rng):
    rows = good_csv_rows(rng)
    rows[rng.randrange(1, len(rows))] = ["alone"]
    return csv_text(rows)


def invalid_utf8(rng):
    data = csv_text(good_csv_rows(rng)).encode()
    at = rng.randrange(len("text,label\n"), len(data))
    return data[:at] + rng.choice([b"\xff", b"\xc3\x28", b"\xe2\x82", b"\xf0\x28\x8c\x28"]) + data[at:]


def truncated_json(rng):
    text = json.dumps([{"text": f"t{i}", "label": "pos" if i % 2 else "neg"} for i in range(10)])
    return text[: rng.randrange(1, len(text) - 1)]


def bad_jsonl_line(rng):
    lines = [json.dumps({"text": f"t{i}", "label": "pos" if i % 2 else "neg"}) for i in range(10)]
    at = rng.randrange(len(lines))
    lines[at] = rng.choice([lines[at][: rng.randrange(1, len(lines[at]) - 1)], "[1, 2]", '"text"', "{text: 1}", "nul"])
    return "\n".join(lines) + "\n"


def labelled(labels: list) -> str:
    return "".join(json.dumps({"text": f"t{i}", "label": label}) + "\n" for i, label in enumerate(labels))


DATA_GENERATORS = {  # name: (suffix, kind, rng -> file content); each gives an invalid file
    "ragged csv": (".csv", "classification", ragged_csv),
    "short csv row": (".csv", "classification", short_csv),
    "invalid utf-8": (".csv", "classification", invalid_utf8),
    "truncated json": (".json", "classification", truncated_json),
    "bad jsonl line": (".jsonl", "classification", bad_jsonl_line),
    "csv without label column": (".csv", "classification",
                                 lambda rng: csv_text([["text", "score"]] + [[f"t{i}", str(i)] for i in range(6)])),
    "csv with an empty text": (".csv", "classification",
                               lambda rng: csv_text([["text", "label"], ["a", "pos"], [" ", "neg"], ["b", "neg"]])),
    "duplicate csv header": (".csv", "classification",
                             lambda rng: csv_text([["text", "text", "label"], ["a", "b", "pos"], ["c", "d", "neg"]])),
    "header only": (".csv", "classification", lambda rng: "text,label\n"),
    "empty file": (".jsonl", "classification", lambda rng: rng.choice(["", "\n\n", "   \n"])),
    "json object, not a list": (".json", "classification", lambda rng: '{"text": "a", "label": "pos"}'),
    "json list of non-objects": (".json", "classification", lambda rng: json.dumps(rng.choice([[1, 2], ["a"], [[]]]))),
    "deeply nested json": (".json", "classification", lambda rng: "[" * 100_000 + "]" * 100_000),
    "deeply nested jsonl": (".jsonl", "classification", lambda rng: '{"a":' * 50_000 + "1" + "}" * 50_000 + "\n"),
    "mixed-type labels": (".jsonl", "classification",
                          lambda rng: labelled([rng.choice([0, 1]) if i % 3 else rng.choice(["pos", "neg"])
                                                for i in range(12)])),
    "float labels": (".jsonl", "classification", lambda rng: labelled([0.5, 1.5] * 6)),
    "null labels": (".jsonl", "classification", lambda rng: labelled(["pos", None] * 6)),
    "list labels": (".jsonl", "classification", lambda rng: labelled([["pos"], ["neg"]] * 6)),
    "boolean labels": (".jsonl", "classification", lambda rng: labelled([True, False] * 6)),
    "one class": (".jsonl", "classification", lambda rng: labelled(["pos"] * 12)),
    "unsupported suffix": (".tsv", "classification", lambda rng: "text\tlabel\na\tpos\n"),
    "instruction rows without output": (".jsonl", "instruction",
                                        lambda rng: "".join(json.dumps({"instruction": f"i{i}"}) + "\n"
                                                            for i in range(8))),
    "instruction rows all empty outputs": (".jsonl", "instruction",
                                           lambda rng: "".join(json.dumps({"instruction": f"i{i}", "output": ""})
                                                               + "\n" for i in range(8))),
    "chat rows without a template": (".jsonl", "instruction",
                                     lambda rng: "".join(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                                                  {"role": "assistant", "content": "yo"}]})
                                                         + "\n" for _ in range(8))),
    "chat rows with a bad role": (".jsonl", "instruction",
                                  lambda rng: "".join(json.dumps({"messages": [{"role": "robot", "content": "hi"}]})
                                                      + "\n" for _ in range(8))),
}
DATA_CASES = [(name, seed) for name in DATA_GENERATORS for seed in range(3 if name in (
    "ragged csv", "short csv row", "invalid utf-8", "truncated json", "bad jsonl line", "mixed-type labels") else 1)]


@pytest.mark.parametrize("name, seed", DATA_CASES, ids=[f"{n} {s}" for n, s in DATA_CASES])
def test_data_files(work, name, seed):
    suffix, kind, generate = DATA_GENERATORS[name]
    content = generate(random.Random(f"{name} {seed}"))
    path = work / f"data{suffix}"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    model = "tiny-bert" if kind == "classification" else "tiny-llama"
    message = check_refused(work, ["run", "--model", model, "--data", path, "--kind", kind, "--max-steps", "1",
                                   "--output", "out"])
    assert "data." in message or "task" in message, message  # names the file (or the task setting)


def mutated(data: bytes, rng: random.Random) -> bytes:
    """`data` with a few random bytes replaced, inserted or deleted."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        at, byte = rng.randrange(len(out)), rng.randrange(256)
        operation = rng.choice(["replace", "insert", "delete"])
        if operation == "replace":
            out[at] = byte
        elif operation == "insert":
            out.insert(at, byte)
        else:
            del out[at]
    return bytes(out)


@pytest.mark.parametrize("seed", range(8))
def test_randomly_mutated_csv_trains_or_is_refused_in_one_line(work, seed):
    """A random mutation may leave a valid file (it trains) or not (one line, nothing written), never a traceback."""
    rng = random.Random(f"mutation {seed}")
    path = work / "mutated.csv"
    path.write_bytes(mutated(csv_text(good_csv_rows(rng)).encode(), rng))
    before = snapshot(work)
    code, out, err = invoke("run", "--model", "tiny-bert", "--data", path, "--kind", "classification",
                            "--max-steps", "1", "--output", "out")
    assert "Traceback" not in err + out, err
    if code == 2:
        assert len([line for line in err.splitlines() if line.strip().startswith("error:")]) == 1, err
        assert snapshot(work) == before
    else:
        assert code == 0 and (work / "out" / "result.json").is_file(), err


# -- study specs ----------------------------------------------------------------------------------------------

STUDY_VALUES = {  # a top-level field of a study spec: values invalid there
    "name": ["", "bad name!", 5, "../up"],
    "seeds": [[-1], [0, 0], [], [2**40], {"min": 1}, {"min": 3, "max": 2}, "abc", {"min": 5000}, {"min": 3, "mx": 5},
              list(range(1001))],
    "axes": [{"colour": [1]}, {"rank": []}, {"rank": [2, 0]}, {"train.lrr": [1]}, {"placement": ["everything"]},
             {"layers": [99]}, {"variant": [1]}, {"variant": {"a": {"trian.lr": 1}}}, {"model": ["tiny-bret"]},
             {"lr": [float("inf")]}, {"lr": [-1]}, {"method": ["lorra"]}, {"rank": [2, 65]}, {"alpha": ["lots"]},
             {"allocation": ["linear(8)"]}, [1, 2], {"task": [{"path": "missing.csv", "kind": "classification"}]}],
    "base": [{"trian": 1}, {"model": {"nme": "x"}}, {"train": {"lr": float("nan")}}, {"model": "tiny-bret"},
             {"task": {"path": "missing.csv", "kind": "classification"}}, "tiny-bert"],
    "tune": [{"lr": [1e-3], "lr_factors": [1]}, {"lr": [-1]}, {"lr": []}, {"lr": [float("nan")]},
             {"lr": [1e-3], "seeds": [-1]}, {"lr": [1e-3], "seeds": [5, 5]}, {}],
    "until_resolved": [{"max": 1}, {"max": 0}, {"step": 0, "max": 5}],
    "margin": [0, -1, float("inf"), float("nan")],
    "axis": [{"rank": [2]}],
}
STUDY_CASES = [(field, value) for field, values in STUDY_VALUES.items() for value in values]


@pytest.mark.parametrize("field, value", STUDY_CASES, ids=[f"{f}={json.dumps(v)[:40]}" for f, v in STUDY_CASES])
def test_study_specs(work, field, value):
    path = valid_study_spec(work)
    spec = yaml.safe_load(path.read_text())
    if field == "base" and isinstance(value, dict):
        spec["base"] = {**spec["base"], **value}
    else:
        spec[field] = value
    path.write_text(yaml.safe_dump(spec))
    check_refused(work, ["study", "run", path, "--dir", "study"])


def test_the_generated_cases_number_at_least_200_over_four_families():
    families = {"cli": len(CLI_CASES), "configs": len(CONFIG_CASES) + len(MALFORMED_CONFIGS),
                "data": len(DATA_CASES), "studies": len(STUDY_CASES)}
    assert all(n >= 20 for n in families.values()), families
    assert sum(families.values()) >= 200, families


# -- the issue's examples, one by one -------------------------------------------------------------------------

REFUSED = {  # name: (args, a part of the message); `work` holds reviews.jsonl, a-file and full/
    "role-weighted 1e999": (["plan", "--model", "tiny-bert", "--allocation", "role-weighted(8, attn=1e999)"],
                            "plan.allocation.weights.attn: Input should be a finite number"),
    "role-weighted nan": (["plan", "--model", "tiny-bert", "--allocation", "role-weighted(8, attn=nan)"],
                          "plan.allocation.weights.attn: Input should be a finite number"),
    "epochs inf": ([*RUN, "--epochs", "inf"], "train.epochs: Input should be a finite number"),
    "seed -1": ([*RUN, "--seed", "-1"], "train.seed: Input should be greater than or equal to 0"),
    "lr inf": ([*RUN, "--lr", "inf"], "train.lr: Input should be a finite number"),
    "output under a file": ([*RUN[:-1], "a-file/run"], "--output a-file/run: a-file is a file, not a directory"),
    "plan output an existing directory": (["plan", "--model", "tiny-bert", "--output", "full"],
                                          "--output full: is a directory; give a file name"),
    "study dir a file": (["study", "run", "spec.yaml", "--dir", "a-file"], "--dir a-file: is a file; give a directory"),
    "study export under a file": (["study", "export", "study", "--output", "a-file/runs.csv"],
                                  "--output a-file/runs.csv: a-file is a file, not a directory"),
    "max length beyond the positions": ([*RUN, "--max-length", "4096"],
                                        "task.max_length: 4096 exceeds the 256 positions of model 'tiny-bert'"),
    "executor bogus": (["study", "run", "spec.yaml", "--dir", "study", "--executor", "bogus"],
                       "--executor 'bogus': valid executors are local and ray"),
    "model typo": (["plan", "--model", "tiny-bret"], "did you mean tiny-bert"),
    "catalog typo": (["plan", "--model", "gemma-3-27om"], "did you mean gemma-3-270m"),
}


@pytest.mark.parametrize("name", REFUSED)
def test_the_issues_examples_are_refused_in_one_line(work, name):
    valid_study_spec(work)
    if name == "study export under a file":
        assert invoke("study", "run", "spec.yaml", "--dir", "study", "--dry-run")[0] == 0
        (work / "study").mkdir()
        (work / "study" / "study.db").write_bytes(b"")  # an empty database is a study with no runs yet
    args, expected = REFUSED[name]
    check_refused(work, args, expected)


def test_a_scores_file_of_integers(work):
    (work / "scores.json").write_text(json.dumps({"sites": [1, 2, 3]}))
    check_refused(work, ["plan", "--model", "tiny-bert", "--allocation", "from-scores(scores.json)"],
                  "scores.json: row 1: needs layer+role or path, and a score >= 0 (expected an object, got int)")


def test_a_config_file_model_with_a_negative_width(work):
    (work / "model.json").write_text(json.dumps({"model_type": "bert", "hidden_size": -64, "num_hidden_layers": 2,
                                                 "num_attention_heads": 2, "intermediate_size": 128,
                                                 "vocab_size": 30522}))
    check_refused(work, ["plan", "--model", "model.json"], "config field hidden_size is -64; it must be a positive")


@pytest.mark.parametrize("spec, expected", [
    ({"seeds": [-1, 0]}, "seeds.0: Input should be greater than or equal to 0"),
    ({"seeds": list(range(5000))}, "seeds: List should have at most 1000 items"),
    ({"axes": {"placement": ["attention", "everything"]}},
     "1 of 2 configurations are invalid, so nothing was run: tiny [placement=everything]: plan.placement.roles: "
     "unknown role 'everything'"),
    ({"axes": {"train.lrr": [1e-3]}}, "train is TrainSpec, which has no field 'lrr'"),
    ({"base": {"model": "tiny-bert", "trian": {"lr": 1}}}, "trian: unknown field"),
    ({"base": {"model": "tiny-bret"}}, "unknown model 'tiny-bret'"),
    ({"colour": "red"}, "colour: unknown field"),
])
def test_the_issues_study_specs_are_refused_before_any_run(work, spec, expected):
    path = valid_study_spec(work)
    data = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**data, **spec}))
    check_refused(work, ["study", "run", path, "--dir", "study"], expected)


def test_a_corrupt_study_database_is_reported_and_left_as_it_is(work):
    valid_study_spec(work)
    study = work / "study"
    study.mkdir()
    (study / "study.yaml").write_text("name: tiny\n")
    garbage = bytes(range(256)) * 8
    (study / "study.db").write_bytes(garbage)
    for args in (["study", "run", "spec.yaml", "--dir", "study"], ["study", "status", "study"], ["report", "study"],
                 ["study", "export", "study", "--output", "runs.csv"]):
        message = check_refused(work, args, "study.db: not a readable study database (file is not a database)")
        assert "it was left as it is" in message and "move the study directory aside" in message
    assert (study / "study.db").read_bytes() == garbage and (study / "study.yaml").read_text() == "name: tiny\n"


def test_a_csv_field_longer_than_the_csv_modules_limit_is_read_and_truncated(work, capsys):
    long_text = "tasty " * 40_000  # 240,000 characters: over the csv module's default 131,072
    rows = [["text", "label"], [long_text.strip(), "pos"]] + [[f"fine {i}", "pos" if i % 2 else "neg"]
                                                              for i in range(20)]
    (work / "long.csv").write_text(csv_text(rows))
    code, out, err = invoke("run", "--model", "tiny-bert", "--data", "long.csv", "--kind", "classification",
                            "--max-steps", "1", "--max-length", "16", "--output", "out")
    assert code == 0, err
    assert "1 example(s) longer than task.max_length=16 tokens were truncated" in err
    assert json.loads((work / "out" / "result.json").read_text())["data"]["truncated"] == 1


def test_nul_and_control_characters_are_removed_with_a_warning(work):
    rows = [{"text": f"the food was {'great' if i % 2 else 'awful'}" + ("\x00\x07" if i == 3 else ""),
             "label": "pos" if i % 2 else "neg"} for i in range(20)]
    (work / "nul.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, _, err = invoke("run", "--model", "tiny-bert", "--data", "nul.jsonl", "--kind", "classification",
                          "--max-steps", "1", "--output", "out")
    assert code == 0, err
    assert "nul.jsonl: removed 2 NUL or control character(s) from text values (first in data row 4)" in err


def test_a_study_spec_without_axes_runs_one_configuration_and_says_so(work):
    path = valid_study_spec(work)
    data = yaml.safe_load(path.read_text())
    del data["axes"]
    path.write_text(yaml.safe_dump(data))
    code, out, err = invoke("study", "run", path, "--dir", "study")
    assert code == 0, err
    assert "study tiny has no axes: one configuration (its base) x 1 seed(s)" in out


def test_a_study_whose_runs_fail_exits_1_with_one_summary_line(work):
    path = valid_study_spec(work)
    data = yaml.safe_load(path.read_text())
    data["axes"] = {"lr": {"ok": 1e-3, "explodes": 1e30}}
    path.write_text(yaml.safe_dump(data))
    code, out, err = invoke("study", "run", path, "--dir", "study")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1, err
    # one step at 1e30 leaves a finite training loss and a NaN validation loss: failed, never done
    assert lines[0].startswith("error: 1 of 2 runs failed: 1 x non-finite validation loss (nan) after training;")
    assert "peftlab study status study" in lines[0]


def test_a_run_with_a_non_finite_metric_fails():
    from peftlab.train.run import non_finite

    assert non_finite({"validation": {"loss": 0.5, "count": 3}, "test": {"loss": 0.4, "accuracy": 0.9}}) is None
    assert non_finite({"test": {"loss": float("nan"), "count": 3}}) == "non-finite test loss (nan) after training"
    assert non_finite({"test": {"accuracy": 1.0}, "forgetting": {"increase": float("inf")}}) == \
        "non-finite forgetting increase (inf) after training"


def test_an_internal_error_shows_its_traceback_and_asks_for_a_report(work, monkeypatch):
    import peftlab.api

    def broken(config):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(peftlab.api, "make_plan", broken)
    code, _, err = invoke("plan", "--model", "tiny-bert")
    assert code == 1
    assert "Traceback" in err and "ZeroDivisionError: a bug" in err
    assert err.strip().splitlines()[-1].startswith("error: internal error: this is a bug in peftlab")


# -- the newer surfaces: generation, encoders, checkpoints, trackers, PEFT options, special files --------------

INSTRUCT = ["run", "--data", "instruct.json", "--kind", "instruction", "--max-steps", "1", "--output", "out"]
TRACKING = {  # tracking.mlflow_uri: the message
    "bogus://x": "tracking.mlflow_uri: 'bogus://x' has no MLflow store scheme; valid: file:, sqlite:",
    "sqlite:////no/such/dir/db.sqlite": "/no/such/dir does not exist; create it or choose another path",
    "file:///proc/forbidden": "/proc is not writable",
    "http://127.0.0.1:9": "cannot reach the MLflow server at http://127.0.0.1:9 within 3 s",
}
PEFT_OPTIONS = {  # name: (method, the message)
    "oft block 0": ({"type": "OFT", "options": {"oft_block_size": 0}}, "options.oft_block_size: 0; it must be at least 1"),
    "oft block -4": ({"type": "OFT", "options": {"oft_block_size": -4}}, "options.oft_block_size: -4; it must be at least 1"),
    "vera key x": ({"type": "VERA", "options": {"projection_prng_key": "x"}},
                   "options.projection_prng_key: 'x' is not a valid int"),
    "fourierft scaling nan": ({"type": "FOURIERFT", "options": {"scaling": float("nan")}},
                              "options.scaling: nan is not a valid float (input should be a finite number)"),
    "fourierft frequencies 1.5": ({"type": "FOURIERFT", "options": {"n_frequency": 1.5}},
                                  "options.n_frequency: 1.5 is not a valid int"),
    "boft butterfly 10 on a cpu": ({"type": "BOFT", "options": {"boft_n_butterfly_factor": 10, "boft_block_size": 4}},
                                   "method.options.boft_n_butterfly_factor: 10 needs BOFT's CUDA extension"),
    "an unknown option": ({"type": "LOHA", "options": {"nosuch": 1}}, "options.nosuch: not a field of PEFT's LoHaConfig"),
    "a dropout of 1.5": ({"type": "LOHA", "options": {"rank_dropout": 1.5}}, "options.rank_dropout: 1.5 is not a probability"),
}
SPECIAL_FILES = {  # --data: the message
    "fifo.jsonl": "fifo.jsonl: is a named pipe (FIFO); give a regular file",
    "zero.jsonl": "zero.jsonl: is a device; give a regular file",  # a link to /dev/zero
    "loop.jsonl": "loop.jsonl: cannot read: Too many levels of symbolic links",
    "surrogate.jsonl": "surrogate.jsonl: data row 1: the text holds '\\ud800', half of a UTF-16 surrogate pair",
    "listed.json": "listed.json: row 1: column 'output' is a list ([\"a\", \"b\"]); expected text",
}
MODEL_CONFIGS = {  # a config file's name: what it changes in tiny LLaMA's
    "kv3": {"num_key_value_heads": 3}, "kv8": {"num_key_value_heads": 8}, "heads": {"num_attention_heads": 5},
    "layers": {"num_hidden_layers": 1.5}, "width": {"hidden_size": True}, "rope": {"rope_scaling": {"type": "bogus"}},
    "act": {"hidden_act": "bogus"}, "gemma": {"model_type": "gemma3_text", "head_dim": 15},
}
NEWER = {  # name: (args, a part of the message)
    "an encoder on an instruction task": ([*INSTRUCT, "--model", "tiny-bert"],
                                          "model 'tiny-bert' is a bidirectional encoder (bert) and cannot learn"),
    "a distilbert encoder on an instruction task": ([*INSTRUCT, "--model", "tiny-distilbert"],
                                                    "is a bidirectional encoder (distilbert)"),
    "gradient checkpointing with prefix tuning": ([*INSTRUCT, "--model", "tiny-llama", "--method", "prefix",
                                                   "--gradient-checkpointing"],
                                                  "train.gradient_checkpointing: method prefix cannot use it"),
    "gradient checkpointing with adalora": ([*INSTRUCT, "--model", "tiny-llama", "--method", "adalora",
                                             "--gradient-checkpointing"],
                                            "train.gradient_checkpointing: method adalora cannot use it"),
    "olora on GPT-2's Conv1D layers": (["run", "-c", "olora.yaml", "--output", "out"],
                                       "method.init olora: PEFT's OLoRA decomposes the weight without GPT-2's Conv1D"),
    "eva with one training example": (["run", "-c", "eva.yaml", "--output", "out"],
                                      "method.init eva: decomposes each training batch's supervised tokens and needs"),
    **{f"model config {name}": (["plan", "--model", f"{name}.json"], expected) for name, expected in {
        "kv3": "num_key_value_heads is 3; it must divide num_attention_heads (4)",
        "kv8": "num_key_value_heads is 8; it must divide num_attention_heads (4)",
        "heads": "invalid config: The hidden size (64) is not a multiple of the number",
        "layers": "invalid config: Field 'num_hidden_layers' expected int, got float",
        "width": "invalid config: Field 'hidden_size' expected int, got bool",
        "rope": "unknown value 'bogus'",
        "act": "unknown value 'bogus'",
        "gemma": "invalid config: RoPE requires an even rotary dimension, but got `head_dim`=15",
    }.items()},
    **{f"mlflow {uri}": (["run", "-c", f"track-{i}.yaml", "--output", "out"], expected) for i, (uri, expected) in
       enumerate(TRACKING.items())},
    "MLFLOW_TRACKING_URI garbage": ([*RUN, "--track", "mlflow"], "$MLFLOW_TRACKING_URI: 'garbage://' has no MLflow store"),
    "an empty experiment name": (["run", "-c", "track-empty.yaml", "--output", "out"],
                                 "tracking.project: String should have at least 1 character"),
    **{f"peft options {name}": (["run", "-c", f"peft-{name}.yaml", "--output", "out"], expected)
       for name, (_, expected) in PEFT_OPTIONS.items()},
    **{f"--data {name}": (["run", "--model", "tiny-llama", "--data", name, "--kind", "instruction", "--max-steps", "1",
                           "--output", "out"], expected) for name, expected in SPECIAL_FILES.items()},
    "a forgetting file that is a FIFO": (["run", "-c", "forget.yaml", "--output", "out"],
                                         "eval.forgetting.path: fifo.txt: is a named pipe (FIFO); give a regular file"),
    "a config file that is a FIFO": (["run", "-c", "fifo.txt", "--output", "out"], "fifo.txt: is a named pipe"),
    "a study's data that is a directory": (["study", "run", "spec.yaml", "--dir", "study2", "--data", "full"],
                                           "full: is a directory; give a regular file"),
    "another study in --dir": (["study", "run", "other.yaml", "--dir", "study"],
                               "--dir study: holds study 'tiny', not 'other'; choose another --dir"),
}


def newer_files(work: Path) -> None:
    """What the newer cases refer to: a finished-looking study `tiny` in study/ and a spec named `other`."""
    spec = valid_study_spec(work)
    (work / "study").mkdir()
    (work / "study" / "study.yaml").write_text(spec.read_text())
    other = yaml.safe_load(spec.read_text())
    (work / "other.yaml").write_text(yaml.safe_dump({**other, "name": "other"}))
    from peftlab.models.load import tiny_configs

    os.mkfifo(work / "fifo.jsonl")
    os.mkfifo(work / "fifo.txt")
    (work / "zero.jsonl").symlink_to("/dev/zero")
    (work / "loop.jsonl").symlink_to("loop.jsonl")
    rows = [{"instruction": f"say {i}", "input": "", "output": str(i)} for i in range(12)]
    (work / "surrogate.jsonl").write_text(json.dumps({**rows[0], "instruction": "a\ud800"}) + "\n"
                                          + "".join(json.dumps(r) + "\n" for r in rows))
    (work / "listed.json").write_text(json.dumps([{**r, "output": ["a", "b"]} for r in rows]))
    (work / "forget.yaml").write_text(yaml.safe_dump({
        "model": "tiny-llama", "task": {"path": "instruct.json", "kind": "instruction"},
        "eval": {"forgetting": "fifo.txt"}, "train": {"max_steps": 1, "latency_batches": 0}}))

    for name, (method, _) in PEFT_OPTIONS.items():
        config = {**valid_run_config(work), "model": "tiny-llama", "method": {"name": "peft", **method},
                  "plan": {"placement": "attention", "allocation": 2}}
        (work / f"peft-{name}.yaml").write_text(yaml.safe_dump(config))
    for i, uri in enumerate([*TRACKING, "empty"]):
        tracking = {"backends": ["mlflow"], **({"project": ""} if uri == "empty" else {"mlflow_uri": uri})}
        (work / f"track-{'empty' if uri == 'empty' else i}.yaml").write_text(
            yaml.safe_dump({**valid_run_config(work), "tracking": tracking}))

    for name, change in MODEL_CONFIGS.items():
        (work / f"{name}.json").write_text(json.dumps({**tiny_configs()["tiny-llama"], **change}))
    task = {"path": "instruct.json", "kind": "instruction"}
    for name, config in {
        "olora": {"model": "tiny-gpt2", "task": task, "method": {"name": "lora", "init": "olora"}},
        "eva": {"model": "tiny-llama", "task": {**task, "max_train_examples": 1}, "method": {"name": "lora", "init": "eva"},
                "plan": {"allocation": 8}},
    }.items():
        (work / f"{name}.yaml").write_text(yaml.safe_dump({**config, "train": {"max_steps": 1, "latency_batches": 0}}))


@pytest.mark.parametrize("name", NEWER)
def test_the_newer_surfaces_refuse_in_one_line(work, name, monkeypatch):
    newer_files(work)
    if name == "MLFLOW_TRACKING_URI garbage":
        monkeypatch.setenv("MLFLOW_TRACKING_URI", "garbage://")
    args, expected = NEWER[name]
    check_refused(work, args, expected)


def test_a_report_refuses_a_metric_its_runs_lack_and_paths_in_the_way_before_writing(work):
    valid_study_spec(work)
    code, _, err = invoke("study", "run", "spec.yaml", "--dir", "study")
    assert code == 0, err
    assert invoke("report", "study")[0] == 0  # the database settles (its write-ahead log folds in)
    (work / "study" / "report.html").unlink()
    for metric in ("nonsense", "ACCURACY", "rouge_l"):
        check_refused(work, ["report", "study", "--metric", metric],
                      f"--metric '{metric}': not a metric of this study's runs; valid: accuracy, f1, loss, macro_f1, "
                      "majority_rate, mcc, predicted_classes")
    (work / "study" / "report.html").mkdir()
    check_refused(work, ["report", "study"], "study/report.html: is a directory, where the report writes a file")
    (work / "study" / "report.html").rmdir()
    shutil.rmtree(work / "study" / "figures")
    (work / "study" / "figures").write_text("a file\n")
    check_refused(work, ["report", "study"], "study/figures: is a file, where the report writes a directory")


@pytest.mark.parametrize("tune, expected", [
    ({"lr_factors": [1e308, 10]}, "tune.lr_factors: the rate 5e+304 is above 1e+30"),
    ({"lr": [1e35]}, "tune: lr: 1e+35 is above 1e+30, the largest rate an optimizer takes in float32"),
])
def test_rates_beyond_what_an_optimizer_takes_are_refused(work, tune, expected):
    path = valid_study_spec(work)
    path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "tune": tune}))
    check_refused(work, ["study", "run", path, "--dir", "study"], expected)
    check_refused(work, [*RUN, "--lr", "1e305"], "train.lr: 1e+305 is above 1e+30, the largest rate an optimizer")


def test_a_run_that_would_mostly_evaluate_says_so_and_how_to_limit_it(work):
    rows = [{"text": f"the food was {'great' if i % 2 else 'awful'} {i}", "label": "pos" if i % 2 else "neg"}
            for i in range(4000)]
    (work / "many.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, _, err = invoke("run", "--model", "tiny-bert", "--data", "many.jsonl", "--kind", "classification",
                          "--max-steps", "1", "--output", "out")
    assert code == 0, err
    assert "task: this run trains on 16 examples (1 step) and evaluates 1,120 held-out ones (320 validation, " \
           "800 test), which will take far longer; limit them with task.max_eval_examples" in err, err
    assert json.loads((work / "out" / "result.json").read_text())["data"]["train"] == 16  # tokenized: the 16 drawn


def test_a_bad_forgetting_file_is_refused_before_the_task_is_tokenized(work):
    (work / "general.csv").write_text("body\nsome general text\n")
    (work / "forget.yaml").write_text(yaml.safe_dump({
        "model": "tiny-llama", "task": {"path": "instruct.json", "kind": "instruction"},
        "eval": {"forgetting": {"path": "general.csv", "text_column": "text"}},
        "train": {"max_steps": 1, "latency_batches": 0}}))
    check_refused(work, ["run", "-c", "forget.yaml", "--output", "out"], "general.csv: row 2: column 'text' is missing")
    assert not (work.parent / "cache" / "tokenized").exists()


# -- generated: every PEFT type's options, and every field that names a file, given special files --------------

def peft_option_cases() -> list[tuple[str, str, object]]:
    """(type, option, value) for every int, float and bool option of every PEFT type peftlab runs: each value of
    the wrong type, non-finite, a dropout outside [0, 1), or below the least value PEFT works with."""
    import dataclasses
    import typing

    import peft

    from peftlab.methods.specs import OPTION_MINIMUM, PEFT_TYPES, PLAN_FIELDS

    wrong = {int: [1.5, "x", True], float: ["x", float("nan"), float("inf")], bool: ["yes", 2]}
    cases = []
    for type_name in PEFT_TYPES:
        config = getattr(peft, PEFT_TYPES[type_name])
        hints = typing.get_type_hints(config)
        for field in dataclasses.fields(config):
            kind = hints.get(field.name)
            if field.name in PLAN_FIELDS or kind not in wrong:
                continue
            values = list(wrong[kind])
            if field.name.endswith("dropout"):
                values += [1.0, -0.1]
            if field.name in OPTION_MINIMUM:
                values.append(OPTION_MINIMUM[field.name] - 1)
            cases += [(type_name, field.name, value) for value in values]
    return cases


PEFT_OPTION_CASES = peft_option_cases()


@pytest.mark.parametrize("type_name, option, value", PEFT_OPTION_CASES,
                         ids=[f"{t} {o}={v!r}" for t, o, v in PEFT_OPTION_CASES])
def test_peft_type_options(work, type_name, option, value):
    config = {**valid_run_config(work), "model": "tiny-llama", "plan": {"placement": "attention", "allocation": 2},
              "method": {"name": "peft", "type": type_name, "options": {option: value}}}
    (work / "run.yaml").write_text(yaml.safe_dump(config))
    check_refused(work, ["run", "-c", "run.yaml", "--output", "out"], f"options.{option}: ")


SPECIAL_KINDS = {  # name: how to make it at a path, and a part of the message
    "fifo": (lambda path: os.mkfifo(path), "is a named pipe (FIFO); give a regular file"),
    "device": (lambda path: path.symlink_to("/dev/zero"), "is a device; give a regular file"),
    "directory": (lambda path: path.mkdir(), "is a directory"),
    "link loop": (lambda path: path.symlink_to(path.name), "Too many levels of symbolic links"),
    "dangling link": (lambda path: path.symlink_to("nowhere"), "no such file"),
}
FILE_FIELDS = {  # name: (args naming `special.<suffix>`, suffix)
    "--data": (["run", "--model", "tiny-bert", "--data", "special.jsonl", "--kind", "classification", "--max-steps",
                "1", "--output", "out"], ".jsonl"),
    "task.test_path": (["run", "-c", "test-path.yaml", "--output", "out"], ".jsonl"),
    "eval.forgetting": (["run", "-c", "forgetting.yaml", "--output", "out"], ".txt"),
    "--config": (["run", "-c", "special.yaml", "--output", "out"], ".yaml"),
    "from-scores": (["plan", "--model", "tiny-bert", "--allocation", "from-scores(special.json)"], ".json"),
    "study --data": (["study", "run", "spec.yaml", "--dir", "study", "--data", "special.jsonl"], ".jsonl"),
}
SPECIAL_CASES = [(kind, field) for kind in SPECIAL_KINDS for field in FILE_FIELDS]


@pytest.mark.parametrize("kind, field", SPECIAL_CASES, ids=[f"{f} is a {k}" for k, f in SPECIAL_CASES])
def test_special_files_are_refused_by_kind_before_they_are_opened(work, kind, field):
    args, suffix = FILE_FIELDS[field]
    make, expected = SPECIAL_KINDS[kind]
    make(work / f"special{suffix}")
    valid_study_spec(work)
    (work / "test-path.yaml").write_text(yaml.safe_dump(set_path(valid_run_config(work), "task.test_path", "special.jsonl")))
    (work / "forgetting.yaml").write_text(yaml.safe_dump({
        "model": "tiny-llama", "task": {"path": "instruct.json", "kind": "instruction"},
        "eval": {"forgetting": "special.txt"}, "train": {"max_steps": 1, "latency_batches": 0}}))
    check_refused(work, args, expected)


def test_the_newer_generated_cases_number_at_least_100():
    assert len(PEFT_OPTION_CASES) + len(SPECIAL_CASES) >= 100, (len(PEFT_OPTION_CASES), len(SPECIAL_CASES))
