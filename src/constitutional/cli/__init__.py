"""The ``cai`` command line. One module per command group, mirroring ``cai --help``:

* :mod:`.models` — ``cai generate``, ``cai models [pull]``;
* :mod:`.data` — ``cai constitution …``, ``cai prompts …``;
* :mod:`.sl` — ``cai sl revise|train`` (SL-CAI);
* :mod:`.rl` — ``cai rl sample|label|pm|ppo|dpo`` (RL-CAI);
* :mod:`.eval` — ``cai eval elo|evasiveness|revision-curve|mc|pm``, ``cai report``;
* :mod:`.run` — ``cai run`` (every stage).

Commands are thin: they build a stage's settings (whose fields are the options, see
:func:`.options.settings_command`), call the library, and print.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from constitutional import __version__
from constitutional.cli.data import constitution_app, prompts_app
from constitutional.cli.eval import eval_app, report_cmd
from constitutional.cli.models import generate, models_app
from constitutional.cli.options import err_console, out
from constitutional.cli.rl import rl_app
from constitutional.cli.run import run_cmd
from constitutional.cli.sl import sl_app
from constitutional.core.errors import UserError, out_of_space
from constitutional.core.log import setup_logging

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
app.command()(generate)
app.add_typer(models_app, name="models")
app.add_typer(constitution_app, name="constitution")
app.add_typer(prompts_app, name="prompts")
app.add_typer(sl_app, name="sl")
app.add_typer(rl_app, name="rl")
app.add_typer(eval_app, name="eval")
app.command("report")(report_cmd)
app.command("run")(run_cmd)


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


def _close_process_group() -> None:
    """Under ``accelerate launch``, leave the process group before the interpreter exits. Left to
    the exit handlers, a rank's gloo threads were once torn down mid-join ("terminate called
    without an active exception", SIGABRT after a finished 2-process PPO run in CI); torch asks
    programs to destroy the group themselves. torch is not imported for this."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors become one line on stderr and exit code 2."""
    try:
        return _main(argv)
    finally:
        _close_process_group()


def _main(argv: list[str] | None) -> int:
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
    except Exception as err:  # only a write that found no room becomes one line
        message = out_of_space(err)
        if message is None:
            raise
        err_console.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
        return 2
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
