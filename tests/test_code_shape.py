"""The code stays readable in a sitting: no function longer than a screen, the run's orchestration short."""

import ast
from pathlib import Path

import peftlab

SOURCE = Path(peftlab.__file__).parent
LONGEST_FUNCTION = 60


def test_no_function_is_longer_than_a_screen():
    long = []
    for path in SOURCE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > LONGEST_FUNCTION:
                    long.append(f"{path.relative_to(SOURCE)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long


def test_a_run_reads_as_its_phases():
    assert len((SOURCE / "train" / "run.py").read_text().splitlines()) < 250
