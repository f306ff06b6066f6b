from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from alignloop.errors import UserError
from alignloop.models import load_causal_lm, load_sequence_classifier, load_tokenizer, resolve_dtype, tiny


def test_load_causal_lm_from_local_folder_matches_plain_transformers(lm_dir):
    ours = load_causal_lm(lm_dir).eval()
    plain = AutoModelForCausalLM.from_pretrained(lm_dir).eval()
    assert ours.dtype == torch.float32
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, plain(ids).logits)
    ours_str = load_causal_lm(str(lm_dir))
    assert type(ours_str).__name__ == "GPT2LMHeadModel"


@pytest.mark.parametrize("dtype,expected", [
    (None, torch.float32), ("float32", torch.float32), ("fp32", torch.float32), ("bfloat16", torch.bfloat16),
    ("bf16", torch.bfloat16), ("float16", torch.float16), (torch.bfloat16, torch.bfloat16), ("auto", torch.float32),
])
def test_dtype_option(lm_dir, dtype, expected):
    model = load_causal_lm(lm_dir, dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {expected}


def test_resolve_dtype():
    assert resolve_dtype(None) is torch.float32
    assert resolve_dtype("auto") == "auto"
    assert resolve_dtype("torch.bfloat16") is torch.bfloat16
    assert resolve_dtype(" BF16 ") is torch.bfloat16


@pytest.mark.parametrize("bad", ["float8", "int8", "", 3, torch.int64])
def test_bad_dtype_is_a_user_error(lm_dir, bad):
    with pytest.raises(UserError, match="dtype"):
        load_causal_lm(lm_dir, dtype=bad)


def test_missing_local_path_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_causal_lm(tmp_path / "nope")
    with pytest.raises(UserError, match="does not exist"):
        load_causal_lm(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="does not exist"):
        load_tokenizer("./definitely/not/here")
    with pytest.raises(UserError, match="does not exist"):
        load_sequence_classifier(tmp_path / "nope")


def test_folder_without_model_and_file_path_are_user_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="config.json"):
        load_causal_lm(tmp_path / "empty")
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        load_causal_lm(tmp_path / "f.txt")
    with pytest.raises(UserError, match="no model"):
        load_causal_lm("")


def test_tokenizer_without_pad_gets_eos_as_pad(tmp_path, corpus):
    tok = tiny.train_tokenizer(corpus, vocab_size=300)
    tok.pad_token = None
    tok.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok", padding_side="left")
    assert loaded.pad_token == loaded.eos_token == tiny.EOS
    assert loaded.pad_token_id == loaded.eos_token_id
    assert loaded.padding_side == "left"
    enc = loaded(["good movie and a really boring plot", "bad"], padding=True, return_tensors="pt")
    assert enc["attention_mask"][1].tolist()[0] == 0  # left padded
    with pytest.raises(UserError, match="padding_side"):
        load_tokenizer(tmp_path / "tok", padding_side="middle")


def test_tokenizer_keeps_its_own_pad(lm_dir):
    tok = load_tokenizer(lm_dir)
    assert tok.pad_token == tiny.PAD and tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "right"


def test_gradient_checkpointing_option(lm_dir):
    model = load_causal_lm(lm_dir, gradient_checkpointing=True)
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    assert model.config.use_cache is False
    model.train()
    out = model(torch.tensor([[5, 6, 7]]), labels=torch.tensor([[5, 6, 7]]))
    out.loss.backward()
    assert model.transformer.wte.weight.grad is not None


def test_sequence_classifier_loading(classifier_dir, lm_dir):
    clf = load_sequence_classifier(classifier_dir)
    assert clf.config.num_labels == 3 and clf.config.id2label[1] == "not hate"
    with pytest.raises(UserError, match="num_labels"):
        load_sequence_classifier(classifier_dir, num_labels=1)
    fresh, info = load_sequence_classifier(lm_dir, num_labels=1, output_loading_info=True)
    assert "score.weight" in info["missing_keys"]
    assert fresh.config.pad_token_id is not None


def test_unknown_hub_id_is_a_user_error_offline():
    import subprocess
    import sys

    code = ("from alignloop.errors import UserError\n"
            "from alignloop.models import load_causal_lm\n"
            "try:\n    load_causal_lm('alignloop-no-such-org/no-such-model')\n"
            "except UserError as e:\n    print('USERERROR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert "USERERROR could not load causal LM 'alignloop-no-such-org/no-such-model'" in out.stdout, out.stderr
    assert "no local folder" in out.stdout
