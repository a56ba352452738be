"""The preference model (soft-label loss on TRL's RewardTrainer), `cai eval pm`, and DPO."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from constitutional.cli import app, main
from constitutional.core.errors import UserError
from constitutional.rl.preference import (
    load_comparisons,
    load_pm,
    soft_preference_loss,
)


def marker_pairs(path: Path, n: int = 240, seed: int = 0) -> Path:
    """Separable synthetic comparisons: the answer with the marker word is preferred, with soft
    labels in [0.7, 0.95], written in random A/B orientation."""
    rng = random.Random(seed)
    topics = ["cats", "rain", "bread", "trains", "music", "chess", "tea", "maps", "clocks", "boats"]
    rows = []
    for i in range(n):
        t = rng.choice(topics)
        good = f"Here is a note about {t}. banana banana."
        bad = f"Here is a note about {t}. Nothing more."
        p = rng.uniform(0.7, 0.95)
        a, b = (good, bad) if rng.random() < 0.5 else (bad, good)
        rows.append({"id": f"r{i}", "prompt": [{"role": "user", "content": f"About {t} #{i}?"}],
                     "chosen": [{"role": "assistant", "content": a}],
                     "rejected": [{"role": "assistant", "content": b}],
                     "score": p if a == good else 1 - p})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_soft_loss_at_half_has_no_preference():
    d = torch.tensor([0.0], requires_grad=True)
    zero = torch.zeros(1)
    loss = soft_preference_loss(d, zero, torch.tensor([0.5]))
    loss.backward()
    assert d.grad.item() == 0.0  # no push towards either answer
    for start in (-2.0, 1.5):  # away from a tie, p = 0.5 pulls the rewards back together
        x = torch.tensor([start], requires_grad=True)
        soft_preference_loss(x, zero, torch.tensor([0.5])).backward()
        assert x.grad.item() * start > 0
    # a hard label reduces to the Bradley–Terry loss
    x = torch.tensor([0.3])
    assert soft_preference_loss(x, zero, torch.tensor([1.0])).item() == pytest.approx(
        -torch.nn.functional.logsigmoid(x).item())
    # and the soft loss is minimised where σ(d) = p
    grid = torch.linspace(-4, 4, 801)
    losses = torch.stack([soft_preference_loss(g[None], zero, torch.tensor([0.8])) for g in grid])
    assert torch.sigmoid(grid[losses.argmin()]).item() == pytest.approx(0.8, abs=0.01)


def test_load_comparisons_forms_and_errors(tmp_path):
    hh = tmp_path / "hh.jsonl"
    hh.write_text(json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: hello!",
                              "rejected": "\n\nHuman: hi\n\nAssistant: go away"}) + "\n"
                  + json.dumps({"prompt": "q?", "chosen": "a", "rejected": "b", "score": 0.2})
                  + "\n")
    rows = load_comparisons(hh)
    assert rows[0].prompt == [{"role": "user", "content": "hi"}]
    assert (rows[0].chosen, rows[0].rejected, rows[0].p) == ("hello!", "go away", 1.0)
    assert (rows[1].chosen, rows[1].rejected) == ("b", "a")  # oriented by the label
    assert rows[1].p == pytest.approx(0.8)
    assert load_comparisons(hh, hard=True)[1].chosen == "a"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n"
                   + json.dumps({"prompt": "q", "chosen": "a", "rejected": "b", "score": 3}) + "\n")
    with pytest.raises(UserError) as err:
        load_comparisons(bad)
    assert (err.value.line, err.value.field) == (2, "score")


@pytest.fixture(scope="module")
def trained_pm(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("pm")
    data = marker_pairs(root / "prefs.jsonl")
    result = CliRunner().invoke(app, [
        "rl", "pm", "--labels", str(data), "-m", str(tiny_model_dir), "--out", str(root / "pm"),
        "--epochs", "3", "--learning-rate", "1e-3", "--batch-size", "16",
        "--eval-fraction", "0.25"])
    assert result.exit_code == 0, result.output
    return root, json.loads((root / "pm" / "pm.json").read_text())["metrics"]


def test_pm_separates_marker_pairs(trained_pm):
    root, metrics = trained_pm
    print(f"PM held-out accuracy {metrics['eval_accuracy_before']} → {metrics['eval_accuracy']}")
    assert metrics["eval_accuracy"] >= 0.9
    assert metrics["eval_rows"] > 30
    # the saved model, loaded by our scorer, agrees on the held-out split
    pm = load_pm(root / "pm")
    held = [json.loads(x) for x in (root / "pm" / "pm.heldout.jsonl").read_text().splitlines()]
    good = pm.score_answers([r["prompt"] for r in held], [r["chosen"] for r in held])
    bad = pm.score_answers([r["prompt"] for r in held], [r["rejected"] for r in held])
    assert sum(g > b for g, b in zip(good, bad, strict=True)) / len(held) >= 0.9
    # batching does not change a score
    single = pm.score_answers([held[0]["prompt"]], [held[0]["chosen"]])[0]
    assert single == pytest.approx(good[0], abs=1e-4)


def test_eval_pm_cli_on_prefs_and_mc_text_fields(trained_pm, tmp_path, capsys):
    root, _ = trained_pm
    mc = tmp_path / "mc.jsonl"
    mc.write_text("".join(json.dumps({
        "prompt": "...", "corrects": [" (A)"], "incorrects": [" (B)"],
        "text_correct": f"\n\nHuman: About {t}?\n\nAssistant: Here is a note about {t}. "
                        "banana banana.",
        "text_incorrect": [(f"\n\nHuman: About {t}?\n\nAssistant: Here is a note about {t}. "
                           "Nothing more.")]}) + "\n" for t in ("tea", "maps", "boats", "rain")))
    runner = CliRunner()
    res = runner.invoke(app, ["eval", "pm", "--pm", str(root / "pm"), "--data", str(mc),
                              "--out", str(tmp_path / "mc_out.jsonl")])
    assert res.exit_code == 0, res.output
    assert "accuracy 1.000 (4/4)" in res.output
    res = runner.invoke(app, ["eval", "pm", "--pm", str(root / "pm"), "--data",
                              str(root / "prefs.jsonl"), "--out", str(tmp_path / "p.jsonl")])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "p.summary.json").read_text())
    assert summary["n"] == 240 and summary["accuracy"] >= 0.9
    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"prompt": "q", "chosen": "a"}\n')
    rc = main(["eval", "pm", "--pm", str(root / "pm"), "--data", str(bad)])
    err = capsys.readouterr().err
    assert rc == 2 and "broken.jsonl:1" in err and "rejected" in err and len(
        err.strip().splitlines()) == 1


def test_dpo_raises_the_margin(trained_pm, tiny_model_dir, tmp_path):
    root, _ = trained_pm
    res = CliRunner().invoke(app, [
        "rl", "train", "--algo", "dpo", "--labels", str(root / "prefs.jsonl"), "--policy",
        str(tiny_model_dir), "--out", str(tmp_path / "dpo"), "--epochs", "1",
        "--learning-rate", "1e-3", "--batch-size", "16"])
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "dpo" / "dpo.json").read_text())["metrics"]
    print(f"DPO held-out margin {m['eval_margin_before']} → {m['eval_margin']}, label smoothing "
          f"{m['label_smoothing']}")
    assert m["eval_margin"] > m["eval_margin_before"] + 0.5
    assert 0.05 < m["label_smoothing"] < 0.3  # 1 − mean soft label of the kept pairs
    assert (tmp_path / "dpo" / "model.safetensors").exists()
