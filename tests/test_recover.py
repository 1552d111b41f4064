"""Recovery distillation: a few steps lower the KL to the original model (attention weights, or LoRA merged back);
a recipe step runs it, `attnkit distill` saves the recovered checkpoint with its loss curve."""

from __future__ import annotations

import json

import pytest
import torch

import attnkit
from attnkit.convert.conversion import RecoverySpec
from attnkit.train.recover import distillation_losses, recover

CALIBRATION_IDS = torch.randint(3, 256, (2, 96), generator=torch.Generator().manual_seed(5))
TRAIN_IDS = torch.randint(3, 256, (1, 64), generator=torch.Generator().manual_seed(6))


def converted_pair(method: dict):
    teacher, _ = attnkit.load_model("tiny-llama", dtype="float32", device="cpu")
    student, _ = attnkit.load_model("tiny-llama", dtype="float32", device="cpu")
    attnkit.apply(student, {"attnkit": 1, "name": "x", "steps": [method]}, data=CALIBRATION_IDS)
    return teacher.eval(), student


def kl_to_teacher(student, teacher, ids) -> float:
    with torch.no_grad():
        return float(distillation_losses(student(input_ids=ids).logits, teacher(input_ids=ids).logits)[0])


def test_distillation_loss_is_zero_for_equal_models_and_positive_otherwise():
    a = torch.randn(2, 5, 11)
    kl, mse = distillation_losses(a, a, 2.0, (a,), (a,))
    assert float(kl) == pytest.approx(0, abs=1e-6) and float(mse) == 0
    kl, mse = distillation_losses(a + torch.randn_like(a), a, 1.0, (a + 1,), (a,))
    assert float(kl) > 0 and float(mse) > 0


@pytest.mark.parametrize("lora", [None, {"r": 4}], ids=["attention", "lora"])
def test_a_few_steps_lower_the_loss(lora):
    teacher, student = converted_pair({"method": "mla", "kv_rank": 8, "rope_dim": 8})
    names = sorted(n for n, _ in student.named_parameters())
    before = kl_to_teacher(student, teacher, TRAIN_IDS)
    spec = RecoverySpec(steps=5, lr=5e-3, warmup_steps=0, hidden_mse=0.1, lora=lora)
    result = recover(student, teacher, spec, data=TRAIN_IDS, show_progress=False)
    after = kl_to_teacher(student, teacher, TRAIN_IDS)
    assert after < 0.7 * before, (before, after)
    assert len(result.history) == 5 and result.tokens == 5 * TRAIN_IDS.numel()
    assert result.trainable_parameters > 0 and "hidden_mse" in result.history[0]
    assert sorted(n for n, _ in student.named_parameters()) == names  # LoRA merged back: same modules, same names
    assert not any(p.requires_grad for p in teacher.parameters())


def test_recipe_step_recovers_and_distill_saves_the_curve(tmp_path, monkeypatch):
    """`attnkit distill` on a GQA recipe with a recover: block converts, recovers, saves a native checkpoint and the
    loss curve (the training text: a local file)."""
    from attnkit.train.distill import distill

    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    recipe = {"attnkit": 1, "name": "gqa-recover", "steps": [{
        "method": "gqa", "num_kv_heads": 1, "calibration_tokens": 128, "calibration_seq_len": 64,
        "recover": {"steps": 3, "lr": 1e-3, "warmup_steps": 0, "seq_len": 64},
    }]}
    report = distill(recipe, "tiny-llama", tmp_path / "ckpt", data=str(text), steps=4, show_progress=False)
    rows = [json.loads(line) for line in (tmp_path / "ckpt" / "train" / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # --steps overrode the recipe's 3
    assert report.results[0].steps == 4
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["num_key_value_heads"] == 1
    assert config["attnkit"]["recipe"]["steps"][0]["recover"]["data"] == str(text)
