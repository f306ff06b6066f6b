"""Fixtures: tiny GPT-2 checkpoints built locally (never downloaded), shared by the models tests."""
from __future__ import annotations

import pytest
import torch

from alignloop.models import tiny

SHAPE = dict(n_layer=2, n_embd=32, n_head=2, n_positions=64)


@pytest.fixture(scope="session")
def corpus():
    return tiny.default_corpus(300)


@pytest.fixture(scope="session")
def tok(corpus):
    return tiny.train_tokenizer(corpus, vocab_size=300)


@pytest.fixture(scope="session")
def tok_eos_pad(corpus):
    return tiny.train_tokenizer(corpus, vocab_size=300, pad_equals_eos=True)


@pytest.fixture(scope="session")
def lm_dir(tmp_path_factory, tok):
    return tiny.build_tiny_checkpoint(tmp_path_factory.mktemp("lm") / "lm", tokenizer=tok, **SHAPE)


@pytest.fixture(scope="session")
def reward_dir(tmp_path_factory, tok):
    return tiny.build_tiny_checkpoint(tmp_path_factory.mktemp("rm") / "rm", tokenizer=tok, kind="reward", seed=1,
                                      **SHAPE)


@pytest.fixture(scope="session")
def classifier_dir(tmp_path_factory, tok):
    return tiny.build_tiny_checkpoint(tmp_path_factory.mktemp("clf") / "clf", tokenizer=tok, kind="classifier",
                                      seed=2, num_labels=3, id2label={0: "hate", 1: "not hate", 2: "offensive"},
                                      **SHAPE)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _pad_batch(seqs: list[list[int]], pad_id: int, side: str = "right"):
    """Pad token-id lists by hand -> (input_ids, attention_mask)."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        if side == "right":
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
        else:
            ids[i, T - len(s):] = torch.tensor(s)
            mask[i, T - len(s):] = 1
    return ids, mask


@pytest.fixture
def pad_batch():
    return _pad_batch
