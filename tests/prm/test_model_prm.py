"""The PRM: a token classifier read at exactly the step-end positions (a hand-built model whose head fires on the
separator token), padding-aware, built from a causal LM folder (backbone copied, small new head), saved so plain
transformers loads it, and refused where it is not a PRM."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForTokenClassification, GPT2Config, GPT2ForTokenClassification

from alignloop.data import tokenize_step_records, tokenize_steps
from alignloop.errors import UserError
from alignloop.models import (
    LoraOptions,
    batch_steps,
    build_prm,
    has_adapter,
    is_prm_folder,
    load_prm,
    prm_info,
    score_steps,
    step_probabilities,
)
from alignloop.models.tiny import build_tiny_checkpoint, train_tokenizer

D = 32


@pytest.fixture(scope="module")
def tok():
    corpus = [f"{a} + {b} = {a + b}\nso the answer is {a + b}\n" for a in range(30) for b in range(10)]
    return train_tokenizer(corpus, vocab_size=300)


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory, tok):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("prm") / "lm", tokenizer=tok, n_layer=2, n_embd=D,
                                 n_head=2, n_positions=128)


def separator_marking_prm(tok) -> GPT2ForTokenClassification:
    """A PRM whose hidden state is LayerNorm(embedding) (one block, all its weights 0; no position embeddings):
    the separator's embedding is 10·e_0, every other token's 10·e_1, and the head reads feature 0. LayerNorm turns
    c·e_k into sqrt(D-1) at k and -1/sqrt(D-1) elsewhere, so the logit is sqrt(D-1) on the separator token and
    -1/sqrt(D-1) on any other."""
    config = GPT2Config(vocab_size=len(tok), n_positions=64, n_layer=1, n_embd=D, n_head=2, num_labels=1,
                        pad_token_id=tok.pad_token_id)
    model = GPT2ForTokenClassification(config).eval()
    sep = tok("\n", add_special_tokens=False)["input_ids"]
    assert len(sep) == 1
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for ln in (model.transformer.ln_f,):
            ln.weight.fill_(1.0)
        model.transformer.wte.weight[:, 1] = 10.0
        model.transformer.wte.weight[sep[0]] = 0.0
        model.transformer.wte.weight[sep[0], 0] = 10.0
        model.classifier.weight[0, 0] = 1.0
    model.config.alignloop_prm = {"loss": "bce", "separator": "\n"}
    return model


def test_the_head_is_read_at_exactly_the_step_ends(tok):
    model = separator_marking_prm(tok)
    on, off = 1 / (1 + math.exp(-math.sqrt(D - 1))), 1 / (1 + math.exp(1 / math.sqrt(D - 1)))
    # the prompt holds a newline too: a separator token, but not a step end
    prompts, steps = ["question\n2 + 3 =", "1 + 1 ="], [["2 + 3 = 5", "so the answer is 5"], ["1 + 1 = 2"]]
    examples = [dict(zip(("input_ids", "step_ends"), tokenize_steps(tok, p, s), strict=True))
                for p, s in zip(prompts, steps, strict=True)]
    sep = tok("\n", add_special_tokens=False)["input_ids"][0]
    assert [[e["input_ids"][i] for i in e["step_ends"]] for e in examples] == [[sep, sep], [sep]]
    for side in ("right", "left"):
        batch = batch_steps(examples, tok.pad_token_id, padding_side=side)
        probs = step_probabilities(model, batch["input_ids"], batch["attention_mask"], batch["step_mask"])
        hit = probs != 0
        assert torch.equal(hit, batch["step_mask"])                       # exactly the step ends, nothing else
        assert probs[hit].tolist() == pytest.approx([on, on, on], abs=1e-5)
        ends = [t.nonzero().flatten().tolist() for t in batch["step_mask"]]
        shift = [batch["input_ids"].shape[1] - len(e["input_ids"]) if side == "left" else 0 for e in examples]
        assert ends == [[p + s for p in e["step_ends"]] for e, s in zip(examples, shift, strict=True)]
    # the prompt's own newline fires the head too: reading it would be wrong
    logits = model(input_ids=torch.tensor([examples[0]["input_ids"]])).logits[0, :, 0]
    nl = examples[0]["input_ids"].index(sep)
    assert nl not in examples[0]["step_ends"] and torch.sigmoid(logits[nl]).item() == pytest.approx(on, abs=1e-5)
    assert torch.sigmoid(logits[0]).item() == pytest.approx(off, abs=1e-5)
    got = score_steps(model, tok, prompts, steps)
    assert got == [pytest.approx([on, on], abs=1e-5), pytest.approx([on], abs=1e-5)]
    # steps past max_length are not seen: None
    assert score_steps(model, tok, prompts[:1], steps[:1], max_length=examples[0]["step_ends"][0] + 1)[0][1] is None


def test_batch_steps_labels_and_soft_targets(tok):
    records = [{"prompt": "1 + 1 =", "completions": ["1 + 1 = 2", "so"], "labels": [1, None],
                "soft_labels": [0.25, None]}]
    (e,), _ = tokenize_step_records(records, tok)
    b = batch_steps([e], tok.pad_token_id, pad_to_multiple_of=8)
    assert b["input_ids"].shape[1] % 8 == 0
    assert b["step_mask"][0].nonzero().flatten().tolist() == e["step_ends"]
    assert b["label_mask"][0].nonzero().flatten().tolist() == e["step_ends"][:1]
    assert b["step_labels"][0, e["step_ends"][0]] == 1 and b["soft_targets"][0, e["step_ends"][0]] == 0.25
    assert b["soft_mask"].sum() == 1
    assert b["position_ids"][0, :3].tolist() == [0, 1, 2]


def test_build_from_a_causal_lm_save_and_load(tmp_path, lm_dir, tok):
    lm = AutoModelForTokenClassification.from_pretrained(lm_dir, num_labels=1)  # reference backbone
    prm = build_prm(lm_dir, "bce")
    assert prm.config.num_labels == 1 and prm_info(prm) == {"loss": "bce", "separator": "\n"}
    for (n1, p1), (n2, p2) in zip(lm.transformer.named_parameters(), prm.transformer.named_parameters(),
                                  strict=True):
        assert n1 == n2 and torch.equal(p1, p2)                       # backbone weights copied
    w = prm.classifier.weight
    assert w.std().item() == pytest.approx(1 / math.sqrt(D + 1), rel=0.5) and prm.classifier.bias.abs().sum() == 0
    out = tmp_path / "prm"
    prm.save_pretrained(out)
    tok.save_pretrained(out)
    assert is_prm_folder(out) and not is_prm_folder(lm_dir)
    plain = AutoModelForTokenClassification.from_pretrained(out)      # no alignloop needed
    assert torch.equal(plain.classifier.weight, w)
    model, tokenizer = load_prm(out)
    assert not model.training and tokenizer.pad_token_id == tok.pad_token_id
    ce = build_prm(lm_dir, "ce")
    assert ce.config.num_labels == 3 and ce.config.id2label == {0: "bad", 1: "neutral", 2: "good"}


def test_refusals_and_lora(tmp_path, lm_dir, tok):
    with pytest.raises(UserError, match="is not a process reward model"):
        load_prm(lm_dir)
    with pytest.raises(UserError, match="loss must be one of bce, ce"):
        build_prm(lm_dir, "mse")
    prm = build_prm(lm_dir, "bce")
    prm.save_pretrained(tmp_path / "p")
    with pytest.raises(UserError, match="trained with loss 'bce'"):
        build_prm(tmp_path / "p", "ce")
    lora = build_prm(lm_dir, "bce", lora=LoraOptions(r=2))
    assert has_adapter(lora)
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert any("classifier" in n for n in trainable) and any("lora_" in n for n in trainable)
    ids, ends = tokenize_steps(tok, "1 + 1 =", ["1 + 1 = 2"])
    b = batch_steps([{"input_ids": ids, "step_ends": ends}], tok.pad_token_id)
    p = step_probabilities(lora, b["input_ids"], b["attention_mask"], b["step_mask"])
    assert 0 < p[0, ends[0]].item() < 1
