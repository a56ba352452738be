"""``cai rl pm``: the preference model (PM), trained on soft AI labels (``cai eval pm``, its
accuracy on held-out comparisons, is :mod:`constitutional.evaluate.pm`).

The PM is the base language model with a scalar head (``AutoModelForSequenceClassification``,
one label). It reads a conversation that ends with the assistant's answer and returns a score;
the score is taken at the last token, with transformers' own pooling.

Loss
----
For a comparison between answers A and B with soft label ``p`` = P(A is preferred)::

    L = −[ p · log σ(r_A − r_B) + (1 − p) · log σ(r_B − r_A) ]

AI labels (``cai rl label``) carry their soft ``p``; human comparisons are hard (``p = 1``). With
``p = 0.5`` the gradient with respect to ``r_A − r_B`` is ``σ(d) − 0.5``, which is zero at equal
rewards and otherwise pulls the two rewards together: a 50/50 label prefers neither answer.

We extend TRL's ``RewardTrainer`` (its tokenisation, length filter, metrics, checkpointing and
``accelerate`` support stay as they are) and replace only its loss, plus a collator that carries
``p`` next to the token ids. Rows are stored with ``chosen`` = the answer with ``p >= 0.5``, so
TRL's "accuracy" metric (chosen scored above rejected) is the accuracy against the labels' side.

Data
----
* AI labels: a ``cai rl label`` run directory (its ``preferences.jsonl``, ``score`` = p) or any
  JSONL of ``prompt``/``chosen``/``rejected`` rows, with an optional ``score`` column.
* Human comparisons (``--human-prefs``): ``prompt``/``chosen``/``rejected`` rows (strings or
  message lists) or HH-RLHF transcripts (``chosen``/``rejected`` holding the whole conversation),
  mixed in at ``human_ratio`` of the final mix.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pydantic import field_validator

from constitutional.core import layout
from constitutional.core.errors import UserError
from constitutional.core.io import atomic_write_jsonl, stable_hash
from constitutional.core.settings import Field
from constitutional.models import BUILTIN_MODEL
from constitutional.train import EvalFraction, TrainRun, TrainSettings

log = logging.getLogger(__name__)

Message = dict[str, str]
PM_METRICS = Path(layout.PM_METRICS).name


# ------------------------------------------------------------------------------------------------
# comparisons: loading and normalising


@dataclass
class Comparison:
    """One comparison: ``prompt`` (messages), the preferred and the other answer, and ``p`` =
    P(chosen is preferred) in [0.5, 1]."""

    id: str
    prompt: list[Message]
    chosen: str
    rejected: str
    p: float
    source: str
    # HH-RLHF rows whose two transcripts branch before the final answer (a few do: one side
    # goes on for more turns): the two whole conversations, which a PM scores as they are
    conversations: tuple[list[Message], list[Message]] | None = None

    def to_row(self) -> dict[str, Any]:
        return asdict(self)

    def pair(self) -> tuple[list[Message], list[Message]]:
        """The chosen and the rejected conversation, as a PM reads them."""
        if self.conversations is not None:
            return self.conversations
        return _with_answer(self.prompt, self.chosen), _with_answer(self.prompt, self.rejected)


def _as_messages(value: Any, file: Path, line: int, field: str, *,
                 answer: bool = False) -> list[Message]:
    from constitutional.core.messages import parse_hh_transcript

    if isinstance(value, str):
        if value.lstrip().startswith("Human:"):
            try:
                return parse_hh_transcript(value, keep_empty_answer=answer)
            except ValueError as err:
                raise UserError(str(err), file=file, line=line, field=field) from err
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m
                                       for m in value):
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in value]
    raise UserError("expected a string or a list of {role, content} messages", file=file,
                    line=line, field=field)


def _answer(value: Any, file: Path, line: int, field: str) -> str:
    if isinstance(value, str):
        return value
    msgs = _as_messages(value, file, line, field, answer=True)
    if msgs[-1]["role"] != "assistant":
        raise UserError("the last message must be the assistant's answer", file=file, line=line,
                        field=field)
    return msgs[-1]["content"]


def _split_transcript(value: Any, file: Path, line: int, field: str) -> tuple[list[Message], str]:
    msgs = _as_messages(value, file, line, field, answer=True)
    if len(msgs) < 2 or msgs[-1]["role"] != "assistant":
        raise UserError("expected a conversation ending with the assistant's answer", file=file,
                        line=line, field=field)
    return msgs[:-1], msgs[-1]["content"]


def _iter_jsonl(file: Path, skipped: list[UserError] | None = None):
    from constitutional.core.io import jsonl_objects

    return jsonl_objects(file, skipped=skipped)


def load_comparisons(spec: str | Path, *, source: str = "ai", hard: bool = False,
                     skipped: list[UserError] | None = None, branching: bool = False,
                     ) -> list[Comparison]:
    """Comparisons from a ``cai rl label`` run directory or a JSONL file.

    Row forms: ``prompt``/``chosen``/``rejected`` (+ optional ``score`` = P(chosen preferred));
    or HH-RLHF ``chosen``/``rejected`` transcripts without ``prompt`` (an empty final answer is
    an answer). ``hard=True`` ignores any score (p = 1), as for human comparisons. With a
    ``skipped`` list, a row that cannot be used is appended to it (its error names the line and
    field) and skipped; the file is an error only when no row is usable. ``branching`` keeps
    HH transcripts that branch before their final answers (for evaluation: a PM scores the two
    whole conversations); training needs one shared prompt and skips or rejects them.
    """
    path = Path(spec)
    file = path / Path(layout.PREFERENCES).name if path.is_dir() else path
    if not file.is_file():
        raise UserError("not found (expected a `cai rl label` run directory or a JSONL file)",
                        file=file)
    rows: list[Comparison] = []
    for n, row in _iter_jsonl(file, skipped):
        try:
            rows.append(_comparison(row, file, n, source, hard, branching))
        except UserError as err:
            if skipped is None:
                raise
            skipped.append(err)
    if not rows:
        if skipped:
            first = skipped[0]
            raise UserError(f"{first.message} (no usable row: {len(skipped)} skipped)",
                            file=file, line=first.line, field=first.field)
        raise UserError("no comparisons", file=file, line=1)
    return rows


def _comparison(row: dict[str, Any], file: Path, n: int, source: str, hard: bool,
                branching: bool = False) -> Comparison:
    for key in ("chosen", "rejected"):
        if key not in row:
            raise UserError("missing", file=file, line=n, field=key)
    conversations = None
    if "prompt" in row:
        prompt = _as_messages(row["prompt"], file, n, "prompt")
        chosen = _answer(row["chosen"], file, n, "chosen")
        rejected = _answer(row["rejected"], file, n, "rejected")
    else:
        prompt, chosen = _split_transcript(row["chosen"], file, n, "chosen")
        prompt_r, rejected = _split_transcript(row["rejected"], file, n, "rejected")
        if prompt_r != prompt:
            if not branching:
                raise UserError("chosen and rejected transcripts branch before their final "
                                "answers (no shared prompt to train on)", file=file, line=n,
                                field="rejected")
            conversations = (_with_answer(prompt, chosen), _with_answer(prompt_r, rejected))
            prompt = prompt[: _common_len(prompt, prompt_r)]  # the turns both share
    p = 1.0
    if not hard and row.get("score") is not None:
        p = row["score"]
        if not isinstance(p, int | float) or not 0.0 <= p <= 1.0:
            raise UserError(f"must be a probability in [0, 1], got {p!r}", file=file,
                            line=n, field="score")
        p = float(p)
    if p < 0.5:  # keep chosen = the side the label prefers
        chosen, rejected, p = rejected, chosen, 1.0 - p
        conversations = conversations and (conversations[1], conversations[0])
    rid = row.get("id") or stable_hash(prompt, chosen, rejected,
                                       *([conversations] if conversations else []))
    return Comparison(str(rid), prompt, chosen, rejected, p, source, conversations)


# ------------------------------------------------------------------------------------------------
# tokenisation shared by training and scoring


def conversation_text(tokenizer: Any, messages: Sequence[Message]) -> str:
    """The text the PM reads: the chat template, or HH-style turns for tokenizers without one."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(list(messages), tokenize=False)
    labels = {"user": "Human", "assistant": "Assistant", "system": "System"}
    return "".join(f"\n\n{labels.get(m['role'], m['role'])}: {m['content']}"
                   for m in messages) + (tokenizer.eos_token or "")


def encode(tokenizer: Any, messages: Sequence[Message], max_length: int) -> list[int]:
    """Token ids of the conversation; over-long ones keep their end (the answer)."""
    ids = tokenizer(conversation_text(tokenizer, messages), add_special_tokens=False)["input_ids"]
    return ids[-max_length:]


def _with_answer(prompt: Sequence[Message], answer: str) -> list[Message]:
    return [*prompt, {"role": "assistant", "content": answer}]


# ------------------------------------------------------------------------------------------------
# the scorer


class PreferenceModel:
    """A trained PM: ``score(conversations)`` → one float per conversation (ending with the
    assistant's answer). Batched, right-padded, scores read at the last real token."""

    def __init__(self, model: Any, tokenizer: Any, *, max_length: int = 1024,
                 batch_size: int = 16) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size

    @property
    def device(self):
        return next(self.model.parameters()).device

    def score(self, conversations: Sequence[Sequence[Message]]) -> list[float]:
        import torch

        encoded = [encode(self.tokenizer, c, self.max_length) for c in conversations]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        scores = [0.0] * len(encoded)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                for start in range(0, len(order), self.batch_size):
                    idx = order[start : start + self.batch_size]
                    ids, mask = pad_right([encoded[i] for i in idx], self.pad_id, self.device)
                    out = self.model(input_ids=ids, attention_mask=mask, use_cache=False)
                    for i, s in zip(idx, out.logits[:, 0].float().tolist(), strict=True):
                        scores[i] = s
        finally:
            self.model.train(was_training)
        return scores

    def score_answers(self, prompts: Sequence[Sequence[Message]], answers: Sequence[str],
                      ) -> list[float]:
        return self.score([_with_answer(p, a) for p, a in zip(prompts, answers, strict=True)])

    def score_pairs(self, prompts: Sequence[Sequence[Message]], answers_a: Sequence[str],
                    answers_b: Sequence[str], *, max_tokens: int | None = None,
                    ) -> tuple[list[float], list[float]]:
        """Scores of ``prompt + answer_a`` and ``prompt + answer_b`` for every pair (see
        :meth:`score_conversation_pairs`)."""
        return self.score_conversation_pairs(
            [_with_answer(p, a) for p, a in zip(prompts, answers_a, strict=True)],
            [_with_answer(p, b) for p, b in zip(prompts, answers_b, strict=True)],
            max_tokens=max_tokens)

    def score_conversation_pairs(self, convs_a: Sequence[Sequence[Message]],
                                 convs_b: Sequence[Sequence[Message]], *,
                                 max_tokens: int | None = None,
                                 ) -> tuple[list[float], list[float]]:
        """Scores of two conversations per pair, with the tokens they share (the context)
        computed **once**: a pass over the contexts fills their KV cache, then each side's own
        tokens run from it (the cache is cropped back in between). Equal to :meth:`score` up to
        float rounding.

        Falls back to :meth:`score` for pairs cut by ``max_length`` and for heads other than
        transformers' ``score`` layer. ``max_tokens`` bounds a batch (rows × longest context);
        by default one pair per pass on CPU, which was fastest there (60 HH-RLHF pairs: 23.3 s
        one pair per pass, 31.7 s in batches of up to 4,096 tokens), and 16,384 tokens on GPUs.
        """
        import torch

        if max_tokens is None:
            max_tokens = 1 if self.device.type == "cpu" else 16384

        enc_a = [encode(self.tokenizer, c, 1 << 30) for c in convs_a]
        enc_b = [encode(self.tokenizer, c, 1 << 30) for c in convs_b]
        out_a, out_b = [0.0] * len(enc_a), [0.0] * len(enc_b)
        shareable = hasattr(self.model, "score") and hasattr(self.model, "base_model")
        plain = [i for i in range(len(enc_a)) if not shareable
                 or max(len(enc_a[i]), len(enc_b[i])) > self.max_length]
        if plain:
            sa = self.score([convs_a[i] for i in plain])
            sb = self.score([convs_b[i] for i in plain])
            for i, x, y in zip(plain, sa, sb, strict=True):
                out_a[i], out_b[i] = x, y
        skip = set(plain)
        todo = [i for i in range(len(enc_a)) if i not in skip]
        # the context: the shared tokens, each side keeping at least one of its own
        ctx = {i: min(_common_len(enc_a[i], enc_b[i]), len(enc_a[i]) - 1, len(enc_b[i]) - 1)
               for i in todo}
        todo.sort(key=lambda i: ctx[i])
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                start = 0
                while start < len(todo):
                    end = start + 1
                    while (end < len(todo) and (end + 1 - start) * max(ctx[todo[end]], 1)
                           <= max_tokens and end - start < self.batch_size):
                        end += 1
                    idx = todo[start:end]
                    sa, sb = self._score_shared(idx, enc_a, enc_b, ctx)
                    for i, x, y in zip(idx, sa, sb, strict=True):
                        out_a[i], out_b[i] = x, y
                    start = end
        finally:
            self.model.train(was_training)
        return out_a, out_b

    def _score_shared(self, idx: list[int], enc_a: list[list[int]], enc_b: list[list[int]],
                      ctx: dict[int, int]) -> tuple[list[float], list[float]]:
        import torch
        from transformers import DynamicCache

        dev = self.device
        body = self.model.base_model
        if len(idx) == 1:  # one pair: the context and answer A in one pass, then answer B
            i = idx[0]
            cache = DynamicCache()
            hidden = body(input_ids=torch.tensor([enc_a[i]], device=dev), past_key_values=cache,
                          use_cache=True).last_hidden_state
            score_a = float(self.model.score(hidden[:, -1])[0, 0])
            own_b = enc_b[i][ctx[i]:]
            if ctx[i]:
                cache.crop(ctx[i] - len(enc_a[i]))  # back to the context
            else:
                cache = DynamicCache()
            hidden = body(input_ids=torch.tensor([own_b], device=dev),
                          position_ids=torch.arange(ctx[i], len(enc_b[i]), device=dev)[None],
                          past_key_values=cache, use_cache=True).last_hidden_state
            return [score_a], [float(self.model.score(hidden[:, -1])[0, 0])]
        width = max(ctx[i] for i in idx)
        ids = torch.full((len(idx), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):  # contexts left-padded, so every side continues at the end
            if ctx[i]:
                ids[r, width - ctx[i]:] = torch.tensor(enc_a[i][: ctx[i]])
                mask[r, width - ctx[i]:] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        cache = DynamicCache()
        if width:
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            body(input_ids=ids, attention_mask=mask, position_ids=positions,
                 past_key_values=cache, use_cache=True)
        lengths = mask.sum(-1)
        scores = []
        for enc in (enc_a, enc_b):
            own = [enc[i][ctx[i]:] for i in idx]
            steps = max(len(o) for o in own)
            s_ids = torch.full((len(idx), steps), self.pad_id, dtype=torch.long)
            s_mask = torch.zeros((len(idx), steps), dtype=torch.long)
            for r, o in enumerate(own):  # right-padded after the context
                s_ids[r, : len(o)] = torch.tensor(o)
                s_mask[r, : len(o)] = 1
            s_ids, s_mask = s_ids.to(dev), s_mask.to(dev)
            hidden = body(input_ids=s_ids, attention_mask=torch.cat([mask, s_mask], dim=1),
                          position_ids=lengths[:, None] + torch.arange(steps, device=dev),
                          past_key_values=cache, use_cache=True).last_hidden_state
            if width:
                cache.crop(-steps)  # back to the contexts (negative: tokens to drop)
            last = torch.tensor([len(o) - 1 for o in own], device=dev)
            picked = hidden[torch.arange(len(idx), device=dev), last]
            scores.append(self.model.score(picked)[:, 0].float().tolist())
        return scores[0], scores[1]

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def _common_len(a: Sequence[Any], b: Sequence[Any]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int, device: Any):
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[row, : len(s)] = 1
    return ids.to(device), mask.to(device)


def load_pm(path: str | Path, device: str | None = None, *, max_length: int = 1024,
            batch_size: int = 16, trust_remote_code: bool = False) -> PreferenceModel:
    """Load a PM directory written by ``cai rl pm`` (or any one-label sequence classifier)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from constitutional.models.hf import resolve_device

    path = Path(path)
    if not (path / "config.json").is_file():
        raise UserError("not a preference model directory (no config.json)", file=path)
    dev = resolve_device(device)
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(path), dtype=torch.float32, trust_remote_code=trust_remote_code).to(dev)
    if model.config.num_labels != 1:
        raise UserError(f"expected a one-label (scalar) head, found {model.config.num_labels}",
                        file=path / "config.json", field="num_labels")
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
    model.eval()
    return PreferenceModel(model, tokenizer, max_length=max_length, batch_size=batch_size)


# ------------------------------------------------------------------------------------------------
# the loss and the trainer


def soft_preference_loss(r_chosen, r_rejected, p):
    """−[p·log σ(r_c − r_r) + (1 − p)·log σ(r_r − r_c)], averaged over the batch."""
    import torch.nn.functional as F

    d = r_chosen - r_rejected
    return -(p * F.logsigmoid(d) + (1 - p) * F.logsigmoid(-d)).mean()


def _soft_trainer_class():
    import torch
    from trl import RewardTrainer
    from trl.trainer.reward_trainer import DataCollatorForPreference

    class SoftCollator(DataCollatorForPreference):
        def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
            batch = super().torch_call([{k: e[k] for k in ("chosen_ids", "rejected_ids")}
                                        for e in examples])
            batch["p"] = torch.tensor([float(e["p"]) for e in examples], dtype=torch.float)
            return batch

    class SoftLabelRewardTrainer(RewardTrainer):
        """TRL's RewardTrainer with the soft-label (Bradley–Terry cross-entropy) loss."""

        def _set_signature_columns_if_needed(self):
            if self._signature_columns is None:
                self._signature_columns = ["chosen_ids", "rejected_ids", "p"]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            p = inputs.pop("p")
            mode = "train" if self.model.training else "eval"
            inputs["use_cache"] = False
            outputs = model(**inputs)
            r_chosen, r_rejected = torch.chunk(outputs.logits.squeeze(-1), chunks=2)
            loss = soft_preference_loss(r_chosen, r_rejected, p.to(r_chosen.dtype))
            with torch.no_grad():
                decided = p != 0.5
                acc = ((r_chosen > r_rejected) & decided).float().sum() / decided.float().sum(
                ).clamp(min=1)
                gathered = self.accelerator.gather_for_metrics
                self._metrics[mode]["accuracy"].append(gathered(acc).mean().item())
                margin = gathered((r_chosen - r_rejected).mean()).mean()
                self._metrics[mode]["margin"].append(margin.item())
                rewards = self.accelerator.gather(outputs.logits)
                self._metrics[mode]["mean_reward"].append(rewards.mean().item())
            return (loss, outputs) if return_outputs else loss

    return SoftLabelRewardTrainer, SoftCollator


# ------------------------------------------------------------------------------------------------
# the stage


class PMSettings(TrainSettings):
    """``pm:``: the preference model's training on soft AI labels (+ human comparisons)."""

    human_prefs: str | None = Field(None, description="Human helpfulness comparisons (hard "
                                                      "labels): prompt/chosen/rejected JSONL or "
                                                      "HH-RLHF transcripts.")
    human_ratio: float = Field(0.5, ge=0, lt=1, description="Share of human comparisons in the "
                                                            "mix.")
    learning_rate: float = Field(1e-5, gt=0, description="Peak learning rate.")
    eval_fraction: EvalFraction = Field(0.1, description="Share of the comparisons held out to "
                                                         "measure accuracy (more than 0).")
    eval_steps: int | None = Field(None, ge=1, description="Evaluate every N steps (default: "
                                                           "each epoch).")

    @field_validator("eval_fraction")
    @classmethod
    def _held_out(cls, value: float) -> float:
        if value == 0:
            raise ValueError("must be in (0, 1): the held-out split measures accuracy")
        return value


class PMConfig(TrainRun, PMSettings):
    """Settings of ``cai rl pm``: the tunable ones, and the run's inputs and output."""

    labels: str = Field(description="A `cai rl label` run directory, or a JSONL of "
                                    "prompt/chosen/rejected rows (+ score = P(chosen)).")
    model: str = Field(BUILTIN_MODEL, description="The base model that gets the scalar head.",
                       json_schema_extra={"cli": ["--model", "-m"]})
    out: str = Field(description="Where the PM (a model directory) goes.",
                     json_schema_extra={"cli": ["--out"]})


@dataclass
class PMResult:
    out_dir: Path
    metrics: dict[str, Any]


def mix(ai: list[Comparison], human: list[Comparison], human_ratio: float, seed: int,
        ) -> list[Comparison]:
    """All AI comparisons plus human ones making up ``human_ratio`` of the mix (fewer if there
    are not enough), shuffled reproducibly."""
    rng = random.Random(seed)
    if human and human_ratio > 0:
        want = round(len(ai) * human_ratio / (1 - human_ratio)) if ai else len(human)
        human = rng.sample(human, min(want, len(human)))
    else:
        human = []
    rows = ai + human
    rng.shuffle(rows)
    return rows


def pm_train(config: PMConfig) -> PMResult:
    """Train the PM on soft AI labels (+ human comparisons); save it to ``config.out``."""
    from constitutional.train import process_state, write_report

    t0 = time.perf_counter()
    config.check_machine()  # a model setting this machine cannot honour stops here, at once
    ai = load_comparisons(config.labels, source="ai")
    human = (load_comparisons(config.human_prefs, source="human", hard=True)
             if config.human_prefs else [])
    rows = mix(ai, human, config.human_ratio, config.seed)
    # held out: the eval_fraction of comparisons with the lowest id hashes (at least one), so the
    # split depends on the ids alone
    ranked = sorted(rows, key=lambda r: stable_hash(r.id))
    n_eval = max(1, round(len(rows) * config.eval_fraction))
    held = {r.id for r in ranked[:n_eval]}
    train_rows = [r for r in rows if r.id not in held]
    eval_rows = [r for r in rows if r.id in held]
    if not train_rows or not eval_rows:
        raise UserError(f"{len(rows)} comparisons are too few for a train/held-out split",
                        field="eval_fraction")
    log.info("PM: %d train comparisons (%d AI, %d human), %d held out", len(train_rows),
             sum(r.source == "ai" for r in train_rows),
             sum(r.source == "human" for r in train_rows), len(eval_rows))
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    # under `accelerate launch`, only the main process writes files
    main = process_state(config.device).is_main_process
    if main:
        atomic_write_jsonl(out / "pm.heldout.jsonl", [r.to_row() for r in eval_rows])
    metrics = _train(config, train_rows, eval_rows)
    metrics.update({"ai_comparisons": len(ai), "human_comparisons": len(human),
                    "train_rows": len(train_rows), "eval_rows": len(eval_rows),
                    "wall_seconds": round(time.perf_counter() - t0, 2)})
    if main:
        write_report(out / PM_METRICS, config, metrics)
    return PMResult(out, metrics)


def _train(config: PMConfig, train_rows: list[Comparison], eval_rows: list[Comparison],
           ) -> dict[str, Any]:
    """TRL's RewardTrainer with the soft-label loss, on a scalar head over ``config.model``."""
    from datasets import Dataset
    from trl import RewardConfig

    from constitutional.train import TrainJob, run_trainer

    def load_model(path: str, tokenizer: Any, kwargs: dict[str, Any]) -> Any:
        import torch
        from transformers import AutoModelForSequenceClassification

        from constitutional.train import load_pretrained

        torch.manual_seed(config.seed)  # the new scalar head's init: the same on every launch
        model = load_pretrained(AutoModelForSequenceClassification, path, "model",
                                num_labels=1, **kwargs)
        model.config.pad_token_id = tokenizer.pad_token_id
        return model

    def datasets(tokenizer: Any) -> tuple[Any, Any]:
        def dataset(rows: list[Comparison]) -> Any:
            return Dataset.from_list([{
                "chosen_ids": encode(tokenizer, _with_answer(r.prompt, r.chosen),
                                     config.max_length),
                "rejected_ids": encode(tokenizer, _with_answer(r.prompt, r.rejected),
                                       config.max_length),
                "p": r.p,
            } for r in rows])

        return dataset(train_rows), dataset(eval_rows)

    trainer_cls, collator_cls = _soft_trainer_class()
    return run_trainer(config, TrainJob(
        model=config.model, out=Path(config.out), trainer_class=trainer_cls,
        args_class=RewardConfig, learning_rate=config.learning_rate,
        args={"max_length": config.max_length, "eval_steps": config.eval_steps,
              "remove_unused_columns": False, "center_rewards_coefficient": None},
        datasets=datasets, load_model=load_model,
        evaluate="steps" if config.eval_steps else "epoch",
        trainer_kwargs=lambda tokenizer: {
            "data_collator": collator_cls(pad_token_id=tokenizer.pad_token_id)},
        before={"eval_accuracy_before": "eval_accuracy", "eval_loss_before": "eval_loss"},
        after={"eval_accuracy": "eval_accuracy", "eval_loss": "eval_loss"},
        log_keys=("step", "loss", "eval_loss", "eval_accuracy", "epoch")))
