"""The documentation: the site builds offline with --strict, no internal link is broken, the reference pages list
every spec field and every command, the notebook runs end to end, and the README stays short."""

import importlib
import os
import pkgutil
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from pydantic import BaseModel

ROOT = Path(__file__).parents[1]


def build(root: Path, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=root,
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    site = tmp_path_factory.mktemp("site")
    done = build(ROOT, site)
    assert done.returncode == 0, done.stderr[-3000:]
    return site


class Links(HTMLParser):
    """Every href and src of a page, and every id it defines."""

    def __init__(self):
        super().__init__()
        self.links, self.ids = [], set()

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name == "id" and value:
                self.ids.add(value)
            if name in ("href", "src") and value:
                self.links.append(value)


def parse(page: Path) -> Links:
    parser = Links()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser


def broken_links(site: Path) -> list[str]:
    """Internal links of the built site whose file or anchor does not exist: `page -> link`."""
    parsed = {page: parse(page) for page in site.rglob("*.html")}
    broken = []
    for page, links in parsed.items():
        for link in links.links:
            parts = urlsplit(link)
            if parts.scheme or parts.netloc or link.startswith(("mailto:", "data:", "javascript:")):
                continue
            base = site if parts.path.startswith("/") else page.parent  # absolute: from the site's root (404.html)
            target = page if not parts.path else (base / unquote(parts.path).lstrip("/")).resolve()
            if target.is_dir():
                target = target / "index.html"
            if not target.exists():
                broken.append(f"{page.relative_to(site)} -> {link}")
            elif parts.fragment and target.suffix == ".html":
                ids = parsed[target].ids if target in parsed else parse(target).ids
                if unquote(parts.fragment) not in ids:
                    broken.append(f"{page.relative_to(site)} -> {link} (no such anchor)")
    return broken


def test_the_site_builds_offline_with_strict_and_no_internal_link_is_broken(site):
    assert broken_links(site) == []
    pages = sorted(str(p.relative_to(site)) for p in site.rglob("index.html"))
    for page in ("index.html", "tutorials/first-study/index.html", "tutorials/own-data/index.html",
                 "tutorials/python-api/index.html", "concepts/statistics/index.html", "reference/config/index.html",
                 "reference/cli/index.html", "reference/api/index.html", "benchmarks/index.html"):
        assert page in pages
    assert (site / "tutorials" / "python-api.ipynb").is_file() and not (site / "hooks.py").exists()
    for page in site.rglob("*.html"):  # read offline: no font, script or style from elsewhere
        external = re.findall(r'<(?:link|script)[^>]+(?:href|src)="(https?://[^"]+)"', page.read_text(encoding="utf-8"))
        assert external == [], (page, external)


def test_a_broken_link_or_anchor_fails_the_build(tmp_path):
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    (tmp_path / "src").symlink_to(ROOT / "src")
    page = tmp_path / "docs" / "tutorials" / "own-data.md"
    page.write_text(page.read_text() + "\n[a page](../concepts/nothing.md), [an anchor](../concepts/studies.md#nothing)\n")
    done = build(tmp_path, tmp_path / "site")
    assert done.returncode != 0
    assert "'../concepts/nothing.md'" in done.stderr and "'#nothing'" in done.stderr


def every_spec_class() -> set[type[BaseModel]]:
    """Every pydantic model defined anywhere in peftlab that has fields: what a config file can set."""
    import peftlab

    for module in pkgutil.walk_packages(peftlab.__path__, "peftlab."):
        if not module.name.endswith("__main__"):
            importlib.import_module(module.name)

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    return {cls for cls in subclasses(BaseModel) if cls.__module__.startswith("peftlab.") and cls.model_fields}


def test_the_config_reference_lists_every_field_of_every_spec_with_its_docstring(site):
    from peftlab.reference import anchor, config_reference

    text = config_reference()
    sections = dict(re.findall(r"^### (\w+) \{#[\w-]+\}\n(.*?)(?=^### |\Z)", text, flags=re.M | re.S))
    specs = every_spec_class()
    assert {cls.__name__ for cls in specs} == set(sections)
    html = (site / "reference" / "config" / "index.html").read_text(encoding="utf-8")
    for cls in specs:
        rows = dict(re.findall(r"^\| `([\w.]+)` \|.*\| (.*) \|$", sections[cls.__name__], flags=re.M))
        fields = {info.alias or name for name, info in cls.model_fields.items()}
        assert set(rows) == fields, cls.__name__
        assert all(rows.values()), f"{cls.__name__}: fields without a docstring: {[f for f, d in rows.items() if not d]}"
        assert f'id="{anchor(cls)}"' in html
    # the docstring under a field is what the page says, inherited fields included
    assert "| `double_quant` | bool | `true` | Quantize the per-block scales too" in sections["QLoraSpec"]
    assert "| `use_dora` | bool | `false` | DoRA (Liu et al., 2024)" in sections["QLoraSpec"]


def test_the_cli_reference_lists_every_command_and_option():
    import typer

    from peftlab.cli import app
    from peftlab.reference import cli_reference

    text = cli_reference()

    def walk(command, path):
        yield path, command
        for name, sub in getattr(command, "commands", {}).items():
            yield from walk(sub, f"{path} {name}")

    commands = list(walk(typer.main.get_command(app), "peftlab"))
    assert len(commands) >= 12
    for path, command in commands[1:]:
        section = text.split(f"## `{path}`", 1)[1].split("\n## ", 1)[0]
        for param in command.params:
            if param.name != "help":
                names = param.opts if param.param_type_name == "option" else [param.name.upper()]
                assert all(f"`{name}`" in section for name in names), (path, param.name)
    assert "`--retry-failed`" in text and "Run failed runs again." in text


def test_the_api_reference_documents_every_name_of_peftlab_api(site):
    import peftlab
    import peftlab.api

    html = (site / "reference" / "api" / "index.html").read_text(encoding="utf-8")
    for name in peftlab.api.__all__:
        if name != "PeftlabError":
            assert f'id="peftlab.api.{name}"' in html, name
            assert getattr(peftlab, name) is getattr(peftlab.api, name)


def test_the_notebook_runs_a_study_end_to_end(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    source = ROOT / "docs" / "tutorials" / "python-api.ipynb"
    notebook = nbformat.read(source, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), "stored without outputs"
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path / "cache"))
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "placement=attention:" in printed and "placement=all: baseline" in printed
    assert "Warning" not in printed, printed  # nothing but what the notebook prints itself
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2  # both figures inline
    assert (tmp_path / "studies" / "tiny-placement" / "report.html").is_file()


def test_the_readme_is_short_and_its_links_resolve():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme)
    assert len(links) >= 15
    for link in links:
        if not urlsplit(link).scheme:
            assert (ROOT / link).exists(), link


def test_the_link_checker_finds_a_missing_page_and_a_missing_anchor(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "index.html").write_text('<h2 id="top">x</h2><a href="a/">a</a><a href="#top">t</a>'
                                         '<a href="a/#gone">g</a><a href="b/">b</a><img src="/img.png">'
                                         '<a href="https://example.org/x">e</a>')
    (tmp_path / "a" / "index.html").write_text('<p id="here"><a href="../index.html#top">back</a></p>')
    assert broken_links(tmp_path) == ["index.html -> a/#gone (no such anchor)", "index.html -> b/",
                                      "index.html -> /img.png"]


def test_every_list_in_the_docs_renders_as_a_list():
    """MkDocs' Markdown needs a blank line before a list and four spaces to nest one: a list written the
    GitHub way would run into the paragraph above it on the site."""
    bad = []
    for page in sorted((ROOT / "docs").rglob("*.md")):
        fenced, previous = False, ""
        for number, line in enumerate(page.read_text().splitlines(), 1):
            fenced ^= line.startswith("```")
            if not fenced and re.match(r"([-*]|\d+\.) ", line) and previous.strip() and \
                    not re.match(r"\s*([-*]|\d+\.) |\s|#|\|", previous):
                bad.append(f"{page.relative_to(ROOT)}:{number}: a list right after a paragraph line")
            if not fenced and re.match(r" {1,3}[-*] ", line):
                bad.append(f"{page.relative_to(ROOT)}:{number}: a nested list indented less than 4 spaces")
            previous = line
    assert bad == []
