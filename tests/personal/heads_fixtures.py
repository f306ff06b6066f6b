"""Tiny multi-head reward models (random GPT-2 sequence classifiers saved in the format of
`alignloop.models.reward`: one output per head, `config.alignloop_heads`) and a reward function that records the
prompts it is given, for the scoring and personalized-policy tests. Nothing is downloaded."""
from __future__ import annotations

import json
from pathlib import Path

from alignloop.models.tiny import tiny_sequence_classifier

SEEN_PROMPTS: list[str] = []   # every prompt `recording_reward` was asked to score, in order


def recording_reward(prompts, completions):
    """0.0 for every completion; remembers the prompts (to check what a scorer passes on)."""
    SEEN_PROMPTS.extend(prompts)
    return [0.0] * len(completions)


def build_heads_model(path, tok, heads=("helpful", "harmless"), population=None, by="criterion", seed=0,
                      profiles: dict | None = None) -> str:
    """A saved random multi-head reward model (`len(heads)` outputs), its tokenizer, and `profiles` written as
    user_profiles.json beside it when given."""
    model = tiny_sequence_classifier(tok, num_labels=len(heads), n_layer=1, n_embd=16, n_head=2, n_positions=128,
                                     seed=seed)
    model.config.id2label = dict(enumerate(heads))
    model.config.label2id = {h: i for i, h in enumerate(heads)}
    model.config.alignloop_heads = {"by": by, "names": list(heads), "population": population}
    path = Path(path)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    if profiles is not None:
        (path / "user_profiles.json").write_text(json.dumps(profiles))
    return str(path)
