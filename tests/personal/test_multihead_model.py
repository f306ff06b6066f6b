"""The multi-head reward model format: H heads on one backbone, saved as a plain transformers sequence classifier
(num_labels = H, id2label = the head names, config.alignloop_heads), loaded back by alignloop and by transformers."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from alignloop.errors import UserError
from alignloop.models import RewardModel, heads_info, score_sequences

HEADS = {"by": "group", "names": ["cool", "population", "warm"], "population": "population"}


def _batch(tok):
    enc = tok([" good movie", " the plot was boring and slow"], return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def test_multihead_save_load_and_transformers_agree(tmp_path, base_model, tiny_tok):
    rm = RewardModel.from_pretrained(base_model, heads=HEADS)
    assert rm.head_names == HEADS["names"] and rm.num_heads == 3
    w = rm.model.score.weight
    assert w.shape == (3, 32) and w.std().item() > 0          # fresh heads get the reward init, not zeros
    ids, mask = _batch(tiny_tok)
    with torch.no_grad():
        scores = rm.head_scores(ids, mask)
        assert scores.shape == (2, 3) and scores.dtype == torch.float32
        assert torch.equal(rm(ids, mask, head="warm"), scores[:, 2])
        assert torch.equal(rm(ids, mask, head=1), scores[:, 1])
        assert torch.equal(score_sequences(rm, ids, mask, label=2), scores[:, 2])
    with pytest.raises(UserError, match="has 3 heads"):
        rm(ids, mask)
    with pytest.raises(UserError, match="not a head.*cool, population, warm"):
        rm(ids, mask, head="hot")
    rm.save_pretrained(tmp_path / "rm", tokenizer=tiny_tok)
    assert heads_info(tmp_path / "rm") == HEADS
    assert heads_info(rm) == HEADS and heads_info(rm.config) == HEADS
    again = RewardModel.from_pretrained(tmp_path / "rm")
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    assert hf.config.num_labels == 3 and hf.config.id2label == {0: "cool", 1: "population", 2: "warm"}
    with torch.no_grad():
        assert torch.allclose(again.head_scores(ids, mask), scores, atol=1e-6)
        # transformers reads the last non-pad token; these texts have no EOS appended, so it reads the same token
        assert torch.allclose(hf(input_ids=ids, attention_mask=mask).logits, scores, atol=1e-5)


def test_one_head_models_are_unchanged(tmp_path, base_model, tiny_tok):
    rm = RewardModel.from_pretrained(base_model)
    assert rm.num_heads == 1 and heads_info(rm) is None
    ids, mask = _batch(tiny_tok)
    with torch.no_grad():
        assert torch.equal(rm(ids, mask), rm.head_scores(ids, mask)[:, 0])
    rm.save_pretrained(tmp_path / "one")
    assert heads_info(tmp_path / "one") is None
    assert "alignloop_heads" not in (tmp_path / "one" / "config.json").read_text()


def test_heads_are_checked(tmp_path, base_model):
    with pytest.raises(UserError, match="alignloop_heads.by"):
        RewardModel.from_pretrained(base_model, heads={"by": "mood", "names": ["a"]})
    with pytest.raises(UserError, match="distinct"):
        RewardModel.from_pretrained(base_model, heads={"by": "group", "names": ["a", "a"]})
    with pytest.raises(UserError, match="population"):
        RewardModel.from_pretrained(base_model, heads={"by": "group", "names": ["a", "b"], "population": "c"})
    RewardModel.from_pretrained(base_model, heads=HEADS).save_pretrained(tmp_path / "rm")
    with pytest.raises(UserError, match="has the heads"):
        RewardModel.from_pretrained(tmp_path / "rm", heads={"by": "criterion", "names": ["helpful", "harmless"]})
    # a multi-class classifier without alignloop_heads is not a reward model
    clf = AutoModelForSequenceClassification.from_pretrained(base_model, num_labels=2)
    with pytest.raises(UserError, match="ClassifierReward"):
        RewardModel(clf)
