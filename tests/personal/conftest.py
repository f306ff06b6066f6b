import pytest
import torch

from alignloop.models.tiny import build_tiny_checkpoint, default_corpus, train_tokenizer


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)  # tests share 2 cores; small models do not gain from more


@pytest.fixture(scope="session")
def tiny_tok():
    return train_tokenizer(default_corpus(400), vocab_size=300)


@pytest.fixture(scope="session")
def base_model(tmp_path_factory, tiny_tok):
    """A random-init GPT-2-shaped causal LM and its tokenizer, built locally (never a download)."""
    return str(build_tiny_checkpoint(tmp_path_factory.mktemp("base"), tokenizer=tiny_tok, n_layer=2, n_embd=32,
                                     n_head=2))
