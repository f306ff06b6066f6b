"""Process supervision in the RL trainers (issue 14): step rewards placed at the step-end tokens.

The losses by hand (each value worked out in the test's docstring), their reduction to the outcome forms with one
step per completion, `step_end_positions` against `split_steps` with a BPE tokenizer that merges the separator into
other tokens and byte-level tokens that split multi-byte characters."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from alignloop.losses import grpo_advantages, kl_penalty, ppo_rewards, rloo_advantages, sequence_kl_reward
from alignloop.losses.critic_free import (
    grpo_step_advantages,
    reinforce_step_advantages,
    reward_to_go,
    rloo_step_advantages,
    step_advantages_to_tokens,
    step_kl_rewards,
)
from alignloop.losses.ppo import place_step_rewards, ppo_process_rewards
from alignloop.rollout.steps import split_steps, step_end_positions

T = torch.tensor


def B(rows):
    return torch.tensor(rows, dtype=torch.bool)


# ---------------------------------------------------------------- placing step rewards, PPO's per-token rewards
def test_place_step_rewards_by_hand():
    """rewards [[0.5, −1]] ending at tokens [[1, 3]], T = 5 -> [[0, 0.5, 0, −1, 0]]; a padded step (mask False)
    adds nothing wherever its end points; two steps ending on one token add up: [[2, 3]] at [[2, 2]] -> 5 there."""
    assert torch.equal(place_step_rewards(T([[0.5, -1.0]]), B([[1, 1]]), T([[1, 3]]), 5),
                       T([[0.0, 0.5, 0.0, -1.0, 0.0]]))
    assert torch.equal(place_step_rewards(T([[0.5, 9.0]]), B([[1, 0]]), T([[1, 99]]), 3), T([[0.0, 0.5, 0.0]]))
    assert torch.equal(place_step_rewards(T([[2.0, 3.0]]), B([[1, 1]]), T([[2, 2]]), 3), T([[0.0, 0.0, 5.0]]))
    with pytest.raises(ValueError, match="outside"):
        place_step_rewards(T([[1.0]]), B([[1]]), T([[3]]), 3)


def test_ppo_process_rewards_by_hand():
    """β = 0.5, kl [[0.2, 0.2, 0.4, 0.0]], mask [[1, 1, 1, 0]], steps [[1, −1]] ending at tokens [[0, 2]]:
    non_score = −β·KL = [[−0.1, −0.1, −0.2, 0]]; rewards = non_score + 1 at token 0, −1 at token 2
    = [[0.9, −0.1, −1.2, 0]]. Σ rewards = (1 − 1) − 0.5·0.8 = −0.4."""
    rewards, non_score = ppo_process_rewards(T([[1.0, -1.0]]), B([[1, 1]]), T([[0, 2]]), T([[0.2, 0.2, 0.4, 0.0]]),
                                             B([[1, 1, 1, 0]]), 0.5)
    assert torch.allclose(non_score, T([[-0.1, -0.1, -0.2, 0.0]]))
    assert torch.allclose(rewards, T([[0.9, -0.1, -1.2, 0.0]]))
    assert math.isclose(rewards.sum().item(), -0.4, abs_tol=1e-6)
    with pytest.raises(ValueError, match="padding"):     # token 3 is padding
        ppo_process_rewards(T([[1.0]]), B([[1]]), T([[3]]), torch.zeros(1, 4), B([[1, 1, 1, 0]]), 0.5)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 5), st.integers(1, 7), st.floats(0.0, 2.0), st.integers(0, 10_000))
def test_ppo_process_rewards_with_one_step_at_the_last_token_is_the_outcome_form(b, t, beta, seed):
    """One step per row ending at its last real token, its reward = the score: exactly `ppo_rewards`."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    kl, scores = torch.randn(b, t, generator=g), torch.randn(b, generator=g)
    expected = ppo_rewards(scores, kl, mask, beta)
    got = ppo_process_rewards(scores[:, None], torch.ones(b, 1, dtype=torch.bool), (lengths - 1)[:, None], kl,
                              mask, beta)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


# ---------------------------------------------------------------- critic-free step advantages
def test_grpo_step_advantages_by_hand():
    """K = 2, eps = 0: completion 0's steps [1, 0], completion 1's [1] (its second slot padding). The group's step
    rewards {1, 0, 1}: mean 2/3, unbiased std √(((1/3)² + (2/3)² + (1/3)²)/2) = √(1/3) = 0.57735.
    GRPO: [[1/3, −2/3]/0.57735, [1/3, ·]/0.57735] = [[0.57735, −1.15470], [0.57735, 0]].
    Dr. GRPO (no std): [[1/3, −2/3], [1/3, 0]]."""
    r, m = T([[1.0, 0.0], [1.0, 7.0]]), B([[1, 1], [1, 0]])
    s = math.sqrt(1 / 3)
    assert torch.allclose(grpo_step_advantages(r, m, 2, "std", eps=0.0), T([[1 / 3 / s, -2 / 3 / s], [1 / 3 / s, 0]]))
    assert torch.allclose(grpo_step_advantages(r, m, 2, "none"), T([[1 / 3, -2 / 3], [1 / 3, 0.0]]))


def test_grpo_step_advantages_constant_or_single_step_group_is_zero():
    """A group whose real steps all have one reward, and a group with one real step in all, give exactly 0 (no NaN
    from std 0 or from n − 1 = 0); the other group is unaffected: [[2, 4]] | [[1, ·], [3, ·]] (K = 2, rows 2–3)."""
    r = T([[0.5, 0.5], [0.5, 0.0], [5.0, 0.0], [0.0, 0.0]])
    m = B([[1, 1], [1, 0], [1, 0], [0, 0]])
    a = grpo_step_advantages(r, m, 2, "std")
    assert torch.equal(a, torch.zeros(4, 2)) and not torch.isnan(a).any()


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), st.integers(2, 5), st.integers(0, 10_000), st.sampled_from(["std", "none"]))
def test_step_advantages_with_one_step_per_completion_are_the_outcome_advantages(groups, k, seed, scale):
    """One step per completion: the GRPO/Dr. GRPO and RLOO process forms equal `grpo_advantages` and
    `rloo_advantages` of the scores (to float32 rounding: the means are summed in another order)."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(groups * k, generator=g)
    one = torch.ones(groups * k, 1, dtype=torch.bool)
    assert torch.allclose(grpo_step_advantages(scores[:, None], one, k, scale)[:, 0],
                          grpo_advantages(scores, k, scale), atol=1e-5)
    assert torch.allclose(rloo_step_advantages(scores[:, None], one, k)[:, 0], rloo_advantages(scores, k), atol=1e-5)


def test_rloo_step_advantages_by_hand():
    """K = 2: completion 0's steps [1, 0], completion 1's [1]. Baselines: b_0 = mean of completion 1's steps = 1,
    b_1 = mean of completion 0's steps = (1 + 0)/2 = 0.5 -> A = [[0, −1], [0.5, 0]].
    K = 3, steps [[2], [4, 0], [1]]: b = [(4 + 0 + 1)/3, (2 + 1)/2, (2 + 4 + 0)/3] = [5/3, 3/2, 2]
    -> A = [[1/3, 0], [2.5, −1.5], [−1, 0]]. (A baseline from the step's own completion, e.g. the group's pooled mean
    3/2 for K = 2, would give [[−0.5, −1.5], [0.5, 0]]: must not.)"""
    assert torch.allclose(rloo_step_advantages(T([[1.0, 0.0], [1.0, 0.0]]), B([[1, 1], [1, 0]]), 2),
                          T([[0.0, -1.0], [0.5, 0.0]]))
    assert torch.allclose(rloo_step_advantages(T([[2.0, 0.0], [4.0, 0.0], [1.0, 0.0]]), B([[1, 0], [1, 1], [1, 0]]), 3),
                          T([[1 / 3, 0.0], [2.5, -1.5], [-1.0, 0.0]]))


def test_rloo_step_advantages_without_other_steps_are_zero():
    """Completion 1 has no step: completion 0 has no baseline (0 advantage); completion 1's baseline is completion
    0's mean 2 but it has no step to get an advantage. K = 2: [[3, 1], [·, ·]] -> zeros."""
    a = rloo_step_advantages(T([[3.0, 1.0], [0.0, 0.0]]), B([[1, 1], [0, 0]]), 2)
    assert torch.equal(a, torch.zeros(2, 2))


def test_reinforce_step_advantages_by_hand():
    """steps [[1, 0], [2, pad]], baseline 0.5 -> [[0.5, −0.5], [1.5, 0]]; the baseline is detached."""
    b = T(0.5, requires_grad=True)
    r = T([[1.0, 0.0], [2.0, 9.0]], requires_grad=True)
    a = reinforce_step_advantages(r, B([[1, 1], [1, 0]]), b)
    assert torch.equal(a, T([[0.5, -0.5], [1.5, 0.0]]))
    a.sum().backward()
    assert torch.equal(r.grad, T([[1.0, 1.0], [1.0, 0.0]])) and b.grad is None


def test_reward_to_go_and_token_advantages_by_hand():
    """reward_to_go([[1, 0, 2, 5]], mask [[1, 1, 1, 0]]) = [[1+0+2, 0+2, 2, 0]] = [[3, 2, 2, 0]] (padding never
    counts). Step advantages [[0.5, −1]] ending at tokens [[1, 3]] of 5 real tokens: tokens 0–1 get 0.5 − 1 = −0.5,
    tokens 2–3 get −1, token 4 (after the last step) 0 -> [[−0.5, −0.5, −1, −1, 0]]."""
    assert torch.equal(reward_to_go(T([[1.0, 0.0, 2.0, 5.0]]), B([[1, 1, 1, 0]])), T([[3.0, 2.0, 2.0, 0.0]]))
    assert torch.equal(step_advantages_to_tokens(T([[0.5, -1.0]]), B([[1, 1]]), T([[1, 3]]), torch.ones(1, 5).bool()),
                       T([[-0.5, -0.5, -1.0, -1.0, 0.0]]))


def test_process_grpo_token_advantages_by_hand():
    """DeepSeekMath §4.1.3 end to end, K = 2, eps = 0. Completion 0: 5 tokens, steps [1, 0] ending at tokens 1 and 4;
    completion 1: 3 real tokens (2 padding), one step [1] ending at token 2. Normalised (above): [[0.57735,
    −1.15470], [0.57735]]. Token advantages: completion 0 [0.577 − 1.155 (×2), −1.155 (×3)] =
    [−0.57735, −0.57735, −1.15470, −1.15470, −1.15470]; completion 1 [0.57735 ×3, 0, 0]."""
    r, m, ends = T([[1.0, 0.0], [1.0, 0.0]]), B([[1, 1], [1, 0]]), T([[1, 4], [2, 0]])
    mask = B([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    a = step_advantages_to_tokens(grpo_step_advantages(r, m, 2, eps=0.0), m, ends, mask)
    s = math.sqrt(1 / 3)
    hi, lo = 1 / 3 / s, -2 / 3 / s
    assert torch.allclose(a, T([[hi + lo, hi + lo, lo, lo, lo], [hi, hi, hi, 0.0, 0.0]]))


def test_step_kl_rewards_by_hand():
    """β = 0.5, kl [[0.2, 0.2, 0.4, 1.0]], mask [[1, 1, 1, 0]], steps [[1, −1]] ending at tokens [[0, 2]]: step 0
    owns token 0 (KL 0.2), step 1 tokens 1–2 (KL 0.6; the padding's 1.0 never counts) -> [[1 − 0.1, −1 − 0.3]]
    = [[0.9, −1.3]]."""
    got = step_kl_rewards(T([[1.0, -1.0]]), B([[1, 1]]), T([[0, 2]]), T([[0.2, 0.2, 0.4, 1.0]]), B([[1, 1, 1, 0]]),
                          0.5)
    assert torch.allclose(got, T([[0.9, -1.3]]))


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 5), st.integers(1, 7), st.floats(0.0, 2.0), st.integers(0, 10_000))
def test_step_kl_rewards_with_one_step_at_the_last_token_is_the_sequence_form(b, t, beta, seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    kl = kl_penalty(torch.randn(b, t, generator=g), torch.randn(b, t, generator=g), "k3")
    scores = torch.randn(b, generator=g)
    got = step_kl_rewards(scores[:, None], torch.ones(b, 1, dtype=torch.bool), (lengths - 1)[:, None], kl, mask, beta)
    assert torch.allclose(got[:, 0], sequence_kl_reward(scores, kl, mask, beta), atol=1e-5)


# ---------------------------------------------------------------- step_end_positions
@pytest.fixture(scope="module")
def merging_tok():
    """A byte-level BPE trained WITHOUT the pre-tokenizer's word split, so merges cross the separator: ".\\n",
    "d\\n", even whole lines such as "x = 3 + 4.\\n\\nthen 7 * 2 = " become single tokens."""
    corpus = ["x = 3 + 4.\n\nthen 7 * 2 = 14.\nso ab\ncd\n"] * 40 + ["a.\nb.\n\nc.\n"] * 40
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<pad>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>",
                                   unk_token="<unk>")


def _ids(tok, pieces):
    """Token ids of byte-level token strings ("Ċ" is "\\n"; "Ã", "©" are the two bytes of "é")."""
    ids = tok.convert_tokens_to_ids(pieces)
    assert tok.unk_token_id not in ids, pieces
    return ids


def test_step_end_positions_by_hand(merging_tok):
    """Tokens ["a", "b", "Ċ", "Ċ", "c", "dĊ", "e", <eos>] = "ab\\n\\ncd\\ne": steps ["ab", "cd", "e"]. "ab" ends at its
    separator, token 2 (token 3 is an empty piece); "cd" at the merged "dĊ", token 5; "e" has no separator: the last
    token, the EOS, 7. With the separator merged into a token that ends a line and starts the next, ".Ċ" ...:
    ["a", ".Ċ", "b", ".Ċ"] -> steps ["a.", "b."] ending at [1, 3]."""
    tok = merging_tok
    ids = _ids(tok, ["a", "b", "Ċ", "Ċ", "c", "dĊ", "e"]) + [tok.eos_token_id]
    assert split_steps(tok.decode(ids, skip_special_tokens=True)) == ["ab", "cd", "e"]
    assert step_end_positions(ids, tok) == [2, 5, 7]
    assert step_end_positions(_ids(tok, ["a", ".Ċ", "b", ".Ċ"]), tok) == [1, 3]
    assert step_end_positions(torch.tensor(_ids(tok, ["a", ".Ċ", "b", ".Ċ"])), tok) == [1, 3]   # a tensor row too
    assert step_end_positions([], tok) == [] and step_end_positions(_ids(tok, ["Ċ", "Ċ"]), tok) == []


def test_step_end_positions_with_split_multibyte_characters(merging_tok):
    """"é" as its two bytes "Ã" "©" and the separator after it: "aé\\nbé" = ["a", "Ã", "©", "Ċ", "b", "Ã", "©"].
    Step "aé" ends at "Ċ" (3); "bé" has no separator: the last token (6), whose byte completes the character (a
    prefix ending at "Ã" decodes to "b\\ufffd", not "bé")."""
    tok = merging_tok
    ids = _ids(tok, ["a", "Ã", "©", "Ċ", "b", "Ã", "©"])
    assert tok.decode(ids) == "aé\nbé"
    assert step_end_positions(ids, tok) == [3, 6]
    # another separator: Math-Shepherd's " ки" (Cyrillic, 2 bytes a letter), split over byte tokens
    ids = tok(" x = 1 ки y = 2 ки", add_special_tokens=False)["input_ids"]
    ends = step_end_positions(ids, tok, separator=" ки")
    text = tok.decode(ids)
    assert len(ends) == 2 and ends[-1] == len(ids) - 1
    assert tok.decode(ids[:ends[0] + 1]).startswith(" x = 1 ки") and not tok.decode(ids[:ends[0]]).startswith(
        " x = 1 ки") and text.count(" ки") == 2


def _check_agrees_with_split_steps(tok, ids, separator="\n"):
    """What "agrees with split_steps" means: one end per step of the decoded text; a step with a separator ends at
    the FIRST token whose prefix decodes through that separator's last character; a final step without one ends at
    the last token."""
    text = tok.decode(ids, skip_special_tokens=True)
    steps = split_steps(text, separator)
    ends = step_end_positions(ids, tok, separator)
    assert len(ends) == len(steps)
    assert ends == sorted(ends)
    cursor = 0
    for step, end in zip(steps, ends, strict=True):
        start = text.index(step, cursor)
        sep = text.find(separator, start + len(step))
        if sep < 0:
            assert end == len(ids) - 1
            break
        through = text[:sep + len(separator)]
        assert tok.decode(ids[:end + 1], skip_special_tokens=True).startswith(through)
        assert end == 0 or not tok.decode(ids[:end], skip_special_tokens=True).startswith(through)
        cursor = sep + len(separator)


ALPHABET = ["a", "b", "c", "d", ".", " ", "\n", "\n", "é", "→", "🙂", "x = 3", "14.\n"]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(ALPHABET), min_size=0, max_size=25), st.booleans(), st.booleans())
def test_step_end_positions_agree_with_split_steps(merging_tok, pieces, as_bytes, eos):
    """Random texts of letters, spaces, separators, multi-byte characters (é: 2 bytes, →: 3, 🙂: 4): tokenised by the
    BPE (merges across the separator) or byte by byte (every multi-byte character split), with or without a final
    EOS."""
    tok = merging_tok
    text = "".join(pieces)
    if as_bytes:   # one token per byte: the byte-level alphabet's characters of the text
        byte_chars = [c for w, _ in tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text) for c in w]
        ids = _ids(tok, byte_chars) if text else []
    else:
        ids = tok(text, add_special_tokens=False)["input_ids"]
    if eos:
        ids = ids + [tok.eos_token_id]
    assert tok.decode(ids, skip_special_tokens=True) == text
    _check_agrees_with_split_steps(tok, ids)
