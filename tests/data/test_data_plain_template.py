"""The plain chat format (`PLAIN_CHAT_TEMPLATE`, for tokenizers without a template of their own): a reply ends at
EOS, so a reward model trained on conversations reads its reward at the same token PPO / best-of-N / evaluation
score at (`reward_input_ids`), and the conversation's prefixes still render as prefixes."""
from __future__ import annotations

import copy

from alignloop.data import load_preferences, reward_input_ids, tokenize_preferences, write_rows
from alignloop.data.chat import (
    PLAIN_CHAT_TEMPLATE,
    assistant_spans,
    chat_stop_strings,
    ensure_chat_template,
    render_completion,
    render_prompt,
)

CHAT = [{"role": "user", "content": "good movie"}, {"role": "assistant", "content": "the plot"},
        {"role": "user", "content": "boring"}]


def _plain(tok):
    return ensure_chat_template(copy.deepcopy(tok))


def test_a_reply_ends_at_eos_and_prefixes_render_as_prefixes(plain_tok):
    tok = _plain(plain_tok)
    eos = tok.eos_token
    assert tok.chat_template == PLAIN_CHAT_TEMPLATE and chat_stop_strings(tok) == ("\n\nUser:",)
    prompt = render_prompt(CHAT, tok)
    assert prompt == f"User: good movie\n\nAssistant: the plot{eos}\n\nUser: boring\n\nAssistant:"
    assert render_completion(CHAT, [{"role": "assistant", "content": "fun"}], tok) == f" fun{eos}"
    assert render_prompt(CHAT[:1], tok) == "User: good movie\n\nAssistant:"
    start = prompt.index(" the plot")
    assert assistant_spans(CHAT, tok, prompt) == [(start, start + len(f" the plot{eos}"))]
    full = tok.apply_chat_template(CHAT + [{"role": "assistant", "content": "fun"}], tokenize=False)
    assert full.endswith(eos) and full.startswith(prompt)


def test_the_rm_trains_at_the_token_scoring_reads(plain_tok, tmp_path):
    """A conversation's preference pair, tokenised as the reward-model trainer does, is exactly the sequence the
    scorer builds from the rendered prompt and the sampled reply: both end at EOS (before: '<eos>\\n\\n')."""
    tok = _plain(plain_tok)
    row = {"prompt": CHAT, "chosen": [{"role": "assistant", "content": "this is"}],
           "rejected": [{"role": "assistant", "content": "a test"}], "margin": 1.0}
    groups, _ = load_preferences(str(write_rows([row], tmp_path / "pref.jsonl")), tokenizer=tok)
    (group,), _ = tokenize_preferences(groups, tok)
    pair = group["pairs"][0]
    prompt = render_prompt(CHAT, tok)
    chosen, rejected = reward_input_ids(tok, [prompt, prompt], [" this is", " a test"])
    assert pair["chosen_input_ids"][-1] == tok.eos_token_id
    assert pair["chosen_input_ids"] == chosen
    assert pair["rejected_input_ids"] == rejected
