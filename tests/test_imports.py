"""The packages import one way only (models -> plans -> methods -> specs -> ... -> studies -> cli), no module
imports one that imports it back (at any depth), and validating a config does not import torch or peft."""

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import peftlab

SOURCE = Path(peftlab.__file__).parent


def _unit(module: str) -> str:
    """peftlab.x.y -> x: a package or a top-level module of peftlab."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "peftlab"


def _runtime_imports(tree: ast.AST) -> list[str]:
    """The peftlab modules a file imports when it runs, at any depth (function-level imports included);
    imports under `if TYPE_CHECKING:` are annotations only and are left out."""
    found = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("peftlab"):
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found.extend(a.name for a in node.names if a.name.startswith("peftlab"))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, dict[str, list[str]]]:
    """unit -> unit it imports -> the modules that do it."""
    graph: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for path in SOURCE.rglob("*.py"):
        module = ".".join(path.relative_to(SOURCE.parent).with_suffix("").parts).removesuffix(".__init__")
        for target in _runtime_imports(ast.parse(path.read_text())):
            if _unit(target) not in (_unit(module), "peftlab"):
                graph[_unit(module)][_unit(target)].append(f"{module} -> {target}")
    return graph


def find_cycle(graph: dict[str, dict[str, list[str]]]) -> list[str] | None:
    """One cycle of units as [a, b, ..., a], or None."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(unit: str) -> list[str] | None:
        state[unit] = "open"
        path.append(unit)
        for target in sorted(graph.get(unit, {})):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[unit] = "done"
        path.pop()
        return None

    for unit in sorted(graph):
        if unit not in state and (cycle := visit(unit)):
            return cycle
    return None


def test_no_import_cycle_between_peftlab_packages():
    graph = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle) + "; via " + "; ".join(
        graph[a][b][0] for a, b in zip(cycle, cycle[1:]))


def module_graph() -> dict[str, dict[str, list[str]]]:
    """module -> peftlab module it imports (the package's own `__init__` left out: it only re-exports)."""
    modules = {".".join(p.relative_to(SOURCE.parent).with_suffix("").parts).removesuffix(".__init__"): p
               for p in SOURCE.rglob("*.py")}

    def module_of(name: str) -> str | None:  # `peftlab.a.b.name` -> the module that defines it
        while name not in modules and "." in name:
            name = name.rsplit(".", 1)[0]
        return name if name in modules and name != "peftlab" else None

    graph: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for module, path in modules.items():
        for target in map(module_of, _runtime_imports(ast.parse(path.read_text()))):
            if target not in (None, module):
                graph[module][target].append(f"{module} -> {target}")
    return graph


def test_no_import_cycle_between_peftlab_modules():
    graph = module_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b": ["x"]}, "b": {"c": ["y"]}, "c": {"a": ["z"]}, "d": {"a": ["w"]}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": ["x"]}, "b": {}}) is None


def test_type_checking_imports_are_not_runtime_edges():
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from peftlab.specs import RunConfig\n"
                     "def f():\n    from peftlab.train.run import execute_run\n")
    assert _runtime_imports(tree) == ["peftlab.train.run"]


def test_validating_a_config_imports_neither_torch_nor_peft(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("model: tiny-llama\nplan: {placement: attention, allocation: 'linear(8->2)'}\n"
                      "method: {name: sparselora, ffn_sparsity: 0.5}\ntrain: {max_steps: 2}\n")
    code = ("import sys; from pathlib import Path; from peftlab.config import load_spec; "
            "from peftlab.specs import RunConfig, StudySpec; "
            f"c = load_spec(RunConfig, Path({str(config)!r})); assert c.method.ffn_sparsity == 0.5; "
            "print(sorted(m for m in ('torch', 'peft', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
