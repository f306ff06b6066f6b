"""Fixtures of the rollout tests: a tokenizer trained locally and a small random GPT-2 (never downloaded)."""
from __future__ import annotations

import pytest

from alignloop.models.tiny import tiny_causal_lm, train_tokenizer


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(vocab_size=300)


@pytest.fixture(scope="module")
def lm(tok):
    return tiny_causal_lm(tok, n_layer=2, n_embd=64, seed=1)
