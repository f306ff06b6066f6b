"""LoRA runs save both forms: OUTPUT_DIR/final (merged, plain transformers) and OUTPUT_DIR/adapter (the peft adapter
with the tokenizer, `PeftModel.from_pretrained(base, OUTPUT_DIR/adapter)`), and both compute what the trained model
computes. SFT, reward model (the score head saved with the adapter) and DPO here; PPO in tests/ppo."""
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from peft import PeftModel
from trainer_data import preference_rows
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from alignloop.models import LoraOptions, RewardModel, load_causal_lm, model_forward, score_sequences
from alignloop.trainers.dpo import DPOConfig, DPOTrainer
from alignloop.trainers.rm import RewardConfig, RewardTrainer
from alignloop.trainers.sft import SFTConfig, SFTTrainer

QUIET = dict(progress=False, tensorboard=False, logging_steps=1)
LORA = LoraOptions(r=4, alpha=8, dropout=0.0)
# merged weights W + s·BA round once in float32, logits of these tiny models are O(1): the two forms agree to a few
# ulps (seen <= 3e-7 at |logit| <= 0.5); an adapter missing or merged twice moves them by >= 1e-3 (checked below)
ATOL = 1e-5


def _batch(tok):
    enc = tok(["the movie was good fun", "a plot"], return_tensors="pt", padding=True, padding_side="right")
    return enc["input_ids"], enc["attention_mask"]


def _logits(model, ids, mask):
    model.eval()
    with torch.no_grad():
        return model_forward(model, ids, mask).float()


def _scores(model, ids, mask):
    model.eval()
    with torch.no_grad():
        return score_sequences(model, ids, mask)


def _check_causal_lm(out: Path, base: str, trained, tok):
    """final/ (AutoModelForCausalLM) and adapter/ (PeftModel on the base) compute the trained model's logits."""
    assert not (out / "final" / "adapter_config.json").exists()
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "adapter" / "tokenizer.json").is_file()
    AutoTokenizer.from_pretrained(out / "adapter")
    ids, mask = _batch(tok)
    merged = AutoModelForCausalLM.from_pretrained(out / "final")
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out / "adapter")
    want = _logits(trained, ids, mask)
    torch.testing.assert_close(_logits(merged, ids, mask), want, rtol=0, atol=ATOL)
    torch.testing.assert_close(_logits(adapter, ids, mask), want, rtol=0, atol=ATOL)
    # the adapter was trained: the base alone is far from it (the comparison above can fail)
    assert (_logits(AutoModelForCausalLM.from_pretrained(base), ids, mask) - want).abs().max() > 1e-3


def test_sft_lora_saves_final_and_adapter(tmp_path, base_model, sft_file, tiny_tok):
    model = load_causal_lm(base_model, lora=LORA)
    SFTTrainer(model=model, tokenizer=tiny_tok, train_dataset=sft_file,
               args=SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_batch_size=8, learning_rate=1e-2,
                              max_length=64, **QUIET)).train()
    _check_causal_lm(tmp_path, base_model, model, tiny_tok)


def test_dpo_lora_saves_final_and_adapter(tmp_path, base_model, tiny_tok):
    tr = DPOTrainer(model=base_model, train_dataset=preference_rows(16, 0),
                    args=DPOConfig(output_dir=str(tmp_path), max_steps=2, per_device_batch_size=8, learning_rate=1e-1,
                                   lora_r=4, lora_alpha=8, ref_cache_dir="none", **QUIET))
    tr.train()
    _check_causal_lm(tmp_path, base_model, tr.model, tiny_tok)


def test_rm_lora_saves_final_and_adapter_with_the_score_head(tmp_path, base_model, tiny_tok):
    """A reward model's adapter (SEQ_CLS) carries its score head (modules_to_save): on the base loaded as a
    classifier (a fresh random head) it scores as the trained model does."""
    model = RewardModel.from_pretrained(base_model, lora=LORA)
    RewardTrainer(model=model, tokenizer=tiny_tok, train_dataset=preference_rows(32, 0),
                  args=RewardConfig(output_dir=str(tmp_path), max_steps=2, per_device_batch_size=8,
                                    learning_rate=1e-2, **QUIET)).train()
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert "score" in config["modules_to_save"] and config["task_type"] == "SEQ_CLS"
    assert (tmp_path / "adapter" / "tokenizer.json").is_file()
    ids, mask = _batch(tiny_tok)
    want = _scores(model, ids, mask)
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "final")
    base = AutoModelForSequenceClassification.from_pretrained(base_model, num_labels=1)
    base_scores = _scores(base, ids, mask)
    adapter = PeftModel.from_pretrained(base, tmp_path / "adapter")
    torch.testing.assert_close(_scores(merged, ids, mask), want, rtol=0, atol=ATOL)
    torch.testing.assert_close(_scores(adapter, ids, mask), want, rtol=0, atol=ATOL)
    assert (base_scores - want).abs().max() > 1e-3


def test_cli_lora_run_writes_final_and_adapter(tmp_path, base_model, sft_file, tiny_tok):
    """From the command line: final/ and adapter/ agree, and adapter/ is a `--model` the trainers load again
    (base + adapter) to continue training."""
    from alignloop.cli import cli

    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["sft", "--model", base_model, "--train-file", sft_file, "--output-dir", str(out),
                                   "--max-steps", "2", "--per-device-batch-size", "8", "--learning-rate", "0.01",
                                   "--lora-r", "4", "--no-progress", "--no-tensorboard"])
    assert res.exit_code == 0, res.output
    again = load_causal_lm(out / "adapter")
    _check_causal_lm(out, base_model, again, tiny_tok)


def test_full_fine_tuning_writes_no_adapter(tmp_path, base_model, sft_file):
    SFTTrainer(model=base_model, train_dataset=sft_file,
               args=SFTConfig(output_dir=str(tmp_path), max_steps=1, per_device_batch_size=8, **QUIET)).train()
    assert (tmp_path / "final" / "config.json").is_file() and not (tmp_path / "adapter").exists()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
