import json
import random

import pytest
import torch

from alignloop.models.tiny import build_tiny_checkpoint, default_corpus, train_tokenizer

WORDS = "good bad great awful movie film plot actor scene love hate boring fun the a and is was it this that".split()


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)  # tests share 2 cores; small models do not gain from more


@pytest.fixture(scope="session")
def tiny_tok():
    return train_tokenizer(default_corpus(400), vocab_size=300)


@pytest.fixture(scope="session")
def base_model(tmp_path_factory, tiny_tok):
    return str(build_tiny_checkpoint(tmp_path_factory.mktemp("base"), tokenizer=tiny_tok, n_layer=2, n_embd=32, n_head=2))


@pytest.fixture(scope="session")
def dropout_model(tmp_path_factory, tiny_tok):
    from alignloop.models.tiny import tiny_causal_lm

    path = tmp_path_factory.mktemp("dropout")
    m = tiny_causal_lm(tiny_tok, n_layer=2, n_embd=32, n_head=2, dropout=0.1)
    m.save_pretrained(path)
    tiny_tok.save_pretrained(path)
    return str(path)


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def sft_rows(n, seed):
    """A learnable SFT task: the completion repeats the word named in the prompt three times."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        w = rng.choice(["good", "bad", "fun", "plot", "love"])
        rows.append({"prompt": f"{rng.choice(WORDS)} say {w}:", "completion": f" {w} {w} {w}"})
    return rows


@pytest.fixture(scope="session")
def sft_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("sft") / "sft.jsonl", sft_rows(240, 0))


@pytest.fixture(scope="session")
def sft_heldout(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("sft_eval") / "eval.jsonl", sft_rows(60, 1))


def preference_rows(n, seed):
    """Chosen completions contain 'great' 1-3 times, rejected ones never: a learnable signal."""
    rng = random.Random(seed)
    sent = lambda k: [rng.choice([w for w in WORDS if w != "great"]) for _ in range(k)]
    rows = []
    for _ in range(n):
        c = sent(8)
        for j in rng.sample(range(8), rng.randint(1, 3)):
            c[j] = "great"
        rows.append({"prompt": " ".join(sent(4)), "chosen": " " + " ".join(c), "rejected": " " + " ".join(sent(8))})
    return rows


@pytest.fixture(scope="session")
def pref_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("pref")
    return write_jsonl(d / "train.jsonl", preference_rows(240, 0)), write_jsonl(d / "eval.jsonl", preference_rows(100, 1))
