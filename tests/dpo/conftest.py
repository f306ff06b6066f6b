"""Fixtures for the DPO / best-of-N / rejection-sampling tests: tiny local models, never downloaded."""
from __future__ import annotations

import random

import pytest

from alignloop.models import tiny

SHAPE = dict(n_layer=2, n_embd=64, n_head=4, n_positions=128)
GOOD = "good great fun love".split()
BAD = "bad awful boring hate".split()
NEUTRAL = "the movie film plot actor scene story music".split()


def synthetic_pairs(n: int, seed: int) -> list[dict]:
    """Preference pairs where chosen completions use positive words and rejected ones negative words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = " ".join(rng.choice(NEUTRAL) for _ in range(rng.randint(2, 4)))
        def compl(words):
            return " " + " ".join(rng.choice(words + NEUTRAL[:2]) for _ in range(rng.randint(3, 6)))
        rows.append({"prompt": prompt, "chosen": compl(GOOD), "rejected": compl(BAD)})
    return rows


@pytest.fixture(scope="session")
def tok():
    return tiny.train_tokenizer(tiny.default_corpus(300), vocab_size=300)


@pytest.fixture(scope="session")
def lm_dir(tmp_path_factory, tok):
    return tiny.build_tiny_checkpoint(tmp_path_factory.mktemp("lm") / "lm", tokenizer=tok, **SHAPE)


@pytest.fixture(scope="session")
def pairs():
    return synthetic_pairs(16, seed=0)


@pytest.fixture(scope="session")
def adapter_dir(tmp_path_factory, tok, lm_dir):
    """A trained-looking LoRA adapter folder on `lm_dir` (peft format, tokenizer beside it): LoRA B drawn at random,
    so the adapter changes the model (the policy that starts from it is not its base)."""
    import torch
    from transformers import AutoModelForCausalLM

    from alignloop.models import LoraOptions, apply_lora

    model = apply_lora(AutoModelForCausalLM.from_pretrained(lm_dir), LoraOptions(r=4, alpha=8, dropout=0.0))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    path = tmp_path_factory.mktemp("adapter") / "adapter"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
