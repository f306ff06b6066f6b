import pytest

from alignloop.models.tiny import SIMPLE_CHAT_TEMPLATE, default_corpus, train_tokenizer


@pytest.fixture(scope="session")
def chat_tok():
    """A tiny local BPE tokenizer with a chat template."""
    return train_tokenizer(default_corpus(300), vocab_size=300, chat_template=SIMPLE_CHAT_TEMPLATE)


@pytest.fixture(scope="session")
def plain_tok():
    """The same kind of tokenizer without a chat template."""
    return train_tokenizer(default_corpus(300), vocab_size=300)
