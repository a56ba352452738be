"""The rows of a ``generate`` call, written once for the ``hf`` and ``vllm`` backends: one per
(prompt, sample index), seeded per sample, and each sample's EOS and stop-string trimming."""

from __future__ import annotations

import ast
from dataclasses import replace
from pathlib import Path

from constitutional.models import base
from constitutional.models.base import (
    SampleRow,
    SamplingParams,
    eos_token_ids,
    finish_sample,
    per_prompt,
    sample_rows,
    sample_seed,
)

MODELS = Path(base.__file__).parent
PROMPTS = ["a raw prompt", [{"role": "user", "content": "a conversation"}], "a raw prompt"]


class Letters:
    """A tokenizer whose token t is the letter ``chr(96 + t)``; 0 is a special token."""

    eos_token_id = 0

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(96 + t) for t in ids if not (skip_special_tokens and t == 0))


def test_sampled_rows_are_prompt_major_and_seeded_per_prompt_and_index() -> None:
    params = SamplingParams(temperature=1.0, n=3, seed=7)
    rows = sample_rows(PROMPTS, params)
    assert [(r.prompt, r.sample) for r in rows] == [(i, k) for i in range(3) for k in range(3)]
    assert [r.seed for r in rows] == [sample_seed(7, PROMPTS[r.prompt], r.sample) for r in rows]
    # a sample's seed depends on its prompt and index alone: not on n, nor on the batch
    assert sample_rows(PROMPTS[1:2], replace(params, n=1))[0].seed == rows[3].seed
    assert rows[0].seed == rows[6].seed  # the same prompt twice: the same samples
    assert per_prompt([r.seed for r in rows], params) == [r.seed for r in rows]


def test_greedy_runs_each_prompt_once_and_repeats_it() -> None:
    params = SamplingParams(n=2)
    rows = sample_rows(PROMPTS, params)
    assert rows == [SampleRow(0, 0, None), SampleRow(1, 0, None), SampleRow(2, 0, None)]
    assert per_prompt(["x", "y", "z"], params) == ["x", "x", "y", "y", "z", "z"]


def test_a_sample_ends_at_its_first_eos_and_its_text_at_a_stop_string() -> None:
    tok = Letters()
    # stopped by itself: the ids keep the EOS token, the count and the text do not
    assert finish_sample([1, 2, 3, 0, 4], {0}, tok, ()) == ("abc", [1, 2, 3, 0], 3)
    # cut by the length limit: every id; a stop string cuts the text only
    assert finish_sample((1, 2, 3, 2), {0}, tok, ("c",)) == ("ab", [1, 2, 3, 2], 4)
    assert finish_sample([5, 9, 1], {9, 0}, tok, ("zz", "e")) == ("", [5, 9], 1)
    assert finish_sample([], {0}, tok, ()) == ("", [], 0)


def test_eos_ids_from_the_generation_config_else_the_tokenizer() -> None:
    assert eos_token_ids(None, Letters()) == {0}
    assert eos_token_ids(5, Letters()) == {5}
    assert eos_token_ids([5, 6, None], Letters()) == {5, 6}


def _calls(path: Path) -> set[str]:
    return {n.func.id for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}


def test_both_backends_expand_seed_and_trim_through_the_shared_helpers() -> None:
    """The hf and vllm backends take their rows, seeds and trimming from models.base, so the
    same call gives the same rows (prompt, sample index, seed) in both."""
    hf = _calls(MODELS / "hf.py") | _calls(MODELS / "hf_generate.py")
    vllm = _calls(MODELS / "vllm.py")
    shared = {"sample_rows", "per_prompt", "finish_sample", "eos_token_ids"}
    assert shared <= hf and shared <= vllm
    assert not ({"sample_seed", "truncate_at_stop"} & (hf | vllm))  # no copy of their own
