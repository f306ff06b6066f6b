import pytest
import torch
from trainer_data import preference_rows, sft_rows, write_jsonl

from alignloop.models.tiny import build_tiny_checkpoint, default_corpus, train_tokenizer


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)  # tests share 2 cores; small models do not gain from more


@pytest.fixture(scope="session")
def tiny_tok():
    return train_tokenizer(default_corpus(400), vocab_size=300)


@pytest.fixture(scope="session")
def base_model(tmp_path_factory, tiny_tok):
    return str(build_tiny_checkpoint(tmp_path_factory.mktemp("base"), tokenizer=tiny_tok, n_layer=2, n_embd=32,
                                     n_head=2))


@pytest.fixture(scope="session")
def dropout_model(tmp_path_factory, tiny_tok):
    from alignloop.models.tiny import tiny_causal_lm

    path = tmp_path_factory.mktemp("dropout")
    m = tiny_causal_lm(tiny_tok, n_layer=2, n_embd=32, n_head=2, dropout=0.1)
    m.save_pretrained(path)
    tiny_tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def sft_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("sft") / "sft.jsonl", sft_rows(240, 0))


@pytest.fixture(scope="session")
def sft_heldout(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("sft_eval") / "eval.jsonl", sft_rows(60, 1))


@pytest.fixture(scope="session")
def pref_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("pref")
    return (write_jsonl(d / "train.jsonl", preference_rows(240, 0)),
            write_jsonl(d / "eval.jsonl", preference_rows(100, 1)))
