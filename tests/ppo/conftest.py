import pytest

from alignloop.models.tiny import default_corpus, tiny_causal_lm, train_tokenizer

TARGET_TOKENS = ["Ġg", "ood", "Ġth", "e", "Ġa", "Ġm", "ov", "i"]


@pytest.fixture(scope="session")
def tok():
    return train_tokenizer(vocab_size=300)


@pytest.fixture(scope="session")
def tok_pad_eos():
    return train_tokenizer(vocab_size=300, pad_equals_eos=True)


@pytest.fixture(scope="session")
def prompts():
    # mixed lengths -> left padding in every batch
    return [" ".join(s.split()[: 1 + i % 6]) for i, s in enumerate(default_corpus(64, seed=1))]


def make_target_reward(tok):
    """A reward that is a known function of the text: the share of response tokens that are target tokens."""
    target = set(tok.convert_tokens_to_ids(TARGET_TOKENS))

    def reward(prompts, responses):
        out = []
        for r in responses:
            ids = tok(r)["input_ids"]
            out.append(sum(i in target for i in ids) / max(len(ids), 1))
        return out

    return reward


def small_lm(tok, seed=0):
    return tiny_causal_lm(tok, n_layer=1, n_embd=32, seed=seed)
