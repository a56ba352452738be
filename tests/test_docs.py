"""The documentation: the configuration reference is generated from the settings models and
lists every field; the site's nav covers every page; the README stays short, its links into
docs/ resolve and its YAML example is a valid config. The site's own build (mkdocs --strict)
runs in CI and, where mkdocs is installed, here."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest
import yaml
from pydantic import BaseModel

from constitutional.config import RunConfig, load_config
from constitutional.core.settings import Field, Settings

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
ROW = re.compile(r"^\| `([\w.]+)` \| (.*?) \| `(.*?)` \| (.*) \|$")


def load_hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rendered_rows(markdown: str) -> dict[str, tuple[str, str, str]]:
    rows: dict[str, tuple[str, str, str]] = {}
    for line in markdown.splitlines():
        if m := ROW.match(line):
            assert m[1] not in rows, f"{m[1]} rendered twice"
            rows[m[1]] = (m[2], m[3], m[4])
    return rows


def walk(model: type[BaseModel], prefix: str = "") -> tuple[list[str], list[str]]:
    """(leaf keys, section keys) of a settings model, from pydantic's own field table."""
    leaves, sections = [], []
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            sections.append(prefix + name)
            sub_leaves, sub_sections = walk(ann, f"{prefix}{name}.")
            leaves += sub_leaves
            sections += sub_sections
        else:
            leaves.append(prefix + name)
    return leaves, sections


def test_the_reference_lists_every_field_of_the_run_config():
    markdown = load_hooks().reference_markdown()
    rows = rendered_rows(markdown)
    leaves, sections = walk(RunConfig)
    assert len(leaves) > 100  # the walk itself found the config's fields
    assert sorted(rows) == sorted(leaves)
    anchors = set(re.findall(r"^#+ `([\w.]+):` \{#[\w-]+\}$", markdown, flags=re.MULTILINE))
    assert anchors == set(sections)
    for key in leaves:
        kind, default, description = rows[key]
        assert kind and default, key
        assert description.strip(), f"{key} has no description: give its Field one"


def test_the_reference_shows_the_defaults_a_run_gets():
    rows = rendered_rows(load_hooks().reference_markdown())
    config = RunConfig()
    for key in ("rl.kl_coef", "pm.eval_fraction", "eval.xstest.margin", "seed",
                "red_team_limit", "revise.revisions"):
        value = config
        for part in key.split("."):
            value = getattr(value, part)
        assert rows[key][1] == str(value), key
    assert rows["pm.eval_fraction"][1] == "0.2"  # PMSection's own default, not PMSettings'
    assert rows["rl.reward"][1] == "{pm: 1.0}"  # a default_factory is called
    assert rows["executor"][0] == "one of `local`, `ray`"
    assert rows["red_team_limit"][0] == "int or null, ≥ 1"


class _Inner(Settings):
    """The inner section."""

    level: Literal["a", "b"] = Field("a", description="A or B.")
    limit: int | None = Field(None, ge=1, lt=10, description="At most.")


class _Outer(Settings):
    """The outer section."""

    name: str = Field("x", description="The name.")
    items: list[str] = Field(default_factory=list, description="Some | items.")
    inner: _Inner = Field(default_factory=_Inner)


def test_the_generator_renders_types_bounds_and_nested_sections():
    markdown = load_hooks().reference_markdown(_Outer)
    rows = rendered_rows(markdown)
    assert sorted(rows) == ["inner.level", "inner.limit", "items", "name"]
    assert rows["inner.limit"] == ("int or null, ≥ 1, < 10", "null", "At most.")
    assert rows["inner.level"][:2] == ("one of `a`, `b`", "a")
    assert rows["items"] == ("list of str", "[]", "Some \\| items.")
    assert "## `inner:` {#inner}" in markdown and "The inner section." in markdown


def test_the_reference_page_keeps_its_marker_and_the_site_its_hook():
    hooks = load_hooks()
    assert hooks.MARKER in (DOCS / hooks.REFERENCE_PAGE).read_text()
    site = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert site["theme"]["name"] == "material"
    assert "docs/hooks.py" in site["hooks"]

    def pages(nav):
        for item in nav:
            for value in (item.values() if isinstance(item, dict) else [item]):
                yield from pages(value) if isinstance(value, list) else [value]

    in_nav = set(pages(site["nav"]))
    on_disk = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert in_nav == on_disk


def test_the_readme_is_short_and_its_links_and_example_hold(tmp_path):
    text = README.read_text()
    assert len(text.splitlines()) <= 150
    for command in ("make demo", "make test"):
        assert command in text
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.MULTILINE) and re.search(r"^test:", makefile, re.MULTILINE)
    links = re.findall(r"\]\((docs/[^)#\s]+)(?:#[^)\s]*)?\)", text)
    assert links
    for link in links:
        assert (ROOT / link).is_file(), link
    examples = re.findall(r"```yaml\n(.*?)```", text, flags=re.DOTALL)
    assert examples
    for i, example in enumerate(examples):
        path = tmp_path / f"example{i}.yaml"
        path.write_text(example)
        load_config(path)  # an unknown key or a wrong value raises


def test_the_own_model_page_example_is_a_valid_config(tmp_path):
    text = (DOCS / "own-model.md").read_text()
    examples = re.findall(r"```yaml\n(.*?)```", text, flags=re.DOTALL)
    assert examples
    for i, example in enumerate(examples):
        path = tmp_path / f"example{i}.yaml"
        path.write_text(example)
        load_config(path)


def test_the_site_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs", reason="the docs extra is not installed")
    pytest.importorskip("material", reason="the docs extra is not installed")
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT, capture_output=True, text=True, check=False,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    page = (site / "reference" / "config" / "index.html").read_text()
    assert "rl.kl_coef" in page and "eval.xstest.margin" in page
