"""The documentation's reference pages, generated from the code they document: every field of every spec (its
type, default and the docstring under it in the spec's class) and every CLI command with its options. The docs
site's build (docs/hooks.py) writes them into the pages that ask for them, so they cannot drift from the code."""

from __future__ import annotations

import ast
import functools
import inspect
import json
import textwrap
import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

ROOTS = {  # where each spec is written, and which spec classes start the walk
    "run config (`peftlab run -c run.yaml`, a study's `base`)": "RunConfig",
    "plan config (`peftlab plan -c plan.yaml`)": "PlanConfig",
    "study spec (`peftlab study run study.yaml`)": "StudySpec",
}


def spec_classes() -> list[type[BaseModel]]:
    """Every spec class a config file can reach, in the order the reference lists them: the roots, then depth
    first through their fields (each variant of a method or an allocation included)."""
    from peftlab import specs

    seen: list[type[BaseModel]] = []

    def visit(cls: type[BaseModel]) -> None:
        if cls in seen:
            return
        seen.append(cls)
        for info in cls.model_fields.values():
            for nested in _models_in(info.annotation):
                visit(nested)

    for name in ROOTS.values():
        visit(getattr(specs, name))
    return seen


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The spec classes an annotation names (inside unions, Annotated, lists and mappings)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


@functools.cache
def _attribute_docstrings(cls: type) -> dict[str, str]:
    """field -> the docstring written under it in `cls`'s own body (PEP 257's attribute docstrings)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs = {}
    for statement, following in zip(body, body[1:]):
        if (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            docs[statement.target.id] = inspect.cleandoc(following.value.value)
    return docs


def field_doc(cls: type[BaseModel], name: str) -> str:
    """The docstring of field `name` where it is declared (`cls` or the spec it inherits it from); for the field
    that selects a spec among its siblings (a method's `name`, an allocation's `kind`), what selects it."""
    for owner in cls.__mro__:
        if isinstance(owner, type) and issubclass(owner, BaseModel) and name in _attribute_docstrings(owner):
            return _attribute_docstrings(owner)[name]
    info = cls.model_fields[name]
    if typing.get_origin(info.annotation) is typing.Literal and typing.get_args(info.annotation) == (info.default,):
        return f"`{info.default}` selects this spec."
    return ""


def anchor(cls: type) -> str:
    return cls.__name__.lower().strip("_")


def type_text(annotation: Any) -> str:
    """An annotation as the reference shows it: `int | None`, `auto | sdpa`, a link to a spec's section."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return type_text(args[0])
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(type_text(a) for a in args)
    if origin is not None:
        inner = ", ".join(type_text(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    if annotation is type(None):
        return "`null`"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"[{annotation.__name__}](#{anchor(annotation)})"
    return getattr(annotation, "__name__", str(annotation).replace("typing.", ""))


def default_text(info: Any) -> str:
    if info.default_factory is not None:
        value = info.default_factory()
    elif info.default is PydanticUndefined:
        return "required"
    else:
        value = info.default
    if isinstance(value, BaseModel):
        return "its defaults" if not value.model_dump(exclude_defaults=True) else \
            "`" + json.dumps(value.model_dump(mode="json", exclude_defaults=True)) + "`"
    return "`" + json.dumps(value, default=str) + "`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def spec_section(cls: type[BaseModel], level: str = "###") -> str:
    """A spec's section: its docstring, then one row per field (name or alias, type, default, description)."""
    lines = [f"{level} {cls.__name__} {{#{anchor(cls)}}}", ""]
    if "__doc__" in cls.__dict__ and cls.__doc__:
        lines += [inspect.cleandoc(cls.__doc__), ""]
    lines += ["| field | type | default | description |", "| --- | --- | --- | --- |"]
    for name, info in cls.model_fields.items():
        lines.append(f"| `{info.alias or name}` | {type_text(info.annotation)} | {default_text(info)} | "
                     f"{_cell(field_doc(cls, name))} |")
    return "\n".join(lines) + "\n"


def config_reference() -> str:
    """The config reference page's body: every spec class, each field once."""
    parts = ["Where each spec starts:", ""]
    parts += [f"- the {where}: [{name}](#{name.lower()})" for where, name in ROOTS.items()]
    parts += ["", "A field whose type links to another spec holds a mapping of that spec's fields. A method's or an "
              "allocation's spec is chosen by its `name` / `kind`.", ""]
    for cls in spec_classes():
        if cls.model_fields:
            parts.append(spec_section(cls))
    return "\n".join(parts)


def cli_reference() -> str:
    """The CLI reference page's body: every command (groups' commands under them) with its usage and options."""
    import typer

    from peftlab.cli import app

    root = typer.main.get_command(app)
    return "\n".join(_command_section(root, "peftlab", None))


def _command_section(command: Any, path: str, parent: Any) -> list[str]:
    ctx = command.context_class(command, info_name=path.split()[-1], parent=parent)
    lines = [] if parent is None else [f"## `{path}` {{#{path.replace(' ', '-')}}}", ""]
    if command.help:
        lines += [inspect.cleandoc(command.help).replace("\b\n", ""), ""]
    lines += ["```text", command.get_usage(ctx).replace("Usage: ", "", 1), "```", ""]
    params = [p for p in command.params if p.name != "help"]
    if params:
        lines += ["| argument or option | default | description |", "| --- | --- | --- |"]
        for p in params:
            names = ", ".join(f"`{o}`" for o in (*p.opts, *p.secondary_opts)) if p.param_type_name == "option" \
                else f"`{p.name.upper()}`"
            default = "" if p.required else f"`{p.default}`" if p.default not in (None, False, ()) else ""
            lines.append(f"| {names} | {default} | {_cell(getattr(p, 'help', None) or '')} |")
        lines.append("")
    for name, sub in getattr(command, "commands", {}).items():  # in the order the CLI declares them
        lines += _command_section(sub, f"{path} {name}", ctx)
    return lines
