"""Tiny random models with a locally trained tokenizer, for tests, examples and benchmarks.

Nothing here downloads anything: the tokenizer is a byte-level BPE trained on a corpus passed in (or a small
built-in one), and the models are GPT-2-shaped with random weights from a config.

    tok = train_tokenizer(corpus, vocab_size=300)
    lm = tiny_causal_lm(tok, n_layer=2, n_embd=64)          # AutoModelForCausalLM-compatible
    path = build_tiny_checkpoint(tmp_path / "policy", corpus)  # a folder that from_pretrained() loads
    rm_path = build_tiny_checkpoint(tmp_path / "rm", corpus, kind="reward")  # num_labels=1, reward-head init
    clf_path = build_tiny_checkpoint(tmp_path / "clf", corpus, kind="classifier", num_labels=2,
                                     id2label={0: "hate", 1: "nothate"})
"""
from __future__ import annotations

import os
import random
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, PreTrainedTokenizerFast

from alignloop.models.value_head import init_reward_head

EOS = "<|endoftext|>"
PAD = "<pad>"
UNK = "<unk>"

_WORDS = ("good bad great awful movie film plot actor scene love hate boring fun the a and is was it this that "
          "very not really story ending music").split()


def default_corpus(n: int = 2000, seed: int = 0) -> list[str]:
    """A small deterministic word-salad corpus (the peer workloads' vocabulary)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(5, 30))) for _ in range(n)]


def train_tokenizer(corpus: Iterable[str] | None = None, vocab_size: int = 500, pad_equals_eos: bool = False,
                    chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer locally. `<|endoftext|>` is EOS (and BOS); the pad token is `<pad>`,
    or EOS itself when `pad_equals_eos` (to test tokenizers that have no pad token of their own)."""

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(list(corpus if corpus is not None else default_corpus()), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS, PAD, UNK], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=UNK,
                                 pad_token=EOS if pad_equals_eos else PAD)
    if chat_template is not None:
        hf.chat_template = chat_template
    return hf


# A minimal chat template, so conversational data can be tested without a downloaded tokenizer.
SIMPLE_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def _config(tok: PreTrainedTokenizerFast, n_layer: int, n_embd: int, n_head: int, n_positions: int,
            **extra) -> GPT2Config:
    return GPT2Config(vocab_size=len(tok), n_positions=n_positions, n_layer=n_layer, n_embd=n_embd, n_head=n_head,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id,
                      **extra)


def tiny_causal_lm(tok: PreTrainedTokenizerFast, n_layer: int = 2, n_embd: int = 64, n_head: int = 4,
                   n_positions: int = 256, seed: int = 0, dropout: float = 0.0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = _config(tok, n_layer, n_embd, n_head, n_positions, resid_pdrop=dropout, embd_pdrop=dropout,
                  attn_pdrop=dropout)
    return GPT2LMHeadModel(cfg)


def tiny_sequence_classifier(tok: PreTrainedTokenizerFast, num_labels: int = 1, n_layer: int = 2, n_embd: int = 64,
                             n_head: int = 4, n_positions: int = 256, seed: int = 0,
                             dropout: float = 0.0) -> GPT2ForSequenceClassification:
    torch.manual_seed(seed)
    return GPT2ForSequenceClassification(_config(tok, n_layer, n_embd, n_head, n_positions, num_labels=num_labels,
                                                 resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                                                 summary_first_dropout=dropout))


def tiny_reward_model(tok: PreTrainedTokenizerFast, n_layer: int = 2, n_embd: int = 64, n_head: int = 4,
                      n_positions: int = 256, seed: int = 0, dropout: float = 0.0) -> GPT2ForSequenceClassification:
    """A GPT-2 sequence classifier with num_labels=1 and the reward-head init N(0, 1/sqrt(n_embd+1))."""

    model = tiny_sequence_classifier(tok, num_labels=1, n_layer=n_layer, n_embd=n_embd, n_head=n_head,
                                     n_positions=n_positions, seed=seed, dropout=dropout)
    init_reward_head(model.score, n_embd)
    return model


def build_tiny_checkpoint(path: str | os.PathLike, corpus: Iterable[str] | None = None, kind: str = "causal_lm",
                          vocab_size: int = 500, seed: int = 0, tokenizer: PreTrainedTokenizerFast | None = None,
                          **shape) -> Path:
    """Write a `save_pretrained` folder (model + tokenizer) that transformers' Auto classes load.
    kind: "causal_lm", "classifier" (num_labels in shape, default 1; id2label/label2id too) or "reward" (a
    classifier with num_labels=1 and the reward-head init)."""
    path = Path(path)
    tok = tokenizer if tokenizer is not None else train_tokenizer(corpus, vocab_size=vocab_size)
    if kind == "causal_lm":
        model = tiny_causal_lm(tok, seed=seed, **shape)
    elif kind == "classifier":
        id2label = shape.pop("id2label", None)
        model = tiny_sequence_classifier(tok, seed=seed, **shape)
        if id2label is not None:
            model.config.id2label = {int(k): v for k, v in dict(id2label).items()}
            model.config.label2id = {v: int(k) for k, v in dict(id2label).items()}
    elif kind == "reward":
        model = tiny_reward_model(tok, seed=seed, **shape)
    else:
        raise ValueError(f"kind must be 'causal_lm', 'classifier' or 'reward', got {kind!r}")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
