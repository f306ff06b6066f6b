"""Process supervision in the RL trainers (issue 14): step rewards placed at the step-end tokens.

The losses by hand (each value worked out in the test's docstring), their reduction to the outcome forms with one
step per completion, `step_end_positions` against `split_steps` with a BPE tokenizer that merges the separator into
other tokens and byte-level tokens that split multi-byte characters."""
from __future__ import annotations

import copy
import json
import math
import random

import pytest
import torch
import yaml
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from alignloop.cli import cli
from alignloop.errors import ConfigError, UserError
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
from alignloop.models import load_tokenizer
from alignloop.models.prm import build_prm
from alignloop.models.tiny import build_tiny_checkpoint, tiny_causal_lm, tiny_reward_model, train_tokenizer
from alignloop.rollout.steps import split_steps, step_end_positions
from alignloop.scoring import FunctionScorer, ProcessScorer
from alignloop.trainers.grpo import GRPOConfig, GRPOTrainer
from alignloop.trainers.ppo import PPOConfig, PPOTrainer

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


# ---------------------------------------------------------------- the trainers in process mode
WORDS = ["good", "bad", "the", "movie", "plot", "fun"]
PROMPT = "list:\n"


def good_steps(prompts, step_lists):
    """The toy task's rule-based step verifier (a `module:function` step function): a step is good (1.0) when it
    contains the word "good", else 0.0."""
    return [[1.0 if "good" in step else 0.0 for step in steps] for steps in step_lists]


def _corpus(n=400, seed=0):
    """Solutions of 2-4 steps ("list:\\n" then lines of two words), a step good by chance 1 − (5/6)² ≈ 31%."""
    rng = random.Random(seed)
    return [PROMPT + "".join(" ".join(rng.choice(WORDS) for _ in range(2)) + "\n" for _ in range(rng.randint(2, 4)))
            for _ in range(n)]


@pytest.fixture(scope="module")
def step_tok():
    tok = train_tokenizer(_corpus(), vocab_size=300)
    tok.padding_side = "left"
    return tok


@pytest.fixture(scope="module")
def step_policy(step_tok):
    """A 1-layer policy taught (80 Adam steps, < 1 s) to write lines of two words: responses of several steps."""
    tok = step_tok
    lm = tiny_causal_lm(tok, n_layer=1, n_embd=32, seed=0)
    opt = torch.optim.Adam(lm.parameters(), lr=3e-3)
    corpus = _corpus()
    tok.padding_side = "right"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # tiny ops: a second thread only waits (9 s instead of 1 s on 2 busy cores)
    try:
        for step in range(80):
            enc = tok([corpus[(step * 16 + i) % len(corpus)] + tok.eos_token for i in range(16)], return_tensors="pt",
                      padding=True)
            lm(**enc, labels=enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)).loss.backward()
            opt.step()
            opt.zero_grad()
    finally:
        tok.padding_side = "left"
        torch.set_num_threads(threads)
    return lm.eval()


def _common(tmp_path, **kw):
    return {"output_dir": str(tmp_path), "total_updates": 1, "rollout_batch_size": 16, "max_new_tokens": 12,
            "learning_rate": 3e-3, "lr_scheduler": "constant", "progress": False, "save_final": False,
            "tensorboard": False, "sample_every": 0, "seed": 0, "reward_granularity": "process", "kl_coef": 0.01,
            "cpu_threads": 1, **kw}


def _ppo(tmp_path, tok, policy, reward=good_steps, **kw):
    seen = []
    tr = PPOTrainer(model=copy.deepcopy(policy), reward=reward, args=PPOConfig(**_common(tmp_path, **kw)),
                    train_dataset=[PROMPT] * 8, tokenizer=tok, callbacks=[seen.append])
    return tr, tr.train(), seen


def _grpo(tmp_path, tok, policy, reward=good_steps, **kw):
    seen = []
    args = GRPOConfig(**_common(tmp_path, **{"rollout_batch_size": 4, "num_generations": 4, "estimator": "rloo",
                                             **kw}))
    tr = GRPOTrainer(model=copy.deepcopy(policy), reward=reward, args=args, train_dataset=[PROMPT] * 8,
                     tokenizer=tok, callbacks=[seen.append])
    return tr, tr.train(), seen


def _row_steps(exp, tok, b):
    """Row b's real response ids, its steps (split_steps of its text) and where the trainer should put their rewards:
    each step's end token, the last step's moved to the last real token."""
    ids = exp.rollout.response_ids[b][exp.rollout.response_mask[b]].tolist()
    steps = split_steps(exp.responses[b])
    ends = step_end_positions(ids, tok)
    if ends:
        ends[-1] = len(ids) - 1
    return ids, steps, ends


def test_ppo_process_rewards_sit_on_the_step_end_tokens(tmp_path, step_tok, step_policy):
    """One PPO update in process mode: the step scores are the step function's on `split_steps` of each response;
    rewards − non_score_rewards is 1.0 exactly at the end token of each step containing "good" (the last step's on
    the last real token), 0 elsewhere; the logged step metrics are their means."""
    tok = step_tok
    _, h, seen = _ppo(tmp_path, tok, step_policy)
    exp = seen[0]
    n_steps, n_good, multi = 0, 0, 0
    for b in range(len(exp.responses)):
        ids, steps, ends = _row_steps(exp, tok, b)
        assert exp.steps.scores[b] == good_steps(None, [steps])[0]
        placed = (exp.rewards - exp.non_score_rewards)[b]
        expected = torch.zeros_like(placed)
        for step, end in zip(steps, ends, strict=True):
            expected[end] += 1.0 if "good" in step else 0.0
        if not steps:   # no step: the outcome score (a step function's: 0) on the last token
            expected[len(ids) - 1] += exp.scores[b]
        assert torch.allclose(placed, expected), (b, exp.responses[b])
        n_steps, n_good = n_steps + len(steps), n_good + sum("good" in s for s in steps)
        multi += len(steps) > 1
    assert multi >= 8                      # the toy policy writes several steps: the placement is really tested
    assert math.isclose(h[0]["reward/steps_mean"], n_good / n_steps, abs_tol=1e-6)
    assert math.isclose(h[0]["reward/steps_per_response"], n_steps / 16, abs_tol=1e-6)
    assert torch.allclose(exp.scores, exp.steps.totals()) and math.isclose(h[0]["reward/mean"],
                                                                            exp.scores.mean().item(), abs_tol=1e-6)


def _rloo_token_advantages_by_loops(exp, tok, beta, K):
    """RLOO's process form written out with Python loops: each step's reward minus β·Σ KL of its tokens (from the
    previous step's end + 1 to its own end); its baseline the mean of the other K − 1 completions' step rewards;
    a token's advantage the sum over the steps ending at or after it."""
    rows = []
    for b in range(len(exp.responses)):
        ids, steps, ends = _row_steps(exp, tok, b)
        scores = [1.0 if "good" in s else 0.0 for s in steps] or [float(exp.scores[b])]
        ends = ends or [len(ids) - 1]
        kl = exp.kl[b].tolist()
        rewards, start = [], 0
        for r, e in zip(scores, ends, strict=True):
            rewards.append(r - beta * sum(kl[start:e + 1]))
            start = e + 1
        rows.append((len(ids), rewards, ends))
    out = torch.zeros_like(exp.kl)
    for b, (n, rewards, ends) in enumerate(rows):
        g = b // K
        others = [r for o in range(g * K, g * K + K) if o != b for r in rows[o][1]]
        base = sum(others) / len(others)
        for t in range(n):
            out[b, t] = sum(r - base for r, e in zip(rewards, ends, strict=True) if e >= t)
    return out


def test_rloo_process_advantages_match_the_definition_worked_with_loops(tmp_path, step_tok, step_policy):
    _, h, seen = _grpo(tmp_path, step_tok, step_policy, kl_coef=0.5)
    exp = seen[0]
    assert exp.advantages.shape == exp.kl.shape
    assert torch.allclose(exp.advantages, _rloo_token_advantages_by_loops(exp, step_tok, 0.5, 4), atol=1e-5)
    assert "reward/steps_mean" in h[0] and "reward/steps_per_response" in h[0]


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "reinforce"])
def test_other_estimators_run_in_process_mode(tmp_path, step_tok, step_policy, estimator):
    """GRPO's token advantages are the group-normalised step rewards summed from each token on (the estimators'
    by-hand values are in the loss tests above); every estimator's update runs and logs finite numbers."""
    _, h, seen = _grpo(tmp_path, step_tok, step_policy, estimator=estimator, total_updates=2)
    exp = seen[0]
    if estimator == "grpo":
        adv = step_advantages_to_tokens(grpo_step_advantages(exp.steps.rewards, exp.steps.mask, 4),
                                        exp.steps.mask, exp.steps.ends, exp.response_mask)
        assert torch.allclose(exp.advantages, adv, atol=1e-6)
    assert all(math.isfinite(v) for m in h for v in m.values())


@pytest.mark.parametrize("estimator", ["rloo", "grpo"])
def test_one_step_per_response_gives_the_outcome_run(tmp_path, step_tok, estimator):
    """Responses stopped at their first newline have one step each (ending on their last token): a step function
    giving that step the outcome reward's score yields the outcome run's advantages on every real token, and the
    same weights after the update."""
    tok = step_tok

    def outcome(prompts, responses):
        return [float(r.count("good")) for r in responses]

    def one_step(prompts, step_lists):
        return [[float(s[0].count("good"))] if s else [] for s in step_lists]

    policy = tiny_causal_lm(tok, n_layer=1, n_embd=32, seed=1)
    runs = {}
    for granularity, reward in (("outcome", outcome), ("process", one_step)):
        tr, _, seen = _grpo(tmp_path / granularity, tok, policy, reward=reward, estimator=estimator,
                            reward_granularity=granularity, stop_strings=["\n"], kl_coef=0.2)
        runs[granularity] = (seen[0], torch.cat([p.detach().flatten() for p in tr.model.parameters()]))
    (o, w_o), (p, w_p) = runs["outcome"], runs["process"]
    assert torch.equal(o.rollout.response_ids, p.rollout.response_ids)
    assert all(len(split_steps(r)) <= 1 for r in p.responses)
    assert torch.allclose(p.advantages, o.advantages[:, None] * o.response_mask, atol=1e-5)
    assert torch.allclose(w_o, w_p, atol=1e-6)


@pytest.mark.parametrize("trainer", ["ppo", "rloo"])
def test_process_supervision_raises_the_step_reward(tmp_path, step_tok, step_policy, trainer):
    """15 updates on the toy task (steps good when they contain "good"): the mean step reward rises from the
    policy's chance level (~0.3) to above 0.8 (seen: PPO 0.42 -> 0.92 averaged over the first and last 3 updates,
    RLOO 0.34 -> 0.95; about 1 s each on one thread). RLOO's process form subtracts the mean step reward from every
    step, so its responses also get shorter (fewer steps); PPO's undiscounted sum of 0/1 rewards does not."""
    run = _ppo if trainer == "ppo" else _grpo
    kw = {"num_ppo_epochs": 2} if trainer == "ppo" else {}
    _, h, _ = run(tmp_path, step_tok, step_policy, total_updates=15, **kw)
    start = sum(m["reward/steps_mean"] for m in h[:3]) / 3
    end = sum(m["reward/steps_mean"] for m in h[-3:]) / 3
    print(trainer, [round(m["reward/steps_mean"], 2) for m in h], [round(m["reward/steps_per_response"], 1) for m in h])
    assert start < 0.5 and end > 0.8 and end > start + 0.3


def test_process_mode_rejects_a_reward_that_cannot_score_steps(tmp_path, step_tok, step_policy):
    """A sequence reward (a reward model, an outcome function wrapped as a scorer, a weighted sum) is refused at set-up
    with a UserError that says what process mode needs; an outcome function handed over as a step function is
    caught at the first update; sequence-score normalisation is a ConfigError."""
    tok = step_tok
    for reward in (tiny_reward_model(tok, n_layer=1, n_embd=32), FunctionScorer(lambda p, c: [0.0] * len(c))):
        with pytest.raises(UserError, match=r"reward_granularity='process' needs a reward that scores each step"):
            _ppo(tmp_path, tok, step_policy, reward=reward)
        with pytest.raises(UserError, match="scores each step"):
            _grpo(tmp_path, tok, step_policy, reward=reward)
    with pytest.raises(UserError, match="expected one list of scores per solution, one score per step"):
        _grpo(tmp_path, tok, step_policy, reward=lambda prompts, responses: [0.0] * len(responses))

    class Floats:      # an object with step_scores that gives one number per response
        def step_scores(self, prompts, completions):
            return [0.0] * len(completions)

    class TooMany:     # more scores than the response has steps
        def step_scores(self, prompts, completions):
            return [[0.0] * (len(split_steps(c)) + 1) for c in completions]

    with pytest.raises(UserError, match="expected a list of step scores, got float"):
        _grpo(tmp_path, tok, step_policy, reward=Floats())
    with pytest.raises(UserError, match=r"has (\d+) steps but got \d+ step scores"):
        _grpo(tmp_path, tok, step_policy, reward=TooMany())
    with pytest.raises(ConfigError, match="reward_normalization"):
        PPOConfig(reward_granularity="process", reward_normalization="running")
    with pytest.raises(ConfigError, match="reward_granularity"):
        GRPOConfig(reward_granularity="steps")
    with pytest.raises(ConfigError, match="moving_average"):
        GRPOConfig(reward_granularity="process", estimator="reinforce", baseline="learned")


def test_cli_flag_runs_process_mode_with_a_step_function(tmp_path, step_tok):
    """`alignloop rloo --reward-granularity process --reward-model prm.test_rl_process:good_steps` (YAML key the same):
    one update logs the step metrics; a reward model (one score per response) is refused with a UserError."""
    policy = build_tiny_checkpoint(tmp_path / "policy", _corpus(), n_layer=1, n_embd=32)
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": PROMPT}) + "\n")
    cfg = tmp_path / "rloo.yaml"
    cfg.write_text(yaml.safe_dump({"model": str(policy), "reward_model": f"{__name__}:good_steps",
                                   "train_file": str(tmp_path / "prompts.jsonl"), "output_dir": str(tmp_path / "out"),
                                   "rollout_batch_size": 2, "num_generations": 2, "max_new_tokens": 8,
                                   "progress": False, "tensorboard": False, "save_final": False}))
    res = CliRunner().invoke(cli, ["rloo", "--config", str(cfg), "--total-updates", "1",
                                   "--reward-granularity", "process"])
    assert res.exit_code == 0, res.output
    metrics = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert "reward/steps_per_response" in metrics[-1] and "reward/steps_mean" in metrics[-1]
    assert "--reward-granularity" in CliRunner().invoke(cli, ["ppo", "--help"]).output
    rm = build_tiny_checkpoint(tmp_path / "rm", _corpus(), kind="reward", n_layer=1, n_embd=32)
    bad = CliRunner().invoke(cli, ["grpo", "--config", str(cfg), "--reward-granularity", "process",
                                   "--reward-model", str(rm)])
    assert isinstance(bad.exception, UserError) and "scores each step" in str(bad.exception)


def test_a_process_reward_model_folder_scores_the_steps_in_one_pass(tmp_path, step_tok):
    """`reward_model` = a PRM folder (a random-head tiny PRM): the step rewards are its step probabilities, and the
    raw score its `ProcessScorer`'s whole-response score (min of the steps), both from one pass of the PRM: equal to
    what the scorer gives when asked separately. PPO's value_model='reward' cannot start a critic from a PRM."""
    base = build_tiny_checkpoint(tmp_path / "base", _corpus(), n_layer=1, n_embd=32)
    prm = build_prm(base)
    prm.save_pretrained(tmp_path / "prm")
    load_tokenizer(str(base)).save_pretrained(tmp_path / "prm")
    policy = tiny_causal_lm(load_tokenizer(str(base)), n_layer=1, n_embd=32, seed=0)
    tok = load_tokenizer(str(base), padding_side="left")
    calls = []
    tr = GRPOTrainer(model=policy, args=GRPOConfig(**_common(tmp_path / "run", reward_model=str(tmp_path / "prm"),
                                                             rollout_batch_size=2, num_generations=2,
                                                             estimator="rloo", stop_strings=[])),
                     train_dataset=[PROMPT] * 2, tokenizer=tok, callbacks=[calls.append])
    scorer = tr.scorer
    assert isinstance(scorer, ProcessScorer)
    tr.train()
    exp = calls[0]
    assert exp.steps.scores == [[pytest.approx(v, abs=1e-6) for v in row]
                                for row in scorer.step_scores(exp.prompts, exp.responses)]
    assert torch.allclose(exp.raw_scores, scorer(exp.prompts, exp.responses), atol=1e-6)
    with pytest.raises(ConfigError, match="use value_model='head'"):   # PPO's critic cannot start from a PRM
        PPOTrainer(model=policy, args=PPOConfig(**_common(tmp_path / "ppo", reward_model=str(tmp_path / "prm"),
                                                          value_model="reward")),
                   train_dataset=[PROMPT], tokenizer=tok)


def test_an_outcome_reward_model_as_process_reward_is_warned_about(tmp_path, step_tok):
    """An ORM (`alignloop prm --outcome`: only final steps trained) given as the process reward: a warning that its
    other step scores are untrained; a PRM of the process view: none."""
    import warnings

    from alignloop.models.prm import PRM_CONFIG_KEY

    base = build_tiny_checkpoint(tmp_path / "base", _corpus(), n_layer=1, n_embd=32)
    tok = load_tokenizer(str(base), padding_side="left")
    policy = tiny_causal_lm(load_tokenizer(str(base)), n_layer=1, n_embd=32, seed=0)
    for view in ("outcome", "process"):
        prm = build_prm(base)
        getattr(prm.config, PRM_CONFIG_KEY)["view"] = view
        prm.save_pretrained(tmp_path / view)
        load_tokenizer(str(base)).save_pretrained(tmp_path / view)
        args = GRPOConfig(**_common(tmp_path / f"run-{view}", reward_model=str(tmp_path / view), rollout_batch_size=2,
                                    num_generations=2, estimator="rloo"))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            GRPOTrainer(model=policy, args=args, train_dataset=[PROMPT] * 2, tokenizer=tok)
        said = [str(w.message) for w in caught if "outcome reward model" in str(w.message)]
        assert len(said) == (view == "outcome"), (view, said)


def test_step_reward_values_by_hand():
    """score: the step scores as they are; delta: the change of their running minimum from 1 (potential-based
    shaping): [0.9, 0.95, 0.3, 0.4] -> running min [0.9, 0.9, 0.3, 0.3] -> [-0.1, 0, -0.6, 0], summing to
    min - 1 = -0.7 however many steps; an unknown form and delta with outcome rewards are config errors."""
    from alignloop.errors import ConfigError
    from alignloop.rl import step_reward_values

    assert step_reward_values([0.9, 0.95, 0.3, 0.4]) == [0.9, 0.95, 0.3, 0.4]
    assert step_reward_values([0.9, 0.95, 0.3, 0.4], "delta") == pytest.approx([-0.1, 0.0, -0.6, 0.0])
    assert step_reward_values([1.0] * 7, "delta") == [0.0] * 7        # more good steps pay nothing more
    with pytest.raises(ConfigError, match="step_reward"):
        step_reward_values([0.5], "sum")
    with pytest.raises(ConfigError, match="applies to reward_granularity='process'"):
        PPOConfig(output_dir="x", step_reward="delta")
    # the critic-free estimators' group baseline would pay extra zero-increment steps: delta is PPO's
    with pytest.raises(ConfigError, match="step_reward='delta' is PPO's"):
        GRPOConfig(output_dir="x", reward_granularity="process", step_reward="delta")
    # delta reads probabilities: a score outside 0..1 (a step function's own scale) is an error, not zeros
    from alignloop.errors import UserError
    with pytest.raises(UserError, match="takes step scores in 0..1"):
        step_reward_values([8.0, 3.0], "delta")


def test_ppo_delta_step_rewards_sum_to_the_min_score_minus_one(tmp_path, step_tok, step_policy):
    """PPO with step_reward delta: each response's placed rewards (rewards − non-score rewards) sum to
    min(step scores) − 1 (0 − 1 when a step lacks "good"), sitting on the end token of the first step that fails."""
    tok = step_tok
    _, _h, seen = _ppo(tmp_path, tok, step_policy, step_reward="delta")
    exp = seen[0]
    multi = 0
    for b in range(len(exp.responses)):
        _ids, steps, ends = _row_steps(exp, tok, b)
        if not steps:
            continue
        placed = (exp.rewards - exp.non_score_rewards)[b]
        scores = good_steps(None, [steps])[0]
        assert math.isclose(placed.sum().item(), min(scores) - 1.0, abs_tol=1e-6), (b, exp.responses[b])
        expected = torch.zeros_like(placed)
        first_bad = next((i for i, s in enumerate(scores) if s < 1.0), None)
        if first_bad is not None:
            expected[ends[first_bad]] = -1.0
        assert torch.allclose(placed, expected), (b, exp.responses[b])
        multi += len(steps) > 1
    assert multi >= 8


def test_delta_pays_a_response_without_steps_its_outcome_minus_one():
    """A response with no step (stopped at once) gets min(1, its outcome score) - 1 under delta: never more than a
    solution whose steps are all good (0), where `score` would pay it the outcome as it is."""
    from types import SimpleNamespace

    from alignloop.rl import step_rewards

    rollout = SimpleNamespace(response_ids=torch.zeros(2, 3, dtype=torch.long),
                              response_mask=torch.tensor([[True, False, False], [True, True, True]]),
                              stopped=torch.tensor([True, True]))
    scored = SimpleNamespace(step_scores=[[], [0.9, 0.6]], step_separator="\n")
    args = SimpleNamespace(step_reward="delta", reward_clip=None, missing_eos_penalty=None)
    import alignloop.rl as rl

    ends = rl.rollout_step_ends
    rl.rollout_step_ends = lambda tok, ro, sep: [[], [0, 2]]
    try:
        got = step_rewards(scored, torch.tensor([0.0, 0.6]), rollout, None, args)
        assert got.totals().tolist() == pytest.approx([-1.0, -0.4])
        args.step_reward = "score"
        assert step_rewards(scored, torch.tensor([0.0, 0.6]), rollout, None, args).totals().tolist() == \
            pytest.approx([0.0, 1.5])
    finally:
        rl.rollout_step_ends = ends


def test_a_step_function_reward_takes_the_step_aggregation():
    """The whole-response score of a step function used as the process reward is aggregated as step_aggregation
    says (it was always min)."""
    from alignloop.rl import step_scorer

    scorer = step_scorer(lambda prompts, lists: [[0.9, 0.5] for _ in lists], step_aggregation="prod")
    assert scorer.aggregate == "prod"
    assert scorer(["q"], ["a\nb\n"]).tolist() == pytest.approx([0.45])
