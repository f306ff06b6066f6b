from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from alignloop.data import pad_batch as pad_rows
from alignloop.data import reward_input_ids
from alignloop.errors import UserError
from alignloop.models import (
    ClassifierReward,
    CriticModel,
    LoraOptions,
    RewardModel,
    critic_from_reward_model,
    has_adapter,
    load_sequence_classifier,
    score_sequences,
    sequence_logits,
    tiny,
)
from alignloop.scoring import load_scorer

EOS, PAD = 0, 1
# sequences that contain EOS in the middle and at the end: a pad-id search with pad == EOS finds the wrong token
SEQS = [[5, 9, EOS, 7, 30, 41, EOS], [8, 3], [17, EOS, 40, 11], [23]]


def _alone(model, seqs):
    out = []
    with torch.no_grad():
        for s in seqs:
            ids = torch.tensor([s])
            out.append(score_sequences(model, ids, torch.ones_like(ids))[0])
    return torch.stack(out)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("pad_id", [PAD, EOS], ids=["pad", "pad_is_eos"])
def test_reward_score_at_last_real_token(reward_dir, pad_batch, side, pad_id):
    rm = RewardModel.from_pretrained(reward_dir).eval()
    alone = _alone(rm, SEQS)
    assert alone.abs().min() > 0  # a real, non-trivial head
    ids, mask = pad_batch(SEQS, pad_id, side)
    with torch.no_grad():
        scores = rm(ids, mask)
    assert scores.shape == (4,)
    torch.testing.assert_close(scores, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(score_sequences(rm.model, ids, mask), scores)


def test_score_matches_transformers_where_transformers_reads_correctly(reward_dir, pad_batch):
    rm = RewardModel.from_pretrained(reward_dir).eval()
    plain = AutoModelForSequenceClassification.from_pretrained(reward_dir).eval()
    ids, mask = pad_batch(SEQS, PAD, "right")  # distinct pad, right padding: transformers is right here
    with torch.no_grad():
        torch.testing.assert_close(rm(ids, mask), plain(input_ids=ids, attention_mask=mask).logits[:, 0],
                                   atol=1e-5, rtol=1e-5)
        # with pad == EOS in the config both skip trailing EOS tokens: rows that end in EOS are read before it
        rm.config.pad_token_id = plain.config.pad_token_id = EOS
        ids, mask = pad_batch(SEQS, EOS, "right")
        torch.testing.assert_close(rm(ids, mask), plain(input_ids=ids, attention_mask=mask).logits[:, 0],
                                   atol=1e-5, rtol=1e-5)
        # and unlike transformers' pad-id search, left padding reads the same tokens
        left_ids, left_mask = pad_batch(SEQS, EOS, "left")
        torch.testing.assert_close(rm(left_ids, left_mask), rm(ids, mask), atol=1e-5, rtol=1e-5)


def test_pad_eq_eos_reward_model_scores_the_same_in_transformers_and_alignloop(tmp_path, tok_eos_pad):
    """GPT-2-like tokenizer with pad == EOS. A reward model saved by alignloop, scored by plain transformers on the
    tokens alignloop builds (prompt + completion + EOS, padded with EOS), gives alignloop's scores; and a TRL-style
    reward model (TRL appends the EOS text and lets transformers pick the token) scores the same under alignloop.
    Before the fix alignloop read the appended EOS and transformers the token before it: differences of order 1."""
    folder = tiny.build_tiny_checkpoint(tmp_path / "rm", tokenizer=tok_eos_pad, kind="reward", seed=3,
                                        n_layer=2, n_embd=32, n_head=2, n_positions=64)
    tok = tok_eos_pad
    assert tok.pad_token_id == tok.eos_token_id
    prompts = ["the cat sat\n", "a dog ran on the road\n", "hello\n"]
    completions = [" on the mat", " away", " there, my friend"]
    plain = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    assert plain.config.pad_token_id == tok.eos_token_id
    ours = load_scorer(str(folder))(prompts, completions)
    rows = reward_input_ids(tok, prompts, completions)
    assert all(r[-1] == tok.eos_token_id for r in rows)
    ids, mask = pad_rows(rows, tok.pad_token_id)
    with torch.no_grad():
        theirs = plain(input_ids=ids, attention_mask=mask).logits[:, 0]
        # TRL's reward trainer: prompt + completion + eos as one text, tokenised, the classifier's own forward
        trl_rows = [tok(p + c + tok.eos_token)["input_ids"] for p, c in zip(prompts, completions, strict=True)]
        assert trl_rows == rows  # same tokens, so the comparison is about where the score is read
        trl = torch.stack([plain(input_ids=torch.tensor([r])).logits[0, 0] for r in trl_rows])
        rm = RewardModel.from_pretrained(folder).eval()
        direct = rm(ids, mask)
    assert ours.abs().min() > 1e-3 and (ours.max() - ours.min()) > 1e-3  # a real head, distinct scores
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours, trl, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(direct, theirs, atol=1e-5, rtol=1e-5)


def test_reward_model_from_causal_lm_gets_reward_head_init(lm_dir):
    rm = RewardModel.from_pretrained(lm_dir)
    lm = AutoModelForCausalLM.from_pretrained(lm_dir)
    head = rm.model.score
    assert head.weight.shape == (1, 32) and head.bias is None
    std = head.weight.std().item()
    assert 0.5 / 33 ** 0.5 < std < 2.0 / 33 ** 0.5  # N(0, 1/sqrt(d_model + 1)), d_model = 32
    assert abs(head.weight.mean().item()) < 3 / 33 ** 0.5 / 32 ** 0.5 * 1.5
    assert torch.equal(rm.model.transformer.wte.weight, lm.transformer.wte.weight)
    assert rm.config.pad_token_id is not None


def test_reward_model_save_load_with_plain_transformers(reward_dir, tmp_path, pad_batch, tok):
    rm = RewardModel.from_pretrained(reward_dir).eval()
    rm.save_pretrained(tmp_path / "saved", tokenizer=tok)
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "saved").eval()
    again = RewardModel.from_pretrained(tmp_path / "saved").eval()
    ids, mask = pad_batch(SEQS, PAD, "right")
    with torch.no_grad():
        ours = rm(ids, mask)
        torch.testing.assert_close(again(ids, mask), ours, atol=0, rtol=0)
        torch.testing.assert_close(plain(input_ids=ids, attention_mask=mask).logits[:, 0], ours,
                                   atol=1e-5, rtol=1e-5)
    assert (tmp_path / "saved" / "tokenizer.json").exists()


def test_token_scores_and_critic(reward_dir, pad_batch):
    rm = RewardModel.from_pretrained(reward_dir).eval()
    ids, mask = pad_batch(SEQS, EOS, "left")
    critic = critic_from_reward_model(rm)
    assert isinstance(critic, CriticModel)
    critic2 = critic_from_reward_model(reward_dir).eval()
    with torch.no_grad():
        values = critic.eval()(ids, mask)
        assert values.shape == ids.shape
        torch.testing.assert_close(values[:, -1], rm(ids, mask), atol=1e-5, rtol=1e-5)  # left pad: last = real
        torch.testing.assert_close(critic2(ids, mask), values)
        # per-token values of a prefix equal the score of that prefix alone
        torch.testing.assert_close(values[0, -4], _alone(rm, [SEQS[0][:4]])[0], atol=1e-5, rtol=1e-5)
    # the critic is a copy: training it leaves the reward model alone
    with torch.no_grad():
        critic.model.score.weight.add_(1.0)
    assert not torch.equal(critic.model.score.weight, rm.model.score.weight)


def test_reward_model_rejects_multiclass(classifier_dir):
    with pytest.raises(UserError, match="num_labels"):
        RewardModel.from_pretrained(classifier_dir)
    with pytest.raises(UserError, match="num_labels=1"):
        RewardModel(load_sequence_classifier(classifier_dir))


def test_reward_model_with_lora_trains_adapter_and_head_and_saves_merged(reward_dir, tmp_path, pad_batch):
    rm = RewardModel.from_pretrained(reward_dir, lora=LoraOptions(r=4, alpha=8, dropout=0.0))
    assert has_adapter(rm)
    trainable = {n for n, p in rm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "score" in n for n in trainable)
    assert any("score" in n for n in trainable)
    ids, mask = pad_batch(SEQS, PAD, "right")
    base = RewardModel.from_pretrained(reward_dir).eval()
    rm.eval()
    with torch.no_grad():
        torch.testing.assert_close(rm(ids, mask), base(ids, mask), atol=1e-5, rtol=1e-5)  # LoRA B = 0 at init
        for n, p in rm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
        changed = rm(ids, mask)
    assert (changed - base(ids, mask).detach()).abs().max() > 1e-3
    rm.save_pretrained(tmp_path / "merged")
    assert has_adapter(rm)  # the live model keeps its adapter
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids, attention_mask=mask).logits[:, 0], changed,
                                   atol=1e-4, rtol=1e-4)


def test_classifier_reward_positive_logit(classifier_dir, pad_batch):
    cr = ClassifierReward.from_pretrained(classifier_dir, positive_label="not hate")
    assert cr.label_index == 1
    plain = AutoModelForSequenceClassification.from_pretrained(classifier_dir).eval()
    ids, mask = pad_batch(SEQS, PAD, "right")
    with torch.no_grad():
        logits = plain(input_ids=ids, attention_mask=mask).logits
        assert logits.shape == (4, 3)
        torch.testing.assert_close(cr.score_tokens(ids, mask), logits[:, 1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cr(ids, mask), logits[:, 1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sequence_logits(cr.model, ids, mask), logits, atol=1e-5, rtol=1e-5)
        # left padding / pad == EOS give the same positive logit
        ids_l, mask_l = pad_batch(SEQS, EOS, "left")
        torch.testing.assert_close(cr.score_tokens(ids_l, mask_l), logits[:, 1], atol=1e-5, rtol=1e-5)
    for label, idx in [(0, 0), (2, 2), (-1, 2), ("hate", 0), ("Offensive", 2), ("1", 1)]:
        assert ClassifierReward(cr.model, cr.tokenizer, positive_label=label).label_index == idx


def test_classifier_reward_on_texts(classifier_dir):
    cr = ClassifierReward.from_pretrained(classifier_dir, positive_label=2, batch_size=2)
    texts = ["good movie and a great plot", "awful", "boring film that was not fun at all", "love it"]
    rewards = cr(texts)
    assert rewards.shape == (4,) and rewards.dtype == torch.float32
    with torch.no_grad():
        for t, r in zip(texts, rewards, strict=True):
            enc = cr.tokenizer([t], return_tensors="pt")
            torch.testing.assert_close(cr.score_tokens(enc["input_ids"], enc["attention_mask"])[0], r,
                                       atol=1e-5, rtol=1e-5)
    assert cr.reward([]).shape == (0,)


@pytest.mark.parametrize("bad", [3, -4, "neutral", True, 1.5])
def test_classifier_reward_bad_label(classifier_dir, bad):
    model = load_sequence_classifier(classifier_dir)
    with pytest.raises(UserError, match="positive_label"):
        ClassifierReward(model, positive_label=bad)


def test_classifier_reward_with_an_encoder_classifier(tok, pad_batch):
    """Encoder classifiers (BERT/RoBERTa-style, e.g. hate-speech models) have no `score` head: their own
    padding-safe forward (first-token pooling) is used."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=2, pad_token_id=PAD,
                     id2label={0: "hate", 1: "nothate"}, label2id={"hate": 0, "nothate": 1})
    model = BertForSequenceClassification(cfg).eval()
    cr = ClassifierReward(model, tok, positive_label="nothate")
    ids, mask = pad_batch(SEQS, PAD, "right")
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits[:, 1]
        torch.testing.assert_close(cr.score_tokens(ids, mask), expected)
        for i, s in enumerate(SEQS):  # padding-safe
            one = torch.tensor([s])
            torch.testing.assert_close(cr.score_tokens(one, torch.ones_like(one))[0], expected[i],
                                       atol=1e-5, rtol=1e-5)
    assert cr(["good movie", "awful plot"]).shape == (2,)


def test_bf16_reward_model_returns_float32_scores(reward_dir, pad_batch):
    rm = RewardModel.from_pretrained(reward_dir, dtype="bf16").eval()
    ids, mask = pad_batch(SEQS, PAD, "left")
    with torch.no_grad():
        scores = rm(ids, mask)
        full = RewardModel.from_pretrained(reward_dir).eval()(ids, mask)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, full, atol=0.1, rtol=0.1)


def test_classifier_reward_truncates_to_the_model_context(classifier_dir):
    cr = ClassifierReward.from_pretrained(classifier_dir, positive_label=1)  # n_positions = 64
    long_text = " ".join(["really boring movie and a bad plot"] * 40)
    cr.tokenizer.padding_side = "left"  # ignored: texts are right-padded
    rewards = cr([long_text, "fun"])
    assert rewards.shape == (2,) and torch.isfinite(rewards).all()
    enc = cr.tokenizer([long_text], return_tensors="pt", truncation=True, max_length=64)
    with torch.no_grad():
        torch.testing.assert_close(cr.score_tokens(enc["input_ids"], enc["attention_mask"])[0], rewards[0],
                                   atol=1e-5, rtol=1e-5)


def test_reward_model_adapter_only_save_round_trip(reward_dir, tmp_path, pad_batch):
    rm = RewardModel.from_pretrained(reward_dir, lora=LoraOptions(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        for p in rm.parameters():
            if p.requires_grad:  # LoRA A/B and the (modules_to_save) score head
                p.add_(torch.randn_like(p) * 0.3)
    rm.eval()
    rm.save_pretrained(tmp_path / "adapter", merge_lora=False)
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    again = RewardModel.from_pretrained(tmp_path / "adapter").eval()
    assert has_adapter(again)
    trainable = [n for n, p in again.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in trainable) and any("score" in n for n in trainable)
    ids, mask = pad_batch(SEQS, PAD, "left")
    with torch.no_grad():
        torch.testing.assert_close(again(ids, mask), rm(ids, mask), atol=1e-5, rtol=1e-5)


def test_helpers_accept_our_wrappers(reward_dir, classifier_dir, pad_batch):
    rm = RewardModel.from_pretrained(reward_dir).eval()
    cr = ClassifierReward.from_pretrained(classifier_dir, positive_label=1)
    ids, mask = pad_batch(SEQS, PAD, "right")
    with torch.no_grad():
        torch.testing.assert_close(sequence_logits(rm, ids, mask)[:, 0], rm(ids, mask))
        torch.testing.assert_close(sequence_logits(cr, ids, mask)[:, 1], cr(ids, mask))
        torch.testing.assert_close(score_sequences(cr, ids, mask, label=1), cr(ids, mask))


@pytest.mark.parametrize("lora", [None, LoraOptions(r=4, alpha=8, dropout=0.0)], ids=["full", "lora"])
def test_reward_model_gradient_checkpointing(reward_dir, pad_batch, lora):
    ids, mask = pad_batch(SEQS, PAD, "left")
    plain = RewardModel.from_pretrained(reward_dir).eval()
    rm = RewardModel.from_pretrained(reward_dir, gradient_checkpointing=True, lora=lora)
    rm.train()  # no dropout in the tiny configs: same scores in train mode
    scores = rm(ids, mask)
    torch.testing.assert_close(scores, plain(ids, mask).detach(), atol=1e-5, rtol=1e-5)
    scores.sum().backward()
    grads = [p.grad for p in rm.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


def test_score_sequences_on_a_critic_reads_the_last_real_token(reward_dir, pad_batch):
    rm = RewardModel.from_pretrained(reward_dir).eval()
    critic = critic_from_reward_model(rm).eval()
    ids, mask = pad_batch(SEQS, EOS, "right")
    with torch.no_grad():
        torch.testing.assert_close(score_sequences(critic, ids, mask), rm(ids, mask))


def test_critic_from_a_frozen_reward_model_is_trainable(reward_dir):
    rm = RewardModel.from_pretrained(reward_dir).eval().requires_grad_(False)
    critic = critic_from_reward_model(rm, lora=LoraOptions(r=4, alpha=8, dropout=0.0))
    assert has_adapter(critic) and not has_adapter(rm)
    trainable = [n for n, p in critic.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in trainable) and any("score" in n for n in trainable)
    full = critic_from_reward_model(rm)
    assert all(p.requires_grad for p in full.parameters())
    assert not any(p.requires_grad for p in rm.parameters())
